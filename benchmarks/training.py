"""Training throughput from the decoded-image cache against a synthetic-data ceiling, in one process.

    python -m benchmarks.training [--size 160] [--images 512] [--batch-size 64] [--steps 6]

Ceiling: the same model, optimizer, autocast and batch on one random tensor already on the device
(no data loading, no augmentation). Ours: `training.train.train_one_epoch` on real FracAtlas
images from the cache (indexing, batched augmentation, normalisation included). Target >= 0.7x.
Runs on CUDA when present, else on CPU (and says which in RESULTS.md).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import publish, real_files


def run(size: int, images: int, batch_size: int, steps: int, cache_dir: str | None) -> list[dict]:
    from bonefrac.config import ModelConfig
    from bonefrac.model import build_model
    from bonefrac.transforms import build_eval_transform
    from training.augment import AugmentConfig
    from training.data import LABELS, Sample, decode_samples
    from training.train import Split, amp_dtype, get_args_parser, resolve_device, train_one_epoch

    device = resolve_device("auto")
    dtype = amp_dtype("auto", device)
    config = ModelConfig(input_size=size)
    transform = build_eval_transform(config)
    files = real_files(images)
    samples = [Sample(p, LABELS.index("fractured" if p.parent.name == "fractured" else "not fractured"), "fracatlas") for p in files]
    decoded = decode_samples(samples, transform, config.interpolation, cache_dir, workers=2, progress=False)
    n = min(len(decoded.samples), batch_size * steps)
    split = Split(decoded.images[:n], decoded.labels[:n], [str(s.path) for s in decoded.samples[:n]])
    args = get_args_parser().parse_args(["--data", ".", "--output-dir", ".", "--batch-size", str(batch_size), "--no-progress",
                                         "--warmup-epochs", "0"])

    def fresh():
        torch.manual_seed(0)
        model = build_model(config).to(device).to(memory_format=torch.channels_last)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-4)

    def synthetic(model, opt, k):
        x = torch.randn(batch_size, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 2, (batch_size,), device=device)
        for _ in range(k):
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                out = model(x)
            loss = F.cross_entropy(out.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    def ours(model, opt):
        train_one_epoch(model, None, opt, split, transform, AugmentConfig(), args, 1, 0, 10**6, torch.ones(2), device, dtype)
        if device.type == "cuda":
            torch.cuda.synchronize()

    k = n // batch_size
    model, opt = fresh()
    synthetic(model, opt, 1)  # warm-up (kernels, allocator)
    ours(model, opt)
    rates = {"synthetic": [], "ours": []}
    for _ in range(2):  # interleaved
        t = time.perf_counter()
        synthetic(model, opt, k)
        rates["synthetic"].append(k * batch_size / (time.perf_counter() - t))
        t = time.perf_counter()
        ours(model, opt)
        rates["ours"].append(k * batch_size / (time.perf_counter() - t))
    ceiling, real = max(rates["synthetic"]), max(rates["ours"])
    return [{"what": f"train step, {size} px, batch {batch_size}, {device.type}, autocast {dtype}", "ours": f"{real:.1f} img/s",
             "floor": f"{ceiling:.1f} img/s", "ratio": real / ceiling, "target": ">= 0.7x", "ok": real / ceiling >= 0.7}]


def main(argv: list[str] | None = None) -> int:
    from benchmarks.inference import table

    p = argparse.ArgumentParser(prog="python -m benchmarks.training", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--cache-dir", default=".cache/bonefrac")
    p.add_argument("--results", default=Path(__file__).with_name("RESULTS.md"), help="markdown file to append to ('': none)")
    args = p.parse_args(argv)
    rows = run(args.size, args.images, args.batch_size, args.steps, args.cache_dir or None)
    publish(args.results, "Training throughput", "benchmarks.training", argv, table(rows, floor="synthetic-data ceiling"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
