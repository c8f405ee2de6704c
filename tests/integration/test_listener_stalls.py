"""Peers that stop halfway: the listener's slots and its TLS accept loop must not be held by them.

The listener runs in-process (``node_listener``) with ``network_timeout_s`` of 2 s (5 s with TLS); the
stalling peers are raw sockets, the legitimate modality is dcmtk's ``echoscu``.
"""

from __future__ import annotations

import logging
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from tests.fixtures.peers import Listener, TLSFiles, echoscu

pytestmark = pytest.mark.integration

TIMEOUT_S = 2  # listener.network_timeout_s in these tests
TLS_TIMEOUT_S = 5  # with TLS: room for the legitimate handshake, on a busy machine too
VERIFICATION = b"1.2.840.10008.1.1"
IMPLICIT_LE = b"1.2.840.10008.1.2"


def _item(kind: int, data: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(data)) + data


def _associate_rq(calling: bytes, called: bytes = b"CXRNODE") -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing Verification (PS3.8 9.3.2)."""
    context = _item(0x20, bytes([1, 0, 0, 0]) + _item(0x30, VERIFICATION) + _item(0x40, IMPLICIT_LE))
    user = _item(0x50, _item(0x51, struct.pack(">I", 16384)) + _item(0x52, b"1.2.3.4"))
    body = (struct.pack(">HH", 1, 0) + called.ljust(16) + calling.ljust(16) + b"\0" * 32
            + _item(0x10, b"1.2.840.10008.3.1.1.1") + context + user)
    return struct.pack(">BBI", 1, 0, len(body)) + body


@contextmanager
def _peers() -> Iterator[list[socket.socket]]:
    """Raw connections, all closed afterwards (whatever the listener did with them)."""
    made: list[socket.socket] = []
    try:
        yield made
    finally:
        for sock in made:
            sock.close()


def _connect(port: int, opened: list[socket.socket]) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    opened.append(sock)
    return sock


def _closed_by_listener(sock: socket.socket, within_s: float) -> bool:
    """True when the listener closes (or resets) ``sock`` within ``within_s`` seconds."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            if sock.recv(65536) == b"":
                return True
        except TimeoutError:
            return False
        except OSError:
            return True
    return False


def _echo_within(port: int, seconds: float, *, extra: list[str] | None = None) -> float | None:
    """Seconds until a C-ECHO from ``echoscu`` succeeds, retried for ``seconds``; ``None`` if none did."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        try:
            left = max(1.0, seconds - (time.monotonic() - started))
            if echoscu(port, extra=extra, timeout=left).returncode == 0:
                return time.monotonic() - started
        except subprocess.TimeoutExpired:
            return None
        time.sleep(0.2)
    return None


def _stalls(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "action", "") == "association_stalled"]


def test_half_pdu_peers_free_their_slots(node_listener: Callable[..., Listener],
                                         caplog: pytest.LogCaptureFixture) -> None:
    """A peer that sent 3 bytes of an A-ASSOCIATE-RQ, and an accepted association whose P-DATA PDU was cut
    off, held both slots until they closed; now each is dropped after the network timeout (the accepted
    one aborted and audited), and a modality gets through."""
    node = node_listener(listener={"max_associations": 2, "network_timeout_s": TIMEOUT_S})
    caplog.set_level(logging.INFO, logger="dicom_node")
    with _peers() as opened:
        header = _connect(node.port, opened)
        header.sendall(_associate_rq(b"HALFHEADER")[:3])
        mid_transfer = _connect(node.port, opened)
        mid_transfer.sendall(_associate_rq(b"MIDTRANSFER"))
        answer = mid_transfer.recv(6)
        assert answer[:1] == b"\x02", answer  # A-ASSOCIATE-AC
        time.sleep(0.2)
        mid_transfer.sendall(b"\x04\x00" + struct.pack(">I", 1000) + b"\x00" * 10)  # 16 of 1006 bytes
        busy = echoscu(node.port)
        assert busy.returncode != 0 and "Local Limit Exceeded" in busy.stdout + busy.stderr  # both held

        waited = _echo_within(node.port, 4 * TIMEOUT_S + 4)
        assert waited is not None, "no slot was freed: the stalled peers still hold them"
        assert _closed_by_listener(header, 1) and _closed_by_listener(mid_transfer, 1)
    stalls = _stalls(caplog)
    assert sorted(r.accepted for r in stalls) == [False, True], [r.getMessage() for r in stalls]
    assert all(r.calling_host == "127.0.0.1" for r in stalls)
    aborted = [a for a in node.associations() if a.calling_ae == "MIDTRANSFER"]
    assert len(aborted) == 1 and aborted[0].ended_at is not None and aborted[0].reason == "aborted"


def test_trickling_peer_is_dropped(node_listener: Callable[..., Listener],
                                   caplog: pytest.LogCaptureFixture) -> None:
    """One byte a second never lets the per-read timeout expire; the PDU's deadline still does."""
    node = node_listener(listener={"max_associations": 1, "network_timeout_s": TIMEOUT_S})
    caplog.set_level(logging.INFO, logger="dicom_node")
    request = _associate_rq(b"TRICKLER")
    stop = threading.Event()

    def trickle(sock: socket.socket) -> None:
        for byte in request[1:]:
            if stop.wait(1.0):
                return
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                return

    with _peers() as opened:
        sock = _connect(node.port, opened)
        sock.sendall(request[:1])
        sender = threading.Thread(target=trickle, args=(sock,), daemon=True)
        sender.start()
        try:
            time.sleep(0.5)
            assert echoscu(node.port).returncode != 0  # the trickler holds the only slot
            assert _echo_within(node.port, 3 * TIMEOUT_S + 4) is not None, "the trickling peer holds the slot"
        finally:
            stop.set()
            sender.join(5)
    assert [r.accepted for r in _stalls(caplog)] == [False]


