"""Train a bonefrac ResNet18 on folders of X-rays.

    python -m training.train --data ../shared/data/fracatlas --extra-train ../shared/data/multiregion \\
        --output-dir runs/r1 --epochs 18

``--data`` datasets supply validation and test images (their own split folders, or a stratified,
seeded, duplicate-group-aware split); ``--extra-train`` datasets only add training images. Any
training image that is an exact or near copy of a validation/test image is dropped, so the test
metrics are leak-free. Outputs in the run folder: checkpoint.pt (resumable), best.safetensors,
config.json, metrics.json, roc.png, confusion.png, learning_curves.png, augment_preview.png.

On several devices or nodes, launch it with torchrun (DistributedDataParallel; see training/distributed.py):

    torchrun --standalone --nproc-per-node 4 -m training.train --data ... --output-dir runs/ddp
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bonefrac.config import ModelConfig, atomic_write_text
from bonefrac.model import build_model, load_weights, save_weights
from bonefrac.transforms import EvalTransform, build_eval_transform

from .audit import duplicate_groups, find_leaks
from .augment import AugmentConfig, augment_batch, save_preview
from .distributed import Dist, cleanup, convert_batchnorm, gathered_predictions, setup, wrap
from .data import LABELS, DecodedSet, decode_samples, group_split, kfold_assignments, scan_dataset, stratified_split
from .evaluate import (binary_metrics, bootstrap_ci, choose_threshold, expected_calibration_error, fit_platt, fit_temperature,
                       parse_threshold_rule, plot_confusion, plot_learning_curves, plot_reliability, plot_roc, sigmoid)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a bonefrac fracture classifier", add_help=add_help,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", nargs="+", type=Path, required=True, help="dataset folders: ROOT/<class>/ or ROOT/<split>/<class>/")
    p.add_argument("--extra-train", nargs="*", type=Path, default=[], help="dataset folders used for training only (leak-filtered)")
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--cache-dir", type=Path, default=Path(".cache/bonefrac"), help="decoded-image cache ('' disables)")
    p.add_argument("--size", type=int, default=224, help="input size (square)")
    p.add_argument("--interpolation", default="bilinear", choices=["bilinear", "bicubic", "lanczos", "nearest"])
    p.add_argument("--split", type=Path, default=None, metavar="SPLIT_CSV", help="use the split another run recorded (its "
                   "split.csv): a model fine-tuned from that run (--init RUN) must not meet its training images in val/test")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--leaks", choices=["drop-train", "drop-test", "keep"], default="drop-train",
                   help="what to do with exact/near copies across splits: drop the training copies (default), drop the val/test "
                   "images that have a copy in training (to re-evaluate a model already trained on those splits), or keep "
                   "them (metrics inflated); the numbers are printed and recorded in the model card either way")
    p.add_argument("--allow-leaky-splits", dest="leaks", action="store_const", const="keep", help="same as --leaks keep")
    p.add_argument("--kfold", type=int, default=0, metavar="K", help="K-fold cross-validation over the --data images "
                   "(group-aware, stratified): one run per fold in OUTPUT_DIR/foldN, summary in OUTPUT_DIR/kfold.json and kfold.md")
    p.add_argument("--calibration", choices=["platt", "temperature", "none"], default="platt",
                   help="probability calibration fitted on validation: temperature and logit bias (platt), temperature only, or none")
    p.add_argument("--threshold-rule", default="sensitivity:0.9", help="how the decision threshold is chosen on validation: "
                   "youden, sensitivity:T (best specificity with sensitivity >= T) or specificity:T")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the 95%% confidence intervals")
    p.add_argument("--epochs", type=int, default=18)
    p.add_argument("--batch-size", type=int, default=64, help="global batch: under torchrun it is shared out among the "
                   "processes, so the recipe and its result do not depend on the number of devices")
    p.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=True, help="under torchrun: BatchNorm "
                   "statistics over the global batch (the same training as one process); --no-sync-bn: per-process statistics")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.01, help="final lr as a fraction of --lr (cosine)")
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--class-weights", choices=["balanced", "none"], default="balanced", help="loss weights against class imbalance")
    p.add_argument("--ema-decay", type=float, default=0.997, help="EMA of weights for evaluation (0 disables)")
    p.add_argument("--patience", type=int, default=6, help="stop after this many epochs without a better val AUC (0: never)")
    p.add_argument("--init", default="scratch", help="scratch, imagenet (torchvision's weights; needs network), or a model/run "
                   "folder to fine-tune from (its normalisation is kept)")
    p.add_argument("--amp", choices=["auto", "bf16", "none"], default="auto", help="auto: bf16 autocast on CUDA, and on CPUs with native bf16")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=2, help="processes decoding images for the cache")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint.pt")
    p.add_argument("--limit", type=int, default=0, help="use at most this many images per dataset (smoke tests)")
    p.add_argument("--preview", type=int, default=32, help="augmented samples in augment_preview.png (0: none)")
    p.add_argument("--no-progress", action="store_true")
    return p


# ---- pure helpers -------------------------------------------------------------------------

def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_ratio: float) -> float:
    """Linear warm-up to ``base_lr``, then cosine decay to ``base_lr * min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def balanced_class_weights(labels: np.ndarray, n_classes: int = 2) -> torch.Tensor:
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    return torch.tensor(len(labels) / (n_classes * np.maximum(counts, 1)), dtype=torch.float32)


