"""Counterfactual shortcut check: does a classifier change its answer when a film gets another source's mark?

Each probe of :data:`training.artefacts.PROBES` (padding bars, printed markers, histogram equalisation,
sharpening) is put on every image of a side, and the classifier scored again. None of them changes the
anatomy (equalisation and sharpening change how it is rendered, as a publisher's processing does), so a
classifier that reads the lungs keeps its answers; one that learned "marks of a publication = COVID-19"
calls normals positive. On these data the check measures the source shortcut on every normal, where the
within-source ROC AUC has only the few normals from sources other than NIH.

:func:`counterfactual_check` gives, per probe, the share of normals called positive and of COVID-19 images
called negative at the operating threshold, and the ROC AUC over the images and all their probed copies
(a normal with a mark must still rank below the COVID-19 images).

It is a measurement, not a selection figure: a network trained with these very marks as augmentation
(``artefact_augment``) passes it by construction, whatever else it learned, so for such a network it shows
only that the augmentation took.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from training.artefacts import PROBES
from training.metrics import binary_metrics

Scorer = Callable[[torch.Tensor], np.ndarray]
Probe = Callable[[torch.Tensor], torch.Tensor]


def probed(x: torch.Tensor, probe: Probe, batch_size: int = 64) -> torch.Tensor:
    """``probe`` applied to uint8 images ``x`` (N, C, H, W), in batches; uint8 again."""
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise ValueError('Argument "x" must be a uint8 tensor (N, C, H, W).')
    out = [(probe(x[i:i + batch_size].float() / 255.0).clamp(0, 1) * 255).round().to(torch.uint8)
           for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out) if out else x.clone()


def _shares(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, Any]:
    ok = np.isfinite(p)
    neg, pos = p[ok & (y == 0)], p[ok & (y == 1)]
    out: dict[str, Any] = {"normals_positive": float((neg >= threshold).mean()) if neg.size else None,
                           "covid_negative": float((pos < threshold).mean()) if pos.size else None,
                           "normals_mean_probability": float(neg.mean()) if neg.size else None}
    if not ok.all():
        out["not_assessable"] = int((~ok).sum())
    return out


def counterfactual_check(score: Scorer, x: torch.Tensor, y: np.ndarray, threshold: float, *,
                         plain: np.ndarray | None = None, probes: dict[str, Probe] | None = None
                         ) -> dict[str, Any]:
    """Score uint8 inputs ``x`` (N, C, H, W; labels ``y``, 1 = COVID-19) as they are and with each probe.

    ``score`` maps a uint8 batch to P(COVID-19) per image; ``plain`` are its scores of ``x`` when already
    known. Returns ``{"threshold", "n", "plain": shares, "probes": {name: shares}, "roc_auc_with_copies"}``,
    where shares are the share of normals at or above ``threshold``, of COVID-19 images below it, and the
    normals' mean probability.
    """
    if x.shape[0] != np.asarray(y).size:
        raise ValueError(f"x holds {x.shape[0]} images but y {np.asarray(y).size} labels")
    return counterfactual_from(lambda probe: score(x if probe is None else probed(x, probe)), y, threshold,
                               plain=plain, probes=probes)


def counterfactual_from(score_with: Callable[[Probe | None], np.ndarray], y: np.ndarray, threshold: float, *,
                        plain: np.ndarray | None = None, probes: dict[str, Probe] | None = None
                        ) -> dict[str, Any]:
    """:func:`counterfactual_check` for any way of scoring: ``score_with(probe)`` gives P(COVID-19) of every
    image with ``probe`` applied (``None``: as it is), NaN where it cannot say. Images without an answer are
    left out of a probe's shares (counted as ``not_assessable``) and of the ROC AUC."""
    y = np.asarray(y).astype(int).reshape(-1)
    probes = PROBES if probes is None else probes
    p0 = np.asarray(score_with(None) if plain is None else plain, dtype=np.float64).reshape(-1)
    ys, ps = [y], [p0]
    out: dict[str, Any] = {"threshold": float(threshold), "n": int(y.size),
                           "plain": _shares(y, p0, threshold), "probes": {}}
    for name, fn in probes.items():
        p = np.asarray(score_with(fn), dtype=np.float64).reshape(-1)
        if p.size != y.size:
            raise ValueError(f"probe {name!r}: {p.size} scores for {y.size} images")
        out["probes"][name] = _shares(y, p, threshold)
        ys.append(y)
        ps.append(p)
    ya, pa = np.concatenate(ys), np.concatenate(ps)
    ok = np.isfinite(pa)
    out["roc_auc_with_copies"] = binary_metrics(ya[ok], pa[ok], threshold)["roc_auc"]
    return out

