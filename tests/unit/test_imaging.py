"""Decoding: DICOM pixel transforms and transfer syntaxes, image files, header reasons."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForProcessing,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from dicom_node.errors import InvalidInstance
from inference.imaging import conventional_steps, header_reason, load_any, load_dicom, load_image_file
from inference.phantom import make_dicom, make_phantom
from inference.types import XrayImage
from tests.fixtures.dicom_data import DCMTK_COMPRESSORS

pytestmark = pytest.mark.unit

SHAPE = (256, 320)


def phantom(seed: int = 1, shape: tuple[int, int] = SHAPE) -> np.ndarray:
    return make_phantom(shape, seed=seed)[0]


def full_window(bits: int, slope: float = 1.0, intercept: float = 0.0) -> tuple[float, float]:
    """Window Center/Width (LINEAR) that maps the whole stored range linearly onto 0..1."""
    top = (1 << bits) - 1
    low, high = sorted((intercept, top * slope + intercept))
    return (low + high) / 2 + 0.5, high - low + 1


# ---------------------------------------------------------------------------------- pixel transforms


@pytest.mark.parametrize("bits", [8, 10, 12, 14, 15, 16])
def test_bit_depths_round_trip(dicom_factory, bits: int) -> None:
    path = dicom_factory(shape=SHAPE, bits_stored=bits, window=full_window(bits), seed=1)
    image = load_dicom(path)
    assert image.pixels.dtype == np.float32 and image.pixels.shape == SHAPE
    # Quantisation to `bits` plus the LINEAR window's half-step offset.
    assert np.abs(image.pixels - phantom()).max() < 2.0 / (1 << bits) + 1e-4
    assert (image.meta["rows"], image.meta["columns"]) == SHAPE


def test_monochrome1_is_inverted(dicom_factory) -> None:
    mono2 = load_dicom(dicom_factory(shape=SHAPE, window=full_window(12), seed=1))
    mono1 = load_dicom(
        dicom_factory(shape=SHAPE, window=full_window(12), photometric="MONOCHROME1", seed=1)
    )
    stored = pydicom.dcmread(dicom_factory(shape=SHAPE, photometric="MONOCHROME1", seed=1)).pixel_array
    ref = phantom()
    # Stored values are inverted (air high) yet the decoded image shows air dark, as MONOCHROME2 does.
    assert np.corrcoef(stored.ravel(), ref.ravel())[0, 1] < -0.99
    assert np.abs(mono1.pixels - ref).max() < 1e-3
    assert np.abs(mono1.pixels - mono2.pixels).max() < 1e-3
    assert mono1.meta["photometric"] == "MONOCHROME1"


def test_rescale_slope_intercept_applies_before_window(dicom_factory) -> None:
    slope, intercept = 2.5, -1000.0
    path = dicom_factory(
        shape=SHAPE, rescale=(slope, intercept), window=full_window(12, slope, intercept), seed=1
    )
    image = load_dicom(path)
    assert np.abs(image.pixels - phantom()).max() < 2e-3
    # The same window applied to the stored values (no rescale) gives a different, compressed image.
    ds = pydicom.dcmread(path)
    del ds.RescaleSlope, ds.RescaleIntercept
    assert np.abs(load_dicom(ds).pixels - phantom()).max() > 0.3


def test_window_narrows_contrast(dicom_factory) -> None:
    centre, width = 0.3 * 4095, 0.2 * 4095
    path = dicom_factory(shape=SHAPE, window=(centre, width), seed=1)
    image = load_dicom(path)
    stored = pydicom.dcmread(path).pixel_array.astype(np.float64)
    expected = np.clip((stored - (centre - 0.5)) / (width - 1) + 0.5, 0, 1)
    assert np.abs(image.pixels - expected).max() < 1e-4
    assert (image.pixels == 1.0).mean() > 0.3  # bone and soft tissue saturate in a lung window


@pytest.mark.parametrize("function", ["LINEAR_EXACT", "SIGMOID"])
def test_voi_lut_functions(dicom_factory, function: str) -> None:
    centre, width = 2048.0, 4096.0
    path = dicom_factory(shape=SHAPE, window=(centre, width), VOILUTFunction=function, seed=1)
    image = load_dicom(path)
    x = pydicom.dcmread(path).pixel_array.astype(np.float64)
    if function == "SIGMOID":
        expected = 1 / (1 + np.exp(-4 * (x - centre) / width))
    else:
        expected = (x - centre) / width + 0.5
    assert np.abs(image.pixels - expected).max() < 1e-5


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_voi_lut_sequence_is_applied_and_preferred(dicom_factory, photometric: str) -> None:
    # make_dicom stores the square of the image and adds a square-root VOI LUT: only applying the LUT
    # gives the drawn image back; a window on the stored values would give its square.
    path = dicom_factory(shape=SHAPE, voi_lut=True, photometric=photometric, seed=1)
    ds = pydicom.dcmread(path)
    assert "VOILUTSequence" in ds
    ds.WindowCenter, ds.WindowWidth = "2048", "4096"
    ref = phantom()
    for source in (path, ds):
        image = load_dicom(source)
        assert np.abs(image.pixels - ref).max() < 0.02
    del ds.VOILUTSequence
    assert np.abs(load_dicom(ds).pixels - ref).max() > 0.1


def _reread(ds: pydicom.Dataset, path: Path) -> pydicom.Dataset:
    """``ds`` written (in its file meta's transfer syntax) and read back, so VRs resolve as in production."""
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


def _with_values(ds: pydicom.Dataset, values: np.ndarray, syntax: str = ExplicitVRLittleEndian) -> None:
    """Give ``ds`` these stored values (its shape, 16-bit words) in ``syntax``'s byte order."""
    dtype = np.dtype(np.int16 if ds.PixelRepresentation else np.uint16)
    dtype = dtype.newbyteorder(">" if syntax == ExplicitVRBigEndian else "<")
    ds.PixelData = values.astype(dtype).reshape(ds.Rows, ds.Columns).tobytes()
    ds.file_meta.TransferSyntaxUID = syntax


def _lut_item(descriptor: list[int], entries: np.ndarray, vr: str = "US", *, descriptor_vr: str = "US",
              big_endian: bool = False) -> pydicom.Dataset:
    """A VOI LUT Sequence item; OW data as 16-bit words in the given byte order."""
    item = pydicom.Dataset()
    item.add_new("LUTDescriptor", descriptor_vr, descriptor)
    if vr == "OW":
        item.add_new("LUTData", "OW", np.asarray(entries).astype(">u2" if big_endian else "<u2").tobytes())
    else:
        item.add_new("LUTData", "US", [int(v) for v in entries])
    return item


def test_voi_lut_data_read_as_ow_in_implicit_vr(dicom_factory, caplog) -> None:
    # Implicit VR Little Endian leaves LUT Data's VR (US or OW) to the reader: pydicom takes OW (raw bytes).
    explicit = dicom_factory(shape=SHAPE, voi_lut=True, seed=1)
    implicit = dicom_factory(shape=SHAPE, voi_lut=True, seed=1, transfer_syntax=ImplicitVRLittleEndian)
    ds = pydicom.dcmread(implicit)
    assert ds.VOILUTSequence[0]["LUTData"].VR == "OW"
    assert pydicom.dcmread(explicit).VOILUTSequence[0]["LUTData"].VR == "US"
    with caplog.at_level(logging.WARNING, logger="inference.imaging"):
        image = load_dicom(implicit)
    assert not caplog.records
    np.testing.assert_array_equal(image.pixels, load_dicom(explicit).pixels)
    # make_dicom's LUT: 4096 entries from 0, round(sqrt(i / 4095) * 65535), scaled by its range 0..65535
    entries = np.rint(np.sqrt(np.arange(4096) / 4095) * 65535)
    expected = entries[ds.pixel_array] / 65535
    assert np.abs(image.pixels - expected).max() < 1e-6
    assert np.abs(image.pixels - phantom()).max() < 0.02


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian])
def test_voi_lut_of_65536_entries_in_ow(dicom_factory, tmp_path: Path, syntax: str) -> None:
    # 65536 entries (LUT Descriptor count 0) do not fit a US element: OW, in the data set's byte order.
    ds = pydicom.dcmread(dicom_factory(shape=SHAPE, bits_stored=16, seed=1, transfer_syntax=syntax))
    values = np.arange(SHAPE[0] * SHAPE[1]) * 7 % 65536
    _with_values(ds, values, syntax)
    inverting = 65535 - np.arange(65536)
    ds.VOILUTSequence = [_lut_item([0, 0, 16], inverting, "OW", big_endian=syntax == ExplicitVRBigEndian)]
    image = load_dicom(_reread(ds, tmp_path / "lut65536.dcm"))
    expected = (65535 - values.reshape(SHAPE)) / 65535
    assert np.abs(image.pixels - expected).max() < 1e-6


