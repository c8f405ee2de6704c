"""Database schema and engine: the durable queue, its history, the audit trail and the model registry.

SQLite (one file, WAL, ``synchronous=FULL``) is the default; PostgreSQL (``postgresql+psycopg://``)
is used when several machines share one queue. The schema is created and upgraded only by Alembic
(:func:`init_db`), never by ``metadata.create_all``, so every installation has the same history.
Make one engine per process with :func:`make_engine` and share it between threads.

Times are naive UTC ``datetime`` values everywhere (the same on SQLite and PostgreSQL).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar, cast

from sqlalchemy import (
    JSON,
    DateTime,
    Engine,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000
PG_CONNECT_TIMEOUT_S = 10
# libpq: keepalive probes on an idle connection, and unacknowledged data given up after 30 s (milliseconds)
PG_TCP_SETTINGS = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3,
                   "tcp_user_timeout": 30000}

T = TypeVar("T")
# Key of the PostgreSQL advisory lock that serialises concurrent schema upgrades (several workers starting).
_MIGRATION_LOCK_KEY = 0x6378726E6F6465  # "cxrnode"


def utcnow() -> datetime:
    """The current time as naive UTC, the form every timestamp column holds."""
    return datetime.now(UTC).replace(tzinfo=None)


def within(seconds: float, call: Callable[[], T], what: str) -> T:
    """``call()``, waited for at most ``seconds`` in a daemon thread: ``TimeoutError`` naming ``what`` when it
    has not returned by then. A database server that accepts connections but no longer answers holds a query
    for ever (no client-side timeout covers it): health checks, metrics scrapes and ``cxr-node status`` must
    report the outage instead of hanging with it."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, name=f"cxr-db-{what}", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"{what}: the database did not answer within {seconds:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return cast(T, outcome["value"])


def database_clock(engine: Engine, read_every_s: float = 60.0) -> Callable[[], datetime]:
    """The database server's clock as naive UTC: on a PostgreSQL queue shared by several machines, one
    clock stamps and judges every lease and backoff, whatever each machine's own clock says. It is read once
    every ``read_every_s`` and carried forward with this machine's monotonic clock in between, so a C-STORE
    or a claim costs no extra round trip."""
    query = text("SELECT statement_timestamp() AT TIME ZONE 'UTC'")
    lock = threading.Lock()
    read: list[tuple[float, datetime]] = []  # (monotonic time, database time) of the last reading

    def now() -> datetime:
        with lock:
            if not read or time.monotonic() - read[0][0] >= read_every_s:
                with engine.connect() as conn:
                    value = cast(datetime, conn.execute(query).scalar_one())
                read[:] = [(time.monotonic(), value)]
            at, value = read[0]
            return value + timedelta(seconds=time.monotonic() - at)

    return now


class Base(DeclarativeBase):
    """Declarative base of every table of the node."""


_UNPURGED = ("purged_at IS NULL AND finished_at IS NOT NULL "
             "AND (spool_path != '' OR output_dir IS NOT NULL)")


class Job(Base):
    """One received instance and what became of it. State changes only through ``dicom_node.queue``."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_claim", "state", "not_before"),
        Index("ix_jobs_lease", "state", "lease_expires_at"),
        # the finished jobs whose files retention has not deleted yet: all a retention run has to look at
        Index("ix_jobs_unpurged", "id", sqlite_where=text(_UNPURGED), postgresql_where=text(_UNPURGED)),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    calling_ae: Mapped[str] = mapped_column(String(16))
    calling_host: Mapped[str] = mapped_column(String(255))
    spool_path: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    not_before: Mapped[datetime | None] = mapped_column(DateTime)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    # finding, probability, threshold, reason, reason_code, lung_attention, model_name, model_version
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    output_dir: Mapped[str | None] = mapped_column(Text)  # built SR/SC files, kept for export retries
    sr_sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    sc_sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
    # reception, or an operator's retry / resend: the waiting and time-to-delivery ages count from here
    waiting_since: Mapped[datetime | None] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    purged_at: Mapped[datetime | None] = mapped_column(DateTime)  # retention deleted the job's files
    association_id: Mapped[int | None] = mapped_column(
        ForeignKey("associations.id", ondelete="SET NULL"), index=True)


class JobEvent(Base):
    """One state transition of a job (its history, shown by the admin API)."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    from_state: Mapped[str | None] = mapped_column(String(16))  # None for the creation event
    to_state: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text, default="")


class Association(Base):
    """Audit record of one incoming association (accepted or refused)."""

    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    calling_ae: Mapped[str] = mapped_column(String(16))
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int | None] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime)
    instances: Mapped[int] = mapped_column(Integer, default=0)
    refused: Mapped[bool] = mapped_column(default=False)
    reason: Mapped[str] = mapped_column(Text, default="")


