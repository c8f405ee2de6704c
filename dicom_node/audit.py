"""Audit trail: who associated with the node, and where each job's results were sent.

Rows live in the ``associations`` and ``deliveries`` tables of :mod:`dicom_node.db`. They name AE titles,
hosts and destinations only, never a patient. The listener calls :func:`open_association` /
:func:`close_association` (or :func:`refuse_association`), the admin API
reads them back with :func:`recent_associations` and :func:`deliveries_for`. Delivery attempts are written by
the exporter through ``JobManager.record_delivery`` (one writer per table row kind).

Each helper runs its own short transaction on ``engine``; callers on the association thread should keep to one
call per association event (the instance count is passed once, at close).
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from dicom_node.db import Association, Delivery, reading, utcnow

log = logging.getLogger(__name__)

DELIVERY_FAILED = "failed"
MAX_PAGE = 500


def _check_text(name: str, value: str, max_len: int) -> str:
    if not isinstance(value, str):
        raise TypeError(f'Argument "{name}" must be a str.')
    return value.strip()[:max_len]


def _check_page(limit: int, offset: int) -> None:
    if not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise ValueError(f'Argument "limit" must be an int between 1 and {MAX_PAGE}.')
    if not isinstance(offset, int) or offset < 0:
        raise ValueError('Argument "offset" must be an int >= 0.')


def open_association(engine: Engine, *, calling_ae: str, host: str, port: int | None = None) -> int:
    """Record an accepted association and return its id (to pass to ``JobManager.enqueue``)."""
    row = Association(calling_ae=_check_text("calling_ae", calling_ae, 16),
                      host=_check_text("host", host, 255), port=port, refused=False, reason="")
    with Session(engine) as session, session.begin():
        session.add(row)
        session.flush()
        assoc_id = int(row.id)
    log.debug("association recorded", extra={"action": "audit_association", "association_id": assoc_id})
    return assoc_id


def refuse_association(engine: Engine, *, calling_ae: str, host: str, port: int | None = None,
                       reason: str) -> int:
    """Record a refused association (unknown calling AE, disk full, ...) with its reason; returns its id."""
    if not reason:
        raise ValueError('Argument "reason" must say why the association was refused.')
    now = utcnow()
    row = Association(calling_ae=_check_text("calling_ae", calling_ae, 16),
                      host=_check_text("host", host, 255), port=port, refused=True,
                      reason=_check_text("reason", reason, 2000), started_at=now, ended_at=now)
    with Session(engine) as session, session.begin():
        session.add(row)
        session.flush()
        return int(row.id)


def close_association(engine: Engine, association_id: int, *, instances: int,
                      reason: str = "") -> None:
    """Mark an association ended, with the number of instances it stored (and why it ended, if abnormally)."""
    if not isinstance(instances, int) or instances < 0:
        raise ValueError('Argument "instances" must be an int >= 0.')
    values: dict[str, Any] = {"ended_at": utcnow(), "instances": instances}
    if reason:
        values["reason"] = _check_text("reason", reason, 2000)
    with Session(engine) as session, session.begin():
        session.execute(update(Association).where(Association.id == association_id).values(**values))


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() + "Z" if value is not None else None


def association_dict(row: Association) -> dict[str, Any]:
    """An association row as JSON-ready data (times in ISO 8601 UTC)."""
    return {"id": row.id, "calling_ae": row.calling_ae, "host": row.host, "port": row.port,
            "started_at": _iso(row.started_at), "ended_at": _iso(row.ended_at),
            "instances": row.instances, "refused": bool(row.refused), "reason": row.reason}


def delivery_dict(row: Delivery) -> dict[str, Any]:
    """A delivery row as JSON-ready data."""
    return {"id": row.id, "job_id": row.job_id, "destination": row.destination, "status": row.status,
            "error": row.error, "at": _iso(row.at)}


def recent_associations(engine: Engine, *, limit: int = 50, offset: int = 0,
                        refused: bool | None = None) -> list[dict[str, Any]]:
    """Newest associations first; ``refused`` filters on accepted (False) or refused (True)."""
    _check_page(limit, offset)
    stmt = select(Association).order_by(Association.started_at.desc(), Association.id.desc())
    if refused is not None:
        stmt = stmt.where(Association.refused.is_(refused))
    with Session(reading(engine)) as session:
        return [association_dict(r) for r in session.scalars(stmt.limit(limit).offset(offset))]


def deliveries_for(engine: Engine, job_id: int) -> list[dict[str, Any]]:
    """Every delivery attempt of one job, oldest first."""
    stmt = select(Delivery).where(Delivery.job_id == int(job_id)).order_by(Delivery.at, Delivery.id)
    with Session(reading(engine)) as session:
        return [delivery_dict(r) for r in session.scalars(stmt)]


def recent_deliveries(engine: Engine, *, limit: int = 50, offset: int = 0,
                      failed_only: bool = False) -> list[dict[str, Any]]:
    """Newest delivery attempts first, optionally only the failed ones."""
    _check_page(limit, offset)
    stmt = select(Delivery).order_by(Delivery.at.desc(), Delivery.id.desc())
    if failed_only:
        stmt = stmt.where(Delivery.status == DELIVERY_FAILED)
    with Session(reading(engine)) as session:
        return [delivery_dict(r) for r in session.scalars(stmt.limit(limit).offset(offset))]
