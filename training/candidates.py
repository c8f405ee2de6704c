"""Stage 2 candidates of a build: each measured on validation and test; the one to ship chosen on validation.

A candidate is one trained network, a network of an earlier run on the same split (another seed), or an
ensemble of the best of them; :func:`measure_candidate` measures each the same way, :func:`choose` picks from
validation figures only.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.datasets import SIDES
from training.loops import predict
from training.metrics import binary_metrics, summary, threshold_for_sensitivity
from training.report import _plain
from training.tensors import ImageSet, LungCrops

RECIPE_TAGS = {  # stage 2 options recorded per network -> the word that marks it in candidate names
    "source_balance": "source-balanced",
    "style_augment": "style-augmented",
    "source_adversary": "source-adversarial",
}
RECIPE_KEYS = tuple(RECIPE_TAGS)


def recipe(values: Mapping[str, Any]) -> dict[str, float]:
    """The stage 2 training options of ``values`` (a card's ``training_data``, a candidate), 0 when absent."""
    return {k: float(values.get(k) or 0.0) for k in RECIPE_KEYS}


def recipe_tag(values: Mapping[str, Any]) -> str:
    """The suffix that marks, in candidate names, a network trained source-balanced, style-augmented or
    source-adversarial."""
    return "".join(f" {RECIPE_TAGS[k]}" for k, v in recipe(values).items() if v > 0)


def add_shortcut_arguments(p: argparse.ArgumentParser) -> None:
    """The stage 2 options against source shortcuts, for ``build_default`` and ``cxr-node train`` alike."""
    p.add_argument("--attention-weight", type=float, default=1.0,
                   help="weight of the lung-attention penalty in stage 2's loss (0: off)")
    p.add_argument("--source-balance", type=float, default=0.0,
                   help="0-1: in stage 2's loss also balance the sources within each class "
                        "(sample weight = images of its source and class ** -this); 0 = classes only")
    p.add_argument("--style-augment", type=float, default=0.0,
                   help="0-1: probability of each texture degradation (blur, sharpening, noise) per image in "
                        "stage 2's augmentation; 0 = off")
    p.add_argument("--source-adversary", type=float, default=0.0,
                   help="weight of a class-conditional source adversary (gradient reversal) in stage 2's "
                        "loss; 0 = off; needs images from at least two sources")


def sortable(v: float | None) -> float:
    """A score for sorting: -1 for None or NaN, so an unmeasured candidate is never preferred."""
    return -1.0 if v is None or not np.isfinite(v) else float(v)


def val_threshold(y: np.ndarray, p: np.ndarray, target: float) -> float:
    """The operating threshold for sensitivity ``target`` on labels ``y`` and probabilities ``p``."""
    thr = threshold_for_sensitivity(y, p, target) if (y == 1).any() else 0.5
    return float(min(max(thr, 1e-4), 1 - 1e-4))  # the bundle needs 0 < threshold < 1


def stage2_inputs(mode: str, images: ImageSet, crops: LungCrops) -> torch.Tensor:
    """Stage 2's input tensors for ``mode``: the lung crops, or the whole squared images."""
    return crops.crops if mode == "lung" else images.whole


def stage2_masks(mode: str, crops: LungCrops) -> torch.Tensor:
    """The lung masks in the frame of :func:`stage2_inputs`."""
    return crops.crop_masks if mode == "lung" else crops.whole_masks


def choose(configs: dict[str, dict[str, Any]], min_attention: float) -> str:
    """The configuration to ship, from validation figures only: the best validation ROC AUC among those whose
    median lung attention on validation positives reaches ``min_attention``, or among all when none does (or
    when attention was not measured). A tie goes to lung mode. The members of a fine-tuned ensemble are not
    candidates alone: the ensemble they form is."""
    def attention(k: str) -> float:
        return sortable(configs[k].get("val_attention", {}).get("positives", {}).get("median"))

    eligible = [k for k in configs if not configs[k].get("ensemble_member")] or list(configs)
    pool = [k for k in eligible if attention(k) >= min_attention] or eligible
    return max(pool, key=lambda k: (sortable(configs[k]["val"]["roc_auc"]), configs[k]["mode"] == "lung"))


def single_groups(configs: dict[str, dict[str, Any]]) -> dict[tuple[str, str], list[str]]:
    """Single-network configurations by (architecture, mode)."""
    out: dict[tuple[str, str], list[str]] = {}
    for name, c in configs.items():
        if "members" not in c:
            out.setdefault((c["arch"], c["mode"]), []).append(name)
    return out


def load_member_bundles(paths: tuple[Path, ...], split: dict[str, Any], cls_size: int) -> list[Any]:
    """Load bundles whose classifiers join the candidates; each must be one network trained on this split
    for this run's stage 2 input size (``cls_size``): its candidates are measured on this run's inputs."""
    from inference.bundle import ModelBundle

    out = []
    for path in paths:
        b = ModelBundle.load(path)
        if b.classifier_size != cls_size:
            raise ValueError(f"bundle {path} has a {b.classifier_size} px classifier and this run's stage 2 "
                             f"inputs are {cls_size} px; pass --cls-size {b.classifier_size} to compare it")
        if _plain(b.card.get("training_data", {}).get("split_counts")) != _plain(split):
            raise ValueError(f"bundle {path} was trained on another split "
                             f"({b.card.get('training_data', {}).get('split_counts')}, here {split}); "
                             "pass the split it was trained on with --split")
        if b.classifier_members != 1:
            raise ValueError(f"bundle {path} holds an ensemble; give the bundles of its members instead")
        out.append(b)
    return out


def measure_candidate(model: torch.nn.Module, arch: str, mode: str, cls_sets: dict[str, ImageSet],
                      crops: dict[str, LungCrops], test_centre: ImageSet, crops_centre: LungCrops,
                      dev: torch.device, target_sensitivity: float, cam_missing: str, mean: float,
                      std: float) -> dict[str, Any]:
    """One candidate stage 2 on validation and test: threshold (validation), metrics, lung attention."""
    y = {side: cls_sets[side].y.numpy() for side in SIDES}
    p = {side: predict(model, stage2_inputs(mode, cls_sets[side], crops[side]), kind="classification",
                       device=dev, mean=mean, std=std).numpy() for side in ("val", "test")}
    p_centre = predict(model, stage2_inputs(mode, test_centre, crops_centre), kind="classification",
                       device=dev, mean=mean, std=std).numpy()
    thr = val_threshold(y["val"], p["val"], target_sensitivity)
    c: dict[str, Any] = {
        "arch": arch, "mode": mode, "threshold": thr,
        "val": binary_metrics(y["val"], p["val"], thr),
        "test": binary_metrics(y["test"], p["test"], thr),
        "test_shape_normalised": binary_metrics(y["test"], p_centre, thr),
        "prob_test": p["test"].tolist(),
        "prob_val": p["val"].tolist(),
    }
    if not cam_missing:
        c["val_attention"] = attention_summary(model, arch, mode, cls_sets["val"], crops["val"], dev)
    return c


def say_candidate(say: Callable[[str], None], name: str, c: dict[str, Any]) -> None:
    """One progress line for a measured candidate."""
    att = c.get("val_attention", {}).get("positives", {}).get("median", math.nan)
    say(f"stage 2 {name}: val AUC {c['val']['roc_auc']:.3f}, val lung attention (positives, median) "
        f"{att:.3f}, test AUC {c['test']['roc_auc']:.3f}, test acc {c['test']['accuracy']:.3f}")


def attention_summary(model: torch.nn.Module, arch: str, mode: str, images: ImageSet, crops: LungCrops,
                      dev: torch.device) -> dict[str, Any]:
    """Lung attention of one classifier on one side's images: all, positives and negatives."""
    from training.attention import lung_attention_scores

    a = lung_attention_scores(model, arch, stage2_inputs(mode, images, crops), stage2_masks(mode, crops),
                              device=dev)
    model.cpu()
    y = images.y.numpy()
    return {"all": summary(a.tolist()), "positives": summary(a[y == 1].tolist()),
            "negatives": summary(a[y == 0].tolist())}
