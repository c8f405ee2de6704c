"""Retraining on locally labelled studies: ``cxr-node retrain`` and the scheduler's ``retrain_once``.

1. Labels are imported from a CSV (``sop_instance_uid`` or ``accession_number``, ``label`` covid | normal,
   optional ``patient_id``) into ``<data_dir>/training/labels.csv`` (later imports win per key; a file that
   gives one key two labels is refused).
2. ``retrain_once`` joins them with the node's received instances (Job table -> spool files; instances whose
   job failed or was ignored, whose file is gone or whose pixels cannot be decoded are left out and counted),
   splits by patient (7:2:1, each patient's side fixed by a hash of its id, so a patient never moves to the
   held-out side in a later round; the test side is the local held-out set), fine-tunes the current model's
   stage 2 from its weights (stage 1 kept), and writes the candidate bundle (new version, new device UID)
   under ``<data_dir>/models/``.
3. Current and candidate are evaluated through the node's pipeline on the same held-out set; the candidate
   is promoted only if ``candidate >= current - retrain.margin`` on ``retrain.metric`` and the current model
   is still the one it was compared with. Both are recorded in the registry (candidate ``current`` or
   ``rejected``, with the decision in its metrics).

A round is skipped, saying why, when ``model.path`` pins the served model (a promoted model would never be
served), when another round is running (one at a time per data folder, and per database on PostgreSQL), or
when the labelled instances are too few: fewer than ``retrain.min_labelled``, or fewer than three patients
of a class (one each for training, validation and the held-out set).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import logging
import math
import os
import secrets
import shutil
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.datasets import CLASS_LABELS, Sample, _read_label_rows
from training.sides import (
    RoundBusy,
    class_problem,
    read_sides,
    record_sides,
    round_lock,
    split_problem,
    stable_split,
)

log = logging.getLogger(__name__)

STORE_COLUMNS = ["key_type", "key", "label", "patient_id", "imported_at"]
KEY_TYPES = ("sop_instance_uid", "accession_number")
# Labelled instances left out of a round, by reason (the keys of ``left_out`` in its result).
LEFT_OUT = {
    "not_processed": "job failed or ignored",
    "file_deleted": "spooled file deleted (retention)",
    "unreadable": "header unreadable",
    "undecodable": "pixels cannot be decoded",
    "accession_unmatched": "Accession Number labels matching no kept instance",
}


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


def _conflicts(rows: Sequence[dict[str, str]]) -> dict[tuple[str, str], set[str]]:
    """Keys (a SOP Instance UID or an Accession Number, wherever a row gives one) with two or more labels."""
    seen: dict[tuple[str, str], set[str]] = defaultdict(set)
    for r in rows:
        for key_type in KEY_TYPES:
            if r.get(key_type):
                seen[(key_type, r[key_type])].add(r["label"])
    return {k: v for k, v in seen.items() if len(v) > 1}


def label_rows(csv_path: str | Path) -> list[tuple[tuple[str, str], dict[str, str]]]:
    """The rows of a labels CSV with the key each is stored under (its SOP Instance UID, else its Accession
    Number).

    ``ValueError`` (naming the line) for a row without a key or with a label other than covid/normal/other,
    and (naming the keys) when the file gives one key two different labels.
    """
    rows = _read_label_rows(csv_path)
    out = []
    for i, r in enumerate(rows, start=2):
        if r.get("sop_instance_uid"):
            key = ("sop_instance_uid", r["sop_instance_uid"])
        elif r.get("accession_number"):
            key = ("accession_number", r["accession_number"])
        else:
            raise ValueError(f"labels CSV {csv_path} line {i}: needs sop_instance_uid or accession_number")
        out.append((key, r))
    conflicts = _conflicts(rows)
    if conflicts:
        named = "; ".join(f"{t} {k} ({' and '.join(sorted(v))})"
                          for (t, k), v in sorted(conflicts.items())[:5])
        more = f" and {len(conflicts) - 5} more" if len(conflicts) > 5 else ""
        raise ValueError(f"labels CSV {csv_path} gives {len(conflicts)} key(s) two different labels: "
                         f"{named}{more}; nothing imported")
    return out


def import_labels(settings: Any, csv_path: str | Path, engine: Any = None) -> dict[str, int]:
    """Merge a labels CSV (:func:`label_rows`, whose errors it raises: nothing is imported then) into the
    store; returns counts ``imported`` (rows) and ``total`` (keys stored), and with ``engine`` also ``keys``
    (distinct keys in the file) and ``matched`` (those naming a received instance whose spooled file is kept).
    """
    rows = label_rows(csv_path)
    store = read_labels(settings)
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    for key, r in rows:
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
    counts = {"imported": len(rows), "total": len(store)}
    if engine is not None:
        keys = {key for key, _ in rows}
        found = collect_local(engine, {k: store[k] for k in keys}, decode=False).matched
        counts.update(keys=len(keys), matched=len(keys & found))
    log.info("labels imported", extra={"action": "labels_imported", **counts})
    return counts


@dataclass
class LocalData:
    """What :func:`collect_local` found."""

    samples: list[Sample]
    left_out: dict[str, int] = field(default_factory=dict)  # reason (``LEFT_OUT``) -> labelled instances
    matched: set[tuple[str, str]] = field(default_factory=set)  # label keys naming a kept instance


def describe_left_out(left_out: dict[str, int]) -> str:
    """``left_out`` in words: ``"3 spooled file deleted (retention), 1 pixels cannot be decoded"``."""
    return ", ".join(f"{n} {LEFT_OUT.get(k, k)}" for k, n in left_out.items() if n)


def _decode_error(path: Path) -> str | None:
    """Why the image at ``path`` cannot be decoded as training decodes it; None when it can."""
    from dicom_node.errors import NodeError
    from inference.imaging import load_any

    try:
        load_any(path)
    except (NodeError, OSError, ValueError, MemoryError) as exc:
        return str(exc)
    return None


def collect_local(engine: Any, labels: dict[tuple[str, str], dict[str, str]], *,
                  decode: bool = True) -> LocalData:
    """Received instances (spool files that still exist) that carry an imported covid/normal label.

    SOP Instance UIDs are matched in the Job table; Accession Numbers and patient ids are read from the
    spooled file's header. Labelled instances are left out, and counted by reason, when their job failed or
    was ignored (the node could not or did not process them), their spooled file is gone (retention) or its
    header cannot be read, and with ``decode`` when their pixels cannot be decoded: one such image would
    otherwise stop every round (:func:`log_left_out` logs the counts).
    """
    import pydicom
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from dicom_node.db import Job, reading
    from dicom_node.queue import JobState

    by_accession = {k: v for (t, k), v in labels.items() if t == "accession_number"}
    left: Counter[str] = Counter()
    matched: set[tuple[str, str]] = set()
    kept: list[tuple[Sample, str]] = []
    with Session(reading(engine)) as s:
        jobs = s.execute(select(Job.sop_instance_uid, Job.spool_path, Job.state)).all()
    for uid, spool, state in jobs:
        path = Path(spool)
        key: tuple[str, str] = ("sop_instance_uid", uid)
        entry = labels.get(key)
        if entry is None and not by_accession:
            continue
        if not path.is_file():
            if entry is not None and entry["label"] in CLASS_LABELS:
                left["file_deleted"] += 1
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True,
                                 specific_tags=["AccessionNumber", "PatientID"])
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            log.warning("spooled instance unreadable: %s", exc, extra={"action": "retrain_skip_file"})
            if entry is not None and entry["label"] in CLASS_LABELS:
                left["unreadable"] += 1
            continue
        accession = str(ds.get("AccessionNumber", ""))
        if accession in by_accession:  # matched, even where the instance's own UID label wins
            matched.add(("accession_number", accession))
        if entry is None:
            key, entry = ("accession_number", accession), by_accession.get(accession)
            if entry is None:
                continue
        matched.add(key)
        if entry["label"] not in CLASS_LABELS:
            continue
        if state in (JobState.FAILED.value, JobState.IGNORED.value):
            left["not_processed"] += 1
            continue
        pid = entry.get("patient_id") or str(ds.get("PatientID", "")) or uid
        kept.append((Sample(file=path, label=entry["label"], patient_id=f"local:{pid}", source="local",
                            key=uid), uid))
    if decode and kept:
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            errors = list(pool.map(lambda item: _decode_error(item[0].file), kept))
        for (_, uid), error in zip(kept, errors, strict=True):
            if error is not None:
                log.warning("labelled instance %s left out: %s", uid, error,
                            extra={"action": "retrain_skip_file", "sop_instance_uid": uid})
                left["undecodable"] += 1
        kept = [item for item, error in zip(kept, errors, strict=True) if error is None]
    left["accession_unmatched"] = sum(1 for k, v in by_accession.items() if v["label"] in CLASS_LABELS
                                      and ("accession_number", k) not in matched)
    return LocalData(samples=[sample for sample, _ in kept],
                     left_out={k: left[k] for k in LEFT_OUT if left[k]}, matched=matched)


def log_left_out(left_out: dict[str, int]) -> None:
    """Log the labelled instances left out (a warning, ``retrain_left_out``), if any."""
    if left_out:
        log.warning("labelled instances left out: %s", describe_left_out(left_out),
                    extra={"action": "retrain_left_out", **left_out})


def local_samples(engine: Any, labels: dict[tuple[str, str], dict[str, str]]) -> list[Sample]:
    """The samples of :func:`collect_local` (``cxr-node train --data node``); those left out are logged."""
    local = collect_local(engine, labels)
    log_left_out(local.left_out)
    return local.samples


def new_run(current_version: str, runs_dir: Path, models_dir: Path) -> tuple[str, Path]:
    """A version for the candidate (``<base>-r<UTC time>-<4 random hex digits>``) whose run folder is created
    here, exclusively, and whose bundle folder does not exist: two rounds never share either."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    base = current_version.split("-r")[0]
    runs_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(16):
        tail = f"-r{stamp}-{secrets.token_hex(2)}"
        version = base[:64 - len(tail)] + tail
        if (models_dir / version).exists():
            continue
        try:
            (runs_dir / version).mkdir()
        except FileExistsError:
            continue
        return version, runs_dir / version
    raise RuntimeError(f"no unused version name for a candidate of {current_version} in {runs_dir}")


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


