"""pynetdicom event handlers: C-ECHO, C-STORE, and the association audit.

The association thread only spools and enqueues. ``handle_store`` reads a few header elements
(never the pixel data), writes the received bytes atomically to the spool, records a job in the
database, and only then answers success. Any failure maps to a named status; nothing raises to
the peer. A duplicate SOP Instance UID is acknowledged and processed once.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, Protocol, cast

from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    EnhancedSRStorage,
    SecondaryCaptureImageStorage,
)
from pydicom.valuerep import validate_value
from sqlalchemy import Engine

from dicom_node import audit, metrics, spool
from dicom_node.outputs import is_own_output
from dicom_node.queue import JobState
from inference.imaging import MAX_PIXELS

log = logging.getLogger(__name__)

# DIMSE status codes (PS3.4 Annex B.2 / PS3.7 Annex C), named once.
SUCCESS = 0x0000
REFUSED_SOP_CLASS_NOT_SUPPORTED = 0x0122
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000

# A-ASSOCIATE-AC presentation context result (PS3.8 Table 9-18): the SOP class itself was refused.
CONTEXT_ABSTRACT_SYNTAX_NOT_SUPPORTED = 0x03

# Radiographs the node processes.
IMAGE_SOP_CLASSES: tuple[UID, ...] = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
)
# Accepted only so that the node's own results sent back to it are recognised and ignored.
OWN_OUTPUT_SOP_CLASSES: tuple[UID, ...] = (
    SecondaryCaptureImageStorage,
    ComprehensiveSRStorage,
    Comprehensive3DSRStorage,
    EnhancedSRStorage,
)

_HEADER_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Rows", "Columns"]


class JobQueue(Protocol):
    """The part of ``dicom_node.queue.JobManager`` the listener uses."""

    def enqueue(self, *, sop_instance_uid: str, study_instance_uid: str, series_instance_uid: str,
                sop_class_uid: str, calling_ae: str, calling_host: str, spool_path: str,
                association_id: int | None = None) -> tuple[int, bool]: ...

    def record_ignored(self, *, sop_instance_uid: str, study_instance_uid: str, series_instance_uid: str,
                       sop_class_uid: str, calling_ae: str, calling_host: str, reason: str,
                       association_id: int | None = None) -> tuple[int, bool]: ...

    def counts(self) -> dict[str, int]: ...

    def uses_file(self, job_id: int, spool_path: str) -> bool: ...

    def references(self, spool_path: str) -> bool: ...

    def restore(self, job_id: int, spool_path: str) -> tuple[JobState | None, bool]: ...


class AssociationAudit:
    """The association audit trail (``dicom_node.audit``) bound to the process's engine."""

    def __init__(self, engine: Engine) -> None:
        if not isinstance(engine, Engine):
            raise TypeError('Argument "engine" must be a SQLAlchemy Engine.')
        self.engine = engine

    def opened(self, *, calling_ae: str, host: str, port: int | None) -> int:
        """Record an accepted association; returns its id (``Job.association_id``)."""
        return audit.open_association(self.engine, calling_ae=calling_ae[:16], host=host, port=port)

    def rejected(self, *, calling_ae: str, host: str, port: int | None, reason: str) -> None:
        """Record an association refused at negotiation."""
        audit.refuse_association(self.engine, calling_ae=calling_ae[:16], host=host, port=port, reason=reason)

    def closed(self, association_id: int, *, instances: int, outcome: str, refused: int = 0) -> None:
        """Close an association's record with the number of instances acknowledged, how it ended when not by
        a release, and how many C-STOREs were refused (their reasons are in the log)."""
        reason = [] if outcome == "released" else [outcome]
        if refused:
            reason.append(f"{refused} C-STORE(s) refused")
        audit.close_association(self.engine, association_id, instances=instances, reason="; ".join(reason))


@dataclass
class _AssocState:
    calling_ae: str
    calling_host: str
    calling_port: int | None = None
    association_id: int | None = None
    instances: int = 0
    refused: int = 0
    incoming: int = 0  # data set bytes of the message being received
    cut_off: bool = False  # aborted for an instance over listener.max_instance_mb
    thread: Any = None  # a weak reference to the association (a thread)
    started: float = field(default_factory=time.monotonic)


