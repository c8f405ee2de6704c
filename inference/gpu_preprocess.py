"""The preprocessing geometry of :mod:`inference.preprocess` on torch tensors, for the CUDA pipeline.

Same definitions as the NumPy/Pillow functions used by training (centred padding with PAD_VALUE,
bilinear resizing, antialiased when shrinking, the same lung box and dilated-mask cut), computed on
the device so that a GPU is not left waiting for one CPU core to resize 2,000 x 2,000 images.
Values agree with the CPU functions to within interpolation round-off (the tests check this).
Inputs are 2-D float tensors (rows, columns); masks are bool tensors.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch
import torch.nn.functional as F

from inference.imaging import PAD_VALUE, STORED_DTYPES, square_region
from inference.types import StoredValues


def square_resize(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """Pad to a centred square with PAD_VALUE, then resize to (size, size).

    ``pixels`` is (rows, columns) or a stack (N, rows, columns) of images of one shape; the output has
    the same leading dimensions, float32.
    """
    rows, cols = pixels.shape[-2:]
    side = max(rows, cols)
    top, left = (side - rows) // 2, (side - cols) // 2
    if rows == cols:
        square = pixels.float()
    else:
        square = torch.full(
            (*pixels.shape[:-2], side, side), PAD_VALUE, dtype=torch.float32, device=pixels.device
        )
        square[..., top : top + rows, left : left + cols] = pixels
    if side == size:
        return square.clone()
    flat = square.reshape(-1, 1, side, side)
    out = F.interpolate(flat, size=(size, size), mode="bilinear", align_corners=False, antialias=side > size)
    return out.reshape(*pixels.shape[:-2], size, size)


def _sample_box(
    square: torch.Tensor, box: tuple[float, float, float, float], shape: tuple[int, int]
) -> torch.Tensor:
    """Bilinear resample of the (left, top, right, bottom) part of ``square`` to ``shape`` (upsampling).

    ``square`` is (h, w) or a stack (N, h, w); the output has the same leading dimensions.
    """
    left, top, right, bottom = box
    rows, cols = shape
    h, w = square.shape[-2:]
    dev = square.device
    xs = (
        left + (torch.arange(cols, device=dev, dtype=torch.float32) + 0.5) * (right - left) / cols
    ) / w * 2 - 1
    ys = (
        top + (torch.arange(rows, device=dev, dtype=torch.float32) + 0.5) * (bottom - top) / rows
    ) / h * 2 - 1
    flat = square.float().reshape(-1, 1, h, w)
    grid = torch.stack(torch.broadcast_tensors(xs[None, :], ys[:, None]), dim=-1)[None]
    grid = grid.expand(flat.shape[0], rows, cols, 2)
    out = F.grid_sample(flat, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.reshape(*square.shape[:-2], rows, cols)


def unsquare(square: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`square_resize`: drop the padding and scale back to ``shape`` (2-D or stacked)."""
    return _sample_box(square, square_region(shape, square.shape[-1]), shape)


def lung_box(mask: torch.Tensor, margin: float = 0.05) -> tuple[int, int, int, int]:
    """(row0, col0, row1, col1), ends exclusive: the mask's bounding box grown by ``margin`` of its size."""
    return lung_boxes([mask], margin)[0]


@functools.lru_cache(maxsize=8)
def _disk(radius: int, device: torch.device) -> torch.Tensor:
    """A (1, 1, 2r+1, 2r+1) float disk kernel, made once per radius and device."""
    yy, xx = torch.meshgrid(
        torch.arange(-radius, radius + 1, device=device),
        torch.arange(-radius, radius + 1, device=device),
        indexing="ij",
    )
    return ((yy * yy + xx * xx) <= radius * radius).float()[None, None]


def lung_crop(
    pixels: torch.Tensor,
    mask: torch.Tensor,
    size: int,
    box: tuple[int, int, int, int],
    dilation: float = 0.02,
) -> torch.Tensor:
    """The stage 2 input: ``box`` through :func:`square_resize`, zero outside the dilated lung mask."""
    return lung_crops([pixels], [mask], size, [box], dilation)[0]


