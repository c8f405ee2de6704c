"""Retention: only files of delivered (or ignored) jobs older than the configured age go; scheduled."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED, JobExecutionEvent
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from dicom_node.config import ConfigError
from dicom_node.db import Job, JobEvent, utcnow
from dicom_node.retention import EVENT_PREFIX, PurgeReport, free_mb, has_room, purge
from dicom_node.scheduler import RETENTION_JOB_ID, RETRAIN_JOB_ID, start_scheduler
from tests.integration.ops_support import (
    NodeDb,
    enqueue,
    make_done,
    make_failed,
    make_settings,
    new_node_db,
    spool_instance,
)

pytestmark = pytest.mark.integration


def age(db: NodeDb, job_id: int, days: float) -> None:
    """Pretend the job finished (and was created) ``days`` ago."""
    then = utcnow() - timedelta(days=days)
    with Session(db.engine) as s, s.begin():
        s.execute(update(Job).where(Job.id == job_id).values(finished_at=then, created_at=then))


def job(db: NodeDb, job_id: int) -> Job:
    with Session(db.engine, expire_on_commit=False) as s:
        row = s.get(Job, job_id)
        assert row is not None
        return row


@pytest.fixture
def db(tmp_path: Path) -> NodeDb:
    return new_node_db(tmp_path / "node")


def test_only_old_delivered_jobs_lose_their_files(db: NodeDb) -> None:
    failed_old = make_failed(db, 1)
    old_done = make_done(db, 2)
    new_done = make_done(db, 3)
    ignored_old = enqueue(db, 4)[0]
    [c] = db.jobs.claim("w")
    db.jobs.ignore(c.id, "own output sent back", worker_id="w")
    exporting_old = make_done(db, 5)
    db.jobs.retry(exporting_old)  # re-sent: waiting for delivery again, outputs needed
    queued_old = enqueue(db, 6)[0]
    for job_id in (failed_old, old_done, ignored_old, exporting_old, queued_old):
        age(db, job_id, 40)
    age(db, new_done, 5)
    before = {j: (Path(job(db, j).spool_path), job(db, j).output_dir) for j in
              (failed_old, old_done, new_done, ignored_old, exporting_old, queued_old)}
    assert all(p.is_file() for p, _ in before.values())

    echoed, _ = db.jobs.record_ignored(  # the node's own SR sent back: a row, but no files
        sop_instance_uid="1.2.826.0.1.3680043.8.498.99", study_instance_uid="1.2.3",
        series_instance_uid="1.2.4", sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34", calling_ae="ORTHANC",
        calling_host="127.0.0.1", reason="own result")
    age(db, echoed, 40)
    report = purge(db.engine, db.settings.storage.data_dir, 30)

    assert report.jobs == 2 and report.spool_files == 2 and report.errors == []  # nothing to do for echoed
    assert report.output_files == 2  # SC + SR of old_done
    assert report.bytes_freed > 0
    gone = {old_done, ignored_old}
    for job_id, (spool, out) in before.items():
        assert spool.exists() == (job_id not in gone), job_id
        if out:
            assert Path(out).exists() == (job_id != old_done), job_id
    # Undelivered jobs keep everything, whatever their age.
    assert job(db, failed_old).state == "failed" and before[failed_old][0].is_file()
    assert Path(before[exporting_old][1] or "").is_dir()
    # What was done is recorded in the job's history; its row and audit data stay.
    assert job(db, old_done).state == "done" and job(db, old_done).output_dir is None
    with Session(db.engine) as s:
        events = s.scalars(select(JobEvent.message).where(JobEvent.job_id == old_done)).all()
    assert events[-1].startswith(EVENT_PREFIX)
    assert "1 spooled instance file(s) and 2 output file(s)" in events[-1]
    assert not before[old_done][0].parent.exists()  # the empty study folder went too
    # A second run finds nothing more; resending the purged job now says there is nothing to send.
    assert purge(db.engine, db.settings.storage.data_dir, 30).jobs == 0
    with pytest.raises(ValueError, match="no stored outputs"):
        db.jobs.retry(old_done)


def test_a_retention_run_reads_the_jobs_with_files_left_never_the_purged_history(db: NodeDb) -> None:
    """Purged jobs are marked on their row (purged_at) and fall out of the partial index retention reads
    through, so a daily run costs the jobs that still have files, not months of history (it used to skip the
    purged ones by searching every job's events for the retention mark). The newest-first delivery list reads
    its index too."""
    from dicom_node.db import Delivery
    from dicom_node.retention import candidates

    old_done = make_done(db, 1)
    age(db, old_done, 40)
    before = utcnow()
    assert purge(db.engine, db.settings.storage.data_dir, 30).jobs == 1
    assert job(db, old_done).purged_at is not None and job(db, old_done).purged_at >= before
    batch = candidates(utcnow(), 0)
    with db.engine.connect() as conn:
        sql = str(batch.compile(db.engine, compile_kwargs={"literal_binds": True}))
        plan = " ".join(str(row) for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql))
        assert "USING INDEX ix_jobs_unpurged" in plan, plan
        assert conn.execute(batch).all() == []
        newest = select(Delivery).order_by(Delivery.at.desc(), Delivery.id.desc()).limit(50)
        sql = str(newest.compile(db.engine, compile_kwargs={"literal_binds": True}))
        plan = " ".join(str(row) for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql))
        assert "USING INDEX ix_deliveries_at" in plan, plan


def test_the_upgrade_marks_the_jobs_purged_before_it(tmp_path: Path) -> None:
    """A database at revision 0001 whose retention has run: its purged jobs get purged_at from their
    retention event, the others none."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import text

    from dicom_node.db import MIGRATIONS_DIR, init_db, make_engine

    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
    with engine.begin() as conn:
        for i in (1, 2):
            conn.execute(text(
                "INSERT INTO jobs (id, sop_instance_uid, study_instance_uid, series_instance_uid, "
                "sop_class_uid, calling_ae, calling_host, spool_path, state, attempts, created_at, "
                "updated_at, finished_at) "
                "VALUES (:i, :uid, '1.2', '1.2', '1.2', 'A', 'h', '/s', 'done', 1, :t, :t, :t)"),
                {"i": i, "uid": f"1.2.{i}", "t": datetime(2025, 1, 1)})
        conn.execute(text("INSERT INTO job_events (job_id, at, from_state, to_state, message) VALUES "
                          "(1, :t, 'done', 'done', 'retention: deleted 1 spooled instance file(s)')"),
                     {"t": datetime(2025, 3, 1)})
    init_db(engine)
    with Session(engine) as s:
        assert [(j.id, j.purged_at) for j in s.scalars(select(Job).order_by(Job.id))] == [
            (1, datetime(2025, 3, 1)), (2, None)]
    engine.dispose()


def test_zero_days_keeps_everything_and_age_is_respected(db: NodeDb) -> None:
    done = make_done(db, 1)
    age(db, done, 10)
    assert purge(db.engine, db.settings.storage.data_dir, 0).jobs == 0
    assert purge(db.engine, db.settings.storage.data_dir, 11).jobs == 0
    assert Path(job(db, done).spool_path).is_file()
    assert purge(db.engine, db.settings.storage.data_dir, 9).jobs == 1
    assert not Path(job(db, done).spool_path).exists()
    with pytest.raises(ValueError, match="retention_days"):
        purge(db.engine, db.settings.storage.data_dir, -1)


def test_temporary_files_of_killed_writes_go_and_instances_without_a_job_are_reported_not_deleted(
        db: NodeDb, caplog: pytest.LogCaptureFixture) -> None:
    """Temporary files a killed listener left mid-write: nothing else would ever delete them. Instance files
    without a job (refused after they were written in a database outage, or acknowledged after the last
    backup of a database since restored: then the only copy) are counted and named in the log, never
    deleted. Young temporary files, and every file a job owns whatever its age, stay."""
    from dicom_node.retention import sweep_strays

    done = make_done(db, 2)
    _, _, waiting_path = enqueue(db, 1)  # queued: a job owns it
    _, refused_path = spool_instance(db.settings, 3)  # written, never queued
    _, young_path = spool_instance(db.settings, 4)
    study = waiting_path.parent
    old_part, young_part = study / ".tmp-abc.part", study / ".tmp-def.part"
    out_part = Path(job(db, done).output_dir or "") / ".tmp-ghi.part"
    hashed = study / ("x" + "0" * 40 + ".dcm")  # a name the listener made from an invalid UID: left alone
    for path in (old_part, young_part, out_part, hashed):
        path.write_bytes(b"partial")
    two_days_ago = time.time() - 2 * 86400
    for path in (waiting_path, Path(job(db, done).spool_path), refused_path, old_part, out_part, hashed):
        os.utime(path, (two_days_ago, two_days_ago))
    os.utime(young_part, (time.time() - 600, time.time() - 600))
    caplog.set_level(logging.WARNING, logger="dicom_node.retention")
    report = purge(db.engine, db.settings.storage.data_dir, 0)  # keeps every job's files, sweeps the strays
    assert (report.stray_files, report.unowned_files, report.jobs) == (2, 1, 0)
    assert not old_part.exists() and not out_part.exists()
    for kept in (refused_path, waiting_path, Path(job(db, done).spool_path), young_path, young_part, hashed):
        assert kept.is_file(), kept
    [unowned] = [r for r in caplog.records if r.action == "retention_unowned"]
    assert refused_path.name in unowned.getMessage() and waiting_path.name not in unowned.getMessage()
    again = PurgeReport(cutoff=utcnow())
    sweep_strays(db.engine, db.settings.storage.data_dir.resolve() / "spool", again)
    assert (again.stray_files, again.unowned_files) == (0, 1)


def test_paths_outside_the_data_directory_are_never_deleted(db: NodeDb, tmp_path: Path) -> None:
    done = make_done(db, 1)
    outside = tmp_path / "elsewhere" / "instance.dcm"
    outside.parent.mkdir()
    shutil.copy(job(db, done).spool_path, outside)
    with Session(db.engine) as s, s.begin():
        s.execute(update(Job).where(Job.id == done).values(spool_path=str(outside)))
    age(db, done, 40)
    report = purge(db.engine, db.settings.storage.data_dir, 30)
    assert outside.is_file()
    assert report.skipped_outside == 1 and report.spool_files == 0 and report.output_files == 2


def test_free_mb_and_watermark(tmp_path: Path) -> None:
    usage = shutil.disk_usage(tmp_path)
    measured = free_mb(tmp_path / "not" / "yet" / "created")
    assert abs(measured - usage.free / 2**20) < 512  # same volume, give or take other writers
    st = os.statvfs(tmp_path)
    assert measured <= st.f_bfree * st.f_frsize / 2**20 + 1
    assert has_room(tmp_path, 1) and not has_room(tmp_path, 10**9)


def test_scheduler_registers_and_runs_retention(db: NodeDb) -> None:
    done = make_done(db, 1)
    age(db, done, 40)
    settings = make_settings(db.settings.storage.data_dir, retention_days=30, retention_cron="17 3 * * *")
    scheduler = start_scheduler(settings, db.engine)
    try:
        assert [j.id for j in scheduler.get_jobs()] == [RETENTION_JOB_ID]  # no retrain cron configured
        trigger = scheduler.get_job(RETENTION_JOB_ID).trigger
        assert str(trigger.fields[6]) == "17" and str(trigger.fields[5]) == "3"  # minute, hour
        ran = threading.Event()
        outcome: list[object] = []

        def done_listener(event: JobExecutionEvent) -> None:
            outcome.append(event.exception)
            ran.set()

        scheduler.add_listener(done_listener, EVENT_JOB_EXECUTED | EVENT_JOB_ERROR)
        scheduler.modify_job(RETENTION_JOB_ID, next_run_time=datetime.now(UTC))
        assert ran.wait(30), "retention job did not run"
        assert outcome == [None]
    finally:
        scheduler.shutdown(wait=True)
    assert not Path(job(db, done).spool_path).exists()


_SLOW_RUN = '''
import sys, threading, time
from datetime import UTC, datetime
import dicom_node.scheduler as scheduler_module
from dicom_node.config import Settings

started = threading.Event()
def slow(settings, engine):
    started.set()
    time.sleep(120)
scheduler_module.run_retention = slow
settings = Settings.model_validate({"storage": {"data_dir": sys.argv[1], "retention_days": 30}})
scheduler = scheduler_module.start_scheduler(settings, None)
scheduler.modify_job(scheduler_module.RETENTION_JOB_ID, next_run_time=datetime.now(UTC))
assert started.wait(30), "the run did not start"
assert scheduler_module.running()
scheduler.shutdown(wait=False)
print("stopping", flush=True)
'''


def test_a_scheduled_run_never_holds_up_the_exit(tmp_path: Path) -> None:
    """Stopping the node during a long retention or retraining run: the process ends at once. APScheduler's
    thread pool is joined at exit, so it waited for the run until systemd (90 s) or Docker killed it."""
    import subprocess
    import sys

    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", _SLOW_RUN, str(tmp_path)], capture_output=True, text=True,
                         timeout=150)
    assert out.returncode == 0 and "stopping" in out.stdout, out.stderr
    assert time.monotonic() - started < 60, "the exit waited for the scheduled run"


