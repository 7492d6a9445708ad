"""Property-based fuzzing of the decoding boundary: any bytes give a clean 8-bit image or one ImageDecodeError."""
import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from bonefrac.imaging import MIN_SIDE, ImageDecodeError, decode_bytes


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


@st.composite
def mutated(draw):
    data = bytearray(draw(st.sampled_from(SEEDS)))
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


def _check(data: bytes) -> None:
    try:
        image = decode_bytes(data, "fuzz")
    except ImageDecodeError as e:
        message = str(e)
        assert message.startswith("fuzz: ") and "\n" not in message
        return
    assert image.mode == "L" and min(image.size) >= MIN_SIDE
    assert np.asarray(image).dtype == np.uint8


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_images_decode_or_fail_cleanly(data):
    _check(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_decode_or_fail_cleanly(data):
    _check(data)


@pytest.mark.parametrize("seed", range(len(SEEDS)))
def test_unmutated_seeds_are_images_or_refused_formats(seed):
    _check(SEEDS[seed])
