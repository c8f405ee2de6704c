"""The DICOM listener: a pynetdicom AE serving C-ECHO and C-STORE for chest radiographs.

Accepted: CR and DX (for presentation and for processing) in every transfer syntax this
installation can decode (checked at start-up against pydicom's decoders), and Secondary
Capture / Comprehensive / Comprehensive 3D / Enhanced SR only so that the node's own results
sent back to it are recognised and recorded as ``ignored`` jobs, never processed. Any other SOP
class gets its presentation context rejected, and a log line names it.

Associations are refused with A-ASSOCIATE-RJ (and a log line) when the calling AE title (and,
where the allow-list names one, its host) is not allowed, and, as "local limit exceeded"
(transient), while the spool volume is below ``storage.min_free_mb`` or
``listener.max_associations`` are already open.

Every accepted connection reads under ``listener.network_timeout_s``: a peer that stops (or
trickles) halfway through a PDU is disconnected instead of holding one of the
``max_associations`` slots for ever, and with TLS the handshake runs in the connection's own
thread under the same timeout, so one silent peer cannot stall the listener for everybody.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import (
    UID,
    AllTransferSyntaxes,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer
from sqlalchemy import Engine

from dicom_node import metrics
from dicom_node.config import Peer, Settings
from dicom_node.handlers import (
    IMAGE_SOP_CLASSES,
    OWN_OUTPUT_SOP_CLASSES,
    AssociationAudit,
    JobQueue,
    StoreContext,
    handle_accepted,
    handle_closed,
    handle_echo,
    handle_pdu,
    handle_store,
)
from dicom_node.tls import server_context

log = logging.getLogger(__name__)

UNCOMPRESSED_SYNTAXES: tuple[UID, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                                          DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian)
# Largest P-DATA PDU the node accepts: fewer, larger PDUs make ingest faster.
MAX_PDU_BYTES = 1024 * 1024
# Reading a PDU may take ``network_timeout_s`` plus one second per this many bytes received: a link that
# delivers at least this rate is never cut, a peer trickling a byte every few seconds is.
MIN_RECEIVE_BYTES_PER_S = 1024
# No PDU may be longer: P-DATA is bounded by the MAX_PDU_BYTES announced, and an A-ASSOCIATE-RQ with a
# hundred presentation contexts stays far below the slack. pynetdicom would read whatever length a header
# announces (up to 4 GiB) into memory before max_instance_mb could be checked.
MAX_PDU_READ_BYTES = MAX_PDU_BYTES + 64 * 1024
_RECV_CHUNK = 64 * 1024
_NO_CALLER = "\x00"  # an AE title no peer can have: makes pynetdicom reject the calling AE
# A-ASSOCIATE-RJ (result source, diagnostic) pairs (PS3.8 9.3.4)
_RJ_CALLING_AE = (0x01, 0x03)
_RJ_CALLED_AE = (0x01, 0x07)
_RJ_LOCAL_LIMIT = (0x03, 0x02)


def decodable_transfer_syntaxes() -> list[UID]:
    """Uncompressed syntaxes first, then every compressed syntax with an available pixel decoder."""
    out = list(UNCOMPRESSED_SYNTAXES)
    for ts in AllTransferSyntaxes:
        if ts in out or not ts.is_compressed:
            continue
        try:
            if get_decoder(ts).is_available:
                out.append(UID(ts))
        except NotImplementedError:
            continue
    return out


class Admission:
    """Decides whether an association request may proceed: allow-list and disk watermark."""

    def __init__(self, allowed: list[Peer], store: StoreContext) -> None:
        self.store = store
        self.open_to_all = not allowed
        self._rules: list[tuple[str, set[str] | None]] = []
        for peer in allowed:
            self._rules.append((peer.ae_title.strip(), _resolve(peer.host) if peer.host else None))

    def caller_allowed(self, calling_ae: str, host: str) -> bool:
        """True when ``calling_ae`` (from ``host``) is on the allow-list, or the list is empty."""
        if self.open_to_all:
            return True
        return any(aet == calling_ae and (hosts is None or host in hosts) for aet, hosts in self._rules)

    def reason(self, assoc: Association) -> str:
        """Why ``assoc`` was rejected, as the A-ASSOCIATE-RJ sent to the peer says: ``called_ae``,
        ``caller``, or, for "local limit exceeded", ``disk`` or ``busy``.

        pynetdicom checks every rule and answers with the last one broken (the association limit and the
        disk watermark over the called AE title over the calling AE title), so an unknown caller of a full
        node is told "local limit exceeded", and logged so.
        """
        answer = assoc.acceptor.primitive
        sent = (getattr(answer, "result_source", None), getattr(answer, "diagnostic", None))
        if sent == _RJ_CALLED_AE:
            return "called_ae"
        if sent == _RJ_CALLING_AE:
            return "caller"
        if sent != _RJ_LOCAL_LIMIT:  # no rejection recorded: judge the request by the same rules
            request = assoc.requestor.primitive
            called = str(getattr(request, "called_ae_title", "") or "").strip()
            if called != str(assoc.acceptor.ae_title).strip():
                return "called_ae"
            if not self.caller_allowed(str(assoc.requestor.ae_title).strip(), str(assoc.requestor.address)):
                return "caller"
        return "disk" if self.store.disk_low() else "busy"


def _resolve(host: str) -> set[str]:
    """The host's own text plus its IPv4/IPv6 addresses (resolved once, at start-up)."""
    out = {host}
    try:
        for info in socket.getaddrinfo(host, None):
            out.add(str(info[4][0]))
    except OSError as exc:
        log.warning("allow-list host %s does not resolve (%s); only the literal name matches", host, exc,
                    extra={"action": "allowlist_unresolved"})
    return out


