"""The synthetic chest phantom and the DICOM files built from it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    JPEG2000Lossless,
    RLELossless,
)
from scipy import ndimage

from inference.phantom import make_dicom, make_phantom

pytestmark = pytest.mark.unit


def test_phantom_is_deterministic_and_in_range() -> None:
    a, mask_a = make_phantom((256, 256), seed=3)
    b, mask_b = make_phantom((256, 256), seed=3)
    c, _ = make_phantom((256, 256), seed=4)
    assert a.dtype == np.float32 and mask_a.dtype == bool
    assert a.shape == mask_a.shape == (256, 256)
    assert 0.0 <= a.min() and a.max() <= 1.0
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(mask_a, mask_b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("shape", [(512, 512), (400, 640), (700, 500)])
def test_frontal_mask_is_two_plausible_lungs(shape: tuple[int, int]) -> None:
    image, mask = make_phantom(shape, seed=1)
    labels, count = ndimage.label(mask)
    assert count == 2
    sizes = np.bincount(labels.ravel())[1:]
    assert 0.6 < sizes.min() / sizes.max() <= 1.0  # left (heart side) a little smaller
    assert 0.15 < mask.mean() < 0.40
    cols = [np.nonzero(labels == i)[1].mean() / shape[1] for i in (1, 2)]
    assert min(cols) < 0.45 and max(cols) > 0.55  # one each side of the midline
    # Lungs are darker than the mediastinum and the rest of the body.
    body = image > 0.3
    assert image[mask].mean() < image[body & ~mask].mean() - 0.2
    assert ndimage.binary_fill_holes(mask).sum() == mask.sum()


def test_opacity_brightens_lungs_only() -> None:
    clear, mask = make_phantom((384, 384), seed=2)
    cloudy, mask2 = make_phantom((384, 384), seed=2, opacity=1.0)
    np.testing.assert_array_equal(mask, mask2)
    diff = cloudy - clear
    assert diff[mask].mean() > 0.03
    assert not diff[~mask].any()  # nothing changes outside the lungs
    # Patchy: a real share of lung pixels changed, not all of them uniformly.
    changed = diff[mask] > 0.05
    assert 0.1 < changed.mean() < 0.95
    # Graded: a faint opacity adds less than a dense one.
    faint, _ = make_phantom((384, 384), seed=2, opacity=0.3)
    assert 0 < (faint - clear)[mask].mean() < diff[mask].mean()


def test_opacity_prefers_lower_and_outer_lung() -> None:
    clear, mask = make_phantom((384, 384), seed=5)
    total = np.zeros_like(clear)
    for seed in range(5, 10):
        total += make_phantom((384, 384), seed=seed, opacity=1.0)[0] - make_phantom((384, 384), seed=seed)[0]
    rows, cols = np.nonzero(mask)
    lower = rows > np.median(rows)
    outer = np.abs(cols - 192) > np.median(np.abs(cols - 192))
    assert total[rows[lower], cols[lower]].mean() > total[rows[~lower], cols[~lower]].mean()
    assert total[rows[outer], cols[outer]].mean() > total[rows[~outer], cols[~outer]].mean()


def test_lateral_has_one_lung_blob() -> None:
    image, mask = make_phantom((512, 512), seed=1, lateral=True)
    _, count = ndimage.label(mask)
    assert count == 1
    assert 0.1 < mask.mean() < 0.4
    assert image[mask].mean() < image[(image > 0.3) & ~mask].mean()


def test_phantom_arguments() -> None:
    with pytest.raises(ValueError, match='"shape"'):
        make_phantom((16, 512))
    with pytest.raises(ValueError, match='"opacity"'):
        make_phantom(opacity=1.5)


def test_make_dicom_headers(tmp_path: Path) -> None:
    path = tmp_path / "cr.dcm"
    ds = make_dicom(
        path, shape=(300, 200), seed=7, study_instance_uid="1.2.3.4", sop_instance_uid="1.2.3.4.5"
    )
    read = pydicom.dcmread(path)
    assert read.preamble is not None and read.file_meta.MediaStorageSOPInstanceUID == "1.2.3.4.5"
    assert read.SOPClassUID == ComputedRadiographyImageStorage and read.Modality == "CR"
    assert read.StudyInstanceUID == "1.2.3.4" and read.SOPInstanceUID == ds.SOPInstanceUID
    assert read.SeriesInstanceUID and read.PatientName == "PHANTOM^CHEST" and read.PatientID
    assert (read.Rows, read.Columns, read.BitsStored, read.BitsAllocated) == (300, 200, 12, 16)
    assert read.ViewPosition == "PA" and read.BodyPartExamined == "CHEST"
    assert [float(v) for v in read.PixelSpacing] == pytest.approx([430 / 300] * 2, rel=1e-3)
    assert read.pixel_array.max() <= 4095


@pytest.mark.parametrize(
    ("kwargs", "sop_class"),
    [
        ({"modality": "DX"}, DigitalXRayImageStorageForPresentation),
        ({"modality": "DX", "photometric": "MONOCHROME1", "voi_lut": True},
         DigitalXRayImageStorageForPresentation),
        ({"modality": "DX", "sop_class_uid": DigitalXRayImageStorageForProcessing},
         DigitalXRayImageStorageForProcessing),
        ({"modality": "CR", "bits_stored": 16, "rescale": (1.0, -1024.0), "window": (1000.0, 4000.0)},
         ComputedRadiographyImageStorage),
        ({"modality": "CR", "transfer_syntax": JPEG2000Lossless}, ComputedRadiographyImageStorage),
        ({"modality": "CR", "transfer_syntax": RLELossless}, ComputedRadiographyImageStorage),
    ],
)  # fmt: skip
def test_make_dicom_passes_dciodvfy(tmp_path: Path, kwargs: dict, sop_class: str, dciodvfy: Callable) -> None:
    path = tmp_path / "x.dcm"
    make_dicom(path, shape=(256, 256), **kwargs)
    assert pydicom.dcmread(path).SOPClassUID == sop_class
    report = dciodvfy(path)
    assert report.errors == [], report.output


def test_make_dicom_keeps_uid_when_compressing_and_extra_attributes() -> None:
    ds = make_dicom(
        transfer_syntax=JPEG2000Lossless, sop_instance_uid="1.2.826.0.1.99", PatientOrientation=["A", "F"]
    )
    assert ds.SOPInstanceUID == "1.2.826.0.1.99" == ds.file_meta.MediaStorageSOPInstanceUID
    assert ds.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert list(ds.PatientOrientation) == ["A", "F"]


def test_make_dicom_arguments() -> None:
    with pytest.raises(ValueError, match='"modality"'):
        make_dicom(modality="CT")
    with pytest.raises(ValueError, match='"bits_stored"'):
        make_dicom(bits_stored=17)
    with pytest.raises(ValueError, match='"photometric"'):
        make_dicom(photometric="RGB")
    with pytest.raises(ValueError, match='"window"'):
        make_dicom(window=(100.0, 0.0))
    with pytest.raises(ValueError, match='"voi_lut"'):
        make_dicom(voi_lut=True, rescale=(2.0, 0.0))
