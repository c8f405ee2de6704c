"""The device path of :class:`inference.pipeline.Pipeline` (the default on CUDA).

A batch is uploaded, resized, cropped and scored on the device: images decoded with
:meth:`Pipeline.host_array` as their stored values (1 or 2 bytes a pixel, page-locked), looked up in their
tables on the device, on a copy stream; other images decoded into page-locked memory as they are, on that
stream too; the rest converted to float16 on the way. Only stage 1's small probability maps (for the
connected-component post-processing and the plausibility checks), the CAMs and a few numbers per image come
back. An upload thread copies one group of images while stage 1 runs on the group before, without waiting for
the device, and each group's masks are post-processed by the pipeline's thread pool while the next group is
segmented. On the whole image (or its centre square), stage 2 runs before the masks are in: without the CAM
chunk by chunk too, beside the next group's copy, its probabilities left on the device and read once for the
batch, so that the host queues the next group's work while the device runs this one's. Groups of different
image sizes are resized apart, then segmented and classified together once about ``DEVICE_GROUP`` images wait.
The full-resolution lung mask and heatmap of each result are then made on first access, from those small maps,
by the same functions the CPU path uses.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from inference import gpu_preprocess as gp
from inference import imaging
from inference.batch import DEVICE_GROUP, Work, by_shape, heatmap_at_source, mask_at_source
from inference.explain import attention_ratio
from inference.types import XrayImage

if TYPE_CHECKING:
    from inference.pipeline import Pipeline


def upload_group(
    pipe: Pipeline, images: list[XrayImage], dtype: torch.dtype
) -> tuple[list[torch.Tensor], torch.cuda.Event | None]:
    """One group's images on the device, and the event to wait for when they came by the copy stream: from
    their stored values when the decoder kept them all (by the copy stream when page-locked), else from their
    pixels."""
    kept = [im.stored for im in images if im.stored is not None]
    if len(kept) == len(images):
        locked = pipe._copy_stream is not None and all(gp.stored_page_locked(s.values) for s in kept)
        return gp.upload_stored(kept, pipe.device, pipe._copy_stream if locked else None)
    arrays = [im.pixels for im in images]
    if pipe._copy_stream is not None and all(gp.is_page_locked(a) for a in arrays):
        return gp.upload_page_locked(arrays, pipe.device, pipe._copy_stream)
    return gp.upload(arrays, pipe.device, dtype), None


def run_device(pipe: Pipeline, work: list[Work], explain: bool) -> None:
    """Upload, resizing, cropping and lung attention on the device, one call per group of images.

    Images of one shape (the usual case: one modality) are stacked in groups (``by_shape``) and resized,
    mapped back and scored together, so the cost per batch does not grow with per-image kernel
    launches. Uploads and stage 1 go group by group, so that the next group's copy (and the host's
    conversion, for images not in page-locked memory) and the mask post-processing of the last overlap the
    device's work. On CUDA the ``preprocess`` and ``stage1`` timings (and ``stage2`` without the CAM) are the
    host's time to wait for an upload and to queue the work.
    """
    pipe._map(pipe._check_header, work)
    todo = [w for w in work if w.result is None]
    if not todo:
        return
    seg, size = pipe.bundle.segmenter_size, pipe.bundle.classifier_size
    mode = pipe.bundle.crop_mode
    lung_mode = mode == "lung"
    groups = by_shape(todo)
    dtype = torch.float16 if pipe.device.type == "cuda" else torch.float32
    assert pipe._uploader is not None
    # The upload thread copies the groups in order (converting images not in page-locked memory), so that one
    # group's upload overlaps the kernel launches and the device work of the one before.
    uploads = [
        pipe._uploader.submit(upload_group, pipe, [todo[i].image for i in idx], dtype)
        for _, idx in groups
    ]
    pixels: list[torch.Tensor | None] = [None] * len(todo)  # kept for the lung crop
    # On the whole image (or its centre square) stage 2 does not depend on stage 1, so it runs before the
    # masks are in; images found not assessable are dropped below. Without the CAM it runs chunk by chunk,
    # beside the next group's copy.
    # With the CAM it runs once for the batch: the CAM's host work per call favours one large call (networks
    # + CAM on an H100: about 700 images/s in calls of 64, 584 in calls of 16).
    early_p = None if lung_mode else np.empty(len(todo))
    early_cams: np.ndarray | None = None
    on_device: list[tuple[list[int], torch.Tensor]] = []  # without the CAM: (positions, P(covid19)) per chunk
    whole = torch.empty((len(todo), size, size), device=pipe.device) if not lung_mode and explain else None
    waits: list[Callable[[], None]] = []
    # Resized groups wait here until DEVICE_GROUP images are together: a batch of many image sizes still runs
    # the networks on chunks of about DEVICE_GROUP, not once per size.
    chunk: list[tuple[list[int], torch.Tensor, torch.Tensor | None]] = []

    def run_chunk() -> None:
        """Stage 1 on the waiting groups without waiting for the device: their masks go to the pool, whose
        tasks wait for these maps, so the host post-processes them while the device goes on."""
        idx = [i for part, _, _ in chunk for i in part]
        items = [todo[i] for i in idx]
        x1 = torch.cat([small for _, small, _ in chunk])
        x2 = None if lung_mode else torch.cat([c for _, _, c in chunk if c is not None])
        chunk.clear()
        t1 = time.perf_counter()
        probs, ready = pipe._stage1_async(pipe._normalise(x1[:, None]))
        pipe._share(items, "stage1", time.perf_counter() - t1)
        for w, prob in zip(items, probs, strict=True):
            w.x1 = prob
        waits.append(pipe._start(functools.partial(pipe._small_mask, ready=ready), items))
        if whole is not None and x2 is not None:
            whole[idx] = x2
        elif early_p is not None and x2 is not None:
            on_device.append((idx, pipe._probabilities(items, pipe._normalise(x2[:, None]))))

    try:
        for (shape, idx), upload in zip(groups, uploads, strict=True):
            t0 = time.perf_counter()
            group, copied = upload.result()
            if copied is not None:
                stream = torch.cuda.current_stream(pipe.device)
                stream.wait_event(copied)
                for px in group:
                    px.record_stream(stream)
            stack = gp.stacked(group).float()  # one buffer already: no copy of the full-resolution images
            x2 = None
            if mode == "square":
                r0, c0, r1, c1 = box = imaging.centre_box(shape)
                x2 = gp.square_resize(stack[:, r0:r1, c0:c1], size)
                for i in idx:
                    todo[i].box = box
            elif not lung_mode:
                x2 = gp.square_resize(stack, size)
            chunk.append((idx, gp.square_resize(stack, seg), x2))
            if lung_mode:
                for i, px in zip(idx, group, strict=True):
                    pixels[i] = px
            del stack, group, x2
            pipe._share([todo[i] for i in idx], "preprocess", time.perf_counter() - t0)
            if sum(len(part) for part, _, _ in chunk) >= DEVICE_GROUP:
                run_chunk()
        if chunk:
            run_chunk()
        if whole is not None and early_p is not None:
            early_p[:], early_cams = pipe._stage2(todo, pipe._normalise(whole[:, None]), explain)
            whole = None
        if on_device and early_p is not None:
            order = [i for idx, _ in on_device for i in idx]
            early_p[order] = torch.cat([p for _, p in on_device]).cpu().numpy()
            on_device.clear()
    finally:
        for upload in uploads:
            upload.cancel()  # after a failure: the groups not started yet
        t0 = time.perf_counter()
        for wait in waits:
            wait()
        pipe._share(todo, "mask_wait", time.perf_counter() - t0)

    t0 = time.perf_counter()
    small = torch.from_numpy(np.stack([w.small for w in todo])).to(pipe.device)  # type: ignore[misc]
    masks: list[torch.Tensor] = [small] * len(todo)  # each image's (rows, columns) bool mask
    counts = torch.empty(len(todo), dtype=torch.int64, device=pipe.device)
    for shape, idx in groups:
        stacked = gp.unsquare(small[idx].float(), shape) >= 0.5
        counts[idx] = stacked.sum(dim=(1, 2))
        for k, i in enumerate(idx):
            masks[i] = stacked[k]
    for w, count in zip(todo, counts.cpu().tolist(), strict=True):
        w.lung_fraction = count / w.image.pixels.size
        w.mask = functools.partial(mask_at_source, w.small, w.image.pixels.shape)  # type: ignore[arg-type]
    for w in todo:
        pipe._check_plausible(w)
    pipe._share(todo, "postprocess", time.perf_counter() - t0)
    keep = [i for i, w in enumerate(todo) if w.result is None]
    if not keep:
        return

    kept = [todo[i] for i in keep]
    if early_p is not None:
        p, cams = early_p[keep], None if early_cams is None else early_cams[keep]
    else:
        t0 = time.perf_counter()
        boxes = gp.lung_boxes([masks[i] for i in keep])
        for w, box in zip(kept, boxes, strict=True):
            w.box = box
        x2 = gp.lung_crops(
            [pixels[i] for i in keep],  # type: ignore[misc]
            [masks[i] for i in keep],
            size,
            boxes,
        )
        del pixels
        x = pipe._normalise(x2[:, None])
        pipe._sync()
        pipe._share(kept, "preprocess", time.perf_counter() - t0)
        p, cams = pipe._stage2(kept, x, explain)

    t0 = time.perf_counter()
    att: list[float | None] = [None] * len(kept)
    if cams is not None:
        cams_dev = torch.from_numpy(cams).to(pipe.device)
        sums = torch.empty((len(kept), 2), dtype=torch.float64, device=pipe.device)
        if mode != "whole":
            # the heatmap is zero outside the crop box: both sums need only the box
            for start in range(0, len(kept), DEVICE_GROUP):
                part = slice(start, start + DEVICE_GROUP)
                sums[part] = gp.box_attention(
                    cams_dev[part],
                    [w.box for w in kept[part]],  # type: ignore[misc]
                    [masks[i] for i in keep[part]],
                )
        else:
            for shape, js in by_shape(kept):
                heat = gp.unsquare(cams_dev[js], shape).clamp_(0.0, 1.0)
                sums[js] = gp.attention(heat, torch.stack([masks[keep[j]] for j in js]))
                del heat
        att = [attention_ratio(inside, total) for inside, total in sums.cpu().tolist()]
    pipe._share(kept, "explain_map", time.perf_counter() - t0)
    for j, w in enumerate(kept):
        heat_map = (
            None if cams is None
            else functools.partial(heatmap_at_source, cams[j], w.box, w.image.pixels.shape)
        )
        pipe._done(w, float(p[j]), att[j], heat_map)
