"""Periodic jobs of ``cxr-node serve``: retention and, when configured, retraining on local data.

Only ``serve`` starts the scheduler (never ``cxr-node worker``), so on a scaled-out installation each job runs
once per installation, on the listener's machine. Both jobs run in a background thread, never two at a time
(``max_instances=1``), and missed runs (the node was down) are coalesced into one run at start-up when they
are less than an hour late.
"""

from __future__ import annotations

import logging
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from sqlalchemy import Engine

from dicom_node.config import ConfigError, Settings
from dicom_node.retention import purge

log = logging.getLogger(__name__)

RETENTION_JOB_ID = "retention"
RETRAIN_JOB_ID = "retrain"
_MISFIRE_GRACE_S = 3600


def cron_trigger(expression: str, key: str) -> CronTrigger:
    """A trigger from a five-field crontab line; a bad line raises :class:`ConfigError` naming ``key``."""
    try:
        return CronTrigger.from_crontab(expression)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"config key '{key}': invalid crontab expression {expression!r}: {exc}") from None


def run_retention(settings: Settings, engine: Engine) -> dict[str, Any]:
    """One retention run with the configured age; returns the report as a dict (also logged)."""
    report = purge(engine, settings.storage.data_dir, settings.storage.retention_days)
    return report.as_dict()


def run_retrain(settings: Settings, engine: Engine | None = None) -> dict[str, Any]:
    """One scheduled retraining (``training.retrain.retrain_once``); its outcome is logged, errors too."""
    from training.retrain import retrain_once  # torch and the training stack load only when due

    log.info("scheduled retraining started", extra={"action": "retrain_started"})
    outcome = retrain_once(settings, engine=engine)
    log.info("scheduled retraining finished", extra={"action": "retrain_finished", "outcome": outcome})
    return outcome


def _guarded(name: str, func: Any, *args: Any) -> None:
    """Run a scheduled job so that a failure is logged with its traceback and the scheduler keeps going."""
    try:
        func(*args)
    except Exception:  # a failed run must not stop later runs; the traceback goes to the log
        log.exception("scheduled job %s failed", name, extra={"action": f"{name}_failed"})


def start_scheduler(settings: Settings, engine: Engine) -> BackgroundScheduler:
    """Start the background scheduler with the retention and (if ``retrain.cron`` is set) retrain jobs.

    Retention is scheduled by ``storage.retention_cron`` unless ``storage.retention_days`` is 0 (keep
    everything). Returns the running scheduler; stop it with ``scheduler.shutdown(wait=False)``.

    Raises
    ------
    ConfigError
        A crontab expression is invalid (the message names the key).
    """
    if not isinstance(settings, Settings):
        raise TypeError('Argument "settings" must be a dicom_node.config.Settings.')
    scheduler = BackgroundScheduler(timezone=None, daemon=True)
    common = {"max_instances": 1, "coalesce": True, "misfire_grace_time": _MISFIRE_GRACE_S,
              "replace_existing": True}
    if settings.storage.retention_days > 0:
        trigger = cron_trigger(settings.storage.retention_cron, "storage.retention_cron")
        scheduler.add_job(_guarded, trigger, args=[RETENTION_JOB_ID, run_retention, settings, engine],
                          id=RETENTION_JOB_ID, name="delete delivered instances and outputs", **common)
    if settings.retrain.cron.strip():
        trigger = cron_trigger(settings.retrain.cron, "retrain.cron")
        scheduler.add_job(_guarded, trigger, args=[RETRAIN_JOB_ID, run_retrain, settings, engine],
                          id=RETRAIN_JOB_ID, name="retrain on local labels", **common)
    scheduler.start()
    for job in scheduler.get_jobs():
        log.info("scheduled %s, next run %s", job.id, job.next_run_time,
                 extra={"action": "scheduler_job", "job": job.id})
    return scheduler
