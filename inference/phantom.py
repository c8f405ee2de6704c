"""Synthetic chest radiographs and DICOM files built from them, for tests, demos and benchmarks.

``make_phantom`` draws a frontal (or lateral) chest projection: air, body outline, two dark lung fields,
mediastinum and heart, spine, ribs, diaphragm domes and noise, and returns the exact lung mask it drew.
``opacity`` adds patchy, ground-glass-like opacities inside the lungs (peripheral and basal, as in
COVID-19 pneumonia), strong enough for a small classifier to tell positive from negative phantoms.

``make_dicom`` wraps a phantom in a valid CR or DX instance (file meta, patient/study/series/SOP
identifiers, pixel spacing, view, body part), with the pixel encodings real modalities use.
Nothing here is a medical image: it is a test object.
"""

from __future__ import annotations

import datetime as _dt
import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)
from scipy import ndimage

__all__ = ["make_dicom", "make_phantom"]

_AIR = 0.03
_SOFT = 0.50
_LUNG = 0.16
_BONE = 0.80

_LATERAL_VIEWS = {"LL", "RL", "LATERAL"}
_ENCODER_PLUGIN = {JPEG2000Lossless: "pylibjpeg", JPEG2000: "pylibjpeg", RLELossless: "pydicom"}
# Lossy settings: JPEG 2000 at 10:1, JPEG-LS near-lossless with an error bound of 2.
_ENCODER_OPTIONS: dict[str, dict[str, Any]] = {
    JPEG2000: {"j2k_cr": [10]},
    JPEGLSNearLossless: {"jls_error": 2},
}
_NO_ENCODER = {
    JPEGLossless: "dcmcjpeg +el (dcmtk)",
    JPEGLosslessSV1: "dcmcjpeg +e1 (dcmtk)",
    JPEGExtended12Bit: "dcmcjpeg +ee (dcmtk)",
    HTJ2KLosslessRPCL: "an HTJ2K encoder that writes RPCL with TLM markers (none here)",
}
# HTJ2K (lossless, and lossy with quantisation step 0.0005: about 5:1, error under 2% of the range) is
# written with OpenJPH through imagecodecs; pydicom decodes it with pylibjpeg-openjpeg.
_HTJ2K_OPTIONS: dict[str, dict[str, Any]] = {
    HTJ2KLossless: {"reversible": True},
    HTJ2K: {"reversible": False, "level": 0.0005},
}


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: int) -> np.ndarray:
    """Noise with structures about ``cell`` pixels wide, zero mean and unit-ish amplitude."""
    small = (max(2, shape[0] // cell), max(2, shape[1] // cell))
    base = rng.standard_normal(small).astype(np.float32)
    img = Image.fromarray(base, mode="F").resize((shape[1], shape[0]), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component (a lung clipped by the heart can leave a sliver behind)."""
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _soft(inside: np.ndarray, width: float) -> np.ndarray:
    """Turn a signed 'inside' field (>0 inside) into a soft 0..1 edge ``width`` units wide."""
    return np.clip(0.5 + inside / max(width, 1e-6), 0.0, 1.0).astype(np.float32)


def _frontal(y: np.ndarray, x: np.ndarray, rng: np.random.Generator, jitter: np.ndarray) -> tuple[
    np.ndarray, np.ndarray
]:
    """Frontal (PA) projection; ``y`` is a (rows, 1) and ``x`` a (1, columns) grid of unit coordinates
    (broadcast, so that terms of one coordinate cost one row or column). Returns (image, lung mask)."""
    shape = (y.shape[0], x.shape[1])
    # Body outline: trunk with shoulders, slightly wider at the top.
    half_w = 0.41 + 0.04 * np.clip((0.35 - y) / 0.35, 0, 1) + jitter[0]
    body = _soft(half_w - np.abs(x - 0.5), 0.01) * _soft(y - 0.04, 0.02)
    img = _AIR + (_SOFT - _AIR) * body

    lungs = np.zeros(shape, dtype=bool)
    heart_cx, heart_cy = 0.56 + jitter[1], 0.66
    heart = ((x - heart_cx) / 0.15) ** 2 + ((y - heart_cy) / 0.14) ** 2 < 1.0
    for side in (-1, 1):
        # Distance from the midline: the lateral edge widens from a rounded apex to the full hemithorax,
        # the medial edge follows the mediastinum (and the right heart border low on the right).
        d = np.abs(x - 0.5) if side > 0 else np.abs(0.5 - x)
        on_side = (x - 0.5) * side > 0
        apex = np.clip((y - 0.13) / 0.30, 0, 1)
        lateral_edge = 0.08 + (0.28 + jitter[3]) * np.sqrt(apex) - 0.04 * np.clip((y - 0.55) / 0.2, 0, 1)
        medial_edge = 0.07 + jitter[2] + (0.04 * np.exp(-(((y - 0.6) / 0.07) ** 2)) if side < 0 else 0.0)
        # Diaphragm dome: highest mid-hemithorax, lowest at the costophrenic angle; left a little lower.
        dome = 0.68 + (0.02 if side > 0 else 0.0) + 3.5 * (d - 0.21) ** 2
        lung = on_side & (d > medial_edge) & (d < lateral_edge) & (y < dome) & (y > 0.13)
        if side > 0:
            lung &= ~heart
        lungs |= _largest_component(lung)
    lung_f = lungs.astype(np.float32)

    # Lung fields are dark, with vessel-like texture fading towards the periphery.
    vessels = np.abs(_smooth_noise(rng, shape, max(4, shape[0] // 64)))
    hilum = np.exp(-(((np.abs(x - 0.5) - 0.1) / 0.12) ** 2 + ((y - 0.45) / 0.15) ** 2))
    lung_val = _LUNG + 0.05 * vessels * (0.3 + hilum)
    img = img * (1 - lung_f) + lung_val * lung_f

    # Abdomen below the diaphragm: soft tissue, brighter.
    below = (y > 0.69 + 3.5 * (np.abs(x - 0.5) - 0.21) ** 2) & (body > 0.5)
    img = np.where(below & ~lungs, img + 0.08, img)
    # Mediastinum and heart.
    mediastinum = (np.abs(x - 0.5) < 0.06) & (y > 0.08) & (y < 0.7)
    img = np.where((mediastinum | heart) & ~lungs, np.maximum(img, 0.62), img)
    # Spine with vertebrae.
    spine = np.abs(x - 0.5) < 0.035
    vertebrae = 0.04 * np.cos(2 * np.pi * y / 0.045)
    img = np.where(spine & (body > 0.5), np.maximum(img, 0.72 + vertebrae), img)
    # Ribs: curved bands over the thorax, visible through the lungs.
    curve = y + 0.22 * (x - 0.5) ** 2 - 0.05 * np.abs(x - 0.5)
    ribs = np.clip(np.cos(2 * np.pi * curve / 0.075), 0, 1) ** 3
    thorax = (np.abs(x - 0.5) < 0.42) & (y > 0.12) & (y < 0.78)
    img = img + 0.09 * ribs * thorax * (0.4 + 0.6 * lung_f)
    # Clavicles.
    for side in (-1, 1):
        xc = 0.5 + side * 0.16
        clav = (np.abs(y - (0.19 - 0.25 * (np.abs(x - 0.5) - 0.04))) < 0.012) & (np.abs(x - xc) < 0.13)
        img = np.where(clav, np.maximum(img, _BONE - 0.1), img)
    return img, lungs


def _lateral(y: np.ndarray, x: np.ndarray, rng: np.random.Generator, jitter: np.ndarray) -> tuple[
    np.ndarray, np.ndarray
]:
    """Lateral projection: one large lung blob, spine posterior (image right), heart anterior."""
    shape = (y.shape[0], x.shape[1])
    body = _soft(0.40 + jitter[0] - np.abs(x - 0.5), 0.01) * _soft(y - 0.04, 0.02)
    img = _AIR + (_SOFT - _AIR) * body
    blob = ((x - 0.5) / 0.25) ** 2 + ((y - 0.48) / 0.32) ** 2 < 1.0
    heart = ((x - 0.38) / 0.14) ** 2 + ((y - 0.66) / 0.13) ** 2 < 1.0
    lungs = blob & ~heart & (y < 0.74 + 0.05 * (x - 0.5))
    lung_f = lungs.astype(np.float32)
    vessels = np.abs(_smooth_noise(rng, shape, max(4, shape[0] // 64)))
    img = img * (1 - lung_f) + (_LUNG + 0.06 + 0.05 * vessels) * lung_f
    img = np.where(heart & (body > 0.5), np.maximum(img, 0.6), img)
    spine = (np.abs(x - 0.78) < 0.05) & (body > 0.5)
    img = np.where(spine, np.maximum(img, 0.72 + 0.05 * np.cos(2 * np.pi * y / 0.05)), img)
    img = np.where((y > 0.76) & (body > 0.5) & ~lungs, img + 0.08, img)
    return img, lungs


def _opacities(
    rng: np.random.Generator, lungs: np.ndarray, y: np.ndarray, x: np.ndarray, amount: float
) -> np.ndarray:
    """Patchy ground-glass opacities, mostly peripheral and basal, confined to the lungs."""
    ys, xs = np.nonzero(lungs)
    if ys.size == 0:
        return np.zeros(lungs.shape, dtype=np.float32)
    yn, xn = y[ys, 0], x[0, xs]
    # Weight candidate centres towards the lateral edge and the bases.
    weight = (np.abs(xn - 0.5) ** 2) * (0.3 + (yn - yn.min()) / max(np.ptp(yn), 1e-6)) ** 2
    weight = weight / weight.sum()
    n = 5 + int(round(6 * min(amount, 1.0)))
    picks = rng.choice(ys.size, size=n, p=weight)
    field = np.zeros(lungs.shape, dtype=np.float32)
    rows, cols = lungs.shape
    for i in picks:
        r = rng.uniform(0.03, 0.07)
        # Each blob only where it is visible (within 4 radii): the rest of the field is untouched.
        r0, r1 = max(0, int((yn[i] - 4 * r) * rows)), min(rows, int((yn[i] + 4 * r) * rows) + 1)
        c0, c1 = max(0, int((xn[i] - 4 * r) * cols)), min(cols, int((xn[i] + 4 * r) * cols) + 1)
        dy2, dx2 = (y[r0:r1] - yn[i]) ** 2, (x[:, c0:c1] - xn[i]) ** 2
        field[r0:r1, c0:c1] += np.exp(-(dy2 + dx2) / np.float32(2 * r * r))
    texture = 0.7 + 0.3 * np.clip(_smooth_noise(rng, lungs.shape, max(4, lungs.shape[0] // 40)), -1, 1)
    return np.clip(field, 0, 1) * texture * lungs


def make_phantom(
    shape: tuple[int, int] = (512, 512), *, opacity: float = 0.0, seed: int = 0, lateral: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Draw a synthetic chest radiograph.

    Args:
        shape: (rows, columns), each at least 32. The anatomy is scaled to the field, so a non-square shape
            gives a stretched chest, as a detector of another format would.
        opacity: 0 for a clear chest; up to 1 for dense, widespread opacities. Values in between add
            correspondingly fainter and fewer patches.
        seed: the same seed gives the same image (anatomy jitter, texture, noise, opacity placement).
        lateral: draw a lateral projection (one lung blob) instead of a frontal one.

    Returns:
        ``(image, lung_mask)``: float32 in [0, 1], displayed the usual way (bright bone, dark air), and the
        boolean mask of exactly the lung pixels drawn (the opacities do not change it).
    """
    if (
        not isinstance(shape, tuple | list)
        or len(shape) != 2
        or not all(isinstance(s, int | np.integer) and s >= 32 for s in shape)
    ):
        raise ValueError('Argument "shape" must be two integers (rows, columns), each at least 32.')
    if not 0.0 <= float(opacity) <= 1.0:
        raise ValueError('Argument "opacity" must be between 0 and 1.')
    rows, cols = int(shape[0]), int(shape[1])
    # Separate streams, so that adding opacities changes nothing but the lungs.
    rng, rng_opacity, rng_noise = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    jitter = rng.uniform(-0.015, 0.015, size=4)
    y = ((np.arange(rows, dtype=np.float32) + 0.5) / rows)[:, None]
    x = ((np.arange(cols, dtype=np.float32) + 0.5) / cols)[None, :]
    img, lungs = (_lateral if lateral else _frontal)(y, x, rng, jitter)
    if opacity > 0:
        img = img + 0.35 * float(opacity) * _opacities(rng_opacity, lungs, y, x, float(opacity))
    img = img + 0.012 * rng_noise.standard_normal(img.shape).astype(np.float32)
    img = img + 0.02 * _smooth_noise(rng_noise, img.shape, max(8, rows // 16))
    return np.clip(img, 0.0, 1.0).astype(np.float32), lungs


def _stored_values(
    image: np.ndarray, bits_stored: int, photometric: str, voi_lut: bool
) -> np.ndarray:
    """Map a [0, 1] display image to unsigned stored values using the full ``bits_stored`` range."""
    top = (1 << bits_stored) - 1
    display = np.clip(image, 0.0, 1.0).astype(np.float64)
    if voi_lut:
        # The VOI LUT written by make_dicom is a square root: store the square so that it displays as drawn.
        display = display**2
    stored = np.rint(display * top)
    if photometric == "MONOCHROME1":
        stored = top - stored
    return stored.astype(np.uint8 if bits_stored <= 8 else np.uint16)


def _add_voi_lut(ds: Dataset, low: int, high: int, invert_input: bool) -> None:
    """A VOI LUT Sequence item: a square-root curve from ``low``..``high`` (modality values) to 16 bits."""
    if low < 0 or high - low + 1 > 65535:
        raise ValueError(
            'Argument "voi_lut" needs modality values in 0..65534 (check "bits_stored" and "rescale").'
        )
    entries = np.arange(high - low + 1, dtype=np.float64) / max(high - low, 1)
    if invert_input:
        # MONOCHROME1: the display inverts after the LUT, so the curve is mirrored to keep sqrt on display.
        entries = 1.0 - np.sqrt(1.0 - entries)
    else:
        entries = np.sqrt(entries)
    item = Dataset()
    item.LUTDescriptor = [high - low + 1, low, 16]
    item.LUTExplanation = "square root"
    item.LUTData = np.rint(entries * 65535).astype(np.uint16).tolist()
    item["LUTData"].VR = "US"
    ds.VOILUTSequence = [item]


def _encode_jpeg_baseline(ds: Dataset, stored: np.ndarray) -> None:
    """8-bit JPEG baseline with Pillow's libjpeg (pydicom has no encoder for this syntax)."""
    if stored.dtype != np.uint8 or ds.BitsStored != 8:
        raise ValueError('JPEG Baseline needs "bits_stored"=8.')
    buf = io.BytesIO()
    Image.fromarray(stored, mode="L").save(buf, format="JPEG", quality=95, subsampling=0)
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit


def _encode_htj2k(ds: Dataset, stored: np.ndarray, transfer_syntax: UID) -> None:
    """HTJ2K with OpenJPH (imagecodecs): pydicom has no HTJ2K encoder, dcmtk 3.6 none either."""
    import imagecodecs  # a dependency; imported here so that the phantom module loads without it

    frame = imagecodecs.htj2k_encode(stored, **_HTJ2K_OPTIONS[transfer_syntax])
    ds.PixelData = encapsulate([bytes(frame)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    if transfer_syntax == HTJ2K:
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_15444_15"


def make_dicom(
    path: str | Path | None = None,
    *,
    modality: str = "CR",
    shape: tuple[int, int] = (512, 512),
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    rescale: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
    voi_lut: bool = False,
    view_position: str = "PA",
    body_part: str = "CHEST",
    transfer_syntax: str = ExplicitVRLittleEndian,
    opacity: float = 0.0,
    seed: int = 0,
    patient_name: str = "PHANTOM^CHEST",
    study_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    sop_class_uid: str | None = None,
    lateral: bool | None = None,
    padding: int = 0,
    padding_value: int | None = None,
    **extra: Any,
) -> Dataset:
    """Build a CR or DX instance holding a phantom (``make_phantom``); write it when ``path`` is given.

    Args:
        path: where to write it (``enforce_file_format=True``); None only builds the dataset.
        modality: "CR" (Computed Radiography Image Storage) or "DX" (Digital X-Ray For Presentation unless
            ``sop_class_uid`` asks for the For Processing class).
        photometric: "MONOCHROME2" or "MONOCHROME1" (stored values inverted, so it displays the same).
        bits_stored: 8..16; 8 is stored in 8-bit words, more in 16-bit words, always unsigned and using the
            full range of that many bits.
        rescale: (slope, intercept) written as Rescale Slope/Intercept (the stored values are unchanged).
        window: (centre, width) in modality units, written as Window Center/Width.
        voi_lut: add a VOI LUT Sequence with a square-root curve over the modality range; stored values are
            squared first, so the image still displays as drawn.
        transfer_syntax: Explicit/Implicit VR Little Endian, Deflated, Explicit VR Big Endian (retired, still
            sent by old devices), JPEG Baseline (8-bit only, via Pillow),
            RLE Lossless (pydicom), JPEG-LS (pyjpegls, when installed) or JPEG 2000 (pylibjpeg-openjpeg).
            HTJ2K and HTJ2K Lossless are written with imagecodecs (OpenJPH). JPEG lossless/extended
            and HTJ2K RPCL have no Python encoder here: a ValueError names the tool to use.
        lateral: draw a lateral phantom; by default when ``view_position`` is LL, RL or LATERAL.
        padding: that many columns at the left and right edges hold ``padding_value``, written as Pixel
            Padding Value (a film padded to its detector's width).
        padding_value: the stored value of the padding; by default the one that displays white when the
            padding is not recognised (the full range's top for MONOCHROME2, 0 for MONOCHROME1).
        extra: further attributes set by keyword (e.g. ``PatientOrientation=["A", "F"]``), after the others.

    Returns:
        The dataset, with file meta; compression keeps the SOP Instance UID.
    """
    modality = str(modality).upper()
    if modality not in ("CR", "DX"):
        raise ValueError('Argument "modality" must be "CR" or "DX".')
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError('Argument "photometric" must be "MONOCHROME1" or "MONOCHROME2".')
    if not isinstance(shape, tuple | list) or len(shape) != 2:
        raise ValueError('Argument "shape" must be two integers (rows, columns), each at least 32.')
    if not isinstance(bits_stored, int) or not 8 <= bits_stored <= 16:
        raise ValueError('Argument "bits_stored" must be an integer from 8 to 16.')
    if rescale is not None and (len(rescale) != 2 or float(rescale[0]) == 0.0):
        raise ValueError('Argument "rescale" must be (slope, intercept) with a non-zero slope.')
    if window is not None and (len(window) != 2 or float(window[1]) < 1.0):
        raise ValueError('Argument "window" must be (centre, width) with width >= 1.')
    transfer_syntax = UID(transfer_syntax)
    if transfer_syntax in _NO_ENCODER:
        raise ValueError(
            f'Argument "transfer_syntax": no encoder for {transfer_syntax.name} here; write the file '
            f"uncompressed and convert it with {_NO_ENCODER[transfer_syntax]}."
        )
    if sop_class_uid is None:
        sop_class_uid = ComputedRadiographyImageStorage if modality == "CR" else (
            DigitalXRayImageStorageForPresentation
        )
    sop_class_uid = UID(sop_class_uid)
    if lateral is None:
        lateral = str(view_position).upper() in _LATERAL_VIEWS

    image, _ = make_phantom((int(shape[0]), int(shape[1])), opacity=opacity, seed=seed, lateral=lateral)
    stored = _stored_values(image, bits_stored, photometric, voi_lut)
    if not isinstance(padding, int) or not 0 <= 2 * padding < stored.shape[1]:
        raise ValueError('Argument "padding" must be an integer from 0 to less than half the columns.')
    if padding:
        if padding_value is None:
            padding_value = (1 << bits_stored) - 1 if photometric == "MONOCHROME2" else 0
        if not 0 <= int(padding_value) < (1 << bits_stored):
            raise ValueError('Argument "padding_value" must be a stored value of "bits_stored" bits.')
        stored[:, :padding] = stored[:, -padding:] = int(padding_value)
    now = _dt.datetime(2024, 1, 15, 10, 30, 0) + _dt.timedelta(seconds=int(seed) % 86400)
    sop_instance_uid = UID(sop_instance_uid or generate_uid())

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta

    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = now.strftime("%H%M%S")
    ds.AccessionNumber = f"ACC{seed:06d}"
    ds.Modality = modality
    ds.Manufacturer = "cxr-node phantom"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "Chest phantom"
    ds.SeriesDescription = "Synthetic chest radiograph"
    ds.PatientName = patient_name
    ds.PatientID = f"PHANTOM{seed:04d}"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = body_part
    ds.ViewPosition = view_position
    ds.StudyInstanceUID = study_instance_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["P", "F"] if lateral else ["L", "F"]
    spacing = [f"{430.0 / max(shape):.4f}"] * 2
    if modality == "CR":
        ds.PixelSpacing = spacing
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
    else:
        for_processing = sop_class_uid == DigitalXRayImageStorageForProcessing
        ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
        ds.PresentationIntentType = "FOR PROCESSING" if for_processing else "FOR PRESENTATION"
        ds.ImagerPixelSpacing = spacing
        ds.DetectorType = "SCINTILLATOR"
        ds.ImageLaterality = "U"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1
        ds.BurnedInAnnotation = "NO"
        ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
        ds.AnatomicRegionSequence = []
        if str(body_part).upper() in ("CHEST", "THORAX"):
            region = Dataset()
            region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = "51185008", "SCT", "Chest"
            ds.AnatomicRegionSequence = [region]
        ds.AcquisitionContextSequence = []
        ds.PositionerType = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 8 if bits_stored <= 8 else 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "00"
    if padding:
        ds.add_new("PixelPaddingValue", "US", int(padding_value))  # type: ignore[arg-type]
    slope, intercept = (1.0, 0.0) if rescale is None else (float(rescale[0]), float(rescale[1]))
    if rescale is not None or modality == "DX":
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
        ds.RescaleType = "US"
    if window is not None:
        ds.WindowCenter = f"{float(window[0]):g}"
        ds.WindowWidth = f"{float(window[1]):g}"
    elif modality == "DX" and not voi_lut and sop_class_uid != DigitalXRayImageStorageForProcessing:
        top = ((1 << bits_stored) - 1) * slope + intercept
        lo, hi = sorted((intercept, top))
        ds.WindowCenter, ds.WindowWidth = f"{(lo + hi) / 2:g}", f"{hi - lo + 1:g}"
    if voi_lut:
        if slope != 1.0 or intercept != int(intercept):
            raise ValueError('Argument "voi_lut" needs a rescale slope of 1 and an integer intercept.')
        low = int(intercept)
        _add_voi_lut(ds, low, low + (1 << bits_stored) - 1, photometric == "MONOCHROME1")
    ds.PixelData = stored.tobytes()
    ds["PixelData"].VR = "OB" if ds.BitsAllocated == 8 else "OW"

    for keyword, value in extra.items():
        setattr(ds, keyword, value)

    if transfer_syntax == JPEGBaseline8Bit:
        _encode_jpeg_baseline(ds, stored)
    elif transfer_syntax in _HTJ2K_OPTIONS:
        _encode_htj2k(ds, stored, transfer_syntax)
    elif transfer_syntax in (ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        ds.file_meta.TransferSyntaxUID = transfer_syntax  # pydicom encodes (and deflates) when writing
    elif transfer_syntax == ExplicitVRBigEndian:
        ds.PixelData = stored.astype(stored.dtype.newbyteorder(">")).tobytes()
        ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    elif transfer_syntax != ExplicitVRLittleEndian:
        try:
            ds.compress(
                transfer_syntax,
                encoding_plugin=_ENCODER_PLUGIN.get(transfer_syntax, ""),
                generate_instance_uid=False,
                **_ENCODER_OPTIONS.get(transfer_syntax, {}),
            )
        except (RuntimeError, ValueError, NotImplementedError) as exc:
            raise ValueError(
                f'Argument "transfer_syntax": cannot encode {transfer_syntax.name} here ({exc}); write the '
                "file uncompressed and convert it with dcmtk (dcmcjpeg, dcmcjpls, dcmcrle)."
            ) from exc
        if transfer_syntax in (JPEG2000, JPEGLSNearLossless):
            ds.LossyImageCompression = "01"
    if path is not None:
        ds.save_as(Path(path), enforce_file_format=True)
    return ds
