"""Dataset folders: scanning, corrupt-file cleanup (quarantine, never delete), splits and the decoded-image cache.

Layouts: ``ROOT/<class>/...`` or ``ROOT/<split>/<class>/...``. Command line::

    python -m training.data clean DATASET... --quarantine DIR [--dry-run]
    python -m training.data restore DIR/manifest.csv
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import os
import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from bonefrac.config import NEGATIVE_LABEL, POSITIVE_LABEL, atomic_write_text
from bonefrac.imaging import IMAGE_EXTENSIONS, ImageDecodeError, decode_bytes
from bonefrac.transforms import EvalTransform

from .audit import HASH_WORDS

LABELS = (NEGATIVE_LABEL, POSITIVE_LABEL)  # index 0, 1: the order of the model's outputs
_ALIASES = {
    POSITIVE_LABEL: {"fractured", "fracture", "fractures", "broken", "positive", "abnormal", "yes", "1"},
    NEGATIVE_LABEL: {"not fractured", "non fractured", "nonfractured", "notfractured", "unfractured", "no fracture",
                     "not fracture", "normal", "negative", "healthy", "no", "0"},
}
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val",
                 "test": "test", "testing": "test"}
# What a training image may be: decodable raster formats in a grayscale, RGB or 16-bit mode.
TRAIN_FORMATS = {"JPEG", "PNG", "TIFF", "BMP"}
TRAIN_MODES = {"L", "RGB", "I;16", "I;16L", "I;16B", "I", "F"}
MANIFEST = "manifest.csv"


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # index into LABELS
    dataset: str  # name of the root folder it came from
    split: str | None = None  # as found on disk, or None


def label_from_folder(name: str) -> int:
    """Map a class-folder name (``Fracture``, ``not_fractured``, ``Normal``...) to a label index."""
    key = re.sub(r"[\s_\-]+", " ", name.strip().lower())
    for label, names in _ALIASES.items():
        if key in names or key.replace(" ", "") in {n.replace(" ", "") for n in names}:
            return LABELS.index(label)
    raise ValueError(
        f"class folder {name!r} is not a known label; use a name for '{POSITIVE_LABEL}' "
        f"(e.g. fractured, Fracture) or '{NEGATIVE_LABEL}' (e.g. not_fractured, Normal)"
    )


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


def scan_dataset(root: str | os.PathLike) -> list[Sample]:
    """All image files under ``root``, labelled by their class folder (and split folder, if any)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"dataset folder {root} does not exist")
    children = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not children:
        raise ValueError(f"dataset folder {root} has no class or split folders; expected ROOT/<class>/ or ROOT/<split>/<class>/")
    is_split = all(c.name.lower() in SPLIT_ALIASES for c in children)
    samples = []
    groups = [(SPLIT_ALIASES[c.name.lower()], sorted(d for d in c.iterdir() if d.is_dir())) for c in children] if is_split else [(None, children)]
    for split, class_dirs in groups:
        for class_dir in class_dirs:
            label = label_from_folder(class_dir.name)
            samples += [Sample(p, label, root.name, split) for p in _image_files(class_dir)]
    if not samples:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    return samples


def check_file(path: str | os.PathLike) -> str | None:
    """Why this file is unusable as training data, or None when it is fine."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    return check_bytes(data, path.name)[0]


def check_bytes(data: bytes, name: str) -> tuple[str | None, Image.Image | None]:
    """(why these file bytes are unusable as training data or None, the decoded image when usable)."""
    if not data:
        return "empty file (0 bytes)", None
    try:
        with Image.open(io.BytesIO(data)) as probe:
            fmt, mode = probe.format, probe.mode
    except UnidentifiedImageError:
        return "not an image", None
    except Image.DecompressionBombError:
        return "too many pixels (decompression-bomb guard)", None
    if fmt not in TRAIN_FORMATS:
        return f"{fmt} content named {Path(name).suffix or '(no extension)'}; accepted: {', '.join(sorted(TRAIN_FORMATS))}", None
    if mode not in TRAIN_MODES:
        return f"unsupported mode {mode} (accepted: {', '.join(sorted(TRAIN_MODES))})", None
    try:
        return None, decode_bytes(data, name)
    except ImageDecodeError as e:
        return str(e).split(": ", 1)[-1], None


def find_corrupt(samples_or_paths, workers: int = 2) -> list[tuple[Path, str]]:
    paths = [s.path if isinstance(s, Sample) else Path(s) for s in samples_or_paths]
    with get_context("spawn").Pool(workers) if workers > 1 else _Serial() as pool:
        reasons = pool.map(check_file, paths, chunksize=32)
    return [(p, r) for p, r in zip(paths, reasons) if r]


class _Serial:
    """A stand-in for a process pool when workers == 1 (tests, debugging)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, fn, items, chunksize=1):
        return [fn(i) for i in items]

    def imap(self, fn, items, chunksize=1):
        return map(fn, items)


