"""The DICOM listener against real dcmtk peers: echo, store in several transfer syntaxes, refusals.

The listener runs in-process (``start_scp``, fixture ``node_listener``) on a free port with a real
SQLite queue; dcmtk's ``echoscu``/``storescu`` are the peers.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    HTJ2K,
    ComprehensiveSRStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForProcessing,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    generate_uid,
)

from dicom_node.config import ExportSettings, Peer
from dicom_node.errors import ExportError
from dicom_node.export import send
from inference.phantom import make_dicom
from tests.fixtures.common import free_port
from tests.fixtures.peers import Listener, echoscu, require_tool, storescu

pytestmark = pytest.mark.integration


def _ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_echo(node_listener: Callable[..., Listener]) -> None:
    node = node_listener()
    _ok(echoscu(node.port))


def _dcmcjpeg(src: Path, dst: Path, *flags: str) -> Path:
    subprocess.run([require_tool("dcmcjpeg"), *flags, str(src), str(dst)], check=True, capture_output=True,
                   timeout=60)
    return dst


@pytest.mark.parametrize(("flag", "syntax"), [
    ("", ExplicitVRLittleEndian),
    ("-xs", JPEGLosslessSV1),
    ("-xy", JPEGBaseline8Bit),
    ("-xv", JPEG2000Lossless),
])
def test_store_transfer_syntaxes_spooled_and_queued(node_listener: Callable[..., Listener], tmp_path: Path,
                                                    flag: str, syntax: str) -> None:
    node = node_listener()
    plain = tmp_path / "plain.dcm"
    if syntax == JPEG2000Lossless:
        ds = make_dicom(plain, transfer_syntax=JPEG2000Lossless, shape=(256, 256))
        src = plain
    elif syntax == JPEGBaseline8Bit:
        ds = make_dicom(plain, bits_stored=8, shape=(256, 256))
        src = _dcmcjpeg(plain, tmp_path / "jpeg.dcm", "+eb")
    elif syntax == JPEGLosslessSV1:
        ds = make_dicom(plain, shape=(256, 256))
        src = _dcmcjpeg(plain, tmp_path / "jpegll.dcm")
    else:
        ds = make_dicom(plain, shape=(256, 256))
        src = plain
    sent = dcmread(src, stop_before_pixels=True)  # dcmcjpeg +eb (lossy) makes a new SOP Instance UID
    assert str(sent.file_meta.TransferSyntaxUID) == syntax

    _ok(storescu(node.port, [src], extra=[flag] if flag else []))

    rows = node.job_rows()
    assert len(rows) == 1
    job = rows[0]
    assert job.state == "queued"
    assert job.sop_instance_uid == sent.SOPInstanceUID
    assert job.study_instance_uid == ds.StudyInstanceUID
    assert job.calling_ae == "TESTSCU" and job.calling_host == "127.0.0.1"
    spooled = Path(job.spool_path)
    assert spooled.parent.parent == node.settings.storage.spool_dir
    back = dcmread(spooled)
    assert back.file_meta.TransferSyntaxUID == syntax  # stored as received, not transcoded
    assert back.pixel_array.shape == (256, 256)
    assert not list(spooled.parent.glob(".tmp-*"))  # no temp file left behind
    audit = node.associations()
    assert audit and audit[-1].instances == 1 and not audit[-1].refused


@pytest.mark.parametrize("syntax", [HTJ2KLossless, HTJ2K])
def test_htj2k_stored_as_received_and_decodable(node_listener: Callable[..., Listener], tmp_path: Path,
                                                 syntax: str) -> None:
    # dcmtk 3.6.7 and Orthanc here do not know the HTJ2K transfer syntaxes, so pynetdicom's SCU is the peer.
    from pynetdicom import AE

    from inference.imaging import load_dicom

    node = node_listener()
    ds = make_dicom(transfer_syntax=syntax, shape=(256, 256), seed=3)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(ds.SOPClassUID, [syntax])
    assoc = ae.associate("127.0.0.1", node.port, ae_title="CXRNODE")
    assert assoc.is_established
    try:
        assert [str(c.transfer_syntax[0]) for c in assoc.accepted_contexts] == [syntax]
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert status.Status == 0x0000
    (job,) = node.job_rows()
    assert job.state == "queued" and job.sop_instance_uid == ds.SOPInstanceUID
    back = dcmread(job.spool_path)
    assert back.file_meta.TransferSyntaxUID == syntax  # stored as received
    reference = load_dicom(make_dicom(shape=(256, 256), seed=3)).pixels
    error = np.abs(load_dicom(back).pixels - reference)
    assert error.max() <= (0.05 if syntax == HTJ2K else 1e-6)


def test_dx_for_processing_accepted(node_listener: Callable[..., Listener], tmp_path: Path) -> None:
    node = node_listener()
    make_dicom(tmp_path / "dx.dcm", modality="DX", sop_class_uid=DigitalXRayImageStorageForProcessing,
               shape=(128, 128))
    _ok(storescu(node.port, [tmp_path / "dx.dcm"], extra=["-R"]))
    assert [j.sop_class_uid for j in node.job_rows()] == [DigitalXRayImageStorageForProcessing]


def test_duplicate_processed_once(node_listener: Callable[..., Listener], tmp_path: Path,
                                  caplog: pytest.LogCaptureFixture) -> None:
    node = node_listener()
    make_dicom(tmp_path / "a.dcm", shape=(128, 128))
    caplog.set_level(logging.INFO, logger="dicom_node")
    _ok(storescu(node.port, [tmp_path / "a.dcm"]))
    _ok(storescu(node.port, [tmp_path / "a.dcm"]))  # a peer resending after a lost response
    assert len(node.job_rows()) == 1
    assert [r.action for r in caplog.records if getattr(r, "action", "") == "store_duplicate"]


def test_unknown_calling_ae_rejected(node_listener: Callable[..., Listener], tmp_path: Path,
                                     caplog: pytest.LogCaptureFixture) -> None:
    node = node_listener(listener={"allowed_callers": ["PACS@127.0.0.1", "OTHER@10.255.255.1"]})
    make_dicom(tmp_path / "a.dcm", shape=(128, 128))
    caplog.set_level(logging.INFO, logger="dicom_node")

    stranger = echoscu(node.port, calling_ae="STRANGER")
    assert stranger.returncode != 0
    assert "Calling AE Title Not Recognized" in stranger.stdout + stderr_of(stranger)
    # OTHER is allowed only from 10.255.255.1
    wrong_host = storescu(node.port, [tmp_path / "a.dcm"], calling_ae="OTHER")
    assert wrong_host.returncode != 0
    assert node.job_rows() == []
    rejected = [r for r in caplog.records if getattr(r, "action", "") == "association_rejected"]
    assert {r.calling_ae for r in rejected} == {"STRANGER", "OTHER"}
    assert all(r.reason == "caller" for r in rejected)
    assert [a.calling_ae for a in node.associations() if a.refused] == ["STRANGER", "OTHER"]

    _ok(storescu(node.port, [tmp_path / "a.dcm"], calling_ae="PACS"))
    assert len(node.job_rows()) == 1

    wrong_called = echoscu(node.port, calling_ae="PACS", called_ae="NOTTHENODE")
    assert "Called AE Title Not Recognized" in wrong_called.stdout + wrong_called.stderr
    last = [r for r in caplog.records if getattr(r, "action", "") == "association_rejected"][-1]
    assert last.reason == "called_ae"


def stderr_of(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stderr or ""


def test_ct_refused_with_log_line(node_listener: Callable[..., Listener], tmp_path: Path,
                                  caplog: pytest.LogCaptureFixture) -> None:
    node = node_listener()
    make_dicom(tmp_path / "ct.dcm", sop_class_uid=CTImageStorage, shape=(64, 64))
    caplog.set_level(logging.INFO, logger="dicom_node")
    proc = storescu(node.port, [tmp_path / "ct.dcm"], extra=["-R"])  # propose only what the file needs
    assert proc.returncode != 0
    assert "No Acceptable Presentation Contexts" in proc.stdout + proc.stderr
    assert node.job_rows() == []
    lines = [r.getMessage() for r in caplog.records if getattr(r, "action", "") == "context_refused"]
    assert len(lines) == 1
    assert "CT Image Storage" in lines[0] and "not accepted" in lines[0]


def test_a_damaged_header_is_refused_as_not_understood(node_listener: Callable[..., Listener], tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    from pydicom.uid import ComputedRadiographyImageStorage
    from pynetdicom import AE

    node = node_listener()
    path = tmp_path / "damaged.dcm"
    make_dicom(path, shape=(128, 128))
    data = bytearray(path.read_bytes())
    data[data.index(b"\x20\x00\x0d\x00UI") + 5] = 0xB2  # Study Instance UID with an unknown VR
    path.write_bytes(bytes(data))
    caplog.set_level(logging.INFO, logger="dicom_node")
    # pynetdicom sends a file's data set as it is (dcmtk's storescu would repair the element first)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="CXRNODE")
    assert assoc.is_established
    status = assoc.send_c_store(str(path))
    assoc.release()
    assert int(status.Status) == 0xC000  # cannot understand: resending will not help (not "out of resources")
    assert node.job_rows() == []
    refused = [r for r in caplog.records if getattr(r, "action", "") == "store_refused"]
    assert len(refused) == 1 and refused[0].reason == "unparsable"
    assert not [r for r in caplog.records if getattr(r, "action", "") == "store_failed"]


def _send_raw(port: int, path: Path, transfer_syntax: str) -> int:
    """C-STORE of a file's data set exactly as it is on disk (pynetdicom sending the file in chunks, never
    decoding it; dcmtk's storescu would re-encode it); returns the response status."""
    from pydicom.uid import ComputedRadiographyImageStorage
    from pynetdicom import AE, _config

    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(ComputedRadiographyImageStorage, transfer_syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXRNODE")
    assert assoc.is_established
    chunked, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
    try:
        return int(assoc.send_c_store(str(path)).Status)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        assoc.release()


def test_a_damaged_deflated_data_set_is_refused_as_not_understood(node_listener: Callable[..., Listener],
                                                                  tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    node = node_listener()
    path = tmp_path / "deflated.dcm"
    make_dicom(path, shape=(128, 128), transfer_syntax=DeflatedExplicitVRLittleEndian)
    data = bytearray(path.read_bytes())
    data[-64:] = b"\xff" * 64  # the end of the deflate stream: zlib cannot inflate it
    path.write_bytes(bytes(data))
    caplog.set_level(logging.INFO, logger="dicom_node")
    assert _send_raw(node.port, path, DeflatedExplicitVRLittleEndian) == 0xC000
    assert node.job_rows() == []
    refused = [r for r in caplog.records if getattr(r, "action", "") == "store_refused"]
    assert len(refused) == 1 and refused[0].reason == "unparsable"
    assert not [r for r in caplog.records if getattr(r, "action", "") == "store_failed"]


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning")  # pydicom, writing the bad UIDs
@pytest.mark.filterwarnings("ignore:The value length:UserWarning")
def test_invalid_uids_are_refused_naming_the_attribute(node_listener: Callable[..., Listener], tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """The results must carry the study's UIDs and the queue holds at most 64 characters: an instance with
    an invalid one is refused at once (resending will not help), not accepted and failed later."""
    node = node_listener()
    caplog.set_level(logging.INFO, logger="dicom_node")
    cases = {"StudyInstanceUID": "1.2.03.4", "SeriesInstanceUID": "1.2." + "3" * 70}
    for keyword, value in cases.items():
        path = tmp_path / f"{keyword}.dcm"
        make_dicom(path, shape=(128, 128), **{keyword: value})
        assert _send_raw(node.port, path, ExplicitVRLittleEndian) == 0xC000, keyword
    good = tmp_path / "good.dcm"
    make_dicom(good, shape=(128, 128))
    assert _send_raw(node.port, good, ExplicitVRLittleEndian) == 0x0000
    assert [r.sop_instance_uid for r in node.job_rows()] == [str(dcmread(good).SOPInstanceUID)]
    refused = [r for r in caplog.records if getattr(r, "action", "") == "store_refused"]
    assert [r.reason for r in refused] == ["bad_header", "bad_header"]
    assert "StudyInstanceUID '1.2.03.4' (8 characters) is not a valid UID" in refused[0].getMessage()
    assert "SeriesInstanceUID '1.2.3333" in refused[1].getMessage()
    assert "(74 characters) is not a valid UID" in refused[1].getMessage()
    assert len(list(node.settings.storage.spool_dir.rglob("*.dcm"))) == 1  # nothing spooled for the refused


def test_a_spool_volume_gone_is_not_replaced_by_an_empty_directory(node_listener: Callable[..., Listener],
                                                                    tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """The spool's volume unmounted under a running listener: new instances get 'out of resources' (the
    sender retries later) instead of landing in a new directory on another disk; a listener starting
    without its spool while the queue holds jobs refuses to start."""
    from dicom_node.scp import start_scp

    node = node_listener()
    spool_dir = node.settings.storage.spool_dir
    make_dicom(tmp_path / "a.dcm", shape=(128, 128))
    make_dicom(tmp_path / "b.dcm", shape=(128, 128))
    first = storescu(node.port, [tmp_path / "a.dcm"], extra=["-v"])
    assert "Received Store Response (Success)" in first.stdout + first.stderr
    spool_dir.rename(tmp_path / "unmounted")
    caplog.set_level(logging.INFO, logger="dicom_node")
    out = storescu(node.port, [tmp_path / "b.dcm"], extra=["-v"])
    assert "Received Store Response (Refused: OutOfResources)" in out.stdout + out.stderr
    assert not spool_dir.exists() and len(node.job_rows()) == 1
    failed = [r for r in caplog.records if getattr(r, "action", "") == "store_failed"]
    assert [r.reason for r in failed] == ["spool"] and "is its volume mounted?" in failed[0].getMessage()
    with pytest.raises(FileNotFoundError, match=r"queue holds 1 job\(s\) with files in it"):
        start_scp(node.settings, node.jobs, node.engine)
    assert not spool_dir.exists()


def test_a_listener_whose_results_can_go_nowhere_says_so_at_start(node_listener: Callable[..., Listener],
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dicom_node")
    node_listener()
    node_listener(export={"destinations": ["PACS@127.0.0.1:104"]})
    node_listener(export={"callers": {"PACS": {"host": "127.0.0.1", "port": 104}}})
    warned = [r for r in caplog.records if getattr(r, "action", "") == "export_unrouted"]
    assert len(warned) == 1 and "no job can be delivered" in warned[0].getMessage()


def test_associations_ended_by_a_malformed_pdu_leave_no_state(node_listener: Callable[..., Listener],
                                                               tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer's malformed P-DATA stops pynetdicom's state machine: no release or abort event follows. The
    listener's per-association state (caller, counts) must not stay behind, or pile up, or pass to a later
    association that happens to get the same object id."""
    import gc
    import struct
    import threading
    import time

    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Verification

    from dicom_node.scp import start_scp

    # pynetdicom's thread dies with the error and its log record goes out, as in production, where nothing
    # keeps them; pytest's thread hook and log capture would hold their tracebacks, and the associations
    # with them, until the test ends
    monkeypatch.setattr(threading, "excepthook", lambda args: None)
    monkeypatch.setattr(logging.getLogger("pynetdicom"), "propagate", False)
    node = node_listener()
    port = free_port()
    settings = node.settings.model_copy(update={"listener": node.settings.listener.model_copy(
        update={"port": port})})
    server = start_scp(settings, node.jobs, node.engine)
    try:
        _, (ctx,) = server.get_handlers(evt.EVT_C_STORE)
        for _ in range(5):
            ae = AE(ae_title="BROKEN")
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", port, ae_title="CXRNODE")
            assert assoc.is_established
            pdv = b"\x01\x03" + b"\x00" * 10  # presentation context 1, command, last fragment: no command set
            item = struct.pack(">I", len(pdv)) + pdv
            assoc.dul.socket.socket.sendall(b"\x04\x00" + struct.pack(">I", len(item)) + item)
            time.sleep(0.2)
            assoc.abort()
        deadline = time.monotonic() + 10
        while ctx.open_associations() and time.monotonic() < deadline:
            gc.collect()
            time.sleep(0.1)
        assert ctx.open_associations() == 0
        make_dicom(tmp_path / "a.dcm", shape=(128, 128))
        out = storescu(port, [tmp_path / "a.dcm"], calling_ae="GOOD", extra=["-v"])
        assert "Received Store Response (Success)" in out.stdout + out.stderr
        assert [job.calling_ae for job in node.job_rows()] == ["GOOD"]
    finally:
        server.shutdown()
    # their audit records were closed when the next association came, saying how they ended
    from dicom_node.audit import recent_associations

    broken = [a for a in recent_associations(node.engine) if a["calling_ae"] == "BROKEN"]
    assert len(broken) == 5
    assert all(a["ended_at"] and "without release or abort" in a["reason"] for a in broken), broken


def test_a_resent_instance_leaves_no_file_its_job_does_not_use(node_listener: Callable[..., Listener],
                                                                tmp_path: Path) -> None:
    """Re-sent instances are acknowledged and not queued twice; the file the resend wrote is kept only when
    the job uses it (here: a queued job whose file had gone), not after retention deleted the job's files,
    nor under another Study Instance UID: no stray files that nothing would ever delete."""
    from datetime import timedelta

    from sqlalchemy import update
    from sqlalchemy.orm import Session

    from dicom_node.db import Job, utcnow
    from dicom_node.retention import purge

    node = node_listener()
    spool_dir = node.settings.storage.spool_dir

    def send(ds: Dataset, name: str) -> None:
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out = storescu(node.port, [path], extra=["-v"])
        assert "Received Store Response (Success)" in out.stdout + out.stderr, name

    delivered, queued, moved = (make_dicom(shape=(128, 128), seed=s) for s in (1, 2, 3))
    for i, ds in enumerate((delivered, queued, moved)):
        send(ds, f"first{i}")
    files = {str(j.sop_instance_uid): Path(j.spool_path) for j in node.job_rows()}
    assert all(f.is_file() for f in files.values())
    # the first was delivered long ago and retention deleted its files
    with Session(node.engine) as s, s.begin():
        s.execute(update(Job).where(Job.sop_instance_uid == str(delivered.SOPInstanceUID))
                  .values(state="done", finished_at=utcnow() - timedelta(days=40)))
    assert purge(node.engine, node.settings.storage.data_dir, 30).jobs == 1
    files[str(queued.SOPInstanceUID)].unlink()  # the second's file went missing while it waited

    send(delivered, "again0")
    send(queued, "again1")
    moved.StudyInstanceUID = generate_uid()  # the third again, under another study
    send(moved, "again2")
    assert len(node.job_rows()) == 3  # acknowledged, not queued twice
    assert not files[str(delivered.SOPInstanceUID)].exists()  # retention's deletion stands
    assert files[str(queued.SOPInstanceUID)].is_file()  # restored for the job that needs it
    assert files[str(moved.SOPInstanceUID)].is_file()
    assert sorted(spool_dir.rglob("*.dcm")) == sorted([files[str(queued.SOPInstanceUID)],
                                                      files[str(moved.SOPInstanceUID)]])


def test_a_resend_brings_back_a_job_that_failed_for_its_missing_file(
        node_listener: Callable[..., Listener], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """After a restore from an older backup, jobs whose files are gone fail with that reason; the PACS's
    resend writes the file again, and the job must run again (it stayed failed, the log saying "already
    queued")."""
    from dicom_node.queue import JobManager, missing_file_error

    node = node_listener()
    ds = make_dicom(shape=(128, 128), seed=4)
    path = tmp_path / "lost.dcm"
    ds.save_as(path, enforce_file_format=True)
    _ok(storescu(node.port, [path]))
    [job] = node.job_rows()
    Path(job.spool_path).unlink()
    jm = JobManager(node.engine)
    jm.claim("w")
    jm.fail(job.id, missing_file_error(job.spool_path), retryable=False, worker_id="w")
    caplog.set_level(logging.INFO, logger="dicom_node.handlers")
    caplog.clear()
    out = storescu(node.port, [path], extra=["-v"])
    assert "Received Store Response (Success)" in out.stdout + out.stderr
    [again] = node.job_rows()
    assert (again.id, again.state, again.attempts) == (job.id, "queued", 0)
    assert [r.action for r in caplog.records if r.action.startswith("store_")] == ["store_restored"]
    # a queued job whose file went missing is not said to have failed when a resend brings the file back
    caplog.clear()
    Path(again.spool_path).unlink()
    _ok(storescu(node.port, [path]))
    assert [r.action for r in caplog.records if r.action.startswith("store_")] == ["store_duplicate"]
    assert Path(again.spool_path).is_file()
    assert Path(again.spool_path).is_file()
    assert [j.id for j in jm.claim("w")] == [job.id]


def test_instances_larger_than_the_limits_are_refused_before_they_are_inflated_or_decoded(
        node_listener: Callable[..., Listener], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """listener.max_instance_mb bounds a data set, a deflated one once inflated (a few kB of zeros can inflate
    to gigabytes); an image header claiming more than MAX_PIXELS is refused before any decoding. Each is
    'cannot understand' (resending cannot help), logged with reason too_large, and nothing is spooled."""
    from inference.imaging import MAX_PIXELS

    node = node_listener(listener={"max_instance_mb": 1})
    caplog.set_level(logging.INFO, logger="dicom_node")
    bomb = tmp_path / "bomb.dcm"  # 2048 x 2048 x 16 bit of zeros: 8 MiB inflated, a few kB deflated
    ds = make_dicom(shape=(2048, 2048), bits_stored=16, transfer_syntax=DeflatedExplicitVRLittleEndian)
    ds.PixelData = bytes(2048 * 2048 * 2)
    ds.save_as(bomb, enforce_file_format=True)
    assert bomb.stat().st_size < 64 * 1024
    assert _send_raw(node.port, bomb, DeflatedExplicitVRLittleEndian) == 0xC000
    claims = tmp_path / "claims.dcm"  # a small image whose header claims 9000 x 9000 pixels
    ds = make_dicom(shape=(128, 128))
    ds.Rows = ds.Columns = 9000
    assert 9000 * 9000 > MAX_PIXELS
    ds.save_as(claims, enforce_file_format=True)
    assert _send_raw(node.port, claims, ExplicitVRLittleEndian) == 0xC000
    small = tmp_path / "small.dcm"
    make_dicom(small, shape=(128, 128), transfer_syntax=DeflatedExplicitVRLittleEndian)
    assert _send_raw(node.port, small, DeflatedExplicitVRLittleEndian) == 0x0000  # within the limits
    refused = [r for r in caplog.records if getattr(r, "action", "") == "store_refused"]
    assert [r.reason for r in refused] == ["too_large"] * 2
    assert "max_instance_mb (1 MiB)" in refused[0].getMessage() and "megapixels" in refused[1].getMessage()
    assert [j.sop_instance_uid for j in node.job_rows()] == [str(dcmread(small).SOPInstanceUID)]
    assert len(list(node.settings.storage.spool_dir.rglob("*.dcm"))) == 1
    # each refusal is on its association's audit record too (it said nothing of them)
    from dicom_node.audit import recent_associations

    reasons = [a["reason"] for a in reversed(recent_associations(node.engine))]
    assert reasons == ["1 C-STORE(s) refused", "1 C-STORE(s) refused", ""], reasons


def test_an_instance_over_the_limit_is_cut_off_while_it_arrives(node_listener: Callable[..., Listener],
                                                                 tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """An uncompressed instance larger than listener.max_instance_mb is not received whole before it is
    refused: its bytes are counted as they arrive and the association is aborted once past the limit (within
    one PDU of it), so memory never holds more than that. The sender's next association works."""
    from dicom_node.scp import MAX_PDU_BYTES

    node = node_listener(listener={"max_instance_mb": 1})
    caplog.set_level(logging.INFO, logger="dicom_node")
    big = tmp_path / "big.dcm"  # 32 MiB uncompressed
    make_dicom(big, shape=(4096, 4096), bits_stored=16)
    result = storescu(node.port, [big])
    assert result.returncode != 0, result.stdout + result.stderr
    refused = [r for r in caplog.records if getattr(r, "action", "") == "store_refused"]
    assert [r.reason for r in refused] == ["too_large"]
    assert "association aborted" in refused[0].getMessage()
    assert 2**20 < refused[0].bytes <= 2**20 + MAX_PDU_BYTES
    assert not node.job_rows() and not list(node.settings.storage.spool_dir.rglob("*.dcm"))
    small = tmp_path / "small.dcm"  # a second instance of a message after a cut-off one starts from zero
    make_dicom(small, shape=(600, 600), bits_stored=16)
    _ok(storescu(node.port, [small, tmp_path / "small.dcm"]))
    assert [j.sop_instance_uid for j in node.job_rows()] == [str(dcmread(small).SOPInstanceUID)]


def test_database_unreachable_gives_failure_status(node_listener: Callable[..., Listener], tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    # A PostgreSQL URL on a port where nothing listens: every enqueue fails.
    node = node_listener(db_url=f"postgresql+psycopg://cxr@127.0.0.1:{free_port()}/cxr?connect_timeout=2")
    make_dicom(tmp_path / "a.dcm", shape=(128, 128))
    caplog.set_level(logging.INFO, logger="dicom_node")
    proc = storescu(node.port, [tmp_path / "a.dcm"], extra=["-v"])
    out = proc.stdout + proc.stderr
    assert "Received Store Response (Refused: OutOfResources)" in out, out
    assert "Received Store Response (Success)" not in out
    failures = [r for r in caplog.records if getattr(r, "action", "") == "store_failed"]
    assert failures and failures[0].reason == "database"


def test_an_instance_refused_for_a_database_failure_leaves_no_file(node_listener: Callable[..., Listener],
                                                                   tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The file was written, the job could not be recorded (here SQLite's write lock is held elsewhere past
    the busy timeout), the peer got 0xA700: the file stayed for ever (retention deletes jobs' files only),
    patient data outside any retention. The resend, once the database is free, is stored and queued."""
    import sqlite3

    import dicom_node.db as db_module

    monkeypatch.setattr(db_module, "SQLITE_BUSY_TIMEOUT_MS", 500)
    node = node_listener()
    make_dicom(tmp_path / "a.dcm", shape=(128, 128))
    lock = sqlite3.connect(str(node.settings.storage.data_dir / "cxr-node.db"), isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # another writer holds the database
    try:
        out = storescu(node.port, [tmp_path / "a.dcm"], extra=["-v"])
        assert "Received Store Response (Refused: OutOfResources)" in out.stdout + out.stderr
        assert list(node.settings.storage.spool_dir.rglob("*.dcm")) == []
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    _ok(storescu(node.port, [tmp_path / "a.dcm"]))
    assert len(node.job_rows()) == 1 and len(list(node.settings.storage.spool_dir.rglob("*.dcm"))) == 1


def test_disk_watermark_refuses_associations(node_listener: Callable[..., Listener],
                                             caplog: pytest.LogCaptureFixture) -> None:
    node = node_listener(storage={"min_free_mb": 10**9})  # a petabyte: never available
    caplog.set_level(logging.INFO, logger="dicom_node")
    proc = echoscu(node.port)
    assert proc.returncode != 0
    assert "Local Limit Exceeded" in proc.stdout + proc.stderr
    rejected = [r for r in caplog.records if getattr(r, "action", "") == "association_rejected"]
    assert rejected and rejected[0].reason == "disk"
    assert "MiB free" in rejected[0].getMessage()


def test_own_results_ignored_foreign_sr_refused(node_listener: Callable[..., Listener],
                                                caplog: pytest.LogCaptureFixture) -> None:
    from dicom_node.outputs import build_outputs
    from tests.fixtures.validators import CARD, output_inputs

    node = node_listener()
    source, image, result = output_inputs("positive", shape=(128, 128))
    own = build_outputs(source, image, result, CARD, ExportSettings())
    assert len(own) == 2
    caplog.set_level(logging.INFO, logger="dicom_node")
    # The PACS forwards the node's own SR + SC back to it: success; each is recorded as ignored, nothing
    # is spooled or queued.
    node_peer = Peer(ae_title="CXRNODE", host="127.0.0.1", port=node.port)
    send(own, node_peer, ExportSettings(network_timeout_s=10), calling_ae="PACS")
    rows = node.job_rows()
    assert sorted(r.sop_instance_uid for r in rows) == sorted(str(o.SOPInstanceUID) for o in own)
    assert all(r.state == "ignored" and r.spool_path == "" and r.calling_ae == "PACS" for r in rows)
    assert len([r for r in caplog.records if getattr(r, "action", "") == "own_output_ignored"]) == 2

    foreign = Dataset()
    foreign.SOPClassUID = ComprehensiveSRStorage
    foreign.SOPInstanceUID = generate_uid()
    foreign.StudyInstanceUID = source.StudyInstanceUID
    foreign.SeriesInstanceUID = generate_uid()
    foreign.Modality = "SR"
    foreign.Manufacturer = "Another CAD vendor"
    with pytest.raises(ExportError, match="0x0122"):
        send([foreign], node_peer, ExportSettings(network_timeout_s=10), calling_ae="PACS")
    refused = [r for r in caplog.records if getattr(r, "action", "") == "store_refused"]
    assert [r.reason for r in refused] == ["foreign_output"]
    assert "Comprehensive SR Storage" in refused[0].getMessage()
    assert len(node.job_rows()) == len(own)  # the refused foreign SR left no row


def test_maximum_associations(node_listener: Callable[..., Listener],
                              caplog: pytest.LogCaptureFixture) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    node = node_listener(listener={"max_associations": 1})
    caplog.set_level(logging.INFO, logger="dicom_node")
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    held = ae.associate("127.0.0.1", node.port, ae_title="CXRNODE")
    assert held.is_established
    try:
        second = echoscu(node.port)
        assert second.returncode != 0
        assert "Local Limit Exceeded" in second.stdout + second.stderr
    finally:
        held.release()
    rejected = [r for r in caplog.records if getattr(r, "action", "") == "association_rejected"]
    assert [r.reason for r in rejected] == ["busy"]
    _ok(echoscu(node.port))  # the slot is free again


def test_spool_names_and_atomic_writes(tmp_path: Path) -> None:
    from dicom_node import spool

    assert spool.safe_name("1.2.840.10008.1") == "1.2.840.10008.1"
    for hostile in ("../../etc/passwd", "..", "", "1.2/3", "a" * 65, "1.2.3\\x"):
        name = spool.safe_name(hostile)
        assert name.startswith("x") and "/" not in name and ".." not in name
    path = spool.spool_path(tmp_path, "../..", "1.2.3")
    assert path.resolve().is_relative_to(tmp_path.resolve())

    target = tmp_path / "study" / "1.2.3.dcm"
    assert spool.write_atomic(target, b"first") is True
    assert spool.write_atomic(target, b"second") is False  # the first copy of an instance wins
    assert target.read_bytes() == b"first"
    assert spool.write_atomic(target, b"third", replace=True) is True
    assert target.read_bytes() == b"third"
    assert [p.name for p in target.parent.iterdir()] == ["1.2.3.dcm"]  # no temp files left
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        spool.write_atomic(blocker / "sub" / "x.dcm", b"data")  # a parent that is a file: nothing written


def test_a_failed_store_never_deletes_the_file_of_the_same_instance_acknowledged_meanwhile(
        tmp_path: Path) -> None:
    """Two associations store the same instance at once: the first writes the file, its job insert fails
    (database locked), the second found the file there and its insert commits just after the first cleans up.
    The first must not delete the file, or the second's acknowledged job points at nothing."""
    import io
    import threading
    from types import SimpleNamespace
    from typing import Any

    from sqlalchemy.exc import OperationalError

    from dicom_node.db import init_db, make_engine
    from dicom_node.handlers import StoreContext, _store
    from dicom_node.queue import JobManager

    engine = make_engine(f"sqlite:///{tmp_path / 'queue.db'}")
    init_db(engine)
    real = JobManager(engine)
    ds = make_dicom(shape=(64, 64))
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    second_wrote, first_done = threading.Event(), threading.Event()

    class Jobs:  # the real queue, with the two inserts forced into the racing order
        def enqueue(self, **kwargs: Any) -> tuple[int, bool]:
            if threading.current_thread().name == "first":
                second.start()
                assert second_wrote.wait(10)
                raise OperationalError("INSERT INTO jobs", {}, Exception("database is locked"))
            second_wrote.set()
            assert first_done.wait(10)
            return real.enqueue(**kwargs)

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    ctx = StoreContext(spool_dir, Jobs())  # one listener, two associations

    class Association:  # what the handler reads of pynetdicom's (held weakly, as pynetdicom's are)
        requestor = SimpleNamespace(ae_title="MOD", address="127.0.0.1", port=1)

    def event() -> Any:
        return SimpleNamespace(
            assoc=Association(),
            request=SimpleNamespace(AffectedSOPClassUID=ds.SOPClassUID,
                                    AffectedSOPInstanceUID=ds.SOPInstanceUID),
            context=SimpleNamespace(transfer_syntax=ExplicitVRLittleEndian),
            encoded_dataset=lambda include_meta=True: buffer.getvalue())

    statuses: dict[str, int] = {}
    second = threading.Thread(target=lambda: statuses.__setitem__("second", _store(event(), ctx)),
                              name="second")
    first = threading.Thread(target=lambda: (statuses.__setitem__("first", _store(event(), ctx)),
                                             first_done.set()), name="first")
    first.start()
    first.join(20)
    second.join(20)
    assert statuses == {"first": 0xA700, "second": 0x0000}
    (job,) = real.claim("w")
    assert Path(job.spool_path).is_file(), "the acknowledged instance's file was deleted"
    engine.dispose()
