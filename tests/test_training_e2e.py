import csv
import json
import shutil

import pytest
import torch
from huggingface_hub import ModelCard

from bonefrac import FracturePredictor
from bonefrac.config import ModelConfig
from tests.conftest import FRACATLAS
from training.export import card_is_hand_edited, export_run
from training.train import get_args_parser, main as train_main


def _leaky_dataset(root):
    """ROOT/{train,val,test}/<class>/ from real FracAtlas files; one test image is a byte copy of a training image."""
    from training.data import check_file

    frac = [p for p in sorted((FRACATLAS / "fractured").glob("IMG000*.jpg")) if check_file(p) is None][:8]
    normal = [p for p in sorted((FRACATLAS / "not_fractured").glob("IMG000*.jpg")) if check_file(p) is None][:8]
    layout = {"train": (frac[:4], normal[:4]), "val": (frac[4:6], normal[4:6]), "test": (frac[6:8], normal[6:8])}
    for split, (f, n) in layout.items():
        for cls, files in (("fractured", f), ("not_fractured", n)):
            (root / split / cls).mkdir(parents=True)
            for p in files:
                shutil.copy(p, root / split / cls / p.name)
    shutil.copy(frac[0], root / "test" / "fractured" / "copy_of_a_training_image.jpg")
    return root


def _small_args(data, out, *extra):
    return get_args_parser().parse_args(["--data", str(data), "--output-dir", str(out), "--size", "32", "--batch-size", "4",
                                         "--epochs", "1", "--workers", "1", "--no-progress", "--cache-dir", str(out.parent / "cache"),
                                         "--preview", "0", "--bootstrap", "100", *extra])


@pytest.mark.slow
def test_leaky_user_splits_are_reported_and_handled(real_data, tmp_path, capsys):
    data = _leaky_dataset(tmp_path / "leaky")
    m = train_main(_small_args(data, tmp_path / "drop"))
    leaks = m["data"]["leaks"]
    assert leaks["test_images_with_copy_in_train"] == 1 and leaks["train_images_copying_val_or_test"] == 1
    assert leaks["action"] == "dropped the 1 training copies"
    assert m["data"]["counts"]["train"]["fractured"] == 3 and m["test"]["n"] == 5
    assert "WARNING: the splits leak: 1 of 5 test" in capsys.readouterr().err

    m = train_main(_small_args(data, tmp_path / "keep", "--allow-leaky-splits"))
    assert m["data"]["counts"]["train"]["fractured"] == 4 and m["data"]["leaks"]["action"].startswith("kept")
    assert "LEAKY SPLITS KEPT" in capsys.readouterr().err
    card = ModelCard.load(export_run(tmp_path / "keep", tmp_path / "keep_model") / "README.md")
    assert "test metrics below are therefore inflated" in card.text

    m = train_main(_small_args(data, tmp_path / "droptest", "--leaks", "drop-test"))
    assert m["test"]["n"] == 4 and m["data"]["counts"]["train"]["fractured"] == 4


@pytest.mark.slow
def test_kfold_runs_every_fold_on_disjoint_group_aware_test_sets(real_data, tmp_path):
    args = _args(real_data, tmp_path / "kfold", kfold=3, extra_train=[], limit=30, bootstrap=100, preview=0)
    summary = train_main(args)
    assert [r["fold"] for r in summary["folds"]] == [0, 1, 2]
    assert set(summary["mean_std"]) == {"auc", "accuracy", "sensitivity", "specificity", "kappa", "ece"}
    tests = []
    for f in range(3):
        rows = list(csv.DictReader((tmp_path / "kfold" / f"fold{f}" / "split.csv").open()))
        tests.append({r["path"] for r in rows if r["split"] == "test"})
        assert {r["split"] for r in rows} == {"train", "val", "test"}
    assert not (tests[0] & tests[1]) and not (tests[0] & tests[2]) and not (tests[1] & tests[2])
    assert sum(len(t) for t in tests) == 30
    assert "| mean ± sd |" in (tmp_path / "kfold" / "kfold.md").read_text()
    # --resume skips finished folds.
    again = train_main(_args(real_data, tmp_path / "kfold", kfold=3, extra_train=[], limit=30, bootstrap=100, preview=0, resume=True))
    assert again["folds"] == summary["folds"]


def _args(real_data, out, **over):
    argv = ["--data", str(real_data / "fracatlas"), "--extra-train", str(real_data / "multiregion"),
            "--output-dir", str(out), "--limit", "24", "--size", "64", "--batch-size", "8", "--epochs", "1",
            "--workers", "1", "--no-progress", "--cache-dir", str(out.parent / "cache"), "--preview", "8",
            "--val-fraction", "0.25", "--test-fraction", "0.25"]
    args = get_args_parser().parse_args(argv)
    for k, v in over.items():
        setattr(args, k, v)
    return args


