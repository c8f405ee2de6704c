"""The model registry (``ModelVersion`` table) and ``cxr-node models``: list, register, promote, roll back.

At most one version is ``current``; the worker serves it and swaps to a new current one without restart.
Promoting retires the previous current version; rolling back marks the current version ``rejected`` and
makes the most recently promoted earlier version current again. A version is made current only when its
bundle loads. Every change is one transaction; on PostgreSQL the changes also take one advisory lock, so two
of them never interleave (SQLite's write lock does that there).

    cxr-node models                      # table of versions
    cxr-node models --promote 1.0.0-r20261126T1500
    cxr-node models --rollback
    cxr-node models --register DIR       # add a bundle as a candidate
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from dicom_node.db import ModelVersion, reading, utcnow
from dicom_node.errors import NodeError

log = logging.getLogger(__name__)

STATUSES = ("current", "candidate", "retired", "rejected")
# Key of the PostgreSQL advisory lock held by each transaction that changes the registry.
_REGISTRY_LOCK_KEY = 0x6378726E6D6F64  # "cxrnmod"


class CurrentChanged(ValueError):
    """The registry's current model is no longer the one a candidate was compared with."""


def _lock(s: Session) -> None:
    """Serialise registry changes on PostgreSQL (released when the transaction ends). Under READ COMMITTED
    two promotions could otherwise both find the same current row and leave two versions current."""
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _REGISTRY_LOCK_KEY})


def _check_loads(row: ModelVersion) -> None:
    """``ValueError`` naming the version, its folder and the problem when its bundle no longer loads, or its
    model.json is no longer the one registered (the worker would refuse to serve it)."""
    from inference.bundle import ModelBundle, card_changed

    try:
        ModelBundle.load(row.path)
        if card_changed(row.path, row.metrics):
            raise ValueError("its model.json was changed after it was registered (a bundle never changes in "
                             "place; register the change as a new version)")
    except (NodeError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"model version {row.version} cannot be loaded from {row.path}: {exc}") from exc


def as_dict(row: ModelVersion) -> dict[str, Any]:
    """A registry row as plain data."""
    return {"version": row.version, "status": row.status, "path": row.path, "device_uid": row.device_uid,
            "created_at": row.created_at.isoformat() if row.created_at else None,
            "promoted_at": row.promoted_at.isoformat() if row.promoted_at else None,
            "metrics": row.metrics or {}}


def list_versions(engine: Engine) -> list[dict[str, Any]]:
    """Every registered version, newest first."""
    with Session(reading(engine)) as s:
        rows = s.execute(select(ModelVersion).order_by(ModelVersion.created_at.desc(),
                                                       ModelVersion.id.desc())).scalars()
        return [as_dict(r) for r in rows]


def current(engine: Engine) -> dict[str, Any] | None:
    """The current version, or None when the registry holds none."""
    with Session(reading(engine)) as s:
        row = s.execute(select(ModelVersion).where(ModelVersion.status == "current")
                        .order_by(ModelVersion.promoted_at.desc(), ModelVersion.id.desc()).limit(1)).scalar()
        return as_dict(row) if row else None


