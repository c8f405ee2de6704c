"""Per-image state of a batch in :class:`inference.pipeline.Pipeline` and the helpers its two paths share.

``Work`` carries one image through the stages; ``make_result`` builds a :class:`Result` whose lung mask and
heatmap may still be deferred (see :meth:`Result.defer`); ``mask_at_source`` and ``heatmap_at_source`` are
those deferred computations (the CPU path calls them directly); ``by_shape`` groups a batch for stacked
device calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from inference import imaging
from inference.types import MapFactory, Result, XrayImage


@dataclass
class Work:
    """Per-image state while a batch moves through the stages."""

    image: XrayImage
    timings: dict[str, float] = field(default_factory=dict)
    result: Result | None = None  # set once the image is finished (not assessable, or done)
    x1: np.ndarray | None = None  # stage 1 input, then its output
    mask: np.ndarray | MapFactory | None = None  # lung mask at source resolution (or its factory)
    lung_fraction: float | None = None
    x2: np.ndarray | None = None  # stage 2 input (host path)
    box: tuple[int, int, int, int] | None = None  # stage 2 crop box in source pixels (r0, c0, r1, c1)
    small: np.ndarray | None = None  # post-processed stage 1 mask on the square grid
    shape_problem: tuple[str, str] | None = None  # why ``small`` is not two lungs side by side
    prob: float | None = None  # P(covid19) from stage 2
    cam: np.ndarray | None = None  # stage 2 CAM on its input grid


DEVICE_GROUP = 16  # images per stacked device call: bounds the full-resolution temporaries' memory


def by_shape(items: list[Work]) -> list[tuple[tuple[int, int], list[int]]]:
    """Positions in ``items`` grouped by image shape (at most DEVICE_GROUP per group), in order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, w in enumerate(items):
        groups.setdefault(w.image.pixels.shape, []).append(i)  # type: ignore[arg-type]
    return [
        (shape, idx[k : k + DEVICE_GROUP])
        for shape, idx in groups.items()
        for k in range(0, len(idx), DEVICE_GROUP)
    ]


def make_result(
    *,
    heatmap: np.ndarray | MapFactory | None = None,
    lung_mask: np.ndarray | MapFactory | None,
    **fields: Any,
) -> Result:
    """A :class:`Result` whose maps may still be factories (deferred until read): its properties take both."""
    return Result(heatmap=heatmap, lung_mask=lung_mask, **fields)  # type: ignore[arg-type]


def mask_at_source(small: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The post-processed square-grid mask mapped back to the source image (bool)."""
    return imaging.unsquare(small.astype(np.float32), shape) >= 0.5


def heatmap_at_source(
    cam: np.ndarray, box: tuple[int, int, int, int] | None, shape: tuple[int, int]
) -> np.ndarray:
    """A stage 2 CAM mapped back to the source image: float32 in [0, 1], zero outside the lung crop."""
    heat = imaging.uncrop(cam, box, shape) if box is not None else imaging.unsquare(cam, shape)
    np.clip(heat, 0.0, 1.0, out=heat)
    return heat
