"""Train a bonefrac ResNet18 on folders of X-rays.

    python -m training.train --data ../shared/data/fracatlas --extra-train ../shared/data/multiregion \\
        --output-dir runs/r1 --epochs 18

``--data`` datasets supply validation and test images (their own split folders, or a stratified,
seeded, duplicate-group-aware split); ``--extra-train`` datasets only add training images. Any
training image that is an exact or near copy of a validation/test image is dropped, so the test
metrics are leak-free. Outputs in the run folder: checkpoint.pt (resumable), best.safetensors,
config.json, metrics.json, roc.png, confusion.png, learning_curves.png, augment_preview.png.
"""
from __future__ import annotations

import argparse
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
from .data import LABELS, DecodedSet, decode_samples, scan_dataset, stratified_split
from .evaluate import binary_metrics, choose_threshold, plot_confusion, plot_learning_curves, plot_roc


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train a bonefrac fracture classifier", add_help=add_help,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", nargs="+", type=Path, required=True, help="dataset folders: ROOT/<class>/ or ROOT/<split>/<class>/")
    p.add_argument("--extra-train", nargs="*", type=Path, default=[], help="dataset folders used for training only (leak-filtered)")
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--cache-dir", type=Path, default=Path(".cache/bonefrac"), help="decoded-image cache ('' disables)")
    p.add_argument("--size", type=int, default=224, help="input size (square)")
    p.add_argument("--interpolation", default="bilinear", choices=["bilinear", "bicubic", "lanczos", "nearest"])
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--epochs", type=int, default=18)
    p.add_argument("--batch-size", type=int, default=64)
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


