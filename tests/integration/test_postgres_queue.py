"""Scale-out: several OS processes share one queue; every job is processed exactly once, none is lost.

Runs against a real PostgreSQL server (``FOR UPDATE SKIP LOCKED``) and, for comparison, against
SQLite (``BEGIN IMMEDIATE``). Each process migrates the schema at start (concurrently), enqueues the
same instances in its own order (duplicate detection under a race), then claims until the queue is empty.
"""

from __future__ import annotations

import json
import multiprocessing
import random
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicom_node.config import WorkerSettings
from dicom_node.db import Job, JobEvent, init_db, make_engine
from dicom_node.queue import JobManager

pytestmark = pytest.mark.integration

N_PROCESSES = 4
M_JOBS = 200


def _uid(i: int) -> str:
    return f"1.2.826.0.1.3680043.8.498.{1000 + i}"


def claim_loop(url: str, worker_id: str, out_file: str, barrier: Any, seed: int) -> None:
    """One worker process: migrate, enqueue every instance (shuffled), then process until nothing is left."""
    engine = make_engine(url)
    init_db(engine)
    jm = JobManager(engine, WorkerSettings(lease_s=120))
    order = list(range(M_JOBS))
    random.Random(seed).shuffle(order)
    created = 0
    for i in order:
        created += jm.enqueue(sop_instance_uid=_uid(i), study_instance_uid="1.2.3",
                              series_instance_uid="1.2.3.4", sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                              calling_ae="MOD", calling_host="127.0.0.1", spool_path=f"/spool/{i}.dcm")[1]
    barrier.wait(timeout=120)
    processed: list[int] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        batch = jm.claim(worker_id, limit=3)
        if not batch:
            counts = jm.counts()
            if counts["queued"] + counts["processing"] + counts["exporting"] == 0:
                break
            time.sleep(0.01)
            continue
        for job in batch:
            processed.append(job.id)
            jm.finish_inference(job.id, result={"finding": "negative", "worker": worker_id},
                                output_dir=f"/out/{job.id}", worker_id=worker_id)
            jm.complete(job.id, worker_id=worker_id)
    Path(out_file).write_text(json.dumps({"processed": processed, "created": created}))
    engine.dispose()


@pytest.fixture(params=["postgresql", "sqlite"])
def queue_url(request: pytest.FixtureRequest) -> str:
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_url")
    return request.getfixturevalue("sqlite_url")


