"""Export (C-STORE SCU) against real peers: dcmtk storescp, Orthanc and the node's own listener."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless

from dicom_node.config import ExportSettings, Peer, load_settings
from dicom_node.errors import DestinationUnreachable, ExportError, ExportRefused
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
    with pytest.raises(DestinationUnreachable, match="no association: Connection refused") as err:
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


def test_wrong_called_ae_is_refused_for_good_with_the_reason(orthanc: Orthanc) -> None:
    """A permanent A-ASSOCIATE-RJ names its reason (it said "association rejected", like a PACS that is
    down) and is not retried."""
    ds = make_dicom(shape=(64, 64))
    with pytest.raises(ExportRefused, match="rejected permanently by the Service User: Called AE title not "
                                            "recognised") as err:
        send([ds], Peer(ae_title="NOTORTHANC", host="127.0.0.1", port=orthanc.dicom_port), EXPORT)
    assert not err.value.retryable
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


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning")
def test_a_status_the_same_object_gets_again_is_permanent_and_the_next_object_still_goes(
        node_listener: Callable[..., Listener]) -> None:
    """0xC000 (cannot understand) will come back on every attempt: permanent, and the objects after it are
    still offered on the same association. Here the node's own listener refuses an invalid Study UID."""
    node = node_listener()
    refused = make_dicom(shape=(64, 64))
    refused.StudyInstanceUID = "1.2.03.4"  # a leading zero: not a valid UID
    fine = make_dicom(shape=(64, 64))
    with pytest.raises(ExportRefused, match="0xC000") as err:
        send([refused, fine], Peer(ae_title="CXRNODE", host="127.0.0.1", port=node.port), EXPORT,
             calling_ae="EXPORTER")
    assert not err.value.retryable
    assert [j.sop_instance_uid for j in node.job_rows()] == [str(fine.SOPInstanceUID)]


def test_warning_statuses_come_back_to_be_recorded() -> None:
    """A warning (0xB000: coercion of data elements) is a success, but what the destination said is returned
    for the delivery record, not only logged. No DICOM peer installed here answers warnings on demand, so a
    pynetdicom SCP does."""
    from pydicom.uid import ComputedRadiographyImageStorage
    from pynetdicom import AE, evt

    scp = AE(ae_title="WARNS")
    scp.add_supported_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    server = scp.start_server(("127.0.0.1", 0), block=False,
                              evt_handlers=[(evt.EVT_C_STORE, lambda event: 0xB000)])
    try:
        ds = make_dicom(shape=(64, 64))
        warnings = send([ds], Peer(ae_title="WARNS", host="127.0.0.1", port=server.server_address[1]), EXPORT)
    finally:
        server.shutdown()
    assert warnings == [f"Computed Radiography Image Storage {ds.SOPInstanceUID} stored with warning "
                        "0xB000 Warning: Coercion of Data Elements"]


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


def _stalling_proxy(target_port: int, forward: int) -> int:
    """A TCP proxy in front of ``target_port`` that passes the first ``forward`` bytes towards it, then stops
    reading: a PACS whose storage hangs mid-transfer. Returns its port."""
    import socket
    import threading
    import time

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def run() -> None:
        client, _ = listener.accept()
        upstream = socket.create_connection(("127.0.0.1", target_port))

        def down() -> None:
            while data := upstream.recv(65536):
                client.sendall(data)

        threading.Thread(target=down, daemon=True).start()
        passed = 0
        while passed < forward and (data := client.recv(min(4096, forward - passed))):
            upstream.sendall(data)
            passed += len(data)
        time.sleep(120)  # reads nothing more; the node's send blocks once the buffers are full

    threading.Thread(target=run, daemon=True).start()
    return int(listener.getsockname()[1])


def test_a_pacs_that_stops_reading_mid_transfer_fails_the_send_within_the_timeout(
        storescp: Callable[..., StoreSCP]) -> None:
    """pynetdicom clears the socket's timeout once connected: a destination that stopped reading held the
    worker's send for ever (and its heartbeat kept the job leased, so no other worker took it over)."""
    import threading

    dest = storescp()
    port = _stalling_proxy(dest.port, 64 * 1024)
    big = make_dicom(shape=(2900, 2900), bits_stored=16)  # 16 MiB: more than the socket buffers hold
    outcome: list[BaseException | None] = []

    def deliver() -> None:
        try:
            send([big], Peer(ae_title=dest.ae_title, host="127.0.0.1", port=port),
                 ExportSettings(network_timeout_s=2))
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    sender = threading.Thread(target=deliver, daemon=True)  # a hang must fail the test, not block it
    sender.start()
    sender.join(30)
    assert not sender.is_alive(), "the send still blocks 30 s after a 2 s network_timeout_s"
    (error,) = outcome
    assert isinstance(error, ExportError) and error.retryable and "no C-STORE response" in str(error)
    assert dest.files() == []
