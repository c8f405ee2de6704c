"""Nothing is lost: a destination that is down delays delivery, a SIGKILLed worker's job is finished later.

Real parts: dcmtk ``storescp`` as the destination, ``cxr-node worker`` as an OS process, the tiny
random model bundle, phantom DICOMs, SQLite in WAL mode.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node import metrics
from dicom_node.config import Settings
from dicom_node.db import Delivery, init_db, make_engine, utcnow
from dicom_node.queue import JobManager
from dicom_node.worker import Worker
from inference.phantom import make_dicom
from tests.fixtures.common import free_port
from tests.fixtures.database import job_row
from tests.fixtures.peers import StoreSCP, to_toml

pytestmark = pytest.mark.integration

CXR_NODE = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "cxr-node"


def queue_instance(settings: Settings, jm: JobManager, name: str = "chest") -> int:
    path = settings.storage.spool_dir / "1.2.3" / f"{name}.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = make_dicom(path, shape=(256, 256))
    job_id, _ = jm.enqueue(sop_instance_uid=str(ds.SOPInstanceUID),
                           study_instance_uid=str(ds.StudyInstanceUID),
                           series_instance_uid=str(ds.SeriesInstanceUID), sop_class_uid=str(ds.SOPClassUID),
                           calling_ae="MODALITY", calling_host="127.0.0.1", spool_path=str(path))
    return job_id


def inference_runs(jm: JobManager, job_id: int) -> int:
    return sum(1 for h in jm.history(job_id) if h["to_state"] == "processing")


def received_sr_uids(dest: StoreSCP) -> set[str]:
    return {str(ds.SOPInstanceUID) for ds in map(pydicom.dcmread, dest.files()) if ds.Modality == "SR"}


def test_destination_down_then_up_is_delivered_without_rerunning_the_model(
        tmp_path: Path, tiny_bundle: Path, storescp: Callable[..., StoreSCP]) -> None:
    dest = storescp("PACS", start=False)
    settings = Settings.model_validate({
        "storage": {"data_dir": str(tmp_path / "data")},
        "model": {"path": str(tiny_bundle), "device": "cpu", "cpu_threads": 1},
        "worker": {"backoff_base_s": 0.3, "backoff_max_s": 1.0, "max_attempts": 10},
        "export": {"destinations": [dest.address], "network_timeout_s": 5},
    })
    engine = make_engine(settings.db_url)
    init_db(engine)
    worker = Worker(settings, engine)
    job_id = queue_instance(settings, worker.jm)
    sample = metrics.REGISTRY.get_sample_value
    decoded = sample("cxrnode_stage_seconds_count", {"stage": "decode"}) or 0.0
    lives, lived = sample("cxrnode_job_seconds_count") or 0.0, sample("cxrnode_job_seconds_sum") or 0.0
    queued_at = time.monotonic()

    assert worker.run_once() == 1
    job = job_row(engine, job_id)
    assert job.state == "exporting" and job.lease_owner is None, "a down destination must delay, not fail"
    assert dest.address in (job.last_error or "")

    dest.start()
    deadline = time.monotonic() + 30
    while job_row(engine, job_id).state != "done" and time.monotonic() < deadline:
        worker.run_once() or time.sleep(0.1)
    job = job_row(engine, job_id)
    assert job.state == "done", job.last_error
    assert received_sr_uids(dest) == {job.sr_sop_instance_uid}
    assert inference_runs(worker.jm, job_id) == 1
    # the worker's own figures: one decode timed, one job's life from reception to delivery
    assert sample("cxrnode_stage_seconds_count", {"stage": "decode"}) == decoded + 1
    assert sample("cxrnode_job_seconds_count") == lives + 1
    assert 0 < sample("cxrnode_job_seconds_sum") - lived <= time.monotonic() - queued_at + 1
    with Session(engine) as s:
        statuses = s.execute(select(Delivery.status).where(Delivery.job_id == job_id)
                             .order_by(Delivery.id)).scalars().all()
    assert statuses[0] == "failed" and statuses[-1] == "sent" and statuses.count("sent") == 1
    engine.dispose()


def connections_to(port: int) -> int:
    """Established TCP connections whose local port is ``port`` (Linux ``/proc/net/tcp*``)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            next(fh)
            for line in fh:
                local, state = line.split()[1], line.split()[3]
                count += int(local.rsplit(":", 1)[1], 16) == port and state == "01"
    return count


