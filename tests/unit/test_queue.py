"""The job queue's state machine, backoff, duplicates and leases (SQLite)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from dicom_node.config import WorkerSettings
from dicom_node.db import Job, JobEvent, init_db, make_engine
from dicom_node.queue import (
    TRANSITIONS,
    JobManager,
    JobState,
    LeaseLost,
    backoff_delay,
    check_transition,
)
from tests.fixtures.database import job_row

pytestmark = pytest.mark.unit


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, 12, 0, 0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def engine(sqlite_url: str) -> Iterator[Engine]:
    eng = make_engine(sqlite_url)
    init_db(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def settings() -> WorkerSettings:
    return WorkerSettings(lease_s=60, max_attempts=3, backoff_base_s=5, backoff_max_s=12)


@pytest.fixture
def jm(engine: Engine, settings: WorkerSettings, clock: Clock) -> JobManager:
    return JobManager(engine, settings, clock=clock)


def enqueue(jm: JobManager, uid: str = "1.2.826.0.1.3680043.8.498.1") -> tuple[int, bool]:
    return jm.enqueue(sop_instance_uid=uid, study_instance_uid="1.2.3", series_instance_uid="1.2.3.4",
                      sop_class_uid="1.2.840.10008.5.1.4.1.1.1", calling_ae="MODALITY",
                      calling_host="127.0.0.1", spool_path=f"/spool/{uid}.dcm")


def test_sqlite_is_durable_and_schema_matches_models(engine: Engine) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from dicom_node.db import Base

    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], f"models and migrations differ: {diff}"
    init_db(engine)  # idempotent


def test_a_reader_never_holds_up_a_writer_on_sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    settings: WorkerSettings) -> None:
    """Status pages, metrics scrapes, lists and retention's scan only read: on SQLite their transactions take
    no write lock (every transaction took one), so a C-STORE's enqueue goes on while one is open; here the
    wait for the lock is cut to half a second, so a held lock fails the enqueue."""
    import dicom_node.db as db_module
    from dicom_node.admin_data import list_jobs
    from dicom_node.db import reading

    monkeypatch.setattr(db_module, "SQLITE_BUSY_TIMEOUT_MS", 500)
    engine = make_engine(f"sqlite:///{tmp_path / 'queue.db'}")
    init_db(engine)
    jm = JobManager(engine, settings)
    enqueue(jm, "1.2.1")
    with Session(reading(engine)) as reader:  # a long read, its transaction open
        assert reader.execute(select(Job.id)).scalars().all() == [1] and reader.in_transaction()
        assert enqueue(jm, "1.2.2") == (2, True)
        assert jm.counts()["queued"] == 2
        assert list_jobs(engine, state=None, limit=10, offset=0)["total"] == 2
    with Session(engine) as writer, writer.begin():  # a writer still locks out the next writer at once
        writer.execute(select(Job.id)).all()
        with pytest.raises(OperationalError, match="locked"):
            enqueue(jm, "1.2.3")
    engine.dispose()


def test_make_engine_rejects_unknown_backends() -> None:
    with pytest.raises(ValueError, match="url"):
        make_engine("mysql://x@localhost/db")
    with pytest.raises(ValueError, match="url"):
        make_engine("")


def test_duplicate_sop_instance_uid_returns_the_same_job(jm: JobManager) -> None:
    first = enqueue(jm)
    second = enqueue(jm)
    other = enqueue(jm, "1.2.826.0.1.3680043.8.498.2")
    assert first[1] is True and second == (first[0], False)
    assert other[1] is True and other[0] != first[0]
    assert jm.counts()["queued"] == 2


def test_enqueue_validates_arguments(jm: JobManager) -> None:
    with pytest.raises(ValueError, match="sop_instance_uid"):
        enqueue(jm, "")


def test_transition_table_rejects_illegal_moves() -> None:
    check_transition("queued", "processing")
    with pytest.raises(ValueError, match="queued -> done"):
        check_transition("queued", "done")
    with pytest.raises(ValueError, match="illegal job transition ignored -> queued"):
        check_transition("ignored", "queued")
    assert all(state in TRANSITIONS for state in JobState)


def test_complete_on_a_queued_job_is_illegal(jm: JobManager) -> None:
    job_id, _ = enqueue(jm)
    with pytest.raises(ValueError, match="illegal job transition queued -> done"):
        jm.complete(job_id)
    assert jm.counts()["queued"] == 1


def test_full_life_of_a_job_is_logged_with_its_id(jm: JobManager, engine: Engine,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dicom_node.queue")
    job_id, _ = enqueue(jm)
    [claimed] = jm.claim("w1", limit=5)
    assert claimed.id == job_id and claimed.state is JobState.PROCESSING and claimed.attempts == 1
    assert jm.claim("w2", limit=5) == []  # leased: nobody else gets it
    jm.finish_inference(job_id, result={"finding": "negative", "probability": 0.1}, output_dir="/out",
                        sr_sop_instance_uid="1.2.3.9", worker_id="w1")
    jm.complete(job_id, worker_id="w1")
    job = job_row(engine, job_id)
    assert job.state == "done" and job.lease_owner is None and job.finished_at is not None
    assert job.result == {"finding": "negative", "probability": 0.1}
    assert [h["to_state"] for h in jm.history(job_id)] == ["queued", "processing", "exporting", "done"]
    actions = [(r.action, r.job_id) for r in caplog.records if hasattr(r, "action")]
    assert actions == [("job_queued", job_id), ("job_claimed", job_id), ("job_inferred", job_id),
                       ("job_done", job_id)]


def test_claim_is_oldest_first_and_limited(jm: JobManager, clock: Clock) -> None:
    ids = []
    for i in range(5):
        ids.append(enqueue(jm, f"1.2.3.{i}")[0])
        clock.advance(1)
    got = jm.claim("w1", limit=3)
    assert [j.id for j in got] == ids[:3]
    assert [j.id for j in jm.claim("w2", limit=10)] == ids[3:]
    with pytest.raises(ValueError, match="limit"):
        jm.claim("w1", limit=0)


def test_backoff_delays_double_and_are_capped(settings: WorkerSettings) -> None:
    assert [backoff_delay(n, settings) for n in (1, 2, 3, 4)] == [5, 10, 12, 12]
    with pytest.raises(ValueError, match="attempts"):
        backoff_delay(0, settings)


def test_retryable_failure_backs_off_then_fails_with_the_reason(jm: JobManager, clock: Clock,
                                                                engine: Engine) -> None:
    job_id, _ = enqueue(jm)
    for attempt, delay in ((1, 5), (2, 10)):
        [job] = jm.claim("w1")
        assert job.attempts == attempt
        assert jm.fail(job_id, "GPU out of memory", retryable=True, worker_id="w1") is JobState.QUEUED
        clock.advance(delay - 1)
        assert jm.claim("w1") == [], "claimed before its backoff elapsed"
        clock.advance(1)
    jm.claim("w1")
    assert jm.fail(job_id, "GPU out of memory", retryable=True, worker_id="w1") is JobState.FAILED
    job = job_row(engine, job_id)
    assert job.state == "failed" and job.last_error == "gave up after 3 attempts: GPU out of memory"
    [failure] = jm.recent_failures()
    assert failure["job_id"] == job_id and "GPU out of memory" in failure["reason"]


def test_permanent_failure_fails_at_once(jm: JobManager, engine: Engine) -> None:
    job_id, _ = enqueue(jm)
    jm.claim("w1")
    assert jm.fail(job_id, "pixel data cannot be decoded", retryable=False) is JobState.FAILED
    assert job_row(engine, job_id).last_error == "pixel data cannot be decoded"
    assert jm.counts()["failed"] == 1


def test_export_retry_stays_in_exporting_and_keeps_the_result(jm: JobManager, clock: Clock) -> None:
    job_id, _ = enqueue(jm)
    jm.claim("w1")
    jm.finish_inference(job_id, result={"finding": "positive"}, output_dir="/out/1", worker_id="w1")
    assert jm.fail(job_id, "destination down", retryable=True, worker_id="w1") is JobState.EXPORTING
    assert jm.claim("w1") == []
    clock.advance(5)
    [job] = jm.claim("w2")
    assert job.state is JobState.EXPORTING and job.result == {"finding": "positive"}
    assert job.output_dir == "/out/1" and job.attempts == 2
    jm.record_delivery(job_id, "PACS@10.0.0.1:104", "sent")
    assert jm.delivered_to(job_id) == {"PACS@10.0.0.1:104"}
    jm.complete(job_id, worker_id="w2")
    assert jm.counts()["done"] == 1


def test_expired_lease_is_reclaimed_and_the_old_worker_loses_it(jm: JobManager, clock: Clock) -> None:
    job_id, _ = enqueue(jm)
    jm.claim("dead")
    clock.advance(30)
    assert jm.heartbeat("dead", [job_id]) == [job_id]  # lease extended to now + 60
    clock.advance(59)
    assert jm.reclaim_stalled() == 0
    clock.advance(2)
    assert jm.reclaim_stalled() == 1
    assert jm.counts()["queued"] == 1
    [job] = jm.claim("alive")
    assert job.id == job_id and job.attempts == 2
    assert jm.heartbeat("dead", [job_id]) == []
    with pytest.raises(LeaseLost):
        jm.fail(job_id, "late", retryable=True, worker_id="dead")
    jm.finish_inference(job_id, result={"finding": "negative"}, output_dir="/o", worker_id="alive")
    jm.complete(job_id, worker_id="alive")


def test_a_job_that_kills_every_worker_ends_failed(jm: JobManager, clock: Clock, engine: Engine) -> None:
    job_id, _ = enqueue(jm)
    for _ in range(3):
        assert len(jm.claim("w")) == 1
        clock.advance(61)
        jm.reclaim_stalled()
    job = job_row(engine, job_id)
    assert job.state == "failed" and "stopped responding 3 times" in (job.last_error or "")


def test_release_returns_the_job_without_counting_an_attempt(jm: JobManager) -> None:
    job_id, _ = enqueue(jm)
    jm.claim("w1")
    jm.release(job_id, worker_id="w1")
    [job] = jm.claim("w2")
    assert job.attempts == 1


def test_operator_retry_and_resend(jm: JobManager, clock: Clock) -> None:
    a, _ = enqueue(jm, "1.1")
    b, _ = enqueue(jm, "1.2")
    jm.claim("w", limit=2)
    jm.fail(a, "undecodable", retryable=False)
    jm.finish_inference(b, result={"finding": "negative"}, output_dir="/o/b", worker_id="w")
    jm.complete(b, worker_id="w")
    jm.record_delivery(b, "PACS@h:104", "sent")
    assert jm.delivered_to(b) == {"PACS@h:104"}
    assert jm.retry(a) is JobState.QUEUED
    clock.advance(1)
    assert jm.retry(b) is JobState.EXPORTING  # resend: outputs are stored, no recomputation
    assert jm.delivered_to(b) == set(), "a resend must send again"
    with pytest.raises(ValueError, match="illegal"):
        jm.retry(a)  # queued cannot be retried
    with pytest.raises(KeyError):
        jm.retry(999)


def test_a_retry_never_takes_a_job_from_its_worker(jm: JobManager) -> None:
    """Two clicks on Retry: the first queues the failed job, a worker claims it, the second must not move it
    back to queued under that worker's lease (it stayed there for good, claimed by no one, and the worker's
    next report on it raised, ending its thread)."""
    job_id, _ = enqueue(jm)
    jm.claim("w1")
    jm.fail(job_id, "undecodable", retryable=False, worker_id="w1")
    assert jm.retry(job_id) is JobState.QUEUED
    assert [c.id for c in jm.claim("w2")] == [job_id]
    with pytest.raises(ValueError, match="is processing; only failed or done jobs can be retried"):
        jm.retry(job_id)
    row = job_row(jm.engine, job_id)
    assert (row.state, row.lease_owner) == ("processing", "w2")
    jm.finish_inference(job_id, result={"finding": "negative"}, output_dir="/o", worker_id="w2")
    assert job_row(jm.engine, job_id).state == "exporting"
    with pytest.raises(ValueError, match="is exporting; only failed jobs can be retried"):
        jm.retry(job_id, from_states=(JobState.FAILED,))


def test_ignored_is_terminal_whether_recorded_so_or_ignored_later(jm: JobManager, clock: Clock) -> None:
    kwargs = dict(sop_instance_uid="1.2.9", study_instance_uid="1.2.3", series_instance_uid="1.2.3.9",
                  sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34", calling_ae="PACS", calling_host="127.0.0.1",
                  reason="this node's own result, sent back to it")
    job_id, created = jm.record_ignored(**kwargs)
    assert created and jm.record_ignored(**kwargs) == (job_id, False)  # sent back twice: one row
    row = job_row(jm.engine, job_id)
    assert row.state == "ignored" and row.spool_path == "" and row.attempts == 0
    assert row.finished_at == clock.now and row.last_error == "this node's own result, sent back to it"
    assert jm.counts()["ignored"] == 1 and jm.claim("w") == []
    with pytest.raises(ValueError, match="illegal job transition ignored -> queued"):
        jm.retry(job_id)
    with Session(jm.engine) as s:
        events = s.scalars(select(JobEvent).where(JobEvent.job_id == job_id)).all()
    assert [(e.from_state, e.to_state) for e in events] == [(None, "ignored")]
    assert events[0].message == "received from PACS, not processed: this node's own result, sent back to it"
    # a queued job ignored later ends the same way
    later, _ = enqueue(jm)
    jm.ignore(later, "own output sent back to the node")
    assert job_row(jm.engine, later).last_error == "own output sent back to the node"
    assert jm.counts()["ignored"] == 2 and jm.claim("w") == []
    with pytest.raises(ValueError, match="illegal job transition ignored -> queued"):
        jm.retry(later)
    with pytest.raises(ValueError, match="illegal job transition ignored -> ignored"):
        jm.ignore(later, "again")


def test_counts_and_oldest_waiting(jm: JobManager, clock: Clock) -> None:
    assert jm.oldest_waiting() is None
    first, _ = enqueue(jm, "2.1")
    clock.advance(100)
    enqueue(jm, "2.2")
    clock.advance(20)
    oldest = jm.oldest_waiting()
    assert oldest is not None and oldest["job_id"] == first and oldest["age_s"] == 120
    assert jm.counts() == {"queued": 2, "processing": 0, "exporting": 0, "done": 0, "failed": 0, "ignored": 0}


def test_a_resent_job_waits_and_lives_from_the_resend_not_from_its_reception(jm: JobManager,
                                                                             clock: Clock) -> None:
    """A job received 30 days ago and resent now is not a queue stuck for 30 days, and its delivery is not
    a 30-day job in the time-to-delivery histogram."""
    old, _ = enqueue(jm, "4.1")
    jm.claim("w")
    jm.finish_inference(old, result={"finding": "negative"}, output_dir="/o/old", worker_id="w")
    jm.complete(old, worker_id="w")
    clock.advance(30 * 86400)
    assert jm.retry(old) is JobState.EXPORTING
    clock.advance(5)
    oldest = jm.oldest_waiting()
    assert oldest is not None and (oldest["job_id"], oldest["age_s"]) == (old, 5)
    jm.claim("w")
    clock.advance(2)
    assert jm.complete(old, worker_id="w") == 7
    assert jm.oldest_waiting() is None


def test_concurrent_claims_on_sqlite_hand_out_each_job_once(engine: Engine) -> None:
    jm = JobManager(engine, WorkerSettings())
    n_jobs = 60
    for i in range(n_jobs):
        enqueue(jm, f"3.{i}")
    seen: list[int] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while batch := jm.claim(name, limit=2):
            with lock:
                seen.extend(j.id for j in batch)

    threads = [threading.Thread(target=worker, args=(f"t{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(seen) == sorted(set(seen)) and len(seen) == n_jobs


def test_delivery_has_its_own_attempt_limit(engine: Engine, settings: WorkerSettings, clock: Clock) -> None:
    jm = JobManager(engine, settings, clock=clock, export_max_attempts=5)
    job_id, _ = enqueue(jm)
    jm.claim("w")
    jm.finish_inference(job_id, result={"finding": "negative"}, output_dir="/o", worker_id="w")
    states = [jm.fail(job_id, "PACS down", retryable=True, worker_id="w")]
    for _ in range(4):
        clock.advance(60)
        jm.claim("w")
        states.append(jm.fail(job_id, "PACS down", retryable=True, worker_id="w"))
    assert states == [JobState.EXPORTING] * 4 + [JobState.FAILED]  # inference limit is 3, delivery 5
    with pytest.raises(ValueError, match="export_max_attempts"):
        JobManager(engine, settings, export_max_attempts=0)


def test_a_transition_is_logged_only_once_committed(jm: JobManager, engine: Engine,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """A claim whose commit fails (the disk under SQLite full) changed nothing: no line may say it did."""
    from sqlalchemy import event as sa_event
    from sqlalchemy.exc import OperationalError

    job_id, _ = enqueue(jm)

    def refuse(conn: Any) -> None:
        raise OperationalError("COMMIT", {}, Exception("database or disk is full"))

    caplog.set_level(logging.INFO, logger="dicom_node.queue")
    sa_event.listen(engine, "commit", refuse)
    try:
        with pytest.raises(OperationalError):
            jm.claim("w1")
    finally:
        sa_event.remove(engine, "commit", refuse)
    assert job_row(engine, job_id).state == "queued"
    assert not [r for r in caplog.records if getattr(r, "action", "") == "job_claimed"]
    jm.claim("w1")
    assert [r.getMessage() for r in caplog.records if getattr(r, "action", "") == "job_claimed"] == [
        f"job {job_id}: queued -> processing (claimed by w1, attempt 1)"]


def test_a_resend_restores_only_a_job_failed_for_its_missing_file(jm: JobManager, engine: Engine,
                                                                   clock: Clock) -> None:
    from dicom_node.queue import missing_file_error

    lost, _ = enqueue(jm, "1.1")
    broken, _ = enqueue(jm, "1.2")
    jm.claim("w", limit=2)
    lost_path = job_row(engine, lost).spool_path
    jm.fail(lost, missing_file_error(lost_path), retryable=False, worker_id="w")
    jm.fail(broken, "undecodable instance: JPEG stream truncated", retryable=False, worker_id="w")
    clock.advance(60)
    assert jm.restore(lost, "/elsewhere/1.1.dcm") == (JobState.FAILED, False)  # not the job's file
    assert jm.restore(broken, job_row(engine, broken).spool_path) == (JobState.FAILED, False)
    assert jm.restore(lost, lost_path) == (JobState.QUEUED, True)
    row = job_row(engine, lost)
    assert (row.attempts, row.finished_at, row.waiting_since) == (0, None, clock.now)
    assert jm.restore(lost, lost_path) == (JobState.QUEUED, False)  # queued already: nothing restored
    assert jm.restore(999, lost_path) == (None, False)
    assert [j.id for j in jm.claim("w2")] == [lost]


def test_delivery_only_claims_leave_queued_jobs_alone(jm: JobManager, clock: Clock) -> None:
    queued, _ = enqueue(jm, "1.1")
    ready, _ = enqueue(jm, "1.2")
    jm.claim("w", limit=2)
    jm.release(queued, worker_id="w")
    jm.finish_inference(ready, result={"finding": "negative"}, output_dir="/o", worker_id="w")
    jm.fail(ready, "PACS down", retryable=True, worker_id="w")
    clock.advance(60)
    assert [(j.id, j.state) for j in jm.claim("w2", limit=5, delivery_only=True)] == [
        (ready, JobState.EXPORTING)]
    assert [j.id for j in jm.claim("w3", limit=5)] == [queued]


def test_a_release_can_set_when_the_job_is_due_again(jm: JobManager, clock: Clock) -> None:
    job_id, _ = enqueue(jm)
    jm.claim("w1")
    jm.release(job_id, worker_id="w1", why="given back: disk full", delay_s=60)
    clock.advance(59)
    assert jm.claim("w2") == []
    clock.advance(1)
    [job] = jm.claim("w2")
    assert (job.id, job.attempts) == (job_id, 1)


def test_a_heartbeat_warns_only_of_jobs_another_worker_holds(jm: JobManager, clock: Clock,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """The worker's heartbeat covers its whole batch; a job it already finished or failed is not lost (the
    warning came for every such job, misleading alerts on job_lease_lost)."""
    done, _ = enqueue(jm, "1.1")
    failed, _ = enqueue(jm, "1.2")
    taken, _ = enqueue(jm, "1.3")
    jm.claim("w1", limit=3)
    jm.finish_inference(done, result={"finding": "negative"}, output_dir="/o", worker_id="w1")
    jm.complete(done, worker_id="w1")
    jm.fail(failed, "undecodable", retryable=False, worker_id="w1")
    clock.advance(120)  # w1 stalled past its lease: taken over
    jm.reclaim_stalled()
    assert [j.id for j in jm.claim("w2", limit=1)] == [taken]
    caplog.set_level(logging.WARNING, logger="dicom_node.queue")
    assert jm.heartbeat("w1", [done, failed, taken]) == []
    assert [(r.job_id, r.getMessage()) for r in caplog.records if r.action == "job_lease_lost"] == [
        (taken, f"job {taken}: lease lost by w1 (now held by w2)")]


def test_a_job_given_back_untried_keeps_its_place_in_the_queue(jm: JobManager, clock: Clock) -> None:
    """A job whose worker died (lease expired) or stopped comes back in its place, not behind every image
    received since: it waited the lease and then the whole backlog."""
    first, _ = enqueue(jm, "1.1")
    clock.advance(1)
    second, _ = enqueue(jm, "1.2")
    assert [j.id for j in jm.claim("dies")] == [first]
    clock.advance(61)  # past the 60 s lease; meanwhile more arrived
    third, _ = enqueue(jm, "1.3")
    assert jm.reclaim_stalled() == 1
    assert [j.id for j in jm.claim("w", limit=3)] == [first, second, third]
    jm.release(second, worker_id="w")  # a stopping worker gives one back
    jm.release(third, worker_id="w", delay_s=30)  # a full disk: due later
    fourth, _ = enqueue(jm, "1.4")
    assert [j.id for j in jm.claim("w2", limit=3)] == [second, fourth]
