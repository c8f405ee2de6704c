"""Admin HTTP API over real HTTP on a free port: token, health, paging, filters, retry/resend, heatmap."""

from __future__ import annotations

import io
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node import audit
from dicom_node.admin import AdminServer, is_loopback, start_admin
from dicom_node.config import ConfigError
from dicom_node.db import Job
from tests.fixtures.common import free_port
from tests.integration.ops_support import TOKEN, NodeDb, add_models, new_node_db, populate

pytestmark = pytest.mark.integration

AUTH = {"Authorization": f"Bearer {TOKEN}"}
Node = tuple[NodeDb, AdminServer]
MODEL = {"name": "cxr-test", "version": "0.0.0-test", "device_uid": "1.2.826.0.1.3680043.10.1234.1"}


def _start_node(folder: Path) -> tuple[NodeDb, AdminServer]:
    db = populate(new_node_db(folder, admin_port=free_port()))
    add_models(db.engine)
    a1 = audit.open_association(db.engine, calling_ae="ORTHANC", host="127.0.0.1", port=50123)
    audit.close_association(db.engine, a1, instances=7)
    audit.refuse_association(db.engine, calling_ae="INTRUDER", host="127.0.0.1",
                             reason="calling AE not allowed")
    return db, start_admin(db.settings, db.engine, db.jobs, model_info=lambda: dict(MODEL))


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeDb, AdminServer]]:
    """A node read by the tests that change nothing (shared; the tests that change jobs get their own)."""
    db, server = _start_node(tmp_path_factory.mktemp("admin"))
    try:
        yield db, server
    finally:
        server.stop()


@pytest.fixture
def own_node(tmp_path: Path) -> Iterator[tuple[NodeDb, AdminServer]]:
    """A node of its own, for a test that changes jobs."""
    db, server = _start_node(tmp_path)
    try:
        yield db, server
    finally:
        server.stop()


@pytest.fixture
def client(node: tuple[NodeDb, AdminServer]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=node[1].url, timeout=30) as c:
        yield c


