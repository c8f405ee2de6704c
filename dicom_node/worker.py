"""The worker: claims jobs, runs the model, stores the SR/SC, delivers them.

One batch at a time::

    JobManager.claim -> read the spooled file -> inference.imaging.load_dicom
      -> Pipeline.run (stage 1 lung mask, stage 2 classifier, Grad-CAM)
      -> dicom_node.outputs.build_outputs -> written next to the spool file
      -> JobManager.finish_inference (state "exporting")
      -> dicom_node.export.send to each destination -> JobManager.complete

The outputs are stored before delivery, so a delivery retry (a destination that is down) never
reruns the model. The pipeline is loaded once per process and swapped between batches when the
registry's current model changes. Leases are extended by a heartbeat while a batch runs; a worker
killed mid-job leaves a lease that expires, and any worker then reclaims the job.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.uid import UID, Comprehensive3DSRStorage, ComprehensiveSRStorage, SecondaryCaptureImageStorage
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from dicom_node import metrics
from dicom_node.config import Settings
from dicom_node.db import ModelVersion
from dicom_node.errors import ExportError, InvalidInstance, ModelBundleError, NodeError
from dicom_node.export import NoDestination, destinations_for, send
from dicom_node.queue import ClaimedJob, JobManager, JobState, LeaseLost, missing_file_error
from dicom_node.spool import free_mb, write_atomic
from dicom_node.tls import client_context

log = logging.getLogger(__name__)

PipelineFactory = Callable[[Path | None], Any]
"""Builds a pipeline from a bundle directory (None: the shipped default model). The result must offer
``.run(images, explain=True) -> list[Result]`` and ``.bundle`` (``.name``, ``.version``, ``.card``...)."""

RESULTS_SUFFIX = ".results"
DB_RETRY_PAUSE_S = 5.0
DB_ERROR_LOG_EVERY_S = 60.0  # in a database outage: one error line a minute, the first with its traceback
MODEL_RETRY_S = 600.0  # a promoted model that failed to load is tried again after this long
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_RETRY_S = 60.0  # a job given back for a full disk is due again after this long
DISK_LOW_LOG_EVERY_S = 60.0
PIXEL_DATA = pydicom.tag.Tag(0x7FE0, 0x0010)


def default_pipeline_factory(settings: Settings) -> PipelineFactory:
    """The real pipeline with the device, CAM method and CPU threads of ``settings.model``."""

    def make(path: Path | None) -> Any:
        from inference.pipeline import Pipeline

        return Pipeline.from_bundle(path, device=settings.model.device, cam=settings.model.cam,
                                    cpu_threads=settings.model.cpu_threads)

    return make


def unreadable_element(ds: pydicom.Dataset) -> str | None:
    """The first standard top-level element (pixel data aside) whose value cannot be read, described; None
    when every one can. Values are converted on first access, so an element of unknown VR or of a wrong length
    in a damaged file fails only there; the SR and SC copy most of the header. Private and unknown tags are
    not checked: nothing copies them."""
    for tag in list(ds.keys()):
        if tag.is_private or tag == PIXEL_DATA or not pydicom.datadict.dictionary_has_tag(tag):
            continue
        try:
            ds[tag]
        except (ValueError, NotImplementedError, BytesLengthException, KeyError, TypeError,
                OverflowError) as exc:
            name = pydicom.datadict.keyword_for_tag(tag) or "element"
            # the patient module's messages could quote a name or an ID: its errors give their type only
            detail = type(exc).__name__ if tag.group == 0x0010 else f"{type(exc).__name__}: {exc}"
            return f"header element {tag} {name} cannot be read ({detail})"
    return None


def output_dir_for(spool_path: str | Path) -> Path:
    """Where the outputs built for a spooled instance are kept: ``<spool file>.results/``."""
    path = Path(spool_path)
    return path.with_name(path.name + RESULTS_SUFFIX)


def result_to_dict(result: Any, bundle: Any) -> dict[str, Any]:
    """The JSON stored in ``jobs.result``: plain Python numbers, no images, no patient data."""

    def num(value: Any) -> float | None:
        return None if value is None else float(value)

    return {
        "finding": str(result.finding),
        "probability": num(result.probability),
        "threshold": num(result.threshold),
        "reason": result.reason or "",
        "reason_code": result.reason_code or "",
        "lung_attention": num(result.lung_attention),
        "lung_fraction": num(result.lung_fraction),
        "model_name": result.model_name or getattr(bundle, "name", ""),
        "model_version": result.model_version or getattr(bundle, "version", ""),
    }


class _Heartbeat:
    """Extends the leases of the jobs in hand every ``interval`` seconds until the block ends."""

    def __init__(self, jm: JobManager, worker_id: str, job_ids: Sequence[int], interval: float) -> None:
        self._jm, self._worker_id, self._ids, self._interval = jm, worker_id, list(job_ids), interval
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="cxr-heartbeat", daemon=True)

    def _beat(self) -> None:
        while not self._done.wait(self._interval):
            try:
                self._jm.heartbeat(self._worker_id, self._ids)
            except SQLAlchemyError:
                log.warning("heartbeat failed (database unreachable?)", exc_info=True,
                            extra={"action": "worker_heartbeat_failed"})

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


class Worker:
    """Processes jobs from the shared queue until stopped.

    Parameters
    ----------
    settings
        Node settings (model, worker, export, listener AE title).
    engine
        The process's database engine.
    pipeline_factory
        Builds the pipeline for a bundle path; defaults to :func:`default_pipeline_factory`.
    job_manager
        The queue; a new :class:`JobManager` on ``engine`` by default.
    worker_id
        Lease owner name; ``host:pid:random`` by default (unique across machines).
    model_check_interval_s
        How often, between batches, the registry is asked whether the current model changed.
    """

    def __init__(self, settings: Settings, engine: Engine, *, pipeline_factory: PipelineFactory | None = None,
                 job_manager: JobManager | None = None, worker_id: str | None = None,
                 model_check_interval_s: float = 5.0) -> None:
        if not isinstance(settings, Settings):
            raise TypeError('Argument "settings" must be a dicom_node.config.Settings.')
        if model_check_interval_s <= 0:
            raise ValueError('Argument "model_check_interval_s" must be positive.')
        self.settings = settings
        self.engine = engine
        client_context(settings.export.tls)  # a TLS mistake stops the start, not each delivery later
        self.jm = job_manager or JobManager(
            engine, settings.worker, export_max_attempts=settings.worker.export_max_attempts)
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.model_check_interval_s = model_check_interval_s
        self._factory = pipeline_factory or default_pipeline_factory(settings)
        self.pipeline: Any = None
        self._model_key: str | None = None
        self._failed: tuple[str, str, float] | None = None  # failed load: key, promoted at, monotonic time
        self._stop = threading.Event()
        self._stranded: list[int] = []  # jobs of a batch a database error interrupted, still leased here
        self._disk_low_logged: float | None = None  # while the spool volume is too full: when last logged

    # -- model -----------------------------------------------------------------------------------
    def _wanted_model(self) -> tuple[Path | None, str, str, ModelVersion | None]:
        """The bundle to serve (the configured path, else the registry's current model, else the default), its
        identity, when it was promoted, and its registry row."""
        if self.settings.model.path is not None:
            return self.settings.model.path, f"path:{self.settings.model.path}", "", None
        current = self.jm.current_model()
        if current is not None:
            key = f"registry:{current.version}:{current.path}"
            return Path(current.path), key, str(current.promoted_at), current
        return None, "default", "", None

    def load_model(self) -> bool:
        """Load the wanted model if it is not the one in use; returns True when a new one was loaded.

        The first load raises (the worker cannot run without a model); a failed swap keeps the old model and
        logs the error. It is tried again when the model is promoted again, or after ``MODEL_RETRY_S`` (the
        cause may pass: memory held by a retraining run, a file system that was away).
        """
        path, key, stamp, registered = self._wanted_model()
        if self.pipeline is not None:
            if key == self._model_key:
                self._failed = None  # e.g. rolled back to the model in use
                return False
            if (self._failed is not None and self._failed[:2] == (key, stamp)
                    and time.monotonic() - self._failed[2] < MODEL_RETRY_S):
                return False
        try:
            pipeline = self._factory(path)
            _check_identity(pipeline.bundle, registered)
        except (NodeError, OSError, ValueError, RuntimeError) as exc:
            if self.pipeline is None:
                raise ModelBundleError(f"cannot load the model {path or '(default)'}: {exc}") from exc
            self._failed = (key, stamp, time.monotonic())
            log.error("new model %s could not be loaded; still serving the previous one, trying again in "
                      "%.0f s or when it is promoted again: %s", path, MODEL_RETRY_S, exc,
                      extra={"action": "model_swap_failed"})
            return False
        previous, old_pipeline = self._model_key, self.pipeline
        self.pipeline, self._model_key, self._failed = pipeline, key, None
        if old_pipeline is not None and hasattr(old_pipeline, "close"):
            old_pipeline.close()  # release its threads and device memory
        if previous is None and key.startswith("path:"):
            log.info("model.path is set: models promoted in the registry are not picked up by this worker",
                     extra={"action": "model_pinned"})
        bundle = pipeline.bundle
        metrics.set_model(bundle.name, bundle.version, getattr(bundle, "device_uid", "") or "",
                          str(getattr(bundle, "path", "")))
        log.info("model %s %s loaded from %s", bundle.name, bundle.version, getattr(bundle, "path", path),
                 extra={"action": "model_swapped" if previous else "model_loaded",
                        "model_version": bundle.version})
        return True

    # -- loop ------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask :meth:`run` to return after the batch in hand."""
        self._stop.set()

    def run(self, stop_event: threading.Event | None = None) -> None:
        """Work until ``stop_event`` (or :meth:`stop`) is set; the batch in hand is always finished."""
        stop = stop_event or self._stop
        if self.pipeline is None:
            self.load_model()
        last_maintenance = 0.0
        outage: tuple[float, float, int] | None = None  # started, last logged, failed tries
        while not stop.is_set() and not self._stop.is_set():
            try:
                self._give_back_stranded()
                if time.monotonic() - last_maintenance >= self.model_check_interval_s:
                    self.jm.reclaim_stalled()
                    self.load_model()
                    last_maintenance = time.monotonic()
                handled = self.run_once()
            except SQLAlchemyError as exc:
                now = time.monotonic()
                if outage is None:  # the first failure with its traceback, then a line a minute
                    outage = (now, now, 1)
                    log.error("database unavailable; retrying every %.0f s", DB_RETRY_PAUSE_S, exc_info=True,
                              extra={"action": "worker_db_error"})
                else:
                    started, logged, tries = outage
                    outage = (started, logged, tries + 1)
                    if now - logged >= DB_ERROR_LOG_EVERY_S:
                        outage = (started, now, tries + 1)
                        log.error("database still unavailable after %.0f s (%d tries): %s: %s", now - started,
                                  tries + 1, type(exc).__name__, str(exc).splitlines()[0][:200],
                                  extra={"action": "worker_db_error"})
                stop.wait(DB_RETRY_PAUSE_S)
                continue
            except Exception:
                log.exception("worker %s crashed", self.worker_id, extra={"action": "worker_crashed"})
                raise
            if outage is not None:
                log.warning("database available again after %.0f s (%d failed tries)",
                            time.monotonic() - outage[0], outage[2], extra={"action": "worker_db_back"})
                outage = None
            if handled == 0:
                stop.wait(self.settings.worker.poll_interval_s)
        log.info("worker %s stopped", self.worker_id, extra={"action": "worker_stopped"})

    def run_once(self) -> int:
        """Claim and handle one batch; returns the number of jobs handled (0: nothing was due)."""
        if self.pipeline is None:
            self.load_model()
        batch = self.jm.claim(self.worker_id, limit=self.settings.model.batch_size,
                              delivery_only=self._disk_low())
        if batch:
            with _Heartbeat(self.jm, self.worker_id, [j.id for j in batch], self.settings.worker.lease_s / 3):
                try:
                    self.process(batch)
                except SQLAlchemyError:  # given back once the database answers, not left to their leases
                    self._stranded = [j.id for j in batch]
                    raise
        return len(batch)

    def _disk_low(self) -> bool:
        """Whether the spool volume has less than ``storage.min_free_mb`` free: then no model is run (its
        results could not be stored, and every job would use up its attempts on the full disk), but stored
        results are still delivered. Logged once a minute while it lasts."""
        storage = self.settings.storage
        try:
            free = free_mb(storage.spool_dir)
        except OSError:  # cannot tell: the load of the spooled file says what is wrong
            return False
        low = free < storage.min_free_mb
        now = time.monotonic()
        if low and (self._disk_low_logged is None or now - self._disk_low_logged >= DISK_LOW_LOG_EVERY_S):
            self._disk_low_logged = now
            log.error("spool volume %s has %.0f MiB free, less than storage.min_free_mb = %d: no new images "
                      "are processed (results are still delivered) until space is freed", storage.spool_dir,
                      free, storage.min_free_mb, extra={"action": "worker_disk_low"})
        elif not low and self._disk_low_logged is not None:
            self._disk_low_logged = None
            log.warning("spool volume %s has %.0f MiB free again: processing resumes", storage.spool_dir,
                        free, extra={"action": "worker_disk_ok"})
        return low

    def _hold(self, job: ClaimedJob, why: str) -> None:
        """Give ``job`` back without counting the attempt, due again in a minute: its failure was the
        volume's (disk full), and would otherwise use up every attempt and fail the job for good."""
        log.error("job %s: %s; given back, due again in %.0f s", job.id, why, DISK_FULL_RETRY_S,
                  extra={"action": "worker_disk_full", "job_id": job.id})
        try:
            self.jm.release(job.id, worker_id=self.worker_id, why=f"given back: {why}",
                            delay_s=DISK_FULL_RETRY_S)
        except (LeaseLost, KeyError, ValueError):
            pass  # reclaimed or moved meanwhile: nothing to give back

    def _give_back_stranded(self) -> None:
        """Release the jobs of a batch a database error interrupted (those this worker still holds), so they
        run again at once instead of waiting for their leases to expire."""
        while self._stranded:
            job_id = self._stranded[0]
            try:
                self.jm.release(job_id, worker_id=self.worker_id,
                                why="given back: a database error interrupted its batch")
            except (LeaseLost, KeyError, ValueError):
                pass  # finished, reclaimed or gone meanwhile: nothing to give back
            self._stranded.pop(0)

    def process(self, batch: Sequence[ClaimedJob]) -> None:
        """Run inference for the claimed ``processing`` jobs, then deliver every job that is ready."""
        ready = self._infer([j for j in batch if j.state is JobState.PROCESSING])
        for job in [j for j in batch if j.state is JobState.EXPORTING] + ready:
            try:
                self._export(job)
            except LeaseLost:
                log.warning("job %s: lease lost during delivery", job.id,
                            extra={"action": "worker_lease_lost", "job_id": job.id})
            except SQLAlchemyError:
                raise
            except Exception as exc:  # unexpected: recorded as a retryable failure of this job
                log.exception("job %s: delivery crashed", job.id,
                              extra={"action": "worker_export_crashed", "job_id": job.id})
                self._fail(job, f"delivery failed: {type(exc).__name__}: {exc}", retryable=True)

    # -- steps -----------------------------------------------------------------------------------
    def _fail(self, job: ClaimedJob, error: str, retryable: bool) -> None:
        try:
            state = self.jm.fail(job.id, error, retryable, worker_id=self.worker_id)
        except LeaseLost:
            log.warning("job %s: lease lost before the failure could be recorded", job.id,
                        extra={"action": "worker_lease_lost", "job_id": job.id})
            return
        except ValueError as exc:  # moved meanwhile by someone else: never the end of the worker
            log.error("job %s: the failure could not be recorded (%s): %s", job.id, exc, error,
                      extra={"action": "worker_fail_not_recorded", "job_id": job.id})
            return
        metrics.record_job_finished("failed" if state is JobState.FAILED else "retry")

    def _load(self, job: ClaimedJob) -> tuple[pydicom.Dataset, Any] | None:
        from dicom_node.outputs.common import clean_reference
        from inference.imaging import load_dicom

        try:
            ds = pydicom.dcmread(job.spool_path)
            damaged = unreadable_element(ds)
            if damaged is not None:  # fail now, not after inference: the outputs copy the header
                self._fail(job, f"undecodable instance: {damaged}; the results could not carry the image's "
                                "patient and study attributes", retryable=False)
                return None
            # decoded straight into the pipeline's page-locked memory when it runs on CUDA
            with metrics.time_stage("decode"):
                image = load_dicom(ds, allocate=getattr(self.pipeline, "host_array", None))
            try:
                clean_reference(ds)
            except ValueError as exc:  # e.g. an invalid Study Instance UID: no result could join the study
                self._fail(job, f"invalid instance: the results could not reference it ({exc})",
                           retryable=False)
                return None
            return ds, image
        except FileNotFoundError:
            spool_dir = self.settings.storage.spool_dir
            if not spool_dir.is_dir():  # the shared volume is not mounted here: not the instance's fault
                log.error("spool directory %s is not available on this machine", spool_dir,
                          extra={"action": "worker_spool_missing", "job_id": job.id})
                self._fail(job, f"spool directory {spool_dir} is not available on worker {self.worker_id}",
                           retryable=True)
            else:
                self._fail(job, missing_file_error(job.spool_path), retryable=False)
        except (InvalidDicomError, InvalidInstance) as exc:
            self._fail(job, f"undecodable instance: {exc}", retryable=False)
        except (ValueError, NotImplementedError, BytesLengthException, EOFError, KeyError, TypeError) as exc:
            # what pydicom raises for a damaged file: the listener reads only an image's UIDs before it
            # answers, and a file can be damaged on disk later
            log.warning("job %s: spooled file cannot be parsed: %s: %s", job.id, type(exc).__name__, exc,
                        extra={"action": "worker_undecodable", "job_id": job.id})
            self._fail(job, f"undecodable instance: {job.spool_path} cannot be parsed "
                            f"({type(exc).__name__}: {exc})", retryable=False)
        except OSError as exc:
            self._fail(job, f"cannot read the spooled file: {exc}", retryable=True)
        except Exception as exc:  # anything else fails this job with its reason (retried); the worker goes on
            log.exception("job %s: decoding failed", job.id, extra={"action": "worker_decode_error",
                                                                    "job_id": job.id})
            self._fail(job, f"decoding failed: {type(exc).__name__}: {exc}", retryable=True)
        return None

    def _infer(self, jobs: Sequence[ClaimedJob]) -> list[ClaimedJob]:
        from dicom_node.outputs import build_outputs
        from inference.pipeline import run_isolated

        loaded = [(job, item) for job in jobs if (item := self._load(job)) is not None]
        results = run_isolated(self.pipeline, [image for _, (_, image) in loaded])
        bundle = self.pipeline.bundle
        ready: list[ClaimedJob] = []
        for (job, (ds, image)), result in zip(loaded, results, strict=True):
            if isinstance(result, BaseException):
                retryable = getattr(result, "retryable", True)
                self._fail(job, f"inference failed: {type(result).__name__}: {result}", retryable)
                continue
            try:
                metrics.observe_timings(result.timings or {})
                with metrics.time_stage("outputs"):
                    datasets = build_outputs(ds, image, result, bundle.card, self.settings.export)
                # still this worker's? after a stall past the lease another worker may have built, stored and
                # sent the outputs: rewriting them would leave files that differ from the PACS's copies
                if job.id not in self.jm.heartbeat(self.worker_id, [job.id]):
                    raise LeaseLost(f"job {job.id} is no longer leased by {self.worker_id}")
                out_dir = self._store_outputs(job, datasets)
                summary = result_to_dict(result, bundle)
                self.jm.finish_inference(
                    job.id, result=summary, output_dir=str(out_dir), worker_id=self.worker_id,
                    sr_sop_instance_uid=_uid_of(datasets, sr=True),
                    sc_sop_instance_uid=_uid_of(datasets, sr=False))
            except LeaseLost:
                log.warning("job %s: lease lost during inference; another worker has it", job.id,
                            extra={"action": "worker_lease_lost", "job_id": job.id})
                continue
            except NodeError as exc:
                self._fail(job, f"building outputs failed: {exc}", exc.retryable)
                continue
            except OSError as exc:
                if exc.errno in DISK_FULL_ERRNOS:
                    self._hold(job, f"storing outputs failed: {exc}")
                else:
                    self._fail(job, f"storing outputs failed: {exc}", retryable=True)
                continue
            except SQLAlchemyError:
                raise
            except Exception as exc:  # unexpected: its traceback in the log, its message in the job
                log.exception("job %s: building outputs crashed", job.id,
                              extra={"action": "worker_outputs_crashed", "job_id": job.id})
                # the outputs are a function of the header and the result: such an error comes back on every
                # attempt (each running the model again); anything else may be transient
                again = not isinstance(exc, TypeError | ValueError | KeyError | AttributeError | IndexError)
                self._fail(job, f"building outputs failed: {type(exc).__name__}: {exc}", retryable=again)
                continue
            ready.append(_with(job, state=JobState.EXPORTING, output_dir=str(out_dir), result=summary))
        return ready

    def _store_outputs(self, job: ClaimedJob, datasets: Sequence[pydicom.Dataset]) -> Path:
        """Write the outputs (in sending order) atomically next to the spool file, replacing old ones."""
        out_dir = output_dir_for(job.spool_path)
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob("*.dcm"):
            stale.unlink()
        for i, ds in enumerate(datasets):
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            write_atomic(out_dir / f"{i:02d}_{getattr(ds, 'Modality', 'XX')}.dcm", buffer.getbuffer(),
                         replace=True)
        return out_dir

    def _current_outputs(self, files: list[Path]) -> tuple[list[Path], str]:
        """The stored outputs to send under the export settings now in force, and why they must be built
        again ('' when they need not): the heatmap is left out when ``send_heatmap`` is now off; an SR of
        another SOP class than ``sr_sop_class`` asks for is built anew (retried after the setting changed)."""
        srs = {"comprehensive3d": Comprehensive3DSRStorage, "comprehensive": ComprehensiveSRStorage}
        wanted = srs[self.settings.export.sr_sop_class]
        keep: list[Path] = []
        for path in files:
            sop_class = _sop_class(path)
            if sop_class == SecondaryCaptureImageStorage and not self.settings.export.send_heatmap:
                continue
            if sop_class in srs.values() and sop_class != wanted:
                return files, (f"the stored SR is {UID(sop_class).name}, export.sr_sop_class asks for "
                               f"{wanted.name}")
            keep.append(path)
        return keep, ""

    def _export(self, job: ClaimedJob) -> None:
        files = sorted(Path(job.output_dir).glob("*.dcm")) if job.output_dir else []
        spool_dir = self.settings.storage.spool_dir
        if not files and not spool_dir.is_dir():  # the shared volume is not mounted here: keep the outputs
            self._fail(job, f"spool directory {spool_dir} is not available on worker {self.worker_id}",
                       retryable=True)
            return
        if not files:
            self.jm.requeue_for_inference(job.id, "stored outputs are missing; computing them again",
                                          worker_id=self.worker_id)
            return
        files, stale = self._current_outputs(files)
        if stale:  # e.g. export.sr_sop_class changed for a PACS without 3D SR: a retry must send the new kind
            self.jm.requeue_for_inference(job.id, f"{stale}; building the outputs again",
                                          worker_id=self.worker_id)
            return
        try:
            destinations = destinations_for(job.calling_ae, job.calling_host, self.settings)
        except NoDestination as exc:
            self._fail(job, str(exc), retryable=False)
            return
        already = self.jm.delivered_to(job.id)
        errors: list[ExportError] = []
        for dest in destinations:
            if str(dest) in already:
                continue
            # the lease, renewed here, must still be this worker's: after a stall longer than the lease
            # another worker may have taken the job, and then that one sends, not this one
            if job.id not in self.jm.heartbeat(self.worker_id, [job.id]):
                raise LeaseLost(f"job {job.id} is no longer leased by {self.worker_id}; not sent to {dest}")
            try:
                with metrics.time_stage("export"):
                    warnings = send(files, dest, self.settings.export,
                                    calling_ae=self.settings.listener.ae_title)
            except ExportError as exc:
                errors.append(exc)
                self.jm.record_delivery(job.id, str(dest), "failed", str(exc))
                continue
            # stored, but the destination said something (coerced, not validated...): kept with the delivery
            self.jm.record_delivery(job.id, str(dest), "sent", "; ".join(warnings) or None)
            log.info("job %s: results sent to %s", job.id, dest,
                     extra={"action": "job_delivered", "job_id": job.id, "destination": str(dest)})
        if errors:
            self._fail(job, "; ".join(str(e) for e in errors), retryable=all(e.retryable for e in errors))
            return
        seconds = self.jm.complete(job.id, worker_id=self.worker_id,
                                   message=f"sent to {', '.join(str(d) for d in destinations)}")
        metrics.record_job_finished("done", seconds)


def _check_identity(bundle: Any, registered: ModelVersion | None) -> None:
    """A registry model must still be what was registered: a model.json edited since (another version, device
    UID, threshold) would put an identity or findings into the SRs the registry never recorded. Checked by the
    card's digest recorded at registration (rows registered before it was recorded: by version and device
    UID). Raises ValueError."""
    from inference.bundle import card_changed

    if registered is None:
        return
    version, device_uid = registered.version, registered.device_uid
    path = getattr(bundle, "path", None)
    if path is not None and card_changed(path, registered.metrics):
        raise ValueError(f"its model.json is not the one registered as {version} (SHA-256 differs): the "
                         "bundle was changed after it was registered (a bundle never changes in place; "
                         "register the change as a new version)")
    found = (str(getattr(bundle, "version", "")), str(getattr(bundle, "device_uid", "") or ""))
    if found[0] != version or (device_uid and found[1] != device_uid):
        raise ValueError(f"its model.json says version {found[0]}, device UID {found[1] or '-'}, but the "
                         f"registry recorded {version}, {device_uid or '-'}: the bundle was changed after it "
                         "was registered (a bundle never changes in place; register the change as a new "
                         "version)")


def _sop_class(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"]).SOPClassUID)


def _uid_of(datasets: Sequence[pydicom.Dataset], *, sr: bool) -> str | None:
    """SOP Instance UID of the first SR (``sr=True``) or first non-SR (the heatmap) among ``datasets``."""
    for ds in datasets:
        if (getattr(ds, "Modality", None) == "SR") is sr:
            return str(ds.SOPInstanceUID)
    return None


def _with(job: ClaimedJob, **changes: Any) -> ClaimedJob:
    from dataclasses import replace

    return replace(job, **changes)
