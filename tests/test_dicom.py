"""DICOM input: generated in the test with pydicom (uncompressed and compressed syntaxes, MONOCHROME1/2,
rescale and window, multi-frame), through the same loader the app and CLI use."""
import io
import logging

import numpy as np
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, SecondaryCaptureImageStorage, generate_uid

from bonefrac.imaging import ImageDecodeError, load_image

PATIENT = "Doe^Jane"


def make_dicom(pixels: np.ndarray, photometric="MONOCHROME2", slope=1.0, intercept=0.0, window=None, frames=1,
               syntax=ExplicitVRLittleEndian, pixel_data=True) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.Modality = PATIENT, "123456", "DX"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if frames > 1:
        ds.NumberOfFrames = frames
    if pixel_data:
        if syntax == ExplicitVRLittleEndian:
            ds.PixelData = pixels.astype(np.uint16).tobytes()
        else:
            ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\0" * 64])
            ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


RAMP = np.tile(np.linspace(0, 4000, 64), (48, 1)).astype(np.uint16)  # dark left, bright right; 12-bit


def test_monochrome2_uses_the_full_range_and_keeps_orientation(tmp_path):
    path = tmp_path / "study.dcm"
    path.write_bytes(make_dicom(RAMP))
    img = np.asarray(load_image(path))
    assert img.shape == (48, 64) and img.dtype == np.uint8
    assert img[:, 0].mean() < 5 and img[:, -1].mean() > 250 and np.all(np.diff(img[0].astype(int)) >= 0)
    assert len(np.unique(img)) > 60  # 12 bits stretched, not clipped to a few levels


def test_monochrome1_is_inverted_so_bone_is_white():
    m2 = np.asarray(load_image(make_dicom(RAMP)))
    m1 = np.asarray(load_image(make_dicom(RAMP, photometric="MONOCHROME1")))
    np.testing.assert_allclose(m1.astype(int), 255 - m2.astype(int), atol=1)


def test_rescale_and_window_are_applied():
    # Stored 0..4000 -> modality values -1000..3000 (slope 1, intercept -1000); window 500 +- 500.
    img = np.asarray(load_image(make_dicom(RAMP, intercept=-1000.0, window=(500, 1000))))
    values = RAMP[0].astype(float) - 1000
    assert img[0, values <= 0].max() <= 2 and img[0, values >= 1000].min() >= 253  # clipped outside the window
    inside = (values > 50) & (values < 950)
    assert np.all(np.diff(img[0, inside].astype(int)) >= 0) and img[0, inside].std() > 40


def test_dicom_without_extension_is_recognised(tmp_path):
    (tmp_path / "IM0001").write_bytes(make_dicom(RAMP))
    assert load_image(tmp_path / "IM0001").size == (64, 48)


@pytest.mark.parametrize("kwargs, message", [
    ({"frames": 3}, "multi-frame DICOM (3 frames) is not supported"),
    ({"pixel_data": False}, "holds no image"),
    ({"syntax": JPEG2000Lossless}, "cannot decode the DICOM pixel data (JPEG 2000 Image Compression (Lossless Only)"),
])
def test_unsupported_dicom_gets_one_clear_line_without_patient_data(kwargs, message, caplog):
    pixels = np.stack([RAMP] * 3) if kwargs.get("frames") else RAMP
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(ImageDecodeError) as e:
            load_image(make_dicom(pixels, **kwargs), name="scan.dcm")
    text = str(e.value)
    assert message in text and text.startswith("scan.dcm: ") and "\n" not in text
    assert PATIENT not in text and "123456" not in text
    assert all(PATIENT not in r.getMessage() for r in caplog.records)


def test_truncated_dicom_is_a_clear_error():
    data = make_dicom(RAMP)
    with pytest.raises(ImageDecodeError, match="scan.dcm: (corrupt DICOM|cannot decode the DICOM pixel data)"):
        load_image(data[: len(data) // 2], name="scan.dcm")
