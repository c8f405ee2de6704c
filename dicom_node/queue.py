"""The job queue: the only place where a job's state changes.

Life of a job::

    queued --claim--> processing --inference done--> exporting --sent--> done
       ^                  |  \\                         |  ^  \\
       |   retryable fail |   permanent / exhausted    |  |   exhausted
       +------------------+----------> failed <--------+--+ (export retry: stays exporting)

Claiming is atomic: ``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL, and on SQLite every
transaction starts with ``BEGIN IMMEDIATE`` (see :func:`dicom_node.db.make_engine`), so only one
writer at a time reads and updates the candidate rows. A claimed job carries a lease (owner, expiry)
that the worker extends with :meth:`JobManager.heartbeat`; :meth:`JobManager.reclaim_stalled` gives
jobs of dead workers back to the queue. Every transition is written to ``job_events`` and logged
with ``extra={"action": "job_<...>", "job_id": ...}``; no patient data is ever logged.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, event, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from dicom_node.config import WorkerSettings
from dicom_node.db import Delivery, Job, JobEvent, ModelVersion, database_clock, reading, utcnow

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 2000
_PENDING_LOGS = "cxr_node_pending_logs"


class JobState(enum.StrEnum):
    """Where a job stands."""

    QUEUED = "queued"  # waiting for a worker (possibly not before ``not_before``: backoff)
    PROCESSING = "processing"  # claimed by a worker (leased): decoding, inference, building outputs
    EXPORTING = "exporting"  # outputs built and stored; waiting for / doing delivery (no recomputation)
    DONE = "done"  # results delivered to every destination (terminal unless resent)
    FAILED = "failed"  # gave up; ``last_error`` says why (an operator may retry)
    IGNORED = "ignored"  # deliberately not processed, e.g. the node's own SR/SC sent back to it (terminal)


# Legal transitions; anything else is a bug and raises ValueError.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.PROCESSING, JobState.IGNORED}),
    JobState.PROCESSING: frozenset({JobState.QUEUED, JobState.EXPORTING, JobState.FAILED, JobState.IGNORED}),
    JobState.EXPORTING: frozenset({JobState.EXPORTING, JobState.QUEUED, JobState.DONE, JobState.FAILED}),
    JobState.DONE: frozenset({JobState.EXPORTING}),
    JobState.FAILED: frozenset({JobState.QUEUED, JobState.EXPORTING}),
    JobState.IGNORED: frozenset(),
}
LEASED_STATES = (JobState.PROCESSING, JobState.EXPORTING)


class LeaseLost(RuntimeError):
    """The worker no longer holds this job's lease (it expired and the job was reclaimed)."""


def check_transition(current: str | JobState, new: str | JobState) -> None:
    """Raise ``ValueError`` unless ``current -> new`` is a legal transition."""
    cur, nxt = JobState(current), JobState(new)
    if nxt not in TRANSITIONS[cur]:
        raise ValueError(f"illegal job transition {cur.value} -> {nxt.value}")


@dataclass(frozen=True)
class ClaimedJob:
    """A snapshot of a job handed to a worker by :meth:`JobManager.claim`."""

    id: int
    state: JobState  # PROCESSING (run the model) or EXPORTING (only deliver the stored outputs)
    attempts: int
    sop_instance_uid: str
    study_instance_uid: str
    calling_ae: str
    calling_host: str
    spool_path: str
    output_dir: str | None
    result: dict[str, Any] | None


def backoff_delay(attempts: int, settings: WorkerSettings) -> float:
    """Seconds to wait before the next try after ``attempts`` tries: base * 2^(attempts-1), capped."""
    if attempts < 1:
        raise ValueError('Argument "attempts" must be at least 1.')
    return min(settings.backoff_base_s * 2 ** min(attempts - 1, 62), settings.backoff_max_s)


