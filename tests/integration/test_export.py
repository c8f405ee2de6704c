"""Export (C-STORE SCU) against real peers: dcmtk storescp, Orthanc and the node's own listener."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless

from dicom_node.config import ExportSettings, Peer, load_settings
from dicom_node.errors import DestinationUnreachable, ExportError
from dicom_node.export import NoDestination, destinations_for, send
from inference.phantom import make_dicom
from tests.fixtures.common import free_port
from tests.fixtures.peers import Listener, Orthanc, StoreSCP

pytestmark = pytest.mark.integration

EXPORT = ExportSettings(network_timeout_s=10)


def test_native_syntax_kept_when_accepted(storescp: Callable[..., StoreSCP]) -> None:
    dest = storescp()  # +xa: accepts JPEG 2000
    ds = make_dicom(transfer_syntax=JPEG2000Lossless, shape=(128, 128))
    send([ds], Peer.parse(dest.address), EXPORT)
    [received] = dest.files()
    back = dcmread(received)
    assert back.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert back.SOPInstanceUID == ds.SOPInstanceUID


def test_decompressed_keeping_uid_when_only_uncompressed(storescp: Callable[..., StoreSCP]) -> None:
    dest = storescp(extra=[])  # storescp's default: uncompressed syntaxes only
    ds = make_dicom(transfer_syntax=JPEG2000Lossless, shape=(128, 128))
    expected = ds.pixel_array.copy()
    send([ds], Peer.parse(dest.address), EXPORT)
    [received] = dest.files()
    back = dcmread(received)
    assert back.file_meta.TransferSyntaxUID in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    assert back.SOPInstanceUID == ds.SOPInstanceUID
    assert (back.pixel_array == expected).all()
    assert ds.file_meta.TransferSyntaxUID == JPEG2000Lossless  # the caller's dataset is untouched


def test_destination_down_then_up(storescp: Callable[..., StoreSCP]) -> None:
    dest = storescp(start=False)
    ds = make_dicom(shape=(64, 64))
    with pytest.raises(DestinationUnreachable) as err:
        send([ds], Peer.parse(dest.address), EXPORT)
    assert err.value.retryable
    dest.start()
    send([ds], Peer.parse(dest.address), EXPORT)
    assert [dcmread(f).SOPInstanceUID for f in dest.files()] == [ds.SOPInstanceUID]


def test_a_destination_that_never_answers_the_connect_fails_within_the_timeout() -> None:
    """A host that drops the connection request (here a socket whose accept queue is full: the kernel drops
    further SYNs) fails the delivery after ``network_timeout_s``, not after the system's minutes of SYN
    retries."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    queued = []
    for _ in range(4):  # fill the accept queue; nothing is ever accepted
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        queued.append(s)
    outcome: list[BaseException] = []

    def deliver() -> None:
        try:
            send([make_dicom(shape=(64, 64))], Peer(ae_title="PACS", host="127.0.0.1", port=port),
                 ExportSettings(network_timeout_s=2))
        except BaseException as exc:  # noqa: BLE001  (recorded for the assertion below)
            outcome.append(exc)

    thread = threading.Thread(target=deliver, daemon=True)
    try:
        thread.start()
        thread.join(30)  # 2 s timeout; the kernel's own SYN retries would take about two minutes
        assert not thread.is_alive(), "send() still waiting for the TCP connection"
        assert len(outcome) == 1 and isinstance(outcome[0], DestinationUnreachable), outcome
    finally:
        for s in queued:
            s.close()
        server.close()


def test_wrong_called_ae_is_unreachable(orthanc: Orthanc) -> None:
    ds = make_dicom(shape=(64, 64))
    with pytest.raises(DestinationUnreachable, match="rejected"):
        send([ds], Peer(ae_title="NOTORTHANC", host="127.0.0.1", port=orthanc.dicom_port), EXPORT)
    send([ds], Peer(ae_title=orthanc.aet, host="127.0.0.1", port=orthanc.dicom_port), EXPORT)
    [instance] = orthanc.instances()
    assert orthanc.tags(instance)["SOPInstanceUID"] == ds.SOPInstanceUID


def test_failure_status_raises_export_error(node_listener: Callable[..., Listener]) -> None:
    # The node's own listener with its database down answers 0xA700 (out of resources).
    node = node_listener(db_url=f"postgresql+psycopg://cxr@127.0.0.1:{free_port()}/cxr?connect_timeout=2")
    ds = make_dicom(shape=(64, 64))
    with pytest.raises(ExportError, match="0xA700") as err:
        send([ds], Peer(ae_title="CXRNODE", host="127.0.0.1", port=node.port), EXPORT, calling_ae="EXPORTER")
    assert not isinstance(err.value, DestinationUnreachable)
    assert err.value.retryable


def test_destinations_for() -> None:
    fixed = load_settings(None, {"export": {"destinations": ["PACS@10.0.0.5:104"]}}, environ={})
    assert [str(p) for p in destinations_for("ANY", "10.1.1.1", fixed)] == ["PACS@10.0.0.5:104"]

    back = load_settings(None, {"export": {"callers": {"MODALITY": {"port": 4242},
                                                       "ORTHANC": "ORTHANC@192.168.1.7:4242"}}}, environ={})
    assert [str(p) for p in destinations_for("MODALITY", "10.1.1.9", back)] == ["MODALITY@10.1.1.9:4242"]
    assert [str(p) for p in destinations_for("ORTHANC", "10.1.1.9", back)] == ["ORTHANC@192.168.1.7:4242"]
    with pytest.raises(NoDestination, match="UNKNOWN") as err:
        destinations_for("UNKNOWN", "10.1.1.9", back)
    assert not err.value.retryable


def test_send_checks_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match='"destination"'):
        send([make_dicom(shape=(32, 32))], Peer(ae_title="X"), EXPORT)
    with pytest.raises(TypeError, match='"export_settings"'):
        send([], Peer.parse("X@127.0.0.1:104"), None)  # type: ignore[arg-type]
