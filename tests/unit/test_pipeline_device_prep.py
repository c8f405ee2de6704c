"""Device-side preprocessing (used on CUDA) agrees with the NumPy/Pillow preprocessing training uses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from inference import gpu_preprocess as gp
from inference import imaging
from inference.phantom import make_phantom
from inference.pipeline import Pipeline
from inference.types import StoredValues, XrayImage

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


@pytest.mark.parametrize("bundle", ["phantom_bundle", "phantom_bundle_whole", "phantom_bundle_square"])
def test_pipeline_results_agree_with_device_preprocessing(
    bundle: str, request: pytest.FixtureRequest
) -> None:
    path: Path = request.getfixturevalue(bundle)
    images = [XrayImage(make_phantom(shape, seed=30 + i)[0], f"p{i}", {}) for i, shape in enumerate(SHAPES)]
    images.append(XrayImage(make_phantom((512, 512), seed=3, lateral=True)[0], "lat", {}))
    # a second image of an earlier shape: the device path stacks images of one shape together
    images.append(XrayImage(make_phantom(SHAPES[1], seed=40)[0], "p1b", {}))
    cpu = Pipeline.from_bundle(path, device="cpu", device_preprocess=False)
    dev = Pipeline.from_bundle(path, device="cpu", device_preprocess=True)
    try:
        a, b = cpu.run(images), dev.run(images)
        plain = dev.run(images, explain=False)
    finally:
        cpu.close()
        dev.close()
    assert [r.probability for r in plain] == pytest.approx([r.probability for r in b], abs=1e-5)
    assert all(r.heatmap is None and r.lung_attention is None for r in plain)
    # the frontal phantoms reach stage 2 (stage 1 is fitted to phantoms), so the comparison below is not empty
    assert [r.probability is not None for r in a] == [True] * len(SHAPES) + [False, True]
    for ra, rb in zip(a, b, strict=True):
        assert ra.finding == rb.finding and ra.reason_code == rb.reason_code
        assert (ra.lung_mask == rb.lung_mask).mean() > 0.99
        if ra.probability is not None:
            assert rb.probability == pytest.approx(ra.probability, abs=0.02)
            assert rb.heatmap.shape == ra.heatmap.shape
            assert np.abs(rb.heatmap - ra.heatmap).mean() < 0.05
            assert rb.lung_attention == pytest.approx(ra.lung_attention, abs=0.05)


@pytest.mark.parametrize("explain", [True, False])
def test_a_batch_of_many_image_sizes_runs_the_networks_on_chunks_not_per_size(
    phantom_bundle_whole: Path, explain: bool
) -> None:
    shapes = [(300 + 10 * i, 470 - 10 * i) for i in range(6)] * 3 + [(512, 512)]  # 7 sizes, 19 images
    images = [XrayImage(make_phantom(shape, seed=50 + i)[0], f"m{i}", {}) for i, shape in enumerate(shapes)]
    dev = Pipeline.from_bundle(phantom_bundle_whole, device="cpu", device_preprocess=True)
    host = Pipeline.from_bundle(phantom_bundle_whole, device="cpu", device_preprocess=False)
    calls: dict[str, list[int]] = {"segmenter": [], "classifier": []}
    for name in calls:
        getattr(dev, name).register_forward_hook(
            lambda module, args, out, name=name: calls[name].append(len(args[0]))
        )
    try:
        a, b = dev.run(images, explain=explain), host.run(images, explain=explain)
    finally:
        dev.close()
        host.close()
    # one group per size; groups are run together once at least 16 images wait: two calls, not seven
    assert calls["segmenter"] == [18, 1]
    assert calls["classifier"] == ([19] if explain else [18, 1])
    assert [r.probability for r in a] == pytest.approx([r.probability for r in b], abs=0.02)
    assert all(r.probability is not None for r in a)


def test_without_the_cam_the_host_reads_no_result_from_the_device_before_the_last_chunk_is_queued(
    phantom_bundle_whole: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Reading a result back waits for the device: done per chunk, it would leave the device idle while the
    # host queues the next chunk's work. Stage 2's probabilities stay on the device until every chunk is
    # queued.
    images = [XrayImage(make_phantom((300, 300), seed=60 + i)[0], f"c{i}", {}) for i in range(40)]
    dev = Pipeline.from_bundle(phantom_bundle_whole, device="cpu", device_preprocess=True)
    events: list[str] = []
    for name in ("segmenter", "classifier"):
        getattr(dev, name).register_forward_hook(lambda module, args, out, name=name: events.append(name))

    def logged(method: Any) -> Any:
        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            events.append("read")
            return method(self, *args, **kwargs)
        return read

    try:
        expected = [r.probability for r in dev.run(images, explain=True)]
        # the calls that copy a device tensor to the host and wait for it (.numpy() takes host tensors only)
        for method in ("cpu", "tolist", "item"):
            monkeypatch.setattr(torch.Tensor, method, logged(getattr(torch.Tensor, method)))
        monkeypatch.setattr(dev, "_sync", logged(lambda self: None).__get__(dev))
        events.clear()
        plain = dev.run(images, explain=False)
    finally:
        monkeypatch.undo()
        dev.close()
    assert events.count("segmenter") == events.count("classifier") == 3  # chunks of 16, 16 and 8
    last_queued = max(i for i, e in enumerate(events) if e == "classifier")
    assert "read" not in events[:last_queued], events
    assert [r.probability for r in plain] == pytest.approx(expected, abs=1e-5)
    assert all(r.probability is not None for r in plain)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16])
def test_stored_values_upload_as_the_very_pixels_their_tables_give(dtype: type) -> None:
    rng = np.random.default_rng(7)
    info = np.iinfo(dtype)
    stored = []
    for shape in SHAPES:
        values = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
        values[0, 0], values[0, 1] = info.min, info.max  # both ends of the type: uint16 above 32767 included
        low = int(values.min())
        table = rng.random(int(values.max()) - low + 1, dtype=np.float32)
        stored.append(StoredValues(values=values, table=table, low=low))
    out, event = gp.upload_stored(stored, torch.device("cpu"))
    assert event is None and [tuple(t.shape) for t in out] == SHAPES
    assert gp.upload_stored([], torch.device("cpu")) == ([], None)
    for s, t in zip(stored, out, strict=True):
        assert t.dtype == torch.float32
        np.testing.assert_array_equal(t.numpy(), s.pixels())
        np.testing.assert_array_equal(t.numpy(), s.table[s.values.astype(np.int64) - s.low])
    with pytest.raises(ValueError, match="page-locked"):
        gp.upload_stored(stored, torch.device("cpu"), object())  # type: ignore[arg-type]
    wide = StoredValues(values=np.zeros((4, 4), np.int32), table=np.zeros(1, np.float32), low=0)
    with pytest.raises(ValueError, match="uint8, int8, uint16 or int16"):
        gp.upload_stored([wide], torch.device("cpu"))


@pytest.mark.parametrize("kwargs", [{}, {"photometric": "MONOCHROME1", "window": (2048.0, 4096.0)},
                                    {"bits_stored": 8}])
def test_the_device_path_gives_the_same_results_from_stored_values(phantom_bundle_whole: Path,
                                                                   kwargs: dict) -> None:
    from inference.phantom import make_dicom

    datasets = [make_dicom(shape=shape, seed=70 + i, **kwargs) for i, shape in enumerate(SHAPES)]
    dev = Pipeline.from_bundle(phantom_bundle_whole, device="cpu", device_preprocess=True)
    try:
        kept = [imaging.load_dicom(ds, allocate=dev.host_array) for ds in datasets]
        plain = [imaging.load_dicom(ds) for ds in datasets]
        assert all(im.stored is not None for im in kept) and all(im.stored is None for im in plain)
        a, b = dev.run(kept), dev.run(plain)
    finally:
        dev.close()
    assert all(r.probability is not None for r in a)
    for ra, rb in zip(a, b, strict=True):  # the same pixels on the device: the same results
        assert ra.probability == rb.probability and ra.lung_attention == rb.lung_attention
        np.testing.assert_array_equal(ra.lung_mask, rb.lung_mask)


def test_upload_returns_one_view_per_array_in_the_requested_dtype() -> None:
    rng = np.random.default_rng(4)
    arrays = [rng.random(shape, dtype=np.float32) for shape in SHAPES]
    out = gp.upload(arrays, torch.device("cpu"), torch.float16)
    assert [tuple(t.shape) for t in out] == SHAPES
    assert all(t.dtype == torch.float16 for t in out)
    for a, t in zip(arrays, out, strict=True):
        assert np.abs(t.float().numpy() - a).max() <= 2.5e-4  # float16 keeps [0, 1] to within 2^-12
    with pytest.raises(ValueError, match="2-D"):
        gp.upload([np.zeros(5, np.float32)], torch.device("cpu"))
    with pytest.raises(ValueError, match="chunk"):
        gp.upload(arrays, torch.device("cpu"), chunk=0)


@pytest.mark.parametrize("device_preprocess", [False, True])
def test_host_arrays_off_cuda_are_ordinary_and_shapes_are_checked(phantom_bundle: Path,
                                                                  device_preprocess: bool) -> None:
    pipeline = Pipeline.from_bundle(phantom_bundle, device="cpu", device_preprocess=device_preprocess)
    try:
        a = pipeline.host_array((30, 40))
        assert a is not None
        assert a.shape == (30, 40) and a.dtype == np.float32 and a.flags.c_contiguous and a.flags.writeable
        assert not gp.is_page_locked(a)
        # stored values: only the device path takes them
        for dtype in (np.uint8, np.int8, np.uint16, np.int16):
            s = pipeline.host_array((30, 40), dtype)
            if device_preprocess:
                assert s is not None and s.shape == (30, 40) and s.dtype == dtype and s.flags.c_contiguous
                assert not gp.stored_page_locked(s)
            else:
                assert s is None
        for bad in ((30,), (0, 4), (3.0, 4), [3, 4], (True, 4)):
            with pytest.raises(ValueError, match='"shape" must be a tuple of two positive integers'):
                pipeline.host_array(bad)  # type: ignore[arg-type]
        for kind in (np.float64, np.uint32, np.bool_):
            with pytest.raises(ValueError, match='"dtype" must be float32 or one of int16, int8, uint16'):
                pipeline.host_array((3, 4), kind)
    finally:
        pipeline.close()
    with pytest.raises(ValueError, match='"device" must be a CUDA device'):
        gp.upload_page_locked([a], torch.device("cpu"), None)  # type: ignore[arg-type]


def test_host_arrays_fall_back_to_ordinary_memory_when_page_locking_fails(
    phantom_bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pipeline = Pipeline.from_bundle(phantom_bundle, device="cpu", device_preprocess=True)
    # as on CUDA, but on a host without a GPU: page-locked memory cannot be had
    pipeline._copy_stream = object()  # type: ignore[assignment]
    try:
        arrays = [pipeline.host_array((20, 30)) for _ in range(3)]
        arrays.append(pipeline.host_array((20, 30), np.uint16))
    finally:
        pipeline.close()
    assert all(a is not None and a.shape == (20, 30) and not gp.stored_page_locked(a) for a in arrays)
    assert [a.dtype for a in arrays] == [np.float32] * 3 + [np.uint16]  # type: ignore[union-attr]
    warnings = [r for r in caplog.records if getattr(r, "action", "") == "page_locked_unavailable"]
    assert len(warnings) == 1  # logged once, not per image


def test_lung_boxes_of_a_batch_equal_one_box_at_a_time() -> None:
    masks = [torch.from_numpy(make_phantom(shape, seed=5 + i)[1]) for i, shape in enumerate(SHAPES)]
    corner = torch.zeros(40, 50, dtype=torch.bool)
    corner[0:3, 47:50] = True  # touching the edges: the margin is clipped to the image
    masks.append(corner)
    assert gp.lung_boxes(masks) == [gp.lung_box(m) for m in masks]
    assert gp.lung_boxes([]) == []
    with pytest.raises(ValueError, match="empty"):
        gp.lung_boxes([masks[0], torch.zeros(10, 10, dtype=torch.bool)])


def test_attention_sums_match_the_host_lung_attention() -> None:
    from inference.explain import lung_attention

    heat = np.random.default_rng(6).random((120, 90), dtype=np.float32)
    mask = np.zeros((120, 90), dtype=bool)
    mask[20:100, 10:40] = True
    inside, total = gp.attention(torch.from_numpy(heat), torch.from_numpy(mask)).tolist()
    assert inside / total == pytest.approx(lung_attention(heat, mask), rel=1e-9)
    assert total == pytest.approx(float(heat.sum(dtype=np.float64)), rel=1e-9)


def test_outputs_from_deferred_maps_match_the_host_path(phantom_bundle: Path) -> None:
    """The worker builds SR + SC from device-path results, whose maps are made on first read."""
    from dicom_node.config import ExportSettings
    from dicom_node.outputs import build_outputs, read_result
    from inference.phantom import make_dicom

    ds = make_dicom(shape=(300, 360), seed=21)
    image = imaging.load_dicom(ds)
    host = Pipeline.from_bundle(phantom_bundle, device="cpu", device_preprocess=False)
    dev = Pipeline.from_bundle(phantom_bundle, device="cpu", device_preprocess=True)
    try:
        (a,), (b,) = host.run([image]), dev.run([image])
    finally:
        host.close()
        dev.close()
    assert b.probability is not None and callable(b.__dict__["_heatmap"])  # still deferred here
    out_a = build_outputs(ds, image, a, host.bundle.card, ExportSettings())
    out_b = build_outputs(ds, image, b, dev.bundle.card, ExportSettings())
    assert [o.Modality for o in out_b] == [o.Modality for o in out_a] == ["OT", "SR"]
    sc_a, sc_b = out_a[0].pixel_array.astype(int), out_b[0].pixel_array.astype(int)
    assert sc_a.shape == sc_b.shape
    assert np.abs(sc_a - sc_b).mean() < 2.0  # the same overlay up to interpolation round-off
    assert read_result(out_b[1])["lung_attention"] == pytest.approx(b.lung_attention, abs=1e-3)


def test_batched_lung_crops_and_box_attention_equal_one_image_at_a_time() -> None:
    """The lung-crop path handles a batch of boxes of different sizes in one call each."""
    pixels, masks = [], []
    for i, shape in enumerate(SHAPES):
        p, m = make_phantom(shape, seed=7 + i)
        pixels.append(torch.from_numpy(p))
        masks.append(torch.from_numpy(m))
    boxes = gp.lung_boxes(masks)
    assert len({(r1 - r0, c1 - c0) for r0, c0, r1, c1 in boxes}) == len(SHAPES)  # no two boxes alike
    crops = gp.lung_crops(pixels, masks, 64, boxes)
    assert crops.shape == (len(SHAPES), 64, 64)
    # CAMs partly outside [0, 1], so that the clipping is exercised too
    noise = np.random.default_rng(1).random((len(SHAPES), 64, 64), dtype=np.float32)
    cams = torch.from_numpy(noise) * 1.2 - 0.1
    sums = gp.box_attention(cams, boxes, masks)
    for k, (r0, c0, r1, c1) in enumerate(boxes):
        assert torch.equal(crops[k], gp.lung_crop(pixels[k], masks[k], 64, boxes[k]))
        heat = gp.unsquare(cams[k], (r1 - r0, c1 - c0)).clamp_(0.0, 1.0)
        alone = gp.attention(heat, masks[k][r0:r1, c0:c1])
        assert sums[k].tolist() == pytest.approx(alone.tolist(), rel=1e-9)
        # and the same as the heatmap at source resolution: zero outside the box
        full = gp.uncrop(cams[k], boxes[k], tuple(masks[k].shape)).clamp_(0.0, 1.0)
        assert sums[k].tolist() == pytest.approx(gp.attention(full, masks[k]).tolist(), rel=1e-6)


def test_a_group_uploaded_into_one_buffer_is_stacked_without_a_copy() -> None:
    rng = np.random.default_rng(8)
    arrays = [rng.random((30, 40), dtype=np.float32) for _ in range(3)]
    group = gp.upload(arrays, torch.device("cpu"), torch.float32)
    assert group[0].untyped_storage().data_ptr() != group[1].untyped_storage().data_ptr()  # wrapped apart
    one = torch.from_numpy(np.stack(arrays))
    views = list(one)  # one buffer, one image after the other, as upload_stored and the CUDA uploads give
    stack = gp.stacked(views)
    assert stack.data_ptr() == one.data_ptr() and torch.equal(stack, one)
    stack2 = gp.stacked(group)  # separate buffers: copied
    assert stack2.data_ptr() != group[0].data_ptr() and torch.equal(stack2, one)
    # views of one buffer out of order, or with a gap, are copied
    for parts in ([views[1], views[0], views[2]], [views[0], views[2]]):
        out = gp.stacked(parts)
        assert out.data_ptr() != one.data_ptr() and torch.equal(out, torch.stack(parts))
    stored = [StoredValues(values=rng.integers(0, 4096, (30, 40)).astype(np.uint16),
                           table=rng.random(4096, dtype=np.float32), low=0) for _ in range(3)]
    looked_up, _ = gp.upload_stored(stored, torch.device("cpu"))
    assert gp.stacked(looked_up).data_ptr() == looked_up[0].data_ptr()
