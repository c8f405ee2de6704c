"""Model registry through the admin API: promote a candidate, roll back, errors as 404 / 409."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from dicom_node.admin import start_admin
from inference.bundle import make_random_bundle
from tests.fixtures.common import free_port
from tests.integration.ops_support import TOKEN, new_node_db
from training import registry

pytestmark = pytest.mark.integration

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_promote_and_roll_back_over_http(tmp_path: Path) -> None:
    db = new_node_db(tmp_path / "node", admin_port=free_port())
    for version in ("1.0.0", "1.1.0"):
        bundle = make_random_bundle(tmp_path / version, seg_size=32, cls_size=32, version=version)
        registry.register(db.engine, bundle, metrics={"roc_auc": 0.9})
    server = start_admin(db.settings, db.engine, db.jobs)
    try:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
            models = c.get("/api/models").json()
            assert models["current"] is None
            assert {m["version"] for m in models["candidates"]} == {"1.0.0", "1.1.0"}
            assert c.post("/api/models/9.9.9/promote").status_code == 404
            r = c.post("/api/models/1.0.0/promote")
            assert r.status_code == 200, r.text
            assert r.json()["current"]["version"] == "1.0.0"
            assert c.post("/api/models/1.0.0/promote").status_code == 409  # already current
            assert c.post("/api/models/1.1.0/promote").json()["current"]["version"] == "1.1.0"
            models = c.get("/api/models").json()
            assert {m["version"]: m["status"] for m in models["versions"]} == {"1.0.0": "retired",
                                                                              "1.1.0": "current"}
            r = c.post("/api/models/rollback")
            assert r.status_code == 200, r.text
            assert r.json()["current"]["version"] == "1.0.0"
            assert registry.current(db.engine)["version"] == "1.0.0"  # type: ignore[index]
            assert c.post("/api/models/rollback").status_code == 409  # nothing earlier left
            assert c.post("/api/models/rollback", headers={"Authorization": "Bearer x"}).status_code == 401
    finally:
        server.stop()


def test_rollback_over_http_to_a_bundle_that_no_longer_loads_is_refused(tmp_path: Path) -> None:
    """409 naming the missing file; the version rolled back from stays current (the worker serves it)."""
    db = new_node_db(tmp_path / "node", admin_port=free_port())
    for version in ("1.0.0", "1.1.0"):
        registry.register(db.engine, make_random_bundle(tmp_path / version, seg_size=32, cls_size=32,
                                                        version=version))
        registry.promote(db.engine, version)
    (tmp_path / "1.0.0" / "classifier.safetensors").unlink()
    server = start_admin(db.settings, db.engine, db.jobs)
    try:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
            r = c.post("/api/models/rollback")
            assert r.status_code == 409, r.text
            assert "model version 1.0.0 cannot be loaded" in r.text
            assert "missing weights file classifier.safetensors" in r.text
            models = c.get("/api/models").json()
            assert models["current"]["version"] == "1.1.0"
            assert {m["version"]: m["status"] for m in models["versions"]} == {"1.0.0": "retired",
                                                                              "1.1.0": "current"}
    finally:
        server.stop()