def _skipped(reason: str, **extra: Any) -> dict[str, Any]:
    out = {"status": "skipped", "reason": reason, **extra}
    log.info("retraining skipped: %s", reason, extra={"action": "retrain_skipped", **out})
    return out


def retrain_once(settings: Any, *, engine: Any = None, device: str | None = None, quick: bool = False,
                 lr: float = 0.0005, seed: int = 0) -> dict[str, Any]:
    """One retraining round (see the module docstring); returns what happened as a dict.

    ``status`` is ``skipped`` (with ``reason``), ``promoted`` or ``rejected``; versions, scores and the run
    folder are included, and ``left_out``: the labelled instances not used, counted by reason
    (:data:`LEFT_OUT`). ``quick`` is for tests (two batches per epoch, small images).
    """
    from dicom_node.db import init_db, make_engine

    if settings.model.path is not None:
        return _skipped(f"model.path is set ({settings.model.path}): the worker serves that bundle whatever "
                        "the registry holds, so a retrained model would never be served; unset model.path "
                        "to retrain the registry's current model")
    own = engine is None
    engine = engine or make_engine(settings.db_url)
    try:
        if own:
            init_db(engine)
        try:
            with round_lock(settings, engine):
                return _round(settings, engine, device=device, quick=quick, lr=lr, seed=seed)
        except RoundBusy as exc:
            return _skipped(str(exc))
    finally:
        if own:
            engine.dispose()


