"""Retention of received instances and built outputs, and the disk watermark of the spool volume.

:func:`purge` deletes, for jobs whose results were delivered (state ``done``) or that needed no results
(``ignored``: the node's own outputs echoed back) and finished more than
``retention_days`` ago, the spooled instance and the job's output folder. It never touches a job in any other
state: a queued, running, exporting or failed job keeps its files whatever their age, so a failed job can
still be retried or re-sent. Job rows, their history and the audit trail stay in the database; each purge
adds a job event (``retention: ...``) so the admin API shows when the files went, and clears the job's
``output_dir`` so a later re-send says plainly that there is nothing left to send. Only paths inside
``storage.data_dir`` are ever deleted.

Each run also deletes the temporary files of writes a killed process left (``.tmp-*.part``, after an hour: a
write takes seconds, since an instance is received whole before it is written), and counts and logs the
instance files older than a day whose SOP Instance UID has no job. Those are never deleted: most are instances
refused after they were written (a database outage) and never sent again, but an instance acknowledged after
the database's last backup looks the same once that backup is restored, and its file is then the only copy.

:func:`free_mb` (from :mod:`dicom_node.spool`, re-exported here) and :func:`has_room` are the disk watermark
helpers: the listener refuses associations below ``storage.min_free_mb``, ``/health`` reports it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import ColumnElement, Engine, Select, or_, select
from sqlalchemy.orm import Session

from dicom_node import metrics
from dicom_node.db import Job, JobEvent, reading, utcnow
from dicom_node.spool import free_mb, safe_name

log = logging.getLogger(__name__)

__all__ = ["EVENT_PREFIX", "PURGEABLE_STATES", "PurgeReport", "files_purged", "free_mb", "has_room", "purge"]

#: Job states whose files may go: results delivered, or nothing to deliver. Never failed or in flight.
PURGEABLE_STATES: tuple[str, ...] = ("done", "ignored")
#: Prefix of the job event written when a job's files are deleted (also how a purged job is recognised).
EVENT_PREFIX = "retention:"
#: Age after which a temporary file of an interrupted write is deleted, and an instance file no job owns is
#: reported.
PART_AGE_S = 3600.0
UNOWNED_AGE_S = 86400.0
_UNOWNED_NAMED = 5  # unowned files named in the log line
_BATCH = 200


@dataclass
class PurgeReport:
    """What one retention run did."""

    cutoff: datetime
    jobs: int = 0  # jobs whose files were deleted
    spool_files: int = 0
    output_files: int = 0
    bytes_freed: int = 0
    skipped_outside: int = 0  # paths not under data_dir, left alone
    stray_files: int = 0  # temporary files of interrupted writes, deleted
    unowned_files: int = 0  # instance files older than a day without a job: reported, kept
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {"cutoff": self.cutoff.isoformat() + "Z", "jobs": self.jobs, "spool_files": self.spool_files,
                "output_files": self.output_files, "bytes_freed": self.bytes_freed,
                "skipped_outside": self.skipped_outside, "stray_files": self.stray_files,
                "unowned_files": self.unowned_files, "errors": list(self.errors)}


def has_room(path: str | os.PathLike[str], min_free_mb: int) -> bool:
    """True when more than ``min_free_mb`` MiB are free where ``path`` (or its nearest parent) lives."""
    if min_free_mb < 0:
        raise ValueError('Argument "min_free_mb" must be >= 0.')
    return free_mb(Path(path)) > min_free_mb


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root)
    except ValueError:
        return False
    return True


def _remove_file(path: Path, root: Path, report: PurgeReport) -> int:
    """Delete one file under ``root``; returns 1 when a file went."""
    if not path.exists():
        return 0
    if not _inside(path, root):
        report.skipped_outside += 1
        log.warning("retention left a path outside the data directory alone",
                    extra={"action": "retention_outside", "path": str(path)})
        return 0
    size = path.stat().st_size
    path.unlink()
    report.bytes_freed += size
    return 1


def _remove_tree(path: Path, root: Path, report: PurgeReport) -> int:
    """Delete an output folder (or file) under ``root``; returns the number of files removed."""
    if not path.exists():
        return 0
    if path.is_file():
        return _remove_file(path, root, report)
    if not _inside(path, root) or path.resolve() == root:
        report.skipped_outside += 1
        log.warning("retention left a folder outside the data directory alone",
                    extra={"action": "retention_outside", "path": str(path)})
        return 0
    files = [f for f in path.rglob("*") if f.is_file()]
    size = sum(f.stat().st_size for f in files)
    shutil.rmtree(path)
    report.bytes_freed += size
    return len(files)


def _prune_empty_parent(path: Path, stop: Path) -> None:
    """Remove the now-empty study folder of a spool file (never ``stop`` itself)."""
    parent = path.parent
    try:
        if parent.resolve() != stop.resolve() and _inside(parent, stop) and not any(parent.iterdir()):
            parent.rmdir()
    except OSError:
        log.debug("study folder not removed", exc_info=True, extra={"action": "retention_prune"})


def files_purged() -> ColumnElement[bool]:
    """SQL condition on ``Job``: retention has deleted the job's files (``purged_at`` is set)."""
    return Job.purged_at.is_not(None)


def candidates(cutoff: datetime, after_id: int) -> Select[int, str, str, str | None]:
    """The next batch of finished jobs with files left, finished before ``cutoff``, by id after ``after_id``.

    Its condition is ix_jobs_unpurged's, so the jobs are read through that index, never the purged history;
    the state (failed jobs keep their files) is read here and checked again per job, with its row locked.
    """
    return (select(Job.id, Job.state, Job.spool_path, Job.output_dir)
            .where(Job.purged_at.is_(None), Job.finished_at.is_not(None),
                   or_(Job.spool_path != "", Job.output_dir.is_not(None)),
                   Job.finished_at < cutoff, Job.id > after_id)
            .order_by(Job.id).limit(_BATCH))


