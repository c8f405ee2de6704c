"""The worker with the real pipeline (tiny random bundles), real phantom DICOMs and SQLite."""

from __future__ import annotations

import json
import logging
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from dicom_node.config import Settings
from dicom_node.db import Job, ModelVersion, init_db, make_engine, utcnow
from dicom_node.queue import JobManager
from dicom_node.worker import Worker, default_pipeline_factory, output_dir_for
from inference.bundle import make_random_bundle
from inference.phantom import make_dicom
from tests.fixtures.database import job_row

pytestmark = pytest.mark.unit


@pytest.fixture
def settings(tmp_path: Path, tiny_bundle: Path) -> Settings:
    return Settings.model_validate({
        "storage": {"data_dir": str(tmp_path / "data")},
        "model": {"path": str(tiny_bundle), "device": "cpu", "cpu_threads": 1, "batch_size": 4},
        "worker": {"lease_s": 30, "backoff_base_s": 0.2, "backoff_max_s": 1, "max_attempts": 3},
    })


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    eng = make_engine(settings.db_url)
    init_db(eng)
    yield eng
    eng.dispose()


def spool(settings: Settings, jm: JobManager, name: str, *, garbage: bool = False,
          calling_ae: str = "MODALITY") -> int:
    """Write an instance into the spool and queue it, as the listener does."""
    path = settings.storage.spool_dir / "1.2.3" / f"{name}.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    uid = f"1.2.826.0.1.3680043.8.498.77.{zlib.crc32(name.encode())}"
    if garbage:
        path.write_bytes(b"\x00" * 128 + b"DICM" + b"not really a dataset" * 10)
    else:
        # fixed UIDs: the same bytes every run, so a byte damaged on purpose always meets the same neighbours
        make_dicom(path, shape=(256, 256), sop_instance_uid=uid, seed=len(name),
                   study_instance_uid=f"{uid}.1", SeriesInstanceUID=f"{uid}.2")
    job_id, created = jm.enqueue(sop_instance_uid=uid, study_instance_uid="1.2.3",
                                 series_instance_uid="1.2.3.4", sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                                 calling_ae=calling_ae, calling_host="127.0.0.1", spool_path=str(path))
    assert created
    return job_id


def run_until_processed(worker: Worker, engine: Engine, job_id: int, timeout: float = 60) -> None:
    """Run ``worker`` in its own thread, as the service does, until the job has a result; then stop it."""
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,))
    thread.start()
    deadline = time.monotonic() + timeout
    while job_row(engine, job_id).result is None and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    thread.join(60)
    assert not thread.is_alive()


def test_undecodable_fails_permanently_and_good_images_get_stored_outputs(settings: Settings,
                                                                           engine: Engine) -> None:
    jm = JobManager(engine, settings.worker)
    good = spool(settings, jm, "good")
    bad = spool(settings, jm, "bad", garbage=True)
    missing = spool(settings, jm, "gone")
    Path(job_row(engine, missing).spool_path).unlink()
    worker = Worker(settings, engine, job_manager=jm)
    assert worker.run_once() == 3

    bad_job = job_row(engine, bad)
    assert bad_job.state == "failed" and bad_job.attempts == 1
    assert (bad_job.last_error or "").startswith("undecodable instance")
    assert "is missing" in (job_row(engine, missing).last_error or "")

    done = job_row(engine, good)
    # no export destination is configured: the outputs are stored, delivery fails with the reason
    assert done.state == "failed" and "no export destination" in (done.last_error or "")
    # tiny_bundle's stage 1 is fitted to phantoms: the image is assessed and gets a heatmap SC besides the SR
    assert done.result is not None and done.result["finding"] in ("positive", "negative")
    assert done.result["model_version"] == "0.0.0-test"
    assert done.output_dir == str(output_dir_for(done.spool_path))
    files = sorted(Path(done.output_dir).glob("*.dcm"))
    assert sorted(pydicom.dcmread(f).Modality for f in files) == ["OT", "SR"], files
    sr = [pydicom.dcmread(f) for f in files if pydicom.dcmread(f).Modality == "SR"]
    assert len(sr) == 1 and sr[0].SOPInstanceUID == done.sr_sop_instance_uid
    assert sr[0].StudyInstanceUID == pydicom.dcmread(done.spool_path).StudyInstanceUID
    # once a destination exists an operator retry only delivers (no second inference)
    assert jm.retry(good).value == "exporting"


def _damage(path: Path, before: bytes, offset: int, value: int) -> None:
    """Overwrite one byte of the spooled file, ``offset`` bytes after the first ``before``."""
    data = bytearray(path.read_bytes())
    data[data.index(before) + offset] = value
    path.write_bytes(bytes(data))


