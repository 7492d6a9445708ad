"""Grad-CAM heat maps (pytorch-grad-cam on the last ResNet block) and their overlay on the X-ray."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn


class _Head(nn.Module):
    """Pooling and classifier on the last block's output. ``block_output`` (an identity) is where
    Grad-CAM hooks, so its activations and gradients are exactly those of the last ResNet block."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.resnet = model
        self.block_output = nn.Identity()

    def forward(self, activations: torch.Tensor) -> torch.Tensor:
        m = self.resnet
        return m.fc(torch.flatten(m.avgpool(self.block_output(activations)), 1))


def _features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The output of the last ResNet block (model.layer4[-1])."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    return model.layer4(model.layer3(model.layer2(model.layer1(x))))


def gradcam(model: nn.Module, target_layer: nn.Module, batch: torch.Tensor, class_index: int) -> tuple[np.ndarray, torch.Tensor]:
    """Heat map in [0, 1] at the target layer's resolution (h, w), and the logits of the same forward pass.

    Grad-CAM needs the last block's activations and the gradient of the class score with respect
    to them, nothing else. So the network runs once without autograd up to that block's output,
    and pytorch-grad-cam runs on the pooling + classifier only: the backward pass is a few
    microseconds, with no weight gradients and nothing through the convolutions.
    Not thread-safe: the caller serialises calls on a shared model. A fresh CAM per call, inside
    ``with``, so its hooks never outlive the request.
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if batch.dim() != 4 or batch.shape[0] != 1:
        raise ValueError(f"gradcam expects a batch of one image (1, 3, H, W), got {tuple(batch.shape)}")
    if target_layer is not model.layer4[-1]:
        raise ValueError("gradcam supports the last ResNet block (model.layer4[-1]) as its target layer")
    with torch.no_grad():
        activations = _features(model, batch)
    activations = activations.detach().requires_grad_(True)  # the gradient stops here
    head = _Head(model)
    heatmap = None
    with GradCAM(model=head, target_layers=[head.block_output]) as cam:
        heatmap = cam(input_tensor=activations, targets=[ClassifierOutputTarget(class_index)])
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
    import cv2

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if heatmap.shape != (image.height, image.width):
        heatmap = resize_heatmap(heatmap, image.size)
    base = np.asarray(image.convert("RGB"))
    blended = cv2.addWeighted(base, 1.0 - alpha, colorize(heatmap), alpha, 0.0)  # uint8 throughout, rounded
    return Image.fromarray(blended, "RGB")
