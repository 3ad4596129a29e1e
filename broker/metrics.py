"""Prometheus metrics of a corral installation, exported by the broker
(``[metrics] listen = "HOST:PORT"``, served by prometheus-client).

One exporter is right with several processes because every number comes
through the broker: the workers' outcomes arrive as log records, the pools'
RSS and restarts as their supervisors' reports. So there is no
multiprocess directory to share, and a scrape sees one consistent view.

Two kinds of figures:

- **events**, counted as they happen, on the loop's thread, through
  :meth:`Metrics.observe` (every record the journal applies): jobs
  processed, failed and retried per task, the duration of each try and the
  wait from enqueue to first start (histograms per task), fsync and
  compaction times;
- **state**, read at scrape time from a :class:`Snapshot` that the loop
  makes at most once a second (:meth:`Metrics.refresh`): queue depth per
  queue and status, the age of the oldest ready job per queue (queue
  latency), the log's size, the workers connected, per pool the workers'
  RSS, processes and restarts. The HTTP thread only reads the last
  snapshot (one reference, swapped whole), never the loop's live state.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from corral.broker.records import Finished, Started
from corral.config.schema import split_listen

if TYPE_CHECKING:
    from corral.broker.protocol import StatusInfo
    from corral.broker.records import Record
    from corral.broker.state import JobState

#: Histogram buckets of job durations and waits (seconds): 1 ms to 1 h.
TIME_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0, 3600.0,
)  # fmt: skip
#: Buckets of fsync and compaction times (seconds).
IO_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0)
#: Distinct task labels kept; the jobs of tasks past it count under "other"
#: (a label per task is fine for tens of tasks, not for unbounded names).
MAX_TASK_LABELS = 500


@dataclass(frozen=True)
class Snapshot:
    """The state figures, as the loop last read them."""

    #: (queue, status) -> jobs.
    depth: dict[tuple[str, str], int] = field(default_factory=dict)
    #: queue -> seconds the oldest ready job has waited.
    latency: dict[str, float] = field(default_factory=dict)
    log_bytes: int = 0
    log_segments: int = 0
    workers: int = 0
    #: (host, pool) -> (processes, RSS bytes of its workers, restarts, backing off).
    pools: dict[tuple[str, str], tuple[int, int, int, bool]] = field(default_factory=dict)
    #: (host, pool, slot) -> (RSS bytes, CPU seconds) of the worker process in the slot.
    processes: dict[tuple[str, str, str], tuple[int, float]] = field(default_factory=dict)
    #: Events published to the subscribers, and events dropped (see corral.broker.events).
    events_sent: int = 0
    events_dropped: int = 0


class Metrics:
    """The broker's metrics registry; see the module docstring."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.processed = Counter(
            "corral_jobs_processed", "Jobs that succeeded", ["task"], registry=reg
        )
        self.failed = Counter(
            "corral_jobs_failed", "Jobs that ended failed", ["task"], registry=reg
        )
        self.retried = Counter(
            "corral_jobs_retried", "Tries that ended in a retry", ["task"], registry=reg
        )
        self.duration = Histogram(
            "corral_job_duration_seconds",
            "How long a try ran, start to end",
            ["task"],
            buckets=TIME_BUCKETS,
            registry=reg,
        )
        self.wait = Histogram(
            "corral_job_wait_seconds",
            "From enqueue (or the time it was due) to the first start",
            ["task"],
            buckets=TIME_BUCKETS,
            registry=reg,
        )
        self.fsync = Histogram(
            "corral_log_fsync_seconds",
            "Group commits that synced the log: write and fsync",
            buckets=IO_BUCKETS,
            registry=reg,
        )
        self.compaction = Histogram(
            "corral_log_compaction_seconds",
            "Compactions, from start to the new log installed",
            buckets=IO_BUCKETS,
            registry=reg,
        )
        self._tasks: set[str] = set()
        self._snapshot = Snapshot()
        self._lock = threading.Lock()
        reg.register(_StateCollector(self))

    # ------------------------------------------------ events (loop thread)

    def task(self, name: str) -> str:
        """The label for task ``name`` (see :data:`MAX_TASK_LABELS`)."""
        if name in self._tasks:
            return name
        if len(self._tasks) >= MAX_TASK_LABELS:
            return "other"
        self._tasks.add(name)
        return name

    def observe(self, record: Record, state: JobState) -> None:
        """Count what ``record`` (just applied to ``state``) tells."""
        if isinstance(record, Started):
            job = state.jobs.get(record.id)
            if job is not None and record.attempt == 1:
                due = max(job.created_at, job.run_at or 0.0)
                self.wait.labels(self.task(job.task)).observe(max(0.0, record.at - due))
        elif isinstance(record, Finished):
            job = state.jobs.get(record.id)
            if job is None:
                return
            task = self.task(job.task)
            if record.started_at is not None:
                self.duration.labels(task).observe(max(0.0, record.at - record.started_at))
            if record.status == "succeeded":
                self.processed.labels(task).inc()
            elif record.status == "failed":
                self.failed.labels(task).inc()
            elif record.status == "retrying":
                self.retried.labels(task).inc()

    # ---------------------------------------------- state (loop thread)

    def refresh(self, status: StatusInfo, latency: dict[str, float]) -> None:
        """Make a new snapshot from ``status`` (what ``corral status``
        shows) and ``latency`` (queue -> seconds its oldest ready job waited)."""
        depth = {
            (queue, st): n for queue, counts in status.queues.items() for st, n in counts.items()
        }
        pools: dict[tuple[str, str], tuple[int, int, int, bool]] = {}
        processes: dict[tuple[str, str, str], tuple[int, float]] = {}
        for sup in status.supervisors:
            for pool in sup.pools:
                rss = sum(w.rss for w in sup.workers if w.pool == pool.name)
                pools[sup.host, pool.name] = (pool.processes, rss, pool.restarts, pool.failed)
            for w in sup.workers:
                processes[sup.host, w.pool, str(w.index)] = (w.rss, w.cpu)
        snapshot = Snapshot(
            depth,
            dict(latency),
            int(status.stats.get("log_used_bytes", 0)),
            int(status.stats.get("log_segments", 0)),
            len(status.workers),
            pools,
            processes,
            int(status.stats.get("events_sent", 0)),
            int(status.stats.get("events_dropped", 0)),
        )
        with self._lock:
            self._snapshot = snapshot

    def snapshot(self) -> Snapshot:
        with self._lock:
            return self._snapshot


