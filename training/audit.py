"""Exact and near-duplicate audit: which images are copies of which, across splits, classes and datasets.

    python -m training.audit DATASET... [--csv groups.csv] [--json summary.json]

Exact: SHA-256 of the file bytes. Near: 256-bit perceptual hashes (``imagehash.phash`` with
hash_size 16, on a 128x128 grayscale thumbnail) of the image under all 8 flips / 90-degree
rotations, compared by Hamming distance, so resized, re-encoded, mirrored and rotated copies are
caught. Why 256 bits and 24: on FracAtlas the 64-bit pHash puts hundreds of *different* radiographs
of the same body part within 8 bits of each other (X-rays all look alike at 8x8 frequencies), so
duplicate groups chained into one group of thousands. With 256 bits, FracAtlas' nearest-neighbour
distances split cleanly: true copies at 0-14 bits, nothing at 15-24, distinct images from 25 up
(measured on ../shared/data; see the issue #6 note). Copies rotated by arbitrary small angles (the
multi-region set's "-rotated" files) reach 10-40 bits and are caught only up to 24.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import sys
from collections import defaultdict
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

HASH_SIZE = 16  # pHash side: 16 x 16 = 256 bits, stored as 4 uint64 words
HASH_WORDS = HASH_SIZE * HASH_SIZE // 64
NEAR_DUPLICATE_DISTANCE = 24  # bits of 256
THUMBNAIL = 128
_DIHEDRAL = (None, Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.ROTATE_90,
             Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270, Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE)


def perceptual_hash(image: Image.Image) -> np.ndarray:
    """uint64 (HASH_WORDS,): the 256-bit pHash of an image."""
    import imagehash

    bits = imagehash.phash(image, hash_size=HASH_SIZE).hash.flatten()
    return np.packbits(bits).view(">u8").astype(np.uint64)


def dihedral_hashes(image: Image.Image) -> np.ndarray:
    """uint64 (8, HASH_WORDS): the hash of the image and of its 7 flips/rotations (identity first)."""
    small = image.convert("L").resize((THUMBNAIL, THUMBNAIL), Image.Resampling.BILINEAR)
    return np.stack([perceptual_hash(small if t is None else small.transpose(t)) for t in _DIHEDRAL])


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances between hash arrays a (N, W) and b (M, W) -> int (N, M)."""
    a, b = np.asarray(a, np.uint64), np.asarray(b, np.uint64)
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    out = np.zeros((len(a), len(b)), dtype=np.int32)
    for w in range(a.shape[1]):
        out += np.bitwise_count(a[:, None, w] ^ b[None, :, w])
    return out


def _as_hashes(h: np.ndarray) -> np.ndarray:
    h = np.asarray(h, np.uint64)
    return h.reshape(len(h), 8, -1)


def nearest_copy_distance(candidates: np.ndarray, others: np.ndarray, chunk: int = 256) -> np.ndarray:
    """For each candidate (N, 8, W), the smallest distance from its identity hash to any flip/rotation of any other (M, 8, W)."""
    ident = _as_hashes(candidates)[:, 0]
    variants = _as_hashes(others).reshape(-1, ident.shape[1])
    out = np.full(len(ident), 10**6, dtype=np.int32)
    if len(variants) == 0:
        return out
    for start in range(0, len(ident), chunk):
        out[start:start + chunk] = hamming(ident[start:start + chunk], variants).min(axis=1)
    return out


def find_leaks(candidate_sha: list[str], candidate_hashes: np.ndarray, held_sha: list[str], held_hashes: np.ndarray,
               max_distance: int = NEAR_DUPLICATE_DISTANCE) -> np.ndarray:
    """Boolean mask over candidates: True where a candidate is an exact or near copy of a held-out image."""
    held_set = set(held_sha)
    leak = np.array([s in held_set for s in candidate_sha], dtype=bool)
    if len(held_hashes) and len(candidate_hashes):
        leak |= nearest_copy_distance(candidate_hashes, held_hashes) <= max_distance
    return leak


