"""Radiographs in, model-ready arrays out: decoding, header checks and the preprocessing shared by all.

Decoding (``load_dicom``, ``load_image_file``, ``load_any``) gives an ``XrayImage`` whose pixels are
float32 in [0, 1] displayed the usual way (bright bone, dark air):

* DICOM: Modality LUT (Rescale Slope/Intercept or a Modality LUT Sequence), then the VOI transform (a VOI LUT
  Sequence when present, else the first Window Center/Width with its VOI LUT Function, else the 0.5th..99.5th
  percentile of the modality values), then MONOCHROME1 is inverted. Pixels at the Pixel Padding Value (or in
  its range up to the Pixel Padding Range Limit) are the film's padding, not anatomy: they are left out of
  the percentile range and shown black, as the training images' padding is, whatever the photometric
  interpretation; so are the pixels a Display Shutter (rectangular, circular, polygonal) hides. A frontal
  image stored mirrored, upside down or turned by 90 degrees (Patient Orientation R\\F, L\\H, F\\L, ...) is
  turned to the way chest films are read and the model was trained, the patient's left on the viewer's right
  and the head up (L\\F); ``meta`` records the original (``source_orientation``). Every
  transfer syntax pydicom can decode with the installed plugins (uncompressed, deflated, JPEG
  baseline/extended/lossless, JPEG-LS, JPEG 2000, HTJ2K, RLE). Multi-frame: the first frame. RGB/YBR:
  converted to grey (ITU-R 601 luma). Stored values above bit 0 (High Bit above Bits Stored - 1, an old
  layout) are shifted down when uncompressed; compressed, they are refused (``InvalidInstance``).
* PNG/JPEG: 8-bit greyscale divided by 255; 16-bit and float images scaled min..max; colour converted to grey
  after flattening any alpha channel on black. Like DICOM, an image of more than MAX_PIXELS is refused before
  it is decoded.

Invalid optional header values (Pixel Spacing, View Position, window values...) never stop decoding: they
are ignored, logged, and the next rule applies. Undecodable pixel data raises ``InvalidInstance`` naming what
failed.

The preprocessing shared by training and inference (``square_resize``, ``lung_crop``, ``centre_crop``,
``postprocess_mask``, ``resize_mask`` and their inverses) lives in ``inference.preprocess`` and is re-exported
here.
"""

from __future__ import annotations