def lung_crops(
    pixels: list[torch.Tensor],
    masks: list[torch.Tensor],
    size: int,
    boxes: list[tuple[int, int, int, int]],
    dilation: float = 0.02,
) -> torch.Tensor:
    """:func:`lung_crop` of every image, (N, size, size): the boxes differ in size, so each is resized on
    its own, but the mask dilation and the cut run once for the whole stack."""
    out = torch.stack(
        [square_resize(p[r0:r1, c0:c1], size) for p, (r0, c0, r1, c1) in zip(pixels, boxes, strict=True)]
    )
    cut = torch.stack(
        [
            square_resize(m[r0:r1, c0:c1].float(), size)
            for m, (r0, c0, r1, c1) in zip(masks, boxes, strict=True)
        ]
    )
    radius = max(1, round(dilation * size))
    grown = F.conv2d((cut >= 0.5).float()[:, None], _disk(radius, out.device), padding=radius)[:, 0] > 0.5
    out.masked_fill_(~grown, PAD_VALUE)  # not out[~grown] = ...: boolean indexing waits for the device
    return out


def uncrop(square: torch.Tensor, box: tuple[int, int, int, int], shape: tuple[int, int]) -> torch.Tensor:
    """Put a square map back at ``box`` in a zero image of ``shape`` (inverse of :func:`lung_crop`)."""
    r0, c0, r1, c1 = box
    out = torch.zeros(shape, dtype=torch.float32, device=square.device)
    out[r0:r1, c0:c1] = unsquare(square, (r1 - r0, c1 - c0))
    return out


def _offsets(arrays: list[np.ndarray]) -> list[int]:
    """Where each array starts (and the last one ends) in one flat buffer holding them all."""
    return np.concatenate([[0], np.cumsum([a.size for a in arrays])]).astype(int).tolist()