def missing_file_error(spool_path: str) -> str:
    """A job's failure reason when its spooled file is gone (a resend brings it back: JobManager.restore)."""
    return f"spooled file {spool_path} is missing"


def _first_due(job: Job, now: datetime) -> datetime:
    """When a job given back untried (its worker stopped or died) is due: at once, in its place in the queue
    (claims go by due time), not behind everything received since, which made the image a crash hit wait
    for the whole backlog on top of the lease."""
    return min(job.waiting_since or now, now)


def _wait_again(job: Job, now: datetime) -> None:
    """A finished job made to wait again (an operator's retry or resend, a resend that restored its file):
    a fresh attempt budget, due now, its waiting time counted from now."""
    job.attempts = 0
    job.not_before = job.waiting_since = now
    job.finished_at = None


def _log_committed(session: Session) -> None:
    """Log the transitions of a transaction once it is committed (registered by JobManager._session)."""
    for level, args, extra in session.info.pop(_PENDING_LOGS, []):
        log.log(level, *args, extra=extra)


class JobManager:
    """All reads and writes of jobs. Thread-safe; share one per process (it holds only the engine).

    ``clock`` returns naive UTC ``datetime`` values; tests pass a controllable one. By default it is the
    database server's clock on PostgreSQL (several machines share the queue: a worker whose clock runs ahead
    must not take live workers' jobs) and this machine's on SQLite (one machine).
    """

    def __init__(self, engine: Engine, worker_settings: WorkerSettings | None = None,
                 *, clock: Callable[[], datetime] | None = None,
                 export_max_attempts: int | None = None) -> None:
        if not isinstance(engine, Engine):
            raise TypeError('Argument "engine" must be a sqlalchemy Engine.')
        if export_max_attempts is not None and export_max_attempts < 1:
            raise ValueError('Argument "export_max_attempts" must be at least 1.')
        self.engine = engine
        self.settings = worker_settings or WorkerSettings()
        self.clock = clock or (database_clock(engine) if engine.dialect.name == "postgresql" else utcnow)
        # Delivery tries before a job fails (a PACS down for maintenance must not fail jobs quickly);
        # None: the same limit as inference, worker.max_attempts.
        self.export_max_attempts = export_max_attempts or self.settings.max_attempts

    def _limit(self, state: str) -> int:
        return self.export_max_attempts if state == JobState.EXPORTING else self.settings.max_attempts

    # -- helpers -------------------------------------------------------------------------------
    def _session(self) -> Session:
        session = Session(self.engine, expire_on_commit=False)
        event.listen(session, "after_commit", _log_committed)
        return session

    def _reading(self) -> Session:
        """A session that only reads (no write lock on SQLite)."""
        return Session(reading(self.engine), expire_on_commit=False)

    def _move(self, session: Session, job: Job, new: JobState, message: str = "",
              action: str | None = None, level: int = logging.INFO) -> None:
        old = job.state
        check_transition(old, new)
        now = self.clock()
        job.state = new.value
        job.updated_at = now
        session.add(JobEvent(job_id=job.id, at=now, from_state=old, to_state=new.value,
                             message=message[:MAX_ERROR_CHARS]))
        # logged once committed (_log_committed): never a line for a change the database did not keep
        session.info.setdefault(_PENDING_LOGS, []).append(
            (level, ("job %s: %s -> %s%s", job.id, old, new.value, f" ({message})" if message else ""),
             {"action": action or f"job_{new.value}", "job_id": job.id}))

    def _owned(self, session: Session, job_id: int, worker_id: str | None) -> Job:
        job = session.get(Job, job_id, with_for_update=True)
        if job is None:
            raise KeyError(f"job {job_id} does not exist")
        if worker_id is not None and job.lease_owner != worker_id:
            raise LeaseLost(f"job {job_id} is no longer leased by {worker_id}")
        return job

    # -- producers -----------------------------------------------------------------------------
    def enqueue(self, *, sop_instance_uid: str, study_instance_uid: str, series_instance_uid: str,
                sop_class_uid: str, calling_ae: str, calling_host: str, spool_path: str,
                association_id: int | None = None) -> tuple[int, bool]:
        """Record a received instance as a queued job.

        Returns ``(job_id, created)``; the same SOP Instance UID again returns the existing job's id
        with ``created=False`` (also when two associations race). Raises on any database error, so
        the caller can answer the peer with a failure status.
        """
        for name, value in (("sop_instance_uid", sop_instance_uid), ("spool_path", spool_path)):
            if not value or not isinstance(value, str):
                raise ValueError(f'Argument "{name}" must be a non-empty string.')
        return self._insert(
            JobState.QUEUED, f"received from {calling_ae}", sop_instance_uid=sop_instance_uid,
            study_instance_uid=study_instance_uid, series_instance_uid=series_instance_uid,
            sop_class_uid=sop_class_uid, calling_ae=calling_ae, calling_host=calling_host,
            spool_path=str(spool_path), association_id=association_id)

    def uses_file(self, job_id: int, spool_path: str) -> bool:
        """Whether job ``job_id`` still needs the spooled file at ``spool_path``: it points there and
        retention has not deleted its files. A re-sent instance's new file is kept only then."""
        from dicom_node.retention import files_purged

        with self._reading() as session:
            return session.execute(select(Job.id).where(
                Job.id == job_id, Job.spool_path == spool_path, ~files_purged())).scalar() is not None

    def references(self, spool_path: str) -> bool:
        """Whether any job points at the spooled file ``spool_path``."""
        with self._reading() as session:
            return session.execute(select(Job.id).where(Job.spool_path == spool_path).limit(1)).first() \
                is not None

    def record_ignored(self, *, sop_instance_uid: str, study_instance_uid: str, series_instance_uid: str,
                       sop_class_uid: str, calling_ae: str, calling_host: str, reason: str,
                       association_id: int | None = None) -> tuple[int, bool]:
        """Record a received instance that is deliberately not processed (the node's own result sent back
        to it) as an ``ignored`` job, with no spooled file: so every received instance has its row.

        Returns ``(job_id, created)`` as :meth:`enqueue` does; raises on any database error.
        """
        if not sop_instance_uid or not isinstance(sop_instance_uid, str):
            raise ValueError('Argument "sop_instance_uid" must be a non-empty string.')
        return self._insert(
            JobState.IGNORED, f"received from {calling_ae}, not processed: {reason}",
            sop_instance_uid=sop_instance_uid, study_instance_uid=study_instance_uid,
            series_instance_uid=series_instance_uid, sop_class_uid=sop_class_uid, calling_ae=calling_ae,
            calling_host=calling_host, spool_path="", association_id=association_id, reason=reason)

    def _insert(self, state: JobState, message: str, *, sop_instance_uid: str, study_instance_uid: str,
                series_instance_uid: str, sop_class_uid: str, calling_ae: str, calling_host: str,
                spool_path: str, association_id: int | None, reason: str | None = None) -> tuple[int, bool]:
        """Insert a job in ``state`` unless its SOP Instance UID has one already (also when two associations
        race); ``(job_id, created)``."""
        now = self.clock()
        values = dict(
            sop_instance_uid=sop_instance_uid, study_instance_uid=study_instance_uid or "",
            series_instance_uid=series_instance_uid or "", sop_class_uid=sop_class_uid or "",
            calling_ae=calling_ae or "", calling_host=calling_host or "", spool_path=spool_path,
            state=state.value, attempts=0, not_before=now, created_at=now, updated_at=now, waiting_since=now,
            association_id=association_id)
        if state is JobState.IGNORED:
            values.update(finished_at=now, last_error=(reason or "")[:MAX_ERROR_CHARS])
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        stmt = (dialect.insert(Job).values(**values)
                .on_conflict_do_nothing(index_elements=["sop_instance_uid"]).returning(Job.id))
        with self._session() as session, session.begin():
            job_id = session.execute(stmt).scalar()
            if job_id is None:
                existing = session.execute(
                    select(Job.id).where(Job.sop_instance_uid == sop_instance_uid)).scalar_one()
                log.info("job %s: duplicate instance received again, not queued twice", existing,
                         extra={"action": "job_duplicate", "job_id": existing})
                return existing, False
            session.add(JobEvent(job_id=job_id, at=now, from_state=None, to_state=state.value,
                                 message=message[:MAX_ERROR_CHARS]))
        log.info("job %s: %s", job_id, state.value, extra={"action": f"job_{state.value}", "job_id": job_id})
        return job_id, True

    # -- workers -------------------------------------------------------------------------------
    def claim(self, worker_id: str, limit: int = 1, *, delivery_only: bool = False) -> list[ClaimedJob]:
        """Atomically lease up to ``limit`` due jobs to ``worker_id``, oldest first.

        Queued jobs become ``processing``; unleased ``exporting`` jobs stay ``exporting`` (only the
        delivery is retried). Each claim counts as an attempt. ``delivery_only``: only ``exporting`` jobs
        (a worker whose disk is too full to store new results can still deliver the stored ones).
        """
        if not worker_id:
            raise ValueError('Argument "worker_id" must be a non-empty string.')
        if limit < 1:
            raise ValueError('Argument "limit" must be at least 1.')
        now = self.clock()
        due = (select(Job)
               .where(Job.state.in_([JobState.EXPORTING.value] if delivery_only
                                    else [JobState.QUEUED.value, JobState.EXPORTING.value]),
                      Job.lease_owner.is_(None),
                      (Job.not_before.is_(None)) | (Job.not_before <= now))
               .order_by(Job.not_before, Job.id).limit(limit)
               .with_for_update(skip_locked=True))
        out: list[ClaimedJob] = []
        with self._session() as session, session.begin():
            for job in session.execute(due).scalars().all():
                job.attempts += 1
                job.lease_owner = worker_id
                job.lease_expires_at = now + timedelta(seconds=self.settings.lease_s)
                if job.state == JobState.QUEUED:
                    self._move(session, job, JobState.PROCESSING, f"claimed by {worker_id}, attempt "
                               f"{job.attempts}", action="job_claimed")
                else:
                    self._move(session, job, JobState.EXPORTING, f"delivery claimed by {worker_id}, "
                               f"attempt {job.attempts}", action="job_export_claimed")
                out.append(ClaimedJob(
                    id=job.id, state=JobState(job.state), attempts=job.attempts,
                    sop_instance_uid=job.sop_instance_uid, study_instance_uid=job.study_instance_uid,
                    calling_ae=job.calling_ae, calling_host=job.calling_host, spool_path=job.spool_path,
                    output_dir=job.output_dir, result=job.result))
        return out

    def heartbeat(self, worker_id: str, job_ids: Iterable[int]) -> list[int]:
        """Extend the leases ``worker_id`` holds on ``job_ids``; returns the ids still held."""
        ids = list(job_ids)
        if not ids:
            return []
        now = self.clock()
        with self._session() as session, session.begin():
            rows = session.execute(
                update(Job).where(Job.id.in_(ids), Job.lease_owner == worker_id)
                .values(lease_expires_at=now + timedelta(seconds=self.settings.lease_s), updated_at=now)
                .returning(Job.id)).scalars().all()
        lost = set(ids) - set(rows)
        if lost:  # only jobs another worker holds now: a job this one finished or gave back is not lost
            with self._reading() as session:
                taken = session.execute(select(Job.id, Job.lease_owner).where(
                    Job.id.in_(lost), Job.lease_owner.is_not(None))).all()
            for job_id, owner in taken:
                log.warning("job %s: lease lost by %s (now held by %s)", job_id, worker_id, owner,
                            extra={"action": "job_lease_lost", "job_id": job_id})
        return sorted(rows)

    def finish_inference(self, job_id: int, *, result: dict[str, Any], output_dir: str,
                         sr_sop_instance_uid: str | None = None, sc_sop_instance_uid: str | None = None,
                         worker_id: str | None = None) -> None:
        """Store the model's result and where the built outputs lie; ``processing -> exporting``.

        The lease is kept so the same worker can deliver at once; the delivery gets a fresh attempt count.
        """
        with self._session() as session, session.begin():
            job = self._owned(session, job_id, worker_id)
            job.result = dict(result)
            job.output_dir = str(output_dir)
            job.sr_sop_instance_uid = sr_sop_instance_uid
            job.sc_sop_instance_uid = sc_sop_instance_uid
            job.attempts = 0 if job.lease_owner is None else 1
            self._move(session, job, JobState.EXPORTING,
                       f"finding {result.get('finding')}, outputs stored", action="job_inferred")

    def record_delivery(self, job_id: int, destination: str, status: str, error: str | None = None) -> None:
        """Audit one delivery attempt (``status`` is ``sent`` or ``failed``)."""
        if status not in ("sent", "failed"):
            raise ValueError('Argument "status" must be "sent" or "failed".')
        with self._session() as session, session.begin():
            session.add(Delivery(job_id=job_id, destination=destination, status=status,
                                 error=(error or None) and error[:MAX_ERROR_CHARS], at=self.clock()))

    def delivered_to(self, job_id: int) -> set[str]:
        """Destinations that already accepted this job's results (skipped when a delivery is retried).

        Deliveries from before an operator's resend of a done job do not count: a resend sends again.
        """
        with self._reading() as session:
            resent_at = session.execute(select(func.max(JobEvent.at)).where(
                JobEvent.job_id == job_id, JobEvent.from_state == JobState.DONE.value,
                JobEvent.to_state == JobState.EXPORTING.value)).scalar()
            stmt = select(Delivery.destination).where(Delivery.job_id == job_id, Delivery.status == "sent")
            if resent_at is not None:
                stmt = stmt.where(Delivery.at >= resent_at)
            return set(session.execute(stmt).scalars())

    def complete(self, job_id: int, *, worker_id: str | None = None, message: str = "") -> float:
        """``exporting -> done``: results delivered everywhere; the lease is released. Returns the seconds
        from reception (or from an operator's retry or resend) to now, automatic retries included."""
        now = self.clock()
        with self._session() as session, session.begin():
            job = self._owned(session, job_id, worker_id)
            job.lease_owner = job.lease_expires_at = None
            job.finished_at = now
            job.last_error = None
            self._move(session, job, JobState.DONE, message or "results delivered", action="job_done")
            return max((now - (job.waiting_since or job.created_at)).total_seconds(), 0.0)

    def ignore(self, job_id: int, reason: str, *, worker_id: str | None = None) -> None:
        """Mark a job as deliberately not processed (terminal), e.g. the node's own output."""
        with self._session() as session, session.begin():
            job = self._owned(session, job_id, worker_id)
            job.lease_owner = job.lease_expires_at = None
            job.finished_at = self.clock()
            job.last_error = reason
            self._move(session, job, JobState.IGNORED, reason, action="job_ignored")

    def fail(self, job_id: int, error: str, retryable: bool, *, worker_id: str | None = None) -> JobState:
        """Record a failure of the current attempt and release the lease.

        Retryable and attempts left: back to ``queued`` (or, during delivery, ``exporting``) not before
        now + backoff. Otherwise ``failed`` with ``error`` as the reason. Returns the new state.
        """
        error = (error or "unknown error")[:MAX_ERROR_CHARS]
        now = self.clock()
        with self._session() as session, session.begin():
            job = self._owned(session, job_id, worker_id)
            state = JobState(job.state)
            job.lease_owner = job.lease_expires_at = None
            job.last_error = error
            if retryable and job.attempts < self._limit(state):
                delay = backoff_delay(max(job.attempts, 1), self.settings)
                job.not_before = now + timedelta(seconds=delay)
                new = JobState.EXPORTING if state == JobState.EXPORTING else JobState.QUEUED
                self._move(session, job, new, f"attempt {job.attempts} failed, retry in {delay:.0f} s: "
                           f"{error}", action="job_retry_scheduled", level=logging.WARNING)
            else:
                job.finished_at = now
                new = JobState.FAILED
                why = error if not retryable else f"gave up after {job.attempts} attempts: {error}"
                job.last_error = why[:MAX_ERROR_CHARS]
                self._move(session, job, new, why, action="job_failed", level=logging.ERROR)
            return new

    def requeue_for_inference(self, job_id: int, reason: str, *, worker_id: str | None = None) -> None:
        """``exporting -> queued``: the stored outputs are gone, so they must be computed again."""
        with self._session() as session, session.begin():
            job = self._owned(session, job_id, worker_id)
            job.lease_owner = job.lease_expires_at = None
            job.not_before = self.clock()
            job.attempts = 0
            job.output_dir = None
            self._move(session, job, JobState.QUEUED, reason, action="job_requeued", level=logging.WARNING)

    def release(self, job_id: int, *, worker_id: str | None = None,
                why: str = "released by a stopping worker", delay_s: float = 0.0) -> None:
        """Give a claimed job back untouched (a stopping worker, an interrupted batch, a full disk): no
        attempt counted; due again after ``delay_s`` seconds."""
        with self._session() as session, session.begin():
            job = self._owned(session, job_id, worker_id)
            state = JobState(job.state)
            job.lease_owner = job.lease_expires_at = None
            job.attempts = max(job.attempts - 1, 0)
            now = self.clock()
            job.not_before = now + timedelta(seconds=delay_s) if delay_s > 0 else _first_due(job, now)
            new = JobState.QUEUED if state == JobState.PROCESSING else state
            self._move(session, job, new, why, action="job_released")

    def restore(self, job_id: int, spool_path: str) -> tuple[JobState | None, bool]:
        """A resend wrote job ``job_id``'s spooled file ``spool_path`` again: a job that failed because that
        file was missing (lost from the spool, e.g. restored from an older backup) is queued again with a
        fresh attempt budget. Returns the job's state afterwards (None when there is no such job) and whether
        this call queued it again."""
        now = self.clock()
        with self._session() as session, session.begin():
            job = session.get(Job, job_id, with_for_update=True)
            if job is None:
                return None, False
            if (job.state == JobState.FAILED and job.spool_path == spool_path and job.purged_at is None
                    and job.last_error == missing_file_error(spool_path)):
                _wait_again(job, now)
                self._move(session, job, JobState.QUEUED, "instance received again: its spooled file is back",
                           action="job_restored", level=logging.WARNING)
                return JobState.QUEUED, True
            return JobState(job.state), False

    def reclaim_stalled(self) -> int:
        """Give back jobs whose lease expired (their worker died); returns how many.

        A job that used up ``max_attempts`` this way is failed, so an instance that crashes every
        worker cannot stop the queue.
        """
        now = self.clock()
        stalled = (select(Job).where(Job.state.in_([s.value for s in LEASED_STATES]),
                                     Job.lease_owner.is_not(None), Job.lease_expires_at < now)
                   .order_by(Job.id).with_for_update(skip_locked=True))
        count = 0
        with self._session() as session, session.begin():
            for job in session.execute(stalled).scalars().all():
                owner = job.lease_owner
                job.lease_owner = job.lease_expires_at = None
                job.not_before = _first_due(job, now)
                if job.attempts >= self._limit(job.state):
                    job.finished_at = now
                    job.last_error = f"worker {owner} stopped responding {job.attempts} times"
                    self._move(session, job, JobState.FAILED, job.last_error, action="job_failed",
                               level=logging.ERROR)
                else:
                    new = JobState.QUEUED if job.state == JobState.PROCESSING else JobState.EXPORTING
                    self._move(session, job, new, f"lease of {owner} expired", action="job_reclaimed",
                               level=logging.WARNING)
                count += 1
        return count

    # -- operators -----------------------------------------------------------------------------
    def retry(self, job_id: int, *, from_states: tuple[JobState, ...] = (JobState.FAILED, JobState.DONE)
              ) -> JobState:
        """Operator retry of a failed job (or resend of a done one) with a fresh attempt budget.

        Jobs whose outputs were stored only need delivery (``exporting``); others run again from the
        start (``queued``). Returns the new state; raises ``ValueError`` when the job is not in one of
        ``from_states``, checked under the row's lock: a worker may have claimed it since the caller looked
        (a second click on Retry), and a retry must never take a job from under its worker.
        """
        now = self.clock()
        with self._session() as session, session.begin():
            job = self._owned(session, job_id, None)
            new = JobState.EXPORTING if job.output_dir else JobState.QUEUED
            if job.state == JobState.DONE and new != JobState.EXPORTING:
                raise ValueError(f"job {job_id} has no stored outputs to resend")
            check_transition(job.state, new)
            if job.state not in from_states:
                raise ValueError(f"job {job_id} is {JobState(job.state).value}; only "
                                 f"{' or '.join(s.value for s in from_states)} jobs can be retried")
            _wait_again(job, now)
            self._move(session, job, new, "retried by operator", action="job_retried")
            return new

    # -- reporting -----------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """Number of jobs per state (every state present, zero included)."""
        out = {s.value: 0 for s in JobState}
        with self._reading() as session:
            for state, n in session.execute(select(Job.state, func.count()).group_by(Job.state)):
                out[state] = int(n)
        return out

    def oldest_waiting(self) -> dict[str, Any] | None:
        """The oldest job not yet finished (queued, processing or exporting), or None."""
        with self._reading() as session:
            job = session.execute(
                select(Job).where(Job.state.in_([JobState.QUEUED.value, *[s.value for s in LEASED_STATES]]))
                .order_by(func.coalesce(Job.waiting_since, Job.created_at), Job.id).limit(1)).scalar()
            if job is None:
                return None
            since = job.waiting_since or job.created_at
            return {"job_id": job.id, "state": job.state, "created_at": job.created_at,
                    "waiting_since": since, "age_s": max((self.clock() - since).total_seconds(), 0.0),
                    "attempts": job.attempts, "last_error": job.last_error}

    def recent_failures(self, limit: int = 10) -> list[dict[str, Any]]:
        """The newest failed jobs with their reasons."""
        with self._reading() as session:
            jobs = session.execute(select(Job).where(Job.state == JobState.FAILED.value)
                                   .order_by(Job.updated_at.desc(), Job.id.desc()).limit(limit)).scalars()
            return [{"job_id": j.id, "sop_instance_uid": j.sop_instance_uid, "calling_ae": j.calling_ae,
                     "failed_at": j.finished_at or j.updated_at, "attempts": j.attempts,
                     "reason": j.last_error or ""} for j in jobs]

    def history(self, job_id: int) -> list[dict[str, Any]]:
        """The job's transitions, oldest first."""
        with self._reading() as session:
            events: Sequence[JobEvent] = session.execute(
                select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)).scalars().all()
            return [{"at": e.at, "from_state": e.from_state, "to_state": e.to_state, "message": e.message}
                    for e in events]

    def current_model(self) -> ModelVersion | None:
        """The registry's current model version, or None when the registry is empty."""
        with self._reading() as session:
            return session.execute(select(ModelVersion).where(ModelVersion.status == "current")
                                   .order_by(ModelVersion.promoted_at.desc(), ModelVersion.id.desc())
                                   .limit(1)).scalar()