def args_to_dict(args: argparse.Namespace) -> dict:
    def plain(v):
        return [plain(x) for x in v] if isinstance(v, (list, tuple)) else str(v) if isinstance(v, Path) else v
    return {k: plain(v) for k, v in vars(args).items()}


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


# ---- data ---------------------------------------------------------------------------------

@dataclass
class Split:
    images: np.ndarray  # uint8 (N, S, S)
    labels: np.ndarray  # int64 (N,)
    paths: list[str]


@dataclass
class Data:
    train: Split
    val: Split
    test: Split
    report: dict
    assignment: list[tuple[str, str]]  # (path, split) of every image before the leak filter: split.csv


@dataclass
class Pool:
    """Every usable image, decoded once, with its duplicate group; splits are made from it."""

    decoded: DecodedSet
    is_main: np.ndarray  # bool: from a --data dataset (may be val/test), else --extra-train only
    groups: np.ndarray  # duplicate-group id per image (exact or near copies share one)
    report: dict


def _subset(d: DecodedSet, idx) -> Split:
    idx = np.asarray(idx, dtype=np.int64)
    return Split(d.images[idx], d.labels[idx], [str(d.samples[i].path) for i in idx])


def _limit(samples, n: int, seed: int):
    if not n or len(samples) <= n:
        return samples
    rng = np.random.default_rng(seed)
    labels = np.array([s.label for s in samples])
    # Keep both classes in a tiny subset.
    picked = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[: max(1, n // 2)] for c in np.unique(labels)])
    return [samples[i] for i in sorted(picked[:n])]


def load_pool(args, transform: EvalTransform) -> Pool:
    main_samples = [s for root in args.data for s in _limit(scan_dataset(root), args.limit, args.seed)]
    extra_samples = [s for root in args.extra_train for s in _limit(scan_dataset(root), args.limit, args.seed)]
    cache_dir = str(args.cache_dir) if args.cache_dir and str(args.cache_dir) else None
    decoded = decode_samples(main_samples + extra_samples, transform, args.interpolation, cache_dir, args.workers, not args.no_progress)
    rejected = Counter(reason.split(" (")[0] for _, reason in decoded.rejected)
    print(f"data: {len(decoded.samples)} usable images, {len(decoded.rejected)} unusable left out (not moved; see `python -m training.data clean`)")
    main_set = set(main_samples)
    is_main = np.array([s in main_set for s in decoded.samples], dtype=bool)
    groups = duplicate_groups(decoded.sha256, decoded.phash)
    report = {"datasets": [str(r) for r in args.data], "extra_train": [str(r) for r in args.extra_train],
              "unusable": len(decoded.rejected), "unusable_reasons": dict(rejected.most_common())}
    return Pool(decoded, is_main, groups, report)


def default_splits(args, pool: Pool) -> np.ndarray:
    """Split folders where a --data dataset has them, else a stratified, seeded, group-aware split;
    --extra-train images are training images."""
    d = pool.decoded
    splits = np.array([s.split for s in d.samples], dtype=object)
    splits[~pool.is_main] = "train"
    no_split = np.flatnonzero(pool.is_main & np.array([s.split is None for s in d.samples]))
    if len(no_split):
        fractions = (1 - args.val_fraction - args.test_fraction, args.val_fraction, args.test_fraction)
        splits[no_split] = stratified_split(d.labels[no_split], fractions, args.seed, pool.groups[no_split])
    return splits


def read_split_csv(path: Path, pool: Pool) -> np.ndarray:
    """The split a run recorded (so --resume and re-evaluation see exactly the same images)."""
    with path.open(newline="", encoding="utf-8") as f:
        recorded = {row["path"]: row["split"] for row in csv.DictReader(f)}
    paths = [str(s.path) for s in pool.decoded.samples]
    known = set(paths)
    missing = [p for p in recorded if p not in known]
    if missing:
        raise SystemExit(f"error: {path} lists {len(missing)} images that are not in the data now (e.g. {missing[0]}); "
                         "the run was made on other data")
    return np.array([recorded.get(p, "unused") for p in paths], dtype=object)


def write_split_csv(path: Path, data: Data) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "split"])
    w.writerows(data.assignment)
    atomic_write_text(path, buf.getvalue())


