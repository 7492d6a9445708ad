"""Turn a training run into a model folder (= a Hub model repository), optionally push it.

    python -m training.export runs/r1 --to model/ [--push user/repo] [--private]

The folder holds model.safetensors (half precision by default), config.json and README.md
(the model card). It is built in a temporary folder and renamed into place, so it is never half-written.
"""
from __future__ import annotations

import argparse
import hashlib
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


def _fmt(m: dict, key: str, ci: dict | None = None) -> str:
    v = m.get(key)
    if v is None or v != v:
        return "n/a"
    lo, hi = (ci or {}).get(key, (None, None))
    return f"{v:.3f} ({lo:.3f}-{hi:.3f})" if lo is not None and lo == lo else f"{v:.3f}"


def _leak_text(data: dict) -> str:
    leaks = data.get("leaks")
    if not leaks:  # runs from before the audit recorded its numbers
        dropped = data.get("leaks_dropped_from_train", {})
        return f"Training copies of val/test images removed: {', '.join(f'{k}: {v}' for k, v in dropped.items()) or 'none found'}."
    text = (f"Audit of the splits as made: {leaks['test_images_with_copy_in_train']} of {leaks['test_images']} test and "
            f"{leaks['val_images_with_copy_in_train']} of {leaks['val_images']} validation images had an exact or near copy among "
            f"the training images; action: {leaks['action']}.")
    if leaks["action"].startswith("kept"):
        text += " **The test metrics below are therefore inflated.**"
    return text


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
        if t.get("evaluation_command"):
            lines.append(f"  Re-evaluated (splits, leak audit, calibration, threshold, test metrics) with `{t['evaluation_command']}`")
    return "\n".join(lines)


def render_card(config: ModelConfig, metrics: dict, repo_id: str | None = None) -> str:
    from huggingface_hub import EvalResult, ModelCardData

    test, val, data = metrics["test"], metrics["val"], metrics.get("data", {})
    ci = metrics.get("test_ci95", {})
    cal = metrics.get("calibration", {})
    rule = config.extra.get("training", {}).get("threshold_rule", "youden")
    name = repo_id or "bonefrac-resnet18"
    eval_results = [EvalResult(task_type="image-classification", dataset_type="fracatlas", dataset_name=f"{', '.join(data.get('test_datasets', ['FracAtlas']))} (held-out test split)",
                               metric_type=key, metric_value=round(float(test[key]), 4), dataset_split="test")
                    for key in ("auc", "accuracy", "sensitivity", "specificity", "kappa") if test.get(key) == test.get(key)]
    card_data = ModelCardData(license="cc-by-4.0", library_name="bonefrac", pipeline_tag="image-classification",
                              tags=["x-ray", "fracture", "medical-imaging", "resnet18", "radiology"],
                              datasets=["FracAtlas"], model_name=name, eval_results=eval_results)
    counts = data.get("counts", {})
    count_rows = "\n".join(f"| {split} | {c.get('fractured', 0)} | {c.get('not fractured', 0)} |" for split, c in counts.items())
    cm = test["confusion"]
    points = metrics.get("operating_points", {})
    point_rows = "\n".join(f"| {r}{' (used)' if r == rule else ''} | {v['threshold']:.3f} | {v['sensitivity']:.3f} | {v['specificity']:.3f} | {v['accuracy']:.3f} |"
                           for r, v in points.items())
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
Probabilities are calibrated on the validation split: P(fractured) = sigmoid(margin / {config.temperature:.4f}
{config.logit_bias:+.4f}), where margin is logit(fractured) - logit(not fractured). Decision: `fractured` when
P(fractured) >= {config.threshold:.4f}, the threshold chosen on validation for `{rule}`
({_rule_words(rule)}).

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

The test split is held out from one dataset ({', '.join(data.get('test_datasets', []))}). Copies are found by
SHA-256 (exact) and by 256-bit perceptual hash within 24 bits under all 8 flips/rotations (near; `python -m training.audit`).
{_leak_text(data)}

Test metrics at the threshold, with 95% bootstrap confidence intervals ({metrics.get('args', {}).get('bootstrap', 2000)} resamples of the test images):

| metric | test (n={test['n']}, {test['positives']} fractured) | validation (n={val['n']}) |
|---|---|---|
| ROC AUC | {_fmt(test, 'auc', ci)} | {_fmt(val, 'auc')} |
| accuracy | {_fmt(test, 'accuracy', ci)} | {_fmt(val, 'accuracy')} |
| sensitivity | {_fmt(test, 'sensitivity', ci)} | {_fmt(val, 'sensitivity')} |
| specificity | {_fmt(test, 'specificity', ci)} | {_fmt(val, 'specificity')} |
| Cohen's kappa | {_fmt(test, 'kappa', ci)} | {_fmt(val, 'kappa')} |