def test_scheduler_retrain_cron_and_bad_expressions(db: NodeDb) -> None:
    data_dir = db.settings.storage.data_dir
    s = make_settings(data_dir)
    s.retrain.cron = "0 2 * * 0"
    scheduler = start_scheduler(s, db.engine)
    try:
        assert {j.id for j in scheduler.get_jobs()} == {RETENTION_JOB_ID, RETRAIN_JOB_ID}
    finally:
        scheduler.shutdown(wait=False)
    off = make_settings(data_dir, retention_days=0)
    scheduler = start_scheduler(off, db.engine)
    try:
        assert scheduler.get_jobs() == []
    finally:
        scheduler.shutdown(wait=False)
    with pytest.raises(ConfigError, match="storage.retention_cron"):
        start_scheduler(make_settings(data_dir, retention_cron="every night"), db.engine)
    s.retrain.cron = "61 * * * *"
    with pytest.raises(ConfigError, match="retrain.cron"):
        start_scheduler(s, db.engine)


@pytest.mark.parametrize(("days", "fires_on"), [
    ("0", {"Sun"}), ("7", {"Sun"}), ("sun", {"Sun"}), ("1-5", {"Mon", "Tue", "Wed", "Thu", "Fri"}),
    ("5-7", {"Fri", "Sat", "Sun"}), ("*/2", {"Sun", "Tue", "Thu", "Sat"}), ("6,0", {"Sat", "Sun"}),
    ("*", {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"}), ("mon-fri/2", {"Mon", "Wed", "Fri"}),
])
def test_crontab_days_of_week_are_read_as_cron_reads_them(days: str, fires_on: set[str]) -> None:
    """Day of week 0 and 7 are Sunday, 1 Monday, as in crontab(5); APScheduler's own numbers start at Monday,
    so "0 2 * * 0" would have run on Mondays."""
    from dicom_node.scheduler import cron_trigger

    trigger = cron_trigger(f"0 2 * * {days}", "retrain.cron")
    when = datetime(2026, 11, 1, 12, 0, tzinfo=trigger.timezone)  # a Sunday, after 02:00
    fired = []
    for _ in range(14):
        when = trigger.get_next_fire_time(None, when + timedelta(seconds=1))
        fired.append(when)
    assert {f.strftime("%a") for f in fired} == fires_on
    assert all((f.hour, f.minute) == (2, 0) for f in fired)
    for bad in ("8", "5-1", "*/0", "fri-mon"):
        with pytest.raises(ConfigError, match="retrain.cron"):
            cron_trigger(f"0 2 * * {bad}", "retrain.cron")


def test_scheduled_jobs_never_run_side_by_side() -> None:
    """A job due while another runs waits for it: retention cannot delete the files a retraining run reads."""
    from dicom_node.scheduler import _guarded

    spans: dict[str, tuple[float, float]] = {}

    def job(name: str) -> None:
        start = time.monotonic()
        time.sleep(0.3)
        spans[name] = (start, time.monotonic())

    threads = [threading.Thread(target=_guarded, args=(name, job, name)) for name in ("retrain", "retention")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    (a0, a1), (b0, b1) = spans["retrain"], spans["retention"]
    assert a1 <= b0 or b1 <= a0, spans


def test_scheduled_retrain_runs_and_reports_its_outcome(db: NodeDb, caplog: pytest.LogCaptureFixture) -> None:
    s = make_settings(db.settings.storage.data_dir, retention_days=0)
    s.retrain.cron = "0 2 * * 0"
    scheduler = start_scheduler(s, db.engine)
    ran = threading.Event()
    errors: list[object] = []

    def listener(event: JobExecutionEvent) -> None:
        errors.append(event.exception)
        ran.set()

    scheduler.add_listener(listener, EVENT_JOB_EXECUTED | EVENT_JOB_ERROR)
    try:
        with caplog.at_level(logging.INFO, logger="dicom_node.scheduler"):
            scheduler.modify_job(RETRAIN_JOB_ID, next_run_time=datetime.now(UTC))
            assert ran.wait(120), "retrain job did not run"
    finally:
        scheduler.shutdown(wait=True)
    assert errors == [None]
    finished = [r for r in caplog.records if getattr(r, "action", "") == "retrain_finished"]
    assert len(finished) == 1
    outcome = finished[0].outcome  # type: ignore[attr-defined]
    assert outcome["status"] == "skipped" and "needed" in outcome["reason"]  # no local labels yet


def test_failed_jobs_keep_their_files_without_retention_locking_them(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Failed jobs keep their files, so retention reads them and moves on: it opened a write transaction for
    each of them on every run (SQLite's write lock, over a history that only grows). Here another writer holds
    the lock and the wait for it is cut to half a second: a write attempt would fail the run."""
    import sqlite3

    import dicom_node.db as db_module

    monkeypatch.setattr(db_module, "SQLITE_BUSY_TIMEOUT_MS", 500)
    db = new_node_db(tmp_path / "node")
    failed = make_failed(db, 1)
    age(db, failed, 40)
    lock = sqlite3.connect(str(db.settings.storage.data_dir / "cxr-node.db"), isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    try:
        report = purge(db.engine, db.settings.storage.data_dir, 30)
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert report.jobs == 0 and report.errors == []
    assert Path(job(db, failed).spool_path).is_file()


def test_health_reads_the_database_without_waiting_for_a_writer(tmp_path: Path) -> None:
    """/health's database check is a reader: a long write transaction elsewhere (a retention batch, a
    migration) must not read as the database being down."""
    import sqlite3

    from dicom_node.admin_data import health_checks

    db = new_node_db(tmp_path / "node")
    lock = sqlite3.connect(str(db.settings.storage.data_dir / "cxr-node.db"), isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        checks = health_checks(db.settings, db.engine, None)
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert checks["database"]["ok"] is True, checks
    assert time.monotonic() - started < 2


def test_revisions_from_0002_refuse_to_downgrade_and_keep_the_history(tmp_path: Path) -> None:
    """On SQLite, dropping 0002's or 0003's columns rebuilt the jobs table, and its foreign keys emptied
    job_events and deliveries with it: a downgrade is refused, and the history stays."""
    from alembic import command
    from alembic.config import Config

    from dicom_node.db import MIGRATIONS_DIR

    db = new_node_db(tmp_path / "node")
    done = make_done(db, 1)
    events = len(db.jobs.history(done))
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    for target in ("0002", "0001"):
        with pytest.raises(NotImplementedError, match="restoring the database backup"), \
                db.engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, target)
    assert len(db.jobs.history(done)) == events > 0