def make_data(args, pool: Pool, splits: np.ndarray) -> Data:
    """Splits -> Data, after a leakage audit of them; ``args.leaks`` says which side of a leak is
    dropped (training copies, or the val/test images) or that it is kept; the numbers are reported."""
    d = pool.decoded
    labels = d.labels  # a property that builds the array: once
    train, val, test = (np.flatnonzero(splits == name) for name in ("train", "val", "test"))
    if len(val) == 0 or len(test) == 0:
        raise SystemExit("error: no validation or test images; give --data a dataset with val/test folders or non-zero --val-fraction/--test-fraction")
    sha = d.sha256

    def copies(idx, of):  # which of idx have an exact/near copy among `of`
        return find_leaks([sha[i] for i in idx], d.phash[idx], [sha[i] for i in of], d.phash[of])

    held = np.concatenate([val, test])
    train_copies, test_copies, val_copies = copies(train, held), copies(test, train), copies(val, train)
    test_leaky, val_leaky = int(test_copies.sum()), int(val_copies.sum())
    by_dataset = Counter(d.samples[i].dataset for i in train[train_copies])
    leaks = {"test_images_with_copy_in_train": test_leaky, "test_images": int(len(test)),
             "val_images_with_copy_in_train": val_leaky, "val_images": int(len(val)),
             "train_images_copying_val_or_test": int(train_copies.sum()), "by_dataset": dict(by_dataset),
             "action": "none needed"}
    numbers = (f"{test_leaky} of {len(test)} test and {val_leaky} of {len(val)} val images have an exact or near copy among the "
               f"training images ({int(train_copies.sum())} training copies, {dict(by_dataset)})")
    if train_copies.any() and args.leaks == "keep":
        leaks["action"] = "kept (--leaks keep): test metrics are inflated"
        print(f"WARNING: LEAKY SPLITS KEPT: {numbers}; the test metrics will be inflated, and the model card says so", file=sys.stderr)
    elif train_copies.any() and args.leaks == "drop-test":
        leaks["action"] = f"dropped the {test_leaky} test and {val_leaky} val images that have a copy in training"
        print(f"WARNING: the splits leak: {numbers}; dropped those val/test images (--leaks drop-test)", file=sys.stderr)
        test, val = test[~test_copies], val[~val_copies]
    elif train_copies.any():
        leaks["action"] = f"dropped the {int(train_copies.sum())} training copies"
        print(f"WARNING: the splits leak: {numbers}; dropped those training images so the test is leak-free "
              "(--leaks keep keeps them, --leaks drop-test drops the val/test side instead)", file=sys.stderr)
        train = train[~train_copies]
    used = np.concatenate([train, val, test])
    group_label = np.unique(np.stack([pool.groups[used], labels[used]]), axis=1)  # distinct (group, label) pairs
    ids, n_labels = np.unique(group_label[0], return_counts=True)
    both = ids[n_labels > 1]
    conflicting = int(np.isin(pool.groups[used], both).sum())
    if len(both):
        print(f"note: {len(both)} duplicate groups ({conflicting} images) appear under both labels", file=sys.stderr)
    counts = {name: {LABELS[c]: int((labels[idx] == c).sum()) for c in (0, 1)} for name, idx in (("train", train), ("val", val), ("test", test))}
    for name, c in counts.items():
        print(f"  {name:5s}: {sum(c.values()):5d} images  {c}")
    report = {**pool.report, "counts": counts, "leaks": leaks, "leaks_dropped_from_train": dict(by_dataset) if args.leaks == "drop-train" else {},
              "groups_under_both_labels": len(both), "images_in_groups_under_both_labels": conflicting,
              "test_datasets": sorted({d.samples[i].dataset for i in test})}
    assignment = [(str(s.path), str(split)) for s, split in zip(d.samples, splits) if split in ("train", "val", "test")]
    return Data(_subset(d, train), _subset(d, val), _subset(d, test), report, assignment)


