"""Data passed between the stages of the pipeline and to its callers (worker, predict, training)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

Finding = Literal["positive", "negative", "not_assessable"]


@dataclass
class XrayImage:
    """A decoded radiograph, ready for the model.

    ``pixels`` is float32, shape (rows, columns), values in [0, 1], displayed the usual way
    (bright bone, dark air: MONOCHROME1 already inverted, Modality and VOI LUT applied).
    """

    pixels: np.ndarray
    source: str  # file path or SOP Instance UID, for logs and CSV
    meta: dict[str, Any] = field(default_factory=dict)  # modality, body_part, view_position, ...


@dataclass
class Result:
    """What the pipeline says about one image."""

    finding: Finding
    probability: float | None  # P(COVID-19 pneumonia); None when not assessable
    threshold: float  # operating threshold of the model bundle
    reason: str = ""  # why not assessable (empty otherwise)
    reason_code: str = ""  # not_xray | not_chest | lateral | too_small | no_lungs | undecodable
    lung_attention: float | None = None  # share of the heatmap's mass inside the lung mask
    lung_fraction: float | None = None  # lung mask area / image area
    heatmap: np.ndarray | None = None  # float32 (rows, columns) in [0, 1] at source resolution
    lung_mask: np.ndarray | None = None  # bool (rows, columns) at source resolution
    model_name: str = ""
    model_version: str = ""
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
