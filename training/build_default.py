"""Build the node's default model in one command, from data to a tested bundle with its report.

    python -m training.build_default --data .gpudata --out runs/default --device cuda

Steps, each printed with its time:

1. load + patient split (saved as ``split.json``);
2. stage 1 (``unet`` and ``lungvae``; the better on validation Dice is kept) on the segmentation rows of the
   training patients;
3. lung masks for every classification image with that stage 1 (the pipeline's post-processing and crop);
4. stage 2 for every architecture x {whole image, lung-segmented} on covid vs normal; with ``--add-bundles``
   the networks of earlier runs on the same split (other seeds) join them, and with ``--ensemble N`` so does
   the ensemble of the N best networks of each architecture and mode;
5. selection on validation: among the configurations whose median lung attention on validation positives
   reaches ``min_attention`` (all of them when none does), the best validation ROC AUC (a tie goes to lung
   mode); the operating threshold on validation for the target sensitivity;
6. every configuration on the one test split, plus per-source metrics, lung attention, shape-normalised
   copies, the counterfactual check and three trivial baselines;
7. the chosen bundle (fp16 weights) via ``inference.bundle.create_bundle``.

Outputs in ``--out``: ``results.json``, ``report.md``, ``split.json``, ``bundle/``, ``checkpoints/``.
``--resume`` continues from the checkpoints after an interruption (finished runs are not trained again).

Needs torch, torchvision, numpy, scipy, scikit-learn, pillow, safetensors, tqdm and pydicom (imported by
``inference.imaging`` and ``inference.bundle``); the imports are checked before any training. Lung attention
also needs pytorch-grad-cam (grad-cam, ttach, opencv-python-headless); without it that one step is skipped
and the results say so. On a GPU, train on a packed copy: ``python -m training.pack --manifest
../shared/data/manifest.csv --out .gpudata --max-side 384`` (about 20 MiB).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.candidates import (
    RECIPE_KEYS,
    Views,
    add_shortcut_arguments,
    attention_summary,
    bundle_recipe,
    choose,
    cut_views,
    init_record,
    initial_weights,
    load_member_bundles,
    make_views,
    measure_candidate,
    ranked,
    recipe,
    recipe_tag,
    say_candidate,
    single_groups,
    size_tag,
    sortable,
    stage2_inputs,
    stage2_masks,
)
from training.datasets import (
    SIDES,
    Sample,
    load_data,
    load_split,
    patient_split,
    require_both_classes,
    save_split,
)
from training.loops import FitConfig, FitResult, fit, pick_device, predict, seed_everything
from training.metrics import (
    dice_iou,
    metrics_with_ci,
    paired_auc_difference,
    per_group,
    summary,
)
from training.report import reference_configs, write_build_report, write_json
from training.shipping import bundle_check, write_bundle
from training.tensors import ImageSet, build_image_set

log = logging.getLogger(__name__)

MODES = ("whole", "lung", "square")  # every stage 2 input mode (inference.bundle.CROP_MODES)
DEFAULT_MODES = ("whole", "lung")  # the method's comparison: whole image against lung-segmented
DEFAULT_ARCHS = ("densenet121", "resnet18", "mobilenet_v2")


class Timer:
    """Named steps with their wall time; ``say`` receives one line per finished step."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.steps: dict[str, float] = {}
        self.t0 = time.perf_counter()

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.steps[name] = round(time.perf_counter() - t, 2)
        self.say(f"[{time.perf_counter() - self.t0:7.1f} s] {name}: {self.steps[name]:.1f} s")


def _seg_dice(segmenter: torch.nn.Module, images: ImageSet, device: torch.device) -> dict[str, float]:
    """Dice / IoU of the post-processed stage 1 mask vs the reference, on the stage 1 grid."""
    from inference.preprocess import postprocess_mask

    if not len(images):
        return {"n": 0}
    prob = predict(segmenter, images.seg_input, kind="segmentation", device=device, mean=0.5, std=0.25)
    assert images.masks is not None
    d, j = zip(*(dice_iou(postprocess_mask(prob[i, 0].numpy(), threshold=0.5), images.masks[i, 0].numpy() > 0)
                 for i in range(len(images))), strict=True)
    return {"n": len(d), "dice_mean": float(np.mean(d)), "dice_median": float(np.median(d)),
            "iou_mean": float(np.mean(j)), "dice_p10": float(np.percentile(d, 10))}


