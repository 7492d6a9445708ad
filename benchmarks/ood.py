"""The out-of-distribution check for colour photographs, measured: how coloured are real radiographs,
how coloured are real photographs, and where the limit sits between them.

    python -m benchmarks.ood [--limit N] [--workers 2]

Every image in ../shared/data goes through the predictor's own loader (load_image), which records the
fraction of clearly coloured pixels (chroma above bonefrac.imaging.COLOUR_CHROMA); the photographs are
the ones that ship inside installed packages. Appends the table to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import sys
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from benchmarks.common import DATA, installed_photos, publish


def _fraction(path: str) -> tuple[float, bool] | None:
    """(coloured fraction, whether the file is in a colour mode) or None for an unusable file."""
    from bonefrac.imaging import INFO_COLOUR, ImageDecodeError, load_image

    try:
        image = load_image(path)
    except ImageDecodeError:
        return None
    return image.info.get(INFO_COLOUR, 0.0), INFO_COLOUR in image.info


def measure(paths: list[Path], workers: int) -> list[tuple[float, bool]]:
    jobs = [str(p) for p in paths]
    if workers > 1:
        with get_context("spawn").Pool(workers) as pool:
            out = pool.map(_fraction, jobs, chunksize=32)
    else:
        out = [_fraction(j) for j in jobs]
    return [o for o in out if o is not None]


def run(limit: int, workers: int) -> dict:
    from PIL import Image

    from bonefrac.imaging import COLOUR_FRACTION_LIMIT, IMAGE_EXTENSIONS, colour_fraction

    xrays = sorted(p for p in DATA.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if limit:
        xrays = xrays[:: max(1, len(xrays) // limit)][:limit]
    photos = installed_photos()
    x = measure(xrays, workers)
    ph = measure(photos, 1)
    xf = np.array([f for f, _ in x])
    pf = np.array([f for f, _ in ph])
    gray_photos = [colour_fraction(Image.open(p).convert("L").convert("RGB")) for p in photos]  # what the check cannot see
    return {"limit": COLOUR_FRACTION_LIMIT, "xrays": len(x), "xrays_colour_mode": sum(c for _, c in x),
            "xray_max": float(xf.max()), "xray_p999": float(np.percentile(xf, 99.9)), "xray_flagged": int((xf > COLOUR_FRACTION_LIMIT).sum()),
            "photos": len(ph), "photo_min": float(pf.min()), "photo_median": float(np.median(pf)),
            "photo_flagged": int((pf > COLOUR_FRACTION_LIMIT).sum()), "gray_photos_flagged": int(sum(g > COLOUR_FRACTION_LIMIT for g in gray_photos)),
            "photo_names": ", ".join(p.name for p in photos)}


def table(r: dict) -> str:
    return ("| images | n | in a colour mode | coloured fraction | flagged (> %.2f) |\n|---|---|---|---|---|\n" % r["limit"]
            + f"| radiographs in ../shared/data (usable) | {r['xrays']} | {r['xrays_colour_mode']} | max {r['xray_max']:.3f}, "
            f"99.9th pct {r['xray_p999']:.3f} | {r['xray_flagged']} |\n"
            f"| photographs in installed packages | {r['photos']} | {r['photos']} | min {r['photo_min']:.3f}, median {r['photo_median']:.3f} | "
            f"{r['photo_flagged']} |\n"
            f"| the same photographs in grayscale (not detectable by colour) | {r['photos']} | 0 | 0 | {r['gray_photos_flagged']} |\n\n"
            f"Photographs: {r['photo_names']}.\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ood", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=0, help="measure at most this many radiographs (evenly spread; 0: all)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--results", default=Path(__file__).with_name("RESULTS.md"), help="markdown file to append to ('': none)")
    args = p.parse_args(argv)
    publish(args.results, "Out-of-distribution check: colour photographs", "benchmarks.ood", argv, table(run(args.limit, args.workers)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