def stacked(images: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(images)`` without a copy when the images already lie one after the other in one buffer
    (as the uploads here leave a group of one shape), else a copy."""
    first = images[0]
    step = first.numel()
    if all(
        t.shape == first.shape and t.dtype == first.dtype and t.is_contiguous()
        and t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        and t.storage_offset() == first.storage_offset() + i * step
        for i, t in enumerate(images)
    ):
        return first.as_strided((len(images), *first.shape), (step, *first.stride()))
    return torch.stack(images)


def _views(flat: torch.Tensor, arrays: list[np.ndarray], offsets: list[int]) -> list[torch.Tensor]:
    """Each array's part of ``flat``, in its shape."""
    return [flat[offsets[i] : offsets[i + 1]].view(a.shape) for i, a in enumerate(arrays)]


def upload(
    arrays: list[np.ndarray], device: torch.device, dtype: torch.dtype = torch.float16, chunk: int = 8
) -> list[torch.Tensor]:
    """Copy 2-D arrays to ``device`` as ``dtype``, returning one 2-D tensor (a view) per array.

    On CUDA the arrays are converted into one page-locked host buffer ``chunk`` images at a time, and
    each chunk's copy to the GPU runs while the next chunk is converted: one pass over the host memory,
    half the bytes on the bus with float16 (pixel values in [0, 1] keep an error under 2.5e-4, finer
    than the 8-bit images the models are trained on). One thread converts: torch's copy already uses
    several cores, and on a 16-core H100 host a thread pool converting images side by side was slower
    (``benchmarks/gpu_upload.py``). On the CPU the arrays are only wrapped (or cast when ``dtype`` differs
    from theirs).
    """
    if chunk < 1:
        raise ValueError('Argument "chunk" must be at least 1.')
    for a in arrays:
        if not isinstance(a, np.ndarray) or a.ndim != 2:
            raise ValueError('Argument "arrays" must hold 2-D numpy arrays.')
    if device.type != "cuda":
        return [torch.from_numpy(np.ascontiguousarray(a)).to(dtype) for a in arrays]
    offsets = _offsets(arrays)
    host = torch.empty(offsets[-1], dtype=dtype, pin_memory=True)
    dev = torch.empty(offsets[-1], dtype=dtype, device=device)
    for start in range(0, len(arrays), chunk):
        stop = min(start + chunk, len(arrays))
        for i in range(start, stop):
            host[offsets[i] : offsets[i + 1]].view(arrays[i].shape).copy_(
                torch.from_numpy(np.ascontiguousarray(arrays[i]))
            )
        dev[offsets[start] : offsets[stop]].copy_(host[offsets[start] : offsets[stop]], non_blocking=True)
    return _views(dev, arrays, offsets)


def is_page_locked(array: np.ndarray) -> bool:
    """Whether ``array`` is float32, C-contiguous and in page-locked host memory (as from
    ``Pipeline.host_array`` on CUDA), so that :func:`upload_page_locked` can copy it as it is."""
    return isinstance(array, np.ndarray) and array.dtype == np.float32 and _pinned(array)


def _pinned(array: np.ndarray) -> bool:
    """Whether ``array`` is C-contiguous and in page-locked host memory."""
    if not (isinstance(array, np.ndarray) and array.flags.c_contiguous
            and array.flags.writeable):  # torch.from_numpy warns about read-only arrays
        return False
    return torch.cuda.is_available() and _signed(array).is_pinned()


def upload_page_locked(
    arrays: list[np.ndarray], device: torch.device, stream: torch.cuda.Stream
) -> tuple[list[torch.Tensor], torch.cuda.Event]:
    """Copy page-locked float32 arrays (:func:`is_page_locked`) to ``device`` on ``stream``, untouched by the
    host: one float32 tensor (a view of one device buffer) per array, and the event recorded after the copies.

    The copies run beside the work of other streams. A consumer on another stream waits for the event
    (``wait_event``) and marks the tensors as used there (``record_stream``), so that their memory, which
    belongs to ``stream``, is not handed out again before that work is done. The arrays must stay alive until
    the event has passed.
    """
    if device.type != "cuda":
        raise ValueError('Argument "device" must be a CUDA device.')
    for a in arrays:
        if not isinstance(a, np.ndarray) or a.ndim != 2 or not is_page_locked(a):
            raise ValueError('Argument "arrays" must hold 2-D float32 arrays in page-locked memory.')
    offsets = _offsets(arrays)
    with torch.cuda.stream(stream):
        dev = torch.empty(offsets[-1], dtype=torch.float32, device=device)
        for i, a in enumerate(arrays):
            dev[offsets[i] : offsets[i + 1]].copy_(torch.from_numpy(a).view(-1), non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(stream)
    return _views(dev, arrays, offsets), copied


def _signed(values: np.ndarray) -> torch.Tensor:
    """``values`` as a torch tensor of a fully supported integer type (uint16 seen as int16, bits kept)."""
    return torch.from_numpy(values.view(np.int16) if values.dtype == np.uint16 else values)


def stored_page_locked(values: np.ndarray) -> bool:
    """Whether stored values (``StoredValues.values``) lie in page-locked host memory, as from
    ``Pipeline.host_array`` on CUDA, so that :func:`upload_stored` copies them beside other work."""
    return _pinned(values)


def upload_stored(
    stored: list[StoredValues], device: torch.device, stream: torch.cuda.Stream | None = None
) -> tuple[list[torch.Tensor], torch.cuda.Event | None]:
    """The images' pixels on ``device`` from their stored values (:class:`~inference.types.StoredValues`):
    the values (1 or 2 bytes a pixel) and the tables are copied there, and each pixel is its table's entry, as
    on the host. One float32 tensor (a view of one device buffer) per image.

    With ``stream`` (CUDA, the values page-locked: :func:`stored_page_locked`) the copies and look-ups run on
    it, beside other streams' work, and the event recorded after them is returned; a consumer on another
    stream waits for it and marks the tensors as used there, as for :func:`upload_page_locked`. Without, they
    run on the current stream and the event is None.
    """
    for s in stored:
        if not isinstance(s.values, np.ndarray) or s.values.ndim != 2 or s.values.dtype not in STORED_DTYPES:
            raise ValueError('Argument "stored" must hold 2-D uint8, int8, uint16 or int16 values.')
    if stream is not None and not all(stored_page_locked(s.values) for s in stored):
        raise ValueError('Argument "stream" needs stored values in page-locked memory.')
    if not stored:
        return [], None
    shapes = [s.values for s in stored]
    offsets = _offsets(shapes)
    starts = np.concatenate([[0], np.cumsum([len(s.table) for s in stored])]).astype(int).tolist()
    tables = torch.from_numpy(np.concatenate([s.table for s in stored]).astype(np.float32, copy=False))
    context = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
    with context:
        if device.type == "cuda":  # page-locked, so that the copy does not wait for the host
            tables = tables.pin_memory()
        table = tables.to(device, non_blocking=True)
        out = torch.empty(offsets[-1], dtype=torch.float32, device=device)
        for i, s in enumerate(stored):
            index = _signed(s.values).to(device, non_blocking=True).view(-1).int()
            if s.values.dtype == np.uint16:
                index.bitwise_and_(0xFFFF)
            index.add_(starts[i] - s.low)
            torch.index_select(table, 0, index, out=out[offsets[i] : offsets[i + 1]])
        done = None
        if stream is not None:
            done = torch.cuda.Event()
            done.record(stream)
    return _views(out, shapes, offsets), done


def lung_boxes(masks: list[torch.Tensor], margin: float = 0.05) -> list[tuple[int, int, int, int]]:
    """:func:`lung_box` of every mask, reading the device once for the whole list."""
    if not masks:
        return []
    ends = []
    for m in masks:
        rows, cols = m.any(dim=1), m.any(dim=0)
        ends.append(torch.stack([_first(rows), _last(rows), _first(cols), _last(cols)]))
    out = []
    for (r0, r1, c0, c1), m in zip(torch.stack(ends).cpu().tolist(), masks, strict=True):
        if r1 < r0:
            raise ValueError('Argument "masks" holds an empty mask: no lung pixels to crop to.')
        r1, c1 = r1 + 1, c1 + 1
        dr, dc = round((r1 - r0) * margin), round((c1 - c0) * margin)
        out.append((max(0, r0 - dr), max(0, c0 - dc), min(m.shape[0], r1 + dr), min(m.shape[1], c1 + dc)))
    return out


def _first(flags: torch.Tensor) -> torch.Tensor:
    """Index of the first True (len(flags) when none), without reading the device."""
    n = flags.numel()
    idx = torch.arange(n, device=flags.device)
    return torch.where(flags, idx, n).min()


def _last(flags: torch.Tensor) -> torch.Tensor:
    """Index of the last True (-1 when none), without reading the device."""
    idx = torch.arange(flags.numel(), device=flags.device)
    return torch.where(flags, idx, -1).max()


def box_attention(
    cams: torch.Tensor, boxes: list[tuple[int, int, int, int]], masks: list[torch.Tensor]
) -> torch.Tensor:
    """:func:`attention` of lung-crop CAMs, (N, 2): each (S, S) CAM mapped into its box as :func:`uncrop`
    maps it and clipped to [0, 1], against its full-resolution mask inside the box (the heatmap is zero
    outside). All boxes are sampled in one call on a grid of the largest box's size; each image's part
    outside its own box counts as zero."""
    n, side = len(boxes), cams.shape[-1]
    dev = cams.device
    heights = [r1 - r0 for r0, _, r1, _ in boxes]
    widths = [c1 - c0 for _, c0, _, c1 in boxes]
    rows, cols = max(heights), max(widths)
    regions = [square_region(shape, side) for shape in zip(heights, widths, strict=True)]

    def column(values: list[float] | list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=dev)[:, None]

    # _sample_box's coordinates, one row per image: the same float32 operations in the same order
    left, top = column([r[0] for r in regions]), column([r[1] for r in regions])
    x_span, y_span = column([r[2] - r[0] for r in regions]), column([r[3] - r[1] for r in regions])
    box_cols, box_rows = column(widths), column(heights)
    col = torch.arange(cols, device=dev, dtype=torch.float32)[None, :]
    row = torch.arange(rows, device=dev, dtype=torch.float32)[None, :]
    xs = (left + (col + 0.5) * x_span / box_cols) / side * 2 - 1
    ys = (top + (row + 0.5) * y_span / box_rows) / side * 2 - 1
    grid = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), dim=-1)
    heat = F.grid_sample(
        cams.float()[:, None], grid, mode="bilinear", padding_mode="border", align_corners=False
    )[:, 0].clamp_(0.0, 1.0)
    heat.mul_((row[:, :, None] < box_rows[:, :, None]) & (col[:, None, :] < box_cols[:, :, None]))
    cut = torch.zeros((n, rows, cols), dtype=torch.bool, device=dev)
    for k, (m, (r0, c0, r1, c1)) in enumerate(zip(masks, boxes, strict=True)):
        cut[k, : r1 - r0, : c1 - c0] = m[r0:r1, c0:c1]
    return attention(heat, cut)


def attention(heat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(inside, total): the heatmap's mass inside the mask and in all, float64 on the device.

    For stacks (N, rows, columns) the result is (N, 2).
    """
    dims = (-2, -1)
    total = heat.sum(dim=dims, dtype=torch.float64)
    inside = (heat * mask).sum(dim=dims, dtype=torch.float64)
    return torch.stack([inside, total], dim=-1)
