"""Periodic jobs of ``cxr-node serve``: retention and, when configured, retraining on local data.

Only ``serve`` starts the scheduler (never ``cxr-node worker``), so on a scaled-out installation each job runs
once per installation, on the listener's machine. Both jobs run in a background thread, never two at a time
(a job due while the other runs waits for it; ``max_instances=1`` for each), and missed runs (the node was
down) are coalesced into one run at start-up when they are less than an hour late. Crontab lines are read as
cron reads them: day of week 0 or 7 is Sunday. A run in progress never holds up the node's exit (its thread
is a daemon): both are safe to cut short (retention commits job by job; a retraining candidate is registered
at its end only). Both take the installation's retraining lock (``training.sides.round_lock``: per data
folder, and per database on PostgreSQL), so two ``serve`` processes with the same ``retrain.cron``, or a round
started by hand meanwhile, do not train at once (the later one is skipped, saying so), and retention never
deletes the files a round is reading, wherever the round was started (it is postponed to its next run).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from apscheduler.executors.base import BaseExecutor, run_job
from apscheduler.job import Job as SchedulerJob
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from sqlalchemy import Engine

from dicom_node.config import ConfigError, Settings
from dicom_node.retention import purge

log = logging.getLogger(__name__)

RETENTION_JOB_ID = "retention"
RETRAIN_JOB_ID = "retrain"
_MISFIRE_GRACE_S = 3600


_DAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def _day(token: str) -> int:
    token = token.strip().lower()
    if token in _DAY_NAMES:
        return _DAY_NAMES.index(token)
    if not token.isdigit() or int(token) > 7:
        raise ValueError(f"day of week {token!r} is not 0-7 or sun-sat")
    return int(token)


def crontab_days(field: str) -> str:
    """Crontab's day-of-week field (0 and 7 are Sunday, 1 Monday; names, lists, ranges and steps) as the
    comma list of day names APScheduler reads the same way: its own numbers count from Monday = 0, so
    "0 2 * * 0" would otherwise run on Mondays."""
    if field == "*":
        return field
    days: set[int] = set()
    for part in field.split(","):
        span, _, step_text = part.partition("/")
        step = int(step_text) if step_text.isdigit() and int(step_text) > 0 else None
        if step_text and step is None:
            raise ValueError(f"day-of-week step {step_text!r} is not a positive number")
        if span == "*":
            first, last = 0, 6
        elif "-" in span:
            first, last = (_day(t) for t in span.split("-", 1))
        else:
            first = _day(span)
            last = 7 if step else first
        if last < first:
            raise ValueError(f"day-of-week range {span!r} runs backwards")
        days.update(d % 7 for d in range(first, last + 1, step or 1))
    return ",".join(_DAY_NAMES[d] for d in sorted(days))


def cron_trigger(expression: str, key: str) -> CronTrigger:
    """A trigger from a five-field crontab line, read as cron reads it (day of week 0 or 7 = Sunday); a bad
    line raises :class:`ConfigError` naming ``key``."""
    try:
        fields = expression.split()
        if len(fields) == 5:
            fields[4] = crontab_days(fields[4])
        return CronTrigger.from_crontab(" ".join(fields))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"config key '{key}': invalid crontab expression {expression!r}: {exc}") from None


def run_retention(settings: Settings, engine: Engine) -> dict[str, Any]:
    """One retention run with the configured age; returns the report as a dict (also logged). Postponed to
    its next time while a retraining round runs (also one started by hand, or on another machine of a
    PostgreSQL queue): it must not delete the files the round is reading."""
    from training.sides import RoundBusy, round_lock

    try:
        with round_lock(settings, engine, holder="retention run"):
            report = purge(engine, settings.storage.data_dir, settings.storage.retention_days)
    except RoundBusy as exc:
        log.warning("retention postponed to its next run: %s", exc, extra={"action": "retention_postponed"})
        return {"postponed": str(exc)}
    return report.as_dict()


def run_retrain(settings: Settings, engine: Engine | None = None) -> dict[str, Any]:
    """One scheduled retraining (``training.retrain.retrain_once``); its outcome is logged, errors too."""
    from training.retrain import retrain_once  # torch and the training stack load only when due

    log.info("scheduled retraining started", extra={"action": "retrain_started"})
    outcome = retrain_once(settings, engine=engine)
    log.info("scheduled retraining finished", extra={"action": "retrain_finished", "outcome": outcome})
    return outcome


_ONE_AT_A_TIME = threading.Lock()  # retention must not delete the files a retraining run is reading


def _guarded(name: str, func: Any, *args: Any) -> None:
    """Run a scheduled job, never beside another one (a job due while another runs waits for it), so that a
    failure is logged with its traceback and the scheduler keeps going."""
    with _ONE_AT_A_TIME:
        try:
            func(*args)
        except Exception:  # a failed run must not stop later runs; the traceback goes to the log
            log.exception("scheduled job %s failed", name, extra={"action": f"{name}_failed"})


class DaemonThreadExecutor(BaseExecutor):
    """Runs each job in a daemon thread of its own. APScheduler's thread pool is joined when the interpreter
    exits, so a stop during a retraining run waited for it until systemd or Docker killed the process."""

    def _do_submit_job(self, job: SchedulerJob, run_times: list[Any]) -> None:
        def target() -> None:
            try:
                events = run_job(job, job._jobstore_alias, run_times, self._logger.name)
            except BaseException as exc:
                self._run_job_error(job.id, exc, exc.__traceback__)
            else:
                self._run_job_success(job.id, events)

        threading.Thread(target=target, name=f"cxr-{job.id}", daemon=True).start()


def running() -> bool:
    """Whether a scheduled run (retention or retraining) is in progress in this process."""
    return _ONE_AT_A_TIME.locked()


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
    scheduler = BackgroundScheduler(timezone=None, daemon=True, executors={"default": DaemonThreadExecutor()})
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