def kfold_splits(args, pool: Pool) -> list[np.ndarray]:
    """K split arrays: fold f is the test set; validation is a group-aware stratified slice of the rest."""
    d = pool.decoded
    main = np.flatnonzero(pool.is_main)
    folds = kfold_assignments(d.labels[main], args.kfold, args.seed, pool.groups[main])
    out = []
    for f in range(args.kfold):
        splits = np.full(len(d.samples), "train", dtype=object)
        rest = main[folds != f]
        splits[main[folds == f]] = "test"
        val_share = min(0.5, args.val_fraction / (1 - 1 / args.kfold))
        splits[rest] = group_split(d.labels[rest], (1 - val_share, val_share), args.seed + 1 + f, pool.groups[rest], ["train", "val"])
        out.append(splits)
    return out


# ---- model --------------------------------------------------------------------------------

def init_weights(model: torch.nn.Module, init: str) -> None:
    if init == "scratch":
        return
    if init != "imagenet":
        folder = Path(init)
        weights = next((folder / n for n in ("model.safetensors", "best.safetensors") if (folder / n).is_file()), None)
        if weights is None:
            raise SystemExit(f"error: --init {init!r} is not scratch, imagenet or a folder with model.safetensors / best.safetensors")
        load_weights(model, weights)
        return
    from torchvision.models import ResNet18_Weights

    try:
        state = ResNet18_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
    except Exception as e:  # urllib raises a zoo of types when offline
        raise SystemExit(f"error: --init imagenet could not download torchvision's ImageNet weights ({type(e).__name__}: {e}); "
                         "check the network or put them in the torch hub cache, or use --init scratch") from None
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("fc.") for k in missing):
        raise SystemExit(f"error: ImageNet weights do not fit the model (missing {missing}, unexpected {unexpected})")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    if mode == "none":
        return None
    if mode == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        native = False
    return torch.bfloat16 if native else None


def make_ema(model: torch.nn.Module, decay: float):
    if decay <= 0:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


# ---- loops --------------------------------------------------------------------------------

def batches(n: int, batch_size: int, generator: torch.Generator | None = None, drop_last: bool = False):
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]


