"""The ``cxr-node`` command as a user runs it (a real subprocess of the installed entry point)."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.common import free_port

pytestmark = pytest.mark.unit

CXR_NODE = Path(sys.executable).parent / "cxr-node"


def cxr_node(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXRNODE_")}
    return subprocess.run([str(CXR_NODE), *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout)


def test_help_lists_the_commands(tmp_path: Path) -> None:
    out = cxr_node("--help", cwd=tmp_path)
    assert out.returncode == 0
    for command in ("serve", "worker", "status", "predict", "train", "evaluate", "retrain", "models"):
        assert command in out.stdout
    assert "not for diagnostic use" in out.stdout.lower()


@pytest.mark.parametrize("command", ["serve", "worker", "status"])
def test_node_commands_keep_the_documented_options(tmp_path: Path, command: str) -> None:
    out = cxr_node(command, "--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for option in ("--config", "--ae-title", "--port", "--data-dir", "--db-url", "--model", "--destination",
                   "--device", "--admin-port"):
        assert option in out.stdout
    assert ("--json" in out.stdout) == (command == "status")
    assert ("--once" in out.stdout) == (command == "worker")


def test_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[listener]\nport = 0\n")
    out = cxr_node("status", "--config", str(config), cwd=tmp_path)
    assert out.returncode == 2
    assert "listener.port" in out.stderr and "Traceback" not in out.stderr


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    out = cxr_node("worker", "--config", str(tmp_path / "absent.toml"), cwd=tmp_path)
    assert out.returncode == 2 and "does not exist" in out.stderr


def test_unusable_inputs_of_the_offline_commands_give_one_line_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_text("sop_instance_uid,finding\n1.2.3,covid\n")
    (tmp_path / "binary.csv").write_bytes(b"\xff\xfe\x00 not text")
    cases = [
        (["train", "--data", "absent", "--out", "out"], "cxr-node train: absent: neither a manifest CSV"),
        (["evaluate", "--data", "absent", "--out", "out"],
         "cxr-node evaluate: absent: neither a manifest CSV"),
        (["retrain", "--data-dir", "d", "--import-labels", "absent.csv"],
         'cxr-node retrain: Argument "labels_csv": absent.csv does not exist.'),
        (["retrain", "--data-dir", "d", "--import-labels", "labels.csv"],
         "cxr-node retrain: labels CSV labels.csv has no 'label' column"),
        (["retrain", "--data-dir", "d", "--import-labels", "binary.csv"],
         "cxr-node retrain: labels CSV binary.csv is not UTF-8 text (byte 0: invalid start byte)"),
        (["models", "--db-url", f"postgresql+psycopg://cxr:secret@127.0.0.1:{free_port()}/cxr?connect_timeout=2"],
         "cxr-node models: database postgresql+psycopg://cxr:***@127.0.0.1"),
    ]
    for args, message in cases:
        out = cxr_node(*args, cwd=tmp_path)
        assert out.returncode == 1, (args, out.stderr)
        assert out.stderr.strip().splitlines()[-1].startswith(message), (args, out.stderr)
        assert "Traceback" not in out.stderr and "secret" not in out.stderr, args


def test_no_command_prints_help_and_exits_2(tmp_path: Path) -> None:
    out = cxr_node(cwd=tmp_path)
    assert out.returncode == 2 and "COMMAND" in out.stdout


def test_worker_without_spool_or_model_stops_with_a_message(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    from dicom_node.config import Settings
    from dicom_node.service import run_worker

    settings = Settings.model_validate({"storage": {"data_dir": str(tmp_path / "data")},
                                        "model": {"path": str(tmp_path / "no-model"), "device": "cpu"}})
    caplog.set_level(logging.ERROR, logger="dicom_node.service")
    assert run_worker(argparse.Namespace(once=False), settings) == 1
    [record] = [r for r in caplog.records if getattr(r, "action", "") == "node_start_failed"]
    assert "spool directory" in record.getMessage() and "shared spool volume" in record.getMessage()

    caplog.clear()
    settings.storage.spool_dir.mkdir(parents=True)
    assert run_worker(argparse.Namespace(once=False), settings) == 1
    [record] = [r for r in caplog.records if getattr(r, "action", "") == "node_start_failed"]
    assert "cannot load the model" in record.getMessage() and "no-model" in record.getMessage()


def _node_database(tmp_path: Path, change: str) -> tuple[Any, Any]:
    """Settings of a node whose SQLite database is current, then changed by the SQL ``change``; and its
    engine (dispose it)."""
    from sqlalchemy import text

    from dicom_node.config import Settings
    from dicom_node.db import init_db, make_engine

    settings = Settings.model_validate({"storage": {"data_dir": str(tmp_path / "data")},
                                        "model": {"device": "cpu"}})
    settings.storage.spool_dir.mkdir(parents=True)
    engine = make_engine(settings.db_url)
    init_db(engine)
    with engine.begin() as conn:
        conn.execute(text(change))
    return settings, engine


def test_a_database_upgraded_by_a_newer_version_stops_the_node_with_one_clear_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An older node meeting a schema it does not know (a newer one upgraded the database) refuses to start,
    saying so, instead of two tracebacks ending in alembic's "Can't locate revision"."""
    from dicom_node.db import init_db
    from dicom_node.errors import SchemaTooNew
    from dicom_node.service import run_worker

    settings, engine = _node_database(tmp_path, "UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(SchemaTooNew, match="revision 9999, which cxr-node .* does not know"):
        init_db(engine)
    engine.dispose()
    caplog.set_level(logging.ERROR, logger="dicom_node.service")
    assert run_worker(argparse.Namespace(once=True), settings) == 1
    [record] = [r for r in caplog.records if getattr(r, "action", "") == "node_start_failed"]
    assert "a newer cxr-node upgraded it" in record.getMessage() and record.exc_info is None


def test_a_missing_sqlite_file_beside_a_spool_with_instances_stops_the_node(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The database's volume not mounted (or the file deleted) while instances wait in the spool: a new empty
    queue would never process them, so the node does not start; a first start is logged as one."""
    from dicom_node.config import Settings
    from dicom_node.service import run_worker

    settings = Settings.model_validate({"storage": {"data_dir": str(tmp_path / "data")},
                                        "model": {"path": str(tmp_path / "no-model"), "device": "cpu"}})
    waiting = settings.storage.spool_dir / "1.2.3" / "1.2.3.4.dcm"
    waiting.parent.mkdir(parents=True)
    waiting.write_bytes(b"\x00" * 132)
    caplog.set_level(logging.WARNING, logger="dicom_node.service")
    assert run_worker(argparse.Namespace(once=True), settings) == 1
    [record] = [r for r in caplog.records if getattr(r, "action", "") == "node_start_failed"]
    assert "cxr-node.db is missing while the spool" in record.getMessage()
    assert not (tmp_path / "data" / "cxr-node.db").exists()  # no new empty database

    caplog.clear()
    waiting.unlink()
    assert run_worker(argparse.Namespace(once=True), settings) == 1  # now it stops at the model
    assert [r.action for r in caplog.records][:1] == ["database_created"]


def test_a_database_with_two_schema_heads_stops_the_node_with_one_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """pg_restore into a database upgraded since the dump leaves two rows in alembic_version: one line saying
    so, not a traceback (a restart loop under systemd)."""
    from dicom_node.service import run_worker

    settings, engine = _node_database(tmp_path, "INSERT INTO alembic_version (version_num) VALUES ('0002')")
    engine.dispose()
    caplog.set_level(logging.ERROR, logger="dicom_node.service")
    assert run_worker(argparse.Namespace(once=True), settings) == 1
    [record] = [r for r in caplog.records if getattr(r, "action", "") == "node_start_failed"]
    assert record.exc_info is None and "cannot start: database" in record.getMessage()
