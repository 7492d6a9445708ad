import io

import numpy as np
import pytest
from PIL import Image

from bonefrac.imaging import ImageDecodeError, load_image

from .conftest import GIF_NAMED_JPG, PALETTE_PNG, RGBA_PNG, TRUNCATED_JPEG


def _png(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **kw)
    return buf.getvalue()


def test_real_jpeg_decodes_to_grayscale(good_images):
    image = load_image(good_images[0])
    assert image.mode == "L" and min(image.size) > 100


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "P", "CMYK", "1", "I", "F"])
def test_pixel_modes_become_grayscale(mode):
    gradient = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (48, 1))
    image = Image.fromarray(gradient, "L").convert(mode)
    out = load_image(image)
    assert out.mode == "L" and out.size == (64, 48)
    assert np.asarray(out)[:, -1].mean() > np.asarray(out)[:, 0].mean()


def test_16_bit_png_uses_the_full_range():
    # A 12-bit detector image stored in 16 bits: values 0..4095. Clipping to 8 bits would saturate it.
    values = np.tile(np.linspace(0, 4095, 256).astype(np.uint16), (32, 1))
    data = _png(Image.fromarray(values))
    out = np.asarray(load_image(data))
    assert out.min() == 0 and out.max() == 255
    assert len(np.unique(out)) > 200  # the ramp survives as a ramp


def test_exif_orientation_is_applied():
    wide = Image.new("L", (80, 40), 0)
    wide.paste(255, (0, 0, 10, 40))  # bright band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    buf = io.BytesIO()
    wide.save(buf, format="JPEG", exif=exif, quality=95)
    out = load_image(buf.getvalue())
    assert out.size == (40, 80)
    assert np.asarray(out)[:10].mean() > 200  # the band is now on top


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"hello, I am a text file pretending to be a PNG\n", "not a recognised image (it looks like text)"),
    (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj", "it is a PDF"),
])
def test_non_images_get_one_line_errors(data, message):
    with pytest.raises(ImageDecodeError) as e:
        load_image(data, name="upload.png")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith("upload.png:")


def test_tiny_and_huge_images_are_refused():
    with pytest.raises(ImageDecodeError, match="only 4x4 pixels"):
        load_image(Image.new("L", (4, 4)))
    # A header that claims 20000x20000: refused before any pixel is decoded.
    bomb = _png(Image.new("1", (20000, 20000)))
    with pytest.raises(ImageDecodeError, match="20000x20000 pixels|too large"):
        load_image(bomb)


def test_numpy_inputs():
    assert load_image(np.zeros((32, 40), np.uint8)).size == (40, 32)
    assert load_image(np.zeros((32, 40, 3), np.uint8)).mode == "L"
    assert np.asarray(load_image(np.linspace(0, 1, 32 * 32).reshape(32, 32))).max() == 255
    with pytest.raises(ImageDecodeError, match="shape"):
        load_image(np.zeros((2, 3, 4, 5)))


def test_missing_path():
    with pytest.raises(ImageDecodeError, match="no such file"):
        load_image("/nonexistent/xray.png")


def test_real_corrupt_files(real_data):
    with pytest.raises(ImageDecodeError, match="truncated"):
        load_image(TRUNCATED_JPEG)
    with pytest.raises(ImageDecodeError, match="GIF images are not accepted"):
        load_image(GIF_NAMED_JPG)
    # Palette and RGBA radiographs are decodable for prediction (training's cleanup refuses them).
    assert load_image(PALETTE_PNG).mode == "L"
    assert load_image(RGBA_PNG).mode == "L"