def train_one_epoch(model, ema, optimizer, data: Split, transform: EvalTransform, aug: AugmentConfig, args, epoch: int,
                    step: int, total_steps: int, class_weights: torch.Tensor, device, dtype, info: Dist = Dist(),
                    step_model: torch.nn.Module | None = None) -> tuple[float, int]:
    """One epoch over ``data.train``; ``step_model`` is the module to call (DDP around ``model`` under torchrun).
    Every rank draws the same global batch and augmentation parameters and takes its own slice of them."""
    from tqdm import tqdm

    step_model = step_model or model
    step_model.train()
    gen = torch.Generator().manual_seed(args.seed * 1000 + epoch)  # per epoch, so a resumed run replays the same order
    images, labels = torch.from_numpy(data.images), torch.from_numpy(data.labels)
    weights = class_weights.to(device)
    warmup = int(args.warmup_epochs * math.ceil(len(labels) / args.batch_size))
    total_loss, seen = 0.0, 0
    n_batches = len(labels) // args.batch_size if len(labels) >= args.batch_size else 1
    bar = tqdm(batches(len(labels), args.batch_size, gen, drop_last=True), total=n_batches, desc=f"epoch {epoch}",
               file=sys.stderr, disable=args.no_progress or not info.is_main, leave=False)
    for idx in bar:
        idx = idx[: len(idx) // info.world * info.world]  # a short final batch (tiny data only) must share out evenly
        mine = info.local_slice(len(idx))
        lr = lr_at(step, total_steps, warmup, args.lr, args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = images[idx[mine]].unsqueeze(1).to(device, non_blocking=True)
        y = labels[idx[mine]].to(device, non_blocking=True)
        x = transform.normalize(augment_batch(x, aug, gen if device.type == "cpu" else None, rows=mine, total=len(idx)))
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = step_model(x)
        # The class-weighted mean over the *global* batch; DDP averages gradients over ranks, hence the factor world.
        per_image = F.cross_entropy(logits.float(), y, weight=weights, label_smoothing=args.label_smoothing, reduction="none")
        share = per_image.sum() / weights[labels[idx].to(device)].sum()
        optimizer.zero_grad(set_to_none=True)
        (share * info.world).backward()
        optimizer.step()
        if ema is not None:
            ema.update_parameters(model)
        step += 1
        total_loss += share.item() * len(idx)
        seen += len(idx)
        bar.set_postfix(loss=f"{total_loss * info.world / seen:.4f}", lr=f"{lr:.2e}")
    return info.sum([total_loss])[0] / max(1, seen), step


@torch.inference_mode()
def predict_images(model, images: np.ndarray, transform: EvalTransform, device, batch_size: int = 128) -> np.ndarray:
    """Logits (N, 2) in fp32, through the eval transform's normalize on cached resized images."""
    model.eval()
    out = []
    images = torch.from_numpy(images)
    for idx in batches(len(images), batch_size):
        x = transform.normalize(images[idx].to(device)).contiguous(memory_format=torch.channels_last)
        out.append(model(x).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 2), np.float32)


def predict_split(model, data: Split, transform: EvalTransform, device, info: Dist = Dist()) -> np.ndarray:
    """Logits of a whole split; under torchrun each rank predicts a shard and every rank gets all of them."""
    return gathered_predictions(lambda images: predict_images(model, images, transform, device), data.images, info)


def margin_of(logits: np.ndarray) -> np.ndarray:
    """logit[fractured] - logit[not fractured]: P(fractured) = sigmoid(margin) before calibration."""
    pos = LABELS.index(ModelConfig().positive_label)
    return (logits[:, pos] - logits[:, 1 - pos]).astype(np.float64)


def evaluate(model, data: Split, transform, device, class_weights, info: Dist = Dist()) -> dict:
    logits = torch.from_numpy(predict_split(model, data, transform, device, info))
    loss = F.cross_entropy(logits, torch.from_numpy(data.labels), weight=class_weights).item()
    probs = torch.softmax(logits, dim=1).numpy()
    return {"loss": loss, "probs": probs, **binary_metrics(data.labels, probs[:, 1], 0.5)}


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(args: argparse.Namespace) -> dict:
    t0 = time.time()
    parse_threshold_rule(args.threshold_rule)  # fail before any work
    if args.split is None and args.init not in ("scratch", "imagenet") and (Path(args.init) / "split.csv").is_file() and not args.kfold:
        args.split = Path(args.init) / "split.csv"  # fine-tuning a run: its training images must stay out of val/test
        print(f"note: using the split of the run fine-tuned from ({args.split}); --split overrides")
    if args.split is not None and (args.kfold or not Path(args.split).is_file()):
        raise SystemExit(f"error: --split {args.split}: " + ("not with --kfold" if args.kfold else "no such file (a run's split.csv)"))
    info, ddp_device = setup(args.device)
    try:
        if args.batch_size % info.world:
            raise SystemExit(f"error: --batch-size {args.batch_size} (the global batch) does not divide among {info.world} processes")
        seed_everything(args.seed)  # the same on every rank: identical initial weights, permutations and augmentations
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        device = ddp_device or resolve_device(args.device)
        dtype = amp_dtype(args.amp, device)
        print(f"device {device}, autocast {dtype}, torch {torch.__version__}"
              + (f", {info.world} processes (DDP, {'global' if args.sync_bn else 'per-process'} BatchNorm)" if info.enabled else ""))
        transform = build_eval_transform(ModelConfig(input_size=args.size, interpolation=args.interpolation))
        # Rank 0 decodes and writes the cache; the others then read it.
        pool = load_pool(args, transform) if info.is_main else None
        info.barrier()
        pool = pool or load_pool(args, transform)
        if args.kfold:
            return run_kfold(args, pool, out, device, dtype, t0, info)
        split_csv = out / "split.csv" if args.resume and (out / "split.csv").exists() else args.split
        splits = read_split_csv(split_csv, pool) if split_csv else default_splits(args, pool)
        data = make_data(args, pool, splits)
        return fit(args, data, out, device, dtype, t0, info)
    finally:
        cleanup(info)


def run_kfold(args, pool: Pool, out: Path, device, dtype, t0: float, info: Dist = Dist()) -> dict:
    folds = []
    for f, splits in enumerate(kfold_splits(args, pool)):
        fold_dir = out / f"fold{f}"
        if args.resume and (fold_dir / "metrics.json").exists():
            print(f"fold {f}: already done ({fold_dir / 'metrics.json'})")
            metrics = json.loads((fold_dir / "metrics.json").read_text())
        else:
            print(f"---- fold {f + 1} of {args.kfold} ----")
            fold_dir.mkdir(parents=True, exist_ok=True)
            fold_args = argparse.Namespace(**{**vars(args), "resume": args.resume and (fold_dir / "checkpoint.pt").exists()})
            metrics = fit(fold_args, make_data(fold_args, pool, splits), fold_dir, device, dtype, time.time(), info)
        folds.append(metrics)
    summary = kfold_summary(folds)
    summary.update(seconds=round(time.time() - t0, 1), args=args_to_dict(args))
    if info.is_main:
        atomic_write_text(out / "kfold.json", json.dumps(summary, indent=2) + "\n")
        atomic_write_text(out / "kfold.md", kfold_table(summary))
    print(kfold_table(summary))
    return summary


KFOLD_METRICS = ("auc", "accuracy", "sensitivity", "specificity", "kappa")


def kfold_summary(folds: list[dict]) -> dict:
    rows = [{"fold": i, "n": m["test"]["n"], "positives": m["test"]["positives"], "threshold": m["test"]["threshold"],
             **{k: m["test"][k] for k in KFOLD_METRICS}, "ece": m["calibration"]["test_ece_after"]} for i, m in enumerate(folds)]
    stats = {}
    for k in (*KFOLD_METRICS, "ece"):
        v = np.array([r[k] for r in rows], dtype=np.float64)
        stats[k] = {"mean": float(np.nanmean(v)), "std": float(np.nanstd(v, ddof=1)) if len(v) > 1 else 0.0}
    return {"folds": rows, "mean_std": stats}


def kfold_table(summary: dict) -> str:
    cols = (*KFOLD_METRICS, "ece")
    lines = ["| fold | n (fractured) | threshold | " + " | ".join(cols) + " |", "|---" * (len(cols) + 3) + "|"]
    for r in summary["folds"]:
        lines.append(f"| {r['fold']} | {r['n']} ({r['positives']}) | {r['threshold']:.3f} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")
    ms = summary["mean_std"]
    lines.append("| mean ± sd | | | " + " | ".join(f"{ms[c]['mean']:.3f} ± {ms[c]['std']:.3f}" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def fit(args, data: Data, out: Path, device, dtype, t0: float, info: Dist = Dist()) -> dict:
    """Train one model on ``data`` into ``out`` (resumable), then :func:`finish` it (on rank 0; every rank
    returns its metrics)."""
    config = ModelConfig(input_size=args.size, interpolation=args.interpolation)
    # Normalise with the training set's own gray level statistics (the model starts from scratch).
    if args.init == "imagenet":
        config.mean, config.std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    elif args.init != "scratch":
        source = ModelConfig.load(args.init)
        config.mean, config.std = source.mean, source.std
    else:
        m, s = float(data.train.images.mean() / 255), float(data.train.images.std() / 255)
        config.mean, config.std = [round(m, 4)] * 3, [round(s, 4)] * 3
    transform = build_eval_transform(config)
    if info.is_main:
        write_split_csv(out / "split.csv", data)

    model = build_model(config)
    init_weights(model, args.init)
    sync_bn = info.enabled and args.sync_bn
    if sync_bn:
        model = convert_batchnorm(model, device)
    model = model.to(device).to(memory_format=torch.channels_last)
    ema = make_ema(model, args.ema_decay)
    step_model = wrap(model, info, device, sync_bn)
    decay, no_decay = [], []
    for param in model.parameters():
        (no_decay if param.ndim <= 1 else decay).append(param)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    class_weights = balanced_class_weights(data.train.labels) if args.class_weights == "balanced" else torch.ones(2)
    aug = AugmentConfig()
    steps_per_epoch = max(1, len(data.train.labels) // args.batch_size)
    total_steps = steps_per_epoch * args.epochs

    start_epoch, step, best_auc, best_epoch, history = 1, 0, -1.0, 0, []
    ckpt_path = out / "checkpoint.pt"
    if args.resume:
        if not ckpt_path.exists():
            raise SystemExit(f"error: --resume given but {ckpt_path} does not exist")
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ema is not None and ckpt.get("ema") is not None:
            ema.load_state_dict(ckpt["ema"])
        start_epoch, step = ckpt["epoch"] + 1, ckpt["step"]
        best_auc, best_epoch, history = ckpt["best_auc"], ckpt["best_epoch"], ckpt["history"]
        print(f"resumed from {ckpt_path} at epoch {ckpt['epoch']} (best val AUC {best_auc:.4f} at epoch {best_epoch})")

    if args.preview and start_epoch == 1 and info.is_main:
        n = min(args.preview, len(data.train.labels))
        sample = torch.from_numpy(data.train.images[:n]).unsqueeze(1)
        save_preview(augment_batch(sample, aug, torch.Generator().manual_seed(args.seed)), out / "augment_preview.png")

    eval_model = ema.module if ema is not None else model
    for epoch in range(start_epoch, args.epochs + 1):
        te = time.time()
        train_loss, step = train_one_epoch(model, ema, optimizer, data.train, transform, aug, args, epoch, step, total_steps,
                                           class_weights, device, dtype, info, step_model)
        val = evaluate(eval_model, data.val, transform, device, class_weights, info)
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val["loss"], "val_auc": val["auc"],
                        "val_accuracy": val["accuracy"], "seconds": time.time() - te})
        improved = val["auc"] > best_auc
        if improved:
            best_auc, best_epoch = val["auc"], epoch
            if info.is_main:
                save_weights(eval_model, out / "best.safetensors", dtype=None)
        print(f"epoch {epoch:3d}/{args.epochs}  train loss {train_loss:.4f}  val loss {val['loss']:.4f}  val AUC {val['auc']:.4f}"
              f"{'  *' if improved else ''}  ({time.time() - te:.0f}s)", flush=True)
        if info.is_main:
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "ema": ema.state_dict() if ema is not None else None,
                "epoch": epoch, "step": step, "best_auc": best_auc, "best_epoch": best_epoch, "history": history,
                "args": args_to_dict(args),
            })
        if args.patience and epoch - best_epoch >= args.patience:
            print(f"early stop: no better val AUC for {args.patience} epochs")
            break

    metrics = None
    if info.is_main:
        metrics = finish(out, config, data, transform, device, history, best_epoch, args, time.time() - t0,
                         trained_now=start_epoch <= args.epochs)
    return info.broadcast(metrics)


