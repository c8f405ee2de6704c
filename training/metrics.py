"""Evaluation metrics: binary classification at a threshold, ROC AUC with a bootstrap interval, Dice / IoU.

A prediction is positive when ``probability >= threshold``. Ratios with an empty denominator are reported as
``nan`` (never silently as 0 or 1). The operating threshold comes from :func:`threshold_for_sensitivity` on
the validation set only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np


def _arrays(y_true: Sequence[int] | np.ndarray,
            prob: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.int64).reshape(-1)
    p = np.asarray(prob, dtype=np.float64).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f'Arguments "y_true" and "prob" differ in length ({y.size} vs {p.size}).')
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError('Argument "y_true" must hold only 0 and 1.')
    return y, p


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else math.nan


def roc_auc(y_true: Sequence[int] | np.ndarray, prob: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with ties counted half); ``nan`` with only one class."""
    y, p = _arrays(y_true, prob)
    pos, neg = p[y == 1], p[y == 0]
    if not pos.size or not neg.size:
        return math.nan
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([pos, neg]))
    return float((ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2) / (pos.size * neg.size))


def confusion(y_true: Sequence[int] | np.ndarray, prob: Sequence[float] | np.ndarray,
              threshold: float) -> dict[str, int]:
    """Counts ``tp, fp, tn, fn`` with positive = ``prob >= threshold``."""
    y, p = _arrays(y_true, prob)
    pred = p >= threshold
    return {"tp": int(((y == 1) & pred).sum()), "fp": int(((y == 0) & pred).sum()),
            "tn": int(((y == 0) & ~pred).sum()), "fn": int(((y == 1) & ~pred).sum())}


def binary_metrics(y_true: Sequence[int] | np.ndarray, prob: Sequence[float] | np.ndarray,
                   threshold: float = 0.5) -> dict[str, float]:
    """Accuracy, precision, recall (= sensitivity), specificity, F1 and ROC AUC, plus the counts.

    Returns a flat dict: the counts ``n, positives, tp, fp, tn, fn`` (int), and ``threshold, accuracy,
    precision, recall, sensitivity, specificity, f1, roc_auc`` (float).
    """
    c = confusion(y_true, prob, threshold)
    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
    n = tp + fp + tn + fn
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {
        "n": n, "positives": tp + fn, "threshold": float(threshold), "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "accuracy": _ratio(tp + tn, n), "precision": precision, "recall": recall, "sensitivity": recall,
        "specificity": _ratio(tn, tn + fp), "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "roc_auc": roc_auc(y_true, prob),
    }


def threshold_for_sensitivity(y_true: Sequence[int] | np.ndarray, prob: Sequence[float] | np.ndarray,
                              target: float = 0.95) -> float:
    """The highest threshold whose sensitivity on (``y_true``, ``prob``) is at least ``target``.

    That is the k-th highest positive probability with k = ceil(target x positives). Use on validation data
    only. Raises ``ValueError`` when there is no positive case or ``target`` is outside (0, 1].
    """
    if not 0.0 < float(target) <= 1.0:
        raise ValueError('Argument "target" must be in (0, 1].')
    y, p = _arrays(y_true, prob)
    pos = np.sort(p[y == 1])[::-1]
    if not pos.size:
        raise ValueError('Argument "y_true" has no positive case: no threshold can reach a sensitivity.')
    k = max(1, math.ceil(float(target) * pos.size - 1e-9))
    return float(pos[k - 1])