def prepare_data(args, transform: EvalTransform) -> Data:
    main_samples = [s for root in args.data for s in _limit(scan_dataset(root), args.limit, args.seed)]
    extra_samples = [s for root in args.extra_train for s in _limit(scan_dataset(root), args.limit, args.seed)]
    cache_dir = str(args.cache_dir) if args.cache_dir and str(args.cache_dir) else None
    decoded = decode_samples(main_samples + extra_samples, transform, args.interpolation, cache_dir, args.workers, not args.no_progress)
    rejected = Counter(reason for _, reason in decoded.rejected)
    print(f"data: {len(decoded.samples)} usable images, {len(decoded.rejected)} unusable left out (not moved; see `python -m training.data clean`)")

    main_set = set(main_samples)
    is_main = np.array([s in main_set for s in decoded.samples], dtype=bool)
    splits = np.array([s.split for s in decoded.samples], dtype=object)
    splits[~is_main] = "train"
    main_idx = np.flatnonzero(is_main)
    # Main datasets without split folders get a stratified split that keeps duplicate groups together.
    no_split = main_idx[[decoded.samples[i].split is None for i in main_idx]]
    if len(no_split):
        groups = duplicate_groups([decoded.sha256[i] for i in no_split], decoded.phash[no_split])
        test_frac, val_frac = args.test_fraction, args.val_fraction
        splits[no_split] = stratified_split(decoded.labels[no_split], (1 - val_frac - test_frac, val_frac, test_frac), args.seed, groups)
    held = np.flatnonzero(np.isin(splits, ["val", "test"]))
    train = np.flatnonzero(splits == "train")
    leaks = find_leaks([decoded.sha256[i] for i in train], decoded.phash[train],
                       [decoded.sha256[i] for i in held], decoded.phash[held])
    dropped = Counter(decoded.samples[i].dataset for i in train[leaks])
    if leaks.any():
        print(f"leak filter: dropped {int(leaks.sum())} training images that copy a val/test image ({dict(dropped)})")
    train = train[~leaks]
    val, test = np.flatnonzero(splits == "val"), np.flatnonzero(splits == "test")
    if len(val) == 0 or len(test) == 0:
        raise SystemExit("error: no validation or test images; give --data a dataset with val/test folders or non-zero --val-fraction/--test-fraction")
    counts = {name: {LABELS[c]: int((decoded.labels[idx] == c).sum()) for c in (0, 1)} for name, idx in (("train", train), ("val", val), ("test", test))}
    for name, c in counts.items():
        print(f"  {name:5s}: {sum(c.values()):5d} images  {c}")
    report = {
        "datasets": [str(r) for r in args.data], "extra_train": [str(r) for r in args.extra_train],
        "counts": counts, "unusable": len(decoded.rejected), "unusable_reasons": dict(rejected.most_common()),
        "leaks_dropped_from_train": {k: int(v) for k, v in dropped.items()},
        "test_datasets": sorted({decoded.samples[i].dataset for i in test}),
    }
    return Data(_subset(decoded, train), _subset(decoded, val), _subset(decoded, test), report)


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
                    step: int, total_steps: int, class_weights: torch.Tensor, device, dtype) -> tuple[float, int]:
    from tqdm import tqdm

    model.train()
    gen = torch.Generator().manual_seed(args.seed * 1000 + epoch)  # per epoch, so a resumed run replays the same order
    images, labels = torch.from_numpy(data.images), torch.from_numpy(data.labels)
    warmup = int(args.warmup_epochs * math.ceil(len(labels) / args.batch_size))
    total_loss, seen = 0.0, 0
    n_batches = len(labels) // args.batch_size if len(labels) >= args.batch_size else 1
    bar = tqdm(batches(len(labels), args.batch_size, gen, drop_last=True), total=n_batches, desc=f"epoch {epoch}",
               file=sys.stderr, disable=args.no_progress, leave=False)
    for idx in bar:
        lr = lr_at(step, total_steps, warmup, args.lr, args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = images[idx].unsqueeze(1).to(device, non_blocking=True)
        y = labels[idx].to(device, non_blocking=True)
        x = transform.normalize(augment_batch(x, aug, gen if device.type == "cpu" else None))
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, weight=class_weights.to(device), label_smoothing=args.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ema is not None:
            ema.update_parameters(model)
        step += 1
        total_loss += loss.item() * len(idx)
        seen += len(idx)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", lr=f"{lr:.2e}")
    return total_loss / max(1, seen), step


@torch.inference_mode()
def predict_split(model, data: Split, transform: EvalTransform, device, batch_size: int = 128) -> np.ndarray:
    """Probabilities (N, 2) in fp32, through the eval transform's normalize on cached resized images."""
    model.eval()
    out = []
    images = torch.from_numpy(data.images)
    for idx in batches(len(images), batch_size):
        x = transform.normalize(images[idx].to(device)).contiguous(memory_format=torch.channels_last)
        out.append(torch.softmax(model(x).float(), dim=1).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 2), np.float32)


