"""One typed settings object for the whole node.

Values come, in increasing priority, from the model defaults below, a TOML file
(``--config FILE``, else ``$CXRNODE_CONFIG``, else ``config/cxr-node.toml`` when it
exists in the working directory), environment variables ``CXRNODE_<SECTION>_<KEY>``
(for example ``CXRNODE_LISTENER_PORT=11113`` or ``CXRNODE_ADMIN_TOKEN=...``), and
finally command-line flags. A bad value stops start-up with a :class:`ConfigError`
that names the key.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

ENV_PREFIX = "CXRNODE_"
DEFAULT_CONFIG_PATH = Path("config/cxr-node.toml")
_AET_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: 16 chars, no backslash
_DEST_RE = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>[^:@]+):(?P<port>\d{1,5})$")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the offending key."""


def _check_aet(value: str) -> str:
    value = value.strip()
    if not _AET_RE.match(value):
        raise ValueError("must be 1 to 16 printable characters without a backslash")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Peer(_Section):
    """A remote application entity: calling AE on the allow-list or an export destination."""

    ae_title: str
    host: str | None = None  # None on the allow-list: any host may use this AE title
    port: int | None = Field(default=None, ge=1, le=65535)

    _aet = field_validator("ae_title")(classmethod(lambda cls, v: _check_aet(v)))

    @field_validator("host")
    @classmethod
    def _check_host(cls, v: str | None) -> str | None:
        if v is not None and (not v.strip() or any(c.isspace() or c in "@,/\\" for c in v)):
            raise ValueError(f"host {v!r} is not a host name or address (several peers are separated by "
                             "commas)")
        return v.strip() if v is not None else v

    @classmethod
    def parse(cls, text: str) -> Peer:
        """Parse ``AET@HOST:PORT`` (destinations) or ``AET`` / ``AET@HOST`` (allow-list)."""
        m = _DEST_RE.match(text.strip())
        if m:
            return cls(ae_title=m["aet"], host=m["host"], port=int(m["port"]))
        aet, _, host = text.strip().partition("@")
        return cls(ae_title=aet, host=host or None)

    def __str__(self) -> str:
        out = self.ae_title
        if self.host:
            out += f"@{self.host}"
        if self.port:
            out += f":{self.port}"
        return out


class TLSSettings(_Section):
    enabled: bool = False
    cert_file: Path | None = None  # PEM certificate of this node
    key_file: Path | None = None  # PEM private key of this node
    ca_file: Path | None = None  # CA bundle used to verify peers
    require_client_cert: bool = False  # listener: demand a client certificate signed by ca_file


class ListenerSettings(_Section):
    ae_title: str = "CXRNODE"
    bind_address: str = "0.0.0.0"
    port: int = Field(default=11112, ge=1, le=65535)
    max_associations: int = Field(default=10, ge=1, le=1000)
    # Empty list: every calling AE is accepted (a warning is logged at start-up).
    allowed_callers: list[Peer] = Field(default_factory=list)
    network_timeout_s: float = Field(default=60.0, gt=0)
    # An instance larger than this (deflated ones: once inflated) is refused: a chest film is tens of MB.
    max_instance_mb: int = Field(default=512, ge=1)
    tls: TLSSettings = Field(default_factory=TLSSettings)

    _aet = field_validator("ae_title")(classmethod(lambda cls, v: _check_aet(v)))

    @field_validator("allowed_callers", mode="before")
    @classmethod
    def _parse_callers(cls, v: Any) -> Any:
        if isinstance(v, str):  # from the environment: comma-separated (an AE title may contain spaces)
            v = [p.strip() for p in v.split(",") if p.strip()]
        return [Peer.parse(p) if isinstance(p, str) else p for p in v]