def bootstrap_ci(y_true: Sequence[int] | np.ndarray, prob: Sequence[float] | np.ndarray,
                 statistic: Callable[[np.ndarray, np.ndarray], float], *, n_boot: int = 1000,
                 alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval (1 - ``alpha``) of ``statistic(y, prob)`` over resampled cases.

    ``prob`` may hold several scores per case (shape (N, k), a row per case) for paired statistics.
    Resamples where the statistic is ``nan`` (e.g. one class only) are dropped;
    ``(nan, nan)`` when none is left.
    """
    if n_boot < 10:
        raise ValueError('Argument "n_boot" must be at least 10.')
    scores = np.asarray(prob, dtype=np.float64)
    if scores.ndim == 2:
        y, p = _arrays(y_true, scores[:, 0])[0], scores
    else:
        y, p = _arrays(y_true, prob)
    if not y.size:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        idx = rng.integers(0, y.size, y.size)
        v = statistic(y[idx], p[idx])
        if not math.isnan(v):
            values.append(v)
    if not values:
        return (math.nan, math.nan)
    lo, hi = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return (float(lo), float(hi))


def paired_auc_difference(y_true: Sequence[int] | np.ndarray, prob_a: Sequence[float] | np.ndarray,
                          prob_b: Sequence[float] | np.ndarray, *, n_boot: int = 1000, alpha: float = 0.05,
                          seed: int = 0) -> dict[str, Any]:
    """ROC AUC of ``prob_a`` minus that of ``prob_b`` on the same cases, with a paired percentile bootstrap
    interval (1 - ``alpha``): each resample scores both. An interval that holds 0 means these cases cannot
    tell the two apart."""
    y, a = _arrays(y_true, prob_a)
    b = np.asarray(prob_b, dtype=np.float64).reshape(-1)
    if b.shape != a.shape:
        raise ValueError('Arguments "prob_a" and "prob_b" must score the same cases.')
    both = np.stack([a, b], axis=1)
    lo, hi = bootstrap_ci(y, both, lambda yy, pp: roc_auc(yy, pp[:, 0]) - roc_auc(yy, pp[:, 1]),
                          n_boot=n_boot, alpha=alpha, seed=seed)
    return {"difference": roc_auc(y, a) - roc_auc(y, b), "ci": [lo, hi]}


def metrics_with_ci(y_true: Sequence[int] | np.ndarray, prob: Sequence[float] | np.ndarray, threshold: float,
                    *, n_boot: int = 1000, seed: int = 0) -> dict[str, float | list[float]]:
    """:func:`binary_metrics` plus 95% bootstrap intervals (``<name>_ci``) for AUC, sensitivity, specificity,
    accuracy and F1."""
    out: dict[str, float | list[float]] = dict(binary_metrics(y_true, prob, threshold))
    def statistic(name: str) -> Callable[[np.ndarray, np.ndarray], float]:
        if name == "roc_auc":
            return roc_auc
        return lambda y, p: binary_metrics(y, p, threshold)[name]

    for name in ("roc_auc", "sensitivity", "specificity", "accuracy", "f1"):
        stat = statistic(name)
        out[f"{name}_ci"] = list(bootstrap_ci(y_true, prob, stat, n_boot=n_boot, seed=seed))
    return out


def dice_iou(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two boolean masks; both empty counts as a perfect match (1.0, 1.0)."""
    a, b = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    inter, sa, sb = float((a & b).sum()), float(a.sum()), float(b.sum())
    union = sa + sb - inter
    if sa + sb == 0:
        return (1.0, 1.0)
    return (2 * inter / (sa + sb), inter / union)


def per_group(y_true: Sequence[int] | np.ndarray, prob: Sequence[float] | np.ndarray, groups: Sequence[str],
              threshold: float) -> dict[str, dict[str, float]]:
    """:func:`binary_metrics` per group label (e.g. per source), sorted by group name."""
    y, p = _arrays(y_true, prob)
    g = np.asarray(groups)
    if g.shape != y.shape:
        raise ValueError('Argument "groups" must have one entry per case.')
    return {str(k): binary_metrics(y[g == k], p[g == k], threshold) for k in sorted(set(g.tolist()))}


def within_group_auc(groups: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """ROC AUC over the (positive, negative) pairs that share a group, from :func:`per_group`'s output.

    Each group's AUC is the share of its own pairs ranked right, so pooling them weighted by their pair counts
    (positives x negatives) counts every same-group pair once. With groups = sources it measures what a model
    tells apart when the source cannot help. ``roc_auc`` is nan when no group holds both classes;
    ``positives`` and ``negatives`` count the cases of the groups that hold both.
    """
    total, right, used, npos, nneg = 0, 0.0, [], 0, 0
    for name, m in sorted(groups.items()):
        pos = int(m.get("positives", 0))
        pairs = pos * (int(m.get("n", 0)) - pos)
        auc = m.get("roc_auc")
        if pairs and auc is not None and math.isfinite(float(auc)):
            total += pairs
            right += pairs * float(auc)
            used.append(str(name))
            npos, nneg = npos + pos, nneg + int(m["n"]) - pos
    return {"roc_auc": right / total if total else math.nan, "pairs": total, "groups": used,
            "positives": npos, "negatives": nneg}


def summary(values: Sequence[float]) -> dict[str, float]:
    """n, mean, median, 10th/25th/75th/90th percentiles of finite ``values`` (nan when empty)."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if not v.size:
        return {"n": 0, "mean": math.nan, "median": math.nan, "p10": math.nan, "p25": math.nan,
                "p75": math.nan, "p90": math.nan}
    q = np.percentile(v, [10, 25, 50, 75, 90])
    return {"n": int(v.size), "mean": float(v.mean()), "median": float(q[2]), "p10": float(q[0]),
            "p25": float(q[1]), "p75": float(q[3]), "p90": float(q[4])}