@pytest.mark.parametrize("vr", ["US", "OW"])
def test_8_bit_voi_lut_with_4096_entries(dicom_factory, tmp_path: Path, vr: str) -> None:
    # 8-bit entries (one per 16-bit word) for a 12-bit image: the inputs above 255 index the table as well.
    ds = pydicom.dcmread(dicom_factory(shape=SHAPE, seed=1))
    values = np.arange(SHAPE[0] * SHAPE[1]) % 4096
    _with_values(ds, values)
    ds.VOILUTSequence = [_lut_item([4096, 0, 8], np.arange(4096) // 16, vr)]  # entries 0..255
    pixels = load_dicom(_reread(ds, tmp_path / "lut8.dcm")).pixels.ravel()
    for value, entry in ((0, 0), (15, 0), (16, 1), (255, 15), (256, 16), (300, 18), (1000, 62),
                         (2048, 128), (4000, 250), (4095, 255)):
        assert pixels[value] == pytest.approx(entry / 255, abs=1e-6), value
    assert np.all(np.diff(pixels[:4096]) >= 0)  # the LUT is monotonic: so is the image of a ramp


def test_signed_image_voi_lut_with_a_negative_first_value_written_as_us(dicom_factory, tmp_path) -> None:
    # PS3.3 C.11.2.1.1: the first mapped value is US or SS as the input is; -1024 written with VR US is 64512.
    ds = pydicom.dcmread(dicom_factory(shape=SHAPE, seed=1))
    ds.PixelRepresentation = 1
    values = np.arange(SHAPE[0] * SHAPE[1]) % 4096 - 2048  # -2048..2047
    _with_values(ds, values)
    entries = 2 * np.arange(2048)  # inputs -1024..1023 -> 0..4094
    decoded = {}
    for descriptor_vr, first in (("US", 64512), ("SS", -1024)):
        ds.VOILUTSequence = [_lut_item([2048, first, 12], entries, descriptor_vr=descriptor_vr)]
        reread = _reread(ds, tmp_path / f"signed_{descriptor_vr}.dcm")
        assert list(reread.VOILUTSequence[0].LUTDescriptor) == [2048, first, 12]
        decoded[descriptor_vr] = load_dicom(reread)
    pixels = decoded["US"].pixels.ravel()
    for value, expected in ((-2048, 0.0), (-1025, 0.0), (-1024, 0.0), (-1023, 2 / 4094), (0, 2048 / 4094),
                            (1000, 4048 / 4094), (1023, 1.0), (2047, 1.0)):
        assert pixels[value + 2048] == pytest.approx(expected, abs=1e-6), value
    np.testing.assert_array_equal(decoded["US"].pixels, decoded["SS"].pixels)
    # the table of every stored level (the GPU path) maps them the same
    image = load_dicom(reread, allocate=lambda shape, dtype: np.empty(shape, dtype))
    assert image.stored is not None and image.stored.values.dtype == np.int16
    np.testing.assert_array_equal(image.stored.pixels(), decoded["SS"].pixels)


def test_invalid_voi_lut_is_ignored_with_a_brief_warning(dicom_factory, tmp_path: Path, caplog) -> None:
    ds = pydicom.dcmread(dicom_factory(shape=SHAPE, seed=1, window=full_window(12)))
    ds.VOILUTSequence = [_lut_item([4096, 0, 16], np.arange(2048), "OW")]  # half the entries it claims
    with caplog.at_level(logging.WARNING, logger="inference.imaging"):
        image = load_dicom(_reread(ds, tmp_path / "short.dcm"))
    assert np.abs(image.pixels - phantom()).max() < 1e-3  # the window applies instead
    assert [r.getMessage() for r in caplog.records] == [
        "invalid VOI LUT Sequence ignored: LUT Data has 2048 entries, its LUT Descriptor says 4096"
    ]


def test_without_voi_uses_percentiles(dicom_factory) -> None:
    image = load_dicom(dicom_factory(shape=SHAPE, seed=1))
    ref = phantom()
    low, high = np.percentile(ref, [0.5, 99.5])
    expected = np.clip((ref - low) / (high - low), 0, 1)
    assert np.abs(image.pixels - expected).max() < 0.02
    assert image.pixels.min() == 0.0 and image.pixels.max() == 1.0


def test_constant_image_decodes_to_zeros(dicom_factory) -> None:
    ds = pydicom.dcmread(dicom_factory(shape=SHAPE, seed=1))
    ds.PixelData = bytes(len(ds.PixelData))
    image = load_dicom(ds)
    assert image.pixels.shape == SHAPE and not image.pixels.any()


def test_dx_for_presentation_and_for_processing(dicom_factory) -> None:
    """Both decode; a For Processing image (raw detector values, not processed for viewing: what the model
    was trained on never looked like that) is not assessable, by its SOP class or its Presentation Intent."""
    for kwargs in ({}, {"sop_class_uid": DigitalXRayImageStorageForProcessing}):
        path = dicom_factory(shape=SHAPE, modality="DX", photometric="MONOCHROME1", seed=1, **kwargs)
        image = load_dicom(path)
        assert image.meta["modality"] == "DX"
        assert np.corrcoef(image.pixels.ravel(), phantom().ravel())[0, 1] > 0.999
        reason = header_reason(image)
        assert (reason or ("",))[0] == ("for_processing" if kwargs else ""), reason
    ds = pydicom.dcmread(dicom_factory(shape=SHAPE, modality="DX", seed=1))
    assert ds.PresentationIntentType == "FOR PRESENTATION"
    ds.PresentationIntentType = "FOR PROCESSING"  # a For Processing image sent under the other SOP class
    assert header_reason(load_dicom(ds)) == (
        "for_processing",
        "DX For Processing image (raw detector data, not processed for viewing); the model reads the For "
        "Presentation image")


# ---------------------------------------------------------------------------------- transfer syntaxes


@pytest.mark.parametrize(
    ("syntax", "bits", "tolerance"),
    [
        (ExplicitVRLittleEndian, 12, 1e-6),
        (ImplicitVRLittleEndian, 12, 1e-6),
        (DeflatedExplicitVRLittleEndian, 12, 1e-6),
        (ExplicitVRBigEndian, 12, 1e-6),
        (ExplicitVRBigEndian, 8, 1e-6),
        (RLELossless, 12, 1e-6),
        (RLELossless, 16, 1e-6),
        (JPEG2000Lossless, 12, 1e-6),
        (JPEG2000Lossless, 16, 1e-6),
        (JPEG2000, 12, 0.08),
        (HTJ2KLossless, 12, 1e-6),
        (HTJ2KLossless, 16, 1e-6),
        (HTJ2K, 12, 0.08),
        (JPEGBaseline8Bit, 8, 0.08),
    ],
)
def test_pydicom_encoded_round_trip(dicom_factory, syntax: str, bits: int, tolerance: float) -> None:
    window = full_window(bits)
    reference = load_dicom(dicom_factory(shape=SHAPE, bits_stored=bits, window=window, seed=1))
    path = dicom_factory(shape=SHAPE, bits_stored=bits, window=window, transfer_syntax=syntax, seed=1)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == syntax
    image = load_dicom(path)
    assert image.meta["sop_instance_uid"] == ds.SOPInstanceUID
    assert np.abs(image.pixels - reference.pixels).max() <= tolerance
    assert np.abs(image.pixels - reference.pixels).mean() < 0.01


@pytest.mark.parametrize("bits", [12, 16])
def test_htj2k_lossless_rpcl_is_decoded(dicom_factory, bits: int) -> None:
    """The listener accepts HTJ2K Lossless RPCL (1.2.840.10008.1.2.4.202). No encoder here writes that
    progression order, but decoders do not depend on it: a lossless HTJ2K stream labelled .202 must decode to
    the uncompressed image's pixels through the same path a received one takes."""
    window = full_window(bits)
    reference = load_dicom(dicom_factory(shape=SHAPE, bits_stored=bits, window=window, seed=1))
    path = dicom_factory(shape=SHAPE, bits_stored=bits, window=window, transfer_syntax=HTJ2KLossless, seed=1)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = HTJ2KLosslessRPCL
    ds.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == HTJ2KLosslessRPCL
    assert np.abs(load_dicom(path).pixels - reference.pixels).max() <= 1e-6


@pytest.mark.parametrize("syntax", sorted(DCMTK_COMPRESSORS))
def test_dcmtk_encoded_round_trip(dicom_factory, syntax: str) -> None:
    bits = 8 if syntax == JPEGBaseline8Bit else 12
    window = full_window(bits)
    reference = load_dicom(dicom_factory(shape=SHAPE, bits_stored=bits, window=window, seed=1))
    path = dicom_factory(shape=SHAPE, bits_stored=bits, window=window, seed=1, compress_with_dcmtk=syntax)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
    image = load_dicom(path)
    lossy = syntax in ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.81")
    error = np.abs(image.pixels - reference.pixels)
    assert error.max() <= (0.08 if lossy else 1e-6)
    assert error.mean() < 0.01


def test_jpeg_ls_and_missing_encoders_are_explained(dicom_factory) -> None:
    try:
        path = dicom_factory(shape=SHAPE, transfer_syntax=JPEGLSLossless, seed=1)
    except ValueError as exc:  # pyjpegls not installed: the message says how to get the syntax
        assert "dcmcjpls" in str(exc)
    else:
        assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == JPEGLSLossless
    with pytest.raises(ValueError, match="dcmcjpeg"):
        make_dicom(shape=SHAPE, transfer_syntax=JPEGLosslessSV1)
    with pytest.raises(ValueError, match="RPCL"):
        make_dicom(shape=SHAPE, transfer_syntax=HTJ2KLosslessRPCL)
    with pytest.raises(ValueError, match="bits_stored"):
        make_dicom(shape=SHAPE, transfer_syntax=JPEGBaseline8Bit, bits_stored=12)


def test_multiframe_takes_first_frame(dicom_factory) -> None:
    ds = pydicom.dcmread(dicom_factory(shape=SHAPE, bits_stored=16, window=full_window(16), seed=1))
    first = ds.pixel_array
    second = (65535 - first).astype(np.uint16)
    ds.NumberOfFrames = 2
    ds.PixelData = first.tobytes() + second.tobytes()
    image = load_dicom(ds)
    assert image.pixels.shape == SHAPE
    assert np.abs(image.pixels - phantom()).max() < 1e-3


def test_an_unreadable_frame_count_is_not_removed_from_the_callers_data_set(dicom_factory) -> None:
    """The decoder works around an unreadable Number of Frames on a copy; the worker goes on to copy the
    caller's header into the outputs, which must still hold it."""
    ds = pydicom.dcmread(dicom_factory(shape=SHAPE, bits_stored=16, window=full_window(16), seed=1))
    ds["NumberOfFrames"] = RawDataElement(Tag(0x00280008), "IS", 2, b"x ", 0, False, True)
    image = load_dicom(ds)
    assert np.abs(image.pixels - phantom()).max() < 1e-3
    assert "NumberOfFrames" in ds


def test_rgb_is_converted_to_grey(dicom_factory) -> None:
    ds = pydicom.dcmread(dicom_factory(shape=SHAPE, bits_stored=8, seed=1))
    grey = ds.pixel_array
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.PixelData = np.repeat(grey[..., None], 3, axis=2).tobytes()
    image = load_dicom(ds)
    assert np.abs(image.pixels - grey / 255.0).max() < 1e-3


def _rgb(ds: pydicom.Dataset) -> None:
    grey = ds.pixel_array
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.PixelData = np.repeat(grey[..., None], 3, axis=2).tobytes()


def _constant(ds: pydicom.Dataset) -> None:
    ds.PixelData = bytes(len(ds.PixelData))


@pytest.mark.parametrize(
    ("kwargs", "change"),
    [
        ({"window": full_window(12)}, None),
        ({"window": (1500.0, 1.0)}, None),  # width 1: a threshold
        ({"window": (2048.0, 4096.0), "VOILUTFunction": "SIGMOID"}, None),
        ({"window": full_window(12), "photometric": "MONOCHROME1"}, None),
        ({"voi_lut": True}, None),
        ({"voi_lut": True, "photometric": "MONOCHROME1"}, None),
        ({}, None),  # percentiles
        ({"photometric": "MONOCHROME1"}, None),
        ({}, _constant),
        ({"bits_stored": 8}, _rgb),
        ({"padding": 40}, None),  # padding left out of the percentiles and black, in the table as well
        ({"padding": 40, "photometric": "MONOCHROME1", "window": full_window(12)}, None),
        ({"padding": 40, "voi_lut": True}, None),
    ],
)
def test_decoding_into_a_given_array_gives_the_same_pixels_there(dicom_factory, kwargs: dict, change) -> None:
    ds = pydicom.dcmread(dicom_factory(shape=SHAPE, seed=1, **kwargs))
    if change is not None:
        change(ds)
    plain = load_dicom(ds)
    assert plain.stored is None  # kept only when an allocator takes them
    given: list[np.ndarray] = []

    def pixels_only(shape: tuple[int, int], dtype: np.dtype) -> np.ndarray | None:
        if dtype != np.float32:
            return None  # declines stored values, as the pipeline's host path does
        given.append(np.full(shape, np.nan, dtype=np.float32))
        return given[-1]

    image = load_dicom(ds, allocate=pixels_only)
    assert len(given) == 1 and image.pixels is given[0] and image.stored is None
    np.testing.assert_array_equal(image.pixels, plain.pixels)
    assert plain.pixels.std() > 0 or change is _constant

    def anything(shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
        given.append(np.zeros(shape, dtype=dtype))
        return given[-1]

    given.clear()
    image = load_dicom(ds, allocate=anything)
    np.testing.assert_array_equal(image.pixels, plain.pixels)
    assert len(given) == 1
    if change is _rgb:  # colour has no stored grey levels: its pixels were written into the float32 array
        assert image.stored is None and image.pixels is given[0]
        return
    stored = image.stored
    assert stored is not None and stored.values is given[0] and image.pixels is not given[0]
    np.testing.assert_array_equal(stored.values, ds.pixel_array)
    assert stored.low == int(ds.pixel_array.min())
    assert len(stored.table) == int(ds.pixel_array.max()) - stored.low + 1
    assert stored.table.dtype == np.float32
    np.testing.assert_array_equal(stored.pixels(), plain.pixels)  # the table gives the very same pixels


def test_signed_stored_values_keep_their_table(dicom_factory) -> None:
    ds = pydicom.dcmread(dicom_factory(shape=SHAPE, seed=2, rescale=(0.5, 100.0), photometric="MONOCHROME1"))
    ds.PixelRepresentation = 1
    ds.PixelData = (ds.pixel_array.astype(np.int16) - 2048).tobytes()
    plain = load_dicom(ds)
    image = load_dicom(ds, allocate=lambda shape, dtype: np.empty(shape, dtype))
    assert image.stored is not None and image.stored.values.dtype == np.int16 and image.stored.low < 0
    np.testing.assert_array_equal(image.stored.pixels(), plain.pixels)
    assert plain.pixels.std() > 0


def test_an_allocator_that_gives_a_wrong_array_is_named(dicom_factory, tmp_path: Path) -> None:
    path = dicom_factory(shape=SHAPE, seed=1)
    for wrong in (lambda s, d: np.empty(s, np.float64), lambda s, d: np.empty(s[::-1], d),
                  lambda s, d: np.empty((s[1], s[0]), d).T, lambda s, d: [[0.0]]):
        with pytest.raises(ValueError, match='"allocate" must return a writable C-contiguous uint16 array'):
            load_dicom(path, allocate=wrong)
    with pytest.raises(ValueError, match='"allocate" must return a writable C-contiguous float32 array'):
        load_dicom(path, allocate=lambda s, d: None if d != np.float32 else np.empty(s, np.float64))
    kept: list[np.ndarray] = []
    image = load_any(path, allocate=lambda s, d: kept.append(np.empty(s, d)) or kept[-1])
    assert image.stored is not None and image.stored.values is kept[0]


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("voi", [{}, {"window": full_window(12)}, {"voi_lut": True}],
                         ids=["percentiles", "window", "voi_lut"])
def test_pixel_padding_is_black_and_left_out_of_the_range(dicom_factory, photometric: str, voi: dict) -> None:
    pad = 48
    padded = pydicom.dcmread(dicom_factory(shape=SHAPE, seed=1, photometric=photometric, padding=pad, **voi))
    assert padded.PixelPaddingValue == (4095 if photometric == "MONOCHROME2" else 0)
    image = load_dicom(padded)
    assert not image.pixels[:, :pad].any() and not image.pixels[:, -pad:].any()
    # The anatomy decodes as on the same film without the bars: they move neither the window nor the
    # percentile range (which only loses the anatomy the bars cover, hence the tolerance there).
    plain = load_dicom(dicom_factory(shape=SHAPE, seed=1, photometric=photometric, **voi)).pixels[:, pad:-pad]
    assert np.abs(image.pixels[:, pad:-pad] - plain).max() < (0.02 if not voi else 1e-6)
    del padded.PixelPaddingValue  # not recognised, the same bars show white and squeeze the percentile range
    unaware = load_dicom(padded)
    assert unaware.pixels[:, :pad].min() == 1.0 and unaware.pixels[:, -pad:].min() == 1.0
    if not voi:
        assert np.abs(unaware.pixels[:, pad:-pad] - plain).max() > 0.1


def test_pixel_padding_range_limit(dicom_factory) -> None:
    ds = pydicom.dcmread(dicom_factory(shape=SHAPE, seed=1, window=full_window(12)))
    stored = ds.pixel_array.copy()
    stored[:, :20], stored[:, 20:40] = 4095, 4090
    ds.PixelData = stored.tobytes()
    plain = load_dicom(ds).pixels
    assert plain[:, :40].min() > 0.99
    ds.add_new("PixelPaddingValue", "US", 4095)
    ds.add_new("PixelPaddingRangeLimit", "US", 4090)
    expected = np.where((stored >= 4090) & (stored <= 4095), np.float32(0), plain)
    np.testing.assert_array_equal(load_dicom(ds).pixels, expected)
    ds.PixelPaddingValue, ds.PixelPaddingRangeLimit = 4090, 4095  # either order
    np.testing.assert_array_equal(load_dicom(ds).pixels, expected)


def test_invalid_pixel_padding_is_ignored_and_logged(dicom_factory, caplog) -> None:
    ds = pydicom.dcmread(dicom_factory(shape=SHAPE, seed=1))
    plain = load_dicom(ds).pixels
    for values in ({"PixelPaddingValue": [0, 1]}, {"PixelPaddingValue": 0, "PixelPaddingRangeLimit": 4095}):
        for keyword, value in values.items():
            ds.add_new(keyword, "US", value)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="inference.imaging"):
            np.testing.assert_array_equal(load_dicom(ds).pixels, plain)
        assert [r.action for r in caplog.records] == ["dicom_header_invalid"], values
        assert "PixelPaddingValue" in caplog.records[0].getMessage()


def _collimated(dicom_factory, **kwargs) -> tuple[pydicom.Dataset, np.ndarray]:
    """A 12-bit film whose outer 30 rows and columns are unexposed (the top stored value: white), and the
    pixels of the same film without a shutter."""
    ds = pydicom.dcmread(dicom_factory(shape=SHAPE, seed=1, **kwargs))
    stored = ds.pixel_array.copy()
    stored[:30], stored[-30:], stored[:, :30], stored[:, -30:] = 4095, 4095, 4095, 4095
    ds.PixelData = stored.tobytes()
    return ds, load_dicom(ds).pixels


SHUTTERS = {
    "rectangular": ({"ShutterShape": "RECTANGULAR", "ShutterLeftVerticalEdge": 31,
                     "ShutterRightVerticalEdge": SHAPE[1] - 30, "ShutterUpperHorizontalEdge": 31,
                     "ShutterLowerHorizontalEdge": SHAPE[0] - 30},
                    lambda y, x: (y >= 30) & (y < SHAPE[0] - 30) & (x >= 30) & (x < SHAPE[1] - 30)),
    "circular": ({"ShutterShape": "CIRCULAR", "CenterOfCircularShutter": [129, 161],
                  "RadiusOfCircularShutter": 90},
                 lambda y, x: (y - 128) ** 2 + (x - 160) ** 2 <= 90**2),
    "polygonal": ({"ShutterShape": "POLYGONAL",  # a diamond, vertices as row\\column pairs
                   "VerticesOfThePolygonalShutter": [31, 161, 129, 291, 227, 161, 129, 31]},
                  lambda y, x: np.abs(y - 128) / 98 + np.abs(x - 160) / 130 <= 1),
    "rectangular and circular": (  # the intersection of both shapes shows
        {"ShutterShape": ["RECTANGULAR", "CIRCULAR"], "ShutterLeftVerticalEdge": 31,
         "ShutterRightVerticalEdge": 160, "ShutterUpperHorizontalEdge": 1,
         "ShutterLowerHorizontalEdge": SHAPE[0], "CenterOfCircularShutter": [129, 161],
         "RadiusOfCircularShutter": 90},
        lambda y, x: (x >= 30) & (x < 160) & ((y - 128) ** 2 + (x - 160) ** 2 <= 90**2),
    ),
}


@pytest.mark.parametrize("name", sorted(SHUTTERS))
def test_display_shutter_hides_the_collimated_border(dicom_factory, name: str) -> None:
    attributes, expected_visible = SHUTTERS[name]
    ds, unshuttered = _collimated(dicom_factory, window=full_window(12))
    assert unshuttered[:30].min() == 1.0  # without the shutter the unexposed border shows white
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    image = load_dicom(ds)
    visible = image.pixels > 0
    y, x = np.mgrid[: SHAPE[0], : SHAPE[1]]
    inside = expected_visible(y, x)
    # the shape's own outline may fall either way by a pixel: compare away from it
    shifted = [np.roll(inside, step, axis) for step in (1, -1) for axis in (0, 1)]
    eroded = np.logical_and.reduce([inside, *shifted])
    outside = ~np.logical_or.reduce([inside, *shifted])
    assert not visible[outside].any()
    np.testing.assert_array_equal(image.pixels[eroded], unshuttered[eroded])
    # a shutter is not a function of stored values: the GPU path gets the float pixels, not the stored ones
    given = load_dicom(ds, allocate=lambda shape, dtype: np.zeros(shape, dtype))
    assert given.stored is None
    np.testing.assert_array_equal(given.pixels, image.pixels)


def test_display_shutter_is_left_out_of_the_percentile_range(dicom_factory) -> None:
    ds, unshuttered = _collimated(dicom_factory)
    attributes, _ = SHUTTERS["rectangular"]
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    inner = load_dicom(ds).pixels[30:-30, 30:-30]
    assert inner.min() == 0.0 and inner.max() == 1.0  # the anatomy's own range, not squeezed by the border
    assert unshuttered[30:-30, 30:-30].max() < 0.95


@pytest.mark.parametrize(
    "attributes",
    [
        {"ShutterShape": "RECTANGULAR", "ShutterLeftVerticalEdge": 31},  # edges missing
        {"ShutterShape": "RECTANGULAR", "ShutterLeftVerticalEdge": 200, "ShutterRightVerticalEdge": 100,
         "ShutterUpperHorizontalEdge": 1, "ShutterLowerHorizontalEdge": 10},  # empty
        {"ShutterShape": "POLYGONAL", "VerticesOfThePolygonalShutter": [1, 1, 100, 100]},  # two vertices
        {"ShutterShape": "BITMAP"},
        {"ShutterShape": "CIRCULAR", "CenterOfCircularShutter": [-500, -500], "RadiusOfCircularShutter": 10},
    ],
)
def test_invalid_display_shutter_is_ignored_and_logged(dicom_factory, caplog, attributes: dict) -> None:
    ds, unshuttered = _collimated(dicom_factory, window=full_window(12))
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    with caplog.at_level(logging.WARNING, logger="inference.imaging"):
        image = load_dicom(ds)
    np.testing.assert_array_equal(image.pixels, unshuttered)
    assert [r.action for r in caplog.records] == ["dicom_header_invalid"]
    assert "Display Shutter ignored" in caplog.records[0].getMessage()


# How a film read the conventional way (Patient Orientation L\\F) is stored in each frontal orientation.
STORED_AS = {
    "L\\F": lambda a: a, "R\\F": lambda a: a[:, ::-1], "L\\H": lambda a: a[::-1],
    "R\\H": lambda a: a[::-1, ::-1], "F\\L": lambda a: a.T, "F\\R": lambda a: a.T[::-1],
    "H\\L": lambda a: a.T[:, ::-1], "H\\R": lambda a: a.T[::-1, ::-1],
}


@pytest.mark.parametrize("orientation", sorted(STORED_AS))
def test_frontal_films_are_turned_to_the_conventional_orientation(dicom_factory, orientation: str) -> None:
    ds = pydicom.dcmread(dicom_factory(shape=SHAPE, seed=1, window=full_window(12), PixelSpacing=[0.2, 0.3]))
    conventional = load_dicom(ds).pixels
    stored = np.ascontiguousarray(STORED_AS[orientation](ds.pixel_array))
    transposed = orientation[0] in "HF"
    ds.Rows, ds.Columns = stored.shape
    ds.PixelData = stored.tobytes()
    ds.PatientOrientation = orientation.split("\\")
    ds.PixelSpacing = [0.3, 0.2] if transposed else [0.2, 0.3]  # (between rows, between columns) as stored
    image = load_dicom(ds)
    np.testing.assert_array_equal(image.pixels, conventional)
    assert image.pixels.flags.c_contiguous
    assert (image.meta["rows"], image.meta["columns"]) == SHAPE
    assert image.meta["patient_orientation"] == "L\\F" and image.meta["pixel_spacing"] == (0.2, 0.3)
    assert image.meta.get("source_orientation") == (None if orientation == "L\\F" else orientation)
    # into the caller's memory: float32 of the turned shape (the GPU path does not turn stored values)
    given: list[np.ndarray] = []
    into = load_dicom(ds, allocate=lambda shape, dtype: given.append(np.zeros(shape, dtype)) or given[-1])
    np.testing.assert_array_equal(into.pixels, conventional)
    assert (into.stored is None) == (orientation != "L\\F")
    if orientation != "L\\F":
        assert len(given) == 1 and into.pixels is given[0]


@pytest.mark.parametrize("orientation", ["A\\F", "P\\H", "F\\A", "H\\P", "LH\\F", "L", "", "L\\F\\A"])
def test_lateral_oblique_and_unknown_orientations_are_not_turned(orientation: str) -> None:
    assert conventional_steps(orientation) is None


# ---------------------------------------------------------------------------------- failures


def test_corrupt_pixel_data_raises_invalid_instance(corrupt_dicom: Path) -> None:
    with pytest.raises(InvalidInstance, match="pixel data cannot be decoded.*JPEG 2000"):
        load_dicom(corrupt_dicom)


def test_truncated_native_pixel_data(dicom_factory) -> None:
    path = dicom_factory(shape=SHAPE, seed=1)
    path.write_bytes(path.read_bytes()[:-5000])
    with pytest.raises(InvalidInstance, match="pixel data"):
        load_dicom(path)


def test_damaged_rle_raises_invalid_instance(dicom_factory) -> None:
    path = dicom_factory(shape=SHAPE, transfer_syntax=RLELossless, seed=1)
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(0)
    start = len(data) // 2
    data[start : start + 2000] = rng.integers(0, 256, 2000, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(InvalidInstance, match="RLE Lossless"):
        load_dicom(path)


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_stored_values_above_bit_0_are_shifted_down(dicom_factory, tmp_path: Path, signed: bool) -> None:
    # An old layout: 12 bits stored in bits 4..15 (High Bit 15), the 4 low bits holding something else.
    ds = pydicom.dcmread(dicom_factory(shape=SHAPE, seed=1))
    values = ds.pixel_array.astype(np.int64) - (2048 if signed else 0)
    ds.PixelRepresentation = int(signed)
    centre, width = full_window(12, intercept=-2048.0 if signed else 0.0)
    ds.WindowCenter, ds.WindowWidth = f"{centre:g}", f"{width:g}"
    _with_values(ds, values)
    reference = load_dicom(_reread(ds, tmp_path / "low_bits.dcm")).pixels
    assert np.abs(reference - phantom()).max() < 1e-3
    low_bits = np.random.default_rng(0).integers(0, 16, values.shape)
    words = (((values << 4) | low_bits) & 0xFFFF).astype(np.uint16)
    _with_values(ds, words.view(np.int16) if signed else words)
    ds.HighBit = 15
    shifted = _reread(ds, tmp_path / "high_bits.dcm")
    np.testing.assert_array_equal(load_dicom(shifted).pixels, reference)
    # the stored values kept for the GPU path are the shifted ones, and their table gives the same pixels
    image = load_dicom(shifted, allocate=lambda shape, dtype: np.empty(shape, dtype))
    assert image.stored is not None
    np.testing.assert_array_equal(image.stored.values, values)
    np.testing.assert_array_equal(image.stored.pixels(), reference)


def test_stored_values_above_bit_0_in_compressed_pixel_data_are_refused(dicom_factory) -> None:
    ds = pydicom.dcmread(dicom_factory(shape=SHAPE, transfer_syntax=RLELossless, seed=1))
    ds.HighBit = 15
    with pytest.raises(InvalidInstance, match=r"HighBit 15 with BitsStored 12 .*compressed pixel data \(RLE"):
        load_dicom(ds)


@pytest.mark.parametrize("high_bit", [7, 16])
def test_inconsistent_high_bit_is_ignored_and_logged(dicom_factory, caplog, high_bit: int) -> None:
    path = dicom_factory(shape=SHAPE, window=full_window(12), seed=1)
    ds = pydicom.dcmread(path)
    ds.HighBit = high_bit
    with caplog.at_level(logging.WARNING, logger="inference.imaging"):
        image = load_dicom(ds)
    np.testing.assert_array_equal(image.pixels, load_dicom(path).pixels)
    assert [r.getMessage() for r in caplog.records] == [
        f"invalid HighBit {high_bit} ignored (BitsStored 12, BitsAllocated 16)"
    ]


def test_not_dicom_and_no_pixels(tmp_path: Path, dicom_factory) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(InvalidInstance, match="not a readable DICOM"):
        load_dicom(text)
    with pytest.raises(InvalidInstance, match="neither DICOM nor"):
        load_any(text)
    ds = pydicom.dcmread(dicom_factory(shape=SHAPE, seed=1))
    del ds.PixelData
    with pytest.raises(InvalidInstance, match="no pixel data"):
        load_dicom(ds)
    ds = pydicom.dcmread(dicom_factory(shape=SHAPE, seed=1))
    ds.PhotometricInterpretation = "PALETTE COLOR"
    with pytest.raises(InvalidInstance, match="PALETTE COLOR"):
        load_dicom(ds)
    with pytest.raises(TypeError, match='"source"'):
        load_dicom(42)  # type: ignore[arg-type]


@pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning")
def test_invalid_optional_header_values_do_not_stop_decoding(dicom_factory, caplog) -> None:
    path = dicom_factory(shape=SHAPE, window=full_window(12), seed=1)
    ds = pydicom.dcmread(path)
    bad = {
        0x00280030: ("DS", b"abc\\def"),  # Pixel Spacing
        0x00185101: ("CS", b"\xff\xfe??"),  # View Position
        0x00281052: ("DS", b"zero"),  # Rescale Intercept
        0x00281053: ("DS", b"1..0"),  # Rescale Slope
        0x00280008: ("IS", b"one"),  # Number of Frames
    }
    for tag, (vr, value) in bad.items():
        ds[Tag(tag)] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
    ds.save_as(path, enforce_file_format=True)
    with caplog.at_level(logging.WARNING, logger="inference.imaging"):
        image = load_dicom(path)
    assert np.abs(image.pixels - phantom()).max() < 1e-3
    assert image.meta["pixel_spacing"] is None
    assert any(getattr(r, "action", "") == "dicom_header_invalid" for r in caplog.records)
    assert header_reason(image) is None


def test_header_elements_of_an_unknown_value_representation_are_ignored(dicom_factory, caplog) -> None:
    ds = pydicom.dcmread(dicom_factory(shape=SHAPE, seed=1))
    for tag in (0x0008103E, 0x00185101):  # Series Description, View Position: damaged on the way
        ds[Tag(tag)] = RawDataElement(Tag(tag), "ZZ", 3, b"ABC", 0, False, True)
    image = load_dicom(ds)
    assert image.meta["view_position"] == "" and image.meta["view_hints"] == ""
    assert np.abs(image.pixels - load_dicom(dicom_factory(shape=SHAPE, seed=1)).pixels).max() == 0
    assert any(getattr(r, "action", "") == "dicom_header_invalid" for r in caplog.records)


@pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning")
def test_invalid_window_falls_back_to_percentiles(dicom_factory) -> None:
    ds = pydicom.dcmread(dicom_factory(shape=SHAPE, window=(100, 200), seed=1))
    ds[Tag(0x00281051)] = RawDataElement(Tag(0x00281051), "DS", 4, b"wide", 0, False, True)
    image = load_dicom(ds)
    assert image.pixels.min() == 0.0 and image.pixels.max() == 1.0
    assert np.corrcoef(image.pixels.ravel(), phantom().ravel())[0, 1] > 0.99


def test_meta_contract(synthetic_cr: Path) -> None:
    image = load_dicom(synthetic_cr)
    ds = pydicom.dcmread(synthetic_cr)
    assert image.source == str(synthetic_cr)
    assert image.meta["modality"] == "CR" and image.meta["body_part"] == "CHEST"
    assert image.meta["view_position"] == "PA"
    assert image.meta["sop_instance_uid"] == ds.SOPInstanceUID
    assert image.meta["study_instance_uid"] == ds.StudyInstanceUID
    assert (image.meta["rows"], image.meta["columns"]) == (512, 512)
    assert image.meta["photometric"] == "MONOCHROME2"
    assert image.meta["pixel_spacing"] == pytest.approx((430 / 512, 430 / 512), rel=1e-3)
    assert image.meta["patient_orientation"] == "L\\F"
    assert image.meta["image_laterality"] == ""  # a CR phantom has no Image Laterality
    by_dataset = load_dicom(ds)
    assert by_dataset.source == ds.SOPInstanceUID
    np.testing.assert_array_equal(by_dataset.pixels, image.pixels)
    ds.ImageLaterality = "R"
    assert load_dicom(ds).meta["image_laterality"] == "R"


# ---------------------------------------------------------------------------------- image files


def test_png_8_and_16_bit_and_colour(phantom_png_factory) -> None:
    ref = make_phantom((300, 400), seed=2)[0]
    grey8 = load_image_file(phantom_png_factory("g8.png", shape=(300, 400), seed=2))
    assert grey8.pixels.dtype == np.float32 and grey8.pixels.shape == (300, 400)
    assert np.abs(grey8.pixels - ref).max() <= 0.5 / 255 + 1e-6
    grey16 = load_image_file(phantom_png_factory("g16.png", shape=(300, 400), seed=2, bits=16))
    expected16 = (ref - ref.min()) / (ref.max() - ref.min())  # 16-bit: min..max
    assert np.abs(grey16.pixels - expected16).max() < 1e-3
    rgb = load_image_file(phantom_png_factory("rgb.png", shape=(300, 400), seed=2, mode="RGB"))
    np.testing.assert_allclose(rgb.pixels, grey8.pixels, atol=1.5 / 255)
    rgba = load_image_file(phantom_png_factory("rgba.png", shape=(300, 400), seed=2, mode="RGBA"))
    np.testing.assert_allclose(rgba.pixels, grey8.pixels, atol=1.5 / 255)
    assert grey8.meta["format"] == "PNG" and grey8.meta["modality"] == ""
    assert header_reason(grey8) is None


def test_transparent_pixels_flatten_on_black(tmp_path: Path) -> None:
    rgba = np.zeros((300, 300, 4), dtype=np.uint8)
    rgba[..., :3] = 200
    rgba[:150, :, 3] = 255  # top half opaque, bottom half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    image = load_image_file(tmp_path / "alpha.png")
    assert image.pixels[:150].min() == pytest.approx(200 / 255, abs=1 / 255)
    assert image.pixels[150:].max() == 0.0


def test_jpeg_and_load_any_detects_content(tmp_path: Path, synthetic_cr: Path) -> None:
    ref = make_phantom((320, 256), seed=3)[0]
    jpg = tmp_path / "chest.jpeg"
    Image.fromarray(np.rint(ref * 255).astype(np.uint8)).convert("RGB").save(jpg, quality=95)
    image = load_image_file(jpg)
    assert image.meta["format"] == "JPEG"
    assert np.abs(image.pixels - ref).mean() < 0.01
    # Content decides, not the name.
    renamed = tmp_path / "chest.dcm"
    renamed.write_bytes(jpg.read_bytes())
    assert load_any(renamed).meta["format"] == "JPEG"
    dicom_named_png = tmp_path / "image.png"
    dicom_named_png.write_bytes(synthetic_cr.read_bytes())
    assert load_any(dicom_named_png).meta["modality"] == "CR"
    # A data set without file meta (no 'DICM' prefix) is still recognised.
    ds = pydicom.dcmread(synthetic_cr)
    bare = tmp_path / "bare"
    del ds.file_meta
    ds.preamble = None
    ds.save_as(bare, implicit_vr=True, little_endian=True)
    assert bare.read_bytes()[128:132] != b"DICM"
    loaded = load_any(bare)
    assert loaded.meta["sop_instance_uid"] == ds.SOPInstanceUID and loaded.source == str(bare)


def test_a_large_file_that_is_no_image_is_refused_without_being_parsed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """predict tries every file of a folder: parsing a disk image or a video 'by force' as DICOM read all of
    it into memory (a 100 MB file took 36 s). A file that does not begin like a DICOM data set is refused at
    once."""
    big = tmp_path / "backup.img"
    with big.open("wb") as fh:
        fh.truncate(64 * 2**20)
    def refuse(*args: object, **kwargs: object) -> None:
        pytest.fail("the file was parsed as DICOM")

    monkeypatch.setattr(pydicom, "dcmread", refuse)
    with pytest.raises(InvalidInstance, match="neither DICOM nor a readable image"):
        load_any(big)


def test_unreadable_image_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    with pytest.raises(InvalidInstance, match="broken.png"):
        load_image_file(broken)
    with pytest.raises(InvalidInstance):
        load_any(tmp_path / "missing.png")


# ---------------------------------------------------------------------------------- header reasons


def image_with(**meta: object) -> XrayImage:
    base = {"modality": "CR", "body_part": "CHEST", "view_position": "PA", "patient_orientation": "L\\F"}
    base.update(meta)
    return XrayImage(pixels=np.zeros((512, 512), dtype=np.float32), source="test", meta=base)


@pytest.mark.parametrize(
    ("meta", "expected"),
    [
        ({}, None),
        ({"body_part": ""}, None),
        ({"body_part": "THORAX"}, None),
        ({"body_part": "LUNG"}, None),
        ({"body_part": "TORAX"}, None),
        ({"body_part": "CHEST_PA"}, None),
        ({"view_position": "AP"}, None),
        ({"view_position": "", "patient_orientation": ""}, None),
        ({"modality": "DX"}, None),
        ({"modality": ""}, None),
        ({"modality": "CT"}, ("not_xray", "Modality is CT, not CR or DX")),
        ({"modality": "MG"}, ("not_xray", "Modality is MG, not CR or DX")),
        ({"body_part": "HAND"}, ("not_chest", "BodyPartExamined is HAND, not CHEST")),
        ({"body_part": "EXTREMITY"}, ("not_chest", "BodyPartExamined is EXTREMITY, not CHEST")),
        ({"view_position": "LL"}, ("lateral", "lateral view (ViewPosition LL)")),
        ({"view_position": "RL"}, ("lateral", "lateral view (ViewPosition RL)")),
        ({"view_position": "LATERAL"}, ("lateral", "lateral view (ViewPosition LATERAL)")),
        ({"view_position": "LLD"}, ("lateral", "lateral decubitus view (ViewPosition LLD)")),
        ({"view_position": "RLO"}, ("lateral", "oblique view (ViewPosition RLO)")),
        ({"view_position": "", "patient_orientation": "A\\F"},
         ("lateral", "lateral view (PatientOrientation A\\F)")),
        ({"view_position": "", "patient_orientation": "P\\FR"},
         ("lateral", "lateral view (PatientOrientation P\\FR)")),
        ({"view_position": "", "patient_orientation": "F\\A"},  # a lateral stored on its side
         ("lateral", "lateral view (PatientOrientation F\\A)")),
        ({"view_position": "", "patient_orientation": "H\\L"}, None),  # a frontal stored on its side
        ({"view_position": "PA", "patient_orientation": "A\\F"}, None),
        ({"view_position": "", "view_hints": "CHEST LAT"},
         ("lateral", "lateral view (description: CHEST LAT)")),
        ({"view_position": "", "view_hints": "CHEST PA + LAT"}, None),
        ({"species": "Canis lupus familiaris"},
         ("not_chest", "non-human subject (PatientSpeciesDescription Canis lupus familiaris)")),
        ({"view_hints": "CANINE THORAX"},
         ("not_chest", "veterinary image (CANINE in the protocol or series description)")),
        ({"age_years": 12.0, "age_source": "PatientAge"},
         ("child", "patient aged 12 years (from PatientAge); the model was trained on adults (at least 18 "
                   "years) only")),
        ({"age_years": 0.5, "age_source": "PatientBirthDate and StudyDate"},
         ("child", "patient aged 0.5 years (from PatientBirthDate and StudyDate); the model was trained on "
                   "adults (at least 18 years) only")),
        ({"age_years": 18.0, "age_source": "PatientAge"}, None),
        ({"age_years": None, "age_source": ""}, None),
        ({"age_years": 9.0, "body_part": "HAND"}, ("not_chest", "BodyPartExamined is HAND, not CHEST")),
        ({"age_years": 9.0, "age_source": "x", "view_position": "LL"}, ("child", "patient aged 9 years (from "
                                                                       "x); the model was trained on adults "
                                                                       "(at least 18 years) only")),
    ],
)  # fmt: skip
def test_header_reasons(meta: dict, expected: tuple[str, str] | None) -> None:
    assert header_reason(image_with(**meta)) == expected


@pytest.mark.parametrize(
    ("header", "age"),
    [
        ({"PatientAge": "045Y"}, (45.0, "PatientAge")),
        ({"PatientAge": "017Y"}, (17.0, "PatientAge")),
        ({"PatientAge": "030M"}, (2.5, "PatientAge")),
        ({"PatientAge": "026W"}, (26 * 7 / 365.25, "PatientAge")),
        ({"PatientAge": "100D"}, (100 / 365.25, "PatientAge")),
        # Patient Age wins over the dates; the study was on 2024-01-15 (make_dicom)
        ({"PatientAge": "040Y", "PatientBirthDate": "20200101"}, (40.0, "PatientAge")),
        ({"PatientBirthDate": "20060116"}, (17.0, "PatientBirthDate and StudyDate")),
        ({"PatientBirthDate": "20060115"}, (18.0, "PatientBirthDate and StudyDate")),
        ({"PatientBirthDate": "20060115", "StudyDate": ""},
         (18.0, "PatientBirthDate and AcquisitionDate")),
        ({}, (None, "")),
        ({"PatientAge": "12"}, (None, "")),  # invalid (not nnnY): ignored, and no birth date
        ({"PatientAge": "12", "PatientBirthDate": "19800301"},
         (43.0, "PatientBirthDate and StudyDate")),
        ({"PatientBirthDate": "1970-01-01"}, (None, "")),
        ({"PatientBirthDate": "20250101"}, (None, "")),  # born after the study: ignored
    ],
)  # fmt: skip
@pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning")
def test_age_at_the_examination_from_the_header(header: dict, age: tuple) -> None:
    meta = load_dicom(make_dicom(shape=(64, 64), **header)).meta
    assert meta["age_years"] == (pytest.approx(age[0]) if age[0] is not None else None)
    assert meta["age_source"] == age[1]


def test_too_small_and_order() -> None:
    small = XrayImage(pixels=np.zeros((100, 120), dtype=np.float32), source="s", meta={"modality": "CR"})
    assert header_reason(small) == (
        "too_small",
        "image is 120x100 px; at least 256 px needed on the short side",
    )
    assert header_reason(small, min_size=64) is None
    assert header_reason(XrayImage(np.zeros((256, 1000), np.float32), "s")) is None
    assert header_reason(XrayImage(np.zeros((256, 4000), np.float32), "s"))[0] == "not_chest"  # a strip
    # The header's verdict comes before size.
    tiny_hand = XrayImage(np.zeros((10, 10), np.float32), "s", {"body_part": "HAND"})
    assert header_reason(tiny_hand)[0] == "not_chest"
    with pytest.raises(TypeError, match='"image"'):
        header_reason(np.zeros((10, 10)))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match='"min_size"'):
        header_reason(small, min_size=0)


def test_header_reasons_from_files(synthetic_cr, synthetic_lateral, synthetic_hand, dicom_factory) -> None:
    assert header_reason(load_dicom(synthetic_cr)) is None
    assert header_reason(load_dicom(synthetic_lateral)) == ("lateral", "lateral view (ViewPosition LL)")
    assert header_reason(load_dicom(synthetic_hand))[0] == "not_chest"
    orientation = dicom_factory(view_position="", PatientOrientation=["A", "F"])
    assert header_reason(load_dicom(orientation))[0] == "lateral"
    small = dicom_factory(shape=(200, 180))
    assert header_reason(load_dicom(small)) == (
        "too_small",
        "image is 180x200 px; at least 256 px needed on the short side",
    )


def test_mixed_inputs_fixture_through_load_any(mixed_inputs: Path) -> None:
    expected = {
        "cr_clear.dcm": None,
        "sub/cr_opacity.dcm": None,
        "dx_mono1.dcm": None,
        "lateral.dcm": "lateral",
        "hand.dcm": "not_chest",
        "small.dcm": "too_small",
        "chest.png": None,
        "sub/chest16.png": None,
        "chest.jpg": None,
    }
    found = sorted(p.relative_to(mixed_inputs).as_posix() for p in mixed_inputs.rglob("*") if p.is_file())
    assert found == sorted([*expected, "corrupt.dcm", "notes.txt"])
    for name, code in expected.items():
        reason = header_reason(load_any(mixed_inputs / name))
        assert (reason[0] if reason else None) == code, name
    for name in ("corrupt.dcm", "notes.txt"):
        with pytest.raises(InvalidInstance, match=name):
            load_any(mixed_inputs / name)


def test_an_image_claiming_more_than_max_pixels_is_not_decoded() -> None:
    """A few kilobytes can claim 65535 x 65535 pixels: the header is checked before any decoder runs."""
    from dicom_node.errors import InvalidInstance
    from inference.imaging import MAX_PIXELS

    ds = make_dicom(shape=(128, 128))
    ds.Rows, ds.Columns = 65535, 65535
    assert 65535 * 65535 > MAX_PIXELS
    with pytest.raises(InvalidInstance, match="image of 65535x65535 pixels is larger than the 64 megapixels"):
        load_dicom(ds)
