"""Preprocessing shared by training and inference: the same geometry for every image, whatever its source.

``square_resize`` pads an image to a square with ``PAD_VALUE`` (0, black like air), the image centred (an
odd remainder goes to the bottom/right), then resizes it to ``size`` x ``size`` (bilinear, antialiased when
shrinking): aspect kept, padding always the same value, whatever the source.
``lung_crop`` does the same to the lung bounding box plus a margin, and blanks everything outside the
slightly dilated lung mask; the dilation is measured on the output grid, so it is the same for every source
resolution. ``centre_crop`` resizes the image's largest centred square (``centre_box``): no padding at all,
so neither the image's aspect nor padding bars reach the network. ``unsquare`` and ``uncrop`` map square
outputs (probability maps, heatmaps) back to the source; ``square_region`` says where the image lies on the
square grid.
Everything here is also importable from ``inference.imaging``.
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = [
    "PAD_VALUE",
    "centre_box",
    "centre_crop",
    "components",
    "fill_holes",
    "largest",
    "lung_box",
    "lung_crop",
    "postprocess_mask",
    "resize_mask",
    "square_region",
    "square_resize",
    "uncrop",
    "unsquare",
]

PAD_VALUE = 0.0  # value of the padding added by square_resize and lung_crop


def _check_image(arr: np.ndarray, name: str) -> np.ndarray:
    if not isinstance(arr, np.ndarray):
        raise TypeError(f'Argument "{name}" must be a numpy array.')
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f'Argument "{name}" must be a non-empty 2-D array, got shape {arr.shape}.')
    return arr


def _check_size(size: int) -> int:
    if not isinstance(size, int | np.integer) or isinstance(size, bool) or size < 8:
        raise ValueError('Argument "size" must be an integer of at least 8.')
    return int(size)


def _pad_offsets(shape: tuple[int, int]) -> tuple[int, int, int]:
    """(side, top, left): the square an image of ``shape`` is padded to, and where the image sits in it."""
    rows, cols = shape
    side = max(rows, cols)
    return side, (side - rows) // 2, (side - cols) // 2


def _resize(
    arr: np.ndarray, shape: tuple[int, int], box: tuple[float, float, float, float] | None = None
) -> np.ndarray:
    """Bilinear float resize (antialiased when shrinking) of ``arr`` (or its (left, top, right, bottom)
    ``box``) to (rows, columns)."""
    if box is None and arr.shape == tuple(shape):
        return arr.astype(np.float32, copy=True)
    img = Image.fromarray(np.ascontiguousarray(arr, dtype=np.float32))
    return np.array(img.resize((shape[1], shape[0]), Image.Resampling.BILINEAR, box=box), dtype=np.float32)


def square_resize(pixels: np.ndarray, size: int) -> np.ndarray:
    """Pad to a square with PAD_VALUE (image centred), then resize to ``size`` x ``size``.

    Returns float32 (size, size). The padding is always PAD_VALUE (0) and symmetric up to one source pixel
    (the odd pixel goes to the bottom/right), whatever the source, so all sources are treated the same way.
    The padded square is never built for a non-square image (see ``_padded_resize``): memory stays in
    proportion to the image, not to the square of its long side.
    """
    _check_image(pixels, "pixels")
    size = _check_size(size)
    if pixels.shape[0] == pixels.shape[1]:
        return _resize(pixels, (size, size))
    return _padded_resize(pixels, size)


# rows of a tall image padded and resized at a time by _padded_resize
_BAND_ROWS = 256


def _padded_resize(pixels: np.ndarray, size: int) -> np.ndarray:
    """``_resize`` of ``pixels`` padded to its centred square, to (size, size), without the square.

    Pillow resizes in two passes, along the rows first (each row on its own), then along the columns, with
    float32 in between. Both are done here the same way, on the same grids, so the result is bit for bit
    the resize of the padded square: the rows pass runs on bands of padded rows (a tall image) or on the
    image's rows alone, a padding row giving a row of PAD_VALUE (a wide image); the columns pass runs on
    that (side, size) intermediate. A 300 x 60000 strip needs 54 MB instead of a 13.4 GiB square.
    """
    rows, cols = pixels.shape
    side, top, left = _pad_offsets(pixels.shape)
    across = np.empty((side, size), dtype=np.float32)  # after the rows pass
    if cols == side:  # wide: padding rows above and below
        padding_row = _resize(np.full((1, side), PAD_VALUE, dtype=np.float32), (1, size))
        across[:top] = padding_row
        across[top + rows :] = padding_row
        across[top : top + rows] = _resize(pixels, (rows, size))
    else:  # tall: padding columns left and right
        band = np.full((min(_BAND_ROWS, rows), side), PAD_VALUE, dtype=np.float32)
        for r0 in range(0, rows, _BAND_ROWS):
            r1 = min(rows, r0 + _BAND_ROWS)
            band[: r1 - r0, left : left + cols] = pixels[r0:r1]
            across[r0:r1] = _resize(band[: r1 - r0], (r1 - r0, size))
    return _resize(across, (size, size))


def centre_box(shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """(row0, col0, row1, col1), ends exclusive: the largest square centred in an image of ``shape`` (an odd
    remainder goes to the bottom/right, as in ``square_resize``)."""
    rows, cols = int(shape[0]), int(shape[1])
    if rows < 1 or cols < 1:
        raise ValueError('Argument "shape" must be (rows, columns), both positive.')
    side = min(rows, cols)
    top, left = (rows - side) // 2, (cols - side) // 2
    return top, left, top + side, left + side


def centre_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    """The image's largest centred square (``centre_box``) resized to ``size`` x ``size`` (float32): the
    stage 2 input of crop mode 'square'. Map a heatmap back with
    ``uncrop(heat, centre_box(shape), shape)``."""
    _check_image(pixels, "pixels")
    r0, c0, r1, c1 = centre_box(pixels.shape)
    return square_resize(pixels[r0:r1, c0:c1], size)


def square_region(shape: tuple[int, int], size: int) -> tuple[float, float, float, float]:
    """(left, top, right, bottom), in pixels of the ``square_resize(pixels, size)`` output, of the part that
    shows the image of ``shape`` (the rest is padding); fractional where the edge falls inside a pixel."""
    side, top, left = _pad_offsets(shape)
    scale = size / side
    return (left * scale, top * scale, (left + shape[1]) * scale, (top + shape[0]) * scale)


def unsquare(square: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of ``square_resize``: drop the padding and scale back to ``shape`` (float32, bilinear).

    Use it to bring a stage-1 probability map or a heatmap computed on the square grid back to the source.
    """
    _check_image(square, "square")
    if square.shape[0] != square.shape[1]:
        raise ValueError(f'Argument "square" must be square, got shape {square.shape}.')
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError('Argument "shape" must be (rows, columns), both positive.')
    shape = (int(shape[0]), int(shape[1]))
    return _resize(square, shape, box=square_region(shape, square.shape[0]))


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a boolean mask to (rows, columns): bilinear on 0/1, then >= 0.5 (smooth edges, not blocky)."""
    _check_image(mask, "mask")
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError('Argument "shape" must be (rows, columns), both positive.')
    shape = (int(shape[0]), int(shape[1]))
    if mask.shape == shape:
        return mask.astype(bool, copy=True)
    return _resize(mask.astype(np.float32), shape) >= 0.5


def lung_box(mask: np.ndarray, margin: float = 0.05) -> tuple[int, int, int, int]:
    """Bounding box (row0, col0, row1, col1) = (top, left, bottom, right), ends exclusive, of the mask, grown
    by ``margin`` x its height (rows) and width (columns) on each side and clipped to the image.
    Raises ValueError for an empty mask."""
    _check_image(mask, "mask")
    if not 0.0 <= float(margin) <= 1.0:
        raise ValueError('Argument "margin" must be between 0 and 1.')
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError('Argument "mask" is empty: no lung pixels to crop to.')
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    dr, dc = round((r1 - r0) * margin), round((c1 - c0) * margin)
    return max(0, r0 - dr), max(0, c0 - dc), min(mask.shape[0], r1 + dr), min(mask.shape[1], c1 + dc)


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return (yy * yy + xx * xx) <= radius * radius


def lung_crop(
    pixels: np.ndarray,
    mask: np.ndarray,
    size: int,
    margin: float = 0.05,
    apply_mask: bool = True,
    dilation: float = 0.02,
) -> np.ndarray:
    """The stage-2 input: the lung bounding box (``lung_box``) through ``square_resize``.

    With ``apply_mask``, pixels outside the lung mask dilated by ``dilation`` x ``size`` pixels (a disk,
    measured on the output grid, at least 1 px) are set to PAD_VALUE. Returns float32 (size, size).
    """
    _check_image(pixels, "pixels")
    _check_image(mask, "mask")
    if mask.shape != pixels.shape:
        raise ValueError(f'Argument "mask" has shape {mask.shape}, but "pixels" has {pixels.shape}.')
    size = _check_size(size)
    if not 0.0 <= float(dilation) <= 0.5:
        raise ValueError('Argument "dilation" must be between 0 and 0.5.')
    r0, c0, r1, c1 = lung_box(mask, margin)
    out = square_resize(pixels[r0:r1, c0:c1], size)
    if apply_mask:
        square_mask = square_resize(mask[r0:r1, c0:c1].astype(np.float32), size) >= 0.5
        radius = max(1, round(dilation * size))
        square_mask = ndimage.binary_dilation(square_mask, structure=_disk(radius))
        out[~square_mask] = PAD_VALUE
    return out


def uncrop(square: np.ndarray, box: tuple[int, int, int, int], shape: tuple[int, int]) -> np.ndarray:
    """Inverse of ``lung_crop``'s geometry: put a square map back at ``box`` in a zero image of ``shape``.

    Use it to bring a stage-2 heatmap back to source resolution (``box`` from ``lung_box`` with the same
    margin).
    """
    r0, c0, r1, c1 = (int(v) for v in box)
    if not (0 <= r0 < r1 <= shape[0] and 0 <= c0 < c1 <= shape[1]):
        raise ValueError(f'Argument "box" {box} does not fit in shape {tuple(shape)}.')
    out = np.zeros((int(shape[0]), int(shape[1])), dtype=np.float32)
    out[r0:r1, c0:c1] = unsquare(square, (r1 - r0, c1 - c0))
    return out


def components(binary: np.ndarray, connectivity: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Connected components of a 2-D boolean image (OpenCV, which releases the GIL while it works).

    Returns ``labels`` (int32, 0 = background, components numbered in raster order of their first pixel),
    ``areas`` (pixels per label, index 0 = background) and ``centroids`` ((x, y) per label). ``connectivity``
    is 4 or 8.
    """
    if connectivity not in (4, 8):
        raise ValueError('Argument "connectivity" must be 4 or 8.')
    image = np.ascontiguousarray(binary, dtype=np.uint8)
    _, labels, stats, centroids = cv2.connectedComponentsWithStats(
        image, connectivity=connectivity, ltype=cv2.CV_32S
    )
    return labels, stats[:, cv2.CC_STAT_AREA], centroids