def quarantine(bad: list[tuple[Path, str]], roots: list[Path], quarantine_dir: str | os.PathLike) -> Path:
    """Move each bad file under ``quarantine_dir`` (keeping its path relative to its dataset root)
    and append (original, quarantined, reason, sha256, time) to the manifest. Nothing is deleted."""
    qdir = Path(quarantine_dir)
    qdir.mkdir(parents=True, exist_ok=True)
    manifest = qdir / MANIFEST
    rows = _read_manifest(manifest) if manifest.exists() else []
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for path, reason in bad:
        path = Path(path).resolve()
        root = next((r for r in roots if path.is_relative_to(r)), path.parent)
        target = qdir / root.name / path.relative_to(root)
        n = 1
        while target.exists():
            target = target.with_name(f"{target.stem}.{n}{target.suffix}")
            n += 1
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.move(str(path), str(target))
        rows.append({"original_path": str(path.resolve()), "quarantined_path": str(target.resolve()), "reason": reason, "sha256": digest, "time": now})
        # Rewrite the manifest after every move: a crash leaves every moved file recorded.
        _write_manifest(manifest, rows)
    return manifest


def restore(manifest: str | os.PathLike) -> int:
    """Move every quarantined file in ``manifest`` back to where it was; returns how many moved."""
    manifest = Path(manifest)
    rows = _read_manifest(manifest)
    left, moved = [], 0
    for row in rows:
        src, dst = Path(row["quarantined_path"]), Path(row["original_path"])
        if dst.exists() or not src.exists():
            left.append(row)
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(src), str(dst))
        moved += 1
        _write_manifest(manifest, left + rows[rows.index(row) + 1:])
    _write_manifest(manifest, left)
    return moved


def _read_manifest(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _write_manifest(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["original_path", "quarantined_path", "reason", "sha256", "time"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def group_split(labels: np.ndarray, fractions, seed: int, groups: np.ndarray | None = None, names=None) -> np.ndarray:
    """Seeded, label-stratified assignment of items to parts (``names``, one per fraction), keeping
    each group whole: a duplicate group never straddles two parts.

    A group is stratified by its majority label (ties count as positive); groups are placed largest
    first (ties in random order) into the part furthest below its share of that label.
    """
    fractions = np.asarray(fractions, dtype=np.float64)
    if abs(fractions.sum() - 1.0) > 1e-6 or fractions.min() < 0:
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {tuple(fractions)}")
    names = np.asarray(names if names is not None else np.arange(len(fractions)), dtype=object)
    labels = np.asarray(labels)
    groups = np.arange(len(labels)) if groups is None else np.asarray(groups)
    out = np.empty(len(labels), dtype=object)
    group_ids, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(group_ids))]
    group_label = np.array([int(labels[m].mean() >= 0.5) for m in members])
    rng = np.random.default_rng(seed)
    for label in np.unique(group_label):
        these = np.flatnonzero(group_label == label)
        order = sorted(rng.permutation(these), key=lambda g: -len(members[g]))  # stable sort: ties stay random
        targets = fractions * sum(len(members[g]) for g in these)
        filled = np.zeros(len(fractions))
        for g in order:
            k = int(np.argmax(targets - filled))
            out[members[g]] = names[k]
            filled[k] += len(members[g])
    return out


def stratified_split(labels: np.ndarray, fractions: tuple[float, float, float], seed: int, groups: np.ndarray | None = None) -> np.ndarray:
    """'train'/'val'/'test' per item: :func:`group_split` with three parts."""
    return group_split(labels, fractions, seed, groups, ["train", "val", "test"])


def kfold_assignments(labels: np.ndarray, k: int, seed: int, groups: np.ndarray | None = None) -> np.ndarray:
    """Fold number (0..k-1) per item: group-aware, label-stratified folds."""
    if k < 2:
        raise ValueError(f"k-fold needs k >= 2, got {k}")
    return group_split(labels, [1.0 / k] * k, seed, groups, list(range(k))).astype(np.int64)


# ---- decoded-image cache ------------------------------------------------------------------

def _decode_for_cache(args: tuple[str, int, str]) -> tuple[str, np.ndarray | None, str, np.ndarray]:
    """(path) -> (reason or '', resized uint8 image, sha256 of the bytes, dihedral perceptual hashes).

    The file is read once and fully decoded once; the hashes are the audit's own (``hash_bytes``),
    so training and ``python -m training.audit`` agree."""
    path, size, interpolation = args
    from training.audit import hash_bytes
    from bonefrac.config import ModelConfig

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        data, reason, image = b"", f"unreadable: {e.strerror or e}", None
    else:
        reason, image = check_bytes(data, Path(path).name)
    _, digest, hashes = hash_bytes(data, Path(path).name, decoded=image)
    if reason:
        return reason, None, digest, hashes
    transform = EvalTransform(ModelConfig(input_size=size, interpolation=interpolation))
    return "", transform.resize(image), digest, hashes


@dataclass
class DecodedSet:
    """Samples decoded once through the eval transform's resize stage (the cache)."""

    samples: list[Sample]
    images: np.ndarray  # uint8 (N, S, S)
    sha256: list[str]
    phash: np.ndarray  # uint64 (N, 8, W): perceptual hashes of the image under the 8 flips/rotations
    rejected: list[tuple[Sample, str]]

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=np.int64)


