"""Decoding the real files in ../shared/data (skipped, saying so, when the data set is absent)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest

from inference.imaging import header_reason, load_any, load_dicom, load_image_file, square_resize
from inference.types import XrayImage

pytestmark = [pytest.mark.unit, pytest.mark.data]


def _frame(pixels: np.ndarray, rows: tuple[float, float], cols: tuple[float, float]) -> float:
    h, w = pixels.shape
    return float(pixels[int(rows[0] * h) : int(rows[1] * h), int(cols[0] * w) : int(cols[1] * w)].mean())


@pytest.fixture(scope="module")
def decoded(shared_data: Path) -> dict[str, XrayImage]:
    """Every shared DICOM file, decoded once (through load_any, which recognises them as DICOM)."""
    files = sorted((shared_data / "dicom").glob("*.dcm"))
    assert files, "no DICOM files in the shared data set"
    return {path.name: load_any(path) for path in files}


def test_every_shared_dicom_decodes(shared_data: Path, decoded: dict[str, XrayImage]) -> None:
    for name, image in decoded.items():
        path = shared_data / "dicom" / name
        assert image.pixels.dtype == np.float32 and image.pixels.ndim == 2
        assert 0.0 <= image.pixels.min() and image.pixels.max() <= 1.0
        assert image.pixels.std() > 0.05, f"{path.name} decoded flat"
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert image.pixels.shape == (ds.Rows, ds.Columns)
        assert image.meta["sop_instance_uid"] == ds.SOPInstanceUID


def test_every_shared_dicom_keeps_stored_values_whose_table_gives_its_pixels(
    shared_data: Path, decoded: dict[str, XrayImage]
) -> None:
    # as the CUDA pipeline decodes them (Pipeline.host_array): the stored values and their table, except for
    # an image that decoding turns (RG3, an AP stored as R\\F): its pixels, turned
    for name, image in decoded.items():
        kept = load_any(shared_data / "dicom" / name, allocate=lambda shape, dtype: np.empty(shape, dtype))
        np.testing.assert_array_equal(kept.pixels, image.pixels)
        if image.meta.get("source_orientation"):
            assert kept.stored is None, name
            continue
        assert kept.stored is not None, name
        np.testing.assert_array_equal(kept.stored.pixels(), image.pixels)


def test_rg3_stored_mirrored_is_turned(shared_data: Path, decoded: dict[str, XrayImage]) -> None:
    ds = pydicom.dcmread(shared_data / "dicom" / "RG3_J2KR.dcm")
    assert list(ds.PatientOrientation) == ["R", "F"]
    image = decoded["RG3_J2KR.dcm"]
    assert image.meta["source_orientation"] == "R\\F" and image.meta["patient_orientation"] == "L\\F"
    del ds.PatientOrientation
    np.testing.assert_array_equal(image.pixels, load_dicom(ds).pixels[:, ::-1])


def test_rg1_chest_jpeg2000_lossy_and_lossless(shared_data: Path, decoded: dict[str, XrayImage]) -> None:
    lossless, lossy = decoded["RG1_J2KR.dcm"], decoded["RG1_J2KI.dcm"]
    for image in (lossless, lossy):
        assert image.meta["modality"] == "CR" and image.meta["body_part"] == "CHEST"
        assert image.meta["photometric"] == "MONOCHROME1"
        assert image.pixels.shape == (1955, 1841)
        # Its Pixel Spacing is 0\0 (invalid): ignored, not fatal.
        assert image.meta["pixel_spacing"] is None
        assert header_reason(image) is None
        # MONOCHROME1 inverted: the mediastinum is brighter than the lung fields on either side.
        centre = _frame(image.pixels, (0.3, 0.6), (0.45, 0.55))
        right = _frame(image.pixels, (0.3, 0.6), (0.2, 0.35))
        left = _frame(image.pixels, (0.3, 0.6), (0.65, 0.8))
        assert centre > max(right, left) + 0.15
    assert np.abs(lossless.pixels - lossy.pixels).mean() < 0.01
    stored = pydicom.dcmread(shared_data / "dicom" / "RG1_J2KI.dcm").pixel_array
    assert np.corrcoef(lossy.pixels.ravel()[::11], stored.ravel()[::11])[0, 1] < -0.99


def test_rg3_extremity_is_not_chest(decoded: dict[str, XrayImage]) -> None:
    image = decoded["RG3_J2KR.dcm"]
    assert header_reason(image) == ("not_chest", "BodyPartExamined is EXTREMITY, not CHEST")


def test_highdicom_dx_dog_lateral(shared_data: Path) -> None:
    path = shared_data / "dicom" / "highdicom_dx_image.dcm"
    image = load_dicom(path)
    stored = pydicom.dcmread(path).pixel_array
    assert image.meta["photometric"] == "MONOCHROME1" and image.meta["modality"] == "DX"
    assert image.pixels.shape == (169, 211)
    assert image.meta["pixel_spacing"] == pytest.approx((1.2, 1.2012))
    # Inverted: high stored values (MONOCHROME1: dark) come out dark; the air above the back is dark.
    assert np.corrcoef(image.pixels.ravel(), stored.ravel())[0, 1] < -0.99
    assert _frame(image.pixels, (0.0, 0.1), (0.0, 1.0)) < image.pixels.mean() - 0.15
    # A veterinary lateral thorax: refused by its header (the protocol names CANINE LATERAL THORAX).
    assert header_reason(image) == (
        "not_chest",
        "veterinary image (CANINE in the protocol or series description)",
    )
    assert "LATERAL" in image.meta["view_hints"]


def test_sample_of_shared_png_images_and_masks(shared_data: Path) -> None:
    with open(shared_data / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    picked: dict[str, dict[str, str]] = {}
    for row in rows:
        if row["task"] == "classification":
            picked.setdefault(row["source"], row)
    masks = [row for row in rows if row["task"] == "segmentation"][:2]
    assert picked and masks
    for row in picked.values():
        image = load_image_file(shared_data / row["file"])
        assert image.pixels.dtype == np.float32 and max(image.pixels.shape) == 512
        assert square_resize(image.pixels, 224).shape == (224, 224)
    for row in masks:
        mask = load_image_file(shared_data / row["mask_file"]).pixels > 0.5
        image = load_image_file(shared_data / row["file"])
        assert mask.shape == image.pixels.shape and 0.05 < mask.mean() < 0.6
