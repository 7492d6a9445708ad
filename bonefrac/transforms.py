"""The one evaluation preprocessing, built from the model's config.

Training evaluates with this same object; its training cache stores exactly ``resize(image)``,
so a cached validation image and a served image become identical tensors.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .config import ModelConfig

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


class EvalTransform:
    """8-bit grayscale PIL image -> normalised float tensor (3, size, size).

    Two stages so the training cache can store the first: ``resize`` (PIL -> uint8 array) and
    ``normalize`` (uint8 batch -> float batch, on any device).
    """

    def __init__(self, config: ModelConfig):
        self.size = config.input_size
        self.resample = _RESAMPLE[config.interpolation]
        self.mean = torch.tensor(config.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(config.std, dtype=torch.float32).view(1, 3, 1, 1)

    def resize(self, image: Image.Image) -> np.ndarray:
        if image.mode != "L":
            raise ValueError(f"EvalTransform expects a grayscale 'L' image (use bonefrac.imaging.load_image), got mode {image.mode!r}")
        # Squash, not crop: a fracture at the edge of the film must stay in view.
        return np.array(image.resize((self.size, self.size), self.resample), dtype=np.uint8)

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W) or (B, 1, H, W) -> float32 (B, 3, H, W)."""
        if batch.dtype != torch.uint8:
            raise TypeError(f"normalize expects a uint8 batch, got {batch.dtype}")
        if batch.dim() == 3:
            batch = batch.unsqueeze(1)
        x = batch.float().div_(255.0).expand(-1, 3, -1, -1)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalize(torch.from_numpy(self.resize(image))[None])[0]

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.size}, resample={self.resample.name}, mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


def build_eval_transform(config: ModelConfig) -> EvalTransform:
    return EvalTransform(config)