@pytest.mark.filterwarnings("ignore:Expected explicit VR:UserWarning")  # pydicom, on the damaged meta
def test_a_spooled_file_damaged_on_disk_fails_its_job_and_the_worker_goes_on(settings: Settings,
                                                                              engine: Engine) -> None:
    jm = JobManager(engine, settings.worker)
    damages = {  # what pydicom raises on reading each: BytesLengthException, NotImplementedError, ValueError
        "group-length-vr": (b"DICM", 8, 0xAE),  # (0002,0000)'s VR, the first element after the prefix
        "transfer-syntax-vr": (b"\x02\x00\x10\x00UI", 5, 0xB2),  # an unknown VR in the file meta
        "character-set-length": (b"\x08\x00\x05\x00CS", 6, 104),  # Specific Character Set runs into NULs
    }
    jobs = {}
    for name, damage in damages.items():
        jobs[name] = spool(settings, jm, name)
        _damage(Path(job_row(engine, jobs[name]).spool_path), *damage)
    good = spool(settings, jm, "intact")
    worker = Worker(settings, engine, job_manager=jm)
    assert worker.run_once() == 4  # no exception: the worker is still running
    for name, job_id in jobs.items():
        job = job_row(engine, job_id)
        assert job.state == "failed" and job.attempts == 1, name
        assert "undecodable instance" in (job.last_error or "") and "cannot be parsed" in job.last_error, name
    assert job_row(engine, good).result["finding"] in ("positive", "negative")


def test_an_unreadable_patient_attribute_fails_the_job_before_inference(settings: Settings,
                                                                        engine: Engine) -> None:
    jm = JobManager(engine, settings.worker)
    job_id = spool(settings, jm, "damaged-name")
    _damage(Path(job_row(engine, job_id).spool_path), b"\x10\x00\x10\x00PN", 5, 0xB2)  # an unknown VR
    calls: list[int] = []
    real = default_pipeline_factory(settings)

    class Counting:
        def __init__(self, inner: Any) -> None:
            self.inner, self.bundle = inner, inner.bundle

        def run(self, images: Any, explain: bool = True) -> Any:
            calls.append(len(images))
            return self.inner.run(images, explain=explain)

    worker = Worker(settings, engine, job_manager=jm, pipeline_factory=lambda p: Counting(real(p)))
    assert worker.run_once() == 1
    job = job_row(engine, job_id)
    assert job.state == "failed" and job.attempts == 1 and job.output_dir is None
    reason = job.last_error or ""
    assert "header element (0010,0010) PatientName cannot be read (NotImplementedError)" in reason
    assert "patient and study attributes" in job.last_error
    assert calls == []  # no inference for an image whose results could not be built