def _tls_listener(tls: TLSFiles) -> dict[str, object]:
    return {"network_timeout_s": TLS_TIMEOUT_S, "tls": {
        "enabled": True, "cert_file": str(tls.server_cert), "key_file": str(tls.server_key),
        "ca_file": str(tls.ca_cert), "require_client_cert": True}}


def _client_tls(tls: TLSFiles) -> list[str]:
    return ["+tls", str(tls.client_key), str(tls.client_cert), "+cf", str(tls.ca_cert)]


def test_idle_plain_peer_does_not_stop_tls_listener(node_listener: Callable[..., Listener],
                                                   tls_files: TLSFiles,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A plain TCP connection that sends nothing kept pynetdicom's accept loop in its TLS handshake, so every
    mutual-TLS association timed out; now the handshake fails in its own thread, logged with the peer."""
    node = node_listener(listener=_tls_listener(tls_files))
    caplog.set_level(logging.INFO, logger="dicom_node")
    with _peers() as opened:
        idle = _connect(node.port, opened)
        idle_port = idle.getsockname()[1]
        time.sleep(0.2)
        started = time.monotonic()
        try:
            proc = echoscu(node.port, extra=_client_tls(tls_files), timeout=TLS_TIMEOUT_S + 4)
        except subprocess.TimeoutExpired:
            pytest.fail("the TLS echo got no answer while a plain peer sat idle in the handshake")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert time.monotonic() - started < TLS_TIMEOUT_S  # beside the idle peer, not after its timeout
        assert _closed_by_listener(idle, TLS_TIMEOUT_S + 2)
    failed = [r for r in caplog.records if getattr(r, "action", "") == "tls_handshake_failed"]
    assert [(r.calling_host, r.calling_port) for r in failed] == [("127.0.0.1", idle_port)]
    assert f"no handshake within {TLS_TIMEOUT_S} s" in failed[0].getMessage()
    assert [a.calling_ae for a in node.associations()] == ["TESTSCU"]


def test_shutdown_cuts_a_pending_handshake(node_listener: Callable[..., Listener],
                                           tls_files: TLSFiles) -> None:
    """SIGTERM waited for an idle peer in the TLS handshake to leave; the listener now stops at once."""
    from dicom_node.scp import start_scp
    from tests.fixtures.common import free_port

    node = node_listener(listener={**_tls_listener(tls_files), "network_timeout_s": 30})
    settings = node.settings.model_copy(update={"listener": node.settings.listener.model_copy(
        update={"port": free_port()})})
    server = start_scp(settings, node.jobs, node.engine)  # stopped here, not by the fixture
    stopper = threading.Thread(target=server.shutdown, daemon=True)
    with _peers() as opened:
        _connect(settings.listener.port, opened)
        time.sleep(0.3)
        started = time.monotonic()
        stopper.start()
        stopper.join(5)
        stopped_in = time.monotonic() - started
    stopper.join(10)  # the peer is gone: even a listener blocked by it has stopped now
    assert not stopper.is_alive()
    assert stopped_in < 3, f"shutdown waited {stopped_in:.1f} s for the idle peer"


def test_full_node_logs_what_an_unknown_caller_was_told(node_listener: Callable[..., Listener],
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """An unknown caller of a full node is answered "local limit exceeded" (pynetdicom's precedence); the
    log and the audit said "caller"."""
    node = node_listener(listener={"max_associations": 1, "allowed_callers": ["HOLDER@127.0.0.1"]})
    caplog.set_level(logging.INFO, logger="dicom_node")
    with _peers() as opened:
        holder = _connect(node.port, opened)
        holder.sendall(_associate_rq(b"HOLDER"))
        assert holder.recv(6)[:1] == b"\x02"
        stranger = echoscu(node.port, calling_ae="STRANGER")
    assert "Local Limit Exceeded" in stranger.stdout + stranger.stderr
    rejected = [r for r in caplog.records if getattr(r, "action", "") == "association_rejected"]
    assert [(r.calling_ae, r.reason) for r in rejected] == [("STRANGER", "busy")]
    assert "maximum number of associations" in rejected[0].getMessage()


def test_a_pdu_longer_than_the_node_reads_closes_the_connection(node_listener: Callable[..., Listener],
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """A P-DATA header announcing 2 GiB: pynetdicom read it into memory as fast as the peer sent it, past
    max_instance_mb, which is counted per PDU received. Now the connection is closed at the header."""
    node = node_listener(listener={"network_timeout_s": TIMEOUT_S})
    caplog.set_level(logging.INFO, logger="dicom_node")
    with _peers() as opened:
        peer = _connect(node.port, opened)
        peer.sendall(_associate_rq(b"GREEDY"))
        assert peer.recv(6)[:1] == b"\x02"  # A-ASSOCIATE-AC
        time.sleep(0.2)
        peer.sendall(b"\x04\x00" + struct.pack(">I", 2**31) + b"\x00" * 65536)
        assert _closed_by_listener(peer, 2 * TIMEOUT_S)
    [record] = [r for r in caplog.records if getattr(r, "action", "") == "association_oversized_pdu"]
    assert str(2**31) in record.getMessage()
    assert echoscu(node.port).returncode == 0
