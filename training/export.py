"""Turn a training run into a model folder (= a Hub model repository), optionally push it.

    python -m training.export runs/r1 --to model/ [--push user/repo] [--private]

The folder holds model.safetensors (half precision by default), config.json and README.md
(the model card). It is built in a temporary folder and renamed into place, so it is never half-written.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from bonefrac import __version__
from bonefrac.config import CONFIG_NAME, WEIGHTS_NAME, ModelConfig, atomic_write_text
from bonefrac.model import build_model, load_weights, save_weights

DISCLAIMER = ("**Not a medical device.** This model is for research and education. It must not be used to diagnose, "
              "treat or rule out a fracture; every image needs a qualified clinician's read.")


def _fmt(m: dict, key: str) -> str:
    v = m.get(key)
    return "n/a" if v is None or v != v else f"{v:.3f}"


def _provenance(train: dict, metrics: dict, size: int) -> str:
    """How the weights were made, following fine-tuning back to the first stage."""
    stages, t = [], train
    while t:
        stages.append(t)
        t = t.get("init_from")
    lines = []
    for i, t in enumerate(reversed(stages), 1):
        start = {"scratch": "from scratch", "imagenet": "from torchvision's ImageNet weights"}.get(t.get("init"), "from the previous stage's weights")
        px = t.get("size") or (size if i == len(stages) else None)
        lines.append(f"- Stage {i}: {f'{px} px, ' if px else ''}{start}; best epoch {t.get('best_epoch', '?')} of "
                     f"{t.get('epochs_run', '?')} by validation AUC. Command: `{t.get('command') or metrics.get('command') or 'python -m training.train ...'}`")
    return "\n".join(lines)


def render_card(config: ModelConfig, metrics: dict, repo_id: str | None = None) -> str:
    from huggingface_hub import EvalResult, ModelCardData

    test, val, data = metrics["test"], metrics["val"], metrics.get("data", {})
    name = repo_id or "bonefrac-resnet18"
    eval_results = [EvalResult(task_type="image-classification", dataset_type="fracatlas", dataset_name=f"{', '.join(data.get('test_datasets', ['FracAtlas']))} (held-out test split)",
                               metric_type=key, metric_value=round(float(test[key]), 4), dataset_split="test")
                    for key in ("auc", "accuracy", "sensitivity", "specificity", "kappa") if test.get(key) == test.get(key)]
    card_data = ModelCardData(license="cc-by-4.0", library_name="bonefrac", pipeline_tag="image-classification",
                              tags=["x-ray", "fracture", "medical-imaging", "resnet18", "radiology"],
                              datasets=["FracAtlas"], model_name=name, eval_results=eval_results)
    counts = data.get("counts", {})
    count_rows = "\n".join(f"| {split} | {c.get('fractured', 0)} | {c.get('not fractured', 0)} |" for split, c in counts.items())
    leaks = data.get("leaks_dropped_from_train", {})
    cm = test["confusion"]
    train = config.extra.get("training", {})
    return f"""---
{card_data.to_yaml()}
---

# {name}: bone-fracture classifier for X-rays (ResNet18)

A ResNet18 that reads one radiograph and gives the probability that it shows a fracture, with a
Grad-CAM heat map of where it looked. Made with bonefrac (version {__version__}).

{DISCLAIMER}

## How to use

```python
from bonefrac import FracturePredictor
p = FracturePredictor.from_pretrained("{repo_id or 'path/to/this/folder'}")
p.predict("xray.png")      # {{'fractured': 0.83, 'not fractured': 0.17}}
p.explain("xray.png").overlay.save("gradcam.png")
```

