"""``cxr-node serve`` and ``cxr-node worker``: start the node's parts and stop them cleanly.

``serve``: schema upgrade, DICOM listener, a worker thread (``worker.run_in_serve``), the
scheduler (retention, retraining) and, when ``admin.port`` is set, the admin HTTP API.
``worker``: only the worker, for scale-out on a shared PostgreSQL queue (the scheduler runs in
``serve`` only, so retention and retraining run once per installation), and, when
``admin.worker_port`` is set, the admin HTTP API on that port: the worker's own health (its model)
and metrics (its stage latencies and exports).

SIGTERM or SIGINT: the listener stops accepting, the worker finishes the batch in hand (its jobs
end delivered or scheduled for retry, never half-done), everything is stopped, exit status 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from alembic.util.exc import CommandError
from sqlalchemy.exc import SQLAlchemyError

from dicom_node.config import ConfigError, Settings
from dicom_node.db import init_db, make_engine, safe_url, sqlite_file
from dicom_node.errors import NodeError
from dicom_node.queue import JobManager

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_STARTUP_FAILED = 1
WORKER_JOIN_TIMEOUT_S = 75.0  # on SIGTERM, the batch in hand is waited for this long: under the 90 s that the
# systemd units and the compose file give the node before they kill it, so it still logs and closes cleanly


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """``serve`` needs no options beyond the node options of :mod:`dicom_node.cli`."""


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """``worker`` options beyond the node options."""
    parser.add_argument("--once", action="store_true",
                        help="process the jobs that are due now, then exit (maintenance, tests)")


def _install_signal_handlers(stop: threading.Event) -> Callable[[], None]:
    """SIGTERM/SIGINT set ``stop``; returns a function restoring the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s; stopping", signal.Signals(signum).name, extra={"action": "node_stopping"})
        stop.set()

    for sig in previous:
        signal.signal(sig, handler)

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore


class _Node:
    """The parts one process runs; :meth:`stop` stops them in reverse order of start."""

    def __init__(self, settings: Settings, *, listener: bool, worker: bool) -> None:
        self.settings = settings
        _check_new_sqlite_file(settings)
        self.engine = make_engine(settings.db_url)
        init_db(self.engine)
        self.jm = JobManager(
            self.engine, settings.worker, export_max_attempts=settings.worker.export_max_attempts)
        self.stop_event = threading.Event()
        self.worker: Any = None
        self.worker_thread: threading.Thread | None = None
        self.server: Any = None
        self.scheduler: Any = None
        self.admin: Any = None
        self.want_listener = listener
        self.want_worker = worker
        self._stopped = False

    def start(self, *, once: bool = False) -> None:
        s = self.settings
        if self.want_worker and not self.want_listener and not s.storage.spool_dir.is_dir():
            raise ConfigError(f"storage.data_dir: spool directory {s.storage.spool_dir} does not exist on "
                              "this machine: the listener creates it at its first start, and a scale-out "
                              "worker needs the shared spool volume mounted at the same path")
        if self.want_worker:
            from dicom_node.worker import Worker

            self.worker = Worker(s, self.engine, job_manager=self.jm)
            self.worker.load_model()  # fail at start-up, not on the first image
        model = self.worker.pipeline.bundle if self.worker else None
        log.info(
            "cxr-node %s starting: AE title %s, port %s, database %s, model %s %s, device %s",
            "serve" if self.want_listener else "worker", s.listener.ae_title,
            s.listener.port if self.want_listener else "-", safe_url(s.db_url),
            getattr(model, "name", "-"), getattr(model, "version", "-"),
            getattr(self.worker.pipeline, "device", s.model.device) if self.worker else "-",
            extra={"action": "node_start"})
        if self.want_listener:
            from dicom_node.scp import start_scp

            self.server = start_scp(s, self.jm, self.engine)
            log.info("listening on %s:%s as %s", s.listener.bind_address, s.listener.port,
                     s.listener.ae_title, extra={"action": "listener_started"})
        # Scheduled retention/retraining run once per installation: in `serve` only.
        if self.want_listener:
            from dicom_node.scheduler import start_scheduler

            self.scheduler = start_scheduler(s, self.engine)
        admin_port = s.admin.port if self.want_listener else s.admin.worker_port
        if admin_port:
            from dicom_node.admin import start_admin

            # without a worker in this process (serve with worker.run_in_serve = false) there is no model to
            # wait for: /health must not stay 503 ("no model loaded yet") for ever
            self.admin = start_admin(s, self.engine, self.jm, port=admin_port,
                                     model_info=self._model_info if self.worker is not None else None,
                                     queue_gauge=self.want_listener)
        if self.worker is not None and not once:
            self.worker_thread = threading.Thread(target=self.worker.run, args=(self.stop_event,),
                                                  name="cxr-worker", daemon=True)
            self.worker_thread.start()

    def _model_info(self) -> dict[str, str] | None:
        """The model the worker serves now, for the admin API's readiness check (None: not loaded)."""
        pipeline = getattr(self.worker, "pipeline", None)
        if pipeline is None:
            return None
        b = pipeline.bundle
        return {"name": b.name, "version": b.version, "device_uid": b.device_uid, "path": str(b.path)}

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.stop_event.set()
        if self.server is not None:
            self.server.shutdown()
            log.info("listener stopped", extra={"action": "listener_stopped"})
        if self.worker_thread is not None:
            self.worker_thread.join(WORKER_JOIN_TIMEOUT_S)
            if self.worker_thread.is_alive():
                log.warning("worker did not stop in %.0f s; its leases will expire and be reclaimed",
                            WORKER_JOIN_TIMEOUT_S, extra={"action": "worker_stop_timeout"})
        if self.admin is not None:
            self.admin.stop()
        if self.scheduler is not None:
            from dicom_node.scheduler import running

            if running():
                log.warning("a scheduled retention or retraining run stops with the node; the next run takes "
                            "up what is left", extra={"action": "scheduled_run_cut_short"})
            self.scheduler.shutdown(wait=False)
        self.engine.dispose()
        log.info("cxr-node stopped", extra={"action": "node_stopped"})