def build_default(data: Path, out: Path, *, device: str = "auto", epochs_seg: int = 40, epochs_cls: int = 30,
                  archs: tuple[str, ...] = DEFAULT_ARCHS, seg_archs: tuple[str, ...] = ("unet", "lungvae"),
                  seg_size: int = 256, cls_size: int = 224, batch_size: int = 32, lr: float = 0.002,
                  target_sensitivity: float = 0.95, seed: int = 0, quick: bool = False, resume: bool = False,
                  version: str = "1.0.0", say: Callable[[str], None] = log.info,
                  modes: tuple[str, ...] = DEFAULT_MODES, labels: Path | None = None,
                  split_file: Path | None = None,
                  base_bundle: Path | None = None, fine_tune: bool = False,
                  samples: list[Sample] | None = None, attention_weight: float = 1.0,
                  min_attention: float = 0.7, reference: Path | tuple[Path, ...] | None = None,
                  member_bundles: tuple[Path, ...] = (), ensemble: int = 0,
                  int8_classifier: bool = False, source_balance: float = 0.0,
                  style_augment: float = 0.0, source_adversary: float = 0.0,
                  artefact_augment: float = 0.0, equalize: bool = False,
                  init_weights: Path | None = None) -> dict[str, Any]:
    """Run every step (see the module docstring) and return the results dict (also in ``results.json``).

    ``seg_archs=()`` takes stage 1 from ``base_bundle`` instead of training it (its input size wins);
    ``archs=()`` trains no classifier and bundles the new stage 1 with ``base_bundle``'s classifier;
    ``fine_tune=True`` starts stage 2 from ``base_bundle``'s classifier (same architecture and size).
    ``samples`` replaces reading ``data`` (+ ``labels``); ``split_file`` reuses a saved split.
    ``attention_weight`` > 0 trains stage 2 with the lung-attention penalty (``training.loops.fit``).
    ``source_balance`` > 0 also balances the sources within each class in stage 2's loss
    (``training.loops.sample_weights``); its networks are named "source-balanced".
    ``style_augment`` > 0 adds texture degradations with that probability to stage 2's augmentation
    (``training.augment.texture``); its networks are named "style-augmented".
    ``source_adversary`` > 0 adds a class-conditional source adversary with that weight to stage 2's loss
    (``training.adversary``); its networks are named "source-adversarial".
    ``artefact_augment`` > 0 adds the marks of a film's source with that probability to stage 2's
    augmentation (``training.artefacts``); its networks are named "artefact-augmented".
    ``equalize`` makes the stage 2 networks trained here histogram-equalise their input
    (``inference.models.classifiers.equalize``), in training and, through the bundle card, at inference;
    they are named "equalised". A fine-tuned network equalises when its base does.
    ``init_weights`` (a local checkpoint in torchvision's layout, e.g. ``cxr-node pretrain``'s encoder) starts
    the new stage 2 networks from its weights instead of random ones; they are named "pretrained" and the
    file's name and SHA-256 are recorded. A fine-tuned network is pretrained when its base was.
    ``reference`` is the ``results.json`` of an earlier run on the same split, or several: their
    configurations are listed in the report beside this run's (marked with the run, not candidates); their
    split counts must equal this run's.
    ``member_bundles`` are bundles trained earlier on the same split (other seeds): their classifiers join
    this run's configurations as candidates (named with their seed). ``ensemble`` >= 2 adds, per architecture
    and mode, the ensemble of its ``ensemble`` best candidates by validation ROC AUC (of all of them when it
    has fewer, from two) as one more candidate.
    Fine-tuning an ensemble base trains each member from its own weights and re-forms the ensemble.
    ``int8_classifier`` stores a chosen ensemble as int8 in the bundle (three ResNet18s fit 40 MB so); a
    single network stays float16.
    """
    from inference.models.classifiers import (
        MAX_MEMBERS,
        ClassifierEnsemble,
        build_classifier,
        build_stage2,
        cam_layers,
        equalize_inputs,
        members_of,
    )
    from inference.models.segmentation import build_segmenter

    cam_missing = preflight()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = pick_device(device)
    for m in modes:
        if m not in MODES:
            raise ValueError(f'Argument "modes": {m!r} is not one of {MODES}.')
    if ensemble and not 2 <= ensemble <= MAX_MEMBERS:
        raise ValueError(f'Argument "ensemble" must be 0 or from 2 to {MAX_MEMBERS}; got {ensemble}.')
    base = None
    if base_bundle is not None or not seg_archs or not archs or fine_tune:
        from inference.bundle import ModelBundle

        base = ModelBundle.load(base_bundle)
        if not seg_archs:
            seg_size = base.segmenter_size
        if fine_tune or not archs:  # its classifier is trained on, or shipped as it is: its input size
            cls_size = base.classifier_size
    init_rec = init_record(init_weights, fine_tune)
    for a in archs if init_rec else ():  # a checkpoint that does not fit fails here, before any training
        build_classifier(a, checkpoint=init_weights)
    if cam_missing:
        say(f"lung attention will be skipped: {cam_missing} (run `cxr-node evaluate` where it is installed)")
    timer = Timer(say)
    seed_everything(seed)
    max_steps = 2 if quick else 0
    say(f"device {dev}, data {data}, out {out}")
    with timer.step("load data + patient split"):
        if samples is None:
            samples = load_data(data, labels)
        samples = [s for s in samples if s.task == "segmentation" or s.label in ("covid", "normal")]
        cls = [s for s in samples if s.task == "classification"]
        seg = [s for s in samples if s.task == "segmentation"]
        split = load_split(split_file) if split_file else patient_split(cls + seg, seed=seed)
        if split_file:  # patient_split checks its own; a given split must hold both classes on every side too
            require_both_classes(split, cls, name=f"the split {split_file}")
        save_split(split, out / "split.json")
        centre = 256 if not quick else 64
        cls_sets = {side: build_image_set(split.select(cls, side), seg_size=seg_size, cls_size=cls_size,
                                          centre_size=centre if side == "test" else 0) for side in SIDES}
        seg_sets = {side: build_image_set(split.select(seg, side), seg_size=seg_size, cls_size=cls_size,
                                          with_masks=True) for side in SIDES}
    say(f"classification images per side: { {k: len(v) for k, v in cls_sets.items()} }, "
        f"segmentation: { {k: len(v) for k, v in seg_sets.items()} }")
    results: dict[str, Any] = {"data": str(data), "device": str(dev), "split": split.counts,
                               "seed": seed, "target_sensitivity": target_sensitivity}
    references = (reference,) if isinstance(reference, str | Path) else tuple(reference or ())
    if references:  # checked before any training: a wrong file stops the run now
        results["reference_configs"], runs = reference_configs(references, results["split"])
    added = load_member_bundles(member_bundles, results["split"])  # likewise checked before training
    seg_val = seg_sets["val"] if len(seg_sets["val"]) else seg_sets["train"]
    best_seg: tuple[str, torch.nn.Module] | None = None
    best_seg_score = -1.0
    stage1: dict[str, Any] = {}
    if not seg_archs:
        assert base is not None
        best_seg = (base.segmenter_arch, base.segmenter)
        stage1[base.segmenter_arch] = {"from": str(base.path), "val_dice": None,
                                       "test": _seg_dice(base.segmenter, seg_sets["test"], dev)}
    for arch in seg_archs:
        with timer.step(f"stage 1 {arch}"):
            model = build_segmenter(arch)
            cfg = FitConfig(epochs=epochs_seg, batch_size=min(batch_size, 16), lr=lr, seed=seed,
                            patience=10, max_steps=max_steps)
            assert seg_sets["train"].masks is not None and seg_val.masks is not None
            r = fit(model, (seg_sets["train"].seg_input, seg_sets["train"].masks),
                    (seg_val.seg_input, seg_val.masks), kind="segmentation", config=cfg, device=dev,
                    checkpoint=out / "checkpoints" / f"stage1_{arch}.pt", resume=resume,
                    name=f"stage1 {arch}")
            stage1[arch] = {"val_dice": r.best_score, "best_epoch": r.best_epoch, "seconds": r.seconds,
                            "test": _seg_dice(model, seg_sets["test"], dev)}
            say(f"stage 1 {arch}: val Dice {r.best_score:.3f} (epoch {r.best_epoch}), "
                f"test Dice {stage1[arch]['test'].get('dice_mean', float('nan')):.3f}")
            if r.best_score > best_seg_score:
                best_seg, best_seg_score = (arch, model), r.best_score
    assert best_seg is not None
    seg_arch, segmenter = best_seg
    results["stage1"] = {"chosen": seg_arch, "size": seg_size, "by_arch": stage1}
    with timer.step("lung masks for all classification images"):
        views = {cls_size: cut_views(cls_sets, segmenter, size=cls_size, dev=dev)}
    crops = views[cls_size].crops
    results["lungs_found"] = {side: float(crops[side].found.mean()) if len(crops[side].found) else None
                              for side in SIDES}
    results["lung_fraction_test"] = summary(crops["test"].lung_fraction.tolist())
    y = {side: cls_sets[side].y for side in SIDES}

    def views_at(size: int) -> Views:
        """Stage 2's inputs at ``size`` px, prepared once, for candidates of an input size not the run's."""
        if size not in views:
            with timer.step(f"images and lung crops at {size} px"):
                views[size] = make_views({side: split.select(cls, side) for side in SIDES}, segmenter,
                                         seg_size=seg_size, size=size, centre_size=centre, dev=dev)
        return views[size]

    configs: dict[str, dict[str, Any]] = {}
    models: dict[str, torch.nn.Module] = {}
    tagged = bool(added)  # several seeds of one configuration: names carry the seed
    base_recipe = recipe(bundle_recipe(base) if base is not None else {})
    if fine_tune and base is not None:
        equalize = equalize or base.equalize  # a network fine-tuned from an equalising one equalises too
        init_rec = initial_weights(base.card.get("training_data", {}))
    run_recipe = recipe({"source_balance": source_balance, "style_augment": style_augment,
                         "source_adversary": source_adversary, "artefact_augment": artefact_augment,
                         "equalize": float(equalize), "pretrained": float(bool(init_rec))})
    train_groups = torch.as_tensor(np.unique(cls_sets["train"].sources, return_inverse=True)[1].reshape(-1))
    # (arch, mode, train, initial weights, seed, name, checkpoint file)
    plan: list[tuple[str, str, bool, torch.nn.Module | None, int, str, str]] = []
    for a in archs:
        for m in modes:
            inits = members_of(base.classifier) if fine_tune and base is not None else [None]
            for i, init in enumerate(inits):
                many = len(inits) > 1  # fine-tuning an ensemble: each member from its own weights
                plan.append((a, m, True, init, seed + i,
                             f"{a}/{m}" + (f" member {i + 1}" if many else "")
                             + (f" seed {seed + i}" if tagged else "") + recipe_tag(run_recipe),
                             f"stage2_{a}_{m}" + (f"_m{i + 1}" if many else "") + ".pt"))
            if len(inits) > 1:
                ensemble = max(ensemble, len(inits))
    if not archs:  # stage 1 only: the base model's classifier, re-thresholded on the new crops
        assert base is not None
        plan = [(base.classifier_arch, base.crop_mode, False, base.classifier, seed,
                 f"{base.classifier_arch}/{base.crop_mode}", "")]
    for arch, mode, train, init, run_seed, name, ckpt in plan:
        with timer.step(f"stage 2 {name}"):
            if init is not None:
                assert base is not None  # initial weights come from the base bundle
                if arch != base.classifier_arch:
                    raise ValueError(f"fine-tuning needs the base model's architecture "
                                     f"{base.classifier_arch}, not {arch}")
                model = build_stage2(arch, len(members_of(init)))
                model.load_state_dict(init.state_dict())
                model.float()
                if equalize:
                    equalize_inputs(model, base.mean, base.std)
            else:
                model = build_classifier(arch, checkpoint=init_weights)
                if equalize:
                    equalize_inputs(model, FitConfig.mean, FitConfig.std)
            cfg = FitConfig(epochs=epochs_cls, batch_size=batch_size, lr=lr, seed=run_seed,
                            max_steps=max_steps, attention_weight=attention_weight,
                            source_balance=source_balance, style_augment=style_augment,
                            source_adversary=source_adversary, artefact_augment=artefact_augment)
            r = (fit(model, (stage2_inputs(mode, cls_sets["train"], crops["train"]), y["train"]),
                     (stage2_inputs(mode, cls_sets["val"], crops["val"]), y["val"]), kind="classification",
                     config=cfg, device=dev, checkpoint=out / "checkpoints" / ckpt,
                     resume=resume, name=name, train_masks=stage2_masks(mode, crops["train"]),
                     cam_layer=cam_layers(arch, model)[0], groups=train_groups) if train
                 else FitResult({}, math.nan, -1))
            configs[name] = measure_candidate(model, arch, mode, views[cls_size], cls_size, dev,
                                              target_sensitivity, cam_missing, cfg.mean, cfg.std)
            configs[name].update({"best_epoch": r.best_epoch, "seconds": round(r.seconds, 1),
                                  "epochs_run": len(r.history), "seed": run_seed,
                                  **(run_recipe if train else base_recipe), **(init_rec if train else {})})
            if " member " in name:  # a member of a fine-tuned ensemble is shipped only within it
                configs[name]["ensemble_member"] = True
            models[name] = model.cpu()
            say_candidate(say, name, configs[name])
    for b in added:
        trained = bundle_recipe(b)
        of = trained.get("ensemble_members", {}) if b.classifier_members > 1 else None
        who = (f"seed {trained.get('seed')}" if of is None else f"ensemble of {b.classifier_members} (seeds "
               + ", ".join(str(m.get("seed")) for m in of.values()) + ")")
        name = (f"{b.classifier_arch}/{b.crop_mode} {who}" + recipe_tag(trained)
                + size_tag(b.classifier_size, cls_size))
        with timer.step(f"stage 2 {name} (from {b.path})"):
            configs[name] = measure_candidate(b.classifier, b.classifier_arch, b.crop_mode,
                                              views_at(b.classifier_size), b.classifier_size, dev,
                                              target_sensitivity, cam_missing, b.mean, b.std)
            configs[name].update({"from": str(b.path), "seed": trained.get("seed"),
                                  **recipe(trained), **initial_weights(trained),
                                  **({} if of is None else {"ensemble_of": of})})
            models[name] = b.classifier.cpu()
            say_candidate(say, name, configs[name])
    if ensemble:
        for (arch, mode, size, equalizing), names in single_groups(configs).items():
            if len(names) < 2:
                continue
            top = sorted(names, key=lambda k: -sortable(configs[k]["val"]["roc_auc"]))[:ensemble]
            name = (f"{arch}/{mode} ensemble of {len(top)}" + (" equalised" if equalizing else "")
                    + size_tag(size, cls_size))
            with timer.step(f"stage 2 {name}"):
                model = ClassifierEnsemble([models[k] for k in top])
                configs[name] = measure_candidate(model, arch, mode, views_at(size), size, dev,
                                                  target_sensitivity, cam_missing, FitConfig.mean,
                                                  FitConfig.std)
                configs[name]["members"] = top
                configs[name].update({k: max(configs[m].get(k, 0.0) for m in top) for k in RECIPE_KEYS})
                models[name] = model.cpu()
                say_candidate(say, name, configs[name])
    chosen = choose(configs, min_attention)
    say(f"chosen on validation: {chosen}")
    results["configs"] = {k: {kk: vv for kk, vv in v.items() if kk not in ("prob_test", "prob_val")}
                          for k, v in configs.items()}
    results["chosen"] = chosen
    results["selection"] = {"min_attention": min_attention, "attention_weight": attention_weight,
                            "input_size": cls_size, **run_recipe}
    if ensemble:
        results["selection"]["ensemble"] = ensemble
    if references:
        results["selection"]["references"] = runs
    runners_up = ranked(configs, min_attention)[1:]
    if runners_up:  # how far validation separates the choice from the next candidate by the same rule
        nxt = runners_up[0]
        lead = paired_auc_difference(y["val"].numpy(), configs[chosen]["prob_val"], configs[nxt]["prob_val"],
                                     n_boot=200 if quick else 1000, seed=seed)
        results["selection"]["lead"] = {"over": nxt, **lead}
    with timer.step("test metrics, per source, lung attention"):
        c = configs[chosen]
        chosen_views = views_at(c["input_size"])
        yt, pt = y["test"].numpy(), np.asarray(c["prob_test"])
        results["test"] = metrics_with_ci(yt, pt, c["threshold"], n_boot=200 if quick else 1000, seed=seed)
        results["per_source"] = per_group(yt, pt, cls_sets["test"].sources, c["threshold"])
        results["test_shape_normalised"] = c["test_shape_normalised"]
        results["lung_attention"] = ({"skipped": cam_missing} if cam_missing else
                                     _attention(configs, models, views_at, dev))
    with timer.step("trivial baselines"):
        from training.baselines import trivial_baselines

        # at the chosen network's input size, as `evaluate` measures them for the shipped bundle
        results["baselines_input_size"] = c["input_size"]
        centres = {side: _centre_whole(cls_sets[side], c["input_size"]) for side in SIDES}
        results["baselines"] = trivial_baselines({s: cls_sets[s].shapes for s in SIDES}, centres,
                                                 {s: y[s].numpy() for s in SIDES},
                                                 target_sensitivity=target_sensitivity)
    with timer.step("bundle"):
        results["bundle"] = str(write_bundle(out / "bundle", segmenter, seg_arch, models[chosen], c, results,
                                             seg_size=seg_size, cls_size=c["input_size"], version=version,
                                             cls_samples=cls,
                                             int8=int8_classifier and len(members_of(models[chosen])) > 1))
        results["bundle_check"] = bundle_check(Path(results["bundle"]), c, chosen_views.sets["val"],
                                               chosen_views.crops["val"], dev)
        say(f"bundle: validation probabilities within {results['bundle_check']['max_abs_diff_val']:.4f} of "
            "the trained network's")
    results["timings_s"] = timer.steps
    write_json(out / "results.json", results)
    write_build_report(out, results)
    say(f"done in {time.perf_counter() - timer.t0:.1f} s: {out / 'report.md'}")
    return results