def largest(areas: np.ndarray, k: int) -> np.ndarray:
    """Labels of the ``k`` largest components (areas from :func:`components`); ties go to the lower label."""
    return np.argsort(-areas[1:], kind="stable")[:k] + 1


def postprocess_mask(prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Binary lung mask from a probability map: ``prob > threshold``, the two largest connected components
    (8-connectivity; on equal areas the one met first in raster order) kept, holes filled. Returns bool of
    the same shape (empty when nothing passes)."""
    _check_image(prob, "prob")
    if not 0.0 <= float(threshold) < 1.0:
        raise ValueError('Argument "threshold" must be in [0, 1).')
    binary = np.asarray(prob, dtype=np.float32) > threshold
    labels, areas, _ = components(binary, 8)
    if len(areas) == 1:
        return binary
    if len(areas) > 3:
        keep = np.zeros(len(areas), dtype=bool)
        keep[largest(areas, 2)] = True
        binary = keep[labels]
    return fill_holes(binary)


def fill_holes(binary: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_fill_holes`` with its default (4-connected background), in one flood fill.

    A background region is a hole unless it touches the image border. The image gets a one-pixel frame of
    background, so every such region joins the frame, and one 4-connected flood fill from a corner marks them
    all; what it does not reach is foreground or hole. OpenCV releases the GIL while it fills, and this is
    several times faster than scipy's iterative dilation (or labelling the background), with the same result.
    """
    image = cv2.copyMakeBorder(np.asarray(binary, dtype=np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    cv2.floodFill(image, None, (0, 0), 2, flags=4)
    return image[1:-1, 1:-1] != 2
