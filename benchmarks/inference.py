"""Inference speed against the physical floor: a bare torchvision ResNet18 forward in the same process.

    python -m benchmarks.inference [--model SOURCE] [--files 256] [--repeat 30] [--threads N]

Rows (each a ratio to its floor, measured interleaved so machine noise hits both alike):
- predict(image in memory) vs bare forward of one (1, 3, S, S) tensor: target <= 1.1x
- explain(image in memory) vs the same bare forward: target <= 1.5x
- predict_batch over real JPEG files (decoding included) vs bare batched forward: throughput >= 0.8x
Appends a table to benchmarks/RESULTS.md with the command, machine and date.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import publish, real_files


def _median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def run(model: str | None, files: int, repeat: int, batch_size: int, threads: int | None) -> list[dict]:
    from torchvision.models import resnet18

    from bonefrac import FracturePredictor
    from bonefrac.imaging import load_image

    if threads:
        torch.set_num_threads(threads)
    predictor = FracturePredictor.from_pretrained(model, device="cpu")
    size = predictor.config.input_size
    # The floor: torchvision's ResNet18 with the same weights (random weights run at a different speed:
    # denormals), channels_last, under inference_mode; nothing else.
    bare = resnet18(num_classes=2).eval()
    bare.load_state_dict(predictor.model.state_dict())
    bare = bare.to(memory_format=torch.channels_last)
    x1 = torch.randn(1, 3, size, size).contiguous(memory_format=torch.channels_last)
    paths = real_files(files)
    image = load_image(paths[0])  # "already in memory": decoded once, preprocessing still included per call

    def bare_one():
        with torch.inference_mode():
            bare(x1)

    for fn in (bare_one, lambda: predictor.predict(image), lambda: predictor.explain(image)):  # warm-up
        fn()
        fn()
    # Interleave the rows so a noisy neighbour slows all of them alike.
    rounds = {"bare": [], "predict": [], "explain": []}
    for _ in range(max(1, repeat // 5)):
        rounds["bare"].append(_median_ms(bare_one, 5))
        rounds["predict"].append(_median_ms(lambda: predictor.predict(image), 5))
        rounds["explain"].append(_median_ms(lambda: predictor.explain(image), 5))
    med = {k: statistics.median(v) for k, v in rounds.items()}

    xb = torch.randn(batch_size, 3, size, size).contiguous(memory_format=torch.channels_last)
    n_batches = max(1, len(paths) // batch_size)

    def bare_batched():
        with torch.inference_mode():
            for _ in range(n_batches):
                bare(xb)

    bare_batched()
    t = time.perf_counter()
    bare_batched()
    bare_ips = n_batches * batch_size / (time.perf_counter() - t)
    t = time.perf_counter()
    results = predictor.predict_batch(paths[: n_batches * batch_size], batch_size=batch_size)
    cli_ips = len(results) / (time.perf_counter() - t)
    errors = sum(1 for r in results if not r.ok)
    return [
        {"what": f"predict, 1 image in memory, {size} px", "ours": f"{med['predict']:.1f} ms", "floor": f"{med['bare']:.1f} ms",
         "ratio": med["predict"] / med["bare"], "target": "<= 1.1x", "ok": med["predict"] / med["bare"] <= 1.1},
        {"what": "explain (probabilities + Grad-CAM + overlay)", "ours": f"{med['explain']:.1f} ms", "floor": f"{med['bare']:.1f} ms",
         "ratio": med["explain"] / med["bare"], "target": "<= 1.5x", "ok": med["explain"] / med["bare"] <= 1.5},
        {"what": f"predict_batch over {len(results)} JPEG files (decode included; {errors} unreadable), batch {batch_size}",
         "ours": f"{cli_ips:.1f} img/s", "floor": f"{bare_ips:.1f} img/s", "ratio": cli_ips / bare_ips, "target": ">= 0.8x",
         "ok": cli_ips / bare_ips >= 0.8},
    ]


def table(rows: list[dict], floor: str = "bare ResNet18 forward") -> str:
    lines = [f"| measurement | bonefrac | {floor} | ratio | target | met |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['what']} | {r['ours']} | {r['floor']} | {r['ratio']:.2f}x | {r['target']} | {'yes' if r['ok'] else 'no'} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.inference", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model source (default: the bundled model)")
    p.add_argument("--files", type=int, default=256, help="real JPEG files for the throughput row")
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--results", default=Path(__file__).with_name("RESULTS.md"), help="markdown file to append to ('': none)")
    args = p.parse_args(argv)
    rows = run(args.model, args.files, args.repeat, args.batch_size, args.threads)
    publish(args.results, "Inference (CPU)", "benchmarks.inference", argv, table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
