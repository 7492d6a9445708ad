"""Shared fixtures. Real radiographs come from ../shared/data (never copied into the repo)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("BONEFRAC_DATA", ROOT.parent / "shared" / "data"))
FRACATLAS = DATA / "fracatlas"
MULTIREGION = DATA / "multiregion"

# Real files with known problems (see ../shared/data/README.md).
TRUNCATED_JPEG = FRACATLAS / "not_fractured" / "IMG0004028.jpg"
GIF_NAMED_JPG = MULTIREGION / "train" / "fractured" / "159.jpg"
PALETTE_PNG = MULTIREGION / "train" / "fractured" / "Figure-5b-Fibula-Fracture-1.png"
RGBA_PNG = MULTIREGION / "train" / "fractured" / "116.jpg"
GOOD = [FRACATLAS / "fractured" / "IMG0000019.jpg", FRACATLAS / "fractured" / "IMG0000044.jpg",
        FRACATLAS / "not_fractured" / "IMG0000000.jpg", FRACATLAS / "not_fractured" / "IMG0000001.jpg"]

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if DATA.is_dir():
        return
    skip = pytest.mark.skip(reason=f"real X-rays not found at {DATA} (set BONEFRAC_DATA)")
    for item in items:
        if "real_data" in item.fixturenames:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def real_data() -> Path:
    return DATA


@pytest.fixture(scope="session")
def good_images(real_data) -> list[Path]:
    missing = [p for p in GOOD if not p.exists()]
    if missing:
        pytest.skip(f"expected real images are missing: {missing}")
    return GOOD


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A real (random-weight, seeded) ResNet18 model folder at a small input size: fast and offline."""
    from bonefrac.config import ModelConfig
    from bonefrac.model import build_model, save_weights

    folder = tmp_path_factory.mktemp("tiny_model")
    config = ModelConfig(input_size=64, threshold=0.5)
    torch.manual_seed(0)
    model = build_model(config)
    save_weights(model, folder / "model.safetensors", dtype=None)
    config.save(folder / "config.json")
    return folder


@pytest.fixture(scope="session")
def tiny_predictor(tiny_model_dir):
    from bonefrac import FracturePredictor

    return FracturePredictor.from_pretrained(tiny_model_dir, device="cpu")


def make_dataset(root: Path, files: dict[str, list[Path]]) -> Path:
    """Copy real files into root/<class>/ (a scratch dataset the test may modify)."""
    for cls, paths in files.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for p in paths:
            shutil.copy2(p, root / cls / p.name)
    return root