def start_worker(config: dict[str, Any], path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    path.write_text(to_toml(config))
    log_path = path.with_suffix(".log")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXRNODE_")}
    with log_path.open("ab") as log:
        proc = subprocess.Popen([str(CXR_NODE), "worker", "--config", str(path)], stdout=log,
                                stderr=subprocess.STDOUT, env=env, cwd=path.parent)
    return proc, log_path


def test_a_worker_that_lost_its_lease_does_not_send(tmp_path: Path, tiny_bundle: Path,
                                                     storescp: Callable[..., StoreSCP]) -> None:
    """Worker A stalls after inference for longer than its lease; worker B takes the job over. When A
    resumes it must not deliver (B does): the destination receives the results once."""
    dest = storescp("PACS")
    settings = Settings.model_validate({
        "storage": {"data_dir": str(tmp_path / "data")},
        "model": {"path": str(tiny_bundle), "device": "cpu", "cpu_threads": 1},
        "worker": {"lease_s": 30},
        "export": {"destinations": [dest.address], "network_timeout_s": 10},
    })
    engine = make_engine(settings.db_url)
    init_db(engine)
    now = [utcnow()]
    jm = JobManager(engine, settings.worker, clock=lambda: now[0])
    a = Worker(settings, engine, job_manager=jm, worker_id="worker-a")
    b = Worker(settings, engine, job_manager=jm, worker_id="worker-b")
    job_id = queue_instance(settings, jm)
    a.load_model()
    [claimed] = jm.claim(a.worker_id)
    [ready] = a._infer([claimed])  # A has built and stored the outputs, and stalls here
    now[0] += timedelta(seconds=31)  # its lease expires
    assert jm.reclaim_stalled() == 1  # as B's loop does
    [taken] = jm.claim(b.worker_id)  # B takes the job over
    assert taken.id == job_id and taken.state.value == "exporting"  # the stored outputs are reused
    a.process([ready])  # A resumes with the job it no longer holds
    assert dest.files() == [] and job_row(engine, job_id).lease_owner == b.worker_id
    with Session(engine) as s:
        assert s.scalars(select(Delivery).where(Delivery.job_id == job_id)).all() == []
    b.load_model()
    b.process([taken])
    job = job_row(engine, job_id)
    assert job.state == "done" and received_sr_uids(dest) == {job.sr_sop_instance_uid}
    assert len(dest.files()) == 2  # one SR and one heatmap SC, sent once
    engine.dispose()


def test_sigkilled_worker_job_finishes_after_restart(tmp_path: Path, tiny_bundle: Path,
                                                    storescp: Callable[..., StoreSCP]) -> None:
    # A hung PACS: a real storescp, stopped (SIGSTOP) so that connections are accepted and never answered.
    hung = storescp("HUNG")
    assert hung.proc is not None
    hung.proc.send_signal(signal.SIGSTOP)
    data_dir = tmp_path / "data"
    base: dict[str, Any] = {
        "storage": {"data_dir": str(data_dir)},
        "model": {"path": str(tiny_bundle), "device": "cpu", "cpu_threads": 1},
        "worker": {"lease_s": 3.0, "poll_interval_s": 0.2},
        "export": {"destinations": [hung.address], "network_timeout_s": 120},
    }
    settings = Settings.model_validate(base)
    engine = make_engine(settings.db_url)
    init_db(engine)
    jm = JobManager(engine, settings.worker)
    job_id = queue_instance(settings, jm)

    first, first_log = start_worker(base, tmp_path / "worker1.toml")
    try:
        deadline = time.monotonic() + 120
        while connections_to(hung.port) == 0 and time.monotonic() < deadline:
            assert first.poll() is None, first_log.read_text()[-3000:]
            time.sleep(0.1)
        assert connections_to(hung.port) > 0, first_log.read_text()[-3000:]
        victim = job_row(engine, job_id)
        assert victim.state == "exporting" and victim.lease_owner, "the worker is not mid-job"
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(10)
        hung.proc.send_signal(signal.SIGCONT)  # let the fixture stop it
    assert first.returncode == -signal.SIGKILL
    assert job_row(engine, job_id).lease_owner == victim.lease_owner  # nobody released it: the worker died

    dest = storescp("PACS")
    # this worker also serves its own health and metrics (admin.worker_port), as a scaled-out one would
    port = free_port()
    restarted = {**base, "export": {"destinations": [dest.address], "network_timeout_s": 10},
                 "admin": {"port": free_port(), "worker_port": port, "token": "worker-token"}}
    second, second_log = start_worker(restarted, tmp_path / "worker2.toml")
    try:
        deadline = time.monotonic() + 120
        while job_row(engine, job_id).state != "done" and time.monotonic() < deadline:
            assert second.poll() is None, second_log.read_text()[-3000:]
            time.sleep(0.2)
        job = job_row(engine, job_id)
        assert job.state == "done", second_log.read_text()[-3000:]
        assert received_sr_uids(dest) == {job.sr_sop_instance_uid}
        assert inference_runs(jm, job_id) == 1, "the stored outputs were not reused"
        expired = f"lease of {victim.lease_owner} expired"
        assert any(h["message"].startswith(expired) for h in jm.history(job_id))
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10,
                          headers={"Authorization": "Bearer worker-token"}) as c:
            health = c.get("/health")
            assert health.status_code == 200, health.text
            assert health.json()["checks"]["model"]["loaded"]["version"] == "0.0.0-test"
            text = c.get("/metrics").text
        # its own figures: the delivery it made, and the job's life (no inference ran here: outputs reused)
        assert f'cxrnode_exports_total{{destination="{dest.address}"}} 1.0' in text, text
        assert "cxrnode_job_seconds_count 1.0" in text
        assert httpx.get(f"http://127.0.0.1:{port}/metrics").status_code == 401  # the token is required
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(60)
    assert second.returncode == 0, second_log.read_text()[-3000:]
    log_text = second_log.read_text()
    assert "cxr-node worker starting" in log_text and "stopped" in log_text
    engine.dispose()


