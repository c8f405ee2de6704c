"""Stage 2 candidates of a build: each measured on validation and test; the one to ship chosen on validation.

A candidate is one trained network, a network of an earlier run on the same split (another seed, another
input size), or an ensemble of the best of them; :func:`measure_candidate` measures each the same way on
:class:`Views` at its own input size, :func:`choose` picks from validation figures only.
"""

from __future__ import annotations

import argparse
import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.counterfactual import counterfactual_check
from training.datasets import SIDES
from training.loops import predict
from training.metrics import binary_metrics, summary, threshold_for_sensitivity
from training.report import _plain
from training.tensors import ImageSet, LungCrops, Sample, build_image_set, lung_crops

RECIPE_TAGS = {  # stage 2 options recorded per network -> the word that marks it in candidate names
    "source_balance": "source-balanced",
    "style_augment": "style-augmented",
    "source_adversary": "source-adversarial",
    "artefact_augment": "artefact-augmented",
    "equalize": "equalised",  # 1: the network histogram-equalises its input (also at inference)
    "pretrained": "pretrained",  # 1: started from a local checkpoint (training_data.initial_weights)
}
RECIPE_KEYS = tuple(RECIPE_TAGS)


@dataclass
class Views:
    """Stage 2's inputs at one input size: each side's images and lung crops, and the test images'
    shape-normalised copies (centre squares) with theirs."""

    sets: dict[str, ImageSet]
    crops: dict[str, LungCrops]
    centre: ImageSet
    crops_centre: LungCrops


def cut_views(sets: dict[str, ImageSet], segmenter: torch.nn.Module, *, size: int,
              dev: torch.device) -> Views:
    """Each side's images (prepared for a stage 2 of ``size`` px, the test side with its shape-normalised
    copies) cut by ``segmenter`` as the pipeline cuts them."""
    centre = sets["test"].centre
    assert centre is not None
    return Views(sets, {side: lung_crops(segmenter, sets[side], cls_size=size, device=dev) for side in SIDES},
                 centre, lung_crops(segmenter, centre, cls_size=size, device=dev))


def make_views(samples: Mapping[str, list[Sample]], segmenter: torch.nn.Module, *, seg_size: int, size: int,
               centre_size: int, dev: torch.device) -> Views:
    """Each side's ``samples`` prepared for a stage 2 of ``size`` px (the test side also with its
    ``centre_size`` shape-normalised copies), then :func:`cut_views`."""
    sets = {side: build_image_set(samples[side], seg_size=seg_size, cls_size=size,
                                  centre_size=centre_size if side == "test" else 0) for side in SIDES}
    return cut_views(sets, segmenter, size=size, dev=dev)


def size_tag(size: int, run_size: int) -> str:
    """The suffix that marks, in candidate names, a network whose input size is not the run's."""
    return "" if size == run_size else f" {size} px"


def recipe(values: Mapping[str, Any]) -> dict[str, float]:
    """The stage 2 training options of ``values`` (a card's ``training_data``, a candidate), 0 when absent."""
    return {k: float(values.get(k) or 0.0) for k in RECIPE_KEYS}


def bundle_recipe(bundle: Any) -> dict[str, Any]:
    """A bundle's ``training_data`` with ``equalize`` taken from what its network does
    (``normalisation.equalize``), for :func:`recipe` and :func:`recipe_tag`, and ``seed`` the seed its
    network was trained with (``network_seed``: a bundle shipped from a comparison run records the run's
    own seed as ``seed``), ``None`` for an ensemble (its members' seeds are in ``ensemble_members``)."""
    data = bundle.card.get("training_data", {})
    seed = None if bundle.classifier_members > 1 else data.get("network_seed", data.get("seed"))
    return {**data, "equalize": float(bundle.equalize), "seed": seed}


