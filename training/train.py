"""``cxr-node train``: train stage 1 and/or stage 2 on any data input, for any architecture, with resume.

The same machinery as ``python -m training.build_default`` (which compares every configuration), narrowed
to the configuration asked for:

    cxr-node train --data ../shared/data --out runs/r1                       # both stages, lung mode
    cxr-node train --stage 2 --arch resnet18 --mode whole --data DIR --labels labels.csv --out runs/r2
    cxr-node train --stage 1 --seg-arch lungvae --data ../shared/data --out runs/r3
    cxr-node train --stage 2 --fine-tune --data node --out runs/r4           # the node's labelled instances
    cxr-node train ... --resume                                              # continue from checkpoints

``--stage 2`` takes stage 1 from ``--base-model`` (default: the shipped model); ``--stage 1`` keeps the
base model's classifier and sets its threshold again on the new lung crops. ``--fine-tune`` starts stage 2
from the base model's classifier. Output: ``<out>/bundle`` (a complete model bundle), ``results.json``,
``report.md``, ``split.json`` and ``checkpoints/``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from training.build_default import MODES, build_default
from training.candidates import add_shortcut_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``cxr-node train``."""
    from inference.models.classifiers import CLASSIFIERS
    from inference.models.segmentation import SEGMENTERS

    p.add_argument("--data", required=True, help="manifest CSV, folder with manifest.csv, DICOM folder, or "
                                                 "'node': the node's received instances with imported labels "
                                                 "(cxr-node retrain --import-labels)")
    p.add_argument("--labels", help="labels CSV (file or sop_instance_uid, label) for a DICOM folder")
    p.add_argument("--out", required=True, help="run folder (bundle, report, split, checkpoints)")
    p.add_argument("--stage", choices=["1", "2", "both"], default="both")
    p.add_argument("--arch", choices=CLASSIFIERS, default="densenet121", help="stage 2 architecture")
    p.add_argument("--mode", choices=MODES, default="lung",
                   help="stage 2 input: lung crop, whole image (padded to a square) or its centre square")
    p.add_argument("--seg-arch", choices=SEGMENTERS, default="unet", help="stage 1 architecture")
    p.add_argument("--base-model", metavar="DIR", help="bundle for the stage not trained (default: the "
                                                        "shipped model)")
    p.add_argument("--fine-tune", action="store_true", help="start stage 2 from the base model's weights")
    p.add_argument("--epochs-seg", type=int, default=40)
    p.add_argument("--epochs", type=int, default=30, help="stage 2 epochs")
    p.add_argument("--lr", type=float, default=0.002, help="Adam learning rate")
    p.add_argument("--batch-size", type=int, default=32)
    add_shortcut_arguments(p)
    p.add_argument("--seg-size", type=int, default=256)
    p.add_argument("--size", type=int, default=224, help="stage 2 input size")
    p.add_argument("--split", help="reuse a split.json (patient ids per side)")
    p.add_argument("--target-sensitivity", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--version", default="0.1.0-local", help="version written into the bundle card")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 batches per epoch, 64 px")


def run(args: argparse.Namespace, settings: Any) -> int:
    """Entry point of ``cxr-node train``; prints each step's time and the bundle written."""
    seg_size, cls_size = args.seg_size, args.size
    if args.quick:
        seg_size, cls_size = min(seg_size, 64), min(cls_size, 64)

    def say(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    samples = None
    if args.data == "node":
        from dicom_node.db import make_engine
        from training.retrain import local_samples, read_labels

        engine = make_engine(settings.db_url)
        try:
            samples = local_samples(engine, read_labels(settings))
        finally:
            engine.dispose()
        say(f"{len(samples)} labelled instances received by the node")
    results = build_default(
        Path(args.data), Path(args.out), samples=samples, labels=Path(args.labels) if args.labels else None,
        device=args.device, epochs_seg=args.epochs_seg, epochs_cls=args.epochs,
        archs=(args.arch,) if args.stage in ("2", "both") else (),
        seg_archs=(args.seg_arch,) if args.stage in ("1", "both") else (),
        modes=(args.mode,), seg_size=seg_size, cls_size=cls_size, batch_size=args.batch_size, lr=args.lr,
        target_sensitivity=args.target_sensitivity, seed=args.seed, quick=args.quick, resume=args.resume,
        version=args.version, base_bundle=Path(args.base_model) if args.base_model else None,
        fine_tune=args.fine_tune, split_file=Path(args.split) if args.split else None, say=say,
        attention_weight=args.attention_weight, source_balance=args.source_balance,
        style_augment=args.style_augment, source_adversary=args.source_adversary,
        artefact_augment=args.artefact_augment, equalize=args.equalize, init_weights=args.init_weights)
    say(f"bundle: {results['bundle']}")
    return 0
