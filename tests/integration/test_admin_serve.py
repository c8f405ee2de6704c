"""``cxr-node serve --admin-port`` as a real process: an image sent with dcmtk storescu shows up in the
admin API, the metrics and the status page's data, with its heatmap, after delivery to a storescp PACS."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from inference.phantom import make_dicom
from tests.fixtures.common import free_port
from tests.fixtures.peers import NodeProcess, StoreSCP, storescu

pytestmark = pytest.mark.integration

TOKEN = "serve-admin-token-81f0"


def _poll(fn: Callable[[], Any], timeout: float, what: str, node: NodeProcess) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        if node.proc.poll() is not None:
            break
        time.sleep(0.3)
    raise AssertionError(f"{what} not seen after {timeout} s; node log:\n{node.log_text()[-4000:]}")


def test_serve_without_a_worker_is_healthy(node_process: Callable[..., NodeProcess]) -> None:
    """The scale-out layout (compose, the production example): serve runs the listener and no worker, so
    its /health has no model to wait for (it answered 503 "no model loaded yet" for ever, the container
    unhealthy)."""
    admin_port = free_port()
    node = node_process({"admin": {"port": admin_port, "bind_address": "127.0.0.1"},
                         "worker": {"run_in_serve": False}}, env={"CXRNODE_ADMIN_TOKEN": TOKEN})
    with httpx.Client(base_url=f"http://127.0.0.1:{admin_port}", timeout=30) as c:
        health = _poll(lambda: _get_ok(c, "/health"), 60, "admin /health", node)
        assert health["checks"]["model"] == {"ok": True, "loaded": None,
                                             "detail": "this process runs no worker"}
    assert node.stop() == 0


def test_serve_exposes_admin_api_and_metrics(node_process: Callable[..., NodeProcess],
                                             storescp: Callable[..., StoreSCP], tmp_path: Path) -> None:
    pacs = storescp("PACS")
    admin_port = free_port()
    node = node_process({"admin": {"port": admin_port, "bind_address": "127.0.0.1"},
                         "export": {"destinations": [f"PACS@127.0.0.1:{pacs.port}"]}},
                        env={"CXRNODE_ADMIN_TOKEN": TOKEN})
    base = f"http://127.0.0.1:{admin_port}"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=base, timeout=30) as c:
        health = _poll(lambda: _get_ok(c, "/health"), 60, "admin /health", node)
        assert health["checks"]["database"]["ok"] is True
        assert c.get("/api/jobs").status_code == 401  # the token from the environment is enforced

        make_dicom(tmp_path / "cr.dcm", modality="CR", shape=(384, 384), opacity=0.5, seed=11)
        sent = storescu(node.port, [tmp_path / "cr.dcm"])
        assert sent.returncode == 0, sent.stderr

        def done_job() -> dict[str, Any] | None:
            items = c.get("/api/jobs", params={"state": "done"}, headers=auth).json()["items"]
            return items[0] if items else None

        job = _poll(done_job, 180, "a done job in /api/jobs", node)
        detail = c.get(f"/api/jobs/{job['id']}", headers=auth).json()
        assert [e["to_state"] for e in detail["history"]][:2] == ["queued", "processing"]
        assert detail["history"][-1]["to_state"] == "done"
        assert [d["destination"] for d in detail["deliveries"] if d["status"] == "sent"] == \
            [f"PACS@127.0.0.1:{pacs.port}"]
        # tiny_bundle's stage 1 is fitted to phantoms: the image is assessed and has a heatmap
        assert detail["finding"] in ("positive", "negative")
        png = c.get(f"/api/jobs/{job['id']}/heatmap.png", headers=auth)
        assert detail["has_heatmap"] and png.status_code == 200
        assert png.content[:8] == b"\x89PNG\r\n\x1a\n"

        text = c.get("/metrics", headers=auth).text
        assert 'cxrnode_queue_jobs{state="done"} 1.0' in text
        assert "cxrnode_instances_received_total{" in text
        assert 'cxrnode_stage_seconds_count{stage="export"}' in text
        assert f'cxrnode_exports_total{{destination="PACS@127.0.0.1:{pacs.port}"}} 1.0' in text
        assert "cxrnode_model_info{" in text
        page = c.get("/", params={"token": TOKEN}, follow_redirects=True)  # as a browser follows the link
        assert page.status_code == 200 and f'id="job-{job["id"]}"' in page.text
        assoc = c.get("/api/associations", headers=auth).json()["items"]
        assert assoc and assoc[0]["calling_ae"] == "TESTSCU"
    assert node.stop() == 0


def _get_ok(client: httpx.Client, path: str) -> dict[str, Any] | None:
    try:
        r = client.get(path)
    except httpx.TransportError:
        return None
    return r.json() if r.status_code == 200 else None
