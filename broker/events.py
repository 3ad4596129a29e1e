"""Job and worker events on a ZeroMQ PUB socket (``[broker] events_endpoint``),
for ``corral events`` and anything else that subscribes.

Each event is two frames: its name as the topic (``job.enqueued``,
``job.started``, ``job.succeeded``, ``job.failed``, ``job.retried``,
``job.requeued``, ``job.cancelled``, ``worker.up``, ``worker.down``,
``pool.backing_off``, ``pool.recovered``), so a subscriber filters by
prefix, then a msgpack map: ``event``, ``at`` (epoch seconds) and the
fields of that event (``job_id``, ``task``, ``queue``, ``attempt``,
``worker``, ``error`` ...).

Events are dropped, never queued without bound, when no one reads them,
and every drop is counted (``events_dropped`` in ``corral status --json``,
``corral_events_dropped_total`` in the metrics). A subscriber's queue in the
broker holds :data:`SNDHWM` events (about 150 KB; ZeroMQ's default of 1,000,
where 10,000 held about 1.5 MB per stalled subscriber, never given back).
A plain PUB socket drops what a full queue cannot take without a word, so
the socket has ``ZMQ_XPUB_NODROP`` (as libzmq's docs suggest for a
publisher that must know): a send that a full queue refuses fails at once
with EAGAIN (never blocking the loop), and the event is counted dropped.
The price: libzmq then sends an event to every subscriber or to none, so a
subscriber that stops reading holds events back from the others. That lasts
:data:`STALL_SECONDS` at most: past it every subscriber's connection is
dropped (:meth:`Events.drop_subscribers`, logged as
``events.subscribers_dropped``), and they reconnect at once (ZeroMQ's SUB
does), the stalled one too, with empty queues. A burst of more events in one
pass than a queue holds (an ``enqueue_many`` of thousands of jobs) drops
some too, counted; a subscriber that must see every job reads the jobs
themselves (``corral jobs``). Job events come from the records the
journal applies (:meth:`Events.observe`); worker events from the worker
table as it changes (:meth:`Events.worker_changed`), so a worker that
comes and goes between two status readings is seen; pool events from the
status the loop reads once a second (:meth:`Events.refresh`).

The endpoint is ``ipc://`` (the socket file gets the mode and group of the
broker's other sockets) or ``tcp://``, with CURVE like the broker's other
tcp endpoints: a subscriber needs a key in ``security.authorized_keys_dir``
(:mod:`corral.broker.auth`). Like them, an endpoint that cannot be bound,
or whose key file cannot be used, stops the broker at its start
(:class:`Publisher`). Once running, the broker never stops for it: the
key pair is read once, at the start, and a socket made again after a
SIGHUP (:meth:`Events.drop_subscribers`) that cannot be bound yet is
retried on each pass.
"""

from __future__ import annotations

import errno
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
import structlog
import zmq

from corral.broker.records import Cancelled, Finished, JobCreated, JobsCreated, Started
from corral.errors import ConfigError

if TYPE_CHECKING:
    from corral.broker.protocol import StatusInfo
    from corral.broker.records import Record
    from corral.broker.state import JobState
    from corral.broker.workers import WorkerConn

log = structlog.get_logger()

#: Events a subscriber's queue holds in the broker before events are dropped.
SNDHWM = 1_000
#: Seconds a subscriber that stopped reading may hold back events from the
#: others before every subscriber's connection is dropped (they reconnect).
STALL_SECONDS = 5.0
#: Seconds binding the endpoint again may fail with "address in use" (the
#: old listener still closing) before it is logged.
REBIND_PATIENCE = 5.0
#: ``Finished.status`` -> the event it is.
_FINISHED = {
    "succeeded": "job.succeeded",
    "failed": "job.failed",
    "retrying": "job.retried",
    "queued": "job.requeued",
    "cancelled": "job.cancelled",
}