def _current_acceptor() -> Association | None:
    thread = threading.current_thread()
    return thread if isinstance(thread, Association) and thread.is_acceptor else None


class NodeAE(AE):
    """pynetdicom AE whose admission checks see the requesting association.

    pynetdicom negotiates in the association's own thread and consults ``require_calling_aet``
    and ``maximum_associations`` there, so answering them per association gives host-aware
    allow-lists and the disk watermark the standard A-ASSOCIATE-RJ results:
    calling-AE-not-recognised (permanent) and local-limit-exceeded (transient).
    """

    def __init__(self, ae_title: str, admission: Admission, max_associations: int) -> None:
        super().__init__(ae_title)
        self.admission = admission
        self._max_assoc = max_associations

    @property  # type: ignore[override]
    def require_calling_aet(self) -> list[str]:
        assoc = _current_acceptor()
        if assoc is None:
            return []
        if self.admission.caller_allowed(str(assoc.requestor.ae_title).strip(), str(assoc.requestor.address)):
            return []
        return [_NO_CALLER]

    @require_calling_aet.setter
    def require_calling_aet(self, ae_titles: list[str]) -> None:
        raise AttributeError("the node's allow-list comes from settings.listener.allowed_callers")

    @property  # type: ignore[override]
    def maximum_associations(self) -> int:
        if _current_acceptor() is not None and self.admission.store.disk_low():
            return 0
        return self._max_assoc

    @maximum_associations.setter
    def maximum_associations(self, value: int) -> None:
        if value < 1:
            raise ValueError('Argument "maximum_associations" must be >= 1.')
        self._max_assoc = value

    def serve(self, address: tuple[str, int], evt_handlers: list[Any],
              ssl_context: ssl.SSLContext | None) -> NodeServer:
        """Listen on ``address`` in a background thread, like ``start_server(block=False)``, with a
        :class:`NodeServer`; stop it with ``.shutdown()``."""
        made = self.make_server(address, ssl_context=ssl_context, evt_handlers=evt_handlers,
                                server_class=NodeServer)
        server = cast(NodeServer, made)
        self._servers.append(server)  # as start_server does: AssociationServer.shutdown removes it
        threading.Thread(target=server.serve_forever, name="cxr-listener", daemon=True).start()
        return server