class StorageSettings(_Section):
    data_dir: Path = Field(default_factory=lambda: Path(
        os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "cxr-node")
    # New associations are refused while less than this is free on the spool volume.
    min_free_mb: int = Field(default=1024, ge=0)
    # Spooled instances whose results were delivered are deleted after this many days (0 = never).
    retention_days: int = Field(default=30, ge=0)
    retention_cron: str = "17 3 * * *"

    @field_validator("data_dir", mode="after")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return v.expanduser()

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"


class DatabaseSettings(_Section):
    # Empty: SQLite file <data_dir>/cxr-node.db (WAL). PostgreSQL: postgresql+psycopg://user:pw@host/db
    url: str = ""


class ModelSettings(_Section):
    path: Path | None = None  # bundle dir (pinned); None = the registry current model, else the shipped one
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cpu_threads: int = Field(default=0, ge=0)  # 0 = torch default
    cam: Literal["gradcam", "gradcam++"] = "gradcam++"
    batch_size: int = Field(default=4, ge=1, le=256)

    @field_validator("path", mode="after")
    @classmethod
    def _expand(cls, v: Path | None) -> Path | None:
        return v.expanduser() if v is not None else None


class WorkerSettings(_Section):
    run_in_serve: bool = True  # `serve` also runs a worker thread
    poll_interval_s: float = Field(default=0.5, gt=0)
    lease_s: float = Field(default=300.0, gt=0)  # a claimed job not finished by then is reclaimed
    max_attempts: int = Field(default=6, ge=1)
    backoff_base_s: float = Field(default=5.0, gt=0)
    backoff_max_s: float = Field(default=900.0, gt=0)
    # Delivery tries before a job is marked failed (backoff capped at backoff_max_s: ~3 h by default).
    export_max_attempts: int = Field(default=20, ge=1)


class ExportSettings(_Section):
    # Where results go. Empty: back to the sender, looked up by calling AE in `callers`.
    destinations: list[Peer] = Field(default_factory=list)
    # Calling AE title -> address of that peer's own SCP (for "back to the sender").
    callers: dict[str, Peer] = Field(default_factory=dict)
    sr_sop_class: Literal["comprehensive3d", "comprehensive"] = "comprehensive3d"
    send_heatmap: bool = True
    network_timeout_s: float = Field(default=30.0, gt=0)
    tls: TLSSettings = Field(default_factory=TLSSettings)

    @field_validator("destinations", mode="before")
    @classmethod
    def _parse_dest(cls, v: Any) -> Any:
        if isinstance(v, str):  # from the environment: comma-separated (an AE title may contain spaces)
            v = [p.strip() for p in v.split(",") if p.strip()]
        out = []
        for p in v:
            peer = Peer.parse(p) if isinstance(p, str) else Peer.model_validate(p)
            if not peer.host or not peer.port:
                raise ValueError(f"destination {p!r} must be AET@HOST:PORT")
            out.append(peer)
        return out

    @field_validator("callers", mode="before")
    @classmethod
    def _parse_callers(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            raise ValueError('a table of the config file: [export.callers] AET = "HOST:PORT"')
        out = {}
        for aet, peer in v.items():
            if isinstance(peer, str):
                peer = Peer.parse(peer if "@" in peer else f"{aet}@{peer}")
            elif isinstance(peer, dict):
                peer = Peer(**{"ae_title": aet, **peer})
            if isinstance(peer, Peer) and not peer.port:  # no host: the host the instance came from
                raise ValueError(f"caller {aet}: {v[aet]!r} must be HOST:PORT (that peer's own listener)")
            out[aet] = peer
        return out


class AdminSettings(_Section):
    port: int = Field(default=0, ge=0, le=65535)  # 0 = admin HTTP API off
    # `cxr-node worker` serves the same API on this port (its own /health with its model, its own /metrics:
    # stage latencies, exports); 0 = off. A separate key, so a worker beside `serve` does not take its port.
    worker_port: int = Field(default=0, ge=0, le=65535)
    bind_address: str = "127.0.0.1"
    token: str = ""  # bearer token; required for every endpoint but /health


class RetrainSettings(_Section):
    cron: str = ""  # empty = no scheduled retraining
    metric: Literal["roc_auc", "f1", "accuracy", "sensitivity", "specificity"] = "roc_auc"
    margin: float = Field(default=0.0, ge=0.0, le=1.0)  # candidate must reach current - margin
    min_labelled: int = Field(default=50, ge=2)
    epochs: int = Field(default=5, ge=1)


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


class Settings(_Section):
    listener: ListenerSettings = Field(default_factory=ListenerSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    export: ExportSettings = Field(default_factory=ExportSettings)
    admin: AdminSettings = Field(default_factory=AdminSettings)
    retrain: RetrainSettings = Field(default_factory=RetrainSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)

    @property
    def db_url(self) -> str:
        return self.database.url or f"sqlite:///{self.storage.data_dir / 'cxr-node.db'}"


def _env_overrides(environ: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Map ``CXRNODE_<SECTION>_<KEY>`` variables onto the settings tree."""
    out: dict[str, dict[str, Any]] = {}
    sections = Settings.model_fields
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == "CXRNODE_CONFIG" or value == "":
            continue  # an empty variable (compose's ${VAR:-}) leaves the key to the file or its default
        rest = name[len(ENV_PREFIX):].lower()
        for section in sections:
            if rest.startswith(section + "_"):
                key = rest[len(section) + 1:]
                if key not in sections[section].annotation.model_fields:  # type: ignore[union-attr]
                    raise ConfigError(f"environment variable {name}: unknown key '{section}.{key}'")
                out.setdefault(section, {})[key] = _coerce_env(value)
                break
        else:
            raise ConfigError(f"environment variable {name}: unknown section")
    return out


def _coerce_env(value: str) -> Any:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_settings(
    config_file: str | Path | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    """Build the settings from file, then environment, then ``overrides`` (the command line).

    Raises
    ------
    ConfigError
        A file is missing or unreadable, or a value is invalid; the message names the key.
    """
    environ = dict(os.environ if environ is None else environ)
    data: dict[str, Any] = {}
    path = Path(config_file) if config_file else (
        Path(environ["CXRNODE_CONFIG"]) if environ.get("CXRNODE_CONFIG") else None)
    if path is None and DEFAULT_CONFIG_PATH.is_file():
        path = DEFAULT_CONFIG_PATH
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})"
                              ) from None
        except OSError as exc:  # a directory, no permission, ...
            raise ConfigError(f"config file {path} cannot be read: {exc.strerror or exc}") from None
    data = _merge(data, _env_overrides(environ))
    data = _merge(data, overrides or {})
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            problems.append(f"config key '{key}': {err['msg']}")
        raise ConfigError("; ".join(problems)) from None
