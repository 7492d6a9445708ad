"""ModelConfig: everything needed to preprocess, run and label a trained model.

It travels with the weights as ``config.json`` so that serving can never drift from training.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# 2: adds logit_bias (version-1 files load unchanged: their bias is 0).
FORMAT_VERSION = 2
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

POSITIVE_LABEL = "fractured"
NEGATIVE_LABEL = "not fractured"
SUPPORTED_ARCHITECTURES = ("resnet18",)
SUPPORTED_INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos")


class ConfigError(ValueError):
    """A config.json that is missing, malformed or from an unsupported format version."""


@dataclass
class ModelConfig:
    architecture: str = "resnet18"
    # Index i of the model's output is labels[i].
    labels: list[str] = field(default_factory=lambda: [NEGATIVE_LABEL, POSITIVE_LABEL])
    positive_label: str = POSITIVE_LABEL
    # Images are converted to 8-bit grayscale, squashed to input_size x input_size (no crop, so
    # nothing at the border of a radiograph is lost) and replicated to 3 channels.
    input_size: int = 224
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.25, 0.25, 0.25])
    interpolation: str = "bilinear"
    # P(positive) >= threshold -> positive decision.
    threshold: float = 0.5
    # Calibration fitted on validation (Platt scaling): P(positive) = sigmoid(margin / temperature +
    # logit_bias), where margin = logit[positive] - logit[negative]. For two classes this is the
    # softmax of logits / temperature with logit_bias added to the positive logit.
    temperature: float = 1.0
    logit_bias: float = 0.0
    format_version: int = FORMAT_VERSION
    # Free-form provenance (training run, data, metrics); never needed for inference.
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        problems = []
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            problems.append(f"architecture must be one of {SUPPORTED_ARCHITECTURES}, got {self.architecture!r}")
        if len(self.labels) != 2 or len(set(self.labels)) != 2:
            problems.append(f"labels must be two distinct names, got {self.labels!r}")
        if self.positive_label not in self.labels:
            problems.append(f"positive_label {self.positive_label!r} is not one of labels {self.labels!r}")
        if not (isinstance(self.input_size, int) and 16 <= self.input_size <= 2048):
            problems.append(f"input_size must be an int in 16..2048, got {self.input_size!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if len(value) != 3:
                problems.append(f"{name} must have 3 values, got {value!r}")
        if any(s <= 0 for s in self.std):
            problems.append(f"std must be positive, got {self.std!r}")
        if self.interpolation not in SUPPORTED_INTERPOLATIONS:
            problems.append(f"interpolation must be one of {SUPPORTED_INTERPOLATIONS}, got {self.interpolation!r}")
        if not 0.0 <= self.threshold <= 1.0:
            problems.append(f"threshold must be in [0, 1], got {self.threshold!r}")
        if not self.temperature > 0:
            problems.append(f"temperature must be > 0, got {self.temperature!r}")
        if not abs(self.logit_bias) < 1e3:
            problems.append(f"logit_bias must be a finite number, got {self.logit_bias!r}")
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))

    @property
    def positive_index(self) -> int:
        return self.labels.index(self.positive_label)

    @property
    def negative_label(self) -> str:
        return next(label for label in self.labels if label != self.positive_label)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a JSON object, got {type(data).__name__}")
        version = data.get("format_version")
        if not isinstance(version, int):
            raise ConfigError(f"config has no integer format_version (got {version!r}); is this a bonefrac config.json?")
        if version > FORMAT_VERSION:
            raise ConfigError(
                f"config format_version {version} is newer than this bonefrac understands ({FORMAT_VERSION}); "
                "upgrade bonefrac to load this model"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"config has unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_NAME
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_NAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"no {CONFIG_NAME} at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(data)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a written model or CSV should read like any other file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
