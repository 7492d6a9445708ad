"""bonefrac: a bone-fracture X-ray classifier (ResNet18) with Grad-CAM explanations.

Decision support only; not a medical device.
"""
from .config import ModelConfig
from .imaging import ImageDecodeError, load_image
from .predictor import Explanation, FracturePredictor, Result, UnlikeTrainingDataWarning

__version__ = "0.1.0"
__all__ = ["FracturePredictor", "ModelConfig", "Result", "Explanation", "ImageDecodeError", "load_image", "UnlikeTrainingDataWarning", "__version__"]