MIN_PER_CLASS_TO_CALIBRATE = 10


def calibrate(y_val: np.ndarray, margin_val: np.ndarray, method: str) -> tuple[float, float]:
    if method != "none" and min(int(y_val.sum()), int(len(y_val) - y_val.sum())) < MIN_PER_CLASS_TO_CALIBRATE:
        print(f"warning: calibration skipped: fewer than {MIN_PER_CLASS_TO_CALIBRATE} validation images of a class", file=sys.stderr)
        return 1.0, 0.0
    if method == "platt":
        return fit_platt(y_val, margin_val)
    if method == "temperature":
        return fit_temperature(y_val, margin_val), 0.0
    return 1.0, 0.0


def finish(out: Path, config: ModelConfig, data: Data, transform, device, history, best_epoch: int, args, seconds: float,
           trained_now: bool = True) -> dict:
    """Load the best weights; fit calibration and pick the threshold on validation; measure the test split once
    (with bootstrap confidence intervals); write the run. ``trained_now`` False: a finished run re-evaluated
    with --resume (its training command and time are kept, and this command is recorded as the evaluation)."""
    model = load_weights(build_model(config), out / "best.safetensors").to(device).to(memory_format=torch.channels_last)
    val_margin = margin_of(predict_split(model, data.val, transform, device))
    test_margin = margin_of(predict_split(model, data.test, transform, device))
    config.temperature, config.logit_bias = (round(v, 6) for v in calibrate(data.val.labels, val_margin, args.calibration))
    raw_val, raw_test = sigmoid(val_margin), sigmoid(test_margin)
    val_p = sigmoid(val_margin / config.temperature + config.logit_bias)
    test_p = sigmoid(test_margin / config.temperature + config.logit_bias)
    config.threshold = round(choose_threshold(data.val.labels, val_p, args.threshold_rule), 6)
    val_m = binary_metrics(data.val.labels, val_p, config.threshold)
    test_m = binary_metrics(data.test.labels, test_p, config.threshold)
    test_ci = bootstrap_ci(data.test.labels, test_p, config.threshold, n_boot=args.bootstrap, seed=args.seed)
    # The other common operating points, for the card (each chosen on validation, measured on test).
    operating_points = {}
    for rule in dict.fromkeys((args.threshold_rule, "youden", "sensitivity:0.9", "specificity:0.9")):
        t = choose_threshold(data.val.labels, val_p, rule)
        tm = binary_metrics(data.test.labels, test_p, t)
        operating_points[rule] = {"threshold": t, **{k: tm[k] for k in ("sensitivity", "specificity", "accuracy", "kappa")}}
    calibration = {"method": args.calibration, "temperature": config.temperature, "logit_bias": config.logit_bias, "bins": 10,
                   "val_ece_before": expected_calibration_error(data.val.labels, raw_val), "val_ece_after": expected_calibration_error(data.val.labels, val_p),
                   "test_ece_before": expected_calibration_error(data.test.labels, raw_test), "test_ece_after": expected_calibration_error(data.test.labels, test_p)}
    command = "python -m training.train " + " ".join(sys.argv[1:]) if sys.argv and "training" in sys.argv[0] else None
    evaluation_command = None
    if not trained_now and (out / "metrics.json").exists():
        previous = json.loads((out / "metrics.json").read_text())
        evaluation_command, command = command, previous.get("command", command)
        seconds = previous.get("train_seconds", seconds)
    training = {"best_epoch": best_epoch, "epochs_run": len(history), "seed": args.seed, "init": args.init,
                "size": args.size, "data": data.report, "command": command, "threshold_rule": args.threshold_rule,
                "calibration": args.calibration, "evaluation_command": evaluation_command}
    if args.init not in ("scratch", "imagenet"):  # fine-tuned: keep the provenance of the starting model
        training["init_from"] = ModelConfig.load(args.init).extra.get("training")
    config.extra = {"training": training}
    config.save(out / "config.json")
    metrics = {"val": val_m, "test": test_m, "test_ci95": test_ci, "calibration": calibration, "operating_points": operating_points,
               "history": history, "data": data.report, "train_seconds": round(seconds, 1), "args": args_to_dict(args), "command": command,
               "evaluation_command": evaluation_command}
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    for name, split, margin, p in (("val", data.val, val_margin, val_p), ("test", data.test, test_margin, test_p)):
        np.savez(out / f"{name}_predictions.npz", labels=split.labels, probs=p, margin=margin, paths=np.array(split.paths))
    plot_roc({"val": (data.val.labels, val_p), "test": (data.test.labels, test_p)}, out / "roc.png",
             {"test @ threshold": (1 - test_m["specificity"], test_m["sensitivity"])})
    plot_confusion(test_m["confusion"], list(LABELS), out / "confusion.png", f"test, threshold {config.threshold:.3f}")
    plot_reliability(data.test.labels, {"uncalibrated": raw_test, f"calibrated ({args.calibration})": test_p}, out / "reliability.png")
    if history:
        plot_learning_curves(history, out / "learning_curves.png")
    ci = {k: f"[{lo:.3f}, {hi:.3f}]" for k, (lo, hi) in test_ci.items()}
    print(f"test: AUC {test_m['auc']:.4f} {ci['auc']}  accuracy {test_m['accuracy']:.4f} {ci['accuracy']}  sensitivity {test_m['sensitivity']:.4f} "
          f"{ci['sensitivity']}  specificity {test_m['specificity']:.4f} {ci['specificity']}  kappa {test_m['kappa']:.4f} {ci['kappa']}  "
          f"(n={test_m['n']}, threshold {config.threshold:.3f} for {args.threshold_rule} on val)")
    print(f"calibration ({args.calibration}): temperature {config.temperature:.3f}, logit bias {config.logit_bias:+.3f}; "
          f"test ECE {calibration['test_ece_before']:.3f} -> {calibration['test_ece_after']:.3f}")
    print(f"run written to {out} in {seconds / 60:.1f} min; export with: python -m training.export {out} --to MODEL_DIR")
    return metrics


if __name__ == "__main__":
    main(get_args_parser().parse_args())