class _GuardedSocket(AssociationSocket):
    """pynetdicom's socket for one accepted connection, whose reads cannot stall for ever.

    pynetdicom reads a PDU header, then its body, from a socket without timeout: a peer that stopped
    halfway (its network lost mid-transfer, or on purpose) kept the association, and its listener slot,
    until it closed the connection. Here each read must be complete within ``network_timeout_s`` plus
    one second per ``MIN_RECEIVE_BYTES_PER_S`` bytes received, with no pause longer than
    ``network_timeout_s``; otherwise it logs ``association_stalled`` and ends short, as when the peer
    closes, which pynetdicom takes as the connection lost: an accepted association is aborted
    (``EVT_ABORTED``, audited), a request is dropped, and the thread ends either way.
    """

    def recv(self, nr_bytes: int) -> bytearray:
        if nr_bytes > MAX_PDU_READ_BYTES:  # read as a closed connection: pynetdicom drops it
            host = str(self.assoc.requestor.address)
            log.warning("peer %s:%s announced a PDU of %d bytes, more than the %d this node reads; closing "
                        "its connection", host, self.assoc.requestor.port, nr_bytes, MAX_PDU_READ_BYTES,
                        extra={"action": "association_oversized_pdu", "calling_host": host})
            return bytearray()
        timeout = self.assoc.network_timeout
        sock = self.socket
        if not timeout or sock is None:
            return super().recv(nr_bytes)
        started = time.monotonic()
        data = bytearray()
        try:
            while len(data) < nr_bytes:
                left = started + timeout + len(data) / MIN_RECEIVE_BYTES_PER_S - time.monotonic()
                if left <= 0:
                    self._stalled(len(data), nr_bytes, started)
                    break
                sock.settimeout(min(left, timeout))
                try:
                    chunk = sock.recv(min(_RECV_CHUNK, nr_bytes - len(data)))
                except TimeoutError:
                    self._stalled(len(data), nr_bytes, started)
                    break
                if not chunk:  # closed by the peer
                    break
                data.extend(chunk)
        finally:
            if self.socket is not None:
                sock.settimeout(timeout)  # sends stay bounded too, never by what was left of a read
        return data

    def _stalled(self, received: int, expected: int, started: float) -> None:
        assoc = self.assoc
        answer = assoc.acceptor.primitive
        accepted = answer is not None and getattr(answer, "result", None) == 0x00
        host, port = str(assoc.requestor.address), assoc.requestor.port
        calling_ae = str(assoc.requestor.ae_title).strip() if assoc.requestor.primitive is not None else ""
        log.warning("peer %s:%s stalled: %d of %d bytes of a PDU in %.1f s; closing its %s", host, port,
                    received, expected, time.monotonic() - started,
                    "association" if accepted else "connection", extra={
                        "action": "association_stalled", "calling_ae": calling_ae, "calling_host": host,
                        "calling_port": port, "accepted": accepted})
        if not accepted:  # an accepted one was counted as such, and its abort is audited
            metrics.record_association("rejected_stalled")