class Delivery(Base):
    """Audit record of one attempt to send a job's results to one destination."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    destination: Mapped[str] = mapped_column(String(300))  # AET@HOST:PORT
    status: Mapped[str] = mapped_column(String(16))  # sent | failed
    error: Mapped[str | None] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)


class ModelVersion(Base):
    """The model registry: at most one row is ``current``; the worker serves that one."""

    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    version: Mapped[str] = mapped_column(String(64), unique=True)
    path: Mapped[str] = mapped_column(Text)  # model bundle directory
    status: Mapped[str] = mapped_column(String(16), index=True)  # current | candidate | retired | rejected
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    promoted_at: Mapped[datetime | None] = mapped_column(DateTime)
    device_uid: Mapped[str | None] = mapped_column(String(64))


def is_sqlite(engine: Engine) -> bool:
    """True when ``engine`` talks to SQLite."""
    return engine.dialect.name == "sqlite"


def safe_url(url: str) -> str:
    """``url`` with the password masked, for logs and status output."""
    return make_url(url).render_as_string(hide_password=True)


def make_engine(url: str, **kwargs: Any) -> Engine:
    """Create the process's engine for ``url``.

    SQLite: the parent directory is created; every connection uses WAL, ``synchronous=FULL`` (an
    acknowledged C-STORE survives a power cut), a busy timeout and foreign keys; every transaction
    starts with ``BEGIN IMMEDIATE`` so writers queue up instead of failing half-way. PostgreSQL:
    ``postgresql://`` URLs are routed to psycopg 3; connections are checked before use.
    """
    if not isinstance(url, str) or not url:
        raise ValueError('Argument "url" must be a non-empty database URL.')
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        file = sqlite_file(url)
        if file is not None:
            file.parent.mkdir(parents=True, exist_ok=True)
        kwargs.setdefault("connect_args", {}).setdefault("timeout", SQLITE_BUSY_TIMEOUT_MS / 1000)
        engine = create_engine(parsed, **kwargs)
        _configure_sqlite(engine)
        return engine
    if backend == "postgresql":
        if parsed.get_driver_name() in ("", "psycopg2", "psycopg"):
            parsed = parsed.set(drivername="postgresql+psycopg")
        kwargs.setdefault("pool_pre_ping", True)
        if "connect_timeout" not in parsed.query:  # a server that never answers: 10 s, not for ever
            kwargs.setdefault("connect_args", {}).setdefault("connect_timeout", PG_CONNECT_TIMEOUT_S)
        # a database host that crashed or dropped off the network sends no reset: without these a query
        # waits for the kernel's retransmission timeout (about 15 minutes), holding a C-STORE or a worker
        for key, value in PG_TCP_SETTINGS.items():
            if key not in parsed.query:
                kwargs.setdefault("connect_args", {}).setdefault(key, value)
        return create_engine(parsed, **kwargs)
    raise ValueError(f'Argument "url" uses the unsupported database {backend!r} (use sqlite or postgresql).')


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL; None for another database, an in-memory or a ``file:`` URI one."""
    parsed = make_url(url)
    database = parsed.database or ""
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:" or database.startswith(
            "file:"):
        return None
    return Path(database).expanduser()


_READ_ONLY = "cxr_read_only"


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves (below)
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # a writer takes the write lock at once (no deadlock upgrading a read lock); a reader of ``reading``
        # takes none: under WAL it reads its snapshot while C-STOREs and workers go on writing
        conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(_READ_ONLY) else "BEGIN IMMEDIATE")


def reading(engine: Engine) -> Engine:
    """``engine`` for transactions that only read (status, lists, metrics, retention's scan): on SQLite they
    do not take the write lock, which every other transaction takes at its start."""
    return engine.execution_options(**{_READ_ONLY: True})


def init_db(engine: Engine) -> None:
    """Create or upgrade the schema to the newest revision (``alembic upgrade head``).

    Runs from the migrations shipped inside the package; no ``alembic.ini`` is needed. On
    PostgreSQL an advisory lock lets several processes start at once safely.

    Raises
    ------
    dicom_node.errors.SchemaTooNew
        The database is at a revision this version does not know: a newer cxr-node upgraded it.
    """
    from alembic import command
    from alembic.config import Config
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from dicom_node import __version__
    from dicom_node.errors import SchemaTooNew

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    script = ScriptDirectory.from_config(cfg)
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK_KEY})
        current = MigrationContext.configure(conn).get_current_revision()
        if current is not None and current not in {r.revision for r in script.walk_revisions()}:
            raise SchemaTooNew(
                f"the database's schema is at revision {current}, which cxr-node {__version__} does not know "
                f"(its newest is {script.get_current_head()}): a newer cxr-node upgraded it; run that "
                "version, or restore the backup taken before the upgrade")
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    log.info("database schema is up to date", extra={"action": "db_ready", "db": safe_url(str(engine.url))})