class _StateCollector(Collector):
    """Gauges from the last :class:`Snapshot`, made at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        snap = self._metrics.snapshot()
        depth = GaugeMetricFamily(
            "corral_queue_jobs", "Jobs per queue and status", labels=["queue", "status"]
        )
        for (queue, status), n in sorted(snap.depth.items()):
            depth.add_metric([queue, status], n)
        yield depth
        latency = GaugeMetricFamily(
            "corral_queue_latency_seconds",
            "How long the oldest ready job of the queue has waited",
            labels=["queue"],
        )
        for queue, seconds in sorted(snap.latency.items()):
            latency.add_metric([queue], seconds)
        yield latency
        yield GaugeMetricFamily("corral_log_bytes", "Bytes the log's segments use", snap.log_bytes)
        yield GaugeMetricFamily("corral_log_segments", "Segments of the log", snap.log_segments)
        yield GaugeMetricFamily("corral_workers_connected", "Workers connected", snap.workers)
        yield CounterMetricFamily(
            "corral_events_published", "Events sent to the subscribers", snap.events_sent
        )
        yield CounterMetricFamily(
            "corral_events_dropped",
            "Events no subscriber got: one stopped reading, or a burst overran its queue",
            snap.events_dropped,
        )
        yield from _pool_families(snap)


def _pool_families(snap: Snapshot) -> Iterator[Metric]:
    labels = ["host", "pool"]
    processes = GaugeMetricFamily("corral_pool_processes", "Worker processes", labels=labels)
    rss = GaugeMetricFamily("corral_pool_rss_bytes", "RSS of the pool's workers", labels=labels)
    restarts = CounterMetricFamily(
        "corral_pool_restarts", "Worker restarts the supervisor counted", labels=labels
    )
    backing_off = GaugeMetricFamily(
        "corral_pool_backing_off", "1 while the pool backs off after crashing", labels=labels
    )
    for (host, pool), (count, size, restarted, failed) in sorted(snap.pools.items()):
        processes.add_metric([host, pool], count)
        rss.add_metric([host, pool], size)
        restarts.add_metric([host, pool], restarted)
        backing_off.add_metric([host, pool], int(failed))
    yield from (processes, rss, restarts, backing_off)
    slot = ["host", "pool", "slot"]
    worker_rss = GaugeMetricFamily("corral_worker_rss_bytes", "RSS of the worker", labels=slot)
    worker_cpu = CounterMetricFamily(
        "corral_worker_cpu_seconds",
        "CPU time of the worker in the slot (starts again at 0 when it is replaced)",
        labels=slot,
    )
    for (host, pool, index), (size, cpu) in sorted(snap.processes.items()):
        worker_rss.add_metric([host, pool, index], size)
        worker_cpu.add_metric([host, pool, index], cpu)
    yield from (worker_rss, worker_cpu)


def serve(metrics: Metrics, listen: str) -> Any:
    """Serve ``metrics`` over HTTP on ``listen`` ("HOST:PORT") from a daemon
    thread; returns the server (``.shutdown()`` stops it). Raises OSError if
    the address cannot be bound."""
    host, port = split_listen(listen)
    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    return server