def preflight() -> str:
    """Import what every step needs now, so a missing package stops the run before any training.

    Returns an empty string, or why lung attention cannot be computed (pytorch-grad-cam or OpenCV missing):
    that step alone is then skipped and says so in the results.
    """
    import importlib

    for module in ("inference.preprocess", "inference.imaging", "inference.bundle",
                   "inference.models.segmentation", "inference.models.classifiers", "sklearn", "scipy"):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise RuntimeError(f"cannot import {module}: {exc}; install the missing package first") from exc
    try:
        importlib.import_module("inference.explain")
    except ImportError as exc:
        return f"inference.explain cannot be imported ({exc})"
    return ""


def _centre_whole(images: ImageSet, size: int) -> torch.Tensor:
    """Each image's centre square at ``size`` (uint8, N x 1 x size x size): ``images.square`` when ``images``
    were prepared at that size."""
    from inference.preprocess import centre_crop
    from training.tensors import to_uint8

    if images.square.shape[-1] == size:
        return images.square
    arrs = [to_uint8(centre_crop(p.astype(np.float32) / 255.0, size)) for p in images.pixels]
    if not arrs:
        return torch.zeros((0, 1, size, size), dtype=torch.uint8)
    return torch.from_numpy(np.stack(arrs))[:, None]


