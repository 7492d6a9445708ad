"""Build torchvision's ResNet18 from a ModelConfig; save and load it as safetensors only."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from .config import WEIGHTS_NAME, ModelConfig, atomic_write_bytes


class WeightsError(ValueError):
    """Weights that are missing, not safetensors, or do not match the config."""


def build_model(config: ModelConfig) -> nn.Module:
    """A randomly initialised network with the config's architecture and number of labels."""
    from torchvision.models import resnet18

    if config.architecture != "resnet18":
        raise ValueError(f"unsupported architecture {config.architecture!r}; supported: resnet18")
    return resnet18(weights=None, num_classes=len(config.labels))


def save_weights(model: nn.Module, path: str | os.PathLike, dtype: torch.dtype | None = torch.float16) -> Path:
    """Write the state dict as safetensors (floating tensors cast to ``dtype``; None keeps them)."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    state = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[name] = tensor.contiguous()
    atomic_write_bytes(path, save(state, metadata={"format": "pt", "library": "bonefrac"}))
    return path


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load safetensors into ``model`` strictly: every key present, no extra key, every shape equal.

    Half-precision weights on disk are cast to the model's own dtype.
    """
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if path.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"}:
        raise WeightsError(f"refusing to load {path.name}: only .safetensors weights are accepted (pickles can run code)")
    if not path.is_file():
        raise WeightsError(f"no weights file at {path} (expected {WEIGHTS_NAME})")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"{path} is not a readable safetensors file: {e}") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if mismatched:
            k = mismatched[0]
            parts.append(f"{len(mismatched)} with wrong shape (e.g. {k}: config wants {tuple(own[k].shape)}, file has {tuple(state[k].shape)})")
        raise WeightsError(f"weights in {path} do not match the config's architecture: " + ", ".join(parts))
    state = {k: v.to(own[k].dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    return model
