"""The preprocessing geometry of :mod:`inference.preprocess` on torch tensors, for the CUDA pipeline.

Same definitions as the NumPy/Pillow functions used by training (centred padding with PAD_VALUE,
bilinear resizing, antialiased when shrinking, the same lung box and dilated-mask cut), computed on
the device so that a GPU is not left waiting for one CPU core to resize 2,000 x 2,000 images.
Values agree with the CPU functions to within interpolation round-off (the tests check this).
Inputs are 2-D float tensors (rows, columns); masks are bool tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from inference.imaging import PAD_VALUE, square_region


def square_resize(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """Pad to a centred square with PAD_VALUE, then resize to (size, size)."""
    rows, cols = pixels.shape
    side = max(rows, cols)
    top, left = (side - rows) // 2, (side - cols) // 2
    if rows == cols:
        square = pixels.float()
    else:
        square = torch.full((side, side), PAD_VALUE, dtype=torch.float32, device=pixels.device)
        square[top : top + rows, left : left + cols] = pixels
    if side == size:
        return square.clone()
    out = F.interpolate(
        square[None, None], size=(size, size), mode="bilinear", align_corners=False, antialias=side > size
    )
    return out[0, 0]


def _sample_box(
    square: torch.Tensor, box: tuple[float, float, float, float], shape: tuple[int, int]
) -> torch.Tensor:
    """Bilinear resample of the (left, top, right, bottom) part of ``square`` to ``shape`` (upsampling)."""
    left, top, right, bottom = box
    rows, cols = shape
    h, w = square.shape
    dev = square.device
    xs = (
        left + (torch.arange(cols, device=dev, dtype=torch.float32) + 0.5) * (right - left) / cols
    ) / w * 2 - 1
    ys = (
        top + (torch.arange(rows, device=dev, dtype=torch.float32) + 0.5) * (bottom - top) / rows
    ) / h * 2 - 1
    grid = torch.stack(torch.broadcast_tensors(xs[None, :], ys[:, None]), dim=-1)[None]
    out = F.grid_sample(
        square.float()[None, None], grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    return out[0, 0]


def unsquare(square: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`square_resize`: drop the padding and scale back to ``shape``."""
    return _sample_box(square, square_region(shape, square.shape[0]), shape)


def lung_box(mask: torch.Tensor, margin: float = 0.05) -> tuple[int, int, int, int]:
    """(row0, col0, row1, col1), ends exclusive: the mask's bounding box grown by ``margin`` of its size."""
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    if rows.numel() == 0:
        raise ValueError('Argument "mask" is empty: no lung pixels to crop to.')
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    dr, dc = round((r1 - r0) * margin), round((c1 - c0) * margin)
    return max(0, r0 - dr), max(0, c0 - dc), min(mask.shape[0], r1 + dr), min(mask.shape[1], c1 + dc)


def lung_crop(
    pixels: torch.Tensor,
    mask: torch.Tensor,
    size: int,
    box: tuple[int, int, int, int],
    dilation: float = 0.02,
) -> torch.Tensor:
    """The stage 2 input: ``box`` through :func:`square_resize`, zero outside the dilated lung mask."""
    r0, c0, r1, c1 = box
    out = square_resize(pixels[r0:r1, c0:c1], size)
    cut = square_resize(mask[r0:r1, c0:c1].float(), size) >= 0.5
    radius = max(1, round(dilation * size))
    yy, xx = torch.meshgrid(
        torch.arange(-radius, radius + 1, device=pixels.device),
        torch.arange(-radius, radius + 1, device=pixels.device),
        indexing="ij",
    )
    disk = ((yy * yy + xx * xx) <= radius * radius).float()
    grown = F.conv2d(cut.float()[None, None], disk[None, None], padding=radius)[0, 0] > 0.5
    out[~grown] = PAD_VALUE
    return out


def uncrop(square: torch.Tensor, box: tuple[int, int, int, int], shape: tuple[int, int]) -> torch.Tensor:
    """Put a square map back at ``box`` in a zero image of ``shape`` (inverse of :func:`lung_crop`)."""
    r0, c0, r1, c1 = box
    out = torch.zeros(shape, dtype=torch.float32, device=square.device)
    out[r0:r1, c0:c1] = unsquare(square, (r1 - r0, c1 - c0))
    return out