def _attention(configs: dict[str, dict[str, Any]], models: dict[str, torch.nn.Module],
               views_at: Callable[[int], Views], dev: torch.device) -> dict[str, Any]:
    """Lung attention on the test images for every configuration (all images and positives only), each at
    its own input size."""
    out = {}
    for name, c in configs.items():
        v = views_at(c["input_size"])
        out[name] = attention_summary(models[name], c["arch"], c["mode"], v.sets["test"], v.crops["test"],
                                      dev)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``python -m training.build_default``)."""
    p = argparse.ArgumentParser(prog="python -m training.build_default", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, type=Path, help="manifest CSV or folder with manifest.csv")
    p.add_argument("--out", required=True, type=Path, help="output folder (report, bundle, checkpoints)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--epochs-seg", type=int, default=40)
    p.add_argument("--epochs-cls", type=int, default=30)
    p.add_argument("--archs", default=",".join(DEFAULT_ARCHS), help="comma-separated stage 2 architectures")
    p.add_argument("--seg-archs", default="unet,lungvae", help="comma-separated stage 1 architectures")
    p.add_argument("--seg-size", type=int, default=256)
    p.add_argument("--cls-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.002)
    p.add_argument("--target-sensitivity", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--version", default="1.0.0", help="version written into the bundle card")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES),
                   help=f"comma-separated stage 2 input modes, of {', '.join(MODES)} ('square': the image's "
                        "centre square, so neither its aspect nor padding reaches stage 2)")
    p.add_argument("--base-bundle", type=Path, default=None,
                   help="bundle whose stage 1 is reused when --seg-archs is empty")
    p.add_argument("--split", type=Path, default=None, help="reuse this split.json instead of a new split")
    add_shortcut_arguments(p)
    p.add_argument("--min-attention", type=float, default=0.7,
                   help="median lung attention on validation positives a configuration needs to be preferred")
    p.add_argument("--reference", type=Path, action="append", default=None,
                   help="results.json of an earlier run on the same split, listed beside this run's "
                        "(repeatable)")
    p.add_argument("--add-bundles", default="",
                   help="comma-separated bundles trained earlier on the same split (other seeds) whose "
                        "classifiers join the candidates (an ensemble bundle as one candidate)")
    p.add_argument("--ensemble", type=int, default=0,
                   help="also consider, per architecture and mode, the ensemble of its N best candidates "
                        "(of all of them when it has fewer, from two)")
    p.add_argument("--int8-ensembles", action="store_true",
                   help="store a chosen ensemble as int8 (per channel); a single network stays float16")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 batches per epoch, small sizes")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.quick:
        args.seg_size, args.cls_size = min(args.seg_size, 64), min(args.cls_size, 64)
    build_default(args.data, args.out, device=args.device, epochs_seg=args.epochs_seg,
                  epochs_cls=args.epochs_cls, archs=tuple(a for a in args.archs.split(",") if a),
                  seg_archs=tuple(a for a in args.seg_archs.split(",") if a), seg_size=args.seg_size,
                  cls_size=args.cls_size, batch_size=args.batch_size, lr=args.lr,
                  target_sensitivity=args.target_sensitivity, seed=args.seed, quick=args.quick,
                  resume=args.resume, version=args.version,
                  modes=tuple(m for m in args.modes.split(",") if m), base_bundle=args.base_bundle,
                  split_file=args.split, attention_weight=args.attention_weight,
                  min_attention=args.min_attention, reference=tuple(args.reference or ()),
                  member_bundles=tuple(Path(b) for b in args.add_bundles.split(",") if b),
                  ensemble=args.ensemble, int8_classifier=args.int8_ensembles,
                  source_balance=args.source_balance, style_augment=args.style_augment,
                  source_adversary=args.source_adversary, artefact_augment=args.artefact_augment,
                  equalize=args.equalize, init_weights=args.init_weights,
                  say=lambda line: (sys.stdout.write(line + "\n"), sys.stdout.flush()) and None)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
