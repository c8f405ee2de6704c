"""The marks of a film's source, put on any image: for augmentation and for counterfactual checks.

On the shipped data the COVID-19 images come from publications and other hospitals and nearly all normals
from one archive of square, uniformly processed films. A network can then call an image positive because it
is not square (padding bars once squared), carries printed text or arrows, or was contrast-equalised or
sharpened by its publisher, all without looking at the lungs. Each function here adds one such mark to a
batch of stage 2 inputs (N, C, H, W in [0, 1], the square grid the pipeline feeds the network):

- :func:`bars`: blank bands at two opposite edges, the padding a non-square film gets when squared (cropping
  a square film to another aspect ratio and squaring it again gives exactly this);
- :func:`stamps`: printed markers ("L", "R", "PORTABLE", ...), an arrow or a ring, in white;
- :func:`equalize`: histogram equalisation, a common publisher's contrast enhancement;
- :func:`sharpen`: an unsharp mask.

:func:`artefacts` applies each at random (augmentation: the marks stop telling the classes apart);
:data:`PROBES` apply each at a fixed strength to every image (the counterfactual check of
:mod:`training.counterfactual`: a network that looks at the lungs keeps its answer).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from training.augment import gaussian_blur

WORDS = ("L", "R", "AP", "PA", "PORTABLE", "SUPINE", "ERECT", "A", "B")


def _check(x: torch.Tensor) -> None:
    if x.ndim != 4:
        raise ValueError('Argument "x" must have shape (N, C, H, W).')


@lru_cache(maxsize=8)
def stamp_bank(height: int) -> tuple[np.ndarray, ...]:
    """White-on-black stamps (float32 in [0, 1]) for images ``height`` px high: each word of :data:`WORDS`,
    an arrow and a ring, about 1/12 of the height tall."""
    if height < 16:
        raise ValueError('Argument "height" must be at least 16.')
    px = max(8, height // 12)
    font = ImageFont.load_default(size=px)
    out = []
    for word in WORDS:
        left, top, right, bottom = (int(v) for v in font.getbbox(word))
        im = Image.new("L", (right - left + 2, bottom - top + 2), 0)
        ImageDraw.Draw(im).text((1 - left, 1 - top), word, fill=255, font=font)
        out.append(im)
    side = 2 * px
    arrow = Image.new("L", (side, side), 0)
    d = ImageDraw.Draw(arrow)
    d.line((0, 0, side - 1, side - 1), fill=255, width=max(1, px // 5))
    d.polygon([(side - 1, side - 1), (side - 1, side // 2), (side // 2, side - 1)], fill=255)
    out.append(arrow)
    ring = Image.new("L", (side, side), 0)
    ImageDraw.Draw(ring).ellipse((1, 1, side - 2, side - 2), outline=255, width=max(1, px // 6))
    out.append(ring)
    return tuple(np.asarray(im, dtype=np.float32) / 255.0 for im in out)


def bars(x: torch.Tensor, fraction: torch.Tensor, vertical: torch.Tensor) -> torch.Tensor:
    """Blank (0) the outer ``fraction`` (N values, 0 to 0.5) of each image at its top and bottom, or at its
    left and right where ``vertical`` (N booleans) is true."""
    _check(x)
    n, _, h, w = x.shape
    rows = (torch.arange(h, device=x.device, dtype=x.dtype) + 0.5) / h
    cols = (torch.arange(w, device=x.device, dtype=x.dtype) + 0.5) / w
    f = fraction.to(x.dtype).view(n, 1, 1)
    keep_rows = ((rows.view(1, h, 1) >= f) & (rows.view(1, h, 1) <= 1 - f)).expand(n, h, w)
    keep_cols = ((cols.view(1, 1, w) >= f) & (cols.view(1, 1, w) <= 1 - f)).expand(n, h, w)
    keep = torch.where(vertical.view(n, 1, 1), keep_cols, keep_rows)
    return x * keep.unsqueeze(1).to(x.dtype)


def stamps(x: torch.Tensor, on: torch.Tensor, *, generator: torch.Generator | None = None,
           count: int = 2) -> torch.Tensor:
    """Print ``count`` random stamps of :func:`stamp_bank` on each image where ``on`` (N booleans) is true,
    at brightness 0.75-1, each within the top or the bottom fifth of the image (where films carry their
    markers, mostly clear of the lungs), anywhere across."""
    _check(x)
    n, _, h, w = x.shape
    bank = stamp_bank(h)
    out = x.clone()
    draws = torch.rand((n, count, 4), generator=generator, device=x.device).cpu().numpy()
    for i in np.flatnonzero(on.cpu().numpy()):
        for k, top, left, level in draws[i]:
            s = torch.from_numpy(bank[int(k * len(bank)) % len(bank)]).to(x.device, x.dtype)
            sh, sw = min(s.shape[0], h), min(s.shape[1], w)
            span = max(0, h // 5 - sh)  # where a stamp can start within the top or the bottom fifth
            r = min(int((2 * float(top)) % 1 * span) + (0 if top < 0.5 else h - h // 5), h - sh)
            c = int(left * (w - sw))
            patch = out[i, :, r:r + sh, c:c + sw]
            out[i, :, r:r + sh, c:c + sw] = torch.maximum(patch, (0.75 + 0.25 * float(level)) * s[:sh, :sw])
    return out


def equalize(x: torch.Tensor) -> torch.Tensor:
    """Histogram-equalise each image: its cumulative histogram over 256 grey levels, stretched to [0, 1], maps
    every level (``PIL.ImageOps.equalize`` does the same up to rounding).

    This is the mark, as a publisher's tool makes it: the whole image counts, black borders included. What
    an equalising network does to its own input is ``inference.models.classifiers.equalize`` (background
    left out, on normalised tensors)."""
    _check(x)
    n = x.shape[0]
    q = (x.clamp(0, 1) * 255).round().long()
    idx = q + 256 * torch.arange(n, device=x.device).view(n, 1, 1, 1)
    hist = torch.bincount(idx.flatten(), minlength=256 * n).view(n, 256).to(torch.float64)
    cdf = hist.cumsum(1)
    first = torch.where(hist > 0, cdf, torch.full_like(cdf, math.inf)).min(1, keepdim=True).values
    lut = ((cdf - first) / (cdf[:, -1:] - first).clamp_min(1)).clamp(0, 1).to(x.dtype)
    return lut.gather(1, q.view(n, -1)).view_as(x)


def sharpen(x: torch.Tensor, amount: torch.Tensor) -> torch.Tensor:
    """Unsharp mask of sigma 1.5 px, ``amount`` (N values) per image."""
    _check(x)
    n = x.shape[0]
    soft = gaussian_blur(x, torch.full((n,), 1.5, device=x.device))
    return (x + amount.to(x.dtype).view(n, 1, 1, 1) * (x - soft)).clamp(0, 1)


def artefacts(x: torch.Tensor, p: float, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each mark of this module with probability ``p`` per image of ``x``: bars of 5-20% at either pair of
    edges, two stamps, histogram equalisation (blended in at 50-100%), sharpening of amount 0.5-2."""
    _check(x)
    if not 0.0 <= p <= 1.0:
        raise ValueError('Argument "p" must be from 0 to 1.')
    n, dev = x.shape[0], x.device
    shape = (n, 1, 1, 1)

    def rand(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, device=dev, generator=generator) * (hi - lo) + lo

    def chosen() -> torch.Tensor:
        return torch.rand(n, device=dev, generator=generator) < p

    on, frac, vertical = chosen(), rand(0.05, 0.20), rand(0, 1) < 0.5
    out = torch.where(on.view(shape), bars(x, frac, vertical), x)
    out = stamps(out, chosen(), generator=generator)
    on, mix = chosen(), rand(0.5, 1.0).view(shape)
    out = torch.where(on.view(shape), mix * equalize(out) + (1 - mix) * out, out)
    on, amount = chosen(), rand(0.5, 2.0)
    return torch.where(on.view(shape), sharpen(out, amount), out)


def _per_image(x: torch.Tensor, value: float | bool) -> torch.Tensor:
    """``value`` once per image of ``x`` (a bool gives a bool tensor)."""
    return torch.full((x.shape[0],), value, device=x.device)


PROBES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    # each applied to every image at one strength; names as the reports print them
    "bars top and bottom (4:3 film)": lambda x: bars(x, _per_image(x, 0.125), _per_image(x, False)),
    "bars left and right (3:4 film)": lambda x: bars(x, _per_image(x, 0.125), _per_image(x, True)),
    "printed markers": lambda x: stamps(x, _per_image(x, True),
                                        generator=torch.Generator(device=x.device).manual_seed(0)),
    "histogram equalisation": equalize,
    "sharpening": lambda x: sharpen(x, _per_image(x, 1.5)),
}
