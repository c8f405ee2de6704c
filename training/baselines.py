"""Trivial baselines that show what the data lets a model learn without looking at the lungs.

1. ``shape``: logistic regression on three numbers that describe only the image's shape (aspect ratio,
   area in megapixels, exactly square or not).
2. ``pixels64``: logistic regression on the raw pixels of the image's centre square resized to 64 x 64.
3. ``texture``: logistic regression on three numbers that describe only the fine texture of the centre
   square (at the size it is given, the classifier's input size in a build): the mean Laplacian magnitude
   (log), the share of pixels whose Laplacian exceeds 0.02, and the mean horizontal gradient (log). Sharpness
   and noise come from how a source acquires, processes and compresses its images, not from the lungs.

Both are fitted on the training split, thresholded on validation like the model, and scored on test.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from training.metrics import binary_metrics, threshold_for_sensitivity


def shape_features(shapes: np.ndarray) -> np.ndarray:
    """(N, 2) rows, columns -> (N, 3) aspect ratio (columns/rows), area in megapixels, is-square."""
    s = np.asarray(shapes, dtype=np.float64).reshape(-1, 2)
    return np.stack([s[:, 1] / s[:, 0], s[:, 0] * s[:, 1] / 1e6, (s[:, 0] == s[:, 1]).astype(np.float64)], 1)


def pixel_features(centre_squares: torch.Tensor, size: int = 64) -> np.ndarray:
    """uint8 (N, 1, S, S) centre squares -> (N, size*size) pixels in [0, 1] (area-resized)."""
    x = F.interpolate(centre_squares.float() / 255.0, size=(size, size), mode="area")
    return x.reshape(x.shape[0], -1).numpy().astype(np.float64)


LAPLACE = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))


def texture_features(centre_squares: torch.Tensor, border: int = 4) -> np.ndarray:
    """uint8 (N, 1, S, S) centre squares -> (N, 3) texture numbers (see the module docstring).

    ``border`` pixels at each edge are left out, so resampling at the edge does not count as texture.
    """
    x = centre_squares.float() / 255.0
    if x.ndim != 4 or x.shape[1] != 1 or min(x.shape[2:]) <= 2 * border + 2:
        raise ValueError('Argument "centre_squares" must be (N, 1, S, S) with S large enough for the border.')
    lap = F.conv2d(x, torch.tensor(LAPLACE).view(1, 1, 3, 3))[:, :, border:-border, border:-border].abs()
    grad = (x[:, :, :, 1:] - x[:, :, :, :-1])[:, :, border:-border, border:-border].abs()
    eps = 1e-6
    feats = torch.stack([(lap.mean(dim=(1, 2, 3)) + eps).log(), (lap > 0.02).float().mean(dim=(1, 2, 3)),
                         (grad.mean(dim=(1, 2, 3)) + eps).log()], 1)
    return feats.numpy().astype(np.float64)


def fit_and_score(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
                  test: tuple[np.ndarray, np.ndarray], *, target_sensitivity: float = 0.95,
                  c: float = 1.0) -> dict[str, object]:
    """Standardise + logistic regression on ``train``; test metrics at 0.5 and at the validation threshold."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000, class_weight="balanced"))
    model.fit(train[0], train[1])
    p_val = model.predict_proba(val[0])[:, 1]
    p_test = model.predict_proba(test[0])[:, 1]
    thr = threshold_for_sensitivity(val[1], p_val, target_sensitivity)
    return {"test_at_0.5": binary_metrics(test[1], p_test, 0.5),
            "test_at_val_threshold": binary_metrics(test[1], p_test, thr),
            "val_roc_auc": binary_metrics(val[1], p_val, 0.5)["roc_auc"], "threshold": thr}


def trivial_baselines(shapes: dict[str, np.ndarray], centres: dict[str, torch.Tensor],
                      y: dict[str, np.ndarray], *,
                      target_sensitivity: float = 0.95) -> dict[str, dict[str, object]]:
    """The three baselines; each dict argument is keyed by split side (train, val, test)."""
    sides = ("train", "val", "test")
    out = {}
    feats = {s: shape_features(shapes[s]) for s in sides}
    out["shape"] = fit_and_score(*((feats[s], y[s]) for s in sides), target_sensitivity=target_sensitivity)
    pix = {s: pixel_features(centres[s]) for s in sides}
    out["pixels64"] = fit_and_score(*((pix[s], y[s]) for s in sides), target_sensitivity=target_sensitivity,
                                    c=0.01)
    tex = {s: texture_features(centres[s]) for s in sides}
    out["texture"] = fit_and_score(*((tex[s], y[s]) for s in sides), target_sensitivity=target_sensitivity)
    return out
