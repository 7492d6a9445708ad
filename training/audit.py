"""Exact and near-duplicate detection, used to keep test images (and their copies) out of training.

Exact: SHA-256 of the file bytes. Near: 64-bit perceptual hashes (imagehash.phash) of the image
under all 8 flips / 90-degree rotations, compared by Hamming distance, so resized, re-encoded,
mirrored and rotated copies are caught.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

NEAR_DUPLICATE_DISTANCE = 8  # bits of 64; re-encoded/resized copies measure 0-6 here
_DIHEDRAL = (None, Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.ROTATE_90,
             Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270, Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE)


def perceptual_hash(image: Image.Image) -> int:
    import imagehash

    bits = imagehash.phash(image).hash.flatten()
    return int(np.packbits(bits).view(">u8")[0])


def dihedral_hashes(image: Image.Image) -> np.ndarray:
    """uint64 (8,): the perceptual hash of the image and of its 7 flips/rotations (identity first)."""
    small = image.convert("L").resize((64, 64), Image.Resampling.LANCZOS)
    return np.array([perceptual_hash(small if t is None else small.transpose(t)) for t in _DIHEDRAL], dtype=np.uint64)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances between uint64 hash arrays a (N,) and b (M,) -> (N, M)."""
    return np.bitwise_count(np.asarray(a, np.uint64)[:, None] ^ np.asarray(b, np.uint64)[None, :])


def find_leaks(candidate_sha: list[str], candidate_hashes: np.ndarray, held_sha: list[str], held_hashes: np.ndarray,
               max_distance: int = NEAR_DUPLICATE_DISTANCE, chunk: int = 512) -> np.ndarray:
    """Boolean mask over candidates: True where a candidate is an exact or near copy of a held-out image.

    candidate_hashes: (N, 8) or (N,) identity-first hashes; held_hashes: (M, 8) dihedral hashes.
    """
    held_set = set(held_sha)
    leak = np.array([s in held_set for s in candidate_sha], dtype=bool)
    if len(held_hashes) == 0 or len(candidate_hashes) == 0:
        return leak
    ident = np.asarray(candidate_hashes, np.uint64)
    ident = ident[:, 0] if ident.ndim == 2 else ident
    held = np.asarray(held_hashes, np.uint64).reshape(-1)
    for start in range(0, len(ident), chunk):
        d = hamming(ident[start:start + chunk], held)
        leak[start:start + chunk] |= d.min(axis=1) <= max_distance
    return leak


def duplicate_groups(sha: list[str], hashes: np.ndarray, max_distance: int = NEAR_DUPLICATE_DISTANCE, chunk: int = 512) -> np.ndarray:
    """Group id per image: images linked by exact or near duplication (transitively) share an id."""
    n = len(sha)
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)

    first: dict[str, int] = {}
    for i, s in enumerate(sha):
        union(i, first.setdefault(s, i))
    hashes = np.asarray(hashes, np.uint64)
    if n and hashes.ndim == 2:
        ident, variants = hashes[:, 0], hashes.reshape(-1)
        for start in range(0, n, chunk):
            d = hamming(ident[start:start + chunk], variants).reshape(-1, n, hashes.shape[1]).min(axis=2)
            for i, j in zip(*np.nonzero(d <= max_distance)):
                if start + i != j:
                    union(start + i, j)
    return np.array([find(i) for i in range(n)])