def file_sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def cache_key(samples: list[Sample], size: int, interpolation: str) -> str:
    """Content-based: the same files (by SHA-256, not mtime, so a re-copied dataset still hits) and settings."""
    key_src = "\n".join(f"{s.path.resolve()}|{file_sha256(s.path)}" for s in samples)
    return hashlib.sha256(f"v3|{size}|{interpolation}|{key_src}".encode()).hexdigest()[:20]


def decode_samples(samples: list[Sample], transform: EvalTransform, interpolation: str, cache_dir: str | os.PathLike | None, workers: int = 2, progress: bool = True) -> DecodedSet:
    """Decode and resize every sample once; reuse the cache when the files and settings are unchanged."""
    key = cache_key(samples, transform.size, interpolation)
    cache_file = Path(cache_dir) / f"decoded-{transform.size}-{key}.npz" if cache_dir else None
    if cache_file and cache_file.exists():
        z = np.load(cache_file, allow_pickle=False)
        reasons, images, digests, phashes = list(z["reasons"]), z["images"], list(z["sha256"]), z["phash"]
    else:
        from tqdm import tqdm

        jobs = [(str(s.path), transform.size, interpolation) for s in samples]
        with get_context("spawn").Pool(workers) if workers > 1 else _Serial() as pool:
            out = list(tqdm(pool.imap(_decode_for_cache, jobs, chunksize=16), total=len(jobs), desc="decode", file=sys.stderr, disable=not progress))
        reasons = [o[0] for o in out]
        blank = np.zeros((transform.size, transform.size), np.uint8)
        images = np.stack([o[1] if o[1] is not None else blank for o in out]) if out else np.zeros((0, transform.size, transform.size), np.uint8)
        digests = [o[2] for o in out]
        phashes = np.stack([o[3] for o in out]).astype(np.uint64) if out else np.zeros((0, 8, HASH_WORDS), np.uint64)
        if cache_file:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(".tmp.npz")
            np.savez(tmp, reasons=np.array(reasons, dtype=str), images=images, sha256=np.array(digests, dtype=str), phash=phashes)
            os.replace(tmp, cache_file)
    keep = [i for i, r in enumerate(reasons) if not r]
    return DecodedSet(
        samples=[samples[i] for i in keep],
        images=images[keep],
        sha256=[str(digests[i]) for i in keep],
        phash=np.asarray(phashes)[keep],
        rejected=[(samples[i], str(r)) for i, r in enumerate(reasons) if r],
    )


# ---- command line -------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    clean = sub.add_parser("clean", help="find corrupt files and move them to a quarantine folder")
    clean.add_argument("datasets", nargs="+", type=Path)
    clean.add_argument("--quarantine", type=Path, help="where to move bad files (required unless --dry-run)")
    clean.add_argument("--dry-run", action="store_true", help="only report; move nothing")
    clean.add_argument("--workers", type=int, default=2)
    rest = sub.add_parser("restore", help="move quarantined files back to where they were")
    rest.add_argument("manifest", type=Path)
    args = parser.parse_args(argv)

    if args.command == "restore":
        print(f"restored {restore(args.manifest)} files")
        return 0
    if not args.dry_run and not args.quarantine:
        parser.error("clean needs --quarantine DIR (or --dry-run to only report)")
    samples = [s for root in args.datasets for s in scan_dataset(root)]
    bad = find_corrupt(samples, args.workers)
    for path, reason in bad:
        print(f"{path}\t{reason}")
    summary = Counter(reason.split(" (")[0].split(":")[0] for _, reason in bad)
    print(f"{len(bad)} of {len(samples)} files unusable" + "".join(f"\n  {n:5d}  {r}" for r, n in summary.most_common()), file=sys.stderr)
    if bad and not args.dry_run:
        manifest = quarantine(bad, [r.resolve() for r in args.datasets], args.quarantine)
        print(f"moved {len(bad)} files to {args.quarantine} (manifest: {manifest}); undo with: python -m training.data restore {manifest}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
