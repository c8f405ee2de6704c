"""Prometheus metrics of the node, in one dedicated registry served by the admin API at ``/metrics``.

The listener, the worker and the exporter increment the objects below; the admin API only renders them.
Every name starts with ``cxrnode_`` (type, labels, who updates it):

- ``cxrnode_instances_received_total`` counter {sop_class}: listener, per instance acknowledged (spooled and
  queued; a re-sent instance already queued counts again)
- ``cxrnode_instances_refused_total`` counter {reason}: listener, per C-STORE answered with a failure
- ``cxrnode_associations_total`` counter {result}: listener, ``accepted`` / ``rejected_<why>`` (``caller``,
  ``called_ae``, ``disk``, ``busy``, ``stalled``: a request cut off mid-PDU, ``tls``: a failed handshake)
- ``cxrnode_queue_jobs`` gauge {state}: read from the database at scrape time
- ``cxrnode_queue_up`` gauge: 1 when the scrape could count the queue
- ``cxrnode_stage_seconds`` histogram {stage}: worker; decode, stage1, stage2, cam, outputs, export
  (and any other key of ``Result.timings``)
- ``cxrnode_job_seconds`` histogram: worker, from reception (or an operator's retry or resend) to delivered
  results
- ``cxrnode_jobs_finished_total`` counter {outcome}: worker; ``done``, ``failed``, or ``retry`` (a failure
  tried again after a backoff); ``ignored`` jobs never reach a worker: see ``cxrnode_queue_jobs``
- ``cxrnode_exports_total`` counter {destination}: exporter, per successful delivery
- ``cxrnode_export_failures_total`` counter {destination}: exporter, per failed delivery attempt
- ``cxrnode_model_info`` info {name, version, device_uid, path}: worker, when a model (re)loads
- ``cxrnode_retention_deleted_files_total`` counter {kind}: retention job (spool / output)

Queue depth is collected at scrape time through :func:`bind_queue`, in the listener's process only (a sum over
a scale-out's targets then counts the queue once).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dicom_node.db import within

log = logging.getLogger(__name__)

QUEUE_COUNT_TIMEOUT_S = 5.0  # a scrape waits no longer for the queue counts (cxrnode_queue_up 0)
REGISTRY = CollectorRegistry(auto_describe=True)

#: The job states the queue gauge always reports (0 when a state has no job), in display order.
JOB_STATES: tuple[str, ...] = ("queued", "processing", "exporting", "done", "failed", "ignored")
#: The stages of one job, as keys of ``Result.timings`` plus the worker's own ``export``.
STAGES: tuple[str, ...] = ("decode", "stage1", "stage2", "cam", "outputs", "export")

_STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_JOB_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0, 14400.0)

INSTANCES_RECEIVED = Counter(
    "cxrnode_instances_received", "Instances acknowledged by C-STORE (spooled and queued; re-sent ones too).",
    ["sop_class"], registry=REGISTRY)
INSTANCES_REFUSED = Counter(
    "cxrnode_instances_refused",
    "C-STORE requests answered with a failure status, by reason "
    "(e.g. sop_class, disk_full, database, spool, own_output).",
    ["reason"], registry=REGISTRY)
ASSOCIATIONS = Counter(
    "cxrnode_associations", "Association requests by result (accepted, rejected_caller, rejected_disk, ...).",
    ["result"], registry=REGISTRY)
STAGE_SECONDS = Histogram(
    "cxrnode_stage_seconds", "Time spent per processing stage of one job (or one batch item).",
    ["stage"], buckets=_STAGE_BUCKETS, registry=REGISTRY)
JOB_SECONDS = Histogram(
    "cxrnode_job_seconds", "Time from reception (or an operator's retry or resend) to delivered results.",
    buckets=_JOB_BUCKETS, registry=REGISTRY)
JOBS_FINISHED = Counter(
    "cxrnode_jobs_finished", "Jobs leaving the worker, by outcome (done, failed, retry).",
    ["outcome"], registry=REGISTRY)
EXPORTS = Counter(
    "cxrnode_exports", "Successful deliveries of results, by destination (AET@HOST:PORT).",
    ["destination"], registry=REGISTRY)
EXPORT_FAILURES = Counter(
    "cxrnode_export_failures", "Failed delivery attempts, by destination (AET@HOST:PORT).",
    ["destination"], registry=REGISTRY)
MODEL_INFO = Info(
    "cxrnode_model", "The model bundle in use by this process.", registry=REGISTRY)
RETENTION_DELETED = Counter(
    "cxrnode_retention_deleted_files", "Files deleted by the retention job, by kind (spool, output).",
    ["kind"], registry=REGISTRY)


class QueueCollector(Collector):
    """Reports job counts per state, read through ``counts`` at each scrape.

    ``counts`` returns ``{state: n}`` (``JobManager.counts``). When it raises, the scrape still succeeds:
    ``cxrnode_queue_up`` is 0 and the failure is logged, so a database outage shows as data, not as a
    broken ``/metrics``.
    """

    def __init__(self, counts: Callable[[], Mapping[str, int]]) -> None:
        if not callable(counts):
            raise TypeError('Argument "counts" must be callable.')
        self._counts = counts

    def describe(self) -> list[Metric]:
        # Describing without querying keeps registration free of database access.
        return [GaugeMetricFamily("cxrnode_queue_jobs", "Jobs per state.", labels=["state"]),
                GaugeMetricFamily("cxrnode_queue_up", "1 when the queue could be counted.")]

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("cxrnode_queue_up", "1 when the queue could be counted.")
        jobs = GaugeMetricFamily("cxrnode_queue_jobs", "Jobs per state.", labels=["state"])
        try:  # bounded: a hung database must read as cxrnode_queue_up 0, not as a scrape that times out
            raw = within(QUEUE_COUNT_TIMEOUT_S, self._counts, "queue counts")
        except Exception:  # the database may be down: report it, keep the scrape alive
            log.warning("queue counts unavailable for metrics", exc_info=True,
                        extra={"action": "metrics_queue_failed"})
            up.add_metric([], 0.0)
            yield up
            return
        counts = {str(getattr(k, "value", k)): int(v) for k, v in dict(raw).items()}
        for state in JOB_STATES:
            jobs.add_metric([state], float(counts.pop(state, 0)))
        for state, n in sorted(counts.items()):
            jobs.add_metric([state], float(n))
        up.add_metric([], 1.0)
        yield jobs
        yield up


_queue_collector: QueueCollector | None = None


def bind_queue(counts: Callable[[], Mapping[str, int]] | None) -> QueueCollector | None:
    """Make ``cxrnode_queue_jobs`` read from ``counts`` (``JobManager.counts``); ``None`` unbinds.

    Binding again replaces the previous source (one queue per process). Returns the collector now bound.
    """
    global _queue_collector
    if _queue_collector is not None:
        REGISTRY.unregister(_queue_collector)
        _queue_collector = None
    if counts is not None:
        _queue_collector = QueueCollector(counts)
        REGISTRY.register(_queue_collector)
    return _queue_collector


def unbind_queue(collector: QueueCollector | None) -> None:
    """Unbind ``collector`` if it is still the bound one (a later :func:`bind_queue` wins)."""
    if collector is not None and collector is _queue_collector:
        bind_queue(None)


def record_received(sop_class: str = "") -> None:
    """Count one acknowledged instance, re-sent ones too (label: SOP Class UID or its keyword)."""
    INSTANCES_RECEIVED.labels(sop_class=sop_class or "unknown").inc()


def record_refused(reason: str) -> None:
    """Count one C-STORE refused with a failure status; ``reason`` is a short code, never free text."""
    if not reason:
        raise ValueError('Argument "reason" must be a non-empty code.')
    INSTANCES_REFUSED.labels(reason=reason).inc()


def record_association(result: str) -> None:
    """Count one association request: ``accepted`` or ``rejected_<why>``."""
    if not result:
        raise ValueError('Argument "result" must be a non-empty code.')
    ASSOCIATIONS.labels(result=result).inc()


def record_export(destination: str, ok: bool) -> None:
    """Count one delivery attempt to ``destination`` (``AET@HOST:PORT``)."""
    (EXPORTS if ok else EXPORT_FAILURES).labels(destination=str(destination)).inc()


def observe_stage(stage: str, seconds: float) -> None:
    """Add one observation of ``seconds`` to the latency histogram of ``stage``."""
    if seconds < 0:
        raise ValueError(f'Argument "seconds" must be >= 0, got {seconds}.')
    STAGE_SECONDS.labels(stage=stage).observe(seconds)


def observe_timings(timings: Mapping[str, float]) -> None:
    """Observe every stage of a ``Result.timings`` dict (seconds per stage)."""
    for stage, seconds in timings.items():
        if seconds is not None and seconds >= 0:
            STAGE_SECONDS.labels(stage=stage).observe(float(seconds))


@contextmanager
def time_stage(stage: str) -> Iterator[None]:
    """``with time_stage("export"): ...`` observes the block's wall time, also when it raises."""
    start = time.perf_counter()
    try:
        yield
    finally:
        STAGE_SECONDS.labels(stage=stage).observe(time.perf_counter() - start)


def record_job_finished(outcome: str, seconds: float | None = None) -> None:
    """Count a job leaving the worker; ``seconds`` (reception to delivery) feeds ``cxrnode_job_seconds``."""
    JOBS_FINISHED.labels(outcome=outcome).inc()
    if seconds is not None and seconds >= 0:
        JOB_SECONDS.observe(seconds)


def set_model(name: str, version: str, device_uid: str = "", path: str = "") -> None:
    """Publish the model in use as ``cxrnode_model_info``."""
    MODEL_INFO.info({"name": str(name), "version": str(version), "device_uid": str(device_uid),
                     "path": str(path)})


def render() -> tuple[bytes, str]:
    """The registry in Prometheus text format and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