def duplicate_groups(sha: list[str], hashes: np.ndarray, max_distance: int = NEAR_DUPLICATE_DISTANCE, chunk: int = 256) -> np.ndarray:
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
    if n:
        hashes = _as_hashes(hashes)
        ident, variants = hashes[:, 0], hashes.reshape(-1, hashes.shape[2])
        for start in range(0, n, chunk):
            d = hamming(ident[start:start + chunk], variants).reshape(-1, n, 8).min(axis=2)
            for i, j in zip(*np.nonzero(d <= max_distance)):
                if start + i != j:
                    union(start + i, j)
    return np.array([find(i) for i in range(n)])


# ---- the audit command ---------------------------------------------------------------------

def hash_file(path: str) -> tuple[str, str, np.ndarray]:
    """(reason it is unusable or '', SHA-256, dihedral hashes) for one file."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return f"unreadable: {e.strerror or e}", "", np.zeros((8, HASH_WORDS), np.uint64)
    return hash_bytes(data, Path(path).name)


def hash_bytes(data: bytes, name: str, decoded: Image.Image | None = None) -> tuple[str, str, np.ndarray]:
    """Like :func:`hash_file` for file bytes. JPEGs are decoded at reduced DCT scale (a 2000 px JPEG
    decodes ~8x faster, same hash); other formats use ``decoded`` when the caller already has it."""
    from bonefrac.imaging import ImageDecodeError, decode_bytes

    digest = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as probe:
            if probe.format == "JPEG":
                probe.draft("L", (2 * THUMBNAIL, 2 * THUMBNAIL))
                probe.load()
                return "", digest, dihedral_hashes(probe.convert("L"))
    except Exception:  # noqa: BLE001 - fall through to the full decoder, which explains the problem in one line
        pass
    try:
        return "", digest, dihedral_hashes(decoded if decoded is not None else decode_bytes(data, name))
    except ImageDecodeError as e:
        return str(e).split(": ", 1)[-1], digest, np.zeros((8, HASH_WORDS), np.uint64)


def audit(samples, workers: int = 2, progress: bool = True) -> dict:
    """Hash every sample, group copies, and count what matters: held-out images with a copy in
    training, groups under both labels, copies across datasets."""
    from tqdm import tqdm

    from training.data import _Serial

    paths = [str(s.path) for s in samples]
    with get_context("spawn").Pool(workers) if workers > 1 else _Serial() as pool:
        out = list(tqdm(pool.imap(hash_file, paths, chunksize=16), total=len(paths), desc="hash", file=sys.stderr, disable=not progress))
    ok = [i for i, (reason, _, _) in enumerate(out) if not reason]
    unusable = [(paths[i], out[i][0]) for i in range(len(out)) if out[i][0]]
    good = [samples[i] for i in ok]
    sha = [out[i][1] for i in ok]
    hashes = np.stack([out[i][2] for i in ok]) if ok else np.zeros((0, 8, HASH_WORDS), np.uint64)
    groups = duplicate_groups(sha, hashes)
    members = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    dup_groups = {g: m for g, m in members.items() if len(m) > 1}

    def where(s):
        return f"{s.dataset}/{s.split}" if s.split else s.dataset

    rows = []  # one per image in a group of 2+
    for gid, (g, m) in enumerate(sorted(dup_groups.items(), key=lambda kv: -len(kv[1]))):
        labels = {good[i].label for i in m}
        places = {where(good[i]) for i in m}
        for i in m:
            rows.append({"group": gid, "size": len(m), "path": str(good[i].path), "dataset": good[i].dataset, "split": good[i].split or "",
                         "label": ("not fractured", "fractured")[good[i].label], "sha256": sha[i],
                         "kind": "exact" if sum(sha[j] == sha[i] for j in m) > 1 else "near",
                         "both_labels": len(labels) > 1, "places": ";".join(sorted(places))})
    split_of = np.array([good[i].split or "" for i in range(len(good))], dtype=object)
    per_place = {}
    for place in sorted({where(s) for s in good}):
        idx = [i for i, s in enumerate(good) if where(s) == place]
        in_group = [i for i in idx if groups[i] in dup_groups]
        per_place[place] = {"images": len(idx), "in_duplicate_groups": len(in_group),
                            "exact_copies": sum(1 for i in idx if sum(sha[j] == sha[i] for j in members[groups[i]]) > 1)}
    leaks = {}
    for held in ("test", "val"):
        for dataset in sorted({s.dataset for s in good}):
            idx = [i for i, s in enumerate(good) if s.split == held and s.dataset == dataset]
            if not idx:
                continue
            train_groups = {groups[i] for i, s in enumerate(good) if split_of[i] == "train"}
            leaky = [i for i in idx if groups[i] in train_groups]
            exact = [i for i in leaky if any(sha[j] == sha[i] and split_of[j] == "train" for j in members[groups[i]])]
            leaks[f"{dataset}/{held}"] = {"images": len(idx), "with_copy_in_train": len(leaky), "exact": len(exact)}
    both = [g for g, m in dup_groups.items() if len({good[i].label for i in m}) > 1]
    cross = [g for g, m in dup_groups.items() if len({good[i].dataset for i in m}) > 1]
    return {
        "images": len(samples), "unusable": len(unusable), "unusable_files": unusable,
        "duplicate_groups": len(dup_groups), "images_in_duplicate_groups": sum(len(m) for m in dup_groups.values()),
        "largest_group": max((len(m) for m in dup_groups.values()), default=0),
        "per_place": per_place, "held_out_with_copy_in_train": leaks,
        "groups_under_both_labels": len(both), "images_under_both_labels": sum(len(dup_groups[g]) for g in both),
        "groups_across_datasets": len(cross), "images_in_groups_across_datasets": sum(len(dup_groups[g]) for g in cross),
        "near_duplicate_distance": NEAR_DUPLICATE_DISTANCE, "hash_bits": HASH_SIZE * HASH_SIZE,
        "rows": rows,
    }


def summary_table(report: dict) -> str:
    lines = [f"{report['images']} files, {report['unusable']} unusable (not hashed); "
             f"{report['images_in_duplicate_groups']} images in {report['duplicate_groups']} duplicate groups "
             f"(exact, or pHash within {report['near_duplicate_distance']} of {report['hash_bits']} bits under any flip/rotation; largest group {report['largest_group']})",
             "", "| where | images | in a duplicate group | exact copies |", "|---|---|---|---|"]
    lines += [f"| {p} | {v['images']} | {v['in_duplicate_groups']} | {v['exact_copies']} |" for p, v in report["per_place"].items()]
    if report["held_out_with_copy_in_train"]:
        lines += ["", "| held-out split | images | with a copy in train | of which byte-identical |", "|---|---|---|---|"]
        lines += [f"| {p} | {v['images']} | {v['with_copy_in_train']} ({100 * v['with_copy_in_train'] / max(1, v['images']):.1f}%) | {v['exact']} |"
                  for p, v in report["held_out_with_copy_in_train"].items()]
    lines += ["", f"images under both labels (in a group that holds both): {report['images_under_both_labels']} "
                  f"in {report['groups_under_both_labels']} groups",
              f"copies across datasets: {report['images_in_groups_across_datasets']} images in {report['groups_across_datasets']} groups"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from bonefrac.config import atomic_write_text
    from training.data import scan_dataset

    p = argparse.ArgumentParser(prog="python -m training.audit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("datasets", nargs="+", type=Path, help="dataset folders: ROOT/<class>/ or ROOT/<split>/<class>/")
    p.add_argument("--csv", type=Path, help="write every image in a duplicate group here (group, path, dataset, split, label, kind...)")
    p.add_argument("--json", type=Path, help="write the full summary here")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        samples = [s for root in args.datasets for s in scan_dataset(root)]
    except ValueError as e:
        p.error(str(e))
    report = audit(samples, args.workers, not args.no_progress)
    print(summary_table(report), end="")
    if args.csv:
        buf = io.StringIO()
        fields = ["group", "size", "path", "dataset", "split", "label", "kind", "both_labels", "places", "sha256"]
        w = csv.DictWriter(buf, fieldnames=fields)
        w.writeheader()
        w.writerows({k: r[k] for k in fields} for r in report["rows"])
        atomic_write_text(args.csv, buf.getvalue())
        print(f"duplicate groups written to {args.csv} ({len(report['rows'])} rows)")
    if args.json:
        atomic_write_text(args.json, json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