def test_worker_swaps_to_the_promoted_model_between_batches(settings: Settings, engine: Engine,
                                                             tmp_path: Path, tiny_bundle: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dicom_node.worker")
    settings.model.path = None  # serve the registry's current model
    loaded: list[Path | None] = []
    real = default_pipeline_factory(settings)

    def factory(path: Path | None) -> Any:
        loaded.append(path)
        return real(path)

    newer = make_random_bundle(tmp_path / "v2", seg_size=64, cls_size=64, version="0.0.2-test")
    with Session(engine) as s, s.begin():
        s.add(ModelVersion(version="0.0.0-test", path=str(tiny_bundle), status="current",
                           promoted_at=utcnow()))
    jm = JobManager(engine, settings.worker)
    worker = Worker(settings, engine, job_manager=jm, pipeline_factory=factory, model_check_interval_s=0.05)
    worker.load_model()
    assert worker.pipeline.bundle.version == "0.0.0-test"
    assert worker.load_model() is False  # unchanged registry: nothing reloaded

    with Session(engine) as s, s.begin():  # what `cxr-node models promote` does
        s.query(ModelVersion).filter_by(status="current").update({"status": "retired"})
        s.add(ModelVersion(version="0.0.2-test", path=str(newer), status="current", promoted_at=utcnow()))
    job_id = spool(settings, jm, "after-promotion")
    run_until_processed(worker, engine, job_id)
    assert loaded == [tiny_bundle, newer]
    assert worker.pipeline.bundle.version == "0.0.2-test"
    assert job_row(engine, job_id).result["model_version"] == "0.0.2-test"
    assert any(getattr(r, "action", "") == "model_swapped" for r in caplog.records)

    # a broken promoted bundle is refused: the worker keeps serving the previous model
    with Session(engine) as s, s.begin():
        s.query(ModelVersion).filter_by(status="current").update({"status": "retired"})
        s.add(ModelVersion(version="9.9.9", path=str(tmp_path / "nothing-here"), status="current",
                           promoted_at=utcnow()))
    assert worker.load_model() is False
    assert worker.pipeline.bundle.version == "0.0.2-test"
    assert any(getattr(r, "action", "") == "model_swap_failed" for r in caplog.records)


def test_a_model_that_failed_to_load_once_is_tried_again(settings: Settings, engine: Engine, tmp_path: Path,
                                                        tiny_bundle: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A promoted model whose load failed for a passing cause (memory, a file system away) is not given up:
    promoted again it is loaded, and so it is after the retry interval without a new promotion."""
    import dicom_node.worker as worker_module

    settings.model.path = None
    real = default_pipeline_factory(settings)
    failing: set[str] = set()

    def factory(path: Path | None) -> Any:
        if str(path) in failing:
            raise RuntimeError("CUDA out of memory")  # what a busy GPU answers
        return real(path)

    def promote(version: str, path: Path) -> None:
        with Session(engine) as s, s.begin():
            s.query(ModelVersion).filter_by(status="current").update({"status": "retired"})
            row = s.query(ModelVersion).filter_by(version=version).one_or_none()
            if row is None:
                s.add(ModelVersion(version=version, path=str(path), status="current", promoted_at=utcnow()))
            else:
                row.status, row.promoted_at = "current", utcnow()

    newer = make_random_bundle(tmp_path / "v2", seg_size=64, cls_size=64, version="0.0.2-test")
    promote("0.0.0-test", tiny_bundle)
    worker = Worker(settings, engine, pipeline_factory=factory)
    worker.load_model()
    failing.add(str(newer))
    promote("0.0.2-test", newer)
    assert worker.load_model() is False and worker.pipeline.bundle.version == "0.0.0-test"
    failing.clear()  # the cause has passed
    assert worker.load_model() is False  # not tried again at every check
    promote("0.0.0-test", tiny_bundle)  # rolled back: the model in use, nothing to load
    assert worker.load_model() is False and worker.pipeline.bundle.version == "0.0.0-test"
    promote("0.0.2-test", newer)  # promoted again: tried again, and served
    assert worker.load_model() is True and worker.pipeline.bundle.version == "0.0.2-test"

    failing.add(str(tiny_bundle))
    promote("0.0.0-test", tiny_bundle)
    assert worker.load_model() is False and worker.pipeline.bundle.version == "0.0.2-test"
    failing.clear()
    monkeypatch.setattr(worker_module, "MODEL_RETRY_S", 0.0)  # the retry interval has passed
    assert worker.load_model() is True and worker.pipeline.bundle.version == "0.0.0-test"


class SlowPipeline:
    """The real pipeline, but each batch takes at least ``delay`` seconds (a slow CPU)."""

    def __init__(self, inner: Any, delay: float) -> None:
        self.inner, self.delay, self.bundle = inner, delay, inner.bundle

    def run(self, images: Any, explain: bool = True) -> Any:
        time.sleep(self.delay)
        return self.inner.run(images, explain=explain)


class RecordingPipeline:
    """The real pipeline, keeping the arrays its ``host_array`` gave and the images it ran."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.bundle = inner, inner.bundle
        self.given: list[Any] = []
        self.images: list[Any] = []

    def host_array(self, shape: tuple[int, int], dtype: Any = np.float32) -> Any:
        self.given.append(self.inner.host_array(shape, dtype))
        return self.given[-1]

    def run(self, images: Any, explain: bool = True) -> Any:
        self.images += list(images)
        return self.inner.run(images, explain=explain)


def test_the_worker_decodes_into_the_pipelines_host_arrays(settings: Settings, engine: Engine) -> None:
    real = default_pipeline_factory(settings)
    made: list[RecordingPipeline] = []

    def factory(path: Path | None) -> RecordingPipeline:
        made.append(RecordingPipeline(real(path)))
        return made[-1]

    worker = Worker(settings, engine, pipeline_factory=factory)
    jobs = [spool(settings, worker.jm, name) for name in ("first", "second")]
    assert worker.run_once() == 2
    (pipeline,) = made
    # on the CPU the pipeline declines the stored values (only its device path takes them) and gives the
    # pixels' arrays
    arrays = [a for a in pipeline.given if a is not None]
    assert len(pipeline.images) == 2 and len(arrays) == 2 and len(pipeline.given) == 4
    assert all(any(image.pixels is a for a in arrays) for image in pipeline.images)
    assert all(job_row(engine, j).result["finding"] in ("positive", "negative") for j in jobs)


def test_heartbeat_keeps_the_lease_during_a_long_batch(settings: Settings, engine: Engine) -> None:
    settings.worker.lease_s = 1.5  # heartbeat every 0.5 s
    real = default_pipeline_factory(settings)
    worker = Worker(settings, engine, pipeline_factory=lambda p: SlowPipeline(real(p), 3.0))
    job_id = spool(settings, worker.jm, "slow")
    other = JobManager(engine, settings.worker)
    reclaimed: list[int] = []

    def watcher() -> None:  # another node's maintenance running while the batch is in hand
        for _ in range(30):
            reclaimed.append(other.reclaim_stalled())
            time.sleep(0.1)

    t = threading.Thread(target=watcher)
    t.start()
    worker.run_once()
    t.join()
    assert sum(reclaimed) == 0, "the lease expired although the worker was alive"
    history = [h["to_state"] for h in worker.jm.history(job_id)]
    assert history[:3] == ["queued", "processing", "exporting"]


def test_missing_spool_volume_is_retried_not_failed(settings: Settings, engine: Engine,
                                                    tmp_path: Path) -> None:
    jm = JobManager(engine, settings.worker)
    job_id = spool(settings, jm, "elsewhere")
    moved = settings.model_copy(update={"storage": settings.storage.model_copy(
        update={"data_dir": tmp_path / "not-mounted"})})
    worker = Worker(moved, engine, job_manager=jm)
    Path(job_row(engine, job_id).spool_path).unlink()
    from dicom_node.metrics import REGISTRY

    def finished(outcome: str) -> float:
        return REGISTRY.get_sample_value("cxrnode_jobs_finished_total", {"outcome": outcome}) or 0.0

    before = {outcome: finished(outcome) for outcome in ("retry", "failed")}
    worker.run_once()
    job = job_row(engine, job_id)
    assert job.state == "queued" and "is not available on worker" in (job.last_error or "")
    grown = {outcome: finished(outcome) - before[outcome] for outcome in before}
    assert grown == {"retry": 1.0, "failed": 0.0}


def test_stop_lets_the_batch_in_hand_finish(settings: Settings, engine: Engine) -> None:
    real = default_pipeline_factory(settings)
    worker = Worker(settings, engine, pipeline_factory=lambda p: SlowPipeline(real(p), 1.5))
    first = spool(settings, worker.jm, "in-hand")
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,))
    thread.start()
    deadline = time.monotonic() + 60
    while job_row(engine, first).state == "queued" and time.monotonic() < deadline:
        time.sleep(0.02)
    later = spool(settings, worker.jm, "arrives-after-stop")
    stop.set()  # what SIGTERM does, while the first job is being processed
    thread.join(60)
    assert not thread.is_alive()
    job = job_row(engine, first)
    assert job.lease_owner is None and job.result is not None, "the job in hand was abandoned"
    assert job_row(engine, later).state == "queued"