STORESCP_PROFILES = """[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = LittleEndianImplicit

[[PresentationContexts]]
[No3D]
PresentationContext1 = VerificationSOPClass\\Uncompressed
PresentationContext2 = SecondaryCaptureImageStorage\\Uncompressed
PresentationContext3 = ComprehensiveSRStorage\\Uncompressed
[NoSC]
PresentationContext1 = VerificationSOPClass\\Uncompressed
PresentationContext2 = Comprehensive3DSRStorage\\Uncompressed
PresentationContext3 = ComprehensiveSRStorage\\Uncompressed

[[Profiles]]
[No3D]
PresentationContexts = No3D
[NoSC]
PresentationContexts = NoSC
"""


def _pacs_without(profile: str, tmp_path: Path, storescp: Callable[..., StoreSCP]) -> StoreSCP:
    """A real storescp whose configuration lacks a SOP class, as some PACS do."""
    config = tmp_path / "storescp.cfg"
    config.write_text(STORESCP_PROFILES)
    return storescp("PACS", extra=["-xf", str(config), profile])


def _worker_for(settings: dict[str, Any], tmp_path: Path, tiny_bundle: Path, dest: StoreSCP,
                engine: Any = None) -> Worker:
    merged = {"storage": {"data_dir": str(tmp_path / "data")},
              "model": {"path": str(tiny_bundle), "device": "cpu", "cpu_threads": 1},
              "worker": {"backoff_base_s": 0.1, "backoff_max_s": 0.2, "max_attempts": 10},
              **settings}
    merged["export"] = {"destinations": [dest.address], "network_timeout_s": 5, **settings.get("export", {})}
    parsed = Settings.model_validate(merged)
    if engine is None:
        engine = make_engine(parsed.db_url)
        init_db(engine)
    return Worker(parsed, engine)


