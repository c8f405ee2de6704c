"""Sending results: C-STORE SCU to each destination, every response status checked.

For each SOP class two presentation contexts are proposed: the dataset's own (native) transfer
syntax and, separately, uncompressed (explicit, then implicit VR little endian). The SCU never
transcodes silently: when a destination accepts only uncompressed, a compressed dataset is
decompressed keeping its SOP Instance UID.

Every object is offered even when one before it failed (the SR still goes when a PACS takes no Secondary
Capture). Errors: :class:`~dicom_node.errors.DestinationUnreachable` when no association can be
established (down, refused, TLS failure), :class:`~dicom_node.errors.ExportError` when an instance
gets a failure status or no response; both are retryable, so the worker retries with backoff and a
destination that is down delays delivery without losing it. :class:`~dicom_node.errors.ExportRefused`
(permanent) when retrying cannot help: a SOP class or data set the destination does not take (0x0122,
0xA9xx, 0xCxxx, no presentation context), a permanent A-ASSOCIATE-RJ, unusable TLS settings; the message
names the setting that would help. :class:`NoDestination` (permanent) when no address is known for the sender.
A destination that stops reading mid-transfer fails the send after ``network_timeout_s`` (a send timeout on
the socket: pynetdicom clears the socket's timeout once connected, and a blocked send would hang for ever).
"""

from __future__ import annotations

import copy
import logging
import socket
import ssl
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    Comprehensive3DSRStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category

from dicom_node import metrics
from dicom_node.config import ExportSettings, Peer, Settings
from dicom_node.errors import DestinationUnreachable, ExportError, ExportRefused, PermanentError
from dicom_node.tls import TLSConfigError, client_context

log = logging.getLogger(__name__)

UNCOMPRESSED: tuple[UID, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
STATUS_SUCCESS = "Success"
STATUS_WARNING = "Warning"
DEFAULT_CALLING_AE = "CXRNODE"
MAX_PDU_BYTES = 1024 * 1024


class NoDestination(PermanentError):
    """No export destination is known for this sender (configure export.destinations or export.callers)."""


def destinations_for(calling_ae: str, calling_host: str, settings: Settings) -> list[Peer]:
    """Where the results of an instance received from ``calling_ae`` at ``calling_host`` go.

    ``settings.export.destinations`` when set; otherwise back to the sender, at the address given
    for its AE title in ``settings.export.callers`` (an entry without a host means the host the
    instance came from).

    Raises
    ------
    NoDestination
        No destinations are configured and the calling AE has no usable entry in ``export.callers``.
    """
    if not isinstance(settings, Settings):
        raise TypeError('Argument "settings" must be a Settings.')
    export = settings.export
    if export.destinations:
        return list(export.destinations)
    peer = export.callers.get((calling_ae or "").strip())
    if peer is None:
        raise NoDestination(f"no export destination configured and calling AE {calling_ae!r} is not in "
                            "export.callers")
    host = peer.host or calling_host
    if not host or not peer.port:
        raise NoDestination(f"export.callers entry for {calling_ae!r} has no port (use AET@HOST:PORT)")
    return [Peer(ae_title=peer.ae_title, host=host, port=peer.port)]


def _native_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    return UID(str(ts)) if ts else ExplicitVRLittleEndian


def _load(item: Dataset | str | Path) -> Dataset:
    if isinstance(item, Dataset):
        return item
    if isinstance(item, str | Path):
        return dcmread(item)
    raise TypeError('Argument "datasets" must hold pydicom Datasets or file paths.')


def _make_ae(calling_ae: str, datasets: Sequence[Dataset], timeout_s: float) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = timeout_s  # TCP connect: without it a PACS dropping packets blocks for minutes
    ae.network_timeout = timeout_s
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.maximum_pdu_size = MAX_PDU_BYTES
    seen: set[tuple[str, tuple[str, ...]]] = set()
    for ds in datasets:
        sop_class = UID(str(ds.SOPClassUID))
        native = _native_syntax(ds)
        for syntaxes in ([native], list(UNCOMPRESSED)):
            key = (str(sop_class), tuple(str(s) for s in syntaxes))
            if native in UNCOMPRESSED and syntaxes == [native]:
                continue  # the uncompressed context below covers it
            if key not in seen:
                seen.add(key)
                ae.add_requested_context(sop_class, syntaxes)
    return ae


def _hint(sop_class: UID) -> str:
    """The setting that lets the results through a destination that refuses ``sop_class``."""
    if sop_class == Comprehensive3DSRStorage:
        return ' (for a PACS without Comprehensive 3D SR set export.sr_sop_class = "comprehensive")'
    if sop_class == SecondaryCaptureImageStorage:
        return " (for a PACS that takes no Secondary Capture set export.send_heatmap = false)"
    return ""


def _refused_status(code: int) -> bool:
    """Failure statuses that the same object will get again: SOP class not supported, data set does not
    match the SOP class, cannot understand (PS3.4 B.2.3)."""
    return code == 0x0122 or 0xA900 <= code <= 0xA9FF or 0xC000 <= code <= 0xCFFF


def _for_context(assoc: Association, ds: Dataset, dest: str = "") -> Dataset:
    """``ds`` itself when an accepted context carries its syntax, else an uncompressed copy (same UID)."""
    sop_class = UID(str(ds.SOPClassUID))
    native = _native_syntax(ds)
    accepted = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == sop_class]
    syntaxes = {UID(str(cx.transfer_syntax[0])) for cx in accepted}
    if native in syntaxes or (native in UNCOMPRESSED and syntaxes & set(UNCOMPRESSED)):
        if "TransferSyntaxUID" in getattr(ds, "file_meta", {}):
            return ds
        labelled = copy.deepcopy(ds)  # pynetdicom needs the syntax in the file meta; never touch the caller's
        labelled.file_meta = FileMetaDataset()
        labelled.file_meta.TransferSyntaxUID = native
        return labelled
    if native.is_compressed and syntaxes & set(UNCOMPRESSED):
        plain = copy.deepcopy(ds)
        plain.decompress(generate_instance_uid=False)
        return plain
    if not accepted:
        raise ExportRefused(f"{dest}: the destination does not accept {sop_class.name}{_hint(sop_class)}")
    raise ExportRefused(f"{dest}: the destination accepted no transfer syntax for {sop_class.name} "
                        f"(native {native.name}, or uncompressed)")