def test_patient_names_never_reach_the_logs(settings: Settings, engine: Engine,
                                            caplog: pytest.LogCaptureFixture) -> None:
    name = "QUIXOTE^ZEBULON"
    caplog.set_level(logging.DEBUG)
    jm = JobManager(engine, settings.worker)
    path = settings.storage.spool_dir / "1.2.3" / "named.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    uid = "1.2.826.0.1.3680043.8.498.77.424242"
    make_dicom(path, shape=(256, 256), sop_instance_uid=uid, patient_name=name)
    jm.enqueue(sop_instance_uid=uid, study_instance_uid="1.2.3", series_instance_uid="1.2.3.4",
               sop_class_uid="1.2.840.10008.5.1.4.1.1.1", calling_ae="MODALITY", calling_host="127.0.0.1",
               spool_path=str(path))
    assert Worker(settings, engine, job_manager=jm).run_once() == 1
    assert any(getattr(r, "action", "") for r in caplog.records if r.name.startswith("dicom_node"))
    for part in name.split("^"):
        for record in caplog.records:
            assert part not in record.getMessage(), record.getMessage()
            assert part not in repr(vars(record)), record.name


def test_birth_dates_and_ages_never_reach_the_logs_or_the_results(settings: Settings, engine: Engine,
                                                                  caplog: pytest.LogCaptureFixture,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """An invalid birth date or age (old formats are common in real data) is named, not quoted, in the log;
    a child's reason gives the age and where it came from, not the birth date."""
    import warnings

    import pydicom

    from dicom_node.logs import keep_values_out_of_logs

    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode",
                        pydicom.config.settings.reading_validation_mode)  # restored afterwards
    keep_values_out_of_logs()  # as every cxr-node command does when it sets up logging
    caplog.set_level(logging.DEBUG)
    jm = JobManager(engine, settings.worker)
    cases = {"adult": {"PatientBirthDate": "1950.03.07", "PatientAge": "72 Y"},
             "child": {"PatientBirthDate": "20100307"}}
    ids = {}
    for name, header in cases.items():
        path = settings.storage.spool_dir / "1.2.3" / f"{name}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        uid = f"1.2.826.0.1.3680043.8.498.79.{len(ids)}"
        make_dicom(path, shape=(256, 256), sop_instance_uid=uid, **header)
        ids[name], _ = jm.enqueue(sop_instance_uid=uid, study_instance_uid="1.2.3",
                                  series_instance_uid="1.2.3.4", sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                                  calling_ae="MODALITY", calling_host="127.0.0.1", spool_path=str(path))
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        assert Worker(settings, engine, job_manager=jm).run_once() == 2
    child = job_row(engine, ids["child"]).result
    assert child["reason_code"] == "child"
    assert child["reason"].startswith("patient aged 13 years (from PatientBirthDate and StudyDate)")
    invalid = [r.getMessage() for r in caplog.records if getattr(r, "action", "") == "dicom_header_invalid"]
    assert any("PatientBirthDate" in m for m in invalid) and any("PatientAge" in m for m in invalid)
    texts = [r.getMessage() + repr(vars(r)) for r in caplog.records] + [str(w.message) for w in warned]
    texts += [json.dumps(job_row(engine, i).result) for i in ids.values()]
    for value in ("1950.03.07", "19500307", "72 Y", "20100307"):
        assert not [t for t in texts if value in t], value


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning")  # pydicom, on the invalid UID
def test_an_invalid_study_uid_fails_the_job_once_before_inference(settings: Settings, engine: Engine) -> None:
    """A UID the results could not carry (here a leading zero) fails the job at once: no inference, no
    retries. The listener refuses such instances; this one reached the spool before that check."""
    jm = JobManager(engine, settings.worker)
    path = settings.storage.spool_dir / "1.2.3" / "bad-uid.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    make_dicom(path, shape=(256, 256), sop_instance_uid="1.2.826.0.1.3680043.8.498.78",
               study_instance_uid="1.2.03.4")
    job_id, _ = jm.enqueue(sop_instance_uid="1.2.826.0.1.3680043.8.498.78", study_instance_uid="1.2.03.4",
                           series_instance_uid="1.2.3.4", sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                           calling_ae="MODALITY", calling_host="127.0.0.1", spool_path=str(path))
    good = spool(settings, jm, "intact")
    worker = Worker(settings, engine, job_manager=jm)
    assert worker.run_once() == 2
    job = job_row(engine, job_id)
    assert job.state == "failed" and job.attempts == 1 and job.result is None and job.output_dir is None
    assert job.last_error == ("invalid instance: the results could not reference it (Argument \"source\" has "
                              "an invalid StudyInstanceUID: '1.2.03.4'.)")
    assert job_row(engine, good).result["finding"] in ("positive", "negative")


