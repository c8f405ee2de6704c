"""Settings: defaults, TOML file, CXRNODE_ environment variables, flags; errors name the key."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from dicom_node.cli import add_node_arguments, overrides_from_args
from dicom_node.config import ConfigError, Peer, Settings, load_settings

pytestmark = pytest.mark.unit


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cxr-node.toml"
    path.write_text(text, encoding="utf-8")
    return path


def flags(*argv: str) -> dict:
    parser = argparse.ArgumentParser()
    add_node_arguments(parser)
    return overrides_from_args(parser.parse_args(list(argv)))


def test_defaults_without_any_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no config/cxr-node.toml here
    s = load_settings(environ={"XDG_DATA_HOME": str(tmp_path)})
    assert s.listener.ae_title == "CXRNODE" and s.listener.port == 11112
    assert s.worker.run_in_serve is True and s.model.device == "auto"
    assert s.db_url.startswith("sqlite:///") and s.db_url.endswith("cxr-node.db")


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    path = write(tmp_path, """
[listener]
ae_title = "FROMFILE"
port = 11200
allowed_callers = ["MODALITY@10.0.0.5", "WS1"]

[database]
url = "postgresql+psycopg://node:secret@db/cxr"

[worker]
lease_s = 120
max_attempts = 4

[export]
destinations = ["PACS@10.0.0.9:104"]
callers = { MODALITY = "MODALITY@10.0.0.5:104" }
""")
    s = load_settings(path, environ={"CXRNODE_LISTENER_PORT": "11300", "CXRNODE_WORKER_RUN_IN_SERVE": "false",
                                     "CXRNODE_ADMIN_TOKEN": "t0k"})
    assert s.listener.ae_title == "FROMFILE"
    assert s.listener.port == 11300  # the environment beats the file
    assert s.worker.run_in_serve is False and s.worker.lease_s == 120 and s.worker.max_attempts == 4
    assert s.admin.token == "t0k"
    assert [str(p) for p in s.listener.allowed_callers] == ["MODALITY@10.0.0.5", "WS1"]
    assert s.export.destinations == [Peer(ae_title="PACS", host="10.0.0.9", port=104)]
    assert s.export.callers["MODALITY"].port == 104
    assert s.db_url == "postgresql+psycopg://node:secret@db/cxr"

    s = load_settings(path, flags("--port", "11400", "--ae-title", "FLAG", "--device", "cpu",
                                  "--destination", "A@h1:11", "--destination", "B@h2:12"),
                      environ={"CXRNODE_LISTENER_PORT": "11300"})
    assert s.listener.port == 11400 and s.listener.ae_title == "FLAG"  # flags beat everything
    assert s.model.device == "cpu"
    assert [str(p) for p in s.export.destinations] == ["A@h1:11", "B@h2:12"]


def test_admin_port_flag_is_the_worker_port_for_a_worker(tmp_path: Path) -> None:
    path = write(tmp_path, "[admin]\nport = 8080\n")
    for command, expected in (("serve", (9000, 0)), ("worker", (8080, 9000))):
        parser = argparse.ArgumentParser()
        add_node_arguments(parser)
        args = parser.parse_args(["--admin-port", "9000"])
        args.command = command
        s = load_settings(path, overrides_from_args(args), environ={})
        assert (s.admin.port, s.admin.worker_port) == expected, command
    s = load_settings(path, environ={"CXRNODE_ADMIN_WORKER_PORT": "8081"})
    assert (s.admin.port, s.admin.worker_port) == (8080, 8081)


def test_config_file_from_environment_variable(tmp_path: Path) -> None:
    path = write(tmp_path, '[listener]\nae_title = "VIAENV"\n')
    assert load_settings(environ={"CXRNODE_CONFIG": str(path)}).listener.ae_title == "VIAENV"


@pytest.mark.parametrize(("text", "key"), [
    ("[listener]\nport = 70000\n", "listener.port"),
    ("[listener]\nae_title = \"THIS_AE_TITLE_IS_TOO_LONG\"\n", "listener.ae_title"),
    ("[model]\ndevice = \"tpu\"\n", "model.device"),
    ("[worker]\nlease_s = -1\n", "worker.lease_s"),
    ("[export]\ndestinations = [\"PACS@nohostport\"]\n", "export.destinations"),
    ("[listener]\nprot = 104\n", "listener.prot"),
    ("[export.callers]\nPACS = \"10.0.0.1\"\n", "export.callers"),  # no port: every delivery would fail
])
def test_bad_value_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"'{key}"):
        load_settings(write(tmp_path, text), environ={})


def test_bad_environment_variable_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CXRNODE_LISTENER_PROT"):
        load_settings(environ={"CXRNODE_LISTENER_PROT": "1"})
    with pytest.raises(ConfigError, match="listener.port"):
        load_settings(environ={"CXRNODE_LISTENER_PORT": "abc"})


def test_missing_or_broken_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", environ={})
    with pytest.raises(ConfigError, match="cxr-node.toml"):
        load_settings(write(tmp_path, "[listener\nport = 1"), environ={})
    # unreadable ones are named too, not a traceback
    with pytest.raises(ConfigError, match="cannot be read: Is a directory"):
        load_settings(tmp_path, environ={})
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes("# Göttingen\n[listener]\nport = 104\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.toml is not UTF-8 text"):
        load_settings(latin1, environ={})


def test_empty_environment_variables_leave_the_default(tmp_path: Path) -> None:
    """An empty variable (compose's ${VAR:-}) is unset: an empty model path became the working directory,
    an empty data directory put the database there too."""
    settings = load_settings(environ={"CXRNODE_MODEL_PATH": "", "CXRNODE_STORAGE_DATA_DIR": "",
                                      "CXRNODE_LISTENER_PORT": ""})
    defaults = load_settings(environ={})
    assert settings.model.path == defaults.model.path and settings.db_url == defaults.db_url
    assert settings.listener.port == defaults.listener.port
    with pytest.raises(ConfigError, match=r"export.callers.*a table of the config file"):
        load_settings(environ={"CXRNODE_EXPORT_CALLERS": "PACS=10.0.0.1:104"})


def test_settings_are_typed() -> None:
    s = Settings.model_validate({"worker": {"backoff_base_s": "2.5"}, "storage": {"data_dir": "/srv/cxr"}})
    assert s.worker.backoff_base_s == 2.5
    assert s.storage.spool_dir == Path("/srv/cxr/spool")


def test_peers_from_the_environment_are_separated_by_commas_only() -> None:
    """An AE title may contain spaces: split at them, 'CT SCANNER 1@10.0.0.5' admitted two host-less titles
    from any machine and refused the scanner itself."""
    s = load_settings(environ={"CXRNODE_LISTENER_ALLOWED_CALLERS": "CT SCANNER 1@10.0.0.5, PACS",
                               "CXRNODE_EXPORT_DESTINATIONS": "MAIN PACS@10.0.0.9:104,QA@10.0.0.8:11112"})
    assert [str(p) for p in s.listener.allowed_callers] == ["CT SCANNER 1@10.0.0.5", "PACS"]
    assert [str(p) for p in s.export.destinations] == ["MAIN PACS@10.0.0.9:104", "QA@10.0.0.8:11112"]


def test_a_peer_host_with_spaces_is_refused_naming_the_key() -> None:
    """Peers separated by spaces instead of commas became one caller with the host '10.0.0.1 QA@10.0.0.2',
    refused at every association with only a warning; start-up now stops, naming the key."""
    with pytest.raises(ConfigError, match=r"listener.allowed_callers.*separated by commas"):
        load_settings(environ={"CXRNODE_LISTENER_ALLOWED_CALLERS": "PACS@10.0.0.1 QA@10.0.0.2"})
    with pytest.raises(ConfigError, match="export.destinations"):
        load_settings(environ={"CXRNODE_EXPORT_DESTINATIONS": "PACS@pacs host:104"})
