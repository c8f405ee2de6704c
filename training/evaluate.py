"""``cxr-node evaluate``: a model bundle on the test patients, through the node's own pipeline.

Every image goes through ``inference.pipeline.Pipeline`` exactly as a received instance would (header checks,
stage 1, plausibility, lung crop, stage 2, Grad-CAM), so the report measures what the node does. The operating
threshold is the bundle's (chosen on validation at training time); ``--recalibrate`` sets it again on the
validation patients, never on test. The report folder holds ``metrics.json``, ``report.md``, ROC / PR /
confusion / calibration plots and a montage of heatmap overlays. Beside the plain test metrics the report
gives the shortcut checks: shape-normalised copies, trivial baselines, per-source and within-source figures,
and the counterfactual check (the test images again with marks of the COVID-19 images' sources).

The test patients are those of ``--split`` (else of ``--run``'s split.json). Without either, a bundle that
carries its training split (``split.json`` beside ``model.json``) is measured on that split's test patients
whenever the data holds any patient of it, so that the model is never tested on the patients it was trained
on; otherwise a new seeded patient split is made. Whatever the split, the report says how many test patients
are in the bundle's own training or validation split (a warning when any is).

    cxr-node evaluate --model runs/default/bundle --data .gpudata --run runs/default --out reports/x
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from training.counterfactual import Probe, counterfactual_from
from training.datasets import (
    CLASS_LABELS,
    Sample,
    Split,
    load_data,
    load_split,
    patient_split,
    require_both_classes,
)
from training.metrics import (
    dice_iou,
    metrics_with_ci,
    per_group,
    summary,
    threshold_for_sensitivity,
    within_group_auc,
)
from training.report import (
    COUNTERFACTUAL_TEXT,
    comparison_markdown,
    counterfactual_markdown,
    fmt,
    metrics_table,
    table,
    within_source_line,
    write_json,
)

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``cxr-node evaluate``."""
    p.add_argument("--model", metavar="DIR", help="model bundle (default: the shipped model; a retrained one "
                                                  "by its folder, listed by cxr-node models)")
    p.add_argument("--data", required=True, help="manifest CSV / folder with manifest.csv / DICOM folder")
    p.add_argument("--labels", help="labels CSV when --data is a folder of DICOM files")
    p.add_argument("--split", help="split.json from training (default: the bundle's own split.json when the "
                                   "data holds its patients, else a new seeded patient split)")
    p.add_argument("--run", help="a build_default output folder: its comparison table and baselines are "
                                 "included, its split.json used")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--cam", default="gradcam++", choices=["gradcam", "gradcam++"])
    p.add_argument("--recalibrate", action="store_true", help="set the threshold again on validation")
    p.add_argument("--target-sensitivity", type=float, default=0.95)
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs")
    p.add_argument("--montage", type=int, default=16, help="heatmap overlays in the montage (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-counterfactual", dest="counterfactual", action="store_false",
                   help="skip the counterfactual shortcut check (the test images again with each of five "
                        "marks of the COVID-19 images' sources; five more passes without Grad-CAM)")


def run(args: argparse.Namespace, settings: Any) -> int:
    """Entry point of ``cxr-node evaluate``; prints where the report is."""
    from inference.bundle import default_bundle_path

    bundle = Path(args.model) if args.model else default_bundle_path()
    samples = load_data(args.data, args.labels)
    split_file = args.split or (str(Path(args.run) / "split.json") if args.run else None)
    split, split_from = choose_split(bundle, samples, Path(split_file) if split_file else None,
                                     seed=args.seed)
    res = evaluate_bundle(bundle, samples, split, Path(args.out), device=args.device, cam=args.cam,
                          recalibrate=args.recalibrate,
                          target_sensitivity=args.target_sensitivity, n_boot=args.bootstrap,
                          montage_n=args.montage, seed=args.seed,
                          run_dir=Path(args.run) if args.run else None, counterfactual=args.counterfactual,
                          split_from=split_from)
    t = res["test"]
    sys.stdout.write(f"test: n={t['n']} AUC {fmt(t['roc_auc'])} {fmt(t.get('roc_auc_ci'), 2)} "
                     f"sensitivity {fmt(t['sensitivity'])} specificity {fmt(t['specificity'])} "
                     f"at {fmt(t['threshold'], 4)}\nreport: {Path(args.out) / 'report.md'}\n")
    return 0


