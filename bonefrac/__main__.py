"""Command line: ``python -m bonefrac predict PATH [PATH ...] [--model SOURCE] [--csv OUT.csv]``."""
from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

from .imaging import IMAGE_EXTENSIONS

COLUMNS = ["path", "fractured", "not fractured", "prediction", "error", "warning"]


def collect_files(paths: list[Path]) -> list[Path]:
    """Files named explicitly, plus image files found recursively in named folders (sorted)."""
    found: list[Path] = []
    for p in paths:
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith("."))
        else:
            found.append(p)  # a missing or odd file still gets its row, with the error
    return found


def predict_command(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .config import atomic_write_text
    from .predictor import FracturePredictor

    files = collect_files(args.paths)
    if not files:
        print(f"error: no image files ({', '.join(IMAGE_EXTENSIONS)}) found in {', '.join(map(str, args.paths))}", file=sys.stderr)
        return 2
    predictor = FracturePredictor.from_pretrained(args.model, device=args.device)
    pos, neg = predictor.config.positive_label, predictor.config.negative_label
    rows = []
    with tqdm(total=len(files), desc="predict", unit="img", file=sys.stderr, disable=args.quiet or len(files) < 2) as bar:
        results = (r for batch in predictor.iter_predict(files, batch_size=args.batch_size) for r in batch)
        for path, result in zip(files, results):
            if result.ok:
                rows.append({"path": str(path), "fractured": f"{result.probabilities[pos]:.6f}",
                             "not fractured": f"{result.probabilities[neg]:.6f}", "prediction": result.prediction, "error": "",
                             "warning": result.warning or ""})
            else:
                rows.append({"path": str(path), "fractured": "", "not fractured": "", "prediction": "", "error": result.error, "warning": ""})
            bar.update(1)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    if args.csv:
        atomic_write_text(args.csv, buf.getvalue())
    else:
        sys.stdout.write(buf.getvalue())
    errors = sum(bool(r["error"]) for r in rows)
    positives = sum(r["prediction"] == pos for r in rows)
    unlike = sum(bool(r["warning"]) for r in rows)
    if not args.quiet:
        where = f" -> {args.csv}" if args.csv else ""
        flagged = f"; {unlike} unlike the training data (see the warning column)" if unlike else ""
        print(f"{len(rows)} files: {positives} {pos}, {len(rows) - positives - errors} {neg}, {errors} unreadable "
              f"(threshold {predictor.config.threshold:.3f}){flagged}{where}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bonefrac", description="Bone-fracture X-ray classifier (decision support, not a medical device).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="predict files and folders (searched recursively) into a CSV")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    p.add_argument("--model", default=None, help="model folder or Hub repo id user/repo[@revision] (default: $BONEFRAC_MODEL or the bundled model)")
    p.add_argument("--csv", type=Path, default=None, help="write the CSV here (default: stdout)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary on stderr")
    p.set_defaults(func=predict_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .config import ConfigError
    from .hub import ModelSourceError
    from .model import WeightsError

    try:
        return args.func(args)
    except (ModelSourceError, ConfigError, WeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
