"""Property-based fuzzing of the decoding boundary: any bytes give a clean 8-bit image or one ImageDecodeError."""
import io
import logging
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from bonefrac.imaging import MIN_SIDE, ImageDecodeError, decode_bytes
from tests.test_dicom import PATIENT, RAMP, make_dicom


def _encode(mode: str, fmt: str, size=(40, 32)) -> bytes:
    rng = np.random.default_rng(0)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, size[::-1], dtype=np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8), "RGB").convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


SEEDS = [_encode("L", "PNG"), _encode("I;16", "PNG"), _encode("RGB", "JPEG"), _encode("L", "JPEG"), _encode("RGBA", "PNG"),
         _encode("P", "PNG"), _encode("L", "TIFF"), _encode("I;16", "TIFF"), _encode("RGB", "BMP"), _encode("RGB", "WEBP"),
         _encode("CMYK", "JPEG"), _encode("RGB", "GIF")]
DICOM_SEEDS = [make_dicom(RAMP, window=(2000, 3000)), make_dicom(RAMP, photometric="MONOCHROME1", slope=2.0, intercept=-1000.0)]


@st.composite
def mutated(draw, seeds=tuple(SEEDS + DICOM_SEEDS)):
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "zero"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            data = data[:at]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "zero":
            data[at:at + draw(st.integers(1, 64))] = bytes(min(64, len(data) - at))
    return bytes(data)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _check(data: bytes) -> None:
    records = _Records()
    logging.getLogger().addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            image = decode_bytes(data, "fuzz")
    except ImageDecodeError as e:
        message = str(e)
        assert message.startswith("fuzz: ") and "\n" not in message
        assert PATIENT not in message and "123456" not in message  # never patient data
        return
    finally:
        logging.getLogger().removeHandler(records)
        said = " ".join(records.lines + [str(w.message) for w in caught])
        assert PATIENT not in said and "123456" not in said, said  # nor in logs and warnings
    assert image.mode == "L" and min(image.size) >= MIN_SIDE
    assert np.asarray(image).dtype == np.uint8


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_images_decode_or_fail_cleanly(data):
    _check(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated(tuple(DICOM_SEEDS)))
def test_mutated_dicom_decodes_or_fails_cleanly(data):
    _check(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_decode_or_fail_cleanly(data):
    _check(data)


@pytest.mark.parametrize("seed", range(len(SEEDS) + len(DICOM_SEEDS)))
def test_unmutated_seeds_are_images_or_refused_formats(seed):
    _check((SEEDS + DICOM_SEEDS)[seed])
