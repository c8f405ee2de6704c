"""/metrics over real HTTP, parsed with prometheus_client's own parser; queue depth read from the database."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dicom_node import metrics
from dicom_node.admin import start_admin
from tests.fixtures.common import free_port
from tests.integration.ops_support import TOKEN, enqueue, make_failed, new_node_db

pytestmark = pytest.mark.integration

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def scrape(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """``{sample name: {sorted labels: value}}`` of one scrape."""
    r = httpx.get(f"{url}/metrics", headers=AUTH, timeout=30)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=")
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def value(samples: dict[str, dict[tuple[tuple[str, str], ...], float]], metric: str, **labels: str) -> float:
    return samples.get(metric, {}).get(tuple(sorted(labels.items())), 0.0)


def test_metrics_parse_and_follow_the_node(tmp_path: Path) -> None:
    db = new_node_db(tmp_path, admin_port=free_port())
    make_failed(db, 10)  # first: the claim inside takes the oldest queued job
    for n in range(3):
        enqueue(db, n + 1)
    server = start_admin(db.settings, db.engine, db.jobs)
    try:
        before = scrape(server.url)
        assert value(before, "cxrnode_queue_jobs", state="queued") == 3
        assert value(before, "cxrnode_queue_jobs", state="failed") == 1
        assert value(before, "cxrnode_queue_jobs", state="done") == 0  # every state present, zero included
        assert value(before, "cxrnode_queue_up") == 1

        metrics.record_received("ComputedRadiographyImageStorage")
        metrics.record_refused("disk_full")
        metrics.record_refused("disk_full")
        metrics.record_association("rejected_caller")
        metrics.observe_timings({"decode": 0.02, "stage1": 0.2, "stage2": 0.1, "cam": 0.4, "outputs": 0.05})
        with metrics.time_stage("export"):
            pass
        metrics.record_export("ORTHANC@127.0.0.1:4242", ok=False)
        metrics.record_export("ORTHANC@127.0.0.1:4242", ok=True)
        metrics.record_job_finished("done", seconds=3.5)
        metrics.set_model("cxr-test", "9.9.9", "1.2.3.4", "/models/9.9.9")
        enqueue(db, 20)

        after = scrape(server.url)
        assert value(after, "cxrnode_queue_jobs", state="queued") == 4  # read at scrape time
        assert (value(after, "cxrnode_instances_received_total", sop_class="ComputedRadiographyImageStorage")
                - value(before, "cxrnode_instances_received_total",
                        sop_class="ComputedRadiographyImageStorage")) == 1
        assert (value(after, "cxrnode_instances_refused_total", reason="disk_full")
                - value(before, "cxrnode_instances_refused_total", reason="disk_full")) == 2
        # the registry lives as long as the process (other tests count too): compare with the first scrape
        def grew(metric: str, **labels: str) -> float:
            return value(after, metric, **labels) - value(before, metric, **labels)

        assert grew("cxrnode_associations_total", result="rejected_caller") == 1
        for stage in ("decode", "stage1", "stage2", "cam", "outputs", "export"):
            assert grew("cxrnode_stage_seconds_count", stage=stage) == 1, stage
        assert grew("cxrnode_stage_seconds_bucket", stage="cam", le="0.5") == 1
        assert grew("cxrnode_stage_seconds_bucket", stage="cam", le="0.25") == 0  # 0.4 s lands above it
        assert grew("cxrnode_export_failures_total", destination="ORTHANC@127.0.0.1:4242") == 1
        assert grew("cxrnode_exports_total", destination="ORTHANC@127.0.0.1:4242") == 1  # the one that went
        assert grew("cxrnode_jobs_finished_total", outcome="done") == 1
        assert grew("cxrnode_job_seconds_count") == 1 and grew("cxrnode_job_seconds_sum") == 3.5
        assert value(after, "cxrnode_model_info", name="cxr-test", version="9.9.9", device_uid="1.2.3.4",
                     path="/models/9.9.9") == 1
    finally:
        server.stop()


def test_queue_gauge_survives_a_database_outage(tmp_path: Path) -> None:
    db = new_node_db(tmp_path, admin_port=free_port())
    server = start_admin(db.settings, db.engine, db.jobs)
    try:
        (tmp_path / "cxr-node.db").unlink()  # the file vanishes under the running node
        (tmp_path / "cxr-node.db").mkdir()  # and cannot be recreated: every new connection fails
        db.engine.dispose()
        samples = scrape(server.url)
        assert value(samples, "cxrnode_queue_up") == 0
        assert "cxrnode_queue_jobs" not in samples
        health = httpx.get(f"{server.url}/health", timeout=30)
        assert health.status_code == 503 and health.json()["checks"]["database"]["ok"] is False
    finally:
        server.stop()


def test_helpers_validate_their_arguments() -> None:
    with pytest.raises(ValueError, match='"reason"'):
        metrics.record_refused("")
    with pytest.raises(ValueError, match='"seconds"'):
        metrics.observe_stage("decode", -1.0)
    with pytest.raises(TypeError, match='"counts"'):
        metrics.QueueCollector(42)  # type: ignore[arg-type]


def test_only_the_listener_process_exports_the_queue_gauge(tmp_path: Path) -> None:
    """The queue is installation-wide: a worker's own /metrics (admin.worker_port) leaves it out, or a sum
    over the scraped targets counts every job once per worker."""
    db = new_node_db(tmp_path / "w", admin_port=free_port())
    enqueue(db, 1)
    server = start_admin(db.settings, db.engine, db.jobs, queue_gauge=False)
    try:
        text = httpx.get(f"http://127.0.0.1:{server.port}/metrics",
                         headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).text
    finally:
        server.stop()
    assert "cxrnode_stage_seconds" in text and "cxrnode_queue_jobs" not in text


def test_the_latest_admin_server_owns_the_queue_gauge(tmp_path: Path) -> None:
    first = new_node_db(tmp_path / "a", admin_port=free_port())
    second = new_node_db(tmp_path / "b", admin_port=free_port())
    enqueue(second, 1)
    enqueue(second, 2)
    s1 = start_admin(first.settings, first.engine, first.jobs)
    s2 = start_admin(second.settings, second.engine, second.jobs)
    try:
        s1.stop()  # stopping the older server leaves the newer one's binding alone
        assert value(scrape(s2.url), "cxrnode_queue_jobs", state="queued") == 2
    finally:
        s2.stop()
    assert metrics._queue_collector is None


def _bounded(call: object, seconds: float = 25.0) -> tuple[object, float]:
    """``call()`` in a daemon thread, so that a hang fails the test instead of blocking the suite."""
    import threading
    import time

    out: list[object] = []
    started = time.monotonic()
    thread = threading.Thread(target=lambda: out.append(call()), daemon=True)  # type: ignore[operator]
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still waiting after {seconds} s"
    return out[0], time.monotonic() - started


def test_a_database_that_never_answers_is_reported_down_not_waited_for(tmp_path: Path) -> None:
    """A PostgreSQL server that accepts connections and never answers (hung, or a half-open firewall): the
    health check, the metrics scrape and `cxr-node status` said nothing for ever, so cxrnode_queue_up never
    became 0 (the scrape timed out and the series vanished) and the on-call's status command hung."""
    import argparse
    import socket

    from dicom_node.admin_data import HEALTH_DB_TIMEOUT_S, health_checks
    from dicom_node.config import Settings
    from dicom_node.db import make_engine
    from dicom_node.queue import JobManager
    from dicom_node.status import run as status_run

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # the kernel completes the handshakes; nobody ever answers
    url = f"postgresql+psycopg://cxr:pw@127.0.0.1:{silent.getsockname()[1]}/cxr"
    settings = Settings.model_validate({"storage": {"data_dir": str(tmp_path / "data")},
                                        "database": {"url": url}})
    engine = make_engine(url)
    try:
        checks, seconds = _bounded(lambda: health_checks(settings, engine, None))
        assert checks["database"]["ok"] is False and "did not answer within" in checks["database"]["error"]
        assert seconds < HEALTH_DB_TIMEOUT_S + 3
        collector = metrics.QueueCollector(JobManager(engine).counts)
        families, seconds = _bounded(lambda: list(collector.collect()))
        assert [(f.name, [s.value for s in f.samples]) for f in families] == [("cxrnode_queue_up", [0.0])]
        assert seconds < metrics.QUEUE_COUNT_TIMEOUT_S + 3
        args = argparse.Namespace(failures=10, json=False)
        code, seconds = _bounded(lambda: status_run(args, settings), 45)
        assert code == 1
    finally:
        engine.dispose()
        silent.close()
