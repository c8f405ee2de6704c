"""Admin HTTP API and status page (FastAPI + uvicorn in a background thread).

Started by ``cxr-node serve`` when ``admin.port`` is set: :func:`start_admin` returns an :class:`AdminServer`
with ``.port`` and ``.stop()``. Endpoints (JSON unless said otherwise):

- ``GET /health`` (no token): readiness; 200 when the database answers, the spool volume has more than
  ``storage.min_free_mb`` free and the model is loaded (when this process runs one), else 503 with the failing
  check. ``GET /health/live`` (no token): 200 while the process serves HTTP.
- ``GET /metrics``: Prometheus text format (:mod:`dicom_node.metrics`).
- ``GET /api/status``: queue counts, oldest waiting job, recent failures, model in use.
- ``GET /api/jobs?state=&limit=&offset=``, ``GET /api/jobs/{id}`` (history + deliveries),
  ``POST /api/jobs/{id}/retry`` (failed jobs), ``POST /api/jobs/{id}/resend`` (done jobs: deliver the stored
  results again), ``GET /api/jobs/{id}/heatmap.png?size=`` (the heatmap secondary capture as a PNG).
- ``GET /api/models``, ``POST /api/models/{version}/promote``, ``POST /api/models/rollback``.
- ``GET /api/associations?limit=&offset=&refused=``, ``GET /api/deliveries?failed=``.
- ``GET /openapi.json``: the schema. ``GET /``: the read-only status page (HTML).

Authentication: every path but ``/health`` and ``/health/live`` needs the token of ``admin.token`` (or
``CXRNODE_ADMIN_TOKEN``) as ``Authorization: Bearer <token>``; browsers may instead open ``/?token=<token>``
once, which sets an HttpOnly, SameSite=Strict cookie ``cxrnode_token`` used by the page's images and styles.
Tokens are compared in constant time. With an empty token the API is open, which is allowed only when bound
to a loopback address: :func:`start_admin` refuses any other bind address without a token.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import uvicorn
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy import Engine
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint

from dicom_node import __version__, audit, metrics
from dicom_node import admin_data as data
from dicom_node.config import ConfigError, Settings
from dicom_node.queue import JobManager, JobState

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
TOKEN_COOKIE = "cxrnode_token"
OPEN_PATHS = frozenset({"/health", "/health/live"})
ModelInfo = Callable[[], dict[str, Any] | None]


def is_loopback(address: str) -> bool:
    """True for ``localhost`` and loopback IPv4/IPv6 addresses."""
    if address.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def _cross_origin(request: Request) -> bool:
    """Whether a browser says the request comes from a page of another origin (another port of the same host
    included, which SameSite does not stop): by Sec-Fetch-Site, else by Origin against Host."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site not in ("same-origin", "none")
    origin = request.headers.get("origin")
    return origin is not None and urlsplit(origin).netloc != request.headers.get("host", "")


class TokenMiddleware(BaseHTTPMiddleware):
    """Answer 401 to every request without the admin token, except the health endpoints."""

    def __init__(self, app: Any, token: str) -> None:
        super().__init__(app)
        self._token = token.encode("utf-8")

    def _valid(self, candidate: str | None) -> bool:
        return candidate is not None and hmac.compare_digest(candidate.encode("utf-8"), self._token)

    @staticmethod
    async def _local(request: Request, call_next: RequestResponseEndpoint) -> Response:
        """Without a token the API listens on loopback for the machine's own users; a web page open in a
        browser there must not use it: a change sent by a page of another origin is refused, and so is any
        request naming a host other than a loopback one (a page of another site whose name was pointed at
        127.0.0.1, DNS rebinding, would otherwise read and change everything)."""
        host = urlsplit(f"//{request.headers.get('host', '')}").hostname or ""
        if not is_loopback(host):
            log.warning("admin request refused: Host %r is not a loopback name", host[:100],
                        extra={"action": "admin_foreign_host", "path": request.url.path})
            return JSONResponse({"detail": "without admin.token the API answers only to localhost or a "
                                           "loopback address"}, status_code=403)
        if request.method not in SAFE_METHODS and _cross_origin(request):
            log.warning("admin request refused: sent by a page of another origin",
                        extra={"action": "admin_cross_origin", "path": request.url.path})
            return JSONResponse({"detail": "a change must come from this page"}, status_code=403)
        return await call_next(request)

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        if request.url.path in OPEN_PATHS:
            return await call_next(request)
        if not self._token:  # loopback only (start_admin): any local user, but no web page
            return await self._local(request, call_next)
        header = request.headers.get("authorization", "")
        bearer = header[7:].strip() if header[:7].lower() == "bearer " else None
        query = request.query_params.get("token")
        if self._valid(bearer):
            return await call_next(request)
        if self._valid(request.cookies.get(TOKEN_COOKIE)):
            if request.method not in SAFE_METHODS and _cross_origin(request):
                log.warning("admin request refused: sent by a page of another origin",
                            extra={"action": "admin_cross_origin", "path": request.url.path})
                return JSONResponse({"detail": "a change must come from this page, or with the bearer token"},
                                    status_code=403)
            return await call_next(request)
        if self._valid(query):
            if request.method in SAFE_METHODS:  # the token leaves the address bar (and the history) at once
                rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
                response: Response = RedirectResponse(
                    request.url.path + (f"?{urlencode(rest)}" if rest else ""), status_code=303)
            else:
                response = await call_next(request)
            response.set_cookie(TOKEN_COOKIE, query or "", httponly=True, samesite="strict",
                                secure=request.url.scheme == "https", path="/")
            return response
        log.warning("admin request without a valid token", extra={
            "action": "admin_unauthorized", "path": request.url.path,
            "client": request.client.host if request.client else ""})
        return JSONResponse({"detail": "a valid admin token is required (Authorization: Bearer <token>)"},
                            status_code=401, headers={"WWW-Authenticate": "Bearer"})