def choose_split(bundle: Path, samples: Sequence[Sample], split_file: Path | None, *,
                 seed: int = 0) -> tuple[Split, str]:
    """The split to evaluate on, and where it came from (for the report).

    ``split_file`` when given; else the bundle's own ``split.json`` when the data holds any of its patients
    (its test patients are the ones the model never saw); else a new patient split seeded with ``seed``.
    """
    if split_file is not None:
        return load_split(split_file), str(split_file)
    own = bundle / "split.json"
    if own.is_file():
        split = load_split(own)
        known = split.side_of()
        patients = {s.patient_id for s in samples if s.task == "classification" and s.label in CLASS_LABELS}
        if patients & known.keys():
            outside = len(patients - known.keys())  # covid or normal patients the bundle never saw
            log.info("evaluating on the test patients of the bundle's own split %s (%d covid or normal "
                     "patients of the data are in none of its sides)", own, outside,
                     extra={"action": "evaluate_split", "split": str(own), "outside": outside})
            left = f"; {outside} covid or normal patients in none of its sides, left out" if outside else ""
            return split, f"{own} (the bundle's own split{left})"
        log.info("no patient of the data is in the bundle's split %s: a new patient split", own,
                 extra={"action": "evaluate_split", "split": "new"})
    return patient_split(samples, seed=seed), f"a new patient split (seed {seed})"


def training_overlap(bundle: Path, test: Sequence[Sample]) -> dict[str, Any]:
    """How many of the ``test`` samples' patients are in the bundle's own training or validation split.

    ``in_bundle_train`` and ``in_bundle_val`` are None when the bundle has no ``split.json`` (it cannot be
    checked). Logs a warning when any test patient was a training or validation patient.
    """
    patients = sorted({s.patient_id for s in test})
    own = bundle / "split.json"
    res: dict[str, Any] = {"test_patients": len(patients), "bundle_split": None, "in_bundle_train": None,
                           "in_bundle_val": None}
    if not own.is_file():
        return res
    split = load_split(own)
    train, val = set(split.train), set(split.val)
    res.update(bundle_split=str(own), in_bundle_train=sum(p in train for p in patients),
               in_bundle_val=sum(p in val for p in patients))
    if res["in_bundle_train"] or res["in_bundle_val"]:
        log.warning("%d of %d test patients are the bundle's training (%d) or validation (%d) patients: "
                    "its test figures are not measured on unseen patients",
                    res["in_bundle_train"] + res["in_bundle_val"], len(patients), res["in_bundle_train"],
                    res["in_bundle_val"], extra={"action": "evaluate_test_seen_in_training", **res})
    return res


def _overlap_line(overlap: dict[str, Any]) -> str:
    """The report's sentence on the test patients and the bundle's own split."""
    n = overlap.get("test_patients", 0)
    if overlap.get("bundle_split") is None:
        return (f"{n} test patients. The bundle carries no split.json: whether they were among its training "
                "patients cannot be checked.")
    train, val = overlap["in_bundle_train"], overlap["in_bundle_val"]
    if train + val:
        return (f"**Warning: {train + val} of {n} test patients were seen in training** ({train} in the "
                f"bundle's training split, {val} in its validation split): these test figures overstate "
                "how the model does on unseen patients. Evaluate on the bundle's own test patients "
                "(`--split` with its split.json) or on other patients.")
    return f"{n} test patients, none of them in the bundle's training or validation split."


