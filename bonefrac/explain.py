"""Grad-CAM heat maps (pytorch-grad-cam on the last ResNet block) and their overlay on the X-ray."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn


def gradcam(model: nn.Module, target_layer: nn.Module, batch: torch.Tensor, class_index: int) -> tuple[np.ndarray, torch.Tensor]:
    """Heat map in [0, 1] of shape (H, W) of the input tensor, and the logits of the same forward pass.

    Not thread-safe: the caller serialises calls on a shared model. A fresh CAM per call, inside
    ``with``, so its hooks never outlive the request.
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if batch.dim() != 4 or batch.shape[0] != 1:
        raise ValueError(f"gradcam expects a batch of one image (1, 3, H, W), got {tuple(batch.shape)}")
    heatmap = None
    with GradCAM(model=model, target_layers=[target_layer]) as cam:
        heatmap = cam(input_tensor=batch, targets=[ClassifierOutputTarget(class_index)])
        logits = cam.outputs.detach()
    # GradCAM's context manager swallows IndexError (prints it); do not hand back nothing silently.
    if heatmap is None:
        raise RuntimeError("Grad-CAM failed (see the message printed above)")
    return np.nan_to_num(heatmap[0].astype(np.float32)).clip(0.0, 1.0), logits


def colorize(heatmap: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) uint8 RGB with the jet colormap."""
    import cv2

    bgr = cv2.applyColorMap(np.uint8(np.round(255 * heatmap)), cv2.COLORMAP_JET)
    return bgr[..., ::-1].copy()


def resize_heatmap(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float heat map to ``size`` = (width, height)."""
    resized = Image.fromarray(heatmap.astype(np.float32), mode="F").resize(size, Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32).clip(0.0, 1.0)


def overlay(image: Image.Image, heatmap: np.ndarray, alpha: float = 0.4) -> Image.Image:
    """Blend a heat map (any size, values in [0, 1]) over ``image``; returns RGB at the image's size."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if heatmap.shape != (image.height, image.width):
        heatmap = resize_heatmap(heatmap, image.size)
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    heat = colorize(heatmap).astype(np.float32)
    blended = (1.0 - alpha) * base + alpha * heat
    return Image.fromarray(np.round(blended).clip(0, 255).astype(np.uint8), "RGB")
