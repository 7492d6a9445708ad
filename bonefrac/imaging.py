"""Turn any supported input into a clean, upright 8-bit grayscale PIL image, or raise a clear error.

Training (its cache) and serving both go through ``load_image``, so they see the same pixels.
"""
from __future__ import annotations

import io
import os
import struct
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageInput = Union[str, os.PathLike, bytes, bytearray, Image.Image, np.ndarray]

ACCEPTED_FORMATS = ("PNG", "JPEG", "MPO", "TIFF", "BMP", "WEBP")
ACCEPTED_TEXT = "PNG, JPEG, TIFF, BMP, WebP (8- or 16-bit, grayscale or colour) or single-frame DICOM"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif", ".dcm", ".dicom")
MAX_PIXELS = 60_000_000  # ~7700 x 7700; anything larger is refused before decoding
MIN_SIDE = 16
# Out-of-distribution check for colour photographs (the model reads grayscale radiographs). A pixel is
# "coloured" when max(R, G, B) - min(R, G, B) exceeds COLOUR_CHROMA (of 255). Measured with
# `python -m benchmarks.ood`: at most 7.6% of the pixels of any of the 7,577 usable radiographs in
# ../shared/data (6,873 stored in colour modes; the top ones are tinted scans with coloured annotations),
# at least 42% of every real photograph tried. The limit sits 3x above the first and 1.7x below the second.
COLOUR_CHROMA = 24
COLOUR_FRACTION_LIMIT = 0.25
INFO_COLOUR = "bonefrac_colour_fraction"  # set on the decoded image's .info by load_image


class ImageDecodeError(ValueError):
    """An input that is not a usable image; the message is one line meant for the user."""


def load_image(source: ImageInput, name: str | None = None) -> Image.Image:
    """Decode ``source`` (path, bytes, PIL image or numpy array) into an upright mode-'L' image.

    >>> img = load_image("xray.png")            # doctest: +SKIP
    >>> img.mode
    'L'
    """
    label = name or (str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__)
    if isinstance(source, Image.Image):
        return _to_gray(ImageOps.exif_transpose(source), label)
    if isinstance(source, np.ndarray):
        return _array_to_gray(source, label)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ImageDecodeError(f"{label}: no such file")
        data = path.read_bytes()
    elif isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    else:
        raise ImageDecodeError(f"{label}: unsupported input type {type(source).__name__}; pass a path, bytes, a PIL image or a numpy array")
    return decode_bytes(data, label)


def decode_bytes(data: bytes, label: str = "image") -> Image.Image:
    if len(data) == 0:
        raise ImageDecodeError(f"{label}: file is empty (0 bytes); expected {ACCEPTED_TEXT}")
    if len(data) > 132 and data[128:132] == b"DICM":  # DICOM Part 10, whatever the file is called
        return decode_dicom(data, label)
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        kind = _sniff(data)
        raise ImageDecodeError(f"{label}: not a recognised image{kind}; expected {ACCEPTED_TEXT}") from None
    except Image.DecompressionBombError:
        raise ImageDecodeError(f"{label}: image is too large to decode safely (limit {MAX_PIXELS:,} pixels)") from None
    except _CORRUPT as e:  # a recognised header with broken fields (found by the fuzz test)
        raise ImageDecodeError(f"{label}: corrupt image header ({_one_line(e)}); expected {ACCEPTED_TEXT}") from None
    if image.format not in ACCEPTED_FORMATS:
        raise ImageDecodeError(f"{label}: {image.format} images are not accepted; expected {ACCEPTED_TEXT}")
    check_size(image.size, label)
    try:
        image.load()
        return _to_gray(ImageOps.exif_transpose(image), label)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError:
        raise ImageDecodeError(f"{label}: image is too large to decode safely (limit {MAX_PIXELS:,} pixels)") from None
    except _CORRUPT as e:
        raise ImageDecodeError(f"{label}: corrupt or truncated {image.format} data ({_one_line(e)})") from None


# What Pillow's decoders raise on malformed data, besides UnidentifiedImageError.
_CORRUPT = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError, TypeError, ZeroDivisionError, OverflowError)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


def decode_dicom(data: bytes, label: str = "image") -> Image.Image:
    """A single-frame DICOM image as the radiologist's viewer shows it: the modality LUT (rescale
    slope/intercept), then the VOI LUT or window centre/width, MONOCHROME1 inverted so bone is white;
    then stretched to 8 bits like any high-bit-depth image. Messages never include patient data: header
    errors name only the exception type, and pydicom's value validation (whose warnings and log lines
    quote the offending values) is off while the file is read."""
    import pydicom
    from pydicom.config import disable_value_validation
    from pydicom.errors import BytesLengthException, InvalidDicomError

    with disable_value_validation():
        try:
            return _dicom_to_gray(pydicom.dcmread(io.BytesIO(data)), label)
        except ImageDecodeError:
            raise
        except (InvalidDicomError, BytesLengthException, NotImplementedError, AttributeError, RuntimeError, *_CORRUPT) as e:
            # pydicom reads lazily, so a broken element can surface on any access, not only in dcmread.
            raise ImageDecodeError(f"{label}: corrupt DICOM file ({type(e).__name__} while reading its header); "
                                   "expected a single-frame radiograph") from None