def evaluate(model, data: Split, transform, device, class_weights) -> dict:
    probs = predict_split(model, data, transform, device)
    loss = F.nll_loss(torch.log(torch.from_numpy(probs).clamp_min(1e-7)), torch.from_numpy(data.labels), weight=class_weights).item()
    return {"loss": loss, "probs": probs, **binary_metrics(data.labels, probs[:, 1], 0.5)}


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(args: argparse.Namespace) -> dict:
    t0 = time.time()
    seed_everything(args.seed)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    dtype = amp_dtype(args.amp, device)
    print(f"device {device}, autocast {dtype}, torch {torch.__version__}")

    config = ModelConfig(input_size=args.size, interpolation=args.interpolation)
    transform = build_eval_transform(config)
    data = prepare_data(args, transform)
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

    model = build_model(config)
    init_weights(model, args.init)
    model = model.to(device).to(memory_format=torch.channels_last)
    ema = make_ema(model, args.ema_decay)
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

    if args.preview and start_epoch == 1:
        n = min(args.preview, len(data.train.labels))
        sample = torch.from_numpy(data.train.images[:n]).unsqueeze(1)
        save_preview(augment_batch(sample, aug, torch.Generator().manual_seed(args.seed)), out / "augment_preview.png")

    eval_model = ema.module if ema is not None else model
    for epoch in range(start_epoch, args.epochs + 1):
        te = time.time()
        train_loss, step = train_one_epoch(model, ema, optimizer, data.train, transform, aug, args, epoch, step, total_steps, class_weights, device, dtype)
        val = evaluate(eval_model, data.val, transform, device, class_weights)
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val["loss"], "val_auc": val["auc"],
                        "val_accuracy": val["accuracy"], "seconds": time.time() - te})
        improved = val["auc"] > best_auc
        if improved:
            best_auc, best_epoch = val["auc"], epoch
            save_weights(eval_model, out / "best.safetensors", dtype=None)
        print(f"epoch {epoch:3d}/{args.epochs}  train loss {train_loss:.4f}  val loss {val['loss']:.4f}  val AUC {val['auc']:.4f}"
              f"{'  *' if improved else ''}  ({time.time() - te:.0f}s)", flush=True)
        save_checkpoint(ckpt_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "epoch": epoch, "step": step, "best_auc": best_auc, "best_epoch": best_epoch, "history": history,
            "args": args_to_dict(args),
        })
        if args.patience and epoch - best_epoch >= args.patience:
            print(f"early stop: no better val AUC for {args.patience} epochs")
            break

    return finish(out, config, data, transform, device, history, best_epoch, args, time.time() - t0)


def finish(out: Path, config: ModelConfig, data: Data, transform, device, history, best_epoch: int, args, seconds: float) -> dict:
    """Load the best weights, pick the threshold on validation, measure the test split once, write the run."""
    model = load_weights(build_model(config), out / "best.safetensors").to(device).to(memory_format=torch.channels_last)
    val_p = predict_split(model, data.val, transform, device)[:, 1]
    test_p = predict_split(model, data.test, transform, device)[:, 1]
    config.threshold = round(choose_threshold(data.val.labels, val_p), 6)
    val_m = binary_metrics(data.val.labels, val_p, config.threshold)
    test_m = binary_metrics(data.test.labels, test_p, config.threshold)
    command = "python -m training.train " + " ".join(sys.argv[1:]) if sys.argv and "training" in sys.argv[0] else None
    training = {"best_epoch": best_epoch, "epochs_run": len(history), "seed": args.seed, "init": args.init,
                "size": args.size, "data": data.report, "command": command}
    if args.init not in ("scratch", "imagenet"):  # fine-tuned: keep the provenance of the starting model
        training["init_from"] = ModelConfig.load(args.init).extra.get("training")
    config.extra = {"training": training}
    config.save(out / "config.json")
    metrics = {"val": val_m, "test": test_m, "history": history, "data": data.report, "train_seconds": round(seconds, 1),
               "args": args_to_dict(args), "command": command}
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    np.savez(out / "test_predictions.npz", labels=data.test.labels, probs=test_p, paths=np.array(data.test.paths))
    plot_roc({"val": (data.val.labels, val_p), "test": (data.test.labels, test_p)}, out / "roc.png",
             {"test @ threshold": (1 - test_m["specificity"], test_m["sensitivity"])})
    plot_confusion(test_m["confusion"], list(LABELS), out / "confusion.png", f"test, threshold {config.threshold:.3f}")
    if history:
        plot_learning_curves(history, out / "learning_curves.png")
    print(f"test: AUC {test_m['auc']:.4f}  accuracy {test_m['accuracy']:.4f}  sensitivity {test_m['sensitivity']:.4f}  "
          f"specificity {test_m['specificity']:.4f}  kappa {test_m['kappa']:.4f}  (n={test_m['n']}, threshold {config.threshold:.3f})")
    print(f"run written to {out} in {seconds / 60:.1f} min; export with: python -m training.export {out} --to MODEL_DIR")
    return metrics


if __name__ == "__main__":
    main(get_args_parser().parse_args())