def _load(sample: Sample, centre: bool = False, probe: Probe | None = None) -> Any:
    """``sample`` decoded as the node decodes it; its centre square, or with ``probe``'s mark, if asked."""
    import torch

    from inference.imaging import load_any
    from inference.types import XrayImage
    from training.tensors import centre_square

    img = load_any(sample.file)
    if centre:
        img = XrayImage(pixels=np.ascontiguousarray(centre_square(img.pixels)), source=img.source,
                        meta=img.meta)
    if probe is not None:
        marked = probe(torch.from_numpy(img.pixels)[None, None])[0, 0].numpy()
        img = XrayImage(pixels=np.ascontiguousarray(marked, dtype=np.float32), source=img.source,
                        meta=img.meta)
    return img


def _run(pipeline: Any, samples: Sequence[Sample], *, explain: bool, centre: bool = False,
         probe: Probe | None = None, batch: int = 16) -> tuple[list[Any], list[Any]]:
    """(images, results) of ``pipeline`` on ``samples`` in batches."""
    images: list[Any] = []
    results: list[Any] = []
    for i in range(0, len(samples), batch):
        chunk = [_load(s, centre, probe) for s in samples[i:i + batch]]
        results += pipeline.run(chunk, explain=explain)
        images += chunk if explain else [None] * len(chunk)
    return images, results


