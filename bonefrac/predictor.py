"""FracturePredictor: load a trained model folder and answer X-ray images."""
from __future__ import annotations

import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from .config import WEIGHTS_NAME, ModelConfig
from .explain import gradcam, overlay, resize_heatmap
from .hub import resolve_model_dir
from .imaging import ImageDecodeError, ImageInput, load_image, unlike_training_data
from .model import build_model, load_weights
from .transforms import build_eval_transform


class UnlikeTrainingDataWarning(UserWarning):
    """The input does not look like the radiographs the model was trained on (a colour photograph, say)."""


@dataclass
class Result:
    """One item of ``predict_batch``: probabilities and decision, or an error message; ``warning`` says
    when the input is unlike the training data (the probabilities are then not to be trusted)."""

    probabilities: dict[str, float] | None = None
    prediction: str | None = None
    error: str | None = None
    warning: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Explanation:
    probabilities: dict[str, float]
    prediction: str
    heatmap: np.ndarray  # float32 (H, W) in [0, 1], at the original image's size
    overlay: Image.Image  # RGB, the original image with the heat map blended in
    image: Image.Image = field(repr=False)  # the decoded grayscale input
    warning: str | None = None  # set when the input is unlike the training data (see UnlikeTrainingDataWarning)


class FracturePredictor:
    """Fracture / no-fracture probabilities and Grad-CAM explanations for X-ray images.

    >>> p = FracturePredictor.from_pretrained()          # doctest: +SKIP
    >>> p.predict("wrist.png")                          # doctest: +SKIP
    {'fractured': 0.83, 'not fractured': 0.17}
    """

    def __init__(self, model: torch.nn.Module, config: ModelConfig, device: str | torch.device | None = None):
        self.config = config
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.transform = build_eval_transform(config)
        # channels_last like training; the inputs are made channels_last too, so no layout conversions per layer.
        self.model = model.to(self.device).to(memory_format=torch.channels_last).eval()
        # Grad-CAM needs no weight gradients at all (see explain.gradcam): nothing in the model requires grad.
        self.target_layer = self.model.layer4[-1]
        self.model.requires_grad_(False)
        # One lock around every forward pass: Grad-CAM's hooks record any forward that runs on the
        # model while a CAM is alive, so a concurrent predict() could corrupt a heat map.
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike | None = None, revision: str | None = None, device: str | torch.device | None = None) -> FracturePredictor:
        """Load the bundled model (default), a local model folder, or a Hub repo id ``user/repo[@rev]``."""
        folder = resolve_model_dir(source, revision)
        config = ModelConfig.load(folder)
        model = load_weights(build_model(config), folder / WEIGHTS_NAME)
        return cls(model, config, device)

    @property
    def labels(self) -> list[str]:
        return list(self.config.labels)

    def preprocess(self, image: ImageInput) -> tuple[Image.Image, torch.Tensor]:
        decoded = load_image(image)
        return decoded, self.transform(decoded)

    def _probabilities(self, logits: torch.Tensor) -> list[dict[str, float]]:
        pos, neg = self.config.positive_index, 1 - self.config.positive_index
        scaled = logits.float() / self.config.temperature
        scaled[:, pos] += self.config.logit_bias
        probs = torch.softmax(scaled, dim=1).cpu().numpy()
        # Positive label first, so a gr.Label or a CSV reads naturally.
        return [{self.config.labels[pos]: float(row[pos]), self.config.labels[neg]: float(row[neg])} for row in probs]

    def decide(self, probabilities: dict[str, float]) -> str:
        """The label at the model's operating threshold."""
        positive = probabilities[self.config.positive_label] >= self.config.threshold
        return self.config.positive_label if positive else self.config.negative_label

    def predict_tensors(self, batch: torch.Tensor) -> list[dict[str, float]]:
        """Probabilities for a preprocessed batch (B, 3, S, S)."""
        batch = batch.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with self._lock, torch.inference_mode():
            logits = self.model(batch)
        return self._probabilities(logits)

    def predict(self, image: ImageInput) -> dict[str, float]:
        """Probabilities for both labels; raises ImageDecodeError for an unusable input and warns
        (UnlikeTrainingDataWarning) when the input does not look like a radiograph."""
        decoded, tensor = self.preprocess(image)
        if message := unlike_training_data(decoded):
            warnings.warn(message, UnlikeTrainingDataWarning, stacklevel=2)
        return self.predict_tensors(tensor[None])[0]

    def predict_batch(self, items: Iterable[ImageInput], batch_size: int = 32, workers: int = 2) -> list[Result]:
        """One Result per item, in order; an undecodable item gets ``Result(error=...)``, never an exception."""
        return [result for batch in self.iter_predict(items, batch_size, workers) for result in batch]

    def iter_predict(self, items: Iterable[ImageInput], batch_size: int = 32, workers: int = 2) -> Iterator[list[Result]]:
        """Yield the Results batch by batch; decoding of the next batch (threads: PIL releases the GIL)
        overlaps the forward pass of this one, with at most two batches in memory."""
        items = list(items)
        chunks = [items[i:i + batch_size] for i in range(0, len(items), max(1, batch_size))]

        def prepare(item: ImageInput) -> tuple[torch.Tensor, str | None] | str:
            try:
                decoded, tensor = self.preprocess(item)
            except ImageDecodeError as e:
                return str(e)
            return tensor, unlike_training_data(decoded)

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            upcoming = [pool.submit(prepare, x) for x in chunks[0]] if chunks else []
            for k in range(len(chunks)):
                current = upcoming
                upcoming = [pool.submit(prepare, x) for x in chunks[k + 1]] if k + 1 < len(chunks) else []
                values = [f.result() for f in current]
                results = [Result(error=v) if isinstance(v, str) else None for v in values]
                good = [i for i, v in enumerate(values) if not isinstance(v, str)]
                if good:
                    for i, p in zip(good, self.predict_tensors(torch.stack([values[i][0] for i in good]))):
                        results[i] = Result(probabilities=p, prediction=self.decide(p), warning=values[i][1])
                yield results

    def explain(self, image: ImageInput, alpha: float = 0.4, target: str | None = None) -> Explanation:
        """Probabilities, a Grad-CAM heat map for ``target`` (default: the positive label) and its overlay."""
        decoded, tensor = self.preprocess(image)
        target = target or self.config.positive_label
        if target not in self.config.labels:
            raise ValueError(f"target must be one of {self.config.labels}, got {target!r}")
        batch = tensor[None].to(self.device).contiguous(memory_format=torch.channels_last)
        # Grad-CAM needs autograd even if the caller is inside inference_mode / no_grad.
        with self._lock, torch.inference_mode(False), torch.enable_grad():
            heatmap, logits = gradcam(self.model, self.target_layer, batch, self.config.labels.index(target))
        probabilities = self._probabilities(logits)[0]
        heatmap = resize_heatmap(heatmap, decoded.size)
        return Explanation(
            probabilities=probabilities,
            prediction=self.decide(probabilities),
            heatmap=heatmap,
            overlay=overlay(decoded, heatmap, alpha),
            image=decoded,
            warning=unlike_training_data(decoded),
        )

    def warm_up(self) -> float:
        """Run one explanation on a blank image, so the first real request does not pay for the lazy
        imports (pytorch-grad-cam pulls in scikit-learn and OpenCV, about a second) and the first-call
        set-up of the convolution kernels. Returns the seconds it took."""
        import time

        t = time.perf_counter()
        self.explain(Image.new("L", (self.config.input_size, self.config.input_size), 0))
        return time.perf_counter() - t

    def __repr__(self) -> str:
        return f"FracturePredictor(labels={self.labels}, size={self.config.input_size}, threshold={self.config.threshold}, device={self.device})"