def test_a_batch_interrupted_by_a_database_error_is_given_back_when_the_database_answers(
        settings: Settings, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A moment's database error (a PostgreSQL restart) abandons the batch in hand; its jobs must run again
    as soon as the database answers, not after their leases (300 s by default; 30 s here, longer than the
    test waits), and without an attempt counted for the interruption."""
    from sqlalchemy.exc import OperationalError

    import dicom_node.worker as worker_module

    monkeypatch.setattr(worker_module, "DB_RETRY_PAUSE_S", 0.05)
    jm = JobManager(engine, settings.worker)
    first, second = spool(settings, jm, "first"), spool(settings, jm, "second")
    real = jm.finish_inference
    calls = []

    def finish_inference(job_id: int, **kwargs: Any) -> None:
        calls.append(job_id)
        if len(calls) == 1:
            raise OperationalError("UPDATE jobs", {}, Exception("server closed the connection unexpectedly"))
        real(job_id, **kwargs)

    monkeypatch.setattr(jm, "finish_inference", finish_inference)
    worker = Worker(settings, engine, job_manager=jm)
    run_until_processed(worker, engine, first, timeout=15)
    run_until_processed(worker, engine, second, timeout=15)
    for job_id in (first, second):
        row = job_row(engine, job_id)
        assert row.result is not None and row.attempts == 1, (job_id, row.state, row.attempts)
    assert any("given back: a database error interrupted its batch" in message
               for message in [e["message"] for e in jm.history(first)])


def test_a_job_moved_under_its_worker_does_not_end_the_worker(settings: Settings, engine: Engine,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """Should a job's state change under its lease (as a racing operator retry once made it), recording its
    failure is refused by the state machine: logged, and the worker goes on (its thread used to end there,
    and serve with it)."""
    jm = JobManager(engine, settings.worker)
    job_id = spool(settings, jm, "moved")
    worker = Worker(settings, engine, job_manager=jm)
    (claimed,) = jm.claim(worker.worker_id)
    with Session(engine) as session, session.begin():
        session.get(Job, job_id).state = "queued"
    caplog.set_level(logging.ERROR, logger="dicom_node")
    worker._fail(claimed, "building outputs failed: boom", retryable=False)
    (record,) = [r for r in caplog.records if getattr(r, "action", "") == "worker_fail_not_recorded"]
    assert "illegal job transition queued -> failed" in record.getMessage()
    assert "building outputs failed: boom" in record.getMessage()


def test_outputs_that_cannot_be_built_fail_the_job_once(settings: Settings, engine: Engine,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A header the output builder rejects (highdicom's TypeError, say) is rejected again on every attempt,
    each running the model again: the job fails at once with the error; others go on."""
    import dicom_node.outputs as outputs_module

    real = outputs_module.build_outputs

    def build(ds: pydicom.Dataset, *args: Any, **kwargs: Any) -> Any:
        if str(ds.SOPInstanceUID).endswith(str(zlib.crc32(b"rejected"))):
            raise TypeError("Invalid type for a person name.")
        return real(ds, *args, **kwargs)

    monkeypatch.setattr(outputs_module, "build_outputs", build)
    jm = JobManager(engine, settings.worker)
    rejected, good = spool(settings, jm, "rejected"), spool(settings, jm, "fine")
    assert Worker(settings, engine, job_manager=jm).run_once() == 2
    job = job_row(engine, rejected)
    assert (job.state, job.attempts) == ("failed", 1)
    assert job.last_error == "building outputs failed: TypeError: Invalid type for a person name."
    assert job_row(engine, good).result["finding"] in ("positive", "negative")


def test_stored_outputs_on_a_volume_missing_here_are_not_computed_again(settings: Settings, engine: Engine,
                                                                        tmp_path: Path) -> None:
    """A delivery claimed by a worker without the shared volume is retried later (with its attempts counted),
    not sent back to inference with its attempts reset and its outputs forgotten."""
    from tests.fixtures.common import free_port

    down = Settings.model_validate({**settings.model_dump(), "export": {
        "destinations": [f"PACS@127.0.0.1:{free_port()}"], "network_timeout_s": 2}})
    jm = JobManager(engine, down.worker)
    job_id = spool(down, jm, "exported-later")
    assert Worker(down, engine, job_manager=jm).run_once() == 1  # inference done, the destination is down
    before = job_row(engine, job_id)
    assert before.state == "exporting" and before.output_dir and before.attempts == 1
    with Session(engine) as s, s.begin():  # due now, without waiting for the backoff
        s.get(Job, job_id).not_before = None
    spool_dir = down.storage.spool_dir
    spool_dir.rename(tmp_path / "unmounted")  # the volume is not mounted on this worker's machine
    assert Worker(down, engine, job_manager=jm).run_once() == 1
    assert not spool_dir.exists()
    job = job_row(engine, job_id)
    assert job.state == "exporting" and job.attempts == 2 and job.output_dir == before.output_dir
    assert "is not available on worker" in (job.last_error or "")
    assert sum(1 for h in jm.history(job_id) if h["to_state"] == "processing") == 1  # no second inference


def test_a_database_outage_is_logged_once_with_its_traceback_then_once_a_minute(
        settings: Settings, engine: Engine, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A worker retries every few seconds while the database is away; its log gets the first failure with
    the traceback, then one line a minute (not one traceback per try), and a line when it is back."""
    from sqlalchemy.exc import OperationalError

    import dicom_node.worker as worker_module

    monkeypatch.setattr(worker_module, "DB_RETRY_PAUSE_S", 0.01)
    monkeypatch.setattr(worker_module, "DB_ERROR_LOG_EVERY_S", 3600.0)
    jm = JobManager(engine, settings.worker)
    job_id = spool(settings, jm, "after-the-outage")
    worker = Worker(settings, engine, job_manager=jm)
    worker.load_model()
    real_claim, failures = jm.claim, [20]

    def claim(worker_id: str, limit: int = 1, **kwargs: Any) -> Any:
        if failures[0]:
            failures[0] -= 1
            raise OperationalError("SELECT ...", {}, Exception("server closed the connection unexpectedly"))
        return real_claim(worker_id, limit, **kwargs)

    monkeypatch.setattr(jm, "claim", claim)
    caplog.set_level(logging.INFO, logger="dicom_node.worker")
    run_until_processed(worker, engine, job_id)
    assert job_row(engine, job_id).result is not None  # processed once the database was back
    errors = [r for r in caplog.records if getattr(r, "action", "") == "worker_db_error"]
    assert len(errors) == 1 and errors[0].exc_info is not None
    [back] = [r for r in caplog.records if getattr(r, "action", "") == "worker_db_back"]
    assert "(20 failed tries)" in back.getMessage()


def test_a_full_disk_gives_the_job_back_instead_of_using_up_its_attempts(
        settings: Settings, engine: Engine, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """ENOSPC while storing the outputs is the volume's fault: with the attempts counted, every queued job
    failed for good a few minutes into a full disk and stayed failed when space came back."""
    import errno

    import dicom_node.worker as worker_module

    jm = JobManager(engine, settings.worker)
    job_id = spool(settings, jm, "full")
    worker = Worker(settings, engine, job_manager=jm)

    def full(*args: Any, **kwargs: Any) -> bool:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(worker_module, "write_atomic", full)
    monkeypatch.setattr(worker_module, "DISK_FULL_RETRY_S", 0.0)
    caplog.set_level(logging.ERROR, logger="dicom_node.worker")
    for _ in range(settings.worker.max_attempts + 2):
        assert worker.run_once() == 1
    job = job_row(engine, job_id)
    assert (job.state, job.attempts, job.result) == ("queued", 0, None)
    assert [r.action for r in caplog.records].count("worker_disk_full") == settings.worker.max_attempts + 2
    monkeypatch.undo()
    run_until_processed(worker, engine, job_id)
    assert job_row(engine, job_id).result is not None


def test_a_spool_volume_below_min_free_runs_no_model_but_still_delivers(
        settings: Settings, engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    jm = JobManager(engine, settings.worker)
    waiting = spool(settings, jm, "waiting")
    ready = spool(settings, jm, "ready")
    jm.claim("other", limit=2)
    jm.release(waiting, worker_id="other")
    jm.finish_inference(ready, result={"finding": "negative"},
                        output_dir=str(settings.storage.data_dir / "gone"), worker_id="other")
    jm.release(ready, worker_id="other")
    full = settings.model_copy(update={"storage": settings.storage.model_copy(update={"min_free_mb": 10**9})})
    worker = Worker(full, engine, job_manager=jm)
    caplog.set_level(logging.INFO, logger="dicom_node.worker")
    assert worker.run_once() == 1  # the delivery only: its outputs are gone, so it is queued to be rebuilt
    assert worker.run_once() == 0
    assert [job_row(engine, j).state for j in (waiting, ready)] == ["queued", "queued"]
    assert [r.action for r in caplog.records].count("worker_disk_low") == 1  # once a minute, not per poll
    worker.settings = settings
    assert worker.run_once() == 2
    assert "worker_disk_ok" in [r.action for r in caplog.records]


def test_names_a_library_warns_about_never_reach_the_log_output(settings: Settings, engine: Engine,
                                                                 capfd: pytest.CaptureFixture[str]) -> None:
    """A one-component name ('SMITH JOHN', usual from older CR systems) makes highdicom warn with the name
    quoted; under the node's logging set-up that warning must reach the log without the name."""
    import warnings

    from dicom_node.logs import setup_logging

    root = logging.getLogger()
    saved = (root.handlers[:], root.level, warnings.showwarning)
    try:
        setup_logging("INFO", "json")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            jm = JobManager(engine, settings.worker)
            path = settings.storage.spool_dir / "1.2.3" / "oneword.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            uid = "1.2.826.0.1.3680043.8.498.77.434343"
            make_dicom(path, shape=(256, 256), sop_instance_uid=uid, patient_name="QUIXOTE ZEBULON",
                       ReferringPhysicianName="HOUSE GREGORY")
            job_id, _ = jm.enqueue(
                sop_instance_uid=uid, study_instance_uid="1.2.3", series_instance_uid="1.2.3.4",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.1", calling_ae="MODALITY", calling_host="127.0.0.1",
                spool_path=str(path))
            assert Worker(settings, engine, job_manager=jm).run_once() == 1
        assert job_row(engine, job_id).result is not None
    finally:
        root.handlers[:], level, warnings.showwarning = saved
        root.setLevel(level)
    err = capfd.readouterr().err
    assert "library_warning" in err  # the warning was logged, as a JSON line
    for part in ("QUIXOTE", "ZEBULON", "HOUSE", "GREGORY"):
        assert part not in err


class StolenLeasePipeline:
    """The real pipeline; while it runs, the batch's jobs are taken over by another worker (this one stalled
    past its lease: a stopped process, a database outage longer than the lease)."""

    def __init__(self, inner: Any, engine: Engine) -> None:
        self.inner, self.bundle, self.engine = inner, inner.bundle, engine

    def run(self, images: Any, explain: bool = True) -> Any:
        out = self.inner.run(images, explain=explain)
        with Session(self.engine) as s, s.begin():
            for job in s.query(Job).filter(Job.lease_owner.is_not(None)):
                job.lease_owner = "the-other-worker"
        return out


def test_a_worker_whose_lease_was_taken_leaves_the_stored_outputs_alone(
        settings: Settings, engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    """The stalled worker rewrote the outputs the new holder had built and sent (the stored results then
    differed from the PACS's copies) before its report was refused."""
    real = default_pipeline_factory(settings)
    worker = Worker(settings, engine, pipeline_factory=lambda p: StolenLeasePipeline(real(p), engine))
    job_id = spool(settings, worker.jm, "stolen")
    out_dir = output_dir_for(job_row(engine, job_id).spool_path)
    out_dir.mkdir(parents=True)
    theirs = out_dir / "00_SR.dcm"
    theirs.write_bytes(b"the new holder's SR")
    caplog.set_level(logging.WARNING, logger="dicom_node.worker")
    assert worker.run_once() == 1
    assert theirs.read_bytes() == b"the new holder's SR" and sorted(out_dir.iterdir()) == [theirs]
    row = job_row(engine, job_id)
    assert (row.state, row.lease_owner, row.result) == ("processing", "the-other-worker", None)
    assert "worker_lease_lost" in [r.action for r in caplog.records]


def test_a_registered_bundle_whose_card_was_edited_is_not_served(settings: Settings, engine: Engine,
                                                                 tmp_path: Path, tiny_bundle: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """model.json edited after registration (another version, device UID, threshold): the SRs carried an
    identity the registry never recorded. The worker keeps serving the previous model, saying why."""
    settings.model.path = None
    edited = make_random_bundle(tmp_path / "v3", seg_size=64, cls_size=64, version="0.0.3-test")
    card = json.loads((edited / "model.json").read_text())
    with Session(engine) as s, s.begin():
        s.add(ModelVersion(version="0.0.0-test", path=str(tiny_bundle), status="current",
                           promoted_at=utcnow()))
    worker = Worker(settings, engine, job_manager=JobManager(engine, settings.worker))
    worker.load_model()
    card.update(version="9.9.9-edited", threshold=0.0001)
    (edited / "model.json").write_text(json.dumps(card))
    with Session(engine) as s, s.begin():
        s.query(ModelVersion).filter_by(status="current").update({"status": "retired"})
        s.add(ModelVersion(version="0.0.3-test", path=str(edited), status="current", promoted_at=utcnow(),
                           device_uid=card["device_uid"]))
    caplog.set_level(logging.ERROR, logger="dicom_node.worker")
    assert worker.load_model() is False
    assert worker.pipeline.bundle.version == "0.0.0-test"
    [failed] = [r for r in caplog.records if r.action == "model_swap_failed"]
    assert "says version 9.9.9-edited" in failed.getMessage() and "changed after it" in failed.getMessage()


def test_a_registered_bundle_whose_threshold_alone_was_edited_is_neither_promoted_nor_served(
        settings: Settings, engine: Engine, tmp_path: Path, tiny_bundle: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """Same version and device UID, another threshold: the SR's findings would change under the registered
    identity. The registry records model.json's digest at registration; promotion refuses the edited card and
    the worker, asked to serve it anyway, keeps the model it has."""
    from training import registry

    settings.model.path = None
    with Session(engine) as s, s.begin():
        s.add(ModelVersion(version="0.0.0-test", path=str(tiny_bundle), status="current",
                           promoted_at=utcnow()))
    worker = Worker(settings, engine, job_manager=JobManager(engine, settings.worker))
    worker.load_model()
    bundle = make_random_bundle(tmp_path / "v4", seg_size=64, cls_size=64, version="0.0.4-test")
    registry.register(engine, bundle)
    original = (bundle / "model.json").read_bytes()
    card = json.loads(original)
    (bundle / "model.json").write_text(json.dumps({**card, "threshold": 0.0001}))
    with pytest.raises(ValueError, match="model.json was changed after it was registered"):
        registry.promote(engine, "0.0.4-test")
    with Session(engine) as s, s.begin():  # made current behind the registry's back
        s.query(ModelVersion).filter_by(status="current").update({"status": "retired"})
        s.query(ModelVersion).filter_by(version="0.0.4-test").update({"status": "current",
                                                                      "promoted_at": utcnow()})
    caplog.set_level(logging.ERROR, logger="dicom_node.worker")
    assert worker.load_model() is False
    assert worker.pipeline.bundle.version == "0.0.0-test"
    [failed] = [r for r in caplog.records if r.action == "model_swap_failed"]
    assert "SHA-256 differs" in failed.getMessage()
    (bundle / "model.json").write_bytes(original)  # put back as registered: served
    worker._failed = None
    assert worker.load_model() is True and worker.pipeline.bundle.version == "0.0.4-test"
