"""Device-side preprocessing (used on CUDA) agrees with the NumPy/Pillow preprocessing training uses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from inference import gpu_preprocess as gp
from inference import imaging
from inference.phantom import make_phantom
from inference.pipeline import Pipeline
from inference.types import XrayImage

pytestmark = pytest.mark.unit

SHAPES = [(512, 512), (300, 470), (610, 333)]


@pytest.mark.parametrize("shape", SHAPES)
def test_square_resize_and_unsquare_agree(shape: tuple[int, int]) -> None:
    pixels, _ = make_phantom(shape, seed=1)
    ours = gp.square_resize(torch.from_numpy(pixels), 64).numpy()
    theirs = imaging.square_resize(pixels, 64)
    assert np.abs(ours - theirs).mean() < 0.01 and np.abs(ours - theirs).max() < 0.1
    small = theirs
    back_ours = gp.unsquare(torch.from_numpy(small), shape).numpy()
    back_theirs = imaging.unsquare(small, shape)
    assert back_ours.shape == back_theirs.shape == shape
    assert np.abs(back_ours - back_theirs).mean() < 0.01


@pytest.mark.parametrize("shape", SHAPES)
def test_lung_box_crop_and_uncrop_agree(shape: tuple[int, int]) -> None:
    pixels, mask = make_phantom(shape, seed=2)
    box = gp.lung_box(torch.from_numpy(mask))
    assert box == imaging.lung_box(mask)
    ours = gp.lung_crop(torch.from_numpy(pixels), torch.from_numpy(mask), 64, box).numpy()
    theirs = imaging.lung_crop(pixels, mask, 64)
    assert np.abs(ours - theirs).mean() < 0.02
    assert ((ours == 0) == (theirs == 0)).mean() > 0.97  # the same cut outside the dilated mask
    heat = np.random.default_rng(0).random((64, 64), dtype=np.float32)
    back_ours = gp.uncrop(torch.from_numpy(heat), box, shape).numpy()
    back_theirs = imaging.uncrop(heat, box, shape)
    assert np.abs(back_ours - back_theirs).mean() < 0.01


def test_empty_mask_has_no_box() -> None:
    with pytest.raises(ValueError, match="empty"):
        gp.lung_box(torch.zeros(10, 10, dtype=torch.bool))


def test_pipeline_results_agree_with_device_preprocessing(phantom_bundle: Path) -> None:
    images = [XrayImage(make_phantom(shape, seed=30 + i)[0], f"p{i}", {}) for i, shape in enumerate(SHAPES)]
    images.append(XrayImage(make_phantom((512, 512), seed=3, lateral=True)[0], "lat", {}))
    cpu = Pipeline.from_bundle(phantom_bundle, device="cpu", device_preprocess=False)
    dev = Pipeline.from_bundle(phantom_bundle, device="cpu", device_preprocess=True)
    try:
        a, b = cpu.run(images), dev.run(images)
    finally:
        cpu.close()
        dev.close()
    # the frontal phantoms reach stage 2 (stage 1 is fitted to phantoms), so the comparison below is not empty
    assert [r.probability is not None for r in a] == [True] * len(SHAPES) + [False]
    for ra, rb in zip(a, b, strict=True):
        assert ra.finding == rb.finding and ra.reason_code == rb.reason_code
        assert (ra.lung_mask == rb.lung_mask).mean() > 0.99
        if ra.probability is not None:
            assert rb.probability == pytest.approx(ra.probability, abs=0.02)
            assert rb.heatmap.shape == ra.heatmap.shape
            assert np.abs(rb.heatmap - ra.heatmap).mean() < 0.05
            assert rb.lung_attention == pytest.approx(ra.lung_attention, abs=0.05)