import copy
import datetime as _dt
import functools
import logging
import math
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError
from pydicom import Dataset, FileMetaDataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.pixels import apply_modality_lut
from pydicom.pixels import pixel_array as _pixel_array
from pydicom.uid import (
    UID,
    DigitalXRayImageStorageForProcessing,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from dicom_node.errors import InvalidInstance
from inference import j2k
from inference.preprocess import (
    PAD_VALUE,
    centre_box,
    centre_crop,
    lung_box,
    lung_crop,
    postprocess_mask,
    resize_mask,
    square_region,
    square_resize,
    uncrop,
    unsquare,
)
from inference.types import StoredValues, XrayImage

__all__ = [
    "MAX_ASPECT",
    "MAX_PIXELS",
    "MIN_SIZE",
    "PAD_VALUE",
    "centre_box",
    "centre_crop",
    "header_reason",
    "load_any",
    "load_dicom",
    "load_image_file",
    "lung_box",
    "lung_crop",
    "postprocess_mask",
    "resize_mask",
    "square_region",
    "square_resize",
    "uncrop",
    "unsquare",
]

logger = logging.getLogger(__name__)

Allocator = Callable[[tuple[int, int], np.dtype], "np.ndarray | None"]
"""Gives the array of a shape and dtype that a decoder writes into (e.g. ``Pipeline.host_array``), or None
when the caller has no use for that dtype. A greyscale instance's decoder first asks for its stored integer
values (one of STORED_DTYPES): an array given receives them, and the image keeps them with the table that
gives its pixels (``XrayImage.stored``); the pixels then go to ordinary memory. Otherwise it asks for float32,
and the pixels are written there."""

STORED_DTYPES = frozenset(np.dtype(t) for t in (np.uint8, np.int8, np.uint16, np.int16))

MIN_SIZE = 256  # shortest side, in pixels, below which header_reason says "too_small"
# Rows x Columns above which an image is refused before decoding: a chest film is under 20 megapixels, and a
# few kilobytes of JPEG-LS can claim 65535 x 65535 (gigabytes once decoded)
MAX_PIXELS = 64 * 2**20
# Long side / short side above which header_reason says "not_chest": chest films are at most 1.3:1 (35x43 cm,
# 14x17 in), the most elongated image of the public training data (a figure panel) is 2.24:1, and 4:1 leaves
# room for any cropped chest film; longer strips are other images (a spine or leg long-length image, a scan
# of a strip), and the square they are padded to would hold mostly padding
MAX_ASPECT = 4.0
ADULT_AGE = 18  # years; the models were trained on adults' films (children's were excluded from the data)
PERCENTILES = (0.5, 99.5)  # VOI fallback when the header has neither a VOI LUT nor a window

XRAY_MODALITIES = frozenset({"CR", "DX"})
CHEST_WORDS = frozenset(
    {"CHEST", "THORAX", "THORACIC", "LUNG", "LUNGS", "TORAX", "TORACE", "THORAKS", "PECHO", "BRUST",
     "POUMON", "POUMONS", "PULMON", "THX", "CXR"}
)
LATERAL_VIEWS = {
    "LL": "lateral", "RL": "lateral", "LATERAL": "lateral", "LAT": "lateral",
    "LLD": "lateral decubitus", "RLD": "lateral decubitus",
    "LLO": "oblique", "RLO": "oblique", "LAO": "oblique",
    "RAO": "oblique", "LPO": "oblique", "RPO": "oblique",
}
FRONTAL_VIEWS = frozenset({"PA", "AP", "APS", "APE", "PAE"})
_LATERAL_HINT = re.compile(r"\b(LAT|LATERAL|LATERALE|SEITLICH|LATERO[- ]?MEDIAL|OBLIQUE)\b", re.IGNORECASE)
_FRONTAL_HINT = re.compile(r"\b(PA|AP|FRONTAL|POSTERO[- ]?ANTERIOR|ANTERO[- ]?POSTERIOR)\b", re.IGNORECASE)
_ANIMAL_HINT = re.compile(
    r"\b(CANINE|FELINE|EQUINE|BOVINE|PORCINE|OVINE|VETERINAR\w*|DOG|CAT|HORSE)\b", re.IGNORECASE
)
_HUMAN_SPECIES = frozenset({"", "HUMAN", "HOMO SAPIENS", "HOMO SAPIENS SAPIENS"})


# --------------------------------------------------------------------------------------------- header values


def _text(ds: Dataset, keyword: str) -> str:
    """A header value as stripped text; '' when absent or unreadable (multi-valued: joined with '\\')."""
    try:
        value = ds.get(keyword)
    # NotImplementedError: an element whose value representation pydicom does not know (a damaged header)
    except (ValueError, TypeError, KeyError, UnicodeDecodeError, OverflowError, NotImplementedError) as exc:
        logger.warning("unreadable %s ignored: %s", keyword, exc, extra={"action": "dicom_header_invalid"})
        return ""
    if value is None:
        return ""
    if isinstance(value, list | tuple | pydicom.multival.MultiValue):
        return "\\".join(str(v).strip() for v in value)
    return str(value).strip()


def _numbers(ds: Dataset, keyword: str) -> list[float] | None:
    """Finite numbers of a DS/IS/US attribute; None when absent, empty or not all numeric."""
    raw = _text(ds, keyword)
    if not raw:
        return None
    try:
        values = [float(v) for v in raw.split("\\")]
    except ValueError:
        logger.warning("invalid %s %r ignored", keyword, raw[:64], extra={"action": "dicom_header_invalid"})
        return None
    if not values or not all(math.isfinite(v) for v in values):
        logger.warning("invalid %s %r ignored", keyword, raw[:64], extra={"action": "dicom_header_invalid"})
        return None
    return values


def _pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        values = _numbers(ds, keyword)
        if values is not None and len(values) == 2 and all(v > 0 for v in values):
            return (values[0], values[1])
    return None


_AGE = re.compile(r"^(\d{3})([DWMY])$")
_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


def _date(ds: Dataset, keyword: str) -> _dt.date | None:
    raw = _text(ds, keyword)
    if not raw:
        return None
    try:
        return _dt.datetime.strptime(raw[:8], "%Y%m%d").date()
    except ValueError:  # the value stays out of the log: a birth date identifies a patient
        logger.warning("invalid %s ignored (%d characters, not YYYYMMDD)", keyword, len(raw),
                       extra={"action": "dicom_header_invalid"})
        return None


def _age(ds: Dataset) -> tuple[float, str] | None:
    """The patient's age in years at the examination, and where it comes from: Patient Age (nnnD/W/M/Y),
    else Patient Birth Date and the first of Study, Acquisition, Content or Series Date. None when unknown
    (invalid values are logged and ignored)."""
    raw = _text(ds, "PatientAge").upper()
    if raw:
        match = _AGE.match(raw)
        if match:
            return int(match.group(1)) * _AGE_UNIT_YEARS[match.group(2)], "PatientAge"
        logger.warning("invalid PatientAge ignored (not nnnD/W/M/Y)",
                       extra={"action": "dicom_header_invalid"})
    birth = _date(ds, "PatientBirthDate")
    if birth is None:
        return None
    for keyword in ("StudyDate", "AcquisitionDate", "ContentDate", "SeriesDate"):
        taken = _date(ds, keyword)
        if taken is not None:
            if taken < birth:
                logger.warning("PatientBirthDate after %s ignored", keyword,
                               extra={"action": "dicom_header_invalid"})
                return None
            years = taken.year - birth.year - ((taken.month, taken.day) < (birth.month, birth.day))
            return float(years), f"PatientBirthDate and {keyword}"
    return None


def _code_meanings(ds: Dataset, keyword: str) -> list[str]:
    try:
        return [str(item.get("CodeMeaning", "")) for item in ds.get(keyword) or []]
    except (TypeError, AttributeError, ValueError, KeyError, NotImplementedError):
        return []


def _meta(ds: Dataset) -> dict[str, Any]:
    """Header values the callers need, read defensively (see the contract in the module docstring)."""
    age = _age(ds)
    view_hints = [
        _text(ds, "SeriesDescription"),
        _text(ds, "ProtocolName"),
        _text(ds, "AcquisitionDeviceProcessingDescription"),
        *_code_meanings(ds, "ViewCodeSequence"),
        *_code_meanings(ds, "PerformedProtocolCodeSequence"),
    ]
    return {
        "modality": _text(ds, "Modality").upper(),
        "body_part": _text(ds, "BodyPartExamined").upper(),
        "view_position": _text(ds, "ViewPosition").upper(),
        "sop_instance_uid": _text(ds, "SOPInstanceUID"),
        "sop_class_uid": _text(ds, "SOPClassUID"),
        "study_instance_uid": _text(ds, "StudyInstanceUID"),
        "series_instance_uid": _text(ds, "SeriesInstanceUID"),
        "rows": int((_numbers(ds, "Rows") or [0])[0]),
        "columns": int((_numbers(ds, "Columns") or [0])[0]),
        "photometric": _text(ds, "PhotometricInterpretation").upper(),
        "pixel_spacing": _pixel_spacing(ds),
        "image_laterality": _text(ds, "ImageLaterality").upper(),
        "patient_orientation": _text(ds, "PatientOrientation").upper(),
        "species": _text(ds, "PatientSpeciesDescription"),
        "age_years": None if age is None else age[0],
        "age_source": "" if age is None else age[1],
        "view_hints": " | ".join(h for h in view_hints if h),
        "transfer_syntax": str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or ""),
        "for_processing": (_text(ds, "SOPClassUID") == DigitalXRayImageStorageForProcessing
                           or _text(ds, "PresentationIntentType").upper() == "FOR PROCESSING"),
    }


