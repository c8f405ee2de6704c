"""The whole node as radiology IT would run it: ``cxr-node serve`` as a process, real peers around it.

- Orthanc as the PACS: a synthetic DX as a DR system may send it (MONOCHROME1, stored mirrored, with pixel
  padding and a display shutter) uploaded to Orthanc and pushed to the node comes back as SR + SC in the
  same study, the SC turned to L\\F as the model saw it; both pass dciodvfy and dsrdump; the SR's
  probability, read back with highdicom, is the worker's. The node's own results pushed back to it are
  acknowledged and ignored.
- dcmtk storescu with JPEG lossless / baseline / JPEG 2000 is accepted and processed; results go to a
  storescp destination that is down at first and comes up later.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.db import Job, make_engine
from dicom_node.outputs import read_result
from inference.phantom import make_dicom
from tests.fixtures.peers import NodeProcess, Orthanc, StoreSCP, require_tool, storescu
from tests.fixtures.validators import Validation

pytestmark = pytest.mark.acceptance

SR_CLASSES = {"1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.33"}
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


def _wait(predicate: Callable[[], Any], timeout: float, what: str, node: NodeProcess) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if node.proc.poll() is not None:
            break
        time.sleep(0.25)
    raise AssertionError(f"{what} not seen after {timeout} s; node log:\n{node.log_text()[-5000:]}")


def _jobs(node: NodeProcess) -> list[Job]:
    engine = make_engine(node.db_url)
    try:
        with Session(engine) as s:
            rows = list(s.scalars(select(Job).order_by(Job.id)))
            for row in rows:
                s.expunge(row)
            return rows
    finally:
        engine.dispose()


def test_orthanc_push_returns_sr_and_heatmap(
        orthanc: Orthanc, node_process: Callable[..., NodeProcess], tmp_path: Path, phantom_bundle: Path,
        dciodvfy: Callable[[Any], Validation], dsrdump: Callable[[Any], Validation]) -> None:
    # Stage 1 of phantom_bundle finds the phantom's lungs, so the result is assessed and has a heatmap.
    node = node_process({
        "listener": {"allowed_callers": [f"{orthanc.aet}@127.0.0.1"]},
        "export": {"callers": {orthanc.aet: f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}"}},
    }, model=phantom_bundle)
    orthanc.add_modality("CXRNODE", node.ae_title, "127.0.0.1", node.port)
    source = make_dicom(modality="DX", photometric="MONOCHROME1", shape=(512, 512), opacity=0.6, seed=3,
                        padding=8, ShutterShape="RECTANGULAR", ShutterLeftVerticalEdge=17,
                        ShutterRightVerticalEdge=496, ShutterUpperHorizontalEdge=13,
                        ShutterLowerHorizontalEdge=500)
    source.PixelData = np.ascontiguousarray(source.pixel_array[:, ::-1]).tobytes()  # stored mirrored
    source.PatientOrientation = ["R", "F"]
    source.save_as(tmp_path / "dx.dcm", enforce_file_format=True)
    source_id = orthanc.upload(tmp_path / "dx.dcm")
    orthanc.push(source_id, "CXRNODE")

    study_id = orthanc.get(f"/instances/{source_id}/study")["ID"]
    _wait(lambda: [j for j in _jobs(node) if j.state in ("done", "failed")], 180, "job finished", node)
    [job] = _jobs(node)
    assert job.state == "done", job.last_error
    assert job.result is not None and job.result["finding"] != "not_assessable", job.result
    instances = orthanc.study_instances(study_id)
    assert len(instances) == 3, instances
    by_class: dict[str, Path] = {}
    for inst in instances:
        tags = orthanc.tags(inst["ID"])
        by_class[tags["SOPClassUID"]] = orthanc.download(inst["ID"], tmp_path / f"{inst['ID']}.dcm")
    sr_class = next(c for c in by_class if c in SR_CLASSES)
    sr, sc = pydicom.dcmread(by_class[sr_class]), pydicom.dcmread(by_class[SC_CLASS])
    for ds in (sr, sc):
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.PatientID == source.PatientID
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert list(sc.PatientOrientation) == ["L", "F"]
    assert "turned from the stored orientation R\\F" in sc.DerivationDescription

    for path in (by_class[sr_class], by_class[SC_CLASS]):
        check = dciodvfy(path)
        assert not check.errors, check.output
    report = dsrdump(by_class[sr_class])
    assert not report.errors and not report.warnings, report.output

    assert job.sop_instance_uid == source.SOPInstanceUID
    assert job.calling_ae == orthanc.aet
    parsed = read_result(sr)
    assert parsed["probability"] == pytest.approx(job.result["probability"], abs=1e-12)
    assert parsed["finding"] == job.result["finding"]

    # The PACS sends the node's own SR back to it: acknowledged, recognised, not processed again.
    sr_id = next(i["ID"] for i in instances if orthanc.tags(i["ID"])["SOPClassUID"] == sr_class)
    orthanc.push(sr_id, "CXRNODE")
    node.wait_log("action=own_output_ignored", timeout=30)
    jobs = _jobs(node)
    assert [j.state for j in jobs] == ["done", "ignored"] and jobs[1].sop_instance_uid == sr.SOPInstanceUID
    assert node.stop() == 0


def test_storescu_compressed_processed_and_delivered_after_destination_comes_up(
        node_process: Callable[..., NodeProcess], storescp: Callable[..., StoreSCP], tmp_path: Path,
        phantom_bundle: Path) -> None:
    dest = storescp("PACS", start=False)  # down when the first deliveries are attempted
    node = node_process({"export": {"destinations": [dest.address], "network_timeout_s": 5},
                         "worker": {"backoff_base_s": 0.5, "backoff_max_s": 1.0, "max_attempts": 30}},
                        model=phantom_bundle)
    sent = {}
    for flag in ("-xs", "-xy", "-xv"):  # JPEG lossless SV1, JPEG baseline, JPEG 2000 lossless
        plain = tmp_path / f"plain{flag}.dcm"
        if flag == "-xv":
            make_dicom(plain, transfer_syntax="1.2.840.10008.1.2.4.90", shape=(384, 384), seed=1)
            src = plain
        else:
            make_dicom(plain, shape=(384, 384), bits_stored=8 if flag == "-xy" else 12, seed=2)
            src = tmp_path / f"compressed{flag}.dcm"
            options = ["+eb"] if flag == "-xy" else []  # dcmcjpeg's default is lossless SV1
            subprocess.run([require_tool("dcmcjpeg"), *options, str(plain), str(src)],
                           check=True, capture_output=True, timeout=60)
        proc = storescu(node.port, [src], extra=[flag])
        assert proc.returncode == 0, proc.stdout + proc.stderr
        ds = pydicom.dcmread(src, stop_before_pixels=True)
        sent[str(ds.SOPInstanceUID)] = ds

    node.wait_log("action=export_unreachable", timeout=180)
    dest.start()
    _wait(lambda: all(j.state == "done" for j in _jobs(node)), 120, "all jobs done", node)
    jobs = _jobs(node)
    assert {j.sop_instance_uid for j in jobs} == set(sent)
    datasets = [pydicom.dcmread(f) for f in dest.files()]
    for uid, src_ds in sent.items():
        results = [ds for ds in datasets if ds.StudyInstanceUID == src_ds.StudyInstanceUID]
        classes = {str(ds.SOPClassUID) for ds in results}
        assert classes & SR_CLASSES and SC_CLASS in classes, (uid, classes)
        assert len(results) == 2  # delivered once, although the first attempts failed