def _scored(samples: Sequence[Sample], results: Sequence[Any]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    keep = [(s, r) for s, r in zip(samples, results, strict=True) if r.probability is not None]
    return (np.asarray([s.target for s, _ in keep], dtype=int), np.asarray([r.probability for _, r in keep]),
            [s.source for s, _ in keep])


def evaluate_bundle(bundle: Path, samples: Sequence[Sample], split: Any, out: Path, *, device: str = "auto",
                    cam: str = "gradcam++", recalibrate: bool = False, target_sensitivity: float = 0.95,
                    n_boot: int = 1000, montage_n: int = 16, seed: int = 0,
                    run_dir: Path | None = None, counterfactual: bool = True,
                    split_from: str = "") -> dict[str, Any]:
    """Evaluate ``bundle`` on the test patients of ``split``; write the report folder ``out``; return metrics.

    Not-assessable results (the pipeline's refusals, with their reasons) are counted apart and left out of
    the classification metrics. ``counterfactual`` runs the test images again with each mark of
    :data:`training.artefacts.PROBES` put on the decoded image (:mod:`training.counterfactual`).
    ``ValueError`` before any image is read when the test patients (and with ``recalibrate`` the validation
    patients) lack covid or normal images. ``split_from`` (where the split came from) and the number of test
    patients in the bundle's own training split (:func:`training_overlap`) go into the report.
    """
    import json

    from inference.pipeline import Pipeline
    from training import plots

    cls = [s for s in samples if s.task == "classification" and s.label in ("covid", "normal")]
    test, val = split.select(cls, "test"), split.select(cls, "val")
    if not test:
        raise ValueError("no classification images of test patients in the data")
    require_both_classes(split, cls, ("val", "test") if recalibrate else ("test",),
                         name=f"the split {split_from}" if split_from else "the split",
                         hint="evaluate on data that holds test patients of both classes, or give --split")
    out.mkdir(parents=True, exist_ok=True)
    pipeline = Pipeline.from_bundle(bundle, device=device, cam=cam)
    threshold = pipeline.bundle.threshold
    res: dict[str, Any] = {"bundle": str(bundle), "version": pipeline.bundle.version,
                           "bundle_threshold": threshold, "device": str(pipeline.device),
                           "split": {"from": split_from or "given by the caller",
                                     **training_overlap(bundle, test)}}
    if recalibrate:
        _, vres = _run(pipeline, val, explain=False)
        yv, pv, _ = _scored(val, vres)
        threshold = float(min(max(threshold_for_sensitivity(yv, pv, target_sensitivity), 1e-4), 1 - 1e-4))
        res["recalibrated_on_validation"] = {"n": len(yv), "target_sensitivity": target_sensitivity}
    res["threshold"] = threshold
    images, tres = _run(pipeline, test, explain=True)
    y, p, sources = _scored(test, tres)
    res["not_assessable"] = dict(Counter(r.reason_code for r in tres if r.probability is None))
    res["test"] = metrics_with_ci(y, p, threshold, n_boot=n_boot, seed=seed)
    res["per_source"] = per_group(y, p, sources, threshold)
    res["within_source"] = within_group_auc(res["per_source"])
    att = np.asarray([np.nan if r.lung_attention is None else r.lung_attention for r in tres], dtype=float)
    yt = np.asarray([s.target for s in test])
    res["lung_attention"] = {"all": summary(att.tolist()), "positives": summary(att[yt == 1].tolist()),
                             "negatives": summary(att[yt == 0].tolist())}
    _, cres = _run(pipeline, test, explain=False, centre=True)
    yc, pc, _ = _scored(test, cres)
    res["test_shape_normalised"] = metrics_with_ci(yc, pc, threshold, n_boot=max(10, n_boot // 5), seed=seed)
    if counterfactual:
        assessable = [s for s, r in zip(test, tres, strict=True) if r.probability is not None]

        def score_with(probe: Probe | None) -> np.ndarray:
            _, r = _run(pipeline, assessable, explain=False, probe=probe)
            return np.asarray([np.nan if x.probability is None else x.probability for x in r], dtype=float)

        res["test_counterfactual"] = counterfactual_from(score_with, y, threshold, plain=p)
    res["stage1"] = _stage1(pipeline, split.select([s for s in samples if s.task == "segmentation"], "test"))
    res["baselines"] = _baselines(cls, split, target_sensitivity, pipeline.bundle.classifier_size)
    res["plots"] = plots.roc_pr_confusion_calibration(y, p, threshold, out, title=f"(test, n={len(y)})")
    if montage_n and images:
        res["plots"]["montage"] = _montage(images, tres, test, out / "montage.png", montage_n)
    if run_dir is not None and (run_dir / "results.json").is_file():
        built = json.loads((run_dir / "results.json").read_text())
        res["comparison"] = {"configs": built.get("configs", {}), "chosen": built.get("chosen"),
                             "reference_configs": built.get("reference_configs", {})}
    write_json(out / "metrics.json", res)
    write_report(out, res)
    return res


def _stage1(pipeline: Any, seg: Sequence[Sample]) -> dict[str, Any]:
    """Dice / IoU at source resolution of the pipeline's lung mask vs the reference mask."""
    from training.tensors import load_mask

    if not seg:
        return {"n": 0}
    _, results = _run(pipeline, seg, explain=False)
    d, j, missing = [], [], 0
    for s, r in zip(seg, results, strict=True):
        if r.lung_mask is None or s.mask_file is None:
            missing += 1
            continue
        a, b = dice_iou(r.lung_mask, load_mask(str(s.mask_file), r.lung_mask.shape))
        d.append(a)
        j.append(b)
    return {"n": len(d), "no_mask": missing, "dice": summary(d), "iou": summary(j)}


def _baselines(cls: Sequence[Sample], split: Any, target: float, size: int) -> dict[str, Any]:
    """The trivial baselines on each image's centre square at ``size`` (the classifier's input size)."""
    import torch

    from inference.preprocess import centre_crop
    from training.baselines import trivial_baselines
    from training.tensors import load_pixels

    shapes, centres, ys = {}, {}, {}
    for side in ("train", "val", "test"):
        chosen = split.select(cls, side)
        pix = [load_pixels(s) for s in chosen]
        shapes[side] = np.asarray([q.shape[:2] for q in pix]).reshape(-1, 2)
        centres[side] = torch.from_numpy(np.stack([np.rint(centre_crop(q, size) * 255)
                                                   .astype(np.uint8) for q in pix]))[:, None]
        ys[side] = np.asarray([s.target for s in chosen])
    if any(len(np.unique(ys[s])) < 2 for s in ys):
        return {}
    return trivial_baselines(shapes, centres, ys, target_sensitivity=target)


def _montage(images: Sequence[Any], results: Sequence[Any], samples: Sequence[Sample], path: Path,
             n: int) -> str:
    from inference.explain import overlay
    from training import plots

    idx = [i for i, r in enumerate(results) if r.heatmap is not None]
    rng = np.random.default_rng(0)
    idx = sorted(rng.choice(idx, size=min(n, len(idx)), replace=False).tolist()) if idx else []
    if not idx:
        return ""
    tiles = [overlay(images[i].pixels, results[i].heatmap) for i in idx]
    caps = [f"{samples[i].label} p={results[i].probability:.2f} att={fmt(results[i].lung_attention, 2)}"
            for i in idx]
    plots.montage(tiles, caps, path)
    return path.name


def write_report(out: Path, res: dict[str, Any]) -> Path:
    """``report.md`` of an evaluation (every number from ``res``)."""
    t = res["test"]
    s1 = res.get("stage1", {})
    lines = [f"# Evaluation of model {res['version']}", "",
             f"Bundle `{res['bundle']}`, device {res['device']}. Threshold {fmt(res['threshold'], 4)} "
             + ("(recalibrated on validation)" if "recalibrated_on_validation" in res
                else "(the bundle's, chosen on validation at training)")
             + f". Not assessable on test: `{res['not_assessable']}`.",
             "", f"Split: {res['split']['from']}. {_overlap_line(res['split'])}" if "split" in res else "",
             "", "## Test", "",
             table([{"m": m, "v": t.get(m), "ci": t.get(f"{m}_ci")} for m in
                    ("roc_auc", "sensitivity", "specificity", "accuracy", "precision", "f1")],
                   [("m", "metric"), ("v", "value"), ("ci", "95% bootstrap CI")]), "",
             f"TP {t['tp']}, FP {t['fp']}, TN {t['tn']}, FN {t['fn']} (n {t['n']}).", "",
             "![ROC](roc.png) ![PR](pr.png) ![confusion](confusion.png) ![calibration](calibration.png)", "",
             "## Per source", "", metrics_table(res["per_source"], "source"), "",
             within_source_line(res["per_source"]), "",
             "## Stage 1", "",
             f"Dice on {s1.get('n', 0)} test images with a reference mask: median "
             f"{fmt(s1.get('dice', {}).get('median'))}, mean {fmt(s1.get('dice', {}).get('mean'))}; "
             f"IoU median {fmt(s1.get('iou', {}).get('median'))}.", "",
             "## Lung attention (share of the heatmap inside the lung mask)", "",
             table([{"g": g, **v} for g, v in res["lung_attention"].items()],
                   [("g", "cases"), ("n", "n"), ("median", "median"), ("p10", "p10"), ("p25", "p25"),
                    ("p75", "p75")]), "",
             "## Shortcut checks", "",
             metrics_table({"model (test as is)": t,
                            "model (shape-normalised test)": res["test_shape_normalised"],
                            **{f"baseline {k} (threshold 0.5)": v["test_at_0.5"]
                               for k, v in res.get("baselines", {}).items()}}, "model / input"), ""]
    if res.get("test_counterfactual"):
        lines += ["### Counterfactual check", "", COUNTERFACTUAL_TEXT, "",
                  counterfactual_markdown({f"model {res['version']}": res}), ""]
    if res.get("comparison", {}).get("configs"):
        lines += ["## Comparison (from the training run)", "",
                  comparison_markdown(res["comparison"]["configs"], res["comparison"]["chosen"],
                                      res["comparison"].get("reference_configs")), ""]
    if res.get("plots", {}).get("montage"):
        lines += ["## Heatmaps", "", "![montage](montage.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