# --------------------------------------------------------------------------------------------- DICOM decoding


def _read(source: str | Path | Dataset) -> Dataset:
    if isinstance(source, Dataset):
        return source
    if not isinstance(source, str | Path):
        raise TypeError('Argument "source" must be a path or a pydicom Dataset.')
    try:
        return pydicom.dcmread(source)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError, NotImplementedError,
            BytesLengthException) as exc:
        raise InvalidInstance(f"{source}: not a readable DICOM file ({exc})") from exc


def _ensure_transfer_syntax(ds: Dataset) -> None:
    """Give a data set read without file meta the transfer syntax it was read with (needed to decode)."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None:
        return
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    if implicit:
        meta.TransferSyntaxUID = ImplicitVRLittleEndian
    else:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _window(arr: np.ndarray, ds: Dataset, dest: np.ndarray | None = None) -> np.ndarray | None:
    """Window Center/Width (first pair) with its VOI LUT Function, to [0, 1]; None when absent or invalid.

    ``dest`` (float32, the image's shape) receives the result when given; the last pass writes it there.
    """
    centres, widths = _numbers(ds, "WindowCenter"), _numbers(ds, "WindowWidth")
    if not centres or not widths:
        return None
    c, w = centres[0], widths[0]
    function = _text(ds, "VOILUTFunction").upper().split("\\")[0] or "LINEAR"
    if function == "SIGMOID":
        if w <= 0:
            return None
        out = 1.0 / (1.0 + np.exp(np.float32(-4.0 / w) * (arr - np.float32(c))))
    elif function == "LINEAR_EXACT":
        if w <= 0:
            return None
        out = (arr - np.float32(c)) * np.float32(1.0 / w) + np.float32(0.5)
    else:  # LINEAR (PS3.3 C.11.2.1.2.1), also for unknown functions
        if w < 1:
            return None
        if w == 1:
            return _into(dest, (arr >= c).astype(np.float32))
        out = (arr - np.float32(c - 0.5)) * np.float32(1.0 / (w - 1)) + np.float32(0.5)
    return np.clip(out, 0.0, 1.0, out=out if dest is None else dest).astype(np.float32, copy=False)


def _into(dest: np.ndarray | None, values: np.ndarray) -> np.ndarray:
    """``values``, copied into ``dest`` when one is given."""
    if dest is None:
        return values
    np.copyto(dest, values)
    return dest


class _InvalidLUT(ValueError):
    """A VOI LUT that cannot be applied; the message names the problem briefly, never the LUT's data."""


def _transfer_syntax(ds: Dataset) -> UID | None:
    """The file meta's Transfer Syntax UID when it names a known one, else None."""
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if not syntax or not UID(str(syntax)).is_transfer_syntax:
        return None
    return UID(str(syntax))


def _little_endian(ds: Dataset) -> bool | None:
    """The byte order of the data set's OW values: its transfer syntax, else the encoding it was read with
    (as pydicom's own ``apply_voi_lut`` decides); None when neither tells."""
    syntax = _transfer_syntax(ds)
    if syntax is not None:
        return bool(syntax.is_little_endian)
    little = getattr(ds, "original_encoding", (None, None))[1]
    return None if little is None else bool(little)


def _voi_table(ds: Dataset) -> tuple[int, np.ndarray]:
    """The first VOI LUT Sequence item as (first mapped input value, entries as float64), read per PS3.3
    C.11.2.1.1: a LUT Descriptor count of 0 means 65536 entries; the first mapped value is signed when the
    image is (a negative value written with VR US reads as 65536 more); LUT Data is a list of US values or OW
    bytes, 16-bit words in the data set's byte order (8-bit entries too, one per word). Raises _InvalidLUT
    (or a pydicom error for an unreadable element)."""
    item = ds.VOILUTSequence[0]
    descriptor = item.get("LUTDescriptor")
    values = [] if descriptor is None else [descriptor] if isinstance(descriptor, int) else list(descriptor)
    if len(values) != 3 or not all(isinstance(v, int) for v in values):
        raise _InvalidLUT("LUT Descriptor is not three integers")
    count = (values[0] & 0xFFFF) or 1 << 16  # the count is US even when the element was written as SS
    first = values[1]
    if first > 32767 and (_numbers(ds, "PixelRepresentation") or [0])[0] == 1:
        first -= 1 << 16  # SS written as US: two's complement
    if "LUTData" not in item:
        raise _InvalidLUT("LUT Data is missing")
    data = item["LUTData"].value
    if isinstance(data, bytes | bytearray | memoryview):
        little = _little_endian(ds)
        if little is None:
            raise _InvalidLUT("LUT Data is OW and the data set's byte order is unknown")
        entries = np.frombuffer(data, dtype="<u2" if little else ">u2", count=len(data) // 2)
    elif isinstance(data, int):
        entries = np.asarray([data])
    else:
        entries = np.asarray(list(data or []))
        if entries.size and not np.issubdtype(entries.dtype, np.integer):
            raise _InvalidLUT("LUT Data values are not integers")
    if entries.size < count:
        raise _InvalidLUT(f"LUT Data has {entries.size} entries, its LUT Descriptor says {count}")
    return first, entries[:count].astype(np.float64)


def _voi_lut(arr: np.ndarray, ds: Dataset, dest: np.ndarray | None = None) -> np.ndarray | None:
    """The first VOI LUT Sequence item, scaled so the LUT's lowest..highest output is 0..1 (into ``dest``).

    Modality values are rounded to the LUT's integer inputs; those below the first mapped value give the
    first entry, those past the last the last entry. None when there is no VOI LUT, or it is invalid (logged)
    or constant.
    """
    if "VOILUTSequence" not in ds or not ds.VOILUTSequence:
        return None
    try:
        first, entries = _voi_table(ds)
    except _InvalidLUT as exc:
        logger.warning("invalid VOI LUT Sequence ignored: %s", exc, extra={"action": "dicom_header_invalid"})
        return None
    # pydicom's messages for an unreadable element may quote its value: only its type is logged
    except (ValueError, TypeError, AttributeError, KeyError, IndexError, OverflowError,
            NotImplementedError) as exc:
        logger.warning("invalid VOI LUT Sequence ignored: unreadable (%s)", type(exc).__name__,
                       extra={"action": "dicom_header_invalid"})
        return None
    low, high = float(entries.min()), float(entries.max())
    if high <= low:
        return None
    # the same float32 arithmetic as scaling each looked-up value
    table = (entries.astype(np.float32) - np.float32(low)) / np.float32(high - low)
    np.clip(table, 0.0, 1.0, out=table)
    # Clipped to the mapped inputs before the cast, so any modality value gives an index in the table.
    index = np.clip(arr, np.float32(first), np.float32(first + len(table) - 1), dtype=np.float32)
    np.rint(index, out=index)
    index -= np.float32(first)
    return np.take(table, index.astype(np.intp), out=dest, mode="clip")


def _percentile_range(arr: np.ndarray, keep: np.ndarray | None = None) -> tuple[float, float]:
    """The PERCENTILES range of an image (of its pixels where ``keep`` is true, when given), estimated on a
    strided subsample (at most ~65k pixels); its whole range when that is empty."""
    step = max(1, int(math.sqrt(arr.size / 65536)))
    sample = arr[::step, ::step]
    if keep is not None:
        sample = sample[keep[::step, ::step]]
        if sample.size == 0:
            sample = arr[keep]
    low, high = np.percentile(sample, PERCENTILES)
    if high <= low:
        values = arr if keep is None else arr[keep]
        low, high = float(values.min()), float(values.max())
    return float(low), float(high)


def _padding_range(ds: Dataset) -> tuple[int, int] | None:
    """The stored values that mark padding: Pixel Padding Value, up to Pixel Padding Range Limit when that is
    present (inclusive, either order; PS3.3 C.7.5.1.1.2); None when absent or invalid (logged)."""
    value = _one_integer(ds, "PixelPaddingValue")
    if value is None:
        return None
    limit = _one_integer(ds, "PixelPaddingRangeLimit")
    return (value, value) if limit is None else (min(value, limit), max(value, limit))


def _one_integer(ds: Dataset, keyword: str) -> int | None:
    """A single-valued integer attribute; None when absent, or when not one integer (logged)."""
    values = _numbers(ds, keyword)
    if values is None or (len(values) == 1 and values[0] == int(values[0])):
        return None if values is None else int(values[0])
    logger.warning("invalid %s %r ignored", keyword, values[:4], extra={"action": "dicom_header_invalid"})
    return None


def _scale(arr: np.ndarray, low: float, high: float, dest: np.ndarray | None = None) -> np.ndarray:
    """Scale ``low``..``high`` to [0, 1], clipped (into ``dest``); zeros when the range is empty."""
    if high <= low:
        return _into(dest, np.zeros(arr.shape, dtype=np.float32))
    out = (arr - np.float32(low)) * np.float32(1.0 / (high - low))
    return np.clip(out, 0.0, 1.0, out=out if dest is None else dest).astype(np.float32, copy=False)


def _modality_lut(stored: np.ndarray, ds: Dataset, *, warn: bool = True) -> np.ndarray:
    if "ModalityLUTSequence" in ds:
        try:
            return apply_modality_lut(stored, ds).astype(np.float32)
        except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
            if warn:
                logger.warning("invalid Modality LUT ignored: %s", exc,
                               extra={"action": "dicom_header_invalid"})
    arr = stored.astype(np.float32)
    slope, intercept = _numbers(ds, "RescaleSlope"), _numbers(ds, "RescaleIntercept")
    s = slope[0] if slope and slope[0] != 0 else 1.0
    b = intercept[0] if intercept else 0.0
    if s != 1.0:
        arr *= np.float32(s)
    if b != 0.0:
        arr += np.float32(b)
    return arr


def _describe(ds: Dataset) -> str:
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    name = getattr(ts, "name", str(ts)) if ts else "unknown transfer syntax"
    return (
        f"{name}, {_text(ds, 'Columns') or '?'}x{_text(ds, 'Rows') or '?'}, "
        f"{_text(ds, 'BitsStored') or '?'} bits stored, {_text(ds, 'PhotometricInterpretation') or '?'}"
    )


_FAST_J2K = j2k.register()


def _decode_first_frame(ds: Dataset, multiframe: bool) -> np.ndarray:
    """pydicom's decoding of the first frame; JPEG 2000 through the multi-threaded plugin when installed."""
    index = 0 if multiframe else None
    if _FAST_J2K and ds.file_meta.get("TransferSyntaxUID") in j2k.SYNTAXES:
        try:
            return _pixel_array(ds, index=index, decoding_plugin=j2k.PLUGIN)
        except (KeyboardInterrupt, SystemExit, MemoryError):
            raise
        except Exception as exc:  # noqa: BLE001 - any plugin failure: let pydicom's own decoders try
            logger.warning(
                "imagecodecs could not decode a JPEG 2000 frame (%s); trying pydicom's decoders",
                " ".join(str(exc).split())[:200],
                extra={"action": "j2k_fallback"},
            )
    return _pixel_array(ds, index=0) if multiframe else ds.pixel_array


def _high_bit_shift(ds: Dataset, label: str) -> int:
    """How far the stored values lie above bit 0: High Bit - (Bits Stored - 1), when that is above 0 and
    within Bits Allocated (an old layout, e.g. 12 bits stored in bits 4..15); 0 otherwise (an inconsistent
    High Bit is logged and ignored). Compressed pixel data in that layout raises InvalidInstance: whether
    its decoder gives the values shifted or not cannot be told."""
    if "PixelData" not in ds or "HighBit" not in ds:
        return 0
    stored, high, allocated = (_one_integer(ds, k) for k in ("BitsStored", "HighBit", "BitsAllocated"))
    if stored is None or high is None or allocated is None or high == stored - 1:
        return 0
    if not stored - 1 < high < allocated:
        logger.warning("invalid HighBit %d ignored (BitsStored %d, BitsAllocated %d)", high, stored,
                       allocated, extra={"action": "dicom_header_invalid"})
        return 0
    syntax = _transfer_syntax(ds)
    if syntax is None or syntax.is_encapsulated:
        raise InvalidInstance(
            f"{label}: HighBit {high} with BitsStored {stored} (stored values above bit 0) is not supported "
            f"for compressed pixel data ({_describe(ds)})"
        )
    return high - (stored - 1)


def _decode(ds: Dataset, label: str) -> np.ndarray:
    """Stored values of the first frame as an array (grey), or InvalidInstance naming what failed."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise InvalidInstance(f"{label}: no pixel data (absent, or the file is truncated)")
    try:
        rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    except (TypeError, ValueError):
        rows = cols = 0  # the decoder reports it
    if rows * cols > MAX_PIXELS:
        raise InvalidInstance(f"{label}: image of {cols}x{rows} pixels is larger than the "
                              f"{MAX_PIXELS // 2**20} megapixels decoded here")
    photometric = _text(ds, "PhotometricInterpretation").upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2", "RGB") and not photometric.startswith("YBR"):
        raise InvalidInstance(
            f"{label}: photometric interpretation {photometric or '(none)'} is not supported"
        )
    frames = _numbers(ds, "NumberOfFrames")
    if frames is None and "NumberOfFrames" in ds:
        # An unreadable frame count would stop pydicom's decoder: decode a copy without it (a deep one: a
        # shallow copy of a Dataset shares its elements, and the caller's data set would lose the attribute)
        ds = copy.deepcopy(ds)
        del ds.NumberOfFrames
    shift = _high_bit_shift(ds, label)
    try:
        if shift:  # pydicom keeps the low Bits Stored bits: decode the bits up to High Bit, then shift
            high_bit = int(ds.HighBit)
            arr = _pixel_array(ds, index=0 if frames and frames[0] > 1 else None, bits_stored=high_bit + 1)
        else:
            arr = _decode_first_frame(ds, multiframe=bool(frames and frames[0] > 1))
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    # Decoder plugins raise many types (RuntimeError, ValueError, struct.error, and Rust panics, which derive
    # from BaseException): all mean the pixel data is undecodable, and the original is chained.
    except BaseException as exc:  # noqa: BLE001
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise InvalidInstance(f"{label}: pixel data cannot be decoded ({_describe(ds)}): {detail}") from exc
    if shift:
        arr = arr >> shift  # an arithmetic shift: signed values keep their sign (their sign bit is High Bit)
    if arr.ndim == 3 and arr.shape[-1] == 3:
        arr = arr.astype(np.float32) @ np.asarray([0.299, 0.587, 0.114], dtype=np.float32)
    if arr.ndim != 2 or arr.size == 0:
        raise InvalidInstance(f"{label}: decoded pixel data has shape {arr.shape}, expected one 2-D frame")
    return arr


def _destination(
    allocate: Allocator | None, shape: tuple[int, int], dtype: np.dtype, *, optional: bool = False
) -> np.ndarray | None:
    """``allocate``'s array for ``shape`` and ``dtype``, checked; None without an allocator, or when an
    ``optional`` request is declined."""
    if allocate is None:
        return None
    dest = allocate(shape, dtype)
    if dest is None and optional:
        return None
    if not (isinstance(dest, np.ndarray) and dest.dtype == dtype and dest.shape == shape
            and dest.flags.c_contiguous and dest.flags.writeable):
        raise ValueError(
            f'Argument "allocate" must return a writable C-contiguous {dtype} array of shape {shape}'
            + (" or None." if optional else ".")
        )
    return dest


def _shutter(ds: Dataset, shape: tuple[int, int]) -> np.ndarray | None:
    """The pixels a Display Shutter (PS3.3 C.7.6.11) hides, True where hidden: those outside any of its
    rectangular, circular and polygonal shapes (positions 1-based, edges shown). None without a shutter, or
    when it is invalid or of another shape (logged), or hides nothing, or everything (logged)."""
    shapes = [s for s in _text(ds, "ShutterShape").upper().split("\\") if s]
    if not shapes:
        return None
    rows, cols = shape

    def values(keyword: str, count: int | None = None) -> list[int]:
        found = _numbers(ds, keyword)
        if found is None or (count is not None and len(found) != count) or any(v != int(v) for v in found):
            raise ValueError(f"{keyword} is missing or invalid")
        return [int(v) for v in found]

    visible = np.ones(shape, dtype=bool)
    try:
        for name in shapes:
            if name == "RECTANGULAR":
                left, right, upper, lower = (
                    values(f"Shutter{edge}", 1)[0]
                    for edge in ("LeftVerticalEdge", "RightVerticalEdge", "UpperHorizontalEdge",
                                 "LowerHorizontalEdge")
                )
                if left > right or upper > lower:
                    raise ValueError(f"rectangle {left}..{right} x {upper}..{lower} is empty")
                inside = np.zeros(shape, dtype=bool)
                inside[max(upper - 1, 0):max(lower, 0), max(left - 1, 0):max(right, 0)] = True
            elif name == "CIRCULAR":
                row, col = values("CenterOfCircularShutter", 2)
                radius = values("RadiusOfCircularShutter", 1)[0]
                y, x = np.ogrid[1:rows + 1, 1:cols + 1]
                inside = (y - row) ** 2 + (x - col) ** 2 <= radius**2
            elif name == "POLYGONAL":
                vertices = values("VerticesOfThePolygonalShutter")
                if len(vertices) < 6 or len(vertices) % 2:
                    raise ValueError("VerticesOfThePolygonalShutter needs at least three row/column pairs")
                canvas = Image.new("1", (cols, rows), 0)
                points = [(vertices[i + 1] - 1, vertices[i] - 1) for i in range(0, len(vertices), 2)]
                ImageDraw.Draw(canvas).polygon(points, fill=1, outline=1)
                inside = np.asarray(canvas, dtype=bool)
            else:
                raise ValueError(f"shape {name} is not supported")
            visible &= inside
    except ValueError as exc:
        logger.warning("Display Shutter ignored: %s", exc, extra={"action": "dicom_header_invalid"})
        return None
    if not visible.any():
        logger.warning("Display Shutter ignored: it hides the whole image",
                       extra={"action": "dicom_header_invalid"})
        return None
    return None if visible.all() else ~visible


def conventional_steps(orientation: str) -> tuple[bool, bool, bool] | None:
    """(transpose, flip rows, flip columns) that show a frontal image the way chest films are read: the
    patient's left on the viewer's right, the head up (Patient Orientation L\\F). None when it already is so,
    or the orientation is absent, oblique or not a frontal one (A or P in it: a lateral)."""
    parts = orientation.upper().split("\\")
    if len(parts) != 2:
        return None
    row, column = parts  # the directions of increasing column index and of increasing row index
    transpose = row in ("H", "F") and column in ("L", "R")
    if transpose:
        row, column = column, row
    if row not in ("L", "R") or column not in ("H", "F"):
        return None
    steps = (transpose, column == "H", row == "R")
    return steps if any(steps) else None


def _turn(pixels: np.ndarray, steps: tuple[bool, bool, bool], allocate: Allocator | None) -> np.ndarray:
    """``pixels`` turned by ``conventional_steps``'s steps, into ``allocate``'s array when one is given."""
    transpose, flip_rows, flip_columns = steps
    view = pixels.T if transpose else pixels
    view = view[::-1] if flip_rows else view
    view = view[:, ::-1] if flip_columns else view
    dest = _destination(allocate, (int(view.shape[0]), int(view.shape[1])), np.dtype(np.float32))
    if dest is None:
        return np.ascontiguousarray(view)
    np.copyto(dest, view)
    return dest


def _in_range(values: np.ndarray, bounds: tuple[int, int]) -> np.ndarray:
    return (values >= bounds[0]) & (values <= bounds[1])


def _grey_pixels(
    stored: np.ndarray, ds: Dataset, photometric: str, dest: np.ndarray | None,
    hidden: np.ndarray | None = None,
) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """Greyscale stored values -> pixels in [0, 1] (the last pass writes ``dest``): Modality LUT, then the VOI
    LUT, the window or the PERCENTILES range, inverted for MONOCHROME1 or an inverse presentation; padding
    (``_padding_range``) is left out of the PERCENTILES range and set to 0. The ``hidden`` pixels (a
    shutter's) are left out of the range too; the caller blanks them (the table does not know them).

    Also returns a function that maps other stored values exactly as these were mapped (the same branch, the
    same percentile range), elementwise: for a table of every stored level.
    """
    arr = _modality_lut(stored, ds)
    padding = _padding_range(ds)
    padded = None if padding is None else _in_range(stored, padding)
    if padded is not None and (padded.all() or not padded.any()):
        if padded.all():
            logger.warning("PixelPaddingValue ignored: every pixel is padding",
                           extra={"action": "dicom_header_invalid"})
        padding = padded = None
    unused = padded if hidden is None else hidden if padded is None else padded | hidden
    inverse = photometric == "MONOCHROME1" or (
        photometric == "MONOCHROME2" and _text(ds, "PresentationLUTShape").upper() == "INVERSE"
    )
    last = None if inverse else dest  # with an inversion, the inversion is the pass that writes ``dest``
    again: Callable[[np.ndarray], np.ndarray | None] = functools.partial(_voi_lut, ds=ds)
    voi = _voi_lut(arr, ds, last)
    if voi is None:
        voi, again = _window(arr, ds, last), functools.partial(_window, ds=ds)
    if voi is None:
        low, high = _percentile_range(arr, None if unused is None else ~unused)
        voi, again = _scale(arr, low, high, last), functools.partial(_scale, low=low, high=high)

    def same(values: np.ndarray) -> np.ndarray:
        out = again(_modality_lut(values, ds, warn=False))
        assert out is not None  # the header that mapped the image maps any values
        out = np.subtract(np.float32(1.0), out, dtype=np.float32) if inverse else out
        if padding is not None:
            out[_in_range(values, padding)] = 0.0
        return out

    pixels = np.subtract(np.float32(1.0), voi, out=dest, dtype=np.float32) if inverse else voi
    if padded is not None:
        pixels[padded] = 0.0
    return pixels, same


def _keep_stored(
    stored: np.ndarray, into: np.ndarray, same: Callable[[np.ndarray], np.ndarray]
) -> StoredValues:
    """Copy the stored values into ``into`` and tabulate ``same`` over their range."""
    np.copyto(into, stored)
    low, high = int(stored.min()), int(stored.max())
    levels = np.arange(low, high + 1, dtype=stored.dtype)[None, :]
    table = np.ascontiguousarray(same(levels)[0], dtype=np.float32)
    return StoredValues(values=into, table=table, low=low)


def load_dicom(source: str | Path | Dataset, *, allocate: Allocator | None = None) -> XrayImage:
    """Decode a CR/DX (or any single-frame greyscale) instance into an ``XrayImage``.

    ``source`` may be a file path or a dataset already read. ``XrayImage.source`` is the path, or the SOP
    Instance UID for a dataset. ``meta`` holds the contract keys (modality, body_part, view_position,
    sop_instance_uid, rows, columns, photometric, pixel_spacing, image_laterality, patient_orientation) plus
    sop_class_uid, study/series UIDs, species, age_years and age_source (the patient's age at the
    examination and the header values it comes from; None and '' when unknown), view_hints (descriptions
    that may name the view) and transfer_syntax; source_orientation when the image was turned. Raises
    ``InvalidInstance`` when the file is not DICOM or its pixels cannot be decoded.

    ``allocate`` (optional, :data:`Allocator`), e.g. ``Pipeline.host_array``, gives the memory the image is
    written into. The CUDA pipeline takes a greyscale instance's stored values (page-locked, so they are
    copied to the GPU as they are, 1 or 2 bytes a pixel) and looks its pixels up there in the table kept
    beside them (``XrayImage.stored``). Other images are written into its float32 array by the last step of
    the decoding, so they cost no extra copy, except an image that is turned (``conventional_steps``): it is
    copied there turned.
    """
    ds = _read(source)
    _ensure_transfer_syntax(ds)
    meta = _meta(ds)
    label = str(source) if not isinstance(source, Dataset) else (meta["sop_instance_uid"] or "dataset")
    stored = _decode(ds, label)
    shape = (int(stored.shape[0]), int(stored.shape[1]))
    hidden = _shutter(ds, shape)
    steps = conventional_steps(meta["patient_orientation"])
    direct = allocate if steps is None else None  # a turned image reaches the caller's array once turned
    kept: StoredValues | None = None
    if meta["photometric"] == "RGB" or meta["photometric"].startswith("YBR"):
        bits = _numbers(ds, "BitsStored")
        dest = _destination(direct, shape, np.dtype(np.float32))
        pixels = np.clip(stored / float((1 << int(bits[0] if bits else 8)) - 1), 0, 1, out=dest)
    else:
        into = None
        # A shutter is not a function of the stored values, and the GPU path does not turn images: such
        # images go as pixels.
        if stored.dtype in STORED_DTYPES and hidden is None and steps is None:
            into = _destination(allocate, shape, stored.dtype, optional=True)
        dest = None if into is not None else _destination(direct, shape, np.dtype(np.float32))
        pixels, same = _grey_pixels(stored, ds, meta["photometric"], dest, hidden)
        if into is not None:
            kept = _keep_stored(stored, into, same)
    if hidden is not None:
        pixels[hidden] = 0.0
    if steps is not None:
        pixels = _turn(pixels, steps, allocate)
        meta["source_orientation"], meta["patient_orientation"] = meta["patient_orientation"], "L\\F"
        if steps[0] and meta["pixel_spacing"] is not None:
            meta["pixel_spacing"] = meta["pixel_spacing"][::-1]
        logger.info("image turned to the conventional orientation", extra={
            "action": "image_turned", "source": label, "orientation": meta["source_orientation"]})
    meta["rows"], meta["columns"] = int(pixels.shape[0]), int(pixels.shape[1])
    return XrayImage(
        pixels=np.ascontiguousarray(pixels, dtype=np.float32), source=label, meta=meta, stored=kept
    )


# --------------------------------------------------------------------------------------------- image files


class _TooLarge(InvalidInstance):
    """A readable image file with more than MAX_PIXELS pixels (never decoded, never tried as DICOM)."""


def load_image_file(path: str | Path) -> XrayImage:
    """Decode a PNG or JPEG (or another format Pillow reads) into an ``XrayImage``.

    8-bit grey is divided by 255; 16-bit, 32-bit and float grey are scaled from their minimum to their
    maximum; palette and colour images are converted to grey (ITU-R 601 luma) after flattening any alpha on
    black. The EXIF orientation of JPEGs is applied. ``meta`` has the contract keys with empty DICOM values
    and ``format`` (e.g. "PNG"). Raises ``InvalidInstance`` when the file cannot be read as an image, and,
    before decoding, when it has more than MAX_PIXELS pixels (the limit DICOM instances have).
    """
    if not isinstance(path, str | Path):
        raise TypeError('Argument "path" must be a str or Path.')
    try:
        with Image.open(path) as opened:
            fmt = opened.format or ""
            cols, rows = opened.size
            if rows * cols > MAX_PIXELS:  # as for DICOM: a few megabytes of PNG can hold gigabytes of pixels
                raise _TooLarge(f"{path}: {fmt or 'image'} of {cols}x{rows} pixels is larger than the "
                                f"{MAX_PIXELS // 2**20} megapixels decoded here")
            opened.load()
            pixels = _grey(ImageOps.exif_transpose(opened))
    except Image.DecompressionBombError as exc:  # Pillow's own limit, far above MAX_PIXELS
        raise _TooLarge(f"{path}: image is larger than the {MAX_PIXELS // 2**20} megapixels decoded here "
                        f"({exc})") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InvalidInstance(f"{path}: not a readable image file ({exc})") from exc
    meta: dict[str, Any] = {
        "modality": "",
        "body_part": "",
        "view_position": "",
        "sop_instance_uid": "",
        "rows": int(pixels.shape[0]),
        "columns": int(pixels.shape[1]),
        "photometric": "MONOCHROME2",
        "pixel_spacing": None,
        "image_laterality": "",
        "patient_orientation": "",
        "format": fmt,
    }
    return XrayImage(pixels=pixels, source=str(path), meta=meta)


def _grey(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        low, high = float(arr.min()), float(arr.max())
        if high <= low:
            return np.zeros(arr.shape, dtype=np.float32)
        return ((arr - low) / (high - low)).astype(np.float32)
    if mode == "P":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(black, rgba)
    if img.mode != "L":
        img = img.convert("L")
    return np.asarray(img, dtype=np.float32) * np.float32(1.0 / 255.0)


# How a DICOM data set written without preamble and prefix begins: its first tag's group, little endian (file
# meta 0002, identification 0008) or big endian.
_DATASET_STARTS = (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08")


def load_any(path: str | Path, *, allocate: Allocator | None = None) -> XrayImage:
    """Decode a DICOM, PNG or JPEG file, recognised by its content, not its name.

    A DICOM file is recognised by its 'DICM' prefix; files without one are tried as images, then as a
    DICOM data set without file meta. Raises ``InvalidInstance`` when neither works, and for anything but a
    regular file (a FIFO or a device would block the read or never end). ``allocate`` is passed to
    :func:`load_dicom` (images from PNG/JPEG files keep their own arrays).
    """
    if not isinstance(path, str | Path):
        raise TypeError('Argument "path" must be a str or Path.')
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else (
                "a socket" if stat.S_ISSOCK(mode) else "a device")
            raise InvalidInstance(f"{path}: not a regular file ({kind})")
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        raise InvalidInstance(f"{path}: cannot be read ({exc})") from exc
    if head[128:132] == b"DICM":
        return load_dicom(path, allocate=allocate)
    try:
        return load_image_file(path)
    except _TooLarge:
        raise
    except InvalidInstance as image_error:
        if head[:2] not in _DATASET_STARTS:  # parsing anything "by force" reads the whole file into memory:
            # a multi-gigabyte backup or video in a folder given to predict took minutes and gigabytes
            raise InvalidInstance(f"{path}: neither DICOM nor a readable image") from image_error
        try:
            ds = pydicom.dcmread(path, force=True)
        except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as exc:
            raise InvalidInstance(f"{path}: neither DICOM nor a readable image ({exc})") from image_error
        if "PixelData" not in ds or "Rows" not in ds:
            raise InvalidInstance(f"{path}: neither DICOM nor a readable image") from image_error
        image = load_dicom(ds, allocate=allocate)
        image.source = str(path)
        return image


# --------------------------------------------------------------------------------------------- header checks


def _is_chest(body_part: str) -> bool:
    words = {w for w in re.split(r"[^A-Z]+", body_part.upper()) if w}
    return bool(words & CHEST_WORDS)


def header_reason(image: XrayImage, *, min_size: int = MIN_SIZE) -> tuple[str, str] | None:
    """Why the header or size says this image cannot be assessed, as ``(reason_code, text)``; None when fine.

    Checked in this order, first match wins:

    * ``not_xray``: a Modality other than CR or DX (an empty Modality, as for PNG files, passes);
    * ``for_processing``: a DX For Processing image (raw detector values, linear or logarithmic, before the
      vendor's processing for viewing): the model reads processed images, as radiologists do;
    * ``not_chest``: a Body Part Examined with no chest word (CHEST, THORAX, LUNG, TORAX, ...; empty passes),
      or a non-human subject (Patient Species Description, or a veterinary protocol name such as CANINE);
    * ``child``: the patient was younger than ADULT_AGE at the examination (Patient Age, else Patient
      Birth Date and the study's date): the models were trained on adults' films;
    * ``lateral``: View Position LL/RL/LATERAL, decubitus (LLD/RLD) or oblique; without a View Position,
      Patient Orientation with a direction anterior/posterior (row or column), or a per-image description
      (series, protocol, view code) that says lateral and not PA/AP;
    * ``too_small``: the short side has fewer than ``min_size`` pixels;
    * ``not_chest``: the long side is more than MAX_ASPECT times the short side (a strip, not a chest film).

    Content-based checks (does it look like a chest? two lungs?) belong to the segmentation stage.
    """
    if not isinstance(image, XrayImage):
        raise TypeError('Argument "image" must be an XrayImage.')
    if not isinstance(min_size, int) or min_size < 1:
        raise ValueError('Argument "min_size" must be a positive integer.')
    meta = image.meta
    modality = str(meta.get("modality") or "").upper()
    if modality and modality not in XRAY_MODALITIES:
        return "not_xray", f"Modality is {modality}, not CR or DX"
    if meta.get("for_processing"):
        return "for_processing", ("DX For Processing image (raw detector data, not processed for viewing); "
                                  "the model reads the For Presentation image")
    body_part = str(meta.get("body_part") or "").upper()
    if body_part and not _is_chest(body_part):
        return "not_chest", f"BodyPartExamined is {body_part}, not CHEST"
    species = str(meta.get("species") or "").strip()
    if species.upper() not in _HUMAN_SPECIES:
        return "not_chest", f"non-human subject (PatientSpeciesDescription {species})"
    hints = str(meta.get("view_hints") or "")
    animal = _ANIMAL_HINT.search(hints)
    if animal:
        return "not_chest", f"veterinary image ({animal.group(0)} in the protocol or series description)"
    age = meta.get("age_years")
    if age is not None and age < ADULT_AGE:
        told = f"{age:.1f} years" if age < 2 else f"{int(age)} years"
        source = meta.get("age_source") or "the header"
        return "child", (f"patient aged {told} (from {source}); the model was trained on adults (at least "
                         f"{ADULT_AGE} years) only")
    view = str(meta.get("view_position") or "").upper()
    if view in LATERAL_VIEWS:
        return "lateral", f"{LATERAL_VIEWS[view]} view (ViewPosition {view})"
    if view not in FRONTAL_VIEWS:
        orientation = str(meta.get("patient_orientation") or "").upper()
        # either direction anterior or posterior: a lateral, also one stored on its side (F\A)
        if any(direction[:1] in ("A", "P") for direction in orientation.split("\\")[:2]):
            return "lateral", f"lateral view (PatientOrientation {orientation})"
        if _LATERAL_HINT.search(hints) and not _FRONTAL_HINT.search(hints):
            return "lateral", f"lateral view (description: {hints[:80]})"
    rows, cols = image.pixels.shape[:2]
    if min(rows, cols) < min_size:
        return "too_small", f"image is {cols}x{rows} px; at least {min_size} px needed on the short side"
    aspect = max(rows, cols) / min(rows, cols)
    if aspect > MAX_ASPECT:
        return "not_chest", (f"image is {cols}x{rows} px, its long side {aspect:.1f} times its short side; a "
                             f"chest radiograph is at most {MAX_ASPECT:g}:1")
    return None
