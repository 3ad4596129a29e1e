"""Job and worker events on a ZeroMQ PUB socket (``[broker] events_endpoint``),
for ``corral events`` and anything else that subscribes.

Each event is two frames: its name as the topic (``job.enqueued``,
``job.started``, ``job.succeeded``, ``job.failed``, ``job.retried``,
``job.requeued``, ``job.cancelled``, ``worker.up``, ``worker.down``,
``pool.backing_off``, ``pool.recovered``), so a subscriber filters by
prefix, then a msgpack map: ``event``, ``at`` (epoch seconds) and the
fields of that event (``job_id``, ``task``, ``queue``, ``attempt``,
``worker``, ``error`` ...).

Events are dropped, never queued without bound, when no one reads them:
a PUB socket drops what a subscriber's queue (``SNDHWM`` messages) cannot
take, and sends never block the loop. Job events come from the records the
journal applies (:meth:`Events.observe`); worker and pool events from the
status the loop reads once a second (:meth:`Events.refresh`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec
import zmq

from corral.broker.records import Cancelled, Finished, JobCreated, JobsCreated, Started

if TYPE_CHECKING:
    from corral.broker.protocol import StatusInfo
    from corral.broker.records import Record
    from corral.broker.state import JobState

#: Messages a subscriber's queue holds before events for it are dropped.
SNDHWM = 10_000
#: ``Finished.status`` -> the event it is.
_FINISHED = {
    "succeeded": "job.succeeded",
    "failed": "job.failed",
    "retrying": "job.retried",
    "queued": "job.requeued",
    "cancelled": "job.cancelled",
}


def bind_publisher(context: zmq.Context[Any], endpoint: str) -> zmq.Socket[Any]:
    """A PUB socket bound to ``endpoint`` (ipc only: see
    :func:`corral.config.checks` for why), dropping at :data:`SNDHWM`.
    Raises zmq.ZMQError if it cannot bind."""
    from corral.transport import ensure_ipc_dir

    sock: zmq.Socket[Any] = context.socket(zmq.PUB)
    sock.setsockopt(zmq.SNDHWM, SNDHWM)
    sock.setsockopt(zmq.LINGER, 0)
    ensure_ipc_dir(endpoint)
    try:
        sock.bind(endpoint)
    except zmq.ZMQError:
        sock.close(linger=0)
        raise
    return sock


class Events:
    """Publishes events on ``sock`` (used from the loop's thread only)."""

    def __init__(self, sock: zmq.Socket[Any]) -> None:
        self._sock = sock
        self._encoder = msgspec.msgpack.Encoder()
        #: Connected workers and pools backing off at the last refresh.
        self._workers: dict[str, Any] | None = None
        self._backing_off: set[tuple[str, str]] = set()
        #: Events sent, and events ZeroMQ would not take (counted, dropped).
        self.sent = 0
        self.dropped = 0

    def publish(self, event: str, at: float, **fields: Any) -> None:
        """Send one event now, or drop it (never blocks)."""
        body = {"event": event, "at": at, **{k: v for k, v in fields.items() if v is not None}}
        try:
            self._sock.send_multipart([event.encode(), self._encoder.encode(body)], zmq.NOBLOCK)
            self.sent += 1
        except zmq.Again:
            self.dropped += 1

    def observe(self, record: Record, state: JobState) -> None:
        """The job events ``record`` (just applied to ``state``) makes."""
        if isinstance(record, JobsCreated):
            tpl = record.template
            for job_id in record.ids:
                job = state.jobs.get(job_id)
                at = job.created_at if job is not None else 0.0
                self.publish("job.enqueued", at, job_id=job_id, task=tpl.task, queue=tpl.queue)
        elif isinstance(record, JobCreated):
            self.publish(
                "job.enqueued",
                record.created_at,
                job_id=record.id,
                task=record.task,
                queue=record.queue or "default",
                run_at=record.run_at,
            )
        elif isinstance(record, Started):
            job = state.jobs.get(record.id)
            self.publish(
                "job.started",
                record.at,
                job_id=record.id,
                task=job.task if job is not None else None,
                attempt=record.attempt,
                worker=record.worker,
            )
        elif isinstance(record, Finished):
            self._finished(record, state)
        elif isinstance(record, Cancelled):
            job = state.jobs.get(record.id)
            self.publish(
                "job.cancelled",
                record.at,
                job_id=record.id,
                task=job.task if job else None,
                reason=record.reason or None,
            )

    def _finished(self, record: Finished, state: JobState) -> None:
        job = state.jobs.get(record.id)
        event = _FINISHED.get(record.status)
        if event is None or event == "job.cancelled":  # a Cancelled record says it
            return
        error = f"{record.error.type}: {record.error.message[:200]}" if record.error else None
        seconds = None if record.started_at is None else round(record.at - record.started_at, 6)
        self.publish(
            event,
            record.at,
            job_id=record.id,
            task=job.task if job is not None else None,
            seconds=seconds,
            error=error,
            next_run_at=record.next_run_at,
        )

    def refresh(self, status: StatusInfo, now: float) -> None:
        """Worker up and down, pool backing off and recovered: what changed
        since the last refresh (the first one only learns the state)."""
        workers = {w.worker_id: w for w in status.workers}
        if self._workers is not None:
            for worker_id in workers.keys() - self._workers.keys():
                w = workers[worker_id]
                self.publish(
                    "worker.up", now, worker=worker_id, host=w.host, pid=w.pid, queues=w.queues
                )
            for worker_id in self._workers.keys() - workers.keys():
                w = self._workers[worker_id]
                self.publish("worker.down", now, worker=worker_id, host=w.host, pid=w.pid)
        self._workers = workers
        backing_off = {
            (sup.host, pool.name) for sup in status.supervisors for pool in sup.pools if pool.failed
        }
        for host, pool in sorted(backing_off - self._backing_off):
            self.publish("pool.backing_off", now, host=host, pool=pool)
        for host, pool in sorted(self._backing_off - backing_off):
            self.publish("pool.recovered", now, host=host, pool=pool)
        self._backing_off = backing_off

    def close(self) -> None:
        self._sock.close(linger=0)