def _round(settings: Any, engine: Any, *, device: str | None, quick: bool, lr: float,
           seed: int) -> dict[str, Any]:
    """The body of :func:`retrain_once`, run under the round lock."""
    from inference.bundle import ModelBundle
    from training import registry
    from training.build_default import build_default
    from training.datasets import save_split
    from training.report import _plain

    labels = read_labels(settings)
    local = collect_local(engine, labels) if labels else LocalData(samples=[])
    samples = local.samples
    log_left_out(local.left_out)
    found = {"labelled": len(samples), "left_out": local.left_out}
    need = settings.retrain.min_labelled
    if len(samples) < need:
        why = f" (left out: {describe_left_out(local.left_out)})" if local.left_out else ""
        return _skipped(f"{len(samples)} labelled local instances, {need} needed{why}", **found)
    split = stable_split(samples, read_sides(settings))
    problem = class_problem(samples) or split_problem(split)
    if problem:
        return _skipped(problem, **found)
    record_sides(settings, split)
    data_dir = Path(settings.storage.data_dir)
    models_dir = data_dir / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    cur = registry.ensure_current(engine, models_dir)
    base = ModelBundle.load(cur["path"])
    version, run_dir = new_run(cur["version"], data_dir / "training" / "runs", models_dir)
    save_split(split, run_dir / "split.json")
    device = device or settings.model.device
    bundle = models_dir / version
    try:
        built = build_default(
            data_dir, run_dir, samples=samples, device=device, seg_archs=(), archs=(base.classifier_arch,),
            modes=(base.crop_mode,), base_bundle=Path(cur["path"]), fine_tune=True,
            epochs_cls=settings.retrain.epochs, lr=lr, seed=seed, quick=quick, version=version,
            cls_size=base.classifier_size, int8_classifier=True, split_file=run_dir / "split.json")
        Path(built["bundle"]).replace(bundle)
        test = split.select(samples, "test")
        metric = settings.retrain.metric
        scores = {"current": _score(Path(cur["path"]), test, metric, device),
                  "candidate": _score(bundle, test, metric, device)}
        ok, why = decide(scores["current"]["score"], scores["candidate"]["score"], settings.retrain.margin)
        decision = {"metric": metric, "margin": settings.retrain.margin, "held_out": len(test),
                    "current_version": cur["version"], "current": scores["current"]["score"],
                    "candidate": scores["candidate"]["score"], "promote": ok, "reason": why}
        metrics = _plain({"decision": decision, "held_out": scores, "training": built.get("test", {}),
                          "run": str(run_dir), **found})
        registry.register(engine, bundle, status="candidate" if ok else "rejected", metrics=metrics)
    except BaseException:  # failed before it was registered: no bundle may lie in models/ for ever
        shutil.rmtree(bundle, ignore_errors=True)
        raise
    finally:
        # a round is never resumed, failed or not: its checkpoints (weights and optimiser state, 170 MB for
        # one ResNet18) would stay on the spool volume for ever, round after round
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    if ok:
        try:
            registry.promote(engine, version, expected_current=cur["version"])
        except registry.CurrentChanged as exc:
            # another round or an operator changed the current model meanwhile: this candidate was never
            # compared with the model it would replace
            ok, why = False, f"not promoted: {exc}"
            decision.update(promote=False, reason=why)
            registry.reject(engine, version, why)
    out = {"status": "promoted" if ok else "rejected", "version": version, "bundle": str(bundle),
           **decision, **found}
    log.info("retraining finished", extra={"action": "retrain_done", **_plain(out)})
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``cxr-node retrain`` (besides the node options)."""
    p.add_argument("--import-labels", metavar="CSV", help="import labels (sop_instance_uid or "
                                                         "accession_number, label) and exit")
    p.add_argument("--quick", action="store_true", help="smoke run (tests): two batches per epoch")


def run(args: argparse.Namespace, settings: Any) -> int:
    """Entry point of ``cxr-node retrain``: import labels, or run one retraining round and print it."""
    if args.import_labels:
        from dicom_node.db import init_db, make_engine

        label_rows(args.import_labels)  # a file that cannot be imported is refused before the database opens
        engine = make_engine(settings.db_url)
        try:
            init_db(engine)
            counts = import_labels(settings, args.import_labels, engine)
        finally:
            engine.dispose()
        sys.stdout.write(f"imported {counts['imported']} labels; {counts['total']} in "
                         f"{label_store(settings)}; {counts['matched']} of the file's {counts['keys']} keys "
                         "match received instances whose files are kept\n")
        return 0
    outcome = retrain_once(settings, quick=args.quick)
    sys.stdout.write(json.dumps(outcome, indent=1, default=str) + "\n")
    return 0