def initial_weights(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values``' (a card's ``training_data``, a candidate) ``initial_weights`` record as a dict to merge,
    ``{}`` when it has none."""
    return {"initial_weights": values["initial_weights"]} if values.get("initial_weights") else {}


def init_record(init_weights: Path | None, fine_tune: bool) -> dict[str, Any]:
    """What a run records of ``--init-weights``: ``{"initial_weights": {"file", "sha256"}}``, or ``{}``.

    Raises ``ValueError`` when the file is missing or a fine-tuning run is given one too (it starts from
    its base model's weights)."""
    if init_weights is None:
        return {}
    path = Path(init_weights)
    if fine_tune:
        raise ValueError('Argument "init_weights" starts new networks; a fine-tuning run starts from its '
                         "base model's weights (give one or the other).")
    if not path.is_file():
        raise ValueError(f'Argument "init_weights": no such file {path}.')
    return {"initial_weights": {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}}


def recipe_tag(values: Mapping[str, Any]) -> str:
    """The suffix that marks, in candidate names, a network trained with the options of ``RECIPE_TAGS``."""
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
    p.add_argument("--artefact-augment", type=float, default=0.0,
                   help="0-1: probability of each mark of a film's source (padding bars, printed markers, "
                        "histogram equalisation, sharpening) per image in stage 2's augmentation; 0 = off")
    p.add_argument("--init-weights", type=Path, metavar="FILE",
                   help="start new stage 2 networks from this local checkpoint (torchvision layout, e.g. the "
                        "encoder.safetensors of `cxr-node pretrain`) instead of random weights")
    p.add_argument("--equalize", action="store_true",
                   help="stage 2 histogram-equalises its input, in training and at inference (recorded in "
                        "the bundle card), so a site's or source's grey-level look stops being a cue")


def sortable(v: float | None) -> float:
    """A score for sorting: -1 for None or NaN, so an unmeasured candidate is never preferred."""
    return -1.0 if v is None or not np.isfinite(v) else float(v)


def val_threshold(y: np.ndarray, p: np.ndarray, target: float) -> float:
    """The operating threshold for sensitivity ``target`` on labels ``y`` and probabilities ``p``."""
    thr = threshold_for_sensitivity(y, p, target) if (y == 1).any() else 0.5
    return float(min(max(thr, 1e-4), 1 - 1e-4))  # the bundle needs 0 < threshold < 1


def stage2_inputs(mode: str, images: ImageSet, crops: LungCrops) -> torch.Tensor:
    """Stage 2's input tensors for ``mode``: the lung crops, the whole images padded to squares, or their
    centre squares."""
    return {"lung": crops.crops, "whole": images.whole, "square": images.square}[mode]


def stage2_masks(mode: str, crops: LungCrops) -> torch.Tensor:
    """The lung masks in the frame of :func:`stage2_inputs`."""
    return {"lung": crops.crop_masks, "whole": crops.whole_masks, "square": crops.square_masks}[mode]


def choose(configs: dict[str, dict[str, Any]], min_attention: float) -> str:
    """The configuration to ship, from validation figures only: the best validation ROC AUC among those whose
    median lung attention on validation positives reaches ``min_attention``, or among all when none does (or
    when attention was not measured). A tie goes to lung mode, then to the candidate listed first. The members
    of a fine-tuned ensemble are not candidates alone: the ensemble they form is.

    The counterfactual check (``val_counterfactual``) is reported, not selected on: a network trained with
    the same marks as augmentation (``artefact_augment``) passes it by construction, so ranking by it would
    prefer such networks whatever they learned."""
    return ranked(configs, min_attention)[0]


def ranked(configs: dict[str, dict[str, Any]], min_attention: float) -> list[str]:
    """The candidates :func:`choose` chooses from, best first by its rule."""
    def attention(k: str) -> float:
        return sortable(configs[k].get("val_attention", {}).get("positives", {}).get("median"))

    eligible = [k for k in configs if not configs[k].get("ensemble_member")] or list(configs)
    pool = [k for k in eligible if attention(k) >= min_attention] or eligible
    # stable: among equal keys the candidate listed first stays first
    return sorted(pool, key=lambda k: (sortable(configs[k]["val"]["roc_auc"]), configs[k]["mode"] == "lung"),
                  reverse=True)


def single_groups(configs: dict[str, dict[str, Any]]) -> dict[tuple[str, str, int, bool], list[str]]:
    """Single-network configurations by (architecture, mode, input size, equalising or not): what one
    ensemble can hold (its card says for all its members whether they equalise their input)."""
    out: dict[tuple[str, str, int, bool], list[str]] = {}
    for name, c in configs.items():
        if "members" not in c and "ensemble_of" not in c:
            key = (c["arch"], c["mode"], int(c["input_size"]), bool(c.get("equalize")))
            out.setdefault(key, []).append(name)
    return out


def load_member_bundles(paths: tuple[Path, ...], split: dict[str, Any]) -> list[Any]:
    """Load bundles whose classifiers join the candidates; each must be trained on this split (at any input
    size: it is measured on this split's images prepared at its own size). An ensemble bundle (a shipped
    model) joins as one candidate; it does not join new ensembles."""
    from inference.bundle import ModelBundle

    out = []
    for path in paths:
        b = ModelBundle.load(path)
        if _plain(b.card.get("training_data", {}).get("split_counts")) != _plain(split):
            raise ValueError(f"bundle {path} was trained on another split "
                             f"({b.card.get('training_data', {}).get('split_counts')}, here {split}); "
                             "pass the split it was trained on with --split")
        out.append(b)
    return out


def measure_candidate(model: torch.nn.Module, arch: str, mode: str, views: Views, size: int,
                      dev: torch.device, target_sensitivity: float, cam_missing: str, mean: float,
                      std: float) -> dict[str, Any]:
    """One candidate stage 2 on validation and test: threshold (validation), metrics, the counterfactual
    check of both sides, lung attention.

    ``views`` are the inputs at the candidate's input size ``size`` (recorded as ``input_size``)."""
    def score(x: torch.Tensor) -> np.ndarray:
        return predict(model, x, kind="classification", device=dev, mean=mean, std=std).numpy()

    y = {side: views.sets[side].y.numpy() for side in SIDES}
    inputs = {side: stage2_inputs(mode, views.sets[side], views.crops[side]) for side in ("val", "test")}
    p = {side: score(inputs[side]) for side in inputs}
    p_centre = score(stage2_inputs(mode, views.centre, views.crops_centre))
    thr = val_threshold(y["val"], p["val"], target_sensitivity)
    c: dict[str, Any] = {
        "arch": arch, "mode": mode, "input_size": size, "threshold": thr,
        "val": binary_metrics(y["val"], p["val"], thr),
        "test": binary_metrics(y["test"], p["test"], thr),
        "test_shape_normalised": binary_metrics(y["test"], p_centre, thr),
        "prob_test": p["test"].tolist(),
        "prob_val": p["val"].tolist(),
        **{f"{side}_counterfactual": counterfactual_check(score, inputs[side], y[side], thr, plain=p[side])
           for side in inputs},
    }
    if not cam_missing:
        c["val_attention"] = attention_summary(model, arch, mode, views.sets["val"], views.crops["val"], dev)
    return c


def say_candidate(say: Callable[[str], None], name: str, c: dict[str, Any]) -> None:
    """One progress line for a measured candidate."""
    att = c.get("val_attention", {}).get("positives", {}).get("median", math.nan)
    cf = (c.get("val_counterfactual") or {}).get("roc_auc_with_copies", math.nan)
    say(f"stage 2 {name}: val AUC {c['val']['roc_auc']:.3f} ({cf:.3f} with counterfactual copies), val lung "
        f"attention (positives, median) {att:.3f}, test AUC {c['test']['roc_auc']:.3f}, "
        f"test acc {c['test']['accuracy']:.3f}")


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
