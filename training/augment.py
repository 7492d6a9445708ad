"""Training-time augmentation for radiographs, applied to whole uint8 batches on the training device.

One random affine per image (random resized crop, small rotation, flip) through a single
``grid_sample``, then brightness / contrast / gamma jitter. Output stays uint8, so train and
eval share the eval transform's ``normalize`` exactly.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugmentConfig:
    crop_scale: tuple[float, float] = (0.65, 1.0)  # area kept by the random resized crop
    crop_ratio: tuple[float, float] = (0.8, 1.25)  # aspect ratio of the crop
    rotation: float = 15.0  # degrees, +-
    hflip: float = 0.5
    vflip: float = 0.0
    brightness: float = 0.15  # additive, fraction of full range, +-
    contrast: float = 0.25  # multiplicative around the mean, 1 +- this
    gamma: float = 0.25  # exponent in [1 / (1 + g), 1 + g]
    noise: float = 0.02  # std of additive Gaussian noise, fraction of full range

    def to_dict(self) -> dict:
        return asdict(self)


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None, device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device) * (high - low) + low


def augment_batch(images: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None,
                  rows: slice | None = None, total: int | None = None) -> torch.Tensor:
    """uint8 (B, 1, H, W) -> augmented uint8 (B, 1, H, W), on the input's device.

    ``images`` may be the ``rows`` of a larger batch of ``total`` images (one rank's share under DDP):
    the random parameters are drawn for the whole batch and this part's are used, so every image gets
    the augmentation it would get in a single process.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"augment_batch expects uint8 (B, 1, H, W), got {images.dtype} {tuple(images.shape)}")
    rows = rows if rows is not None else slice(None)
    b, dev = (total or images.shape[0]), images.device
    x = images.float() / 255.0

    # Geometry: theta maps output coordinates to input coordinates in [-1, 1].
    area = _uniform(b, *cfg.crop_scale, generator, dev)
    log_ratio = _uniform(b, math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]), generator, dev)
    ratio = torch.exp(log_ratio)
    sx = torch.sqrt(area * ratio).clamp(max=1.0)
    sy = torch.sqrt(area / ratio).clamp(max=1.0)
    tx = (torch.rand(b, generator=generator, device=dev) * 2 - 1) * (1 - sx)
    ty = (torch.rand(b, generator=generator, device=dev) * 2 - 1) * (1 - sy)
    angle = _uniform(b, -cfg.rotation, cfg.rotation, generator, dev) * (math.pi / 180)
    fx = torch.where(torch.rand(b, generator=generator, device=dev) < cfg.hflip, -1.0, 1.0)
    fy = torch.where(torch.rand(b, generator=generator, device=dev) < cfg.vflip, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([
        torch.stack([sx * fx * cos, -sy * fy * sin, tx], dim=1),
        torch.stack([sx * fx * sin, sy * fy * cos, ty], dim=1),
    ], dim=1)[rows]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    # Intensity.
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    contrast = _uniform(b, 1 - cfg.contrast, 1 + cfg.contrast, generator, dev).view(b, 1, 1, 1)[rows]
    brightness = _uniform(b, -cfg.brightness, cfg.brightness, generator, dev).view(b, 1, 1, 1)[rows]
    x = ((x - mean) * contrast + mean + brightness).clamp(0, 1)
    log_g = math.log(1 + cfg.gamma)
    gamma = torch.exp(_uniform(b, -log_g, log_g, generator, dev)).view(b, 1, 1, 1)[rows]
    x = x.pow(gamma)
    if cfg.noise > 0:
        x = x + torch.randn((b, *x.shape[1:]), generator=generator, device=dev)[rows] * cfg.noise
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def save_preview(images: torch.Tensor, path: str | os.PathLike, nrow: int = 8) -> None:
    """Save a grid of uint8 (B, 1, H, W) images as a PNG (atomically)."""
    from torchvision.utils import make_grid
    from PIL import Image

    from bonefrac.config import atomic_write_bytes
    import io

    grid = make_grid(images.cpu(), nrow=nrow, padding=2, pad_value=128)
    buf = io.BytesIO()
    Image.fromarray(grid[0].numpy(), "L").save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
