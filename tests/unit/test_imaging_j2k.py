"""JPEG 2000 through the imagecodecs decoder plugin gives exactly what pydicom's pylibjpeg decoder gives."""

from __future__ import annotations

import logging

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.pixels import pixel_array
from pydicom.uid import JPEG2000, ExplicitVRLittleEndian, JPEG2000Lossless

from dicom_node.errors import InvalidInstance
from inference import imaging, j2k
from inference.phantom import make_dicom

pytestmark = pytest.mark.unit


def _both(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    ours = pixel_array(ds, decoding_plugin=j2k.PLUGIN)
    reference = pixel_array(ds, decoding_plugin="pylibjpeg")
    return ours, reference


def _grey(bits: int, signed: bool, syntax: str) -> Dataset:
    ds = make_dicom(shape=(96, 80), bits_stored=min(bits, 16), seed=4)
    if signed:
        values = ds.pixel_array.astype(np.int32) - (1 << (bits - 1))
        ds.PixelRepresentation = 1
        ds.PixelData = values.astype(np.int16).tobytes()
    ds.compress(syntax, encoding_plugin="pylibjpeg", generate_instance_uid=False,
                **({"j2k_cr": [8]} if syntax == JPEG2000 else {}))
    return ds


def test_plugin_is_registered_for_both_jpeg2000_syntaxes() -> None:
    assert j2k.register()
    assert j2k.is_available(JPEG2000Lossless) and j2k.is_available(JPEG2000)
    assert not j2k.is_available(ExplicitVRLittleEndian)


@pytest.mark.parametrize(("bits", "signed", "syntax"), [
    (8, False, JPEG2000Lossless),
    (12, False, JPEG2000Lossless),
    (16, False, JPEG2000Lossless),
    (16, True, JPEG2000Lossless),
    (12, False, JPEG2000),
])
def test_grey_frames_equal_pylibjpeg(bits: int, signed: bool, syntax: str) -> None:
    ours, reference = _both(_grey(bits, signed, syntax))
    assert ours.dtype == reference.dtype
    assert np.array_equal(ours, reference)


def test_rgb_frame_equals_pylibjpeg() -> None:
    ds = make_dicom(shape=(64, 48), bits_stored=8, seed=5)
    grey = ds.pixel_array
    rgb = np.stack([grey, grey // 2, 255 - grey], axis=-1).astype(np.uint8)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.PixelData = rgb.tobytes()
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg", generate_instance_uid=False, use_mct=True)
    ds.PhotometricInterpretation = "YBR_RCT"  # the codestream holds the reversible colour transform
    ours, reference = _both(ds)
    assert np.array_equal(ours, reference) and np.array_equal(ours, rgb)


def test_corrupt_codestream_falls_back_then_is_invalid(caplog: pytest.LogCaptureFixture) -> None:
    ds = make_dicom(shape=(128, 128), transfer_syntax=JPEG2000Lossless, seed=6)
    frame = bytearray(next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1)))
    frame[40:] = bytes(len(frame) - 40)  # keep the main header, zero the rest
    ds.PixelData = pydicom.encaps.encapsulate([bytes(frame)])
    caplog.set_level(logging.WARNING, logger="inference.imaging")
    with pytest.raises(InvalidInstance, match="cannot be decoded"):
        imaging.load_dicom(ds)
    assert any(getattr(r, "action", "") == "j2k_fallback" for r in caplog.records)