def purge(engine: Engine, data_dir: str | os.PathLike[str], retention_days: int, *,
          now: datetime | None = None) -> PurgeReport:
    """Delete the files of delivered jobs that finished more than ``retention_days`` days before ``now``.

    ``retention_days = 0`` keeps everything (returns an empty report). Per job, the row is locked, its state
    checked again, the files deleted and the ``retention:`` job event committed in one transaction; a crash in
    between only means the next run finds nothing left to delete for that job and records the event then.
    """
    if not isinstance(retention_days, int) or retention_days < 0:
        raise ValueError('Argument "retention_days" must be an int >= 0.')
    now = now or utcnow()
    report = PurgeReport(cutoff=now - timedelta(days=retention_days))
    root = Path(data_dir).expanduser().resolve()
    spool_root = root / "spool"
    sweep_strays(engine, spool_root, report)
    if retention_days == 0:
        return report
    last_id = 0
    while True:
        with Session(reading(engine)) as session:
            rows = session.execute(candidates(report.cutoff, last_id)).all()
        if not rows:
            break
        for job_id, state, spool_path, output_dir in rows:
            last_id = job_id
            if state not in PURGEABLE_STATES:  # a failed job keeps its files: no transaction, no lock
                continue
            _purge_job(engine, job_id, spool_path, output_dir, root, spool_root, report)
    log.info("retention run finished", extra={"action": "retention_done", **report.as_dict()})
    return report


def sweep_strays(engine: Engine, spool_root: Path, report: PurgeReport, *,
                 now_s: float | None = None) -> None:
    """Delete the spool's temporary files older than an hour; count and log (never delete) its instance files
    older than a day whose SOP Instance UID has no job (looked up by that unique key). Files named by a hash
    (an invalid UID) are left out of both."""
    if not spool_root.is_dir():
        return
    now_s = time.time() if now_s is None else now_s
    parts: list[Path] = []
    by_uid: dict[str, Path] = {}
    for dirpath, _dirs, names in os.walk(spool_root):
        folder = Path(dirpath)
        for name in names:
            path = folder / name
            try:
                age = now_s - path.lstat().st_mtime
            except OSError:
                continue
            if name.startswith(".tmp-") and name.endswith(".part"):
                if age > PART_AGE_S:
                    parts.append(path)
            elif (folder.parent == spool_root and name.endswith(".dcm") and age > UNOWNED_AGE_S
                  and safe_name(name[:-4]) == name[:-4]):
                by_uid[name[:-4]] = path
    for path in parts:
        try:
            report.stray_files += _remove_file(path, spool_root, report)
        except OSError as exc:
            report.errors.append(f"{path.name}: {exc}")
    if report.stray_files:
        log.warning("retention deleted %d temporary file(s) that interrupted writes left in the spool",
                    report.stray_files, extra={"action": "retention_strays", "files": report.stray_files})
    uids = list(by_uid)
    unowned: list[Path] = []
    for start in range(0, len(uids), _BATCH):
        batch = uids[start:start + _BATCH]
        with Session(reading(engine)) as session:
            owned = set(session.execute(select(Job.sop_instance_uid)
                                        .where(Job.sop_instance_uid.in_(batch))).scalars())
        unowned.extend(by_uid[uid] for uid in batch if uid not in owned)
    report.unowned_files = len(unowned)
    if unowned:
        named = ", ".join(str(p.relative_to(spool_root)) for p in sorted(unowned)[:_UNOWNED_NAMED])
        log.warning("%d instance file(s) in the spool have no job (%s%s): instances refused after they were "
                    "written and never sent again, or acknowledged after the database's last backup if it "
                    "was restored; these are kept: send them again (storescu) or delete them",
                    len(unowned), named, ", ..." if len(unowned) > _UNOWNED_NAMED else "",
                    extra={"action": "retention_unowned", "files": len(unowned)})


def _purge_job(engine: Engine, job_id: int, spool_path: str | None, output_dir: str | None,
               root: Path, spool_root: Path, report: PurgeReport) -> None:
    """Delete one job's files while its row is locked, so a retry or re-send cannot start meanwhile."""
    n_spool = n_out = 0
    with Session(engine) as session, session.begin():
        job = session.get(Job, job_id, with_for_update=True)
        if job is None or job.state not in PURGEABLE_STATES:  # retried or re-sent since the batch was read
            return
        state = job.state
        try:
            if spool_path:
                n_spool = _remove_file(Path(spool_path), root, report)
            if output_dir:
                n_out = _remove_tree(Path(output_dir), root, report)
            if spool_path and n_spool:
                _prune_empty_parent(Path(spool_path), spool_root)
        except OSError as exc:
            report.errors.append(f"job {job_id}: {exc}")
            log.error("retention could not delete a job's files", exc_info=True,
                      extra={"action": "retention_failed", "job_id": job_id})
            return
        if output_dir:
            job.output_dir = None  # not a state change: the job stays done / ignored
        job.purged_at = utcnow()
        session.add(JobEvent(job_id=job_id, from_state=state, to_state=state,
                             message=f"{EVENT_PREFIX} deleted {n_spool} spooled instance file(s) and "
                                     f"{n_out} output file(s)"))
    report.jobs += 1
    report.spool_files += n_spool
    report.output_files += n_out
    if n_spool:
        metrics.RETENTION_DELETED.labels(kind="spool").inc(n_spool)
    if n_out:
        metrics.RETENTION_DELETED.labels(kind="output").inc(n_out)
    log.info("job files deleted by retention",
             extra={"action": "retention_job", "job_id": job_id, "spool_files": n_spool,
                    "output_files": n_out})