def _status_text(code: int) -> str:
    entry = STORAGE_SERVICE_CLASS_STATUS.get(code)
    return f"0x{code:04X} {entry[0]}: {entry[1]}" if entry else f"0x{code:04X}"


def _send_timeout(seconds: float) -> Any:
    """An EVT_CONN_OPEN handler giving the new connection's socket a send timeout (SO_SNDTIMEO)."""
    whole = int(seconds)
    value = struct.pack("ll", whole, int((seconds - whole) * 1e6))

    def handler(event: Any) -> None:
        sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)

    return handler


def _no_association(destination: Peer, ssl_context: Any, timeout_s: float) -> str:
    """Why no association came about, as far as a plain connection (and TLS handshake) tells: pynetdicom only
    logs the cause, and "certificate verify failed" or "connection refused" is what IT needs to act on."""
    try:
        with socket.create_connection((destination.host, destination.port), timeout=timeout_s) as sock:
            if ssl_context is None:
                return "no association (the destination took the connection and gave no answer)"
            with ssl_context.wrap_socket(sock, server_hostname=destination.host):
                return "no association (the TLS handshake succeeded; the destination gave no answer)"
    except ssl.SSLError as exc:
        return f"no association: TLS handshake failed ({exc.reason or exc})"
    except OSError as exc:
        return f"no association: {exc.strerror or type(exc).__name__}"


