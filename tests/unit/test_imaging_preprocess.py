"""Preprocessing shared by training and inference: geometry, lung crop, mask post-processing, speed."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import pytest

from inference import preprocess
from inference.imaging import (
    PAD_VALUE,
    centre_box,
    centre_crop,
    load_dicom,
    lung_box,
    lung_crop,
    postprocess_mask,
    resize_mask,
    square_region,
    square_resize,
    uncrop,
    unsquare,
)
from inference.phantom import make_phantom

pytestmark = pytest.mark.unit


def test_imaging_re_exports_preprocess() -> None:
    assert square_resize is preprocess.square_resize and lung_crop is preprocess.lung_crop


@pytest.mark.parametrize("shape", [(512, 512), (400, 600), (600, 400), (1001, 333), (37, 2000)])
def test_square_resize_pads_symmetrically_with_pad_value(shape: tuple[int, int]) -> None:
    pixels = np.ones(shape, dtype=np.float32)
    out = square_resize(pixels, 224)
    assert out.shape == (224, 224) and out.dtype == np.float32
    rows = np.flatnonzero(out.max(axis=1) > 0.5)
    cols = np.flatnonzero(out.max(axis=0) > 0.5)
    top, bottom = rows[0], 223 - rows[-1]
    left, right = cols[0], 223 - cols[-1]
    assert abs(bottom - top) <= 1 and abs(right - left) <= 1  # centred
    assert min(top, left) == 0  # the long side fills the canvas
    # Padding is PAD_VALUE except the one output pixel next to the image that resampling blends.
    padding = np.ones((224, 224), dtype=bool)
    padding[max(0, rows[0] - 1) : rows[-1] + 2, max(0, cols[0] - 1) : cols[-1] + 2] = False
    assert np.all(out[padding] == PAD_VALUE)
    # Aspect kept (to within a pixel of rounding).
    assert abs((rows.size / cols.size) - shape[0] / shape[1]) < 0.02 * max(1, shape[0] / shape[1]) + 0.05


def test_square_resize_same_content_same_output_whatever_resolution() -> None:
    # The same anatomy at two resolutions and two aspects gives the same model input size, and the same
    # content at two resolutions gives nearly the same pixels (no source-specific sharpness or offset).
    small, _ = make_phantom((300, 400), seed=4)
    large, _ = make_phantom((1200, 1600), seed=4)
    a, b = square_resize(small, 256), square_resize(large, 256)
    assert a.shape == b.shape == (256, 256)
    inside = a > 0
    assert np.corrcoef(a[inside], b[inside])[0, 1] > 0.95
    assert abs(float(a.mean()) - float(b.mean())) < 0.01


def test_square_resize_arguments() -> None:
    with pytest.raises(ValueError, match='"size"'):
        square_resize(np.zeros((10, 10), np.float32), 4)
    with pytest.raises(ValueError, match='"pixels"'):
        square_resize(np.zeros((10, 10, 3), np.float32), 64)
    with pytest.raises(TypeError, match='"pixels"'):
        square_resize([[0.0]], 64)  # type: ignore[arg-type]


@pytest.mark.parametrize("shape", [(300, 500), (500, 300), (512, 512)])
def test_unsquare_inverts_square_resize(shape: tuple[int, int]) -> None:
    image, _ = make_phantom(shape, seed=5)
    back = unsquare(square_resize(image, 512), shape)
    assert back.shape == shape
    assert np.abs(back - image).mean() < 0.02


@pytest.mark.parametrize("shape", [(300, 500), (501, 300)])
def test_square_region_marks_the_image(shape: tuple[int, int]) -> None:
    out = square_resize(np.ones(shape, dtype=np.float32), 256)
    left, top, right, bottom = square_region(shape, 256)
    assert 0 <= left < right <= 256 and 0 <= top < bottom <= 256
    assert np.all(out[int(np.ceil(top)) : int(bottom), int(np.ceil(left)) : int(right)] > 0.99)
    # Outside it, only the pixel next to the edge (resampling support) may be non-zero.
    assert not out[: max(0, int(np.floor(top)) - 1)].any() and not out[int(np.ceil(bottom)) + 1 :].any()
    assert not out[:, : max(0, int(np.floor(left)) - 1)].any() and not out[:, int(np.ceil(right)) + 1 :].any()


@pytest.mark.parametrize(("shape", "box"), [((512, 512), (0, 0, 512, 512)), ((400, 601), (0, 100, 400, 500)),
                                           ((601, 400), (100, 0, 500, 400)), ((5, 8), (0, 1, 5, 6))])
def test_centre_box_is_the_largest_centred_square(shape: tuple[int, int], box: tuple[int, ...]) -> None:
    assert centre_box(shape) == box
    with pytest.raises(ValueError, match='"shape"'):
        centre_box((0, 5))


def test_centre_crop_shows_no_padding_and_ignores_symmetric_bars() -> None:
    image, _ = make_phantom((400, 400), seed=7)
    wide = np.pad(image, ((0, 0), (90, 90)), constant_values=PAD_VALUE)  # bars left and right
    tall = np.pad(image, ((50, 50), (0, 0)), constant_values=PAD_VALUE)  # bars top and bottom
    plain = centre_crop(image, 128)
    assert plain.shape == (128, 128) and plain.dtype == np.float32
    assert np.array_equal(plain, square_resize(image, 128))
    # the bars fall outside the centre square: the stage 2 input is the same as without them
    assert np.array_equal(centre_crop(wide, 128), plain) and np.array_equal(centre_crop(tall, 128), plain)
    assert not np.array_equal(square_resize(wide, 128), plain)  # where padding would keep them
    # a non-square film fills the whole input: no row or column of padding
    film, _ = make_phantom((300, 480), seed=8)
    out = centre_crop(film, 96)
    assert out[0].any() and out[-1].any() and out[:, 0].any() and out[:, -1].any()
    r0, c0, r1, c1 = centre_box(film.shape)
    assert np.array_equal(out, square_resize(film[r0:r1, c0:c1], 96))
    heat = np.ones((96, 96), np.float32)
    back = uncrop(heat, centre_box(film.shape), film.shape)
    assert back[:, c0:c1].min() > 0.99 and not back[:, :c0].any() and not back[:, c1:].any()


def test_resize_mask_keeps_area_and_type() -> None:
    _, mask = make_phantom((512, 512), seed=6)
    up = resize_mask(mask, (1500, 1300))
    assert up.dtype == bool and up.shape == (1500, 1300)
    assert abs(up.mean() - mask.mean()) < 0.005
    down = resize_mask(mask, (128, 128))
    assert abs(down.mean() - mask.mean()) < 0.01
    same = resize_mask(mask, mask.shape)
    assert same is not mask and np.array_equal(same, mask)
    with pytest.raises(ValueError, match='"shape"'):
        resize_mask(mask, (0, 10))


def test_lung_box_margin_and_clipping() -> None:
    mask = np.zeros((100, 200), dtype=bool)
    mask[20:60, 50:150] = True
    assert lung_box(mask, margin=0.0) == (20, 50, 60, 150)  # (top, left, bottom, right)
    assert lung_box(mask, margin=0.1) == (16, 40, 64, 160)
    assert lung_box(mask, margin=1.0) == (0, 0, 100, 200)
    with pytest.raises(ValueError, match='"mask" is empty'):
        lung_box(np.zeros((10, 10), dtype=bool))
    with pytest.raises(ValueError, match='"margin"'):
        lung_box(mask, margin=-0.1)


def test_lung_crop_blanks_outside_the_dilated_mask() -> None:
    image, mask = make_phantom((600, 500), seed=7)
    out = lung_crop(image, mask, 224)
    assert out.shape == (224, 224) and out.dtype == np.float32
    r0, c0, r1, c1 = lung_box(mask, 0.05)
    square_mask = square_resize(mask[r0:r1, c0:c1].astype(np.float32), 224) >= 0.5
    # Lungs kept, everything further than the dilation (2% of 224 ~ 4 px) from them blanked.
    assert np.all(out[square_mask] > 0)
    far = ~preprocess.ndimage.binary_dilation(square_mask, iterations=8)
    assert np.all(out[far] == PAD_VALUE)
    assert square_mask.mean() > 0.4  # the crop is mostly lung
    unmasked = lung_crop(image, mask, 224, apply_mask=False)
    assert (unmasked[far] > 0).mean() > 0.5  # mediastinum and surroundings still there


def test_lung_crop_same_geometry_whatever_the_source() -> None:
    # Same phantom at two sizes and the same anatomy with and without extra border: the crop is the same.
    small_img, small_mask = make_phantom((400, 400), seed=8)
    big_img, big_mask = make_phantom((1200, 1200), seed=8)
    a, b = lung_crop(small_img, small_mask, 224), lung_crop(big_img, big_mask, 224)
    assert np.array_equal(a > 0, b > 0) or np.mean((a > 0) != (b > 0)) < 0.01
    padded_img = np.pad(small_img, ((50, 50), (200, 200)))
    padded_mask = np.pad(small_mask, ((50, 50), (200, 200)))
    c = lung_crop(padded_img, padded_mask, 224)
    assert np.abs(a - c).max() < 1e-5


def test_lung_crop_arguments() -> None:
    image, mask = make_phantom((256, 256), seed=9)
    with pytest.raises(ValueError, match='"mask" has shape'):
        lung_crop(image, mask[:100], 128)
    with pytest.raises(ValueError, match='"mask" is empty'):
        lung_crop(image, np.zeros_like(mask), 128)
    with pytest.raises(ValueError, match='"dilation"'):
        lung_crop(image, mask, 128, dilation=0.9)


def test_uncrop_puts_a_crop_map_back_in_place() -> None:
    image, mask = make_phantom((500, 400), seed=10)
    box = lung_box(mask, 0.05)
    heat = np.ones((224, 224), dtype=np.float32)
    full = uncrop(heat, box, image.shape)
    r0, c0, r1, c1 = box
    assert full.shape == image.shape
    assert np.all(full[r0:r1, c0:c1] > 0.99)
    assert full.sum() == pytest.approx((r1 - r0) * (c1 - c0), rel=0.01)
    with pytest.raises(ValueError, match='"box"'):
        uncrop(heat, (0, 0, 600, 10), image.shape)


def test_postprocess_mask_keeps_two_largest_and_fills_holes() -> None:
    prob = np.zeros((200, 200), dtype=np.float32)
    prob[20:180, 20:90] = 0.9  # right lung
    prob[20:180, 110:180] = 0.8  # left lung
    prob[60:80, 40:60] = 0.1  # a hole inside the right lung
    prob[5:10, 5:10] = 0.95  # a speck
    prob[190:198, 100:108] = 0.7  # another speck
    mask = postprocess_mask(prob)
    assert mask.dtype == bool and mask.shape == prob.shape
    expected = np.zeros_like(mask)
    expected[20:180, 20:90] = True
    expected[20:180, 110:180] = True
    assert np.array_equal(mask, expected)
    # Above 0.85 only the right lung (its hole filled) and the first speck remain.
    assert postprocess_mask(prob, threshold=0.85).sum() == 160 * 70 + 25


def test_postprocess_mask_edge_cases() -> None:
    assert not postprocess_mask(np.zeros((50, 50), np.float32)).any()
    _, lungs = make_phantom((256, 256), seed=11)
    assert np.array_equal(postprocess_mask(lungs.astype(np.float32)), lungs)
    with pytest.raises(ValueError, match='"threshold"'):
        postprocess_mask(np.zeros((5, 5)), threshold=1.0)


def test_decode_and_square_resize_2000px_is_fast(dicom_factory) -> None:
    """A 2,000 x 2,000 12-bit CR: load_dicom + square_resize well under 0.2 s (a loose bound for CI)."""
    path: Path = dicom_factory(shape=(2000, 2000), window=(2048, 4096), seed=12)
    load_dicom(path)  # warm the page cache and imports
    times = []
    for _ in range(5):
        start = time.perf_counter()
        square_resize(load_dicom(path).pixels, 512)
        times.append(time.perf_counter() - start)
    assert statistics.median(times) < 0.2


def test_fill_holes_equals_scipy_binary_fill_holes() -> None:
    from scipy import ndimage

    rng = np.random.default_rng(11)
    for _ in range(200):
        shape = (int(rng.integers(1, 40)), int(rng.integers(1, 40)))
        binary = rng.random(shape) < rng.random()
        assert np.array_equal(preprocess.fill_holes(binary), ndimage.binary_fill_holes(binary))
    ring = np.zeros((9, 9), dtype=bool)
    ring[2:7, 2:7] = True
    ring[4, 4] = False  # a hole: filled
    ring[0, 0] = False
    assert preprocess.fill_holes(ring)[4, 4] and not preprocess.fill_holes(ring)[0, 0]
    assert preprocess.fill_holes(np.ones((3, 3), dtype=bool)).all()


def _postprocess_reference(prob: np.ndarray, threshold: float) -> np.ndarray | None:
    """postprocess_mask written with scipy.ndimage only; None when the second and third largest
    components have equal areas (which of them is kept depends on the labelling order)."""
    from scipy import ndimage

    binary = prob > threshold
    labels, count = ndimage.label(binary, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return binary
    if count > 2:
        sizes = np.bincount(labels.ravel())[1:]
        if np.sort(sizes)[-2] == np.sort(sizes)[-3]:
            return None
        binary = np.isin(labels, np.argsort(sizes)[-2:] + 1)
    return ndimage.binary_fill_holes(binary)


def test_postprocess_mask_equals_the_scipy_reference_on_random_maps() -> None:
    rng = np.random.default_rng(12)
    compared = 0
    for _ in range(400):
        shape = (int(rng.integers(2, 48)), int(rng.integers(2, 48)))
        prob = rng.random(shape).astype(np.float32) * rng.random()  # from empty to crowded
        expected = _postprocess_reference(prob, 0.3)
        if expected is not None:
            assert np.array_equal(postprocess_mask(prob, 0.3), expected)
            compared += 1
    assert compared > 200


def _as_set(labels: np.ndarray, count: int) -> set[tuple[int, ...]]:
    """Each component as the sorted tuple of its flat pixel indices (independent of the numbering)."""
    return {tuple(np.flatnonzero(labels == k)) for k in range(1, count + 1)}


def test_components_areas_and_centroids_match_scipy() -> None:
    from scipy import ndimage

    rng = np.random.default_rng(13)
    binary = rng.random((40, 60)) < 0.45
    for connectivity, structure in ((4, None), (8, np.ones((3, 3), dtype=bool))):
        labels, areas, centroids = preprocess.components(binary, connectivity)
        ref, count = ndimage.label(binary, structure=structure)
        assert len(areas) == count + 1 and areas[0] == (~binary).sum()
        assert _as_set(labels, count) == _as_set(ref, count)
        for k in range(1, count + 1):
            assert areas[k] == (labels == k).sum()
            assert np.allclose(centroids[k][::-1], ndimage.center_of_mass(labels == k))
    assert list(preprocess.largest(np.array([99, 5, 7, 7, 2]), 2)) == [2, 3]  # ties: lower label first
    with pytest.raises(ValueError, match="connectivity"):
        preprocess.components(binary, 6)
