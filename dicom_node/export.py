"""Sending results: C-STORE SCU to each destination, every response status checked.

For each SOP class two presentation contexts are proposed: the dataset's own (native) transfer
syntax and, separately, uncompressed (explicit, then implicit VR little endian). The SCU never
transcodes silently: when a destination accepts only uncompressed, a compressed dataset is
decompressed keeping its SOP Instance UID.

Errors: :class:`~dicom_node.errors.DestinationUnreachable` when no association can be
established (down, refused, TLS failure), :class:`~dicom_node.errors.ExportError` when an instance
gets a failure status or no response; both are retryable, so the worker retries with backoff and a
destination that is down delays delivery without losing it. :class:`NoDestination` (permanent)
when no address is known for the sender.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category

from dicom_node import metrics
from dicom_node.config import ExportSettings, Peer, Settings
from dicom_node.errors import DestinationUnreachable, ExportError, PermanentError
from dicom_node.tls import client_context

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


def _for_context(assoc: Association, ds: Dataset) -> Dataset:
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
    raise ExportError(f"destination accepted no transfer syntax for {sop_class.name} "
                      f"(native {native.name}, or uncompressed)")


def _status_text(code: int) -> str:
    entry = STORAGE_SERVICE_CLASS_STATUS.get(code)
    return f"0x{code:04X} {entry[0]}: {entry[1]}" if entry else f"0x{code:04X}"


def send(datasets: Sequence[Dataset | str | Path], destination: Peer, export_settings: ExportSettings, *,
         calling_ae: str = DEFAULT_CALLING_AE) -> None:
    """C-STORE ``datasets`` to ``destination`` over one association.

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
        No association: connection refused, timeout, A-ASSOCIATE-RJ, TLS handshake failure.
    ExportError
        An instance got a failure status, no response, or no usable presentation context.
    """
    if not isinstance(destination, Peer) or not destination.host or not destination.port:
        raise ValueError('Argument "destination" must be a Peer with host and port (AET@HOST:PORT).')
    if not isinstance(export_settings, ExportSettings):
        raise TypeError('Argument "export_settings" must be an ExportSettings.')
    items = [_load(d) for d in datasets]
    if not items:
        return
    dest = str(destination)
    ae = _make_ae(calling_ae, items, export_settings.network_timeout_s)
    ssl_context = client_context(export_settings.tls)
    tls_args = (ssl_context, destination.host) if ssl_context is not None else None
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        metrics.record_export(dest, ok=False)
        why = "association rejected" if assoc.is_rejected else "no association (down, refused or TLS failure)"
        log.warning("export to %s failed: %s", dest, why, extra={"action": "export_unreachable",
                                                                "destination": dest})
        raise DestinationUnreachable(f"{dest}: {why}")
    try:
        for ds in items:
            _send_one(assoc, ds, dest)
    except ExportError:
        metrics.record_export(dest, ok=False)
        raise
    finally:
        if assoc.is_established:
            assoc.release()
        else:
            assoc.abort()
    metrics.record_export(dest, ok=True)


def _send_one(assoc: Association, ds: Dataset, dest: str) -> None:
    uid = str(ds.SOPInstanceUID)
    info = {"destination": dest, "sop_instance_uid": uid, "sop_class": UID(str(ds.SOPClassUID)).name}
    to_send = _for_context(assoc, ds)
    if not assoc.is_established:
        raise DestinationUnreachable(f"{dest}: association lost before sending {uid}")
    try:
        status = assoc.send_c_store(to_send)
    except (AttributeError, ValueError, TypeError) as exc:  # pynetdicom cannot encode it in the context
        log.error("export: cannot encode instance (%s)", exc, extra={"action": "export_failed", **info})
        raise ExportError(f"{dest}: cannot encode {uid} for sending: {exc}") from exc
    if "Status" not in status:
        log.warning("export: no response from %s", dest, extra={"action": "export_failed", **info})
        raise ExportError(f"{dest}: no C-STORE response for {uid} (timeout or aborted association)")
    code = int(status.Status)
    category = code_to_category(code)
    if category == STATUS_SUCCESS:
        log.info("export: instance sent", extra={"action": "export_sent", **info})
        return
    if category == STATUS_WARNING:
        log.warning("export: instance stored with a warning: %s", _status_text(code),
                    extra={"action": "export_warning", "status": f"0x{code:04X}", **info})
        return
    log.error("export: instance refused: %s", _status_text(code),
              extra={"action": "export_failed", "status": f"0x{code:04X}", **info})
    raise ExportError(f"{dest}: C-STORE of {uid} failed with status {_status_text(code)}")