def send(datasets: Sequence[Dataset | str | Path], destination: Peer, export_settings: ExportSettings, *,
         calling_ae: str = DEFAULT_CALLING_AE) -> list[str]:
    """C-STORE ``datasets`` to ``destination`` over one association; returns the warnings the destination
    answered (empty when every object was stored plainly).

    Parameters
    ----------
    datasets
        Datasets (or DICOM files) to send, in order (the heatmap SC before the SR referencing it).
    destination
        ``AET@HOST:PORT``; host and port are required.
    export_settings
        ``settings.export``: network timeout and TLS.
    calling_ae
        This node's AE title (``settings.listener.ae_title``).

    Raises
    ------
    DestinationUnreachable
        No association: connection refused, timeout, a transient A-ASSOCIATE-RJ, TLS handshake failure.
    ExportRefused
        Refused for good: a permanent A-ASSOCIATE-RJ, a SOP class or data set the destination does not take
        (the other objects were still offered), unusable TLS settings.
    ExportError
        An instance got another failure status, or no response.
    """
    if not isinstance(destination, Peer) or not destination.host or not destination.port:
        raise ValueError('Argument "destination" must be a Peer with host and port (AET@HOST:PORT).')
    if not isinstance(export_settings, ExportSettings):
        raise TypeError('Argument "export_settings" must be an ExportSettings.')
    items = [_load(d) for d in datasets]
    if not items:
        return []
    dest = str(destination)
    ae = _make_ae(calling_ae, items, export_settings.network_timeout_s)
    try:
        ssl_context = client_context(export_settings.tls)
    except TLSConfigError as exc:
        metrics.record_export(dest, ok=False)
        raise ExportRefused(f"{dest}: export TLS settings: {exc}") from exc
    tls_args = (ssl_context, destination.host) if ssl_context is not None else None
    answers: list[Any] = []  # the A-ASSOCIATE-AC or -RJ received: the reason of a rejection
    handlers: list[Any] = [(evt.EVT_CONN_OPEN, _send_timeout(export_settings.network_timeout_s)),
                           (evt.EVT_ACSE_RECV, lambda event: answers.append(event.primitive))]
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args,
                         evt_handlers=handlers)
    if not assoc.is_established:
        metrics.record_export(dest, ok=False)
        rejection = next((a for a in answers if getattr(a, "result", None) in (0x01, 0x02)), None)
        if rejection is not None:
            kind = "permanently" if rejection.result == 0x01 else "for now"
            why = f"association rejected {kind} by the {rejection.source_str}: {rejection.reason_str}"
        else:
            why = _no_association(destination, ssl_context, export_settings.network_timeout_s)
        log.warning("export to %s failed: %s", dest, why, extra={"action": "export_unreachable",
                                                                "destination": dest})
        if rejection is not None and rejection.result == 0x01:
            raise ExportRefused(f"{dest}: {why}")
        raise DestinationUnreachable(f"{dest}: {why}")
    warnings: list[str] = []
    failures: list[ExportError] = []
    try:
        for ds in items:
            if not assoc.is_established:  # aborted by the destination or a timeout: the rest cannot go
                failures.append(DestinationUnreachable(
                    f"{dest}: association lost before sending {ds.SOPInstanceUID}"))
                break
            try:
                warning = _send_one(assoc, ds, dest)
            except ExportError as exc:  # the next object is still offered (the SR without the heatmap)
                failures.append(exc)
                continue
            if warning:
                warnings.append(warning)
    finally:
        if assoc.is_established:
            assoc.release()
        else:
            assoc.abort()
    metrics.record_export(dest, ok=not failures)
    if failures:
        message = "; ".join(str(f) for f in failures)
        if all(not f.retryable for f in failures):
            raise ExportRefused(message)
        raise ExportError(message)
    return warnings


def _send_one(assoc: Association, ds: Dataset, dest: str) -> str:
    """C-STORE one object; returns the warning the destination answered ('' for a plain success)."""
    uid = str(ds.SOPInstanceUID)
    sop_class = UID(str(ds.SOPClassUID))
    info = {"destination": dest, "sop_instance_uid": uid, "sop_class": sop_class.name}
    to_send = _for_context(assoc, ds, dest)
    if not assoc.is_established:
        raise DestinationUnreachable(f"{dest}: association lost before sending {uid}")
    try:
        status = assoc.send_c_store(to_send)
    except (AttributeError, ValueError, TypeError) as exc:  # pynetdicom cannot encode it in the context
        log.error("export: cannot encode instance (%s)", exc, extra={"action": "export_failed", **info})
        raise ExportRefused(f"{dest}: cannot encode {uid} for sending: {exc}") from exc
    if "Status" not in status:
        log.warning("export: no response from %s", dest, extra={"action": "export_failed", **info})
        raise ExportError(f"{dest}: no C-STORE response for {uid} (timeout or aborted association)")
    code = int(status.Status)
    category = code_to_category(code)
    if category == STATUS_SUCCESS:
        log.info("export: instance sent", extra={"action": "export_sent", **info})
        return ""
    if category == STATUS_WARNING:
        log.warning("export: instance stored with a warning: %s", _status_text(code),
                    extra={"action": "export_warning", "status": f"0x{code:04X}", **info})
        return f"{sop_class.name} {uid} stored with warning {_status_text(code)}"
    log.error("export: instance refused: %s", _status_text(code),
              extra={"action": "export_failed", "status": f"0x{code:04X}", **info})
    message = f"{dest}: C-STORE of {sop_class.name} {uid} failed with status {_status_text(code)}"
    if _refused_status(code):
        raise ExportRefused(message + (_hint(sop_class) if code == 0x0122 else ""))
    raise ExportError(message)
