import threading

import numpy as np
import pytest
import torch

from bonefrac import FracturePredictor, ImageDecodeError, load_image
from bonefrac.config import ModelConfig
from bonefrac.hub import ModelSourceError
from bonefrac.transforms import build_eval_transform
from training.data import decode_samples, scan_dataset

from .conftest import TRUNCATED_JPEG, make_dataset


def test_training_eval_path_gives_identical_tensors(tmp_path, good_images, tiny_predictor):
    """Training evaluates cached images with the same transform object type the predictor uses: same tensors."""
    ds = make_dataset(tmp_path / "ds", {"fractured": good_images[:2], "not_fractured": good_images[2:]})
    config = tiny_predictor.config
    training_transform = build_eval_transform(config)
    decoded = decode_samples(scan_dataset(ds), training_transform, config.interpolation, tmp_path / "cache", workers=1, progress=False)
    train_side = training_transform.normalize(torch.from_numpy(decoded.images))
    for i, sample in enumerate(decoded.samples):
        _, serve_side = tiny_predictor.preprocess(sample.path)
        assert torch.equal(train_side[i], serve_side)
    # and from the cache file on the second call
    again = decode_samples(scan_dataset(ds), training_transform, config.interpolation, tmp_path / "cache", workers=1, progress=False)
    assert np.array_equal(again.images, decoded.images)


def test_predict_contract(tiny_predictor, good_images):
    probs = tiny_predictor.predict(good_images[0])
    assert list(probs) == ["fractured", "not fractured"]
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-6)
    # path, bytes, PIL and numpy inputs agree
    pil = load_image(good_images[0])
    for item in (good_images[0].read_bytes(), pil, np.asarray(pil)):
        assert tiny_predictor.predict(item) == pytest.approx(probs, abs=1e-6)
    assert tiny_predictor.decide(probs) in ("fractured", "not fractured")


def test_predict_batch_reports_bad_items_without_raising(tiny_predictor, good_images):
    items = [good_images[0], TRUNCATED_JPEG, b"", good_images[1]]
    results = tiny_predictor.predict_batch(items, batch_size=2)
    assert [r.ok for r in results] == [True, False, False, True]
    assert "truncated" in results[1].error and "empty" in results[2].error
    assert results[0].probabilities == pytest.approx(tiny_predictor.predict(good_images[0]), abs=1e-5)
    assert results[3].prediction == tiny_predictor.decide(results[3].probabilities)


def test_temperature_and_threshold_come_from_config(tiny_model_dir, good_images):
    base = FracturePredictor.from_pretrained(tiny_model_dir, device="cpu")
    hot = FracturePredictor.from_pretrained(tiny_model_dir, device="cpu")
    hot.config.temperature = 1000.0
    p = hot.predict(good_images[0])
    assert p["fractured"] == pytest.approx(0.5, abs=1e-3)
    hot.config.threshold = 0.0
    assert hot.decide(base.predict(good_images[0])) == "fractured"


def test_calibration_from_config_matches_the_training_formula(tiny_model_dir, good_images):
    """Serving applies exactly what training fitted: P = sigmoid(margin / temperature + logit_bias)."""
    from training.evaluate import sigmoid

    p = FracturePredictor.from_pretrained(tiny_model_dir, device="cpu")
    x = torch.stack([p.preprocess(g)[1] for g in good_images])
    with torch.inference_mode():
        logits = p.model(x).double().numpy()
    margin = logits[:, 1] - logits[:, 0]
    p.config.temperature, p.config.logit_bias = 0.7, -1.3
    got = [r.probabilities["fractured"] for r in p.predict_batch(good_images)]
    np.testing.assert_allclose(got, sigmoid(margin / 0.7 - 1.3), atol=1e-5)


