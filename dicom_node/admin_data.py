"""Queries and rendering behind the admin API (:mod:`dicom_node.admin`): jobs, health, models, status page.

Everything here reads the database; the only writes go through ``JobManager`` (retry / resend) and the model
registry of ``training.registry`` (promote / roll back). Job data shown names UIDs, AE titles and findings,
never a patient.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import pydicom
from fastapi import HTTPException
from jinja2 import Environment, FileSystemLoader, select_autoescape
from PIL import Image
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session

from dicom_node import __version__, audit
from dicom_node.config import Settings
from dicom_node.db import Job, ModelVersion, reading, within
from dicom_node.queue import JobManager
from dicom_node.spool import free_mb

log = logging.getLogger(__name__)

HEALTH_DB_TIMEOUT_S = 5.0  # a database that does not answer SELECT 1 by then is reported down

PACKAGE_DIR = Path(__file__).resolve().parent
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
PAGE_JOBS = 20


def jsonable(value: Any) -> Any:
    """``value`` with datetimes as ISO 8601 UTC strings (naive UTC in the database), recursively."""
    if isinstance(value, datetime):
        return value.isoformat() + ("Z" if value.tzinfo is None else "")
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def job_summary(job: Job) -> dict[str, Any]:
    """The fields of a job shown in lists (JSON-ready)."""
    result = job.result or {}
    return jsonable({
        "id": job.id, "state": job.state, "sop_instance_uid": job.sop_instance_uid,
        "study_instance_uid": job.study_instance_uid, "calling_ae": job.calling_ae,
        "attempts": job.attempts, "created_at": job.created_at, "updated_at": job.updated_at,
        "finished_at": job.finished_at, "last_error": job.last_error,
        "finding": result.get("finding"), "probability": result.get("probability"),
        "lung_attention": result.get("lung_attention"), "model_version": result.get("model_version"),
        "has_heatmap": bool(job.output_dir and job.sc_sop_instance_uid),
    })


def list_jobs(engine: Engine, *, state: str | None, limit: int, offset: int) -> dict[str, Any]:
    """A page of jobs, newest first; ``total`` counts every job matching the filter."""
    stmt = select(Job).order_by(Job.id.desc())
    count = select(func.count()).select_from(Job)
    if state is not None:
        stmt = stmt.where(Job.state == state)
        count = count.where(Job.state == state)
    with Session(reading(engine)) as session:
        total = int(session.scalar(count) or 0)
        items = [job_summary(j) for j in session.scalars(stmt.limit(limit).offset(offset))]
    return {"total": total, "limit": limit, "offset": offset, "state": state, "items": items}


def job_detail(engine: Engine, job_id: int) -> dict[str, Any] | None:
    """Every column of one job worth showing, or None when it does not exist."""
    with Session(reading(engine)) as session:
        job = session.get(Job, job_id)
        if job is None:
            return None
        out = job_summary(job)
        out.update(jsonable({
            "series_instance_uid": job.series_instance_uid, "sop_class_uid": job.sop_class_uid,
            "calling_host": job.calling_host, "spool_path": job.spool_path, "output_dir": job.output_dir,
            "sr_sop_instance_uid": job.sr_sop_instance_uid, "sc_sop_instance_uid": job.sc_sop_instance_uid,
            "not_before": job.not_before, "lease_owner": job.lease_owner,
            "lease_expires_at": job.lease_expires_at, "association_id": job.association_id,
            "result": job.result,
        }))
        return out


def health_checks(settings: Settings, engine: Engine,
                  model_info: Callable[[], dict[str, Any] | None] | None) -> dict[str, dict[str, Any]]:
    """Each readiness check as ``{"ok": bool, ...details}``: database, spool_disk, model."""
    checks: dict[str, dict[str, Any]] = {}

    def ping() -> None:  # a reader: on SQLite it must not wait for the write lock a writer holds
        with reading(engine).connect() as conn:
            conn.execute(text("SELECT 1"))

    try:
        within(HEALTH_DB_TIMEOUT_S, ping, "health check")
        checks["database"] = {"ok": True, "dialect": engine.dialect.name}
    except Exception as exc:  # any driver error means "not ready"; the reason is reported
        checks["database"] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    spool = settings.storage.spool_dir
    try:
        free = free_mb(spool)
        checks["spool_disk"] = {"ok": free > settings.storage.min_free_mb, "free_mb": round(free, 1),
                                "min_free_mb": settings.storage.min_free_mb}
    except OSError as exc:
        checks["spool_disk"] = {"ok": False, "error": str(exc)}
    if model_info is None:
        checks["model"] = {"ok": True, "loaded": None, "detail": "this process runs no worker"}
    else:
        try:
            info = model_info()
        except Exception as exc:  # a broken callback is a failed check, not a crashed endpoint
            info, error = None, f"{type(exc).__name__}: {exc}"
        else:
            error = "no model loaded yet" if info is None else ""
        checks["model"] = {"ok": info is not None, "loaded": info, **({"error": error} if error else {})}
    return checks


def status_summary(engine: Engine, job_manager: JobManager, model: dict[str, Any] | None,
                   settings: Settings | None = None) -> dict[str, Any]:
    """``/api/status``: the node's version, counts per state, the oldest waiting job and the ten newest
    failures (as ``cxr-node status --json`` has them), the model this process's worker serves
    (``model_loaded``; None without a worker in the process) and the registry's current one
    (``model_current``), and, given ``settings``, the model a worker of this configuration serves
    (``model_served``: ``source`` config when ``model.path`` pins it, registry, or default), which is what
    ``cxr-node status --json`` calls ``model``; it has ``database`` instead of the version."""
    from dicom_node.status import age_text, model_in_use

    current = model_registry(engine)["current"]
    oldest = job_manager.oldest_waiting()
    if oldest is not None:
        oldest["age"] = age_text(oldest["age_s"])  # 2 d 3 h, not 183600 s
    return jsonable({
        "version": __version__, "counts": job_manager.counts(),
        "oldest_waiting": oldest,
        "recent_failures": job_manager.recent_failures(10), "model_loaded": model, "model_current": current,
        "model_served": None if settings is None else model_in_use(settings, job_manager),
    })


def _model_dict(row: ModelVersion) -> dict[str, Any]:
    return jsonable({"version": row.version, "status": row.status, "path": row.path, "metrics": row.metrics,
                     "device_uid": row.device_uid, "created_at": row.created_at,
                     "promoted_at": row.promoted_at})


def model_registry(engine: Engine) -> dict[str, Any]:
    """The model registry: ``current`` (or None), ``candidates`` and every version, newest first."""
    with Session(reading(engine)) as session:
        rows = list(session.scalars(select(ModelVersion).order_by(ModelVersion.created_at.desc(),
                                                                  ModelVersion.id.desc())))
        versions = [_model_dict(r) for r in rows]
    current = next((v for v in versions if v["status"] == "current"), None)
    return {"current": current, "candidates": [v for v in versions if v["status"] == "candidate"],
            "versions": versions}


def registry_call(action: str, engine: Engine, settings: Settings, version: str | None) -> dict[str, Any]:
    """Promote ``version`` or roll back through ``training.registry``; HTTP errors for the API."""
    try:
        from training import registry
    except ImportError as exc:
        raise HTTPException(501, f"the model registry is not available: {exc}") from None
    func_ = getattr(registry, action, None)
    if func_ is None:
        raise HTTPException(501, f"the model registry has no {action!r} operation")
    try:
        outcome = func_(engine, version) if version is not None else func_(engine)
    except (KeyError, LookupError) as exc:
        raise HTTPException(404, str(exc).strip("'\"")) from None
    except ValueError as exc:
        raise HTTPException(409, str(exc)) from None
    log.info("model registry %s by operator", action,
             extra={"action": f"admin_model_{action}", "version": version or ""})
    reg = model_registry(engine)
    return {"action": action, "outcome": jsonable(outcome) if isinstance(outcome, dict) else None,
            "current": reg["current"]}


def _find_heatmap(job: dict[str, Any]) -> Path | None:
    out_dir = job.get("output_dir")
    if not out_dir or not Path(out_dir).is_dir():
        return None
    wanted = job.get("sc_sop_instance_uid")
    fallback = None
    for path in sorted(Path(out_dir).glob("*.dcm")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True,
                                 specific_tags=["SOPClassUID", "SOPInstanceUID"])
        except (OSError, pydicom.errors.InvalidDicomError):
            continue
        if str(ds.get("SOPClassUID", "")) != SECONDARY_CAPTURE:
            continue
        if wanted and str(ds.get("SOPInstanceUID", "")) == wanted:
            return path
        fallback = fallback or path
    return fallback


def heatmap_png(job: dict[str, Any], size: int) -> bytes | None:
    """The job's heatmap SC as PNG bytes, scaled to at most ``size`` pixels; None when there is none."""
    path = _find_heatmap(job)
    if path is None:
        return None
    return _render_png(str(path), path.stat().st_mtime_ns, size)


@lru_cache(maxsize=256)
def _render_png(path: str, _mtime_ns: int, size: int) -> bytes:
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array
    image = Image.fromarray(pixels if pixels.ndim == 3 else pixels.astype("uint8"))
    image.thumbnail((size, size))
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


@lru_cache(maxsize=1)
def _templates() -> Environment:
    return Environment(loader=FileSystemLoader(PACKAGE_DIR / "templates"),
                       autoescape=select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True)


def render_status_page(settings: Settings, engine: Engine, job_manager: JobManager,
                       model: dict[str, Any] | None) -> str:
    """The status page: queue counts, model in use, recent jobs with thumbnails, failures, associations."""
    summary = status_summary(engine, job_manager, model, settings)
    jobs = list_jobs(engine, state=None, limit=PAGE_JOBS, offset=0)
    assocs = audit.recent_associations(engine, limit=10)
    return _templates().get_template("status.html").render(
        version=__version__, ae_title=settings.listener.ae_title, port=settings.listener.port,
        summary=summary, jobs=jobs["items"], total_jobs=jobs["total"], associations=assocs,
        generated_at=jsonable(datetime.now().astimezone().replace(microsecond=0).isoformat()))
