"""Operations on a scaled-out installation (real PostgreSQL): the admin API reads the shared queue, and
retention never races a re-send that another machine starts at the same moment."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from dicom_node import audit
from dicom_node.admin import start_admin
from dicom_node.db import Job, make_engine, utcnow
from dicom_node.queue import JobManager
from dicom_node.retention import PurgeReport, purge
from tests.fixtures.common import free_port
from tests.integration.ops_support import TOKEN, make_done, new_node_db, populate

pytestmark = pytest.mark.integration

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_admin_api_on_the_shared_postgresql_queue(postgres_url: str, tmp_path: Path) -> None:
    db = populate(new_node_db(tmp_path, db_url=postgres_url, admin_port=free_port()), queued=12, done=2,
                  failed=1)
    aid = audit.open_association(db.engine, calling_ae="ORTHANC", host="10.0.0.5")
    audit.close_association(db.engine, aid, instances=15)
    audit.refuse_association(db.engine, calling_ae="X", host="10.0.0.9", reason="calling AE not allowed")
    # A second machine's worker has its own engine on the same database.
    other = JobManager(make_engine(postgres_url), db.settings.worker)
    claimed = other.claim("remote-worker", limit=3)
    assert len(claimed) == 3
    server = start_admin(db.settings, db.engine, db.jobs)
    try:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as c:
            assert c.get("/health").json()["checks"]["database"] == {"ok": True, "dialect": "postgresql"}
            processing = c.get("/api/jobs", params={"state": "processing"}).json()
            assert processing["total"] == 3
            assert {j["id"] for j in processing["items"]} == {j.id for j in claimed}
            page = c.get("/api/jobs", params={"state": "queued", "limit": 5, "offset": 5}).json()
            assert page["total"] == 9 and len(page["items"]) == 4
            failed = db.ids["failed"][0]
            assert c.post(f"/api/jobs/{failed}/retry").json()["state"] == "queued"
            refused = c.get("/api/associations", params={"refused": "true"}).json()["items"]
            assert [a["calling_ae"] for a in refused] == ["X"]
            detail = c.get(f"/api/jobs/{db.ids['done'][0]}").json()
            assert detail["result"]["finding"] in ("positive", "negative")  # JSON column on PostgreSQL
            status = c.get("/api/status").json()
            assert status["counts"]["processing"] == 3 and status["counts"]["queued"] == 10
    finally:
        server.stop()


def test_retention_waits_for_a_concurrent_resend_and_keeps_its_files(postgres_url: str,
                                                                     tmp_path: Path) -> None:
    db = new_node_db(tmp_path, db_url=postgres_url)
    job_id = make_done(db, 1)
    with Session(db.engine) as s, s.begin():
        s.execute(update(Job).where(Job.id == job_id).values(finished_at=utcnow() - timedelta(days=60)))
        job = s.get(Job, job_id)
        assert job is not None
        spool, outputs = Path(job.spool_path), Path(job.output_dir or "")
    # Another machine starts a re-send: it holds the row lock while it moves the job to "exporting".
    other = make_engine(postgres_url)
    conn = other.connect()
    tx = conn.begin()
    conn.execute(update(Job).where(Job.id == job_id).values(state="exporting"))
    reports: list[PurgeReport] = []

    def run_purge() -> None:
        reports.append(purge(db.engine, db.settings.storage.data_dir, 30))

    runner = threading.Thread(target=run_purge)
    runner.start()
    time.sleep(1.5)
    assert runner.is_alive(), "retention did not wait for the row lock"
    assert spool.is_file() and outputs.is_dir()
    tx.commit()
    conn.close()
    runner.join(30)
    assert not runner.is_alive()
    assert reports[0].jobs == 0
    assert spool.is_file() and outputs.is_dir()  # the re-send still has everything it needs
    other.dispose()
