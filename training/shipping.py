"""The chosen stage 2 configuration as the node's bundle: the card that describes it, and the check that the
stored (float16 or int8) weights answer like the trained network."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.candidates import initial_weights, recipe, stage2_inputs
from training.datasets import Sample
from training.loops import predict
from training.report import _plain, input_sizes
from training.tensors import ImageSet, LungCrops


def write_bundle(path: Path, segmenter: torch.nn.Module, seg_arch: str, classifier: torch.nn.Module,
                 chosen: dict[str, Any], results: dict[str, Any], *, seg_size: int, cls_size: int,
                 version: str, cls_samples: list[Sample], int8: bool = False) -> Path:
    """Write the bundle at ``path``: both stages' weights (float16; an ensemble as int8 with ``int8``) and a
    card that names the data, the split, how ``chosen`` was selected and trained, and its test metrics."""
    from inference.bundle import TARGETS, create_bundle
    from inference.models.classifiers import members_of

    by_source = Counter(f"{s.source}/{s.label}" for s in cls_samples)
    sizes = input_sizes(results["configs"])
    single = chosen.get("seed") is not None and "members" not in chosen
    card = {
        "name": "cxr-node-covid19",
        "version": version,
        "architectures": {"segmenter": seg_arch, "classifier": chosen["arch"],
                          **({"classifier_members": len(members_of(classifier))}
                             if len(members_of(classifier)) > 1 else {})},
        "input_sizes": {"segmenter": seg_size, "classifier": cls_size},
        "normalisation": {"mean": 0.5, "std": 0.25,
                          **({"equalize": True} if chosen.get("equalize") else {})},
        "targets": list(TARGETS),
        "threshold": chosen["threshold"],
        "crop_mode": chosen["mode"],
        "training_data": {
            "description": "COVID-19 vs normal chest radiographs (public sources; 'other' excluded), "
                           "patient-level split 7:2:1, stratified by label and source",
            "images_by_source_label": dict(sorted(by_source.items())),
            "split_counts": results["split"], "seed": results["seed"],
            **({"network_seed": chosen["seed"]} if single else {}),
            "selection": "best validation ROC AUC over architecture x {whole, lung}"
                         + (" x input size {" + ", ".join(f"{s} px" for s in sizes) + "}" if len(sizes) > 1
                            else "")
                         + (f" and ensembles of up to the {results['selection']['ensemble']} best networks "
                            "of one architecture, mode and input size" if results["selection"].get("ensemble")
                            else "")
                         + " among configurations "
                         f"with median lung attention >= {results['selection']['min_attention']} on "
                         "validation positives (all when none); threshold on validation for sensitivity >= "
                         f"{results['target_sensitivity']}",
            "lung_attention_weight": results["selection"]["attention_weight"],
            **recipe(chosen),
            **initial_weights(chosen),
            **({"ensemble_members": members} if (members := ensemble_members(chosen, results)) else {}),
        },
        "metrics": {k: results[k] for k in ("test", "per_source", "test_shape_normalised", "stage1",
                                             "lung_attention") if k in results},
    }
    attention = results.get("lung_attention", {})
    card["metrics"]["lung_attention"] = attention.get(results["chosen"], attention)
    card["metrics"]["baselines"] = {k: v["test_at_0.5"] for k, v in results.get("baselines", {}).items()}
    if chosen.get("test_counterfactual"):
        card["metrics"]["counterfactual"] = chosen["test_counterfactual"]
    return create_bundle(path, segmenter=segmenter.cpu().float(), classifier=classifier.cpu().float(),
                         card=_plain(card), half=True, int8_classifier=int8)


def ensemble_members(chosen: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    """What the card records of an ensemble's members: seed, recipe, initial weights and validation ROC AUC of
    each, from this run's candidates, or as the card of an ensemble bundle added to the run recorded them
    (``ensemble_of``); ``{}`` for one network."""
    if "members" not in chosen:
        return dict(chosen.get("ensemble_of", {}))
    configs = results["configs"]
    return {k: {"seed": configs[k].get("seed"), **recipe(configs[k]), **initial_weights(configs[k]),
                "val_roc_auc": configs[k]["val"]["roc_auc"]} for k in chosen["members"]}


def bundle_check(path: Path, chosen: dict[str, Any], images: ImageSet, crops: LungCrops,
                 dev: torch.device) -> dict[str, Any]:
    """The written bundle's stage 2 (fp16 or int8 weights) against the trained network, on validation."""
    from inference.bundle import ModelBundle

    b = ModelBundle.load(path)
    p = predict(b.classifier, stage2_inputs(chosen["mode"], images, crops), kind="classification", device=dev,
                mean=b.mean, std=b.std).numpy()
    ref = np.asarray(chosen["prob_val"])
    diff = np.abs(p - ref) if len(ref) else np.zeros(0)
    return {"max_abs_diff_val": float(diff.max()) if len(diff) else 0.0,
            "same_decisions_val": float(((p >= chosen["threshold"]) == (ref >= chosen["threshold"])).mean())
            if len(ref) else 1.0}
