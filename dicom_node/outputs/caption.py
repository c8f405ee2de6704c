"""Heatmap overlay and the burned-in caption of the secondary capture.

Pure numpy + Pillow; no system fonts needed (Pillow's bundled default font, scaled).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

MAX_SIDE = 1024  # long side of the SC in pixels; larger sources are downsampled
ALPHA_MIN = 0.0  # overlay opacity where the heatmap is 0 (the radiograph stays grey)
ALPHA_MAX = 0.65  # overlay opacity where the heatmap is 1
CAPTION_BG = (0, 0, 0)
CAPTION_FG = (255, 255, 255)
CAPTION_WARN = (255, 64, 64)


@lru_cache(maxsize=4)
def colormap_lut(name: str = "jet") -> np.ndarray:
    """A 256x3 uint8 lookup table of the matplotlib colormap ``name``."""
    cmap = colormaps[name]
    return (cmap(np.linspace(0.0, 1.0, 256))[:, :3] * 255.0 + 0.5).astype(np.uint8)


@lru_cache(maxsize=1)
def _alpha_table() -> list[int]:
    return [round(255 * (ALPHA_MIN + (ALPHA_MAX - ALPHA_MIN) * v / 255)) for v in range(256)]


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def output_shape(shape: tuple[int, int], max_side: int = MAX_SIDE) -> tuple[tuple[int, int], float]:
    """Rows/columns of the overlay for a source of ``shape`` and the scale factor (<= 1) applied."""
    rows, cols = shape
    if rows < 1 or cols < 1:
        raise ValueError(f'Argument "shape" must be positive, not {shape}.')
    scale = min(1.0, max_side / max(rows, cols))
    return (max(1, round(rows * scale)), max(1, round(cols * scale))), scale


def _to_image(array: np.ndarray, shape: tuple[int, int]) -> Image.Image:
    """``array`` (float, [0, 1]) as an 8-bit greyscale PIL image resized to ``shape`` (rows, columns)."""
    scaled = array * np.float32(255.0)
    np.clip(scaled, 0.0, 255.0, out=scaled)
    img = Image.fromarray(scaled.astype(np.uint8), mode="L")
    if img.size != (shape[1], shape[0]):
        img = img.resize((shape[1], shape[0]), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return img


def overlay(pixels: np.ndarray, heatmap: np.ndarray, shape: tuple[int, int], cmap: str = "jet") -> np.ndarray:
    """Alpha-blend ``heatmap`` (colour-mapped) over the greyscale ``pixels``, both resized to ``shape``.

    ``pixels`` and ``heatmap`` are float arrays in [0, 1] of the same shape. The overlay's opacity grows
    with the heatmap value (from ALPHA_MIN to ALPHA_MAX), so the radiograph stays readable where the
    model did not look. Returns an RGB uint8 array of ``shape`` + (3,).
    """
    if pixels.ndim != 2 or heatmap.shape != pixels.shape:
        raise ValueError(
            f'Arguments "pixels" {pixels.shape} and "heatmap" {heatmap.shape} must be 2-D of the same shape.')
    grey = _to_image(pixels, shape).convert("RGB")
    heat = _to_image(heatmap, shape)
    colour = Image.frombytes("P", heat.size, heat.tobytes())  # heat values index the colormap palette
    colour.putpalette(colormap_lut(cmap).tobytes())
    colour = colour.convert("RGB")
    alpha = heat.point(_alpha_table())
    return np.asarray(Image.composite(colour, grey, alpha))


def greyscale_rgb(pixels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The radiograph alone as RGB uint8 of ``shape`` (when there is no heatmap to overlay)."""
    return np.asarray(_to_image(pixels, shape).convert("RGB"))


def add_caption(rgb: np.ndarray, lines: list[str], warning: str) -> tuple[np.ndarray, int]:
    """Return ``rgb`` with a black caption band on top holding ``warning`` (red) and ``lines`` (white).

    The font scales with the image width (readable at the PACS's fit-to-window zoom). Returns the new
    image and the caption band's height in rows.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError('Argument "rgb" must be a uint8 array of shape (rows, columns, 3).')
    width = rgb.shape[1]
    size = int(np.clip(width / 36, 10, 48))
    font = _font(size)
    line_h = int(size * 1.3)
    pad = max(2, size // 3)
    band_h = pad * 2 + line_h * (1 + len(lines))
    band = Image.new("RGB", (width, band_h), CAPTION_BG)
    draw = ImageDraw.Draw(band)
    draw.text((pad, pad), warning, font=font, fill=CAPTION_WARN)
    for i, line in enumerate(lines, start=1):
        draw.text((pad, pad + i * line_h), line, font=font, fill=CAPTION_FG)
    out = np.empty((band_h + rgb.shape[0], width, 3), dtype=np.uint8)
    out[:band_h] = np.asarray(band)
    out[band_h:] = rgb
    return out, band_h