class Publisher:
    """How the events endpoint's PUB sockets are made: the endpoint, and
    for tcp its CURVE key pair, read once here (at the broker's start) so
    that a socket made again later (:meth:`Events.drop_subscribers`) never
    depends on the key file still being good. Raises ConfigError naming
    the setting, the file and what to do: tcp without CURVE that the
    config does not allow, a server key file missing, open to others or
    not a key."""

    def __init__(self, endpoint: str, config: Any, zap_domain: str) -> None:
        from corral.transport import check_tcp_allowed, load_server_keys

        self.endpoint = endpoint
        self.zap_domain = zap_domain
        self._config = config
        try:
            curve = check_tcp_allowed(endpoint, config, server=True)
        except ConfigError as exc:
            raise ConfigError(f"broker.events_endpoint: {exc}") from None
        self._keys = load_server_keys(config) if curve else None

    def socket(self, context: zmq.Context[Any]) -> zmq.Socket[Any]:
        """A PUB socket, not bound, that refuses a send (EAGAIN) once a
        subscriber's queue holds :data:`SNDHWM` events; for tcp a CURVE
        server whose subscribers are authenticated in the ZAP domain."""
        from corral.transport import allow_ipv6, make_curve_server

        sock: zmq.Socket[Any] = context.socket(zmq.PUB)
        try:
            sock.setsockopt(zmq.SNDHWM, SNDHWM)
            sock.setsockopt(zmq.XPUB_NODROP, 1)  # a full queue refuses: counted dropped
            sock.setsockopt(zmq.LINGER, 0)
            allow_ipv6(sock, self.endpoint)
            if self._keys is not None:
                make_curve_server(sock, self._config, self.zap_domain, self._keys)
        except BaseException:
            sock.close(linger=0)
            raise
        return sock

    def bind(self, context: zmq.Context[Any]) -> zmq.Socket[Any]:
        """A :meth:`socket` bound to the endpoint. Raises ConfigError
        naming ``broker.events_endpoint`` when it cannot be bound."""
        from corral.transport import bind_error, ensure_ipc_dir

        sock = self.socket(context)
        try:
            ensure_ipc_dir(self.endpoint)
            sock.bind(self.endpoint)
        except (zmq.ZMQError, OSError) as exc:
            sock.close(linger=0)
            raise ConfigError(f"broker.events_endpoint: {bind_error(self.endpoint, exc)}") from None
        return sock