class _ConnectionHandler(RequestHandler):
    """One accepted connection, in its own thread: the TLS handshake (if any), then pynetdicom's
    association, whose socket reads are bounded (:class:`_GuardedSocket`)."""

    server: NodeServer

    def handle(self) -> None:
        if isinstance(self.request, ssl.SSLSocket) and not self._handshake(self.request):
            return
        super().handle()

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        sock = assoc.dul.socket
        if type(sock) is AssociationSocket:
            sock.__class__ = _GuardedSocket  # the same object (the subclass adds no state), reads bounded
        return assoc

    def _handshake(self, sock: ssl.SSLSocket) -> bool:
        """Complete the TLS handshake within the socket's timeout; on failure log it, close, return False."""
        host, port = str(self.client_address[0]), int(self.client_address[1])
        try:
            with self.server.handshaking(sock):
                sock.do_handshake()
            return True
        except TimeoutError:
            why = f"no handshake within {sock.gettimeout():g} s"
        except ssl.SSLError as exc:
            why = str(exc.reason or exc)
        except (OSError, ValueError) as exc:  # reset by the peer, or cut short by the listener's shutdown
            why = getattr(exc, "strerror", None) or type(exc).__name__
        log.warning("TLS handshake with %s:%s failed (%s); connection closed", host, port, why, extra={
            "action": "tls_handshake_failed", "calling_host": host, "calling_port": port, "reason": why})
        metrics.record_association("rejected_tls")
        self.server.shutdown_request(sock)
        return False


