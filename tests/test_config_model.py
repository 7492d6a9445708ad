import json

import pytest
import torch

from bonefrac.config import FORMAT_VERSION, ConfigError, ModelConfig
from bonefrac.model import WeightsError, build_model, load_weights, save_weights


def test_config_round_trip(tmp_path):
    config = ModelConfig(input_size=192, mean=[0.3] * 3, std=[0.2] * 3, threshold=0.37, temperature=1.4,
                         interpolation="bicubic", extra={"training": {"seed": 3}})
    path = config.save(tmp_path)
    assert path.name == "config.json"
    loaded = ModelConfig.load(tmp_path)
    assert loaded == config
    data = json.loads(path.read_text())
    assert data["labels"] == ["not fractured", "fractured"] and data["positive_label"] == "fractured"
    assert data["format_version"] == FORMAT_VERSION
    assert not list(tmp_path.glob(".*tmp")), "temp file left behind"


@pytest.mark.parametrize("change, message", [
    ({"format_version": FORMAT_VERSION + 1}, "newer than this bonefrac"),
    ({"labels": ["a", "a"]}, "two distinct names"),
    ({"threshold": 1.5}, "threshold must be in [0, 1]"),
    ({"surprise": 1}, "unknown keys ['surprise']"),
    ({"architecture": "vit"}, "architecture must be one of"),
])
def test_config_rejects_bad_values(change, message):
    data = ModelConfig().to_dict() | change
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(data)
    assert message in str(e.value)


def test_version_1_config_loads_with_no_bias(tmp_path):
    data = ModelConfig().to_dict()
    del data["logit_bias"]
    data["format_version"] = 1
    (tmp_path / "config.json").write_text(json.dumps(data))
    config = ModelConfig.load(tmp_path)
    assert config.logit_bias == 0.0 and config.format_version == 1


def test_config_missing_and_malformed(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.load(tmp_path)


def _logits(model, seed=1):
    torch.manual_seed(seed)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        return model.eval()(x)


def test_save_load_float32_gives_identical_logits(tmp_path):
    config = ModelConfig(input_size=64)
    torch.manual_seed(0)
    model = build_model(config)
    save_weights(model, tmp_path / "model.safetensors", dtype=None)
    loaded = load_weights(build_model(config), tmp_path / "model.safetensors")
    assert torch.equal(_logits(model), _logits(loaded))


def test_half_precision_on_disk_round_trips_exactly(tmp_path):
    """The bundled model is stored in float16: loading it, saving again and reloading changes nothing."""
    config = ModelConfig(input_size=64)
    torch.manual_seed(0)
    model = build_model(config)
    save_weights(model, tmp_path / "a.safetensors")  # float16
    first = load_weights(build_model(config), tmp_path / "a.safetensors")
    assert next(first.parameters()).dtype == torch.float32
    save_weights(first, tmp_path / "b.safetensors")
    second = load_weights(build_model(config), tmp_path / "b.safetensors")
    assert torch.equal(_logits(first), _logits(second))
    # and float16 storage stays close to the float32 original
    assert torch.allclose(_logits(model), _logits(first), atol=5e-2)
    assert (tmp_path / "a.safetensors").stat().st_size < 0.6 * 4 * sum(p.numel() for p in model.parameters())


def test_mismatched_weights_are_refused(tmp_path):
    other = build_model(ModelConfig())
    other.fc = torch.nn.Linear(512, 3)
    save_weights(other, tmp_path / "model.safetensors")
    with pytest.raises(WeightsError, match="wrong shape.*fc.weight"):
        load_weights(build_model(ModelConfig()), tmp_path / "model.safetensors")


@pytest.mark.parametrize("name", ["model.bin", "model.pt", "model.pth"])
def test_pickles_are_refused(tmp_path, name):
    torch.save(build_model(ModelConfig()).state_dict(), tmp_path / name)
    with pytest.raises(WeightsError, match="only .safetensors"):
        load_weights(build_model(ModelConfig()), tmp_path / name)


def test_garbage_weights_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"this is not safetensors")
    with pytest.raises(WeightsError, match="not a readable safetensors"):
        load_weights(build_model(ModelConfig()), tmp_path / "model.safetensors")
