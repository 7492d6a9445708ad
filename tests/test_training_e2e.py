import json

import pytest
import torch
from huggingface_hub import ModelCard

from bonefrac import FracturePredictor
from bonefrac.config import ModelConfig
from training.export import export_run
from training.train import get_args_parser, main as train_main


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

    model_dir = export_run(run, tmp_path / "model")
    assert sorted(p.name for p in model_dir.iterdir() if not p.name.endswith(".png")) == ["README.md", "config.json", "model.safetensors"]
    card = ModelCard.load(model_dir / "README.md")
    assert card.data.pipeline_tag == "image-classification" and "fracture" in card.data.tags
    assert "Not a medical device" in card.text and "leak-free" in card.text
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
