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
        # (x / 255 - mean) / std as one multiply-add; with the same statistics for the three channels
        # (every model trained on grayscale X-rays), on one channel that is then viewed three times:
        # 15x faster than broadcasting over three materialised channels.
        self._scale = 1.0 / (255.0 * self.std)
        self._shift = -self.mean / self.std
        self._one_channel = bool((self.mean == self.mean[0, 0]).all() and (self.std == self.std[0, 0]).all())

    def resize(self, image: Image.Image) -> np.ndarray:
        if image.mode != "L":
            raise ValueError(f"EvalTransform expects a grayscale 'L' image (use bonefrac.imaging.load_image), got mode {image.mode!r}")
        # Squash, not crop: a fracture at the edge of the film must stay in view.
        return np.array(image.resize((self.size, self.size), self.resample), dtype=np.uint8)

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W) or (B, 1, H, W) -> float32 (B, 3, H, W) (a view of one channel when the three
        channels share their statistics: call ``.contiguous()`` before writing into it)."""
        if batch.dtype != torch.uint8:
            raise TypeError(f"normalize expects a uint8 batch, got {batch.dtype}")
        if batch.dim() == 3:
            batch = batch.unsqueeze(1)
        x = batch.float()
        if self._one_channel:
            return x.mul_(float(self._scale[0, 0])).add_(float(self._shift[0, 0])).expand(-1, 3, -1, -1)
        return x * self._scale.to(x.device) + self._shift.to(x.device)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalize(torch.from_numpy(self.resize(image))[None])[0]

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.size}, resample={self.resample.name}, mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


def build_eval_transform(config: ModelConfig) -> EvalTransform:
    return EvalTransform(config)