class StoreContext:
    """What the handlers need, made once at start-up and shared by every association thread.

    Parameters
    ----------
    spool_dir
        Directory of the durable spool (``settings.storage.spool_dir``).
    job_manager
        The queue; ``enqueue`` must be safe to call from several threads.
    min_free_mb
        A C-STORE is answered ``OUT_OF_RESOURCES`` while less than this is free on the spool volume.
    audit
        Optional association audit trail.
    max_instance_mb
        A larger instance (a deflated one: once inflated) is refused.
    """

    def __init__(self, spool_dir: Path, job_manager: JobQueue, *, min_free_mb: int = 0,
                 audit: AssociationAudit | None = None, max_instance_mb: int = 512) -> None:
        if not hasattr(job_manager, "enqueue"):
            raise TypeError('Argument "job_manager" must have an enqueue() method.')
        if min_free_mb < 0:
            raise ValueError('Argument "min_free_mb" must be >= 0.')
        self.spool_dir = Path(spool_dir)
        self.job_manager = job_manager
        self.min_free_mb = min_free_mb
        self.max_instance_bytes = max_instance_mb * 2**20
        self.audit = audit
        self._lock = threading.Lock()
        # keyed by the association itself, held weakly: an association that ends without a release or abort
        # event (a peer's malformed PDU stops pynetdicom's state machine) leaves nothing behind, and a later
        # association can never inherit its caller (an id() could be reused)
        self._assocs: weakref.WeakKeyDictionary[Any, _AssocState] = weakref.WeakKeyDictionary()
        self._audited: dict[int, _AssocState] = {}
        self._storing: dict[str, int] = {}  # spool paths being stored, with how many C-STOREs store each

    def disk_low(self) -> bool:
        """True while the spool volume has less free space than the watermark."""
        return self.min_free_mb > 0 and spool.free_mb(self.spool_dir) < self.min_free_mb

    def state(self, assoc: Any) -> _AssocState:
        """Per-association state, created on first use."""
        with self._lock:
            st = self._assocs.get(assoc)
            if st is None:
                st = _AssocState(calling_ae=_calling_ae(assoc), calling_host=_calling_host(assoc),
                                 calling_port=_calling_port(assoc), thread=weakref.ref(assoc))
                self._assocs[assoc] = st
            return st

    def audited(self, st: _AssocState) -> None:
        """Remember an association whose audit record is open, until it is closed."""
        with self._lock:
            self._audited[id(st)] = st

    def ended_unclosed(self) -> list[_AssocState]:
        """Forget and return the associations with an open audit record whose thread has ended without a
        release or abort event (a peer's malformed PDU stops pynetdicom's state machine without one)."""
        with self._lock:
            gone = [st for st in self._audited.values()
                    if (assoc := st.thread()) is None or not assoc.is_alive()]
            for st in gone:
                del self._audited[id(st)]
            return gone

    @contextmanager
    def storing(self, path: Path) -> Iterator[None]:
        """Mark ``path`` as being stored by this C-STORE until the block ends (see :meth:`shared`)."""
        key = str(path)
        with self._lock:
            self._storing[key] = self._storing.get(key, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._storing[key] - 1
                if left:
                    self._storing[key] = left
                else:
                    del self._storing[key]

    def shared(self, path: Path) -> bool:
        """Whether another C-STORE (the same instance on another association) is storing ``path`` now."""
        with self._lock:
            return self._storing.get(str(path), 0) > 1

    def get(self, assoc: Any) -> _AssocState | None:
        """The state of an open association; ``None`` once it has ended."""
        with self._lock:
            return self._assocs.get(assoc)

    def pop(self, assoc: Any) -> _AssocState | None:
        with self._lock:
            st = self._assocs.pop(assoc, None)
            if st is not None:
                self._audited.pop(id(st), None)
            return st

    def open_associations(self) -> int:
        """Associations with state held (open ones; ended ones once collected)."""
        with self._lock:
            return len(self._assocs)


def _calling_ae(assoc: Any) -> str:
    return str(assoc.requestor.ae_title).strip()


def _calling_host(assoc: Any) -> str:
    return str(assoc.requestor.address)


def _calling_port(assoc: Any) -> int | None:
    port = getattr(assoc.requestor, "port", None)
    return int(port) if port else None


def handle_echo(event: Any) -> int:
    """C-ECHO: always success (the association was already accepted)."""
    log.info("C-ECHO", extra={"action": "echo", "calling_ae": _calling_ae(event.assoc),
                              "calling_host": _calling_host(event.assoc)})
    return SUCCESS


def _read_header(data: bytes, full: bool) -> Dataset:
    """Parse the header only; pixel data is neither read nor decoded."""
    return dcmread(BytesIO(data), stop_before_pixels=True, specific_tags=None if full else _HEADER_TAGS)


def handle_store(event: Any, ctx: StoreContext) -> int:
    """C-STORE: spool + enqueue, then success; a named failure status otherwise. Never raises."""
    try:
        return _store(event, ctx)
    except Exception:  # the peer must get a status, never a dropped association
        log.exception("C-STORE failed unexpectedly", extra={"action": "store_failed"})
        return OUT_OF_RESOURCES


def _decoded_size(event: Any, size: int, limit: int) -> int:
    """The data set's size as pydicom will hold it: inflated for Deflated Explicit VR Little Endian, counted
    in 1 MiB steps and stopped past ``limit``, so that a small deflate bomb is never inflated whole."""
    if not getattr(getattr(event.context, "transfer_syntax", None), "is_deflated", False):
        return size
    inflate = zlib.decompressobj(-zlib.MAX_WBITS)
    pending = event.encoded_dataset(include_meta=False)
    total = 0
    try:
        while pending and total <= limit:
            total += len(inflate.decompress(pending, 2**20))
            pending = inflate.unconsumed_tail
    except zlib.error:
        return size  # damaged: the parse below refuses it
    return total


def handle_pdu(event: Any, ctx: StoreContext) -> None:
    """EVT_PDU_RECV: count each message's data set bytes as its P-DATA fragments arrive. Past
    ``listener.max_instance_mb`` the association is aborted: pynetdicom would otherwise hold the whole
    instance in memory before ``handle_store`` could refuse it (a status answers a complete message only)."""
    items = getattr(event.pdu, "presentation_data_value_items", None)
    if not items:
        return
    st = ctx.get(event.assoc)  # made at EVT_ACCEPTED; gone after the abort, while its last PDUs still arrive
    if st is None or st.cut_off:
        return
    for item in items:
        value = item.presentation_data_value or b""
        if value[:1] and value[0] & 0x01:  # a command fragment (PS3.8 E.2): the next message begins
            st.incoming = 0
        else:
            st.incoming += max(len(value) - 1, 0)
    if st.incoming <= ctx.max_instance_bytes:
        return
    st.cut_off = True
    _refused(st, "too_large")
    log.warning("C-STORE refused: more than listener.max_instance_mb (%d MiB) of data set received; "
                "association aborted", ctx.max_instance_bytes // 2**20, extra={
                    "action": "store_refused", "reason": "too_large", "bytes": st.incoming,
                    "calling_ae": st.calling_ae, "calling_host": st.calling_host})
    event.assoc.abort(block=False)  # this is pynetdicom's reader thread: queue the A-ABORT, never wait here


