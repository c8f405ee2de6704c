"""Helpers of the operations tests (admin API, metrics, status page, retention): a populated node database.

Jobs are driven through the real ``JobManager`` state machine; done jobs get real outputs from
``dicom_node.outputs.build_outputs`` (heatmap SC + SR) over a synthetic phantom, written where the worker
writes them, so the admin API's heatmap thumbnails come from genuine secondary captures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from dicom_node.config import Settings, load_settings
from dicom_node.db import ModelVersion, init_db, make_engine, utcnow
from dicom_node.queue import JobManager
from dicom_node.worker import output_dir_for
from inference.phantom import make_dicom, make_phantom
from inference.types import Result, XrayImage

TOKEN = "test-admin-token-5f1c9e"
CARD = {"name": "cxr-test", "version": "0.0.0-test", "device_uid": "1.2.826.0.1.3680043.10.1234.1"}


@dataclass
class NodeDb:
    """A node's settings, engine and queue with known jobs in each state."""

    settings: Settings
    engine: Engine
    jobs: JobManager
    ids: dict[str, list[int]] = field(default_factory=dict)


def make_settings(data_dir: Path, *, db_url: str | None = None, admin_port: int = 0, token: str = TOKEN,
                  bind: str = "127.0.0.1", **storage: Any) -> Settings:
    """Settings for a test node under ``data_dir`` (no environment variables read)."""
    overrides: dict[str, dict[str, Any]] = {
        "storage": {"data_dir": str(data_dir), **storage},
        "admin": {"port": admin_port, "token": token, "bind_address": bind},
    }
    if db_url:
        overrides["database"] = {"url": db_url}
    return load_settings(None, overrides, environ={})


def spool_instance(settings: Settings, n: int, shape: tuple[int, int] = (256, 256)) -> tuple[Any, Path]:
    """Write a synthetic CR into the spool as the listener would; returns (dataset, path)."""
    ds = make_dicom(shape=shape, seed=n, opacity=0.3 if n % 2 else 0.0)
    path = settings.storage.spool_dir / str(ds.StudyInstanceUID) / f"{ds.SOPInstanceUID}.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds, path


def enqueue(db: NodeDb, n: int, *, calling_ae: str = "ORTHANC") -> tuple[int, Any, Path]:
    ds, path = spool_instance(db.settings, n)
    job_id, created = db.jobs.enqueue(
        sop_instance_uid=str(ds.SOPInstanceUID), study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID), sop_class_uid=str(ds.SOPClassUID),
        calling_ae=calling_ae, calling_host="127.0.0.1", spool_path=str(path))
    assert created
    return job_id, ds, path


def build_job_outputs(db: NodeDb, job_id: int, ds: Any, spool_path: Path,
                      probability: float) -> tuple[Path, dict[str, Any]]:
    """Real SC + SR for a job, saved where the worker saves them; returns (folder, result dict)."""
    from dicom_node.outputs import build_outputs

    pixels, mask = make_phantom(tuple(ds.pixel_array.shape), opacity=0.3, seed=job_id)
    heat = np.zeros_like(pixels, dtype=np.float32)
    rows, cols = heat.shape
    heat[rows // 4: rows // 2, cols // 5: cols // 2] = 1.0
    image = XrayImage(pixels=pixels.astype(np.float32), source=str(ds.SOPInstanceUID),
                      meta={"sop_instance_uid": str(ds.SOPInstanceUID)})
    finding = "positive" if probability >= 0.5 else "negative"
    result = Result(finding=finding, probability=probability, threshold=0.5, lung_attention=0.8,
                    lung_fraction=0.3, heatmap=heat, lung_mask=mask, model_name=CARD["name"],
                    model_version=CARD["version"])
    outputs = build_outputs(ds, image, result, CARD, db.settings.export)
    folder = output_dir_for(spool_path)  # where the worker keeps them: beside the spool file
    folder.mkdir(parents=True, exist_ok=True)
    for i, out in enumerate(outputs):
        out.save_as(folder / f"{i}_{out.Modality}.dcm", enforce_file_format=True)
    summary = {"finding": finding, "probability": probability, "threshold": 0.5, "lung_attention": 0.8,
               "model_name": CARD["name"], "model_version": CARD["version"],
               "sc_uid": str(outputs[0].SOPInstanceUID), "sr_uid": str(outputs[-1].SOPInstanceUID)}
    return folder, summary


def make_done(db: NodeDb, n: int, probability: float = 0.8,
              destination: str = "ORTHANC@127.0.0.1:4242") -> int:
    """A job taken through queued -> processing -> exporting -> done with real outputs and a delivery."""
    job_id, ds, spool_path = enqueue(db, n)
    [claimed] = db.jobs.claim("worker-test")
    assert claimed.id == job_id
    folder, res = build_job_outputs(db, job_id, ds, spool_path, probability)
    db.jobs.finish_inference(job_id, result={k: v for k, v in res.items() if not k.endswith("_uid")},
                             output_dir=str(folder), sr_sop_instance_uid=res["sr_uid"],
                             sc_sop_instance_uid=res["sc_uid"], worker_id="worker-test")
    db.jobs.record_delivery(job_id, destination, "failed", "association rejected")
    db.jobs.record_delivery(job_id, destination, "sent")
    db.jobs.complete(job_id, worker_id="worker-test")
    return job_id


def make_failed(db: NodeDb, n: int, error: str = "pixel data cannot be decoded") -> int:
    job_id, _, _ = enqueue(db, n)
    [claimed] = db.jobs.claim("worker-test")
    assert claimed.id == job_id
    db.jobs.fail(job_id, error, retryable=False, worker_id="worker-test")
    return job_id


def populate(db: NodeDb, *, queued: int = 25, done: int = 3, failed: int = 2) -> NodeDb:
    """Jobs in known states: ``done`` and ``failed`` first (so claims pick them), then ``queued``."""
    n = 0
    db.ids = {"done": [], "failed": [], "queued": []}
    for i in range(done):
        n += 1
        db.ids["done"].append(make_done(db, n, probability=0.9 if i % 2 == 0 else 0.1))
    for _ in range(failed):
        n += 1
        db.ids["failed"].append(make_failed(db, n))
    for _ in range(queued):
        n += 1
        db.ids["queued"].append(enqueue(db, n)[0])
    return db


def new_node_db(data_dir: Path, db_url: str | None = None, **settings_kw: Any) -> NodeDb:
    settings = make_settings(data_dir, db_url=db_url, **settings_kw)
    engine = make_engine(settings.db_url)
    init_db(engine)
    return NodeDb(settings=settings, engine=engine, jobs=JobManager(engine, settings.worker))


def add_models(engine: Engine) -> None:
    """Registry rows: one retired, one current, one candidate."""
    now = utcnow()
    with Session(engine) as session, session.begin():
        session.add_all([
            ModelVersion(version="1.0.0", path="/models/1.0.0", status="retired", metrics={"roc_auc": 0.95},
                         created_at=now, device_uid="1.2.3.1"),
            ModelVersion(version="1.1.0", path="/models/1.1.0", status="current", metrics={"roc_auc": 0.97},
                         created_at=now, promoted_at=now, device_uid="1.2.3.2"),
            ModelVersion(version="1.2.0", path="/models/1.2.0", status="candidate", metrics={"roc_auc": 0.96},
                         created_at=now, device_uid="1.2.3.3"),
        ])