Test confusion matrix at the threshold (rows true, columns predicted; not fractured, fractured):
`[[{cm[0][0]}, {cm[0][1]}], [{cm[1][0]}, {cm[1][1]}]]`.

Other operating points (threshold chosen on validation, measured on test):

| rule | threshold | sensitivity | specificity | accuracy |
|---|---|---|---|---|
{point_rows or '| (not recorded) | | | | |'}

Calibration ({cal.get('method', 'none')}, fitted on validation): expected calibration error of P(fractured)
({cal.get('bins', 10)} equal-width bins) on test {cal.get('test_ece_before', float('nan')):.3f} before and
{cal.get('test_ece_after', float('nan')):.3f} after; on validation {cal.get('val_ece_before', float('nan')):.3f} -> {cal.get('val_ece_after', float('nan')):.3f}.
See reliability.png. The probabilities are calibrated to the base rate of the validation data
({val['positives']} of {val['n']} fractured); where fractures are more common, they read low.

## Limitations

- Trained from scratch on a few thousand images at {config.input_size} px on CPU: small fractures are missed; see the sensitivity above.
- One hospital group's images (FracAtlas) for test: performance elsewhere is unknown.
- The multi-region data contains web images of mixed quality and possibly unknown provenance.
- The confidence intervals cover sampling of test images from this one source, not a shift to other hospitals or devices.
"""


def _rule_words(rule: str) -> str:
    kind, _, target = rule.partition(":")
    if kind == "sensitivity":
        return f"the best specificity with sensitivity >= {target} on validation"
    if kind == "specificity":
        return f"the best sensitivity with specificity >= {target} on validation"
    return "maximum of sensitivity + specificity - 1 on validation"


CARD_MARK = "<!-- generated by bonefrac; sha256 of the card above this line: "


def stamp_card(text: str) -> str:
    """Append a marker with the hash of the generated card, so a later push can tell a hand edit."""
    text = text.rstrip("\n") + "\n"
    return f"{text}\n{CARD_MARK}{hashlib.sha256(text.encode()).hexdigest()} -->\n"


def card_is_hand_edited(text: str) -> bool:
    """True unless ``text`` is a card bonefrac generated and nobody changed since (marker hash matches)."""
    head, sep, tail = text.rpartition("\n" + CARD_MARK)
    if not sep:
        return True
    digest = tail.split(" -->", 1)[0].strip()
    return hashlib.sha256(head.encode()).hexdigest() != digest


def upload_patterns(remote_card: str | None, overwrite_card: bool) -> tuple[list[str], str | None]:
    """Files to upload, and a warning when the Hub's card is kept because someone edited it by hand."""
    patterns = [WEIGHTS_NAME, CONFIG_NAME, "README.md", "*.png"]
    if remote_card is not None and card_is_hand_edited(remote_card) and not overwrite_card:
        patterns.remove("README.md")
        return patterns, ("the model card (README.md) on the Hub was edited by hand; kept it and uploaded everything else "
                          "(--overwrite-card replaces it with the generated one)")
    return patterns, None


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
        atomic_write_text(tmp / "README.md", stamp_card(render_card(config, metrics, repo_id)))
        for plot in ("roc.png", "confusion.png", "learning_curves.png", "reliability.png"):
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


def push(folder: Path, repo_id: str, private: bool, revision: str | None, message: str, overwrite_card: bool = False) -> str:
    """create_repo(exist_ok) + one upload_folder commit; returns the commit URL. Unchanged files are not
    re-uploaded and an unchanged folder makes no new commit (huggingface_hub skips empty commits)."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    try:
        remote_card = Path(hf_hub_download(repo_id, "README.md", revision=revision)).read_text(encoding="utf-8")
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
        remote_card = None
    patterns, warning = upload_patterns(remote_card, overwrite_card)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, revision=revision, commit_message=message, allow_patterns=patterns)
    print(f"pushed {folder} -> {info.commit_url} (commit {info.oid})")
    return info.commit_url


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a training run folder (output of training.train)")
    p.add_argument("--to", type=Path, required=True, help="model folder to write")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="weights on disk")
    p.add_argument("--push", metavar="USER/REPO", help="also upload the folder to this Hub model repo")
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", default=None, help="branch to push to")
    p.add_argument("--commit-message", default="Upload bonefrac model")
    p.add_argument("--overwrite-card", action="store_true", help="replace a hand-edited README.md on the Hub")
    args = p.parse_args(argv)
    folder = export_run(args.run, args.to, getattr(torch, args.dtype), args.push)
    print(f"exported {args.run} -> {folder}")
    if args.push:
        push(folder, args.push, args.private, args.revision, args.commit_message, args.overwrite_card)
    return 0


if __name__ == "__main__":
    sys.exit(main())
