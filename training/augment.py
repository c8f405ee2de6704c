"""Chest X-ray augmentation on whole batches, on the device the batch lives on (GPU when training there).

Geometric: small random rotation (±8°), scale (0.88-1.12, i.e. a random resized crop/zoom) and shift (±6%),
applied identically to an image and its mask. Photometric: brightness, contrast and gamma. No horizontal flip:
the heart and the aortic knob are on the left, and a mirrored film is not a film the node will receive.

Optional *texture* degradations (``style`` > 0: each applied to an image with that probability): blur
(a Gaussian of 0.6-2.0 px, the look of a downsized or resampled film), unsharp-mask sharpening and Gaussian
noise.
On the shipped data the texture of an image names its source (the ``texture`` baseline of
:mod:`training.baselines` scores it): nearly all normals come from one archive of smooth, uniformly processed
films, the COVID-19 images from publications and other hospitals. Randomising texture in every class is meant
to make it a useless cue (on the shipped data it did not give a better model: see the README).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def augment(x: torch.Tensor, mask: torch.Tensor | None = None, *, generator: torch.Generator | None = None,
            max_rotate_deg: float = 8.0, scale: tuple[float, float] = (0.88, 1.12), max_shift: float = 0.06,
            photometric: bool = True, style: float = 0.0,
            artefacts: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Randomly transform a batch ``x`` (N, C, H, W, float in [0, 1]) and its ``mask`` (N, 1, H, W) alike.

    ``style`` (0 to 1) is the probability of each texture degradation (blur, sharpening, noise) per image;
    0 applies none and draws no random numbers for them, so runs without it repeat earlier runs exactly.
    ``artefacts`` (0 to 1), likewise, is the probability of each mark of a film's source
    (:func:`training.artefacts.artefacts`: padding bars, printed markers, equalisation, sharpening).

    Returns new tensors (inputs are not modified). Random numbers come from ``generator`` (on ``x``'s device)
    so a seeded run is repeatable. The mask is resampled bilinearly and thresholded at 0.5.
    """
    if x.ndim != 4:
        raise ValueError('Argument "x" must have shape (N, C, H, W).')
    if not 0.0 <= style <= 1.0:
        raise ValueError('Argument "style" must be from 0 to 1.')
    if not 0.0 <= artefacts <= 1.0:
        raise ValueError('Argument "artefacts" must be from 0 to 1.')
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
    if style > 0:
        out = texture(out, style, generator=generator)
    if artefacts > 0:
        from training.artefacts import artefacts as add_artefacts  # here: that module imports this one

        out = add_artefacts(out, artefacts, generator=generator)
    if photometric:
        shape = (n, 1, 1, 1)
        gamma = torch.exp(rand(-0.3, 0.3)).view(shape)
        out = out.clamp(0, 1).pow(gamma)
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = (out - mean) * rand(0.8, 1.2).view(shape) + mean + rand(-0.08, 0.08).view(shape)
        out = out.clamp(0, 1)
    return out, out_mask


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image of ``x`` (N, C, H, W) with its own Gaussian (``sigma``: N standard deviations in px).

    Separable, one grouped convolution per axis for the whole batch; borders are reflected.
    """
    n, c, h, w = x.shape
    radius = max(1, math.ceil(3.0 * float(sigma.max())))
    radius = min(radius, (min(h, w) - 1) // 2) if min(h, w) > 2 else 0
    if radius < 1:
        return x.clone()
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None, :] / sigma.to(x.dtype).clamp_min(1e-3)[:, None]) ** 2)
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (N*C, 2r+1)
    y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    return y.reshape(n, c, h, w)


def texture(x: torch.Tensor, p: float, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Blur, sharpen and add noise, each with probability ``p`` per image of ``x`` (N, C, H, W in [0, 1]).

    Blur sigma 0.6-2.0 px; unsharp mask of sigma 1 px and amount 0.5-1.5; noise sigma 0.005-0.03.
    """
    n, dev = x.shape[0], x.device
    shape = (n, 1, 1, 1)

    def rand(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, device=dev, generator=generator) * (hi - lo) + lo

    def chosen() -> torch.Tensor:
        return (torch.rand(n, device=dev, generator=generator) < p).to(x.dtype).view(shape)

    on, sigma = chosen(), rand(0.6, 2.0)
    out = on * gaussian_blur(x, sigma) + (1 - on) * x
    on, amount = chosen(), rand(0.5, 1.5).view(shape)
    soft = gaussian_blur(out, torch.ones(n, device=dev))
    out = out + on * amount * (out - soft)
    on, level = chosen(), rand(0.005, 0.03).view(shape)
    noise = torch.randn(x.shape, device=dev, generator=generator, dtype=x.dtype)
    return (out + on * level * noise).clamp(0, 1)