@pytest.mark.slow
def test_tiny_training_run_exports_a_loadable_model(real_data, tmp_path, good_images):
    run = tmp_path / "run"
    metrics = train_main(_args(real_data, run))
    for name in ("checkpoint.pt", "best.safetensors", "config.json", "metrics.json", "roc.png", "confusion.png",
                 "learning_curves.png", "augment_preview.png"):
        assert (run / name).is_file(), name
    for key in ("auc", "accuracy", "sensitivity", "specificity", "kappa", "confusion"):
        assert key in metrics["test"]
    config = ModelConfig.load(run)
    assert config.input_size == 64 and 0 <= config.threshold <= 1
    assert config.mean[0] != 0.5  # computed from the training images

    # Resume continues from the last complete checkpoint.
    resumed = train_main(_args(real_data, run, epochs=2, resume=True))
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 2

    # Fine-tuning from the run keeps the run's split (other fractions would split differently), so the
    # images the starting weights were trained on never reach val/test.
    train_main(_args(real_data, tmp_path / "resplit", test_fraction=0.4, preview=0))
    assert (tmp_path / "resplit" / "split.csv").read_text() != (run / "split.csv").read_text()
    train_main(_args(real_data, tmp_path / "tuned", init=str(run), test_fraction=0.4, preview=0))
    assert (tmp_path / "tuned" / "split.csv").read_text() == (run / "split.csv").read_text()

    model_dir = export_run(run, tmp_path / "model")
    assert sorted(p.name for p in model_dir.iterdir() if not p.name.endswith(".png")) == ["README.md", "config.json", "model.safetensors"]
    card = ModelCard.load(model_dir / "README.md")
    assert card.data.pipeline_tag == "image-classification" and "fracture" in card.data.tags
    assert "Not a medical device" in card.text and "Audit of the splits" in card.text and "confidence intervals" in card.text
    assert not card_is_hand_edited((model_dir / "README.md").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["test_ci95"]) == {"auc", "accuracy", "sensitivity", "specificity", "kappa"}
    assert {"temperature", "logit_bias", "test_ece_before", "test_ece_after"} <= set(metrics["calibration"])
    assert (run / "reliability.png").is_file() and (run / "split.csv").is_file()
    predictor = FracturePredictor.from_pretrained(model_dir, device="cpu")
    assert predictor.config.threshold == config.threshold
    p = predictor.predict(good_images[0])
    assert sum(p.values()) == pytest.approx(1.0, abs=1e-6)
    assert json.loads((run / "metrics.json").read_text())["data"]["counts"]["test"]["fractured"] > 0


def test_imagenet_init_downloads_or_fails_clearly():
    """The real torchvision download path: offline (as here and in CI) it must fail with a clear message."""
    from bonefrac.model import build_model
    from training.train import init_weights

    model = build_model(ModelConfig())
    try:
        init_weights(model, "imagenet")
    except SystemExit as e:
        assert "could not download torchvision's ImageNet weights" in str(e) and "--init scratch" in str(e)
    else:  # a machine with network access: the backbone now holds ImageNet weights
        assert model.conv1.weight.abs().mean() > 0.01


def test_hand_edited_card_on_the_hub_is_kept():
    from training.export import stamp_card, upload_patterns

    card = stamp_card("---\nlicense: cc-by-4.0\n---\n# model\n\nnumbers\n")
    assert not card_is_hand_edited(card)
    edited = card.replace("numbers", "numbers, and a note from the author")
    assert card_is_hand_edited(edited) and card_is_hand_edited("# a card someone wrote\n")
    patterns, warning = upload_patterns(edited, overwrite_card=False)
    assert "README.md" not in patterns and "model.safetensors" in patterns and "edited by hand" in warning
    assert "README.md" in upload_patterns(edited, overwrite_card=True)[0]
    assert upload_patterns(card, overwrite_card=False) == (["model.safetensors", "config.json", "README.md", "*.png"], None)
    assert upload_patterns(None, overwrite_card=False)[1] is None  # a new repo


def test_make_data_counts_groups_under_both_labels(tmp_path):
    """The report's count of duplicate groups holding both labels (vectorised; pinned on a made-up pool)."""
    from pathlib import Path

    import numpy as np

    from training.audit import HASH_WORDS
    from training.data import DecodedSet, Sample
    from training.train import Pool, make_data

    labels = [1, 0, 1, 0, 0, 1, 0, 0]
    splits = np.array(["train", "train", "train", "val", "test", "train", "val", "test"], dtype=object)
    samples = [Sample(Path(f"/x/{i}.png"), y, "ds") for i, y in enumerate(labels)]
    rng = np.random.default_rng(0)  # random 256-bit hashes lie ~128 bits apart: no near copies
    decoded = DecodedSet(samples, np.zeros((8, 4, 4), np.uint8), [f"sha{i}" for i in range(8)],
                         rng.integers(0, 2**63, (8, 8, HASH_WORDS), dtype=np.int64).astype(np.uint64), [])
    groups = np.array([0, 0, 1, 2, 3, 4, 4, 5])  # groups 0 and 4 hold both labels (4 straddles train/val)
    args = get_args_parser().parse_args(["--data", "x", "--output-dir", str(tmp_path), "--leaks", "keep"])
    report = make_data(args, Pool(decoded, np.ones(8, bool), groups, {}), splits).report
    assert report["groups_under_both_labels"] == 2 and report["images_in_groups_under_both_labels"] == 4
    assert report["counts"]["train"] == {"not fractured": 1, "fractured": 3}