def test_explain_heatmap_shape_and_range(tiny_predictor, good_images):
    image = load_image(good_images[0])
    ex = tiny_predictor.explain(good_images[0])
    assert ex.heatmap.shape == (image.height, image.width)
    assert ex.heatmap.dtype == np.float32 and ex.heatmap.min() >= 0 and ex.heatmap.max() <= 1
    assert ex.heatmap.max() > 0  # something was highlighted
    assert ex.overlay.size == image.size and ex.overlay.mode == "RGB"
    assert ex.probabilities == pytest.approx(tiny_predictor.predict(good_images[0]), abs=1e-5)
    other = tiny_predictor.explain(good_images[0], target="not fractured")
    assert not np.allclose(other.heatmap, ex.heatmap)
    with pytest.raises(ValueError, match="target must be one of"):
        tiny_predictor.explain(good_images[0], target="broken")
    # explain leaves the model as it was: predict gives the same answer afterwards
    assert tiny_predictor.predict(good_images[0]) == pytest.approx(ex.probabilities, abs=1e-6)


def test_concurrent_explain_and_predict_match_sequential(tiny_predictor, good_images):
    """Grad-CAM from many threads, with predict() calls running beside it, gives the sequential heat maps."""
    expected = [tiny_predictor.explain(p).heatmap for p in good_images]
    expected_probs = [tiny_predictor.predict(p) for p in good_images]
    got, probs, errors = {}, {}, []

    def explain(i):
        try:
            got[i] = tiny_predictor.explain(good_images[i % len(good_images)]).heatmap
        except Exception as e:  # surfaced below
            errors.append(e)

    def predict(i):
        probs[i] = tiny_predictor.predict(good_images[i % len(good_images)])

    threads = [threading.Thread(target=f, args=(i,)) for i in range(12) for f in (explain, predict)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(12):
        assert np.array_equal(got[i], expected[i % len(good_images)])
        assert probs[i] == pytest.approx(expected_probs[i % len(good_images)], abs=1e-6)


def test_explain_works_inside_inference_mode(tiny_predictor, good_images):
    with torch.inference_mode():
        ex = tiny_predictor.explain(good_images[0])
    assert ex.heatmap.max() > 0


def test_bad_input_raises_clear_error(tiny_predictor):
    with pytest.raises(ImageDecodeError, match="not a recognised image"):
        tiny_predictor.predict(b"GIF89 no")


def test_model_source_errors(tmp_path):
    with pytest.raises(ModelSourceError, match="has no config.json"):
        FracturePredictor.from_pretrained(tmp_path)
    with pytest.raises(ModelSourceError, match="neither an existing folder nor a Hub repo id"):
        FracturePredictor.from_pretrained(str(tmp_path / "nope" / "deeper" / "x"))
    ModelConfig().save(tmp_path)
    from bonefrac.model import WeightsError
    with pytest.raises(WeightsError, match="no weights file"):
        FracturePredictor.from_pretrained(tmp_path)


def test_bundled_model_loads_and_predicts(good_images):
    from bonefrac.hub import BUNDLED_MODEL_DIR

    if not (BUNDLED_MODEL_DIR / "model.safetensors").exists():
        pytest.fail("the bundled model/ folder is missing its weights")
    p = FracturePredictor.from_pretrained(device="cpu")
    assert p.config.labels == ["not fractured", "fractured"] and p.config.positive_label == "fractured"
    assert p.config.format_version == 2 and 0 < p.config.threshold < 1
    assert p.config.logit_bias < 0 and p.config.extra["training"]["threshold_rule"] == "sensitivity:0.9"
    probs = [p.predict(g)["fractured"] for g in good_images]
    assert all(0 <= x <= 1 for x in probs)
    assert len(set(np.round(probs, 4))) > 1  # not a constant


def test_warm_up_leaves_answers_unchanged(tiny_model_dir, good_images):
    p = FracturePredictor.from_pretrained(tiny_model_dir, device="cpu")
    cold = p.explain(good_images[0])
    assert p.warm_up() > 0
    warm = p.explain(good_images[0])
    assert warm.probabilities == cold.probabilities and np.array_equal(warm.heatmap, cold.heatmap)
