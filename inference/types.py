"""Data passed between the stages of the pipeline and to its callers (worker, predict, training)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

Finding = Literal["positive", "negative", "not_assessable"]
MapFactory = Callable[[], np.ndarray]


@dataclass
class StoredValues:
    """A greyscale instance's stored values and the table that gives its pixels, exactly:
    ``pixels == table[values - low]``.

    Decoders keep them when asked to (``inference.imaging.Allocator``): the CUDA pipeline copies the values to
    the GPU (1 or 2 bytes a pixel, where the pixels take 4) and looks the pixels up there.
    """

    values: np.ndarray  # 2-D uint8, int8, uint16 or int16, the image's shape
    table: np.ndarray  # float32, one entry per level from ``low`` to the highest stored value
    low: int  # the lowest stored value

    def pixels(self) -> np.ndarray:
        """The pixels this table gives (on the host)."""
        return self.table[self.values.astype(np.int32) - self.low]


@dataclass
class XrayImage:
    """A decoded radiograph, ready for the model.

    ``pixels`` is float32, shape (rows, columns), values in [0, 1], displayed the usual way
    (bright bone, dark air: MONOCHROME1 already inverted, Modality and VOI LUT applied). ``stored``, when a
    decoder kept them, gives the same pixels from the stored values.
    """

    pixels: np.ndarray
    source: str  # file path or SOP Instance UID, for logs and CSV
    meta: dict[str, Any] = field(default_factory=dict)  # modality, body_part, view_position, ...
    stored: StoredValues | None = field(default=None, repr=False)


@dataclass
class Result:
    """What the pipeline says about one image.

    ``heatmap`` and ``lung_mask`` are at source resolution. Either may be deferred (:meth:`defer`): a
    function without arguments makes the array on first access, and the array is kept. The CUDA
    pipeline defers them so that a batch does not copy full-resolution maps off the GPU for callers
    that never look at them (the lung attention is computed on the GPU either way).
    """

    finding: Finding
    probability: float | None  # P(COVID-19 pneumonia); None when not assessable
    threshold: float  # operating threshold of the model bundle
    reason: str = ""  # why not assessable (empty otherwise)
    # not_xray | for_processing | not_chest | child | lateral | too_small | no_lungs | undecodable | error
    reason_code: str = ""
    lung_attention: float | None = None  # share of the heatmap's mass inside the lung mask
    lung_fraction: float | None = None  # lung mask area / image area
    heatmap: np.ndarray | None = field(default=None, repr=False)  # float32 (rows, columns) in [0, 1]
    lung_mask: np.ndarray | None = field(default=None, repr=False)  # bool (rows, columns)
    model_name: str = ""
    model_version: str = ""
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage

    def defer(self, name: Literal["heatmap", "lung_mask"], factory: MapFactory) -> None:
        """Make ``name`` from ``factory`` on its first read instead of now."""
        if name not in ("heatmap", "lung_mask") or not callable(factory):
            raise ValueError('Result.defer takes "heatmap" or "lung_mask" and a function without arguments.')
        setattr(self, name, factory)


def _deferred_array(name: str) -> property:
    """A property that stores an array or a :data:`MapFactory`, and runs the factory once on first read."""
    slot = f"_{name}"

    def get(self: Result) -> np.ndarray | None:
        value = self.__dict__.get(slot)
        if callable(value):
            value = value()
            self.__dict__[slot] = value
        return value

    def put(self: Result, value: np.ndarray | MapFactory | None) -> None:
        if value is not None and not callable(value) and not isinstance(value, np.ndarray):
            raise TypeError(f'Result.{name} must be a numpy array, a function returning one, or None.')
        self.__dict__[slot] = value

    return property(get, put, doc=f"``{name}`` at source resolution (made on first read when deferred).")


# The dataclass has taken the fields' defaults for __init__; from here on reads and writes go through
# the properties, so ``Result(heatmap=factory)`` stores the factory and ``result.heatmap`` an array.
Result.heatmap = _deferred_array("heatmap")  # type: ignore[assignment]
Result.lung_mask = _deferred_array("lung_mask")  # type: ignore[assignment]
