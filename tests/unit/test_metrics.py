"""training.metrics against values computed by hand on fixed predictions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training import metrics as M

pytestmark = pytest.mark.unit

Y = [1, 1, 1, 0, 0, 0, 1, 0]
P = [0.9, 0.8, 0.4, 0.7, 0.2, 0.1, 0.6, 0.3]


def test_confusion_and_ratios_at_half() -> None:
    m = M.binary_metrics(Y, P, 0.5)
    # positives predicted: 0.9, 0.8, 0.6 (true) and 0.7 (false); 0.4 is a missed positive
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (3, 1, 3, 1)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(0.75)
    assert m["n"] == 8 and m["positives"] == 4


def test_asymmetric_threshold() -> None:
    m = M.binary_metrics(Y, P, 0.65)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 3, 2)
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(1 / 2)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(4 / 7)


def test_threshold_is_inclusive() -> None:
    assert M.confusion([1, 0], [0.5, 0.5], 0.5) == {"tp": 1, "fp": 1, "tn": 0, "fn": 0}


def test_roc_auc_by_hand_and_ties() -> None:
    # 16 positive/negative pairs; 0.9 and 0.8 beat all 4 negatives, 0.4 and 0.6 beat 3 (not 0.7)
    assert M.roc_auc(Y, P) == pytest.approx(14 / 16)
    assert M.roc_auc([1, 0], [0.5, 0.5]) == pytest.approx(0.5)
    assert M.roc_auc([1, 0, 0], [0.5, 0.5, 0.1]) == pytest.approx(0.75)
    assert math.isnan(M.roc_auc([1, 1], [0.2, 0.3]))


def test_roc_auc_matches_sklearn() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    p = np.round(rng.random(200) * 0.5 + y * 0.3, 2)  # rounded: many ties
    assert M.roc_auc(y, p) == pytest.approx(roc_auc_score(y, p))


def test_empty_denominators_are_nan() -> None:
    m = M.binary_metrics([0, 0], [0.1, 0.2], 0.5)
    assert math.isnan(m["precision"]) and math.isnan(m["recall"]) and math.isnan(m["roc_auc"])
    assert m["specificity"] == 1.0


def test_threshold_for_sensitivity() -> None:
    # positives sorted: 0.9, 0.8, 0.6, 0.4
    assert M.threshold_for_sensitivity(Y, P, 0.95) == 0.4  # all 4 needed
    assert M.threshold_for_sensitivity(Y, P, 0.75) == 0.6  # 3 of 4
    assert M.threshold_for_sensitivity(Y, P, 0.5) == 0.8
    assert M.binary_metrics(Y, P, M.threshold_for_sensitivity(Y, P, 0.75))["sensitivity"] >= 0.75
    with pytest.raises(ValueError, match="positive"):
        M.threshold_for_sensitivity([0, 0], [0.1, 0.2], 0.9)
    with pytest.raises(ValueError, match="target"):
        M.threshold_for_sensitivity(Y, P, 0.0)


def test_dice_iou() -> None:
    a = np.array([1, 1, 0, 0], bool)
    b = np.array([1, 0, 1, 0], bool)
    assert M.dice_iou(a, b) == pytest.approx((0.5, 1 / 3))
    assert M.dice_iou(a, a) == (1.0, 1.0)
    assert M.dice_iou(np.zeros(3, bool), np.zeros(3, bool)) == (1.0, 1.0)
    with pytest.raises(ValueError, match="shape"):
        M.dice_iou(a, b[:3])


def test_bootstrap_interval_is_repeatable_and_brackets_the_estimate() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = rng.random(300) * 0.6 + y * 0.3
    lo, hi = M.bootstrap_ci(y, p, M.roc_auc, n_boot=300, seed=1)
    assert (lo, hi) == M.bootstrap_ci(y, p, M.roc_auc, n_boot=300, seed=1)
    assert 0.5 < lo < M.roc_auc(y, p) < hi < 1.0
    out = M.metrics_with_ci(y, p, 0.5, n_boot=100)
    for name in ("roc_auc", "sensitivity", "specificity", "accuracy", "f1"):
        ci_lo, ci_hi = out[f"{name}_ci"]
        assert math.isfinite(ci_lo) and math.isfinite(ci_hi), name
        assert ci_lo <= out[name] <= ci_hi, name
        assert ci_hi - ci_lo > 0.01, name  # 300 noisy cases: no statistic is known exactly


def test_per_group_and_summary() -> None:
    g = ["a", "a", "b", "b", "a", "b", "a", "b"]
    out = M.per_group(Y, P, g, 0.5)
    assert sorted(out) == ["a", "b"]
    assert out["a"]["n"] == 4 and out["a"]["tp"] == 3  # a: 0.9(1), 0.8(1), 0.2(0), 0.6(1)
    s = M.summary([0.1, 0.2, 0.3, float("nan")])
    assert s["n"] == 3 and s["median"] == pytest.approx(0.2)
    assert math.isnan(M.summary([])["median"])


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="y_true"):
        M.binary_metrics([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="differ in length"):
        M.roc_auc([0, 1], [0.1])


def test_within_group_auc_counts_only_pairs_of_one_group() -> None:
    # group a: covid 0.9, 0.4 vs normal 0.5 -> 1 of 2 pairs right; group b: covid 0.3 vs normals 0.2
    # and 0.1 -> 2 of 2; group c: normals only (no pair). Pairs across groups (a's normal 0.5 above b's
    # covid 0.3, c's 0.95 above every covid) must not count.
    y = [1, 1, 0, 1, 0, 0, 0]
    p = [0.9, 0.4, 0.5, 0.3, 0.2, 0.1, 0.95]
    g = ["a", "a", "a", "b", "b", "b", "c"]
    out = M.within_group_auc(M.per_group(y, p, g, 0.5))
    assert out == {"roc_auc": pytest.approx(3 / 4), "pairs": 4, "groups": ["a", "b"], "positives": 3,
                   "negatives": 3}
    assert M.roc_auc(y, p) == pytest.approx(7 / 12)  # the AUC over all pairs is another number


def test_within_group_auc_equals_brute_force_pair_counting() -> None:
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 300)
    g = rng.choice(["x", "y", "z"], 300)
    p = np.round(rng.random(300) * 0.5 + 0.3 * y, 2)  # rounded: ties occur and count half
    right = pairs = 0.0
    for k in "xyz":
        pos, neg = p[(g == k) & (y == 1)], p[(g == k) & (y == 0)]
        right += (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
        pairs += pos.size * neg.size
    out = M.within_group_auc(M.per_group(y, p, g, 0.5))
    assert out["pairs"] == pairs and out["roc_auc"] == pytest.approx(right / pairs)
    assert math.isnan(M.within_group_auc({"n": {"n": 3, "positives": 3, "roc_auc": None}})["roc_auc"])


def test_paired_auc_difference_resamples_both_scores_together() -> None:
    rng = np.random.default_rng(1)
    y = np.array([0] * 40 + [1] * 40)
    good = y + rng.normal(0, 0.5, y.size)  # separates the classes well
    same = M.paired_auc_difference(y, good, good, n_boot=100)
    assert same == {"difference": 0.0, "ci": [0.0, 0.0]}  # paired: every resample scores both alike
    noise = rng.normal(0, 1, y.size)
    lead = M.paired_auc_difference(y, good, noise, n_boot=200)
    assert lead["difference"] == pytest.approx(M.roc_auc(y, good) - M.roc_auc(y, noise))
    assert 0 < lead["ci"][0] < lead["difference"] < lead["ci"][1]  # far apart: the interval excludes 0
    close = M.paired_auc_difference(y, good, good + rng.normal(0, 0.05, y.size), n_boot=200)
    assert close["ci"][0] < 0 < close["ci"][1]  # nearly the same scores: validation cannot tell them apart
    with pytest.raises(ValueError, match="same cases"):
        M.paired_auc_difference(y, good, good[:-1])


def test_bootstrap_interval_has_the_width_of_its_level() -> None:
    """For accuracy on n cases the 95% percentile interval is close to the normal one,
    2 * 1.96 * sqrt(p(1-p)/n), and a 50% interval to 2 * 0.674 * sqrt(p(1-p)/n): a 90% or 99% interval
    (16% and 31% off), or a resample of the wrong size, would miss the 10% allowed here."""
    from training.metrics import bootstrap_ci

    rng = np.random.default_rng(7)
    n = 400
    y = rng.integers(0, 2, n)
    right = rng.random(n) < 0.8
    prob = np.where(right, y, 1 - y).astype(float)
    accuracy = float(right.mean())
    se = math.sqrt(accuracy * (1 - accuracy) / n)

    def acc(yy: np.ndarray, pp: np.ndarray) -> float:
        return float(((pp >= 0.5) == yy).mean())

    for alpha, z in ((0.05, 1.96), (0.5, 0.674)):
        lo, hi = bootstrap_ci(y, prob, acc, n_boot=2000, alpha=alpha, seed=1)
        assert lo < accuracy < hi
        assert (hi - lo) == pytest.approx(2 * z * se, rel=0.10), alpha
