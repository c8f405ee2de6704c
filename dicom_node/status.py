"""``cxr-node status [--json]``: queue counts, oldest waiting job, recent failures, model in use.

Reads the database and the model card (``model.json``) only: it does not import torch, so it
answers in well under a second on a busy node. Exit status 0, or 1 when the database cannot be
read (missing, unreachable, not initialised), with a message saying which.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from dicom_node.config import Settings
from dicom_node.db import make_engine, safe_url, within
from dicom_node.queue import JobManager, JobState

CARD_FILE = "model.json"
EXIT_OK = 0
EXIT_UNAVAILABLE = 1
STATUS_TIMEOUT_S = 30.0  # a database that does not answer by then is reported unavailable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``cxr-node status`` beyond the node options."""
    parser.add_argument("--json", action="store_true", help="print one JSON object (for scripts)")
    parser.add_argument("--failures", type=int, default=10, metavar="N",
                        help="how many recent failures to list (default 10)")


def default_bundle_dir() -> Path | None:
    """``inference/default_model`` of this installation, located without importing the package."""
    spec = importlib.util.find_spec("inference")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "default_model"


def read_card(path: Path | None) -> dict[str, Any]:
    """Name, version and device UID from a bundle's ``model.json``; ``error`` says why when unreadable."""
    info: dict[str, Any] = {"path": str(path) if path else None, "name": None, "version": None,
                            "device_uid": None}
    if path is None:
        info["error"] = "no model bundle found"
        return info
    try:
        card = json.loads((Path(path) / CARD_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        info["error"] = f"{Path(path) / CARD_FILE} does not exist"
        return info
    except (OSError, ValueError) as exc:
        info["error"] = f"{Path(path) / CARD_FILE} cannot be read: {exc}"
        return info
    if not isinstance(card, dict):
        info["error"] = f"{Path(path) / CARD_FILE} does not hold a JSON object"
        return info
    for key in ("name", "version", "device_uid"):
        info[key] = card.get(key)
    return info


def model_in_use(settings: Settings, jm: JobManager | None) -> dict[str, Any]:
    """The model a worker of this configuration serves (same rule as :class:`dicom_node.worker.Worker`).

    ``source`` is ``config`` (model.path), ``registry`` (the current ModelVersion) or ``default``.
    """
    if settings.model.path is not None:
        return {"source": "config", **read_card(settings.model.path)}
    current = jm.current_model() if jm is not None else None
    if current is not None:
        info = {"source": "registry", **read_card(Path(current.path))}
        info["version"] = current.version
        info["promoted_at"] = current.promoted_at
        return info
    return {"source": "default", **read_card(default_bundle_dir())}


def collect(settings: Settings, failures: int = 10) -> dict[str, Any]:
    """Everything ``status`` shows, as plain data.

    Raises
    ------
    LookupError
        The database does not exist yet or has no schema (the message says what to do).
    sqlalchemy.exc.SQLAlchemyError
        The database cannot be reached.
    """
    url = settings.db_url
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and not Path(parsed.database).is_file():
        raise LookupError(f"no database at {parsed.database}: the node has not run with this configuration "
                          "yet (start `cxr-node serve`)")
    engine = make_engine(url)
    try:
        if not inspect(engine).has_table("jobs"):
            raise LookupError(f"database {safe_url(url)} has no cxr-node schema "
                              "(start `cxr-node serve` once)")
        jm = JobManager(engine, settings.worker)
        return {
            "database": safe_url(url),
            "counts": jm.counts(),
            "oldest_waiting": jm.oldest_waiting(),
            "recent_failures": jm.recent_failures(failures),
            "model": model_in_use(settings, jm),
        }
    finally:
        engine.dispose()


def age_text(seconds: float) -> str:
    """``seconds`` as a person reads an age: 42 s, 3 min 5 s, 2 h 10 min, 4 d 6 h."""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


def format_text(report: dict[str, Any]) -> str:
    """The human-readable form of :func:`collect`'s report."""
    counts = report["counts"]
    lines = [f"database: {report['database']}",
             "jobs:     " + "   ".join(f"{s.value} {counts.get(s.value, 0)}" for s in JobState)]
    oldest = report["oldest_waiting"]
    if oldest is None:
        lines.append("oldest waiting job: none (queue empty)")
    else:
        line = (f"oldest waiting job: {oldest['job_id']} ({oldest['state']}, waiting "
                f"{age_text(oldest['age_s'])}, attempts {oldest['attempts']})")
        if oldest["last_error"]:
            line += f": {oldest['last_error']}"
        lines.append(line)
    model = report["model"]
    if model.get("error"):
        lines.append(f"model: {model.get('version') or '?'} ({model['source']}): {model['error']}")
    else:
        lines.append(f"model: {model['name']} {model['version']} ({model['source']}) at {model['path']}")
    failures = report["recent_failures"]
    failed = report["counts"].get("failed", 0)
    lines.append(f"recent failures: {f'the newest {len(failures)} of {failed}' if failures else 'none'}")
    for f in failures:
        when = f["failed_at"].strftime("%Y-%m-%d %H:%M:%S") if isinstance(f["failed_at"], datetime) else ""
        lines.append(f"  job {f['job_id']}  {when} UTC  from {f['calling_ae']}  after {f['attempts']} "
                     f"attempt(s): {f['reason']}")
    return "\n".join(lines) + "\n"


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat() + "Z"
    return str(value)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Print the status; returns the exit status."""
    try:
        failures = max(int(getattr(args, "failures", 10)), 0)
        report = within(STATUS_TIMEOUT_S, lambda: collect(settings, failures), "status")
    except TimeoutError as exc:
        sys.stderr.write(f"cxr-node status: database {safe_url(settings.db_url)} unavailable: {exc}\n")
        return EXIT_UNAVAILABLE
    except LookupError as exc:
        sys.stderr.write(f"cxr-node status: {exc}\n")
        return EXIT_UNAVAILABLE
    except SQLAlchemyError as exc:
        sys.stderr.write(f"cxr-node status: database {safe_url(settings.db_url)} unavailable: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0]}\n")
        return EXIT_UNAVAILABLE
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps(report, default=_json_default, indent=2) + "\n")
    else:
        sys.stdout.write(format_text(report))
    return EXIT_OK
