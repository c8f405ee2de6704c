"""Chest X-ray augmentation on whole batches, on the device the batch lives on (GPU when training there).

Geometric: small random rotation (±8°), scale (0.88-1.12, i.e. a random resized crop/zoom) and shift (±6%),
applied identically to an image and its mask. Photometric: brightness, contrast and gamma. No horizontal flip:
the heart and the aortic knob are on the left, and a mirrored film is not a film the node will receive.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def augment(x: torch.Tensor, mask: torch.Tensor | None = None, *, generator: torch.Generator | None = None,
            max_rotate_deg: float = 8.0, scale: tuple[float, float] = (0.88, 1.12), max_shift: float = 0.06,
            photometric: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Randomly transform a batch ``x`` (N, C, H, W, float in [0, 1]) and its ``mask`` (N, 1, H, W) alike.

    Returns new tensors (inputs are not modified). Random numbers come from ``generator`` (on ``x``'s device)
    so a seeded run is repeatable. The mask is resampled bilinearly and thresholded at 0.5.
    """
    if x.ndim != 4:
        raise ValueError('Argument "x" must have shape (N, C, H, W).')
    n = x.shape[0]
    dev = x.device

    def rand(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, device=dev, generator=generator) * (hi - lo) + lo

    angle = rand(-max_rotate_deg, max_rotate_deg) * (math.pi / 180.0)
    s = rand(*scale)
    tx, ty = rand(-max_shift, max_shift), rand(-max_shift, max_shift)
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out_mask = None
    if mask is not None:
        m = F.grid_sample(mask.to(x.dtype), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out_mask = (m > 0.5).to(mask.dtype)
    if photometric:
        shape = (n, 1, 1, 1)
        gamma = torch.exp(rand(-0.3, 0.3)).view(shape)
        out = out.clamp(0, 1).pow(gamma)
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = (out - mean) * rand(0.8, 1.2).view(shape) + mean + rand(-0.08, 0.08).view(shape)
        out = out.clamp(0, 1)
    return out, out_mask