def _invalid_uids(uids: dict[str, str]) -> str:
    """'' when every value is a valid UID (digits and dots, no leading zeros, at most 64 characters), else
    what is wrong, naming the attributes."""
    bad = []
    for keyword, value in uids.items():
        try:
            validate_value("UI", value, pydicom_config.RAISE)
        except ValueError:
            bad.append(f"{keyword} {value[:80]!r} ({len(value)} characters)")
    return "; ".join(f"{b} is not a valid UID" for b in bad)


def _refused(st: _AssocState, reason: str) -> None:
    st.refused += 1
    metrics.record_refused(reason)


def _store(event: Any, ctx: StoreContext) -> int:
    st = ctx.state(event.assoc)
    req = event.request
    sop_class = UID(str(req.AffectedSOPClassUID))
    sop_uid = str(req.AffectedSOPInstanceUID)
    info = {"calling_ae": st.calling_ae, "calling_host": st.calling_host, "sop_instance_uid": sop_uid,
            "sop_class": sop_class.name}

    data = event.encoded_dataset()
    is_image = sop_class in IMAGE_SOP_CLASSES
    size = _decoded_size(event, len(data), ctx.max_instance_bytes)
    if size > ctx.max_instance_bytes:  # a deflated one is measured while inflating, never held whole
        _refused(st, "too_large")
        log.warning("C-STORE refused: the data set is larger than listener.max_instance_mb (%d MiB)",
                    ctx.max_instance_bytes // 2**20,
                    extra={"action": "store_refused", "reason": "too_large", **info})
        return CANNOT_UNDERSTAND
    try:
        header = _read_header(data, full=not is_image)
        # values are converted on first access: a damaged element fails here, not later
        study_uid = str(header.get("StudyInstanceUID", "") or "")
        series_uid = str(header.get("SeriesInstanceUID", "") or "")
        ds_sop_uid = str(header.get("SOPInstanceUID", "") or "")
        pixels = int(header.get("Rows") or 0) * int(header.get("Columns") or 0)
    except Exception as exc:  # pydicom's errors, zlib's for a damaged deflated stream...: never transient
        _refused(st, "unparsable")
        log.warning("C-STORE refused: dataset cannot be parsed (%s)", exc,
                    extra={"action": "store_refused", "reason": "unparsable", **info})
        return CANNOT_UNDERSTAND

    if sop_class in OWN_OUTPUT_SOP_CLASSES and not is_image:
        if is_own_output(header):
            log.info("C-STORE of this node's own result ignored",
                     extra={"action": "own_output_ignored", **info})
            try:
                ctx.job_manager.record_ignored(
                    sop_instance_uid=sop_uid, study_instance_uid=study_uid, series_instance_uid=series_uid,
                    sop_class_uid=str(sop_class), calling_ae=st.calling_ae, calling_host=st.calling_host,
                    reason="this node's own result, sent back to it", association_id=st.association_id)
            except Exception as exc:  # nothing to process or lose: the record is for the operators only
                log.error("cannot record the node's own result sent back (%s: %s)", type(exc).__name__, exc,
                          extra={"action": "own_output_not_recorded", **info})
            return SUCCESS
        _refused(st, "foreign_output")
        log.warning("C-STORE refused: %s not produced by this node is not processed", sop_class.name,
                    extra={"action": "store_refused", "reason": "foreign_output", **info})
        return REFUSED_SOP_CLASS_NOT_SUPPORTED
    if not is_image:  # not reachable through negotiation; kept so a config slip cannot queue it
        _refused(st, "sop_class")
        log.warning("C-STORE refused: SOP class %s is not processed", sop_class.name,
                    extra={"action": "store_refused", "reason": "sop_class", **info})
        return REFUSED_SOP_CLASS_NOT_SUPPORTED

    if not study_uid or not series_uid or (ds_sop_uid and ds_sop_uid != sop_uid):
        _refused(st, "bad_header")
        log.warning("C-STORE refused: Study/Series Instance UID missing or SOP Instance UID differs "
                    "from the command", extra={"action": "store_refused", "reason": "bad_header", **info})
        return CANNOT_UNDERSTAND
    invalid = _invalid_uids({"StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid,
                             "SOPInstanceUID": sop_uid})
    if invalid:  # the results must carry these UIDs (same study) and the queue stores at most 64 characters
        _refused(st, "bad_header")
        log.warning("C-STORE refused: %s", invalid, extra={"action": "store_refused", "reason": "bad_header",
                                                          **info})
        return CANNOT_UNDERSTAND

    if pixels > MAX_PIXELS:  # a few kB of JPEG-LS can claim gigabytes of pixels: never decoded
        _refused(st, "too_large")
        log.warning("C-STORE refused: image of %d pixels, more than the %d megapixels decoded here", pixels,
                    MAX_PIXELS // 2**20, extra={"action": "store_refused", "reason": "too_large", **info})
        return CANNOT_UNDERSTAND

    if ctx.disk_low():
        _refused(st, "disk_full")
        log.error("C-STORE refused: less than %d MiB free on the spool volume", ctx.min_free_mb,
                  extra={"action": "store_refused", "reason": "disk_full", **info})
        return OUT_OF_RESOURCES

    path = spool.spool_path(ctx.spool_dir, study_uid, sop_uid)
    with ctx.storing(path):  # so that a failed store never deletes a file a concurrent one stores
        try:
            written = spool.write_atomic(path, data, root=ctx.spool_dir)
        except OSError as exc:
            _refused(st, "spool")
            log.error("C-STORE failed: cannot write the spool file (%s)", exc,
                      extra={"action": "store_failed", "reason": "spool", **info})
            return OUT_OF_RESOURCES

        try:
            job_id, created = ctx.job_manager.enqueue(
                sop_instance_uid=sop_uid, study_instance_uid=study_uid, series_instance_uid=series_uid,
                sop_class_uid=str(sop_class), calling_ae=st.calling_ae, calling_host=st.calling_host,
                spool_path=str(path), association_id=st.association_id)
        except Exception as exc:  # database down, locked, full...: the peer must retry
            _refused(st, "database")
            log.error("C-STORE failed: cannot record the job (%s: %s)", type(exc).__name__, exc,
                      extra={"action": "store_failed", "reason": "database", **info})
            if written:
                _drop_unqueued(ctx, path, info)
            return OUT_OF_RESOURCES

        state, restored = None, False
        if written and not created:
            _drop_unused(ctx, job_id, path, info)
            state, restored = _restore(ctx, job_id, path, info)
        st.instances += 1
        metrics.record_received(sop_class.keyword or str(sop_class))
        if created:
            log.info("instance received and queued", extra={"action": "store_queued", "job_id": job_id,
                                                            "bytes": len(data), **info})
        elif restored:
            log.warning("duplicate instance acknowledged; its job had failed for want of the spooled file, "
                        "which this resend restored: queued again", extra={
                            "action": "store_restored", "job_id": job_id, **info})
        else:
            log.info("duplicate instance acknowledged; its job exists already%s",
                     f" ({state.value})" if state else "", extra={
                         "action": "store_duplicate", "job_id": job_id, "file_written": written, **info})
        return SUCCESS


def _restore(ctx: StoreContext, job_id: int, path: Path,
             info: dict[str, Any]) -> tuple[JobState | None, bool]:
    """The resend wrote the instance's file again: a job that failed because that file was missing runs
    again (JobManager.restore). Its state afterwards and whether it was queued again; (None, False) when it
    cannot be told (the instance is on disk and its job exists, so the C-STORE still succeeds)."""
    try:
        return ctx.job_manager.restore(job_id, str(path))
    except Exception as exc:
        log.warning("job %s: cannot check whether the re-sent instance restores it (%s: %s)", job_id,
                    type(exc).__name__, exc, extra={"action": "store_restore_failed", "job_id": job_id,
                                                    **info})
        return None, False


def _drop_unqueued(ctx: StoreContext, path: Path, info: dict[str, Any]) -> None:
    """The file of an instance refused after it was written (the database failed): nothing would ever delete
    it (retention deletes jobs' files) and the peer sends the instance again. It goes, unless a job already
    points at it or another association is storing the same instance now (its job may not be committed yet:
    the file would go from under an acknowledged instance)."""
    _drop_file(path, lambda: ctx.shared(path) or ctx.job_manager.references(str(path)), info,
               kept=("the spool file of a refused instance is left on disk: %s", "spool_unqueued_kept"),
               deleted=("the spool file of the refused instance was deleted", "spool_unqueued_deleted"))


def _drop_unused(ctx: StoreContext, job_id: int, path: Path, info: dict[str, Any]) -> None:
    """A re-sent instance was written to the spool for a job that does not use that file (its files were
    deleted by retention, or it came under another Study Instance UID): delete it, or no one ever would. A
    queued job whose file had gone keeps it: the resend restored it."""
    _drop_file(path, lambda: ctx.job_manager.uses_file(job_id, str(path)), {"job_id": job_id, **info},
               kept=(f"cannot tell whether job {job_id} uses %s", "spool_unused_check_failed"),
               deleted=(f"job {job_id}: the re-sent instance's file is not used by the job; deleted",
                        "spool_unused_deleted"))


def _drop_file(path: Path, needed: Callable[[], bool], info: dict[str, Any], *, kept: tuple[str, str],
               deleted: tuple[str, str]) -> None:
    """Delete ``path`` unless ``needed()``; when that cannot be told (the database is down) the file stays,
    logged with ``kept`` (a message with a %s for the path, an action); a deletion is logged with ``deleted``.
    The C-STORE's answer does not depend on it: a stray file is the worst case."""
    try:
        if needed():
            return
        path.unlink(missing_ok=True)
    except Exception as exc:
        log.warning(kept[0] + " (%s: %s)", path, type(exc).__name__, exc, extra={"action": kept[1], **info})
        return
    log.info(deleted[0], extra={"action": deleted[1], **info})


def handle_accepted(event: Any, ctx: StoreContext) -> None:
    """EVT_ACCEPTED: log each refused presentation context with the reason; open the audit record."""
    assoc = event.assoc
    st = ctx.state(assoc)
    refused: dict[str, set[str]] = {}
    for cx in assoc.rejected_contexts:
        why = "sop_class" if cx.result == CONTEXT_ABSTRACT_SYNTAX_NOT_SUPPORTED else "transfer_syntax"
        refused.setdefault(why, set()).add(UID(str(cx.abstract_syntax)).name)
    accepted = {UID(str(cx.abstract_syntax)).name for cx in assoc.accepted_contexts}
    for why, names in refused.items():
        names -= accepted  # a class accepted in another context was not refused
        if not names:
            continue
        text = ("SOP class not accepted by this node (it processes CR/DX chest radiographs only)"
                if why == "sop_class" else "none of the proposed transfer syntaxes can be decoded")
        log.warning("presentation context refused: %s: %s", ", ".join(sorted(names)), text, extra={
            "action": "context_refused", "reason": why, "sop_classes": len(names),
            "calling_ae": st.calling_ae, "calling_host": st.calling_host})
    log.info("association accepted", extra={"action": "association_accepted", "calling_ae": st.calling_ae,
                                            "calling_host": st.calling_host})
    if ctx.audit is not None:
        _close_ended(ctx, ctx.audit)
        try:
            st.association_id = ctx.audit.opened(calling_ae=st.calling_ae, host=st.calling_host,
                                                 port=st.calling_port)
            ctx.audited(st)
        except Exception as exc:  # the audit never breaks reception; each C-STORE still checks the DB
            log.error("association audit failed (%s: %s)", type(exc).__name__, exc,
                      extra={"action": "audit_failed"})


def _close_ended(ctx: StoreContext, audit: AssociationAudit) -> None:
    """Close the audit records of associations that ended without a release or abort event, with the
    instances they stored; checked as each association is accepted."""
    for st in ctx.ended_unclosed():
        log.warning("association ended without release or abort (malformed PDU or lost connection)", extra={
            "action": "association_lost", "calling_ae": st.calling_ae, "calling_host": st.calling_host,
            "instances": st.instances, "refused": st.refused})
        try:
            audit.closed(cast(int, st.association_id), instances=st.instances, refused=st.refused,
                         outcome="ended without release or abort (malformed PDU or lost connection)")
        except Exception as exc:
            log.error("association audit failed (%s: %s)", type(exc).__name__, exc,
                      extra={"action": "audit_failed"})


def handle_closed(event: Any, ctx: StoreContext) -> None:
    """EVT_RELEASED / EVT_ABORTED: close the audit record."""
    st = ctx.pop(event.assoc)
    if st is None:
        return
    outcome = "aborted" if event.event.name == "EVT_ABORTED" else "released"
    log.info("association %s", outcome, extra={
        "action": f"association_{outcome}", "calling_ae": st.calling_ae, "calling_host": st.calling_host,
        "instances": st.instances, "refused": st.refused,
        "duration_s": round(time.monotonic() - st.started, 3)})
    if ctx.audit is not None and st.association_id is not None:
        try:
            ctx.audit.closed(st.association_id, instances=st.instances, outcome=outcome, refused=st.refused)
        except Exception as exc:
            log.error("association audit failed (%s: %s)", type(exc).__name__, exc,
                      extra={"action": "audit_failed"})
