"""The two-stage pipeline on synthetic phantoms: well-formed results, reasons, batching, device handling."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from dicom_node.errors import ModelBundleError
from inference.bundle import make_random_bundle
from inference.explain import lung_attention
from inference.imaging import load_dicom, lung_box, lung_crop, square_resize
from inference.phantom import make_dicom, make_phantom
from inference.pipeline import Pipeline
from inference.types import XrayImage
from tests.fixtures.models import PHANTOM_FIT_STEPS

pytestmark = pytest.mark.unit

SHAPES = [(512, 512), (400, 600), (640, 400)]


@pytest.fixture(scope="module")
def pipeline(phantom_bundle: Path) -> Iterator[Pipeline]:
    p = Pipeline.from_bundle(phantom_bundle, device="cpu", cam="gradcam++")
    yield p
    p.close()


def _phantom(shape: tuple[int, int], seed: int, **kw: object) -> tuple[XrayImage, np.ndarray]:
    pixels, mask = make_phantom(shape, seed=seed, **kw)
    meta = {"modality": "CR", "body_part": "CHEST", "view_position": "PA"}
    return XrayImage(pixels, f"phantom-{seed}", meta), mask


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_results_are_well_formed(pipeline: Pipeline) -> None:
    cases = [_phantom(shape, seed=10 + i, opacity=0.4 * i) for i, shape in enumerate(SHAPES)]
    results = pipeline.run([img for img, _ in cases])
    assert len(results) == len(cases)
    for (img, truth), r in zip(cases, results, strict=True):
        assert r.finding in ("positive", "negative"), r.reason
        assert r.finding == ("positive" if r.probability >= r.threshold else "negative")
        assert isinstance(r.probability, float) and r.threshold == pipeline.bundle.threshold == 0.5
        assert r.heatmap is not None and r.heatmap.shape == img.pixels.shape and r.heatmap.dtype == np.float32
        assert 0.0 <= float(r.heatmap.min()) and float(r.heatmap.max()) <= 1.0
        assert r.lung_attention is not None and 0.0 <= r.lung_attention <= 1.0
        assert r.lung_mask is not None and r.lung_mask.shape == img.pixels.shape and r.lung_mask.dtype == bool
        assert _dice(r.lung_mask, truth) > 0.8
        assert r.lung_fraction == pytest.approx(float(r.lung_mask.mean()))
        # Lung crop mode: no heat outside the crop box.
        r0, c0, r1, c1 = lung_box(r.lung_mask)
        outside = r.heatmap.copy()
        outside[r0:r1, c0:c1] = 0
        assert not outside.any()
        assert r.model_version == "0.0.0-test" and r.model_name
        stages = {"header", "preprocess", "stage1", "postprocess", "plausibility", "stage2", "cam",
                  "explain_map", "total"}
        assert set(r.timings) == stages


def test_whole_image_mode(phantom_bundle_whole: Path) -> None:
    p = Pipeline.from_bundle(phantom_bundle_whole, device="cpu", cam="gradcam")
    seen: list[torch.Tensor] = []
    p.classifier.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    try:
        img, _ = _phantom((480, 600), seed=3)
        (r,) = p.run([img])
    finally:
        p.close()
    assert r.finding in ("positive", "negative"), r.reason
    # stage 2 sees the whole image, padded to a square and resized, not a lung crop
    (x,) = seen
    expected = square_resize(img.pixels, p.bundle.classifier_size)
    np.testing.assert_allclose((x[0, 0] * p.bundle.std + p.bundle.mean).numpy(), expected, atol=1e-5)
    assert r.heatmap is not None and r.heatmap.shape == (480, 600)
    if r.heatmap.any():
        assert r.lung_attention == pytest.approx(lung_attention(r.heatmap, r.lung_mask))
    else:  # no evidence for covid19 anywhere: attention is undefined, not 0
        assert r.lung_attention is None


def test_square_mode_classifies_the_centre_square_so_padding_bars_change_nothing(
    phantom_bundle_square: Path, phantom_bundle_whole: Path
) -> None:
    image, _ = _phantom((480, 480), seed=4)
    wide = XrayImage(np.pad(image.pixels, ((0, 0), (80, 80))), "wide", image.meta)  # a 4:3 film's bars
    probabilities = {}
    for name, path in (("square", phantom_bundle_square), ("whole", phantom_bundle_whole)):
        p = Pipeline.from_bundle(path, device="cpu", cam="gradcam")
        try:
            plain, barred = p.run([image, wide])
        finally:
            p.close()
        assert plain.probability is not None and barred.probability is not None, (plain.reason, barred.reason)
        probabilities[name] = (plain.probability, barred.probability)
        if name == "square":
            assert barred.heatmap.shape == (480, 640)
            assert not barred.heatmap[:, :80].any() and not barred.heatmap[:, 560:].any()
    assert probabilities["square"][1] == pytest.approx(probabilities["square"][0], abs=1e-6)
    assert abs(probabilities["whole"][1] - probabilities["whole"][0]) > 1e-4  # the bars reach the whole image


def test_a_film_stored_turned_gets_the_answer_of_the_same_film_stored_upright(
    pipeline: Pipeline, dicom_factory
) -> None:
    upright = pydicom.dcmread(dicom_factory(shape=(400, 560), seed=5, opacity=0.4))
    turned = copy.deepcopy(upright)
    turned.PixelData = np.ascontiguousarray(upright.pixel_array.T[::-1]).tobytes()  # stored as F\\R
    turned.Rows, turned.Columns = upright.Columns, upright.Rows
    turned.PatientOrientation = ["F", "R"]
    unlabelled = copy.deepcopy(turned)
    del unlabelled.PatientOrientation
    a, b, c = pipeline.run([load_dicom(upright), load_dicom(turned), load_dicom(unlabelled)])
    assert a.probability is not None and b.probability is not None, (a.reason, b.reason)
    assert b.probability == pytest.approx(a.probability, abs=1e-6)
    np.testing.assert_allclose(b.heatmap, a.heatmap, atol=1e-5)
    assert np.array_equal(b.lung_mask, a.lung_mask)
    # the same pixels without the orientation that says how they are stored: the model sees them on their side
    assert c.probability is None or abs(c.probability - a.probability) > 1e-4


def test_an_int8_ensemble_bundle_runs_with_and_without_explanations(tmp_path: Path) -> None:
    path = make_random_bundle(tmp_path / "ens", cls_arch="resnet18", seg_size=64, cls_size=64,
                              crop_mode="whole", fit_segmenter_steps=PHANTOM_FIT_STEPS, members=2,
                              int8_classifier=True)
    p = Pipeline.from_bundle(path, device="cpu", cam="gradcam++")
    try:
        assert p.bundle.classifier_members == 2 and len(p.target_layers) == 2
        images = [_phantom(shape, seed=20 + i)[0] for i, shape in enumerate(SHAPES)]
        explained, plain = p.run(images), p.run(images, explain=False)
    finally:
        p.close()
    assert all(r.probability is not None for r in explained), [r.reason for r in explained]
    for a, b in zip(explained, plain, strict=True):
        # the explained path averages the members' logits itself; the plain path runs the ensemble's forward
        assert a.probability == pytest.approx(b.probability, abs=1e-5)
        assert a.heatmap is not None and a.heatmap.shape == a.lung_mask.shape and b.heatmap is None
        assert a.lung_attention is None or 0.0 <= a.lung_attention <= 1.0


def test_not_assessable_reasons_come_through_in_order(pipeline: Pipeline) -> None:
    frontal, _ = _phantom((512, 512), seed=1)
    lateral_content, _ = _phantom((512, 512), seed=2, lateral=True)
    lateral_content.meta = {"modality": "CR", "body_part": "CHEST"}  # nothing in the header says lateral
    tiny, _ = _phantom((120, 120), seed=3)
    hand = XrayImage(frontal.pixels, "hand", {"modality": "CR", "body_part": "HAND"})
    lateral_header = XrayImage(frontal.pixels, "ll", {"modality": "DX", "view_position": "LL"})
    blank = XrayImage(np.zeros((512, 512), np.float32), "blank", {})
    child = XrayImage(frontal.pixels, "child", {"modality": "CR", "age_years": 7.0, "age_source": "x"})
    images = [lateral_content, frontal, tiny, hand, lateral_header, blank, child]
    results = pipeline.run(images)
    codes = [r.reason_code for r in results]
    assert codes[0] == "lateral"
    assert results[0].reason == "one lung field only: a lateral view or not a frontal chest radiograph"
    assert codes[1:] == ["", "too_small", "not_chest", "lateral", "no_lungs", "child"]
    assert results[1].finding in ("positive", "negative")
    for r in results[:1] + results[2:]:
        assert r.finding == "not_assessable" and r.probability is None and r.heatmap is None
        assert r.reason and r.model_version == "0.0.0-test"


@pytest.mark.parametrize("seed", [2, 7, 13])
def test_a_lateral_film_by_content_is_one_lung_field(pipeline: Pipeline, seed: int) -> None:
    image, _ = _phantom((480, 560), seed=seed, lateral=True)
    image.meta = {"modality": "CR", "body_part": "CHEST"}
    (r,) = pipeline.run([image])
    assert (r.finding, r.reason_code) == ("not_assessable", "lateral"), r.reason
    assert r.lung_fraction is not None and r.lung_fraction > pipeline.min_lung_fraction  # a lung was found


def test_a_film_on_its_side_is_not_two_lungs_side_by_side(pipeline: Pipeline) -> None:
    """A frontal film stored turned by 90 degrees (no header to say so): the two lungs lie one above the
    other."""
    images = [XrayImage(np.ascontiguousarray(make_phantom((512, 512), seed=s)[0].T), f"side-{s}",
                        {"modality": "CR", "body_part": "CHEST"}) for s in (0, 3)]
    for r in pipeline.run(images):
        assert (r.finding, r.reason_code) == ("not_assessable", "no_lungs"), r.reason
        assert r.reason == "the segmented regions are not two lungs side by side"
        assert r.probability is None and r.heatmap is None and r.lung_mask is not None


def test_lung_area_out_of_range_is_not_assessable(pipeline: Pipeline, phantom_bundle: Path) -> None:
    # the turned film also fails the shape check: the area is checked first
    upright, _ = _phantom((512, 512), seed=1)
    turned = XrayImage(np.ascontiguousarray(upright.pixels.T), "side", upright.meta)
    texts = {
        "max": "implausible lung segmentation (lung area {:.1%} of the image)",
        "min": "no lung fields found (lung area {:.1%} of the image)",
    }
    for bound, limits in (("max", {"max_lung_fraction": 0.15}), ("min", {"min_lung_fraction": 0.4})):
        p = Pipeline.from_bundle(phantom_bundle, device="cpu", prep_workers=1, **limits)
        try:
            results = p.run([upright, turned])
        finally:
            p.close()
        for r in results:
            assert (r.finding, r.reason_code) == ("not_assessable", "no_lungs"), r.reason
            assert r.lung_fraction is not None and 0.15 < r.lung_fraction < 0.4
            assert r.reason == texts[bound].format(r.lung_fraction)
    (plain,) = pipeline.run([upright])  # within the default bounds
    assert plain.finding in ("positive", "negative"), plain.reason


def _blobs(*boxes: tuple[int, int, int, int], shape: tuple[int, int] = (100, 100)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    for r0, c0, r1, c1 in boxes:
        mask[r0:r1, c0:c1] = True
    return mask


SIDE_BY_SIDE = "the segmented regions are not two lungs side by side"
ONE_LUNG = "one lung field only: a lateral view or not a frontal chest radiograph"


@pytest.mark.parametrize(
    ("mask", "expected"),
    [
        (_blobs((20, 10, 80, 40), (20, 60, 80, 90)), None),  # two lungs side by side
        (_blobs((10, 30, 40, 70), (60, 30, 90, 70)), ("no_lungs", SIDE_BY_SIDE)),  # stacked
        (_blobs((5, 10, 35, 40), (65, 60, 95, 90)), ("no_lungs", SIDE_BY_SIDE)),  # diagonal
        (_blobs((20, 35, 80, 44), (20, 46, 80, 55)), ("no_lungs", SIDE_BY_SIDE)),  # level but too close
        (_blobs((20, 20, 80, 80)), ("lateral", ONE_LUNG)),  # one blob
        (_blobs((20, 10, 80, 40), (45, 70, 55, 80)), ("lateral", ONE_LUNG)),  # second blob tiny
        (np.zeros((100, 100), bool), ("lateral", ONE_LUNG)),
    ],
    ids=["two-lungs", "stacked", "diagonal", "close", "one-blob", "tiny-second", "empty"],
)
def test_shape_check_on_crafted_masks(mask: np.ndarray, expected: tuple[str, str] | None) -> None:
    assert Pipeline._shape_problem(mask) == expected


def test_fraction_check_bounds(pipeline: Pipeline) -> None:
    assert pipeline._fraction_problem(0.3) is None
    assert pipeline._fraction_problem(0.70) is None and pipeline._fraction_problem(0.05) is None  # bounds in
    assert pipeline._fraction_problem(0.04) == (
        "no_lungs", "no lung fields found (lung area 4.0% of the image)")
    assert pipeline._fraction_problem(0.75) == (
        "no_lungs", "implausible lung segmentation (lung area 75.0% of the image)")


def test_lung_mode_feeds_stage_2_the_masked_lung_crop(pipeline: Pipeline) -> None:
    assert pipeline.bundle.crop_mode == "lung"
    seen: list[torch.Tensor] = []
    handle = pipeline.classifier.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].detach().clone()))
    images = [_phantom(shape, seed=80 + i, opacity=0.3)[0] for i, shape in enumerate(SHAPES[:2])]
    try:
        results = pipeline.run(images, explain=False)
    finally:
        handle.remove()
    (x,) = seen
    size = pipeline.bundle.classifier_size
    got = (x[:, 0] * pipeline.bundle.std + pipeline.bundle.mean).numpy()
    for img, r, crop in zip(images, results, got, strict=True):
        assert r.lung_mask is not None, r.reason
        expected = lung_crop(img.pixels, r.lung_mask, size)
        np.testing.assert_allclose(crop, expected, atol=1e-5)
        # the mask blanks the surroundings: without it, the crop would differ
        assert np.abs(lung_crop(img.pixels, r.lung_mask, size, apply_mask=False) - expected).max() > 0.1


def test_cpu_threads_sets_torch_threads(phantom_bundle: Path) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        Pipeline.from_bundle(phantom_bundle, device="cpu", prep_workers=1, cpu_threads=0).close()
        assert torch.get_num_threads() == 3  # 0 keeps the current setting
        Pipeline.from_bundle(phantom_bundle, device="cpu", prep_workers=1, cpu_threads=1).close()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("device_preprocess", [False, True])
def test_stage_2_runs_in_inference_mode_unless_explaining(phantom_bundle: Path,
                                                         device_preprocess: bool) -> None:
    p = Pipeline.from_bundle(phantom_bundle, device="cpu", device_preprocess=device_preprocess)
    modes: list[tuple[bool, bool]] = []
    p.classifier.register_forward_hook(
        lambda module, args, out: modes.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled())))
    image = _phantom((320, 320), seed=90)[0]
    try:
        (plain,) = p.run([image], explain=False)
        plain_modes, modes[:] = list(modes), []
        (explained,) = p.run([image], explain=True)
    finally:
        p.close()
    assert plain.probability is not None and explained.probability is not None, (plain.reason,
                                                                                  explained.reason)
    assert plain_modes == [(True, False)]
    assert modes == [(False, True)]  # the CAM needs gradients
    assert explained.heatmap is not None and plain.heatmap is None


def test_probability_is_the_same_without_explanation(pipeline: Pipeline) -> None:
    images = [_phantom(shape, seed=20 + i)[0] for i, shape in enumerate(SHAPES)]
    with_cam = pipeline.run(images, explain=True)
    without = pipeline.run(images, explain=False)
    for a, b in zip(with_cam, without, strict=True):
        assert a.probability == pytest.approx(b.probability, abs=1e-5)
        assert b.heatmap is None and b.lung_attention is None and "cam" not in b.timings


def test_batches_larger_than_max_batch_are_split(pipeline: Pipeline, phantom_bundle: Path) -> None:
    p = Pipeline.from_bundle(phantom_bundle, device="cpu", max_batch=2, prep_workers=1)
    sizes: dict[str, list[int]] = {"stage1": [], "stage2": []}
    for name, model in (("stage1", p.segmenter), ("stage2", p.classifier)):
        model.register_forward_pre_hook(lambda module, args, key=name: sizes[key].append(len(args[0])))
    images = [_phantom((300, 300), seed=40 + i)[0] for i in range(5)]
    try:
        results = p.run(images)
    finally:
        p.close()
    assert all(r.finding in ("positive", "negative") for r in results), [r.reason for r in results]
    assert sizes == {"stage1": [2, 2, 1], "stage2": [2, 2, 1]}
    whole = pipeline.run(images)  # max_batch 64: one batch
    assert [r.probability for r in results] == pytest.approx([r.probability for r in whole], abs=1e-5)


def test_no_hooks_or_gradients_left_on_the_model(pipeline: Pipeline) -> None:
    for _ in range(3):
        pipeline.run([_phantom((300, 300), seed=60)[0]])
    for model in (pipeline.classifier, pipeline.segmenter):
        assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
        assert all(p.grad is None for p in model.parameters())


def test_a_monochrome1_dicom_gets_the_answer_of_its_monochrome2_twin(pipeline: Pipeline,
                                                                    tmp_path: Path) -> None:
    for photometric in ("MONOCHROME1", "MONOCHROME2"):
        make_dicom(tmp_path / f"{photometric}.dcm", shape=(512, 512), photometric=photometric, seed=5)
    inverted, plain = (load_dicom(tmp_path / f"{p}.dcm") for p in ("MONOCHROME1", "MONOCHROME2"))
    a, b = pipeline.run([inverted, plain])
    assert a.probability is not None and b.probability is not None, (a.reason, b.reason)
    assert a.probability == pytest.approx(b.probability, abs=1e-5)
    assert np.array_equal(a.lung_mask, b.lung_mask)
    np.testing.assert_allclose(a.heatmap, b.heatmap, atol=1e-4)
    assert _dice(a.lung_mask, make_phantom((512, 512), seed=5)[1]) > 0.8  # the lungs, not their inverse


def test_arguments_are_checked(phantom_bundle: Path) -> None:
    with pytest.raises(ValueError, match='"cam"'):
        Pipeline.from_bundle(phantom_bundle, cam="scorecam")
    with pytest.raises(ValueError, match='"device"'):
        Pipeline.from_bundle(phantom_bundle, device="tpu")
    with pytest.raises(ValueError, match='"cpu_threads"'):
        Pipeline.from_bundle(phantom_bundle, cpu_threads=-1)
    with pytest.raises(TypeError, match='"images"'):
        Pipeline.from_bundle(phantom_bundle, device="cpu").run(_phantom((300, 300), seed=1)[0])  # type: ignore[arg-type]
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            Pipeline.from_bundle(phantom_bundle, device="cuda")


def test_without_a_default_model_the_error_says_to_give_one(monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    import inference.bundle

    monkeypatch.setattr(inference.bundle, "default_bundle_path", lambda: tmp_path)
    with pytest.raises(ModelBundleError, match="no default model is installed .* give a bundle with --model"):
        Pipeline.from_bundle(None)


def test_deferred_maps_are_made_once_on_first_read() -> None:
    from inference.types import Result

    made: list[int] = []

    def factory() -> np.ndarray:
        made.append(1)
        return np.full((4, 5), 0.5, dtype=np.float32)

    r = Result(finding="negative", probability=0.2, threshold=0.5)
    r.defer("heatmap", factory)
    assert made == []  # nothing computed until somebody reads it
    assert "heatmap" not in repr(r)  # repr never forces the maps
    assert r.heatmap is not None and r.heatmap.shape == (4, 5)
    assert r.heatmap is r.heatmap and made == [1]
    assert r.lung_mask is None
    with pytest.raises(ValueError, match="defer"):
        r.defer("probability", factory)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="numpy array"):
        Result(finding="negative", probability=0.2, threshold=0.5, lung_mask=[[True]])  # type: ignore[arg-type]


def test_device_path_defers_full_resolution_maps(phantom_bundle: Path) -> None:
    p = Pipeline.from_bundle(phantom_bundle, device="cpu", device_preprocess=True)
    try:
        (res,) = p.run([XrayImage(make_phantom((300, 420), seed=8)[0], "p", {})])
    finally:
        p.close()
    assert res.probability is not None and res.lung_attention is not None
    # deferred: stored as functions until read, then arrays at source resolution
    assert callable(res.__dict__["_heatmap"]) and callable(res.__dict__["_lung_mask"])
    assert res.heatmap.shape == res.lung_mask.shape == (300, 420)
    assert res.lung_mask.dtype == bool and res.heatmap.dtype == np.float32
    assert not callable(res.__dict__["_heatmap"])


@pytest.mark.parametrize("device_preprocess", [False, True])
@pytest.mark.parametrize("crop_mode", ["whole", "lung"])
def test_an_equalising_bundle_feeds_stage_2_equalised_images(tmp_path: Path, crop_mode: str,
                                                            device_preprocess: bool) -> None:
    """What reaches stage 2's first layer, on both preprocessing paths, with and without Grad-CAM: each
    image's non-background pixels spread evenly over (0, 1], the background at 0 (a plain bundle's: see
    below)."""
    path = make_random_bundle(tmp_path / crop_mode, cls_arch="resnet18", seg_size=64, cls_size=64,
                              crop_mode=crop_mode, fit_segmenter_steps=PHANTOM_FIT_STEPS, equalize=True)
    p = Pipeline.from_bundle(path, device="cpu", device_preprocess=device_preprocess)
    seen: list[torch.Tensor] = []
    p.classifier.register_forward_hook(lambda module, args, out: seen.append(args[0].detach().clone()))
    try:
        images = [_phantom(shape, seed=70 + i, opacity=0.3)[0] for i, shape in enumerate(SHAPES)]
        explained, plain = p.run(images), p.run(images, explain=False)
    finally:
        p.close()
    assert all(r.probability is not None for r in explained), [r.reason for r in explained]
    assert [r.probability for r in plain] == pytest.approx([r.probability for r in explained], abs=1e-5)
    batch = torch.cat(seen) * p.bundle.std + p.bundle.mean  # back to [0, 1]
    assert len(batch) == 2 * len(SHAPES)
    for img in batch.flatten(1):
        shares = img[img > 0].sort().values
        assert float(img.min()) == pytest.approx(0.0, abs=1e-6) and float(shares[-1]) == pytest.approx(1.0)
        assert _spread(shares) < 0.02  # evenly spread


def _spread(shares: torch.Tensor) -> float:
    """Largest gap between the k-th smallest of n sorted values and k/n."""
    return float((shares - torch.arange(1, len(shares) + 1) / len(shares)).abs().max())


def test_a_plain_bundle_feeds_stage_2_the_images_as_they_are(phantom_bundle_whole: Path) -> None:
    p = Pipeline.from_bundle(phantom_bundle_whole, device="cpu")
    seen: list[torch.Tensor] = []
    p.classifier.register_forward_hook(lambda module, args, out: seen.append(args[0].detach().clone()))
    try:
        p.run([_phantom(SHAPES[1], seed=70, opacity=0.3)[0]], explain=False)
    finally:
        p.close()
    img = (seen[0] * p.bundle.std + p.bundle.mean).flatten()
    assert _spread(img[img > 0].sort().values) > 0.1