PROTECTED = [
    ("GET", "/"), ("GET", "/metrics"), ("GET", "/openapi.json"), ("GET", "/api/status"), ("GET", "/api/jobs"),
    ("GET", "/api/jobs/1"), ("GET", "/api/jobs/1/heatmap.png"), ("POST", "/api/jobs/4/retry"),
    ("POST", "/api/jobs/1/resend"), ("GET", "/api/models"), ("POST", "/api/models/rollback"),
    ("POST", "/api/models/1.2.0/promote"), ("GET", "/api/associations"), ("GET", "/api/deliveries"),
    ("GET", "/static/style.css"), ("GET", "/no/such/path"),
]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_every_endpoint_but_health_needs_the_token(client: httpx.Client, method: str, path: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": f"Bearer {TOKEN}x"}):
        r = client.request(method, path, headers=headers)
        assert r.status_code == 401, (method, path, headers, r.status_code)
        assert r.headers["www-authenticate"] == "Bearer"
    r = client.request(method, path, params={"token": "nope"})
    assert r.status_code == 401


def test_unauthorized_calls_change_nothing(node: Node, client: httpx.Client) -> None:
    db, _ = node
    failed = db.ids["failed"][0]
    assert client.post(f"/api/jobs/{failed}/retry").status_code == 401
    with Session(db.engine) as s:
        assert s.scalar(select(Job.state).where(Job.id == failed)) == "failed"


def test_health_is_open_and_reports_each_check(client: httpx.Client) -> None:
    r = client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert body["checks"]["database"] == {"ok": True, "dialect": "sqlite"}
    assert body["checks"]["spool_disk"]["ok"] is True and body["checks"]["spool_disk"]["free_mb"] > 0
    assert body["checks"]["model"]["loaded"] == MODEL
    assert client.get("/health/live").json() == {"status": "ok"}


def test_bearer_and_browser_token(node: Node, client: httpx.Client) -> None:
    assert client.get("/api/status", headers=AUTH).status_code == 200
    # the link with the token sets the cookie and sends the browser on without the token in the address bar
    r = client.get("/", params={"token": TOKEN, "state": "failed"})
    assert r.status_code == 303 and r.headers["location"] == "/?state=failed"
    cookie = r.headers["set-cookie"]
    assert "cxrnode_token=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    # The cookie alone now opens the page and its resources (what a browser sends for images and styles).
    with httpx.Client(base_url=str(client.base_url), cookies={"cxrnode_token": TOKEN}) as browser:
        page = browser.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert browser.get("/static/style.css").status_code == 200
        assert browser.get("/api/jobs").status_code == 200
        # a change sent with the cookie by a page of another origin (another port of this host: SameSite lets
        # it through) is refused before it reaches the job; from this origin it reaches it (409: not failed)
        queued = node[0].ids["queued"][0]
        here = str(client.base_url).rstrip("/")
        elsewhere = {"Origin": here.rsplit(":", 1)[0] + ":8042"}
        assert browser.post(f"/api/jobs/{queued}/retry", headers=elsewhere).status_code == 403
        assert browser.post(f"/api/jobs/{queued}/retry",
                            headers={"Sec-Fetch-Site": "same-site"}).status_code == 403
        assert browser.post(f"/api/jobs/{queued}/retry", headers={"Origin": here}).status_code == 409
        assert browser.post(f"/api/jobs/{queued}/retry",
                            headers={"Sec-Fetch-Site": "same-origin"}).status_code == 409
    # the bearer token is not a browser's: no origin check
    assert client.post(f"/api/jobs/{queued}/retry", headers={**AUTH, **elsewhere}).status_code == 409


def test_jobs_paging_and_state_filter(node: Node, client: httpx.Client) -> None:
    db, _ = node
    seen: list[int] = []
    for offset in (0, 10, 20):
        r = client.get("/api/jobs", params={"state": "queued", "limit": 10, "offset": offset}, headers=AUTH)
        assert r.status_code == 200
        page = r.json()
        assert page["total"] == 25 and page["limit"] == 10 and page["offset"] == offset
        assert all(j["state"] == "queued" for j in page["items"])
        seen += [j["id"] for j in page["items"]]
    assert len(seen) == 25 and len(set(seen)) == 25
    assert seen == sorted(db.ids["queued"], reverse=True)  # newest first, no gap, no repeat
    everything = client.get("/api/jobs", params={"limit": 500}, headers=AUTH).json()
    assert everything["total"] == 30
    failed = client.get("/api/jobs", params={"state": "failed"}, headers=AUTH).json()
    assert sorted(j["id"] for j in failed["items"]) == sorted(db.ids["failed"])
    assert all(j["last_error"] for j in failed["items"])
    for bad in ({"state": "lost"}, {"limit": 0}, {"limit": 501}, {"offset": -1}):
        assert client.get("/api/jobs", params=bad, headers=AUTH).status_code == 422, bad


def test_job_detail_has_history_and_deliveries(node: Node, client: httpx.Client) -> None:
    db, _ = node
    job_id = db.ids["done"][0]
    job = client.get(f"/api/jobs/{job_id}", headers=AUTH).json()
    assert job["state"] == "done" and job["finding"] == "positive"
    assert job["probability"] == pytest.approx(0.9)
    assert [e["to_state"] for e in job["history"]] == ["queued", "processing", "exporting", "done"]
    assert [d["status"] for d in job["deliveries"]] == ["failed", "sent"]
    assert job["deliveries"][0]["error"] == "association rejected"
    assert job["has_heatmap"] is True and job["sc_sop_instance_uid"]
    assert client.get("/api/jobs/999999", headers=AUTH).status_code == 404


def test_retry_failed_and_resend_done(own_node: Node) -> None:
    db, server = own_node
    with httpx.Client(base_url=server.url, timeout=30) as client:
        failed, done, queued = db.ids["failed"][1], db.ids["done"][1], db.ids["queued"][0]
        r = client.post(f"/api/jobs/{failed}/retry", headers=AUTH)
        assert r.status_code == 200 and r.json() == {"id": failed, "state": "queued"}
        with Session(db.engine) as s:
            job = s.get(Job, failed)
            assert job is not None and job.state == "queued" and job.attempts == 0
        assert client.post(f"/api/jobs/{failed}/retry", headers=AUTH).status_code == 409  # no longer failed
        assert client.post(f"/api/jobs/{queued}/retry", headers=AUTH).status_code == 409
        assert client.post(f"/api/jobs/{queued}/resend", headers=AUTH).status_code == 409
        r = client.post(f"/api/jobs/{done}/resend", headers=AUTH)
        assert r.status_code == 200 and r.json()["state"] == "exporting"  # outputs kept: only delivery again
        history = client.get(f"/api/jobs/{done}", headers=AUTH).json()["history"]
        assert history[-1]["to_state"] == "exporting" and "operator" in history[-1]["message"]
        assert client.post("/api/jobs/999999/retry", headers=AUTH).status_code == 404


def test_heatmap_png_from_the_secondary_capture(node: Node, client: httpx.Client) -> None:
    db, _ = node
    r = client.get(f"/api/jobs/{db.ids['done'][0]}/heatmap.png", params={"size": 128}, headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(r.content))
    assert img.mode == "RGB" and max(img.size) == 128
    rgb = np.asarray(img).astype(int)
    assert rgb.std() > 10  # an image, not a blank square
    assert (np.abs(rgb[..., 0] - rgb[..., 2]) > 60).mean() > 0.01  # coloured heatmap over grey
    assert client.get(f"/api/jobs/{db.ids['queued'][0]}/heatmap.png", headers=AUTH).status_code == 404


def test_models_and_associations(client: httpx.Client) -> None:
    models = client.get("/api/models", headers=AUTH).json()
    assert models["current"]["version"] == "1.1.0"
    assert [m["version"] for m in models["candidates"]] == ["1.2.0"]
    assert {m["version"] for m in models["versions"]} == {"1.0.0", "1.1.0", "1.2.0"}
    assert models["loaded"] == MODEL
    assocs = client.get("/api/associations", headers=AUTH).json()["items"]
    assert [a["calling_ae"] for a in assocs] == ["INTRUDER", "ORTHANC"]
    assert assocs[1]["instances"] == 7 and assocs[1]["refused"] is False
    refused = client.get("/api/associations", params={"refused": "true"}, headers=AUTH).json()["items"]
    assert [(a["calling_ae"], a["reason"]) for a in refused] == [("INTRUDER", "calling AE not allowed")]
    failed = client.get("/api/deliveries", params={"failed": "true"}, headers=AUTH).json()["items"]
    assert failed and all(d["status"] == "failed" for d in failed)


def test_openapi_schema_lists_the_endpoints(client: httpx.Client) -> None:
    schema = client.get("/openapi.json", headers=AUTH).json()
    assert schema["info"]["title"] == "cxr-node admin API"
    for path in ("/health", "/metrics", "/api/jobs", "/api/jobs/{job_id}", "/api/jobs/{job_id}/retry",
                 "/api/jobs/{job_id}/resend", "/api/models", "/api/models/{version}/promote",
                 "/api/models/rollback", "/api/associations", "/"):
        assert path in schema["paths"], path


def test_not_ready_when_model_missing_or_disk_low(tmp_path: Path) -> None:
    db = new_node_db(tmp_path, admin_port=free_port(), min_free_mb=10**9)
    server = start_admin(db.settings, db.engine, db.jobs, model_info=lambda: None)
    try:
        r = httpx.get(f"{server.url}/health", timeout=30)
        assert r.status_code == 503
        checks = r.json()["checks"]
        assert checks["database"]["ok"] is True
        assert checks["spool_disk"]["ok"] is False and checks["spool_disk"]["min_free_mb"] == 10**9
        assert checks["model"] == {"ok": False, "loaded": None, "error": "no model loaded yet"}
    finally:
        server.stop()


def test_empty_token_only_on_loopback(tmp_path: Path) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    open_db = new_node_db(tmp_path / "a", admin_port=0, token="", bind="0.0.0.0")
    with pytest.raises(ConfigError, match="admin.token"):
        start_admin(open_db.settings, open_db.engine, open_db.jobs)
    local = new_node_db(tmp_path / "b", admin_port=0, token="", bind="127.0.0.1")
    server = start_admin(local.settings, local.engine, local.jobs)
    try:
        assert server.port > 0
        assert httpx.get(f"{server.url}/api/jobs", timeout=30).status_code == 200  # open on loopback
        assert httpx.get(f"{server.url}/api/jobs", headers={"Host": f"localhost:{server.port}"},
                         timeout=30).status_code == 200
        # but not to a web page in a browser on this machine: another site's name pointed at 127.0.0.1 (DNS
        # rebinding), or a change sent by a page of another origin
        assert httpx.get(f"{server.url}/api/jobs", headers={"Host": "evil.example"},
                         timeout=30).status_code == 403
        assert httpx.post(f"{server.url}/api/jobs/1/retry", headers={"Origin": "https://evil.example"},
                          timeout=30).status_code == 403
        assert httpx.post(f"{server.url}/api/jobs/1/retry", headers={"Sec-Fetch-Site": "cross-site"},
                          timeout=30).status_code == 403
        assert httpx.post(f"{server.url}/api/jobs/1/retry", timeout=30).status_code == 404  # reaches the API
        health = httpx.get(f"{server.url}/health", headers={"Host": "evil.example"}, timeout=30)
        assert health.status_code in (200, 503)  # the health checks stay open to probes
    finally:
        server.stop()


def test_port_in_use_is_an_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        db = new_node_db(tmp_path, admin_port=s.getsockname()[1])
        with pytest.raises(OSError, match="admin API could not listen"):
            start_admin(db.settings, db.engine, db.jobs, startup_timeout_s=10)


def test_without_a_worker_the_model_shown_is_the_one_workers_of_this_configuration_serve(
        tmp_path: Path, tiny_bundle: Path) -> None:
    """serve without a worker showed the registry's current model even when model.path pins another one,
    which every worker then serves: on-call read the wrong model after a promotion."""
    from dicom_node.admin import start_admin
    from inference.bundle import ModelBundle

    db = new_node_db(tmp_path / "node", admin_port=free_port())
    add_models(db.engine)  # 1.1.0 is the registry's current
    model = db.settings.model.model_copy(update={"path": tiny_bundle})
    pinned = db.settings.model_copy(update={"model": model})
    served = ModelBundle.load(tiny_bundle).version
    assert served != "1.1.0"
    server = start_admin(pinned, db.engine, db.jobs)  # no model_info: this process runs no worker
    try:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client:
            status = client.get("/api/status").json()
            page = client.get("/").text
    finally:
        server.stop()
    assert status["model_loaded"] is None and status["model_current"]["version"] == "1.1.0"
    assert (status["model_served"]["source"], status["model_served"]["version"]) == ("config", served)
    assert f'id="model-version">{served}<' in page and "pinned by model.path" in page