class NodeServer(ThreadedAssociationServer):
    """pynetdicom's threaded association server, with every accepted socket under ``network_timeout_s``.

    pynetdicom does the TLS handshake in its accept loop, on a socket without timeout: one peer that
    connects and sends nothing stopped every other connection, and the listener's shutdown. Here the
    accept loop only wraps the socket; the handshake runs in the connection's thread under the timeout,
    and shutting the listener down cuts the handshakes still in progress.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("request_handler", _ConnectionHandler)
        self._handshakes: set[ssl.SSLSocket] = set()
        self._handshakes_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = cast(socket.socket, self.socket).accept()
        client.settimeout(self.ae.network_timeout)
        if self.ssl_context is not None:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    @contextmanager
    def handshaking(self, sock: ssl.SSLSocket) -> Iterator[None]:
        """Track ``sock`` as in its TLS handshake, so that :meth:`server_close` can cut it short."""
        with self._handshakes_lock:
            self._handshakes.add(sock)
        try:
            yield
        finally:
            with self._handshakes_lock:
                self._handshakes.discard(sock)

    def server_close(self) -> None:
        with self._handshakes_lock:
            pending = list(self._handshakes)
        for sock in pending:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # its thread's handshake fails at once
            except OSError:
                continue
        super().server_close()  # joins the connection threads


def _handle_rejected(event: Any, admission: Admission, audit: AssociationAudit | None) -> None:
    assoc = event.assoc
    reason = admission.reason(assoc)
    text = {"called_ae": "the called AE title is not this node's",
            "caller": "calling AE title (or its host) is not on the allow-list",
            "disk": f"less than {admission.store.min_free_mb} MiB free on the spool volume",
            "busy": "maximum number of associations reached"}[reason]
    calling_ae = str(assoc.requestor.ae_title).strip()
    host = str(assoc.requestor.address)
    log.warning("association rejected: %s", text, extra={
        "action": "association_rejected", "reason": reason, "calling_ae": calling_ae, "calling_host": host})
    metrics.record_association(f"rejected_{reason}")
    if audit is not None:
        try:
            audit.rejected(calling_ae=calling_ae, host=host, port=assoc.requestor.port, reason=text)
        except Exception as exc:  # the audit never changes the answer to the peer
            log.error("association audit failed (%s: %s)", type(exc).__name__, exc,
                      extra={"action": "audit_failed"})


def _handle_accepted(event: Any, ctx: StoreContext) -> None:
    metrics.record_association("accepted")
    handle_accepted(event, ctx)


def build_ae(settings: Settings, store: StoreContext) -> NodeAE:
    """The configured AE (contexts, timeouts, limits); not yet listening."""
    listener = settings.listener
    admission = Admission(listener.allowed_callers, store)
    ae = NodeAE(listener.ae_title, admission, listener.max_associations)
    ae.network_timeout = listener.network_timeout_s
    ae.acse_timeout = listener.network_timeout_s
    ae.dimse_timeout = listener.network_timeout_s
    ae.maximum_pdu_size = MAX_PDU_BYTES
    ae.require_called_aet = True
    syntaxes = decodable_transfer_syntaxes()
    ae.add_supported_context(Verification)
    for sop_class in IMAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, syntaxes)
    for sop_class in OWN_OUTPUT_SOP_CLASSES:
        ae.add_supported_context(sop_class, syntaxes if sop_class.name.startswith("Secondary")
                                 else list(UNCOMPRESSED_SYNTAXES))
    return ae


def start_scp(settings: Settings, job_manager: JobQueue, engine: Engine | None) -> ThreadedAssociationServer:
    """Start listening on ``listener.bind_address:listener.port`` in background threads.

    Parameters
    ----------
    settings
        The node settings (listener, storage, TLS).
    job_manager
        The queue that records each received instance (``dicom_node.queue.JobManager``).
    engine
        The process's database engine, for the association audit trail; ``None`` disables the audit.

    Returns
    -------
    pynetdicom.transport.ThreadedAssociationServer
        Call ``.shutdown()`` to stop listening.

    Raises
    ------
    dicom_node.tls.TLSConfigError
        TLS is enabled but its files are missing or invalid.
    OSError
        The spool directory cannot be created or the port cannot be bound; ``FileNotFoundError`` when it is
        missing while the queue holds jobs (its volume is probably not mounted: creating an empty directory
        would hide their files and take new instances onto the wrong disk).
    """
    if not isinstance(settings, Settings):
        raise TypeError('Argument "settings" must be a Settings.')
    spool_dir = settings.storage.spool_dir
    if not spool_dir.is_dir():
        try:
            held = sum(n for state, n in job_manager.counts().items() if state != "ignored")
        except Exception as exc:  # the database is down: its outage is answered per C-STORE
            log.warning("cannot count the queue before creating the spool directory (%s)", type(exc).__name__,
                        extra={"action": "spool_check_skipped"})
            held = 0
        if held:
            raise FileNotFoundError(
                errno.ENOENT, f"spool directory missing while the queue holds {held} job(s) with files in it "
                "(is its volume mounted? if the files are gone for good, create the directory by hand)",
                str(spool_dir))
        spool_dir.mkdir(parents=True, exist_ok=True)
    audit = AssociationAudit(engine) if engine is not None else None
    store = StoreContext(spool_dir, job_manager, min_free_mb=settings.storage.min_free_mb, audit=audit,
                         max_instance_mb=settings.listener.max_instance_mb)
    ae = build_ae(settings, store)
    ssl_context = server_context(settings.listener.tls)
    handlers: list[Any] = [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [store]),
        (evt.EVT_PDU_RECV, handle_pdu, [store]),
        (evt.EVT_ACCEPTED, _handle_accepted, [store]),
        (evt.EVT_REJECTED, _handle_rejected, [ae.admission, audit]),
        (evt.EVT_RELEASED, handle_closed, [store]),
        (evt.EVT_ABORTED, handle_closed, [store]),
    ]
    listener = settings.listener
    if ae.admission.open_to_all:
        log.warning("listener.allowed_callers is empty: every calling AE title is accepted",
                    extra={"action": "allowlist_open"})
    if not settings.export.destinations and not settings.export.callers:
        log.warning("export.destinations and export.callers are empty: results are built and kept, but no "
                    "job can be delivered (each fails with 'no export destination' until one is configured "
                    "and the job retried)", extra={"action": "export_unrouted"})
    server = ae.serve((listener.bind_address, listener.port), handlers, ssl_context)
    log.info("DICOM listener started", extra={
        "action": "scp_started", "ae_title": listener.ae_title, "bind": listener.bind_address,
        "port": server.server_address[1], "tls": ssl_context is not None,
        "transfer_syntaxes": len(decodable_transfer_syntaxes())})
    return server