def _dicom_to_gray(ds, label: str) -> Image.Image:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    if "PixelData" not in ds:
        raise ImageDecodeError(f"{label}: DICOM file holds no image (no PixelData); expected a radiograph")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageDecodeError(f"{label}: multi-frame DICOM ({frames} frames) is not supported; export the one frame to read as its own file")
    try:
        check_size((int(ds.Columns), int(ds.Rows)), label)
        array = ds.pixel_array
    except ImageDecodeError:
        raise
    except (AttributeError, NotImplementedError, RuntimeError, *_CORRUPT) as e:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", "unknown transfer syntax")
        raise ImageDecodeError(f"{label}: cannot decode the DICOM pixel data ({name}: {_one_line(e)}); "
                               "uncompressed DICOM is accepted, or export the image as 16-bit PNG") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric.startswith("MONOCHROME"):
        array = apply_voi_lut(apply_modality_lut(array, ds), ds, index=0).astype(np.float64)
        if photometric == "MONOCHROME1":  # low values are white: invert so bone is white as in every other input
            array = array.max() + array.min() - array
    return _array_to_gray(array, label)


def check_size(size: tuple[int, int], label: str) -> None:
    w, h = size
    if w * h > MAX_PIXELS:
        raise ImageDecodeError(f"{label}: image is {w}x{h} pixels, above the {MAX_PIXELS:,}-pixel limit; downscale it first")
    if min(w, h) < MIN_SIDE:
        raise ImageDecodeError(f"{label}: image is only {w}x{h} pixels; at least {MIN_SIDE}x{MIN_SIDE} is needed")


def _sniff(data: bytes) -> str:
    head = data[:8]
    if head.startswith(b"%PDF"):
        return " (it is a PDF)"
    if head[:4] in (b"PK\x03\x04",):
        return " (it is a ZIP archive)"
    try:
        data[:512].decode("utf-8")
        return " (it looks like text)"
    except UnicodeDecodeError:
        return ""


def _to_gray(image: Image.Image, label: str) -> Image.Image:
    check_size(image.size, label)
    mode = image.mode
    if mode == "L":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _array_to_gray(np.asarray(image), label)
    if mode == "1":
        return image.convert("L")
    if mode in ("LA", "RGBA", "PA", "P", "La", "RGBa"):
        # Transparent areas become black, the background of a radiograph.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        rgb = Image.alpha_composite(background, rgba).convert("RGB")
    elif mode in ("RGB", "CMYK", "YCbCr", "LAB", "HSV"):
        rgb = image.convert("RGB")
    else:
        raise ImageDecodeError(f"{label}: unsupported pixel mode {mode!r}; expected grayscale or colour {ACCEPTED_TEXT}")
    gray = rgb.convert("L")
    gray.info[INFO_COLOUR] = colour_fraction(rgb)
    return gray


def colour_fraction(rgb: Image.Image) -> float:
    """The fraction of pixels that are clearly coloured (chroma > COLOUR_CHROMA), estimated on a regular
    sample of about 256 x 256 pixels (nearest neighbour: no averaging; about 0.3 ms for any size)."""
    w, h = rgb.size
    step = max(1, max(w, h) // 256)
    a = np.asarray(rgb.resize((max(1, w // step), max(1, h // step)), Image.Resampling.NEAREST).convert("RGB"))
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    chroma = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
    return float((chroma > COLOUR_CHROMA).mean())


def unlike_training_data(image: Image.Image) -> str | None:
    """A one-line warning when a decoded image (from load_image) is not like the radiographs the model
    was trained on, else None. Today: colour photographs (see COLOUR_FRACTION_LIMIT)."""
    fraction = image.info.get(INFO_COLOUR, 0.0)
    if fraction > COLOUR_FRACTION_LIMIT:
        return (f"this looks like a colour photograph ({fraction:.0%} of its pixels are coloured), not a radiograph like "
                "the training data: the result is probably meaningless")
    return None


def _array_to_gray(array: np.ndarray, label: str) -> Image.Image:
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[-1] in (1, 3, 4):
        if a.dtype == np.uint8:
            mode = {1: "L", 3: "RGB", 4: "RGBA"}[a.shape[-1]]
            return _to_gray(Image.fromarray(a[..., 0] if mode == "L" else a, mode), label)
        a = a[..., :3].mean(axis=-1) if a.shape[-1] >= 3 else a[..., 0]
    if a.ndim != 2:
        raise ImageDecodeError(f"{label}: array of shape {a.shape} is not an image; expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)")
    check_size((a.shape[1], a.shape[0]), label)
    if a.dtype == np.uint8:
        return Image.fromarray(a, "L")
    if a.dtype == np.bool_ or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise ImageDecodeError(f"{label}: array dtype {a.dtype} is not supported; expected uint8, uint16, int or float")
    a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise ImageDecodeError(f"{label}: image contains NaN or infinite values")
    # High bit depth: stretch the range actually used to 8 bits instead of clipping the top bits.
    lo, hi = float(a.min()), float(a.max())
    scaled = np.zeros_like(a) if hi <= lo else (a - lo) * (255.0 / (hi - lo))
    return Image.fromarray(np.round(scaled).astype(np.uint8), "L")