Preprocessing lives in `config.json` and is applied by the library: convert to 8-bit grayscale
(16-bit images are stretched over their used range), squash to {config.input_size}x{config.input_size}
({config.interpolation}), replicate to 3 channels, normalise with mean {config.mean[0]} / std {config.std[0]}.
Decision: `fractured` when P(fractured) >= {config.threshold:.4f} (chosen on the validation split by
Youden's J); probabilities use temperature {config.temperature}.

## Intended use

Research, teaching, and as a second look in studies of fracture detection on adult musculoskeletal
radiographs (hand, leg, hip, shoulder), the regions it was trained on.

## Out-of-scope use

- Clinical diagnosis, triage or ruling out fractures: it is not a medical device and is not validated for care.
- Children, spine, skull, chest, CT, MRI, photographs of screens: not represented (or not checked) in the training data.
- Localising the fracture: the heat map shows what drove the score, not a segmentation.

## Data

| split | fractured | not fractured |
|---|---|---|
{count_rows}

- FracAtlas (Abedeen et al., Scientific Data 10, 521, 2023; CC BY 4.0): split stratified and seeded
  (seed {train.get('seed', '?')}), keeping exact and near duplicates (perceptual hash, any flip/rotation) in one split.
- Extra training data: {', '.join(Path(p).name for p in data.get('extra_train', [])) or 'none'} (the Kaggle
  "Bone Fracture Multi-Region X-ray Data"; licence unclear, research use).
- {data.get('unusable', 0)} unreadable or unsupported files were left out (truncated JPEGs, GIF/palette/RGBA files).
{_provenance(train, metrics, config.input_size)}
- Wall time of the last stage: {metrics.get('train_seconds', 0) / 60:.0f} min.

## Evaluation

The test split is held out from one dataset ({', '.join(data.get('test_datasets', []))}) and is leak-free:
every training image that was an exact copy (SHA-256) or near copy (64-bit pHash within 8 bits, under
all 8 flips/rotations) of a validation or test image was removed from training
({', '.join(f'{k}: {v}' for k, v in leaks.items()) or 'none found'}).

| metric | test (n={test['n']}, {test['positives']} fractured) | validation (n={val['n']}) |
|---|---|---|
| ROC AUC | {_fmt(test, 'auc')} | {_fmt(val, 'auc')} |
| accuracy | {_fmt(test, 'accuracy')} | {_fmt(val, 'accuracy')} |
| sensitivity | {_fmt(test, 'sensitivity')} | {_fmt(val, 'sensitivity')} |
| specificity | {_fmt(test, 'specificity')} | {_fmt(val, 'specificity')} |
| Cohen's kappa | {_fmt(test, 'kappa')} | {_fmt(val, 'kappa')} |

Test confusion matrix at the threshold (rows true, columns predicted; not fractured, fractured):
`[[{cm[0][0]}, {cm[0][1]}], [{cm[1][0]}, {cm[1][1]}]]`.

## Limitations

- Trained from scratch on a few thousand images at {config.input_size} px on CPU: small fractures are missed; see the sensitivity above.
- One hospital group's images (FracAtlas) for test: performance elsewhere is unknown.
- The multi-region data contains web images of mixed quality and possibly unknown provenance.
- Probabilities are not yet calibrated (temperature {config.temperature}).
"""


def export_run(run_dir: str | os.PathLike, to: str | os.PathLike, dtype: torch.dtype = torch.float16, repo_id: str | None = None) -> Path:
    run_dir, to = Path(run_dir), Path(to)
    config = ModelConfig.load(run_dir / CONFIG_NAME)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    model = load_weights(build_model(config), run_dir / "best.safetensors")
    if to.exists() and any(to.iterdir()) and not (to / CONFIG_NAME).exists():
        raise SystemExit(f"error: {to} exists and is not a model folder; refusing to replace it")
    to.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=to.parent, prefix=f".{to.name}.tmp-"))
    tmp.chmod(0o755)
    try:
        save_weights(model, tmp / WEIGHTS_NAME, dtype=dtype)
        config.save(tmp / CONFIG_NAME)
        atomic_write_text(tmp / "README.md", render_card(config, metrics, repo_id))
        for plot in ("roc.png", "confusion.png", "learning_curves.png"):
            if (run_dir / plot).exists():
                shutil.copyfile(run_dir / plot, tmp / plot)
        # Check what we wrote loads back before it replaces anything.
        load_weights(build_model(ModelConfig.load(tmp)), tmp / WEIGHTS_NAME)
        old = None
        if to.exists():
            old = to.with_name(f".{to.name}.old-{os.getpid()}")
            os.replace(to, old)
        os.replace(tmp, to)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return to


def push(folder: Path, repo_id: str, private: bool, revision: str | None, message: str) -> None:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, revision=revision, commit_message=message,
                             allow_patterns=[WEIGHTS_NAME, CONFIG_NAME, "README.md", "*.png"])
    print(f"pushed {folder} -> {info.commit_url} (commit {info.oid})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a training run folder (output of training.train)")
    p.add_argument("--to", type=Path, required=True, help="model folder to write")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="weights on disk")
    p.add_argument("--push", metavar="USER/REPO", help="also upload the folder to this Hub model repo")
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", default=None, help="branch to push to")
    p.add_argument("--commit-message", default="Upload bonefrac model")
    args = p.parse_args(argv)
    folder = export_run(args.run, args.to, getattr(torch, args.dtype), args.push)
    print(f"exported {args.run} -> {folder}")
    if args.push:
        push(folder, args.push, args.private, args.revision, args.commit_message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