def _check_new_sqlite_file(settings: Settings) -> None:
    """Before a SQLite database is created: refuse when the spool already holds instances (the database's
    volume is not mounted, or the file was deleted: a new empty queue would never process them), else say that
    a new database is being created, so that a start on an empty mount point shows in the log."""
    path = sqlite_file(settings.db_url)
    if path is None or path.exists():
        return
    spool_dir = settings.storage.spool_dir
    if spool_dir.is_dir() and next(spool_dir.glob("*/*.dcm"), None) is not None:
        raise NodeError(f"database file {path} is missing while the spool {spool_dir} holds instances (is "
                        "the database's volume mounted? if the database is gone for good, restore it from "
                        "the backup; a new empty one would leave those instances unprocessed)")
    log.warning("creating a new database %s: a first start (if this node has run before, its data volume is "
                "probably not mounted)", path, extra={"action": "database_created"})


def _run(settings: Settings, *, listener: bool, once: bool = False) -> int:
    try:
        node = _Node(settings, listener=listener, worker=settings.worker.run_in_serve or not listener)
    except SQLAlchemyError as exc:
        log.error("cannot start: database %s: %s", safe_url(settings.db_url), exc.__class__.__name__,
                  exc_info=True, extra={"action": "node_start_failed"})
        return EXIT_STARTUP_FAILED
    except (NodeError, CommandError) as exc:  # e.g. a schema upgraded by a newer version: said in one line
        log.error("cannot start: database %s: %s", safe_url(settings.db_url), exc,
                  extra={"action": "node_start_failed"})
        return EXIT_STARTUP_FAILED
    restore = _install_signal_handlers(node.stop_event)
    try:
        try:
            node.start(once=once)
        except (NodeError, ConfigError, OSError) as exc:
            log.error("cannot start: %s", exc, extra={"action": "node_start_failed"})
            return EXIT_STARTUP_FAILED
        if once:
            node.jm.reclaim_stalled()
            while node.worker.run_once():
                pass
        else:
            while not node.stop_event.wait(1.0):
                if node.worker_thread is not None and not node.worker_thread.is_alive():
                    log.error("the worker thread ended unexpectedly; stopping",
                              extra={"action": "worker_crashed"})
                    return EXIT_STARTUP_FAILED
        return EXIT_OK
    finally:
        node.stop()
        restore()


def run_serve(args: argparse.Namespace, settings: Settings) -> int:
    """``cxr-node serve``: listener + worker thread + scheduler (+ admin API); returns the exit status."""
    return _run(settings, listener=True)


def run_worker(args: argparse.Namespace, settings: Settings) -> int:
    """``cxr-node worker``: only the worker on the shared queue; returns the exit status."""
    return _run(settings, listener=False, once=bool(getattr(args, "once", False)))