def test_n_processes_m_jobs_each_exactly_once(queue_url: str, tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(N_PROCESSES)
    outs = [tmp_path / f"w{i}.json" for i in range(N_PROCESSES)]
    procs = [ctx.Process(target=claim_loop, args=(queue_url, f"worker-{i}", str(outs[i]), barrier, i))
             for i in range(N_PROCESSES)]
    started = time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    elapsed = time.monotonic() - started
    assert [p.exitcode for p in procs] == [0] * N_PROCESSES

    reports = [json.loads(o.read_text()) for o in outs]
    processed = [job_id for r in reports for job_id in r["processed"]]
    assert sum(r["created"] for r in reports) == M_JOBS, "a duplicate SOP Instance UID created a second job"
    assert len(processed) == M_JOBS and len(set(processed)) == M_JOBS, "a job was processed twice or lost"
    assert sum(1 for r in reports if r["processed"]) >= 2, "the work was not shared between processes"

    engine = make_engine(queue_url)
    with Session(engine) as s:
        assert s.execute(select(func.count()).select_from(Job)).scalar() == M_JOBS
        states = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        assert states == {"done": M_JOBS}
        claims = s.execute(select(JobEvent.job_id, func.count()).where(JobEvent.to_state == "processing")
                           .group_by(JobEvent.job_id)).all()
        assert len(claims) == M_JOBS and {n for _, n in claims} == {1}
    engine.dispose()
    print(f"{engine.dialect.name}: {N_PROCESSES} processes x {M_JOBS} jobs in {elapsed:.1f} s")


def test_worker_on_postgres_processes_and_delivers(postgres_url: str, tmp_path: Path, tiny_bundle: Path,
                                                   storescp: Any) -> None:
    """The real worker (tiny model) on PostgreSQL: result JSON, registry model, delivery to storescp."""
    import pydicom

    from dicom_node.config import Settings
    from dicom_node.db import ModelVersion, utcnow
    from dicom_node.worker import Worker
    from inference.phantom import make_dicom

    dest = storescp("PACS")
    settings = Settings.model_validate({
        "storage": {"data_dir": str(tmp_path / "data")}, "database": {"url": postgres_url},
        "model": {"device": "cpu", "cpu_threads": 1},
        "export": {"destinations": [dest.address], "network_timeout_s": 10},
    })
    engine = make_engine(settings.db_url)
    init_db(engine)
    with Session(engine) as s, s.begin():
        s.add(ModelVersion(version="0.0.0-test", path=str(tiny_bundle), status="current",
                           promoted_at=utcnow(), metrics={"roc_auc": 0.5}))
    worker = Worker(settings, engine)
    path = settings.storage.spool_dir / "study" / "a.dcm"
    path.parent.mkdir(parents=True)
    ds = make_dicom(path, shape=(256, 256))
    job_id, _ = worker.jm.enqueue(sop_instance_uid=str(ds.SOPInstanceUID), study_instance_uid="1.2",
                                  series_instance_uid="1.2.1", sop_class_uid=str(ds.SOPClassUID),
                                  calling_ae="MOD", calling_host="127.0.0.1", spool_path=str(path))
    assert worker.run_once() == 1
    with Session(engine) as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state == "done", job.last_error
        assert job.result is not None and job.result["model_version"] == "0.0.0-test"
        sr_uid = job.sr_sop_instance_uid
    assert sr_uid in {str(pydicom.dcmread(f).SOPInstanceUID) for f in dest.files()}
    engine.dispose()


def test_leases_follow_the_database_clock_not_each_machines(postgres_url: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Several machines share a PostgreSQL queue: one whose clock runs 301 s ahead (lease 300 s) must not take
    a live worker's job as stalled, nor see its own backoff end early; the database server's clock judges."""
    from datetime import UTC, datetime, timedelta

    import dicom_node.db as db_module

    engine = make_engine(postgres_url)
    init_db(engine)
    a = JobManager(engine, WorkerSettings(lease_s=300))
    job_id, _ = a.enqueue(sop_instance_uid=_uid(999), study_instance_uid="1.2.3",
                          series_instance_uid="1.2.3.4", sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                          calling_ae="MOD", calling_host="127.0.0.1", spool_path="/spool/999.dcm")
    assert [j.id for j in a.claim("A")] == [job_id]

    class Ahead(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Any:  # type: ignore[override]
            return datetime.now(tz) + timedelta(seconds=301)

    monkeypatch.setattr(db_module, "datetime", Ahead)
    real_utc = datetime.now(UTC).replace(tzinfo=None)
    assert db_module.utcnow() - real_utc > timedelta(seconds=300)  # this machine's clock is ahead now
    b = JobManager(engine, WorkerSettings(lease_s=300))
    assert b.reclaim_stalled() == 0 and b.claim("B") == []
    assert a.heartbeat("A", [job_id]) == [job_id]
    with Session(engine) as session:
        assert session.get(Job, job_id).lease_owner == "A"
    engine.dispose()


def test_connections_give_up_on_a_database_host_that_stopped_answering(postgres_url: str) -> None:
    """A crashed database host sends no reset: without TCP keepalives and a user timeout a C-STORE or a worker
    waits out the kernel's retransmissions (about 15 minutes). Checked on a real connection's parameters;
    a setting in the URL wins."""
    engine = make_engine(postgres_url)
    try:
        with engine.connect() as conn:
            params = conn.connection.driver_connection.info.get_parameters()
        assert params["tcp_user_timeout"] == "30000" and params["keepalives"] == "1"
        assert params["keepalives_idle"] == "30" and params["connect_timeout"] == "10"
    finally:
        engine.dispose()
    own = make_engine(postgres_url + ("&" if "?" in postgres_url else "?") + "tcp_user_timeout=5000")
    try:
        with own.connect() as conn:
            assert conn.connection.driver_connection.info.get_parameters()["tcp_user_timeout"] == "5000"
    finally:
        own.dispose()
