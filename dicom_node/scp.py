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
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
from typing import Any

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
from pynetdicom.transport import ThreadedAssociationServer
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
_NO_CALLER = "\x00"  # an AE title no peer can have: makes pynetdicom reject the calling AE


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
        """Why ``assoc`` was rejected: ``called_ae``, ``caller``, ``disk`` or ``busy``."""
        request = assoc.requestor.primitive
        called = str(getattr(request, "called_ae_title", "") or "").strip()
        if called != str(assoc.acceptor.ae_title).strip():
            return "called_ae"
        if not self.caller_allowed(str(assoc.requestor.ae_title).strip(), str(assoc.requestor.address)):
            return "caller"
        if self.store.disk_low():
            return "disk"
        return "busy"


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
    server = ae.start_server((listener.bind_address, listener.port), block=False, evt_handlers=handlers,
                             ssl_context=ssl_context)
    if server is None:  # only a blocking start_server returns None
        raise RuntimeError("pynetdicom did not return a server for a non-blocking start")
    log.info("DICOM listener started", extra={
        "action": "scp_started", "ae_title": listener.ae_title, "bind": listener.bind_address,
        "port": server.server_address[1], "tls": ssl_context is not None,
        "transfer_syntaxes": len(decodable_transfer_syntaxes())})
    return server
