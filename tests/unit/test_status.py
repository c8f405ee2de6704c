"""``cxr-node status``: counts, oldest waiting job, failures with reasons, model in use; text and JSON."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from dicom_node.config import Settings
from dicom_node.db import ModelVersion, init_db, make_engine, utcnow
from dicom_node.queue import JobManager
from dicom_node.status import collect, format_text, run

pytestmark = pytest.mark.unit


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings.model_validate({"storage": {"data_dir": str(tmp_path / "data")}})


def fill(settings: Settings, clock: Callable[[], datetime] = utcnow) -> JobManager:
    engine = make_engine(settings.db_url)
    init_db(engine)
    jm = JobManager(engine, settings.worker, clock=clock)
    for i in range(4):
        jm.enqueue(sop_instance_uid=f"1.2.3.{i}", study_instance_uid="1.2", series_instance_uid="1.2.1",
                   sop_class_uid="1.2.840.10008.5.1.4.1.1.1", calling_ae="MODALITY", calling_host="10.0.0.5",
                   spool_path=f"/spool/{i}.dcm")
    claimed = jm.claim("w", limit=2)
    jm.fail(claimed[0].id, "undecodable instance: JPEG stream truncated", retryable=False, worker_id="w")
    return jm


def test_text_report(settings: Settings, tiny_bundle: Path) -> None:
    jm = fill(settings)
    with Session(jm.engine) as s, s.begin():
        s.add(ModelVersion(version="0.0.0-test", path=str(tiny_bundle), status="current",
                           promoted_at=utcnow()))
    text = format_text(collect(settings))
    assert "queued 2   processing 1   exporting 0   done 0   failed 1   ignored 0" in text
    assert "oldest waiting job: 2 (processing" in text
    assert "undecodable instance: JPEG stream truncated" in text and "from MODALITY" in text
    assert f"model: cxr-node-random 0.0.0-test (registry) at {tiny_bundle}" in text
    assert "recent failures: the newest 1 of 1" in text
    # listing fewer than have failed says so (it read "recent failures: 1" with 2 failed)
    jm.fail(jm.claim("w")[0].id, "pixel data cannot be decoded", retryable=False, worker_id="w")
    assert "recent failures: the newest 1 of 2" in format_text(collect(settings, failures=1))


def test_json_report(settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fill(settings, clock=lambda: utcnow() - timedelta(minutes=90))  # jobs received 90 minutes ago
    bundle = tmp_path / "pinned"
    bundle.mkdir()
    (bundle / "model.json").write_text(json.dumps({"name": "site-model", "version": "2.1.0"}))
    settings.model.path = bundle
    assert run(argparse.Namespace(json=True, failures=5), settings) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["counts"] == {"queued": 2, "processing": 1, "exporting": 0, "done": 0, "failed": 1,
                                "ignored": 0}
    assert report["oldest_waiting"]["job_id"] == 2
    assert 5400 <= report["oldest_waiting"]["age_s"] < 5400 + 60
    assert report["recent_failures"][0]["reason"] == "undecodable instance: JPEG stream truncated"
    assert report["model"] == {"source": "config", "path": str(bundle), "name": "site-model",
                               "version": "2.1.0", "device_uid": None}


def test_unreadable_model_card_is_reported_not_raised(settings: Settings, tmp_path: Path) -> None:
    fill(settings)
    settings.model.path = tmp_path / "missing-bundle"
    report = collect(settings)
    assert "model.json does not exist" in report["model"]["error"]
    assert "model: ? (config)" in format_text(report)


def test_missing_database_exits_1_with_a_message(settings: Settings,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert run(argparse.Namespace(json=False, failures=10), settings) == 1
    assert "the node has not run with this configuration yet" in capsys.readouterr().err
    assert not Path(settings.db_url.removeprefix("sqlite:///")).exists(), "status must not create a database"


def test_database_without_schema_exits_1(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    make_engine(settings.db_url).connect().close()  # an empty SQLite file
    assert run(argparse.Namespace(json=False, failures=10), settings) == 1
    assert "has no cxr-node schema" in capsys.readouterr().err


def test_status_command_does_not_import_torch(settings: Settings) -> None:
    fill(settings)
    code = ("import sys; from dicom_node.cli import main; "
            f"rc = main(['status', '--json', '--data-dir', {str(settings.storage.data_dir)!r}]); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["counts"]["failed"] == 1