def _failed_once(dest: StoreSCP, tmp_path: Path, tiny_bundle: Path) -> tuple[Worker, int, Any]:
    """One image through a worker delivering to ``dest``: its job fails on the first attempt."""
    worker = _worker_for({}, tmp_path, tiny_bundle, dest)
    job_id = queue_instance(worker.settings, worker.jm)
    assert worker.run_once() == 1
    job = job_row(worker.engine, job_id)
    assert (job.state, job.attempts) == ("failed", 1), job.last_error
    return worker, job_id, job


def test_a_pacs_without_3d_sr_fails_the_job_once_and_the_fixed_setting_delivers_on_retry(
        tmp_path: Path, tiny_bundle: Path, storescp: Callable[..., StoreSCP]) -> None:
    """A refused SOP class is refused again on every attempt: the job fails at once (it was retried for hours,
    the heatmap sent each time), saying which setting helps; after the setting is changed an operator retry
    builds the outputs anew in the SR class the PACS takes (it resent the stored 3D SR, failing again)."""
    dest = _pacs_without("No3D", tmp_path, storescp)
    worker, job_id, job = _failed_once(dest, tmp_path, tiny_bundle)
    assert "does not accept Comprehensive 3D SR Storage" in job.last_error
    assert 'set export.sr_sop_class = "comprehensive"' in job.last_error
    assert [pydicom.dcmread(f).Modality for f in dest.files()] == ["OT"]  # the heatmap went, once

    fixed = _worker_for({"export": {"sr_sop_class": "comprehensive"}}, tmp_path, tiny_bundle, dest,
                        engine=worker.engine)
    assert fixed.jm.retry(job_id).value == "exporting"
    deadline = time.monotonic() + 60
    while job_row(worker.engine, job_id).state != "done" and time.monotonic() < deadline:
        fixed.run_once() or time.sleep(0.1)
    job = job_row(worker.engine, job_id)
    assert job.state == "done", job.last_error
    assert inference_runs(fixed.jm, job_id) == 2  # built anew
    srs = [ds for ds in map(pydicom.dcmread, dest.files()) if ds.Modality == "SR"]
    assert [ds.SOPClassUID.name for ds in srs] == ["Comprehensive SR Storage"]
    worker.engine.dispose()


def test_a_pacs_without_secondary_capture_still_gets_the_sr(tmp_path: Path, tiny_bundle: Path,
                                                             storescp: Callable[..., StoreSCP]) -> None:
    """The SR is offered after the refused heatmap (it was never sent: the radiologist got nothing); with
    send_heatmap turned off a retry sends the stored SR without running the model again."""
    dest = _pacs_without("NoSC", tmp_path, storescp)
    worker, job_id, job = _failed_once(dest, tmp_path, tiny_bundle)
    assert "set export.send_heatmap = false" in job.last_error
    assert received_sr_uids(dest) == {job.sr_sop_instance_uid}

    without_heatmap = _worker_for({"export": {"send_heatmap": False}}, tmp_path, tiny_bundle, dest,
                                  engine=worker.engine)
    without_heatmap.jm.retry(job_id)
    assert without_heatmap.run_once() == 1
    assert job_row(worker.engine, job_id).state == "done"
    assert inference_runs(worker.jm, job_id) == 1
    assert [pydicom.dcmread(f).Modality for f in dest.files()] == ["SR"]  # sent again; no heatmap ever
    worker.engine.dispose()