def create_app(settings: Settings, engine: Engine, job_manager: JobManager, *,
               model_info: ModelInfo | None = None) -> FastAPI:
    """The admin ASGI application (without a server), e.g. for an ASGI server of the site's choice.

    ``model_info`` returns the model this process serves (``name``, ``version``, ``device_uid``, ``path``) or
    ``None`` while none is loaded; leave it ``None`` in a process that runs no worker.
    """
    if not isinstance(settings, Settings):
        raise TypeError('Argument "settings" must be a dicom_node.config.Settings.')
    if not isinstance(engine, Engine):
        raise TypeError('Argument "engine" must be a sqlalchemy Engine.')
    if not isinstance(job_manager, JobManager):
        raise TypeError('Argument "job_manager" must be a dicom_node.queue.JobManager.')
    if model_info is not None and not callable(model_info):
        raise TypeError('Argument "model_info" must be callable or None.')

    app = FastAPI(title="cxr-node admin API", version=__version__, docs_url=None, redoc_url=None,
                  description="Operations API of cxr-node. Research use only; not for diagnostic use.")
    app.add_middleware(TokenMiddleware, token=settings.admin.token)
    app.mount("/static", StaticFiles(directory=PACKAGE_DIR / "static"), name="static")

    def loaded_model() -> dict[str, Any] | None:
        return model_info() if model_info is not None else None

    def job_or_404(job_id: int) -> dict[str, Any]:
        job = data.job_detail(engine, job_id)
        if job is None:
            raise HTTPException(404, f"job {job_id} does not exist")
        return job

    @app.get("/health", tags=["health"])
    def health() -> JSONResponse:
        """Readiness: database, spool disk above the watermark, model loaded (when this process runs one)."""
        checks = data.health_checks(settings, engine, model_info)
        ready = all(c["ok"] for c in checks.values())
        return JSONResponse({"status": "ok" if ready else "unavailable", "checks": checks},
                            status_code=200 if ready else 503)

    @app.get("/health/live", tags=["health"])
    def live() -> dict[str, str]:
        """Liveness: the process answers HTTP."""
        return {"status": "ok"}

    @app.get("/metrics", tags=["monitoring"], response_class=Response)
    def prometheus() -> Response:
        """All metrics of this process in Prometheus text format."""
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/api/status", tags=["status"])
    def status() -> dict[str, Any]:
        """Queue counts, the oldest waiting job, recent failures and the model in use."""
        return data.status_summary(engine, job_manager, loaded_model(), settings)

    @app.get("/api/jobs", tags=["jobs"])
    def list_jobs(state: JobState | None = None, limit: int = Query(50, ge=1, le=500),
                  offset: int = Query(0, ge=0)) -> dict[str, Any]:
        """Jobs, newest first, optionally of one state; ``total`` counts all matching jobs."""
        return data.list_jobs(engine, state=state.value if state else None, limit=limit, offset=offset)

    @app.get("/api/jobs/{job_id}", tags=["jobs"])
    def get_job(job_id: int) -> dict[str, Any]:
        """One job with its result, state history and delivery attempts."""
        job = job_or_404(job_id)
        job["history"] = data.jsonable(job_manager.history(job_id))
        job["deliveries"] = audit.deliveries_for(engine, job_id)
        return job

    def operator_retry(job_id: int, allowed: tuple[JobState, ...], verb: str) -> dict[str, Any]:
        job = job_or_404(job_id)
        if job["state"] not in allowed:
            raise HTTPException(409, f"job {job_id} is {job['state']}; only "
                                     f"{' or '.join(s.value for s in allowed)} jobs can be {verb}")
        try:
            new = job_manager.retry(job_id, from_states=allowed)
        except ValueError as exc:
            raise HTTPException(409, str(exc)) from None
        log.info("job %s %s by operator", job_id, verb, extra={"action": f"admin_{verb}", "job_id": job_id})
        return {"id": job_id, "state": new.value}

    @app.post("/api/jobs/{job_id}/retry", tags=["jobs"])
    def retry(job_id: int) -> dict[str, Any]:
        """Run a failed job again (delivery only when its outputs were already built)."""
        return operator_retry(job_id, (JobState.FAILED,), "retried")

    @app.post("/api/jobs/{job_id}/resend", tags=["jobs"])
    def resend(job_id: int) -> dict[str, Any]:
        """Deliver a done job's stored results again (e.g. after the PACS lost them)."""
        return operator_retry(job_id, (JobState.DONE,), "resent")

    @app.get("/api/jobs/{job_id}/heatmap.png", tags=["jobs"], response_class=Response)
    def heatmap(job_id: int, size: int = Query(256, ge=16, le=2048)) -> Response:
        """The job's heatmap secondary capture rendered as a PNG, at most ``size`` pixels on its long side."""
        job = job_or_404(job_id)
        png = data.heatmap_png(job, size)
        if png is None:
            raise HTTPException(404, f"job {job_id} has no heatmap image")
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})

    @app.get("/api/models", tags=["models"])
    def models() -> dict[str, Any]:
        """The registry's current model, candidates and history, and the model loaded by this process."""
        return {**data.model_registry(engine), "loaded": loaded_model()}

    @app.post("/api/models/{version}/promote", tags=["models"])
    def promote(version: str) -> dict[str, Any]:
        """Make ``version`` the current model (the worker picks it up without restart)."""
        return data.registry_call("promote", engine, settings, version)

    @app.post("/api/models/rollback", tags=["models"])
    def rollback() -> dict[str, Any]:
        """Return to the model that was current before the present one."""
        return data.registry_call("rollback", engine, settings, None)

    @app.get("/api/associations", tags=["audit"])
    def associations(limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0),
                     refused: bool | None = None) -> dict[str, Any]:
        """Incoming associations, newest first (calling AE, host, times, instances, refusal reason)."""
        items = audit.recent_associations(engine, limit=limit, offset=offset, refused=refused)
        return {"limit": limit, "offset": offset, "items": items}

    @app.get("/api/deliveries", tags=["audit"])
    def deliveries(limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0),
                   failed: bool = False) -> dict[str, Any]:
        """Delivery attempts of results, newest first."""
        items = audit.recent_deliveries(engine, limit=limit, offset=offset, failed_only=failed)
        return {"limit": limit, "offset": offset, "items": items}

    @app.get("/", tags=["status"], response_class=HTMLResponse)
    def status_page() -> HTMLResponse:
        """Read-only HTML status page."""
        html = data.render_status_page(settings, engine, job_manager, loaded_model())
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    return app