def register(engine: Engine, bundle_path: str | Path, *, status: str = "candidate",
             metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """Add the bundle at ``bundle_path`` (validated by loading it) with ``status`` (not ``current``:
    use :func:`promote`). The version and device UID come from its card. ``ValueError`` when the version is
    already registered."""
    from inference.bundle import CARD_DIGEST_KEY, ModelBundle, card_digest

    if status not in STATUSES or status == "current":
        raise ValueError('Argument "status" must be candidate, retired or rejected.')
    bundle = ModelBundle.load(bundle_path)
    metrics = {**(metrics or {}), CARD_DIGEST_KEY: card_digest(bundle.path)}
    with Session(engine) as s, s.begin():
        _lock(s)
        if s.execute(select(ModelVersion).where(ModelVersion.version == bundle.version)).scalar():
            raise ValueError(f"model version {bundle.version} is already registered")
        row = ModelVersion(version=bundle.version, path=str(Path(bundle.path).resolve()), status=status,
                           metrics=metrics, device_uid=bundle.device_uid)
        s.add(row)
        s.flush()
        out = as_dict(row)
    log.info("model registered", extra={"action": "model_registered", "version": out["version"],
                                        "status": status})
    return out


def ensure_current(engine: Engine, models_dir: str | Path) -> dict[str, Any]:
    """The current version; when the registry is empty, the node's default bundle is registered as current.

    The default bundle is copied into ``models_dir`` first (``<name>-<version>``) and registered there: the
    installed package's own folder changes with the next upgrade, while a registered bundle never may.
    """
    from inference.bundle import CARD_DIGEST_KEY, ModelBundle, card_digest, default_bundle_path

    found = current(engine)
    if found is not None:
        return found
    bundle = ModelBundle.load(default_bundle_path())
    kept = Path(models_dir) / f"{bundle.name}-{bundle.version}"
    if not kept.is_dir():
        staging = kept.with_name(f".{kept.name}.part")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(default_bundle_path(), staging)
        staging.replace(kept)
    ModelBundle.load(kept)  # the copy is whole
    with Session(engine) as s, s.begin():
        _lock(s)
        # another retraining round may have registered it since the look above
        if s.execute(select(ModelVersion.id).where(ModelVersion.status == "current")).first() is None:
            row = s.execute(select(ModelVersion).where(ModelVersion.version == bundle.version)).scalar()
            if row is None:
                row = ModelVersion(version=bundle.version, path=str(kept.resolve()), status="current",
                                   metrics={"source": "shipped default model",
                                            CARD_DIGEST_KEY: card_digest(kept)}, device_uid=bundle.device_uid)
                s.add(row)
            row.status, row.promoted_at = "current", utcnow()
    return current(engine) or {}


def promote(engine: Engine, version: str, *, expected_current: str | None = None) -> dict[str, Any]:
    """Make ``version`` current and retire the previous current one.

    ``expected_current`` (a retraining round passes the version its candidate was compared with) makes the
    change conditional: :class:`CurrentChanged` when another version is current by then, in the same
    transaction as the change. ``LookupError`` for an unknown version, ``ValueError`` when it is current
    already or its bundle no longer loads.
    """
    with Session(engine) as s, s.begin():
        _lock(s)
        row = s.execute(select(ModelVersion).where(ModelVersion.version == version)).scalar()
        if row is None:
            raise LookupError(f"no model version {version!r} in the registry")
        if row.status == "current":
            raise ValueError(f"model version {version} is already current")
        previous = list(s.execute(select(ModelVersion).where(ModelVersion.status == "current")).scalars())
        if expected_current is not None and [r.version for r in previous] != [expected_current]:
            now = ", ".join(r.version for r in previous) or "none"
            raise CurrentChanged(f"model version {version} was compared with {expected_current}, but the "
                                 f"current model is now {now}")
        _check_loads(row)
        for r in previous:
            r.status = "retired"
        row.status, row.promoted_at = "current", utcnow()
        out = {"promoted": version, "retired": [r.version for r in previous]}
    log.info("model promoted", extra={"action": "model_promoted", "version": version,
                                      "retired": out["retired"]})
    return out


def reject(engine: Engine, version: str, reason: str) -> dict[str, Any]:
    """Mark candidate ``version`` ``rejected``, recording ``reason`` as its decision's reason.

    ``LookupError`` for an unknown version, ``ValueError`` when it is not a candidate.
    """
    with Session(engine) as s, s.begin():
        _lock(s)
        row = s.execute(select(ModelVersion).where(ModelVersion.version == version)).scalar()
        if row is None:
            raise LookupError(f"no model version {version!r} in the registry")
        if row.status != "candidate":
            raise ValueError(f"model version {version} is {row.status}, not a candidate")
        metrics = dict(row.metrics or {})
        metrics["decision"] = {**metrics.get("decision", {}), "promote": False, "reason": reason}
        row.status, row.metrics = "rejected", metrics
        out = as_dict(row)
    log.info("model rejected", extra={"action": "model_rejected", "version": version, "reason": reason})
    return out


def rollback(engine: Engine) -> dict[str, Any]:
    """Mark the current version ``rejected`` and make the most recently promoted earlier version current.

    ``ValueError`` when there is no current version, nothing earlier to go back to, or the earlier version's
    bundle no longer loads (the registry is left as it was: the worker could not serve it and would go on
    serving the version rolled back from).
    """
    with Session(engine) as s, s.begin():
        _lock(s)
        cur = s.execute(select(ModelVersion).where(ModelVersion.status == "current")
                        .order_by(ModelVersion.promoted_at.desc(), ModelVersion.id.desc()).limit(1)).scalar()
        if cur is None:
            raise ValueError("the registry has no current model to roll back")
        prev = s.execute(select(ModelVersion).where(ModelVersion.status == "retired",
                                                    ModelVersion.promoted_at.is_not(None),
                                                    ModelVersion.id != cur.id)
                         .order_by(ModelVersion.promoted_at.desc(), ModelVersion.id.desc()).limit(1)).scalar()
        if prev is None:
            raise ValueError(f"no earlier promoted version to roll back to from {cur.version}")
        try:
            _check_loads(prev)
        except ValueError as exc:
            raise ValueError(f"cannot roll back from {cur.version}: {exc}; restore that bundle, or promote "
                             "another version") from exc
        cur.status = "rejected"
        prev.status, prev.promoted_at = "current", utcnow()
        out = {"rolled_back": cur.version, "current": prev.version}
    log.info("model rolled back", extra={"action": "model_rolled_back", **out})
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``cxr-node models`` (besides the node options)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--promote", metavar="VERSION", help="make VERSION the current model")
    g.add_argument("--rollback", action="store_true", help="go back to the previously promoted version")
    g.add_argument("--register", metavar="DIR", help="add a bundle directory as a candidate")
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace, settings: Any) -> int:
    """Entry point of ``cxr-node models``; 0 on success, 1 when the registry refuses the change."""
    from dicom_node.db import init_db, make_engine

    engine = make_engine(settings.db_url)
    init_db(engine)
    try:
        if args.promote:
            outcome: Any = promote(engine, args.promote)
        elif args.rollback:
            outcome = rollback(engine)
        elif args.register:
            outcome = register(engine, args.register)
        else:
            outcome = None
    except (LookupError, ValueError) as exc:
        sys.stderr.write(f"cxr-node models: {exc}\n")
        return 1
    finally:
        engine.dispose()
    engine = make_engine(settings.db_url)
    versions = list_versions(engine)
    engine.dispose()
    if args.json:
        sys.stdout.write(json.dumps({"outcome": outcome, "versions": versions}, indent=1, default=str) + "\n")
        return 0
    if outcome:
        sys.stdout.write(f"{outcome}\n")
    if not versions:
        sys.stdout.write("registry empty: the node serves its default model\n")
    for v in versions:
        key = v["metrics"].get("decision", {}) if isinstance(v["metrics"], dict) else {}
        sys.stdout.write(f"{v['status']:<10} {v['version']:<32} {v['created_at'] or '':<27} "
                         f"{key.get('metric', '')} {key.get('candidate', '')}  {v['path']}\n")
    return 0
