"""The trivial shortcut baselines: features checked by hand, and each one sees only what it should."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.baselines import shape_features, texture_features, trivial_baselines

pytestmark = pytest.mark.unit


def test_shape_features_by_hand() -> None:
    f = shape_features(np.array([[1000, 2000], [512, 512]]))
    assert f.tolist() == [[2.0, 2.0, 0.0], [1.0, 0.262144, 1.0]]


def test_texture_features_by_hand() -> None:
    flat = torch.full((1, 1, 32, 32), 128, dtype=torch.uint8)
    checker = torch.from_numpy(((np.indices((32, 32)).sum(0) % 2) * 255).astype(np.uint8))[None, None]
    f = texture_features(torch.cat([flat, checker]))
    assert f[0].tolist() == pytest.approx([math.log(1e-6), 0.0, math.log(1e-6)], abs=1e-3)
    # a 0/1 checkerboard: every Laplacian is +-4, every horizontal step 1
    assert f[1].tolist() == pytest.approx([math.log(4.0), 1.0, 0.0], abs=1e-5)
    with pytest.raises(ValueError, match="centre_squares"):
        texture_features(torch.zeros((2, 1, 8, 8), dtype=torch.uint8))


def _squares(n: int, noisy: bool, rng: np.random.Generator) -> torch.Tensor:
    """Smooth ramps of random brightness; ``noisy`` adds fine noise (texture only, same mean)."""
    ramp = np.linspace(0.2, 0.8, 48)[None, :].repeat(48, 0)
    out = []
    for _ in range(n):
        a = ramp * rng.uniform(0.8, 1.2) + (rng.normal(0, 0.04, ramp.shape) if noisy else 0.0)
        out.append(np.clip(np.rint(a * 255), 0, 255).astype(np.uint8))
    return torch.from_numpy(np.stack(out))[:, None]


def test_texture_baseline_finds_a_texture_shortcut_that_shape_cannot() -> None:
    rng = np.random.default_rng(0)
    sides = ("train", "val", "test")
    counts = {"train": 40, "val": 20, "test": 20}
    centres = {s: torch.cat([_squares(counts[s], False, rng), _squares(counts[s], True, rng)]) for s in sides}
    y = {s: np.repeat([0, 1], counts[s]) for s in sides}
    shapes = {s: np.tile([[1024, 1024]], (2 * counts[s], 1)) for s in sides}  # one shape for both classes
    out = trivial_baselines(shapes, centres, y)
    assert set(out) == {"shape", "pixels64", "texture"}
    assert out["texture"]["test_at_0.5"]["roc_auc"] == 1.0
    assert out["shape"]["test_at_0.5"]["roc_auc"] == 0.5  # identical shapes carry nothing
