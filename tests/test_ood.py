"""A colour photograph is predicted but flagged as unlike the training data; radiographs are not flagged.

Photographs: real ones that ship inside installed packages (scikit-learn, matplotlib, gradio). The limit
itself is justified by `python -m benchmarks.ood` over every radiograph in ../shared/data.
"""
import csv
import shutil
import warnings

import numpy as np
import pytest
from PIL import Image, ImageDraw

from benchmarks.common import installed_photos
from bonefrac import FracturePredictor, UnlikeTrainingDataWarning, load_image
from bonefrac.imaging import COLOUR_FRACTION_LIMIT, unlike_training_data

from .conftest import MULTIREGION

# The most coloured radiographs in ../shared/data: blue-tinted scans with yellow/red annotations.
TINTED_ANNOTATED = [MULTIREGION / "train" / "fractured" / "anterior-wedge-compression-fracture-vertebra.jpg",
                    MULTIREGION / "train" / "fractured" / "images33.jpg",
                    MULTIREGION / "train" / "fractured" / "anterior_wedge_fracture_at_L1.png"]


@pytest.fixture(scope="module")
def photos():
    found = installed_photos()
    if len(found) < 3:
        pytest.skip("the sample photographs of scikit-learn / matplotlib / gradio are not installed")
    return found


def test_real_photographs_are_flagged(photos):
    for p in photos:
        message = unlike_training_data(load_image(p))
        assert message and "colour photograph" in message and "not a radiograph" in message, p


def test_real_radiographs_are_not_flagged(real_data, good_images):
    for p in [*good_images, *TINTED_ANNOTATED]:
        image = load_image(p)
        assert unlike_training_data(image) is None, p
    tinted = load_image(TINTED_ANNOTATED[0]).info["bonefrac_colour_fraction"]
    assert 0.02 < tinted < COLOUR_FRACTION_LIMIT / 2  # coloured, but far from the limit


def test_generated_cases():
    gray = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (200, 1)), "L")
    assert unlike_training_data(load_image(gray.convert("RGB"))) is None  # R = G = B
    assert unlike_training_data(load_image(gray)) is None
    annotated = gray.convert("RGB")
    ImageDraw.Draw(annotated).rectangle([10, 10, 60, 50], fill=(255, 220, 0))  # a yellow label, ~4% of the image
    assert unlike_training_data(load_image(annotated)) is None
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8), "RGB")
    assert unlike_training_data(load_image(noise)) is not None
    rgba = Image.fromarray(rng.integers(0, 256, (120, 160, 4), dtype=np.uint8), "RGBA")
    assert unlike_training_data(load_image(rgba)) is not None


def test_grayscale_photograph_is_not_detectable_by_colour(photos):
    """The documented limit of this check: a photograph converted to grayscale passes unflagged."""
    assert unlike_training_data(load_image(Image.open(photos[0]).convert("L"))) is None


def test_predictor_answers_and_flags(photos, tiny_predictor, good_images):
    with pytest.warns(UnlikeTrainingDataWarning, match="colour photograph"):
        probs = tiny_predictor.predict(photos[0])
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-6)  # still answered
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_predictor.predict(good_images[0])
    results = tiny_predictor.predict_batch([good_images[0], photos[1]])
    assert results[0].ok and results[0].warning is None
    assert results[1].ok and "colour photograph" in results[1].warning
    explanation = tiny_predictor.explain(photos[2])
    assert explanation.warning and explanation.heatmap.shape == (explanation.image.height, explanation.image.width)


def test_cli_warning_column(photos, tiny_model_dir, good_images, tmp_path, capsys):
    from bonefrac.__main__ import main

    shutil.copy(photos[0], tmp_path / photos[0].name)
    shutil.copy(good_images[0], tmp_path / good_images[0].name)
    assert main(["predict", str(tmp_path), "--model", str(tiny_model_dir), "--csv", str(tmp_path / "out.csv")]) == 0
    with open(tmp_path / "out.csv", newline="") as f:
        rows = {r["path"].rsplit("/", 1)[-1]: r for r in csv.DictReader(f)}
    assert "colour photograph" in rows[photos[0].name]["warning"] and rows[photos[0].name]["prediction"]
    assert rows[good_images[0].name]["warning"] == ""
    assert "1 unlike the training data" in capsys.readouterr().err


def test_app_shows_the_warning(photos):
    pytest.importorskip("gradio")
    import app

    predict, _, _ = app.make_handlers(FracturePredictor.from_pretrained(device="cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gr.Warning outside a request
        label, overlay, decision, _ = predict(str(photos[0]), 0.4)
    assert decision.startswith("> **Unlike the training data:**") and "P(fractured)" in decision
    assert set(label) == {"fractured", "not fractured"}
    assert photos[0].exists()  # a file outside Gradio's upload folder is never deleted