class Events:
    """Publishes events on ``sock`` (used from the loop's thread only);
    ``renew`` makes a fresh socket like it, unbound, for
    :meth:`drop_subscribers`; ``clock`` gives monotonic seconds."""

    def __init__(
        self,
        sock: zmq.Socket[Any],
        renew: Callable[[], zmq.Socket[Any]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        #: None between drop_subscribers and the new socket's making.
        self._sock: zmq.Socket[Any] | None = sock
        self._renew = renew
        self._clock = clock
        self._encoder = msgspec.msgpack.Encoder()
        #: Pools backing off at the last refresh.
        self._backing_off: set[tuple[str, str]] = set()
        #: ``events_sent`` and ``events_dropped`` (see :meth:`count_into`).
        self._counts: Counter[str] = Counter()
        #: Since when (monotonic seconds) every send has been refused.
        self._refused_since: float | None = None
        #: The endpoint was let go by drop_subscribers and not bound again yet.
        self.unbound = False
        self._endpoint = ""
        #: When (monotonic seconds) binding again first failed, and
        #: whether that was logged.
        self._unbound_since: float | None = None
        self._unbound_logged = False

    @property
    def sent(self) -> int:
        """Events sent to every subscriber."""
        return self._counts["events_sent"]

    @property
    def dropped(self) -> int:
        """Events sent to no subscriber: refused by a full queue, or published
        while the endpoint was being bound again."""
        return self._counts["events_dropped"]

    def count_into(self, stats: Counter[str]) -> None:
        """Count ``events_sent`` and ``events_dropped`` in ``stats`` (the
        broker's counters, which status and the metrics show) from now on."""
        stats.update(self._counts)
        self._counts = stats

    def publish(self, event: str, at: float, **fields: Any) -> None:
        """Send one event now, or drop it (never blocks)."""
        if self._sock is None:
            self._counts["events_dropped"] += 1
            return
        body = {"event": event, "at": at, **{k: v for k, v in fields.items() if v is not None}}
        try:
            self._sock.send_multipart([event.encode(), self._encoder.encode(body)], zmq.NOBLOCK)
        except zmq.Again:
            self._counts["events_dropped"] += 1
            self._refused(self._clock())
            return
        self._counts["events_sent"] += 1
        self._refused_since = None

    def _refused(self, now: float) -> None:
        """A send was refused at ``now``: a subscriber's queue is full. One
        that stays full past :data:`STALL_SECONDS` has every subscriber's
        connection dropped (see the module docstring)."""
        if self._refused_since is None:
            self._refused_since = now
            return
        if now - self._refused_since < STALL_SECONDS:
            return
        self._refused_since = None
        log.warning(
            "events.subscribers_dropped",
            reason=f"a subscriber has read no events for over {STALL_SECONDS:g}s",
            dropped=self.dropped,
            hint="every subscriber reconnects at once; events meanwhile were dropped "
            "for all of them",
        )
        self.drop_subscribers(now)

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

    def worker_changed(self, change: str, conn: WorkerConn, at: float) -> None:
        """A worker registered (``change`` "up") or its registration went
        ("down": it left, died, or was replaced), at ``at`` (epoch seconds)."""
        if change == "up":
            self.publish(
                "worker.up",
                at,
                worker=conn.worker_id,
                host=conn.host,
                pid=conn.pid,
                queues=conn.queues,
            )
        else:
            self.publish("worker.down", at, worker=conn.worker_id, host=conn.host, pid=conn.pid)

    def refresh(self, status: StatusInfo, now: float) -> None:
        """Pool backing off and recovered: what changed since the last
        refresh (read off the supervisors' reports)."""
        backing_off = {
            (sup.host, pool.name) for sup in status.supervisors for pool in sup.pools if pool.failed
        }
        for host, pool in sorted(backing_off - self._backing_off):
            self.publish("pool.backing_off", now, host=host, pool=pool)
        for host, pool in sorted(self._backing_off - backing_off):
            self.publish("pool.recovered", now, host=host, pool=pool)
        self._backing_off = backing_off

    def drop_subscribers(self, now: float) -> None:
        """Close every subscriber's connection: the socket is closed and a
        new one bound in its place, so each subscriber reconnects through
        the CURVE handshake, where a key removed since it connected is
        refused. (Unbinding alone misses a connection whose handshake has
        just ended.) Events meanwhile are lost to them. The old listener
        closes on ZeroMQ's I/O thread, so the port may still be taken:
        then :attr:`unbound` stays true and the loop calls
        :meth:`bind_again` on its next passes. ``now``: monotonic seconds."""
        if self._renew is None or self._sock is None:
            return
        self._endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._sock.close(linger=0)  # first: a revoked key must not read on
        self._sock = None
        self.unbound = True
        self.bind_again(now)

    def bind_again(self, now: float) -> None:
        """Make the socket :meth:`drop_subscribers` closed again and bind
        it to the endpoint let go, if that is free yet. Never raises: the
        broker serves on without events meanwhile, and tries again on its
        next passes; a failure that lasts :data:`REBIND_PATIENCE` seconds
        is logged once (``events.cannot_bind``), the return logged too."""
        assert self._renew is not None
        try:
            if self._sock is None:
                self._sock = self._renew()
            self._sock.bind(self._endpoint)
        except zmq.ZMQError as exc:
            since = self._unbound_since = self._unbound_since or now
            if not self._unbound_logged and (
                exc.errno != errno.EADDRINUSE or now - since >= REBIND_PATIENCE
            ):
                self._unbound_logged = True
                log.error(
                    "events.cannot_bind",
                    endpoint=self._endpoint,
                    error=exc.strerror,
                    hint="no events are published until it binds again; the broker "
                    "tries again every second",
                )
            return
        if self._unbound_logged:
            log.info("events.publishing", endpoint=self._endpoint)
        self.unbound = self._unbound_logged = False
        self._unbound_since = None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
