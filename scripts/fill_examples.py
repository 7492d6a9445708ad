"""Fill examples/ (git-ignored) with a few images from a dataset folder, for the demo's Examples row.

    python scripts/fill_examples.py ../shared/data/fracatlas --per-class 3
"""
from __future__ import annotations

import argparse
import random
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.data import LABELS, check_file, scan_dataset  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", type=Path, help="ROOT/<class>/ or ROOT/<split>/<class>/")
    p.add_argument("--per-class", type=int, default=3)
    p.add_argument("--to", type=Path, default=ROOT / "examples")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    samples = scan_dataset(args.dataset)
    rng = random.Random(args.seed)
    args.to.mkdir(parents=True, exist_ok=True)
    copied = 0
    for label in (1, 0):
        pool = [s for s in samples if s.label == label]
        rng.shuffle(pool)
        picked = [s for s in pool[: args.per_class * 5] if check_file(s.path) is None][: args.per_class]
        for s in picked:
            name = f"{LABELS[label].replace(' ', '_')}_{s.path.name}"
            shutil.copyfile(s.path, args.to / name)
            copied += 1
    print(f"copied {copied} images into {args.to}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