@dataclass
class AdminServer:
    """A running admin server: ``port`` is the bound port; ``stop()`` shuts it down."""

    server: uvicorn.Server
    thread: threading.Thread
    host: str
    port: int
    _queue_collector: metrics.QueueCollector | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and wait up to ``timeout`` seconds for the thread."""
        self.server.should_exit = True
        self.thread.join(timeout)
        metrics.unbind_queue(self._queue_collector)
        log.info("admin API stopped", extra={"action": "admin_stopped", "port": self.port})


def start_admin(settings: Settings, engine: Engine, job_manager: JobManager, *,
                model_info: ModelInfo | None = None, startup_timeout_s: float = 15.0,
                port: int | None = None, queue_gauge: bool = True) -> AdminServer:
    """Serve the admin API on ``admin.bind_address``:``port`` (default ``admin.port``) in a daemon thread.

    Port 0 binds a free port (``.port`` tells which); ``cxr-node serve`` calls this only when ``admin.port``
    is set, ``cxr-node worker`` with ``admin.worker_port``. With ``queue_gauge`` the queue-depth metric
    (installation-wide) is bound to ``job_manager.counts``: one process of the installation (``serve``)
    exports it, or summing the targets of a scale-out counts the queue once per worker.

    Raises
    ------
    ConfigError
        ``admin.token`` is empty while ``admin.bind_address`` is not a loopback address.
    OSError
        The server did not start (port in use, address not available).
    """
    host = settings.admin.bind_address
    if not settings.admin.token and not is_loopback(host):
        raise ConfigError(f"config key 'admin.token': a token is required when admin.bind_address is "
                          f"{host!r} (not loopback); set CXRNODE_ADMIN_TOKEN")
    wanted = settings.admin.port if port is None else port
    app = create_app(settings, engine, job_manager, model_info=model_info)
    config = uvicorn.Config(app, host=host, port=wanted, log_level="warning", access_log=False,
                            lifespan="off", server_header=False)
    server = uvicorn.Server(config)

    def serve() -> None:
        try:
            server.run()
        except SystemExit as exc:  # uvicorn exits when it cannot bind; report it, keep the process
            log.error("admin API could not start (exit %s)", exc.code, extra={"action": "admin_failed"})

    thread = threading.Thread(target=serve, name="cxr-admin", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise OSError(f"admin API could not listen on {host}:{wanted}")
        time.sleep(0.02)
    bound = int(server.servers[0].sockets[0].getsockname()[1])
    collector = metrics.bind_queue(job_manager.counts) if queue_gauge else None
    if not settings.admin.token:
        log.warning("admin API has no token: open to every local user of %s", host,
                    extra={"action": "admin_open"})
    log.info("admin API listening on %s:%s", host, bound, extra={"action": "admin_started", "port": bound})
    return AdminServer(server=server, thread=thread, host=host, port=bound, _queue_collector=collector)
