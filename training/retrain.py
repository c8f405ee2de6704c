"""Retraining on locally labelled studies: ``cxr-node retrain`` and the scheduler's ``retrain_once``.

1. Labels are imported from a CSV (``sop_instance_uid`` or ``accession_number``, ``label`` covid | normal,
   optional ``patient_id``) into ``<data_dir>/training/labels.csv`` (later imports win per key).
2. ``retrain_once`` joins them with the node's received instances (Job table -> spool files), splits by
   patient (seeded, 7:2:1; the test side is the local held-out set), fine-tunes the current model's stage 2
   from its weights (stage 1 kept), and writes the candidate bundle (new version, new device UID) under
   ``<data_dir>/models/``.
3. Current and candidate are evaluated through the node's pipeline on the same held-out set; the candidate
   is promoted only if ``candidate >= current - retrain.margin`` on ``retrain.metric``. Both are recorded in
   the registry (candidate ``current`` or ``rejected``, with the decision in its metrics).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from training.datasets import Sample, _read_label_rows

log = logging.getLogger(__name__)

STORE_COLUMNS = ["key_type", "key", "label", "patient_id", "imported_at"]


def label_store(settings: Any) -> Path:
    """Where imported labels live: ``<data_dir>/training/labels.csv``."""
    return Path(settings.storage.data_dir) / "training" / "labels.csv"


def read_labels(settings: Any) -> dict[tuple[str, str], dict[str, str]]:
    """Imported labels keyed by (key_type, key)."""
    path = label_store(settings)
    if not path.is_file():
        return {}
    with path.open(newline="") as fh:
        return {(r["key_type"], r["key"]): r for r in csv.DictReader(fh)}


def import_labels(settings: Any, csv_path: str | Path) -> dict[str, int]:
    """Merge a labels CSV into the store; returns counts ``imported`` and ``total``.

    ``ValueError`` (naming the line) for a row without a key or with a label other than covid/normal/other.
    """
    rows = _read_label_rows(csv_path)
    store = read_labels(settings)
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    for i, r in enumerate(rows, start=2):
        if r.get("sop_instance_uid"):
            key = ("sop_instance_uid", r["sop_instance_uid"])
        elif r.get("accession_number"):
            key = ("accession_number", r["accession_number"])
        else:
            raise ValueError(f"labels CSV {csv_path} line {i}: needs sop_instance_uid or accession_number")
        store[key] = {"key_type": key[0], "key": key[1], "label": r["label"],
                      "patient_id": r.get("patient_id", ""), "imported_at": now}
    path = label_store(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=STORE_COLUMNS)
        w.writeheader()
        w.writerows(sorted(store.values(), key=lambda r: (r["key_type"], r["key"])))
    tmp.replace(path)
    log.info("labels imported", extra={"action": "labels_imported", "rows": len(rows), "total": len(store)})
    return {"imported": len(rows), "total": len(store)}


def local_samples(engine: Any, labels: dict[tuple[str, str], dict[str, str]]) -> list[Sample]:
    """Received instances (spool files that still exist) that carry an imported covid/normal label.

    SOP Instance UIDs are matched in the Job table; Accession Numbers and patient ids are read from the
    spooled file's header.
    """
    import pydicom
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from dicom_node.db import Job

    by_accession = {k: v for (t, k), v in labels.items() if t == "accession_number"}
    out = []
    with Session(engine) as s:
        jobs = s.execute(select(Job.sop_instance_uid, Job.spool_path)).all()
    for uid, spool in jobs:
        path = Path(spool)
        if not path.is_file():
            continue
        entry = labels.get(("sop_instance_uid", uid))
        if entry is None and not by_accession:
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True,
                                 specific_tags=["AccessionNumber", "PatientID"])
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            log.warning("spooled instance unreadable: %s", exc, extra={"action": "retrain_skip_file"})
            continue
        entry = entry or by_accession.get(str(ds.get("AccessionNumber", "")))
        if entry is None or entry["label"] not in ("covid", "normal"):
            continue
        pid = entry.get("patient_id") or str(ds.get("PatientID", "")) or uid
        out.append(Sample(file=path, label=entry["label"], patient_id=f"local:{pid}", source="local",
                          key=uid))
    return out


def decide(current: float, candidate: float, margin: float) -> tuple[bool, str]:
    """Promote when ``candidate >= current - margin``; never when either score is undefined (nan)."""
    if math.isnan(current) or math.isnan(candidate):
        return False, "metric undefined on the held-out set (one class only?)"
    if candidate >= current - margin:
        return True, f"candidate {candidate:.4f} >= current {current:.4f} - margin {margin}"
    return False, f"candidate {candidate:.4f} < current {current:.4f} - margin {margin}"


def _score(bundle: Path, test: list[Sample], metric: str, device: str) -> dict[str, Any]:
    from inference.pipeline import Pipeline
    from training.evaluate import _run, _scored
    from training.metrics import binary_metrics

    pipeline = Pipeline.from_bundle(bundle, device=device)
    try:
        _, results = _run(pipeline, test, explain=False)
    finally:
        pipeline.close()
    y, p, _ = _scored(test, results)
    m = binary_metrics(y, p, pipeline.bundle.threshold)
    return {"score": float(m[metric]), "metrics": m}


def retrain_once(settings: Any, *, engine: Any = None, device: str | None = None, quick: bool = False,
                 lr: float = 0.0005, seed: int = 0) -> dict[str, Any]:
    """One retraining round (see the module docstring); returns what happened as a dict.

    ``status`` is ``skipped`` (with ``reason``), ``promoted`` or ``rejected``; versions, scores and the run
    folder are included. ``quick`` is for tests (two batches per epoch, small images).
    """
    from dicom_node.db import init_db, make_engine
    from training import registry
    from training.build_default import build_default

    own = engine is None
    engine = engine or make_engine(settings.db_url)
    try:
        if own:
            init_db(engine)
        labels = read_labels(settings)
        samples = local_samples(engine, labels) if labels else []
        need = settings.retrain.min_labelled
        if len(samples) < need:
            out = {"status": "skipped", "reason": f"{len(samples)} labelled local instances, {need} needed"}
            log.info("retraining skipped", extra={"action": "retrain_skipped", **out})
            return out
        models_dir = Path(settings.storage.data_dir) / "models"
        models_dir.mkdir(parents=True, exist_ok=True)
        cur = registry.ensure_current(engine, models_dir)
        from inference.bundle import ModelBundle

        base = ModelBundle.load(cur["path"])
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
        version = f"{cur['version'].split('-r')[0]}-r{stamp}"[:64]
        run_dir = Path(settings.storage.data_dir) / "training" / "runs" / version
        device = device or settings.model.device
        built = build_default(
            Path(settings.storage.data_dir), run_dir, samples=samples, device=device, seg_archs=(),
            archs=(base.classifier_arch,), modes=(base.crop_mode,), base_bundle=Path(cur["path"]),
            fine_tune=True, epochs_cls=settings.retrain.epochs, lr=lr, seed=seed, quick=quick,
            version=version, cls_size=base.classifier_size, int8_classifier=True)
        bundle = Path(built["bundle"]).replace(models_dir / version)
        split = json.loads((run_dir / "split.json").read_text())
        test = [s for s in samples if s.patient_id in set(split["test"])]
        metric = settings.retrain.metric
        scores = {"current": _score(Path(cur["path"]), test, metric, device),
                  "candidate": _score(bundle, test, metric, device)}
        ok, why = decide(scores["current"]["score"], scores["candidate"]["score"], settings.retrain.margin)
        decision = {"metric": metric, "margin": settings.retrain.margin, "held_out": len(test),
                    "current_version": cur["version"], "current": scores["current"]["score"],
                    "candidate": scores["candidate"]["score"], "promote": ok, "reason": why}
        from training.report import _plain

        metrics = _plain({"decision": decision, "held_out": scores, "training": built.get("test", {}),
                          "run": str(run_dir), "labelled": len(samples)})
        registry.register(engine, bundle, status="candidate" if ok else "rejected", metrics=metrics)
        if ok:
            registry.promote(engine, version)
        out = {"status": "promoted" if ok else "rejected", "version": version, "bundle": str(bundle),
               **decision}
        log.info("retraining finished", extra={"action": "retrain_done", **_plain(out)})
        return out
    finally:
        if own:
            engine.dispose()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``cxr-node retrain`` (besides the node options)."""
    p.add_argument("--import-labels", metavar="CSV", help="import labels (sop_instance_uid or "
                                                         "accession_number, label) and exit")
    p.add_argument("--quick", action="store_true", help="smoke run (tests): two batches per epoch")


def run(args: argparse.Namespace, settings: Any) -> int:
    """Entry point of ``cxr-node retrain``: import labels, or run one retraining round and print it."""
    if args.import_labels:
        counts = import_labels(settings, args.import_labels)
        sys.stdout.write(f"imported {counts['imported']} labels; {counts['total']} in "
                         f"{label_store(settings)}\n")
        return 0
    outcome = retrain_once(settings, quick=args.quick)
    sys.stdout.write(json.dumps(outcome, indent=1, default=str) + "\n")
    return 0
