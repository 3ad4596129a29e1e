"""The broker: one process, one thread, one batch loop.

Each pass drains every ready message from both ROUTER sockets, logs and
applies what they change, runs the tick (due jobs, lease deadlines, silent
workers, result waits, TTLs, heartbeats), commits the log once (group
commit: one write, at most one fsync), then sends every reply of the pass
and dispatches jobs to workers with credit. Nothing that promises
durability leaves before the fsync that covers it.
"""

from __future__ import annotations

import heapq
import os
import secrets
import signal
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import structlog
import zmq

from corral.broker import flows, views
from corral.broker import protocol as p
from corral.broker.lockfile import StateDirLock
from corral.broker.log import FsyncFailed, Log, LogError
from corral.broker.records import (
    ErrorRec,
    Leased,
    ProgressNoted,
    Record,
    Removed,
    Returned,
    ScheduleFired,
)
from corral.broker.requests import ClientRequests, Waiter
from corral.broker.schedules import Schedule, Scheduler, job_id_for
from corral.broker.state import (
    STATUSES,
    TERMINAL,
    Defaults,
    Job,
    JobState,
    TaskDefaults,
)
from corral.broker.workers import WorkerConn, WorkerTable
from corral.transport import Authenticator, bind_router, check_tcp_allowed

log = structlog.get_logger()

#: Messages handled per socket per pass before the loop commits and replies.
DRAIN_BUDGET = 20_000
MAX_POLL_WAIT = 1.0
_STAT_KEYS = {status: f"jobs_{status}" for status in STATUSES}
#: A supervisor not heard from for this long is left out of status.
SUPERVISOR_STALE = 15.0


class Broker(ClientRequests):
    """Owns the log and all job state; talks to clients and workers."""

    def __init__(self, config: Any, *, context: zmq.Context[Any] | None = None) -> None:
        self.config = config
        bc = config.broker
        self.state_dir = Path(bc.state_dir)
        self.broker_id = secrets.token_hex(6)
        self.state = JobState(
            Defaults(
                max_attempts=bc.max_attempts,
                result_ttl=bc.result_ttl,
                failed_ttl=bc.failed_ttl,
                retry_backoff=bc.retry_backoff,
                retry_backoff_max=bc.retry_backoff_max,
            )
        )
        self.log = Log(
            self.state_dir / "log",
            fsync=bc.fsync,
            fsync_interval=bc.fsync_interval,
            segment_size=bc.segment_size,
            reserve=bc.disk_reserve,
        )
        self.workers = WorkerTable(bc.heartbeat_interval * bc.heartbeat_liveness)
        self.scheduler = Scheduler.from_configs(config.schedules)
        self.stats: Counter[str] = Counter()
        self._ctx = context
        self._own_ctx = context is None
        self._lock = StateDirLock(self.state_dir)
        self._replies: list[tuple[zmq.Socket[Any], bytes, bytes]] = []
        self._waiters: dict[str, list[Waiter]] = {}
        self._waiter_heap: list[tuple[float, int, Waiter]] = []
        self._deadlines: list[tuple[float, str, int]] = []
        self._holders: dict[str, bytes] = {}
        self._supervisors: dict[str, tuple[p.SupervisorInfo, float]] = {}
        self._rates = views.Rates()
        self._mono = time.monotonic()
        self._lease_seq = time.time_ns() // 1000
        self._dirty = True
        self._stopping = False
        self._next_heartbeat = 0.0
        self._host = socket.gethostname()
        self.client_sock: zmq.Socket[Any] | None = None
        self.worker_sock: zmq.Socket[Any] | None = None
        self._wake_r: socket.socket | None = None
        self._auth: Authenticator | None = None

    # ---------------------------------------------------------- lifecycle

    def open(self) -> None:
        """Lock the state dir, replay the log, and bind both endpoints."""
        self._lock.acquire()
        started = time.monotonic()
        count = 0
        for record in self.log.replay():
            self.state.apply(record)
            count += 1
        recovered = self.state.recovery_records()
        for record in recovered:
            self._record(record)
        owed_followups = flows.pending(self.state, time.time(), self._record)
        owed = self.scheduler.restore(self.state.last_fired, time.time())
        log.info(
            "broker.replayed",
            records=count,
            jobs=len(self.state.jobs),
            requeued_running=len(recovered),
            followups_created=owed_followups,
            seconds=round(time.monotonic() - started, 3),
        )
        if self._ctx is None:
            self._ctx = zmq.Context()
        bc = self.config.broker
        if any(
            check_tcp_allowed(e, self.config, server=True)
            for e in (bc.client_endpoint, bc.worker_endpoint)
        ):
            self._auth = Authenticator(self._ctx, self.config.security.authorized_keys_dir)
        self.client_sock = bind_router(
            self._ctx, bc.client_endpoint, self.config, bc.max_message_size
        )
        self.worker_sock = bind_router(
            self._ctx, bc.worker_endpoint, self.config, bc.max_message_size
        )
        for schedule, due_at in owed:
            self._fire(schedule, due_at, time.time(), caught_up=True)
        self._poller = zmq.Poller()
        self._poller.register(self.client_sock, zmq.POLLIN)
        self._poller.register(self.worker_sock, zmq.POLLIN)
        log.info(
            "broker.listening",
            client_endpoint=bc.client_endpoint,
            worker_endpoint=bc.worker_endpoint,
            fsync=bc.fsync,
            broker_id=self.broker_id,
        )

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT stop the loop at the end of its pass; the
        handler only sets a flag and wakes the poll through a socket pair."""
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        self._wake_r = wake_r
        self._wake_w = wake_w
        signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        self._poller.register(wake_r, zmq.POLLIN)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self._stopping = True

    def stop(self) -> None:
        self._stopping = True

    def run(self) -> None:
        """The loop; returns after a stop request, with the log synced."""
        try:
            while not self._stopping:
                self._poller.poll(self._poll_timeout() * 1000)
                if self._wake_r is not None:
                    self._drain_wakeups()
                self.run_pass()
        except FsyncFailed as exc:
            log.critical(
                "broker.fsync_failed",
                error=str(exc),
                hint="exiting without retrying the fsync; a restart replays the log",
            )
            os._exit(70)
        except LogError as exc:  # e.g. the disk filled even the reserve
            log.critical(
                "broker.log_write_failed",
                error=str(exc),
                hint="exiting; nothing acknowledged is lost, a restart replays the log",
            )
            os._exit(70)
        self.close()

    def close(self) -> None:
        for sock in (self.client_sock, self.worker_sock):
            if sock is not None:
                sock.close(linger=0)
        self.client_sock = self.worker_sock = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        self.log.close()
        if self._own_ctx and self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        self._lock.release()
        log.info("broker.stopped")

    def _drain_wakeups(self) -> None:
        assert self._wake_r is not None
        try:
            while self._wake_r.recv(512):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    # --------------------------------------------------------------- pass

    def run_pass(self) -> None:
        now, mono = time.time(), time.monotonic()
        self._mono = mono
        self._drain(now, mono)
        self._tick(now, mono)
        # Group commit: one fsync covers every reply of the pass. A pass with
        # no reply (leases, worker outcomes) promises nothing, so its records
        # are synced within fsync_interval instead of at once.
        self.log.commit(mono, durable=bool(self._replies))
        self._flush_replies()
        self._maybe_compact()
        self._dispatch(now)

    def _drain(self, now: float, mono: float) -> None:
        assert self.client_sock is not None and self.worker_sock is not None
        budget = DRAIN_BUDGET
        sockets = ((self.worker_sock, self._on_worker), (self.client_sock, self._on_client))
        while budget > 0:
            idle = True
            for sock, handler in sockets:
                if not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    continue
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    continue
                idle = False
                budget -= 1
                try:
                    handler(frames, now, mono)
                except Exception:  # a bug handling one message must not stop the broker
                    self.stats["handler_errors"] += 1
                    log.exception("broker.handler_error", frames=len(frames))
            if idle:
                return

    def _poll_timeout(self) -> float:
        now, mono = time.time(), time.monotonic()
        wake = min(self._next_heartbeat, mono + MAX_POLL_WAIT)
        for due in (self.state.next_wakeup(), self.scheduler.next_wakeup()):
            if due is not None:
                wake = min(wake, mono + (due - now))
        if self._waiter_heap:
            wake = min(wake, self._waiter_heap[0][0])
        if self._deadlines:
            wake = min(wake, self._deadlines[0][0])
        sync_in = self.log.next_sync_due(mono)
        if sync_in is not None:
            wake = min(wake, mono + sync_in)
        if self._replies or (self._dirty and self.workers.hungry()):
            return 0.0
        return max(0.0, wake - mono)

    # ------------------------------------------------------------ workers

    def _on_worker(self, frames: list[bytes], now: float, mono: float) -> None:
        if len(frames) != 2:
            self._malformed("worker", f"expected 2 frames, got {len(frames)}")
            return
        identity, body = frames
        try:
            msg = p.decode(p.worker_report_decoder, body)
        except p.ProtocolError as exc:
            self._malformed("worker", str(exc))
            return
        conn = self.workers.seen(identity, mono)
        match msg:
            case p.Ready():
                self._register(identity, msg, now, mono)
            case p.Report():
                self._report(conn, msg, now, mono)
            case p.Return():
                self._returned(conn, msg)
            case p.Drain():
                if conn is not None:
                    conn.capacity = 0
            case p.Bye():
                if conn is not None:
                    self._lose_worker(conn, now, "left")
            case p.WorkerHeartbeat():
                pass
        if conn is None and not isinstance(msg, p.Ready | p.Bye | p.Drain):
            self._send_worker(identity, p.Reregister())

    def _register(self, identity: bytes, msg: p.Ready, now: float, mono: float) -> None:
        old = self.workers.get(identity)
        if old is not None:
            self._lose_worker(old, now, "registered again")
        conn = WorkerConn(
            identity=identity,
            worker_id=msg.worker_id,
            queues=list(msg.queues),
            capacity=max(0, msg.credit),
            concurrency=max(1, msg.concurrency),
            tasks=[t.name for t in msg.tasks],
            host=msg.host,
            pid=msg.pid,
            last_seen=mono,
            weights={q: w for q, w in msg.queue_weights.items() if w > 0},
        )
        self.workers.add(conn)
        for task in msg.tasks:
            self.state.tasks[task.name] = TaskDefaults(
                task.max_attempts,
                task.timeout,
                task.retry_backoff,
                task.retry_backoff_max,
                task.result_ttl,
            )
        self._dirty = True
        log.info(
            "broker.worker_ready",
            worker=msg.worker_id,
            host=msg.host,
            pid=msg.pid,
            queues=msg.queues,
            credit=msg.credit,
        )

    def _report(self, conn: WorkerConn | None, msg: p.Report, now: float, mono: float) -> None:
        for lease in msg.started:
            job = self.state.jobs.get(lease.job_id)
            if conn is None or job is None or job.lease != lease.lease:
                continue
            conn.started.add(lease.job_id)
            timeout = self.state.timeout(job)
            if timeout is not None:
                heapq.heappush(self._deadlines, (mono + timeout, job.id, lease.lease))
        for outcome in msg.done:
            self._finish(conn, outcome, now)
        for note in msg.progress:
            job = self.state.holding(note.job_id, note.lease)
            if job is not None:
                self._record(ProgressNoted(job.id, note.fraction, note.note[:500], now))

    def _finish(self, conn: WorkerConn | None, outcome: p.Outcome, now: float) -> None:
        holder = self.workers.get(self._holders.get(outcome.job_id, b""))
        for c in (conn, holder if holder is not conn else None):
            if c is not None and c.leases.get(outcome.job_id) == outcome.lease:
                c.release(outcome.job_id)
                self._dirty = True
        job = self.state.holding(outcome.job_id, outcome.lease)
        if job is None:
            self.stats["late_results"] += 1
            log.debug("broker.late_result", job_id=outcome.job_id, lease=outcome.lease)
            return
        if outcome.kind not in ("ok", "error", "fail", "retry"):
            self._malformed("worker", f"unknown outcome kind {outcome.kind!r}")
            return
        error = None
        if outcome.error is not None:
            error = ErrorRec(outcome.error.type, outcome.error.message, outcome.error.traceback)
        record = self.state.decide_finish(
            job,
            outcome.kind,
            now,
            result=outcome.result,
            error=error,
            delay=outcome.delay,
            started_at=outcome.started_at,
        )
        self._holders.pop(job.id, None)
        self._record(record)
        self._count_outcome(conn, record.status)
        if record.status in TERMINAL:
            self._ended(job, now)

    def _count_outcome(self, conn: WorkerConn | None, status: str) -> None:
        self.stats[_STAT_KEYS[status]] += 1
        self._rates.add(self._mono, status)
        if conn is not None:
            if status == "succeeded":
                conn.processed += 1
            elif status in ("failed", "retrying"):
                conn.failed += 1

    def _returned(self, conn: WorkerConn | None, msg: p.Return) -> None:
        for lease in msg.leases:
            if conn is not None and conn.release(lease.job_id) is None:
                continue
            job = self.state.holding(lease.job_id, lease.lease)
            if job is not None:
                self._holders.pop(job.id, None)
                self._record(Returned(job.id, lease.lease))
                self._dirty = True

    def _lose_worker(self, conn: WorkerConn, now: float, reason: str) -> None:
        """Requeue every job a gone worker held; the attempt counts for the
        jobs it may have started (see WorkerConn.counted_on_loss)."""
        self.workers.remove(conn.identity)
        # A worker that says Bye holds nothing: what it still had leased was
        # in flight to it and never started.
        counted = set() if reason == "left" else conn.counted_on_loss()
        requeued = 0
        for job_id, lease in list(conn.leases.items()):
            job = self.state.holding(job_id, lease)
            if job is None:
                continue
            self._holders.pop(job_id, None)
            if job_id in counted:
                error = ErrorRec(
                    "WorkerLost",
                    f"worker {conn.worker_id} (pid {conn.pid} on {conn.host}) {reason} "
                    "while running the job",
                )
                finished = self.state.decide_finish(job, "lost", now, error=error)
                self._record(finished)
                self._count_outcome(None, finished.status)
                if finished.status in TERMINAL:
                    self._ended(job, now)
                    continue
            else:
                self._record(Returned(job_id, lease))
            requeued += 1
        self.stats["workers_lost"] += reason != "left"
        self.stats["redelivered"] += requeued
        self._dirty = True
        log_fn = log.info if reason == "left" else log.warning
        log_fn(
            "broker.worker_gone",
            worker=conn.worker_id,
            pid=conn.pid,
            reason=reason,
            requeued=requeued,
        )

    # --------------------------------------------------------------- tick

    def _tick(self, now: float, mono: float) -> None:
        for schedule, due_at in self.scheduler.due(now):
            self._fire(schedule, due_at, now)
        if self.state.promote_due(now):
            self._dirty = True
        self._expire_deadlines(now, mono)
        self._expire_waiters(mono)
        for job_id in self.state.expired(now):
            self._record(Removed(job_id))
        if mono >= self._next_heartbeat:
            self._next_heartbeat = mono + self.config.broker.heartbeat_interval
            self._dirty = True  # retry any dispatch a full socket refused
            for conn in self.workers.silent(mono):
                self._lose_worker(conn, now, "went silent")
            for conn in self.workers:
                self._send_worker(conn.identity, p.BrokerHeartbeat(self.broker_id))

    def _fire(self, schedule: Schedule, due_at: float, now: float, caught_up: bool = False) -> None:
        """A schedule's due time came: its job, then the record of the fire.
        The job id derives from (schedule, due time), so a fire repeated
        after a crash between the two records is deduplicated."""
        spec = p.JobSpec(
            id=job_id_for(schedule.name, due_at),
            task=schedule.task,
            payload=msgspec.Raw(schedule.payload),
            queue=schedule.queue,
            priority=schedule.priority,
        )
        record = self.state.decide_create(spec, now)
        if record is not None:
            self._record(record)
            self.stats["schedules_fired"] += 1
        self._record(ScheduleFired(schedule.name, due_at))
        self._dirty = True
        event = "broker.schedule_caught_up" if caught_up else "broker.schedule_fired"
        log.info(event, schedule=schedule.name, due_at=due_at, job_id=spec.id)

    def _expire_deadlines(self, now: float, mono: float) -> None:
        while self._deadlines and self._deadlines[0][0] <= mono:
            _, job_id, lease = heapq.heappop(self._deadlines)
            job = self.state.holding(job_id, lease)
            if job is None:
                continue
            timeout = self.state.timeout(job)
            error = ErrorRec("TimeoutError", f"the job ran past its timeout of {timeout}s")
            record = self.state.decide_finish(job, "error", now, error=error)
            self._record(record)
            self.stats["timeouts"] += 1
            self._count_outcome(None, record.status)
            if record.status in TERMINAL:
                self._ended(job, now)
            self._dirty = True
            log.warning("broker.job_timeout", job_id=job_id, timeout=timeout, next=record.status)

    # ----------------------------------------------------------- dispatch

    def _dispatch(self, now: float) -> None:
        if not self._dirty:
            return
        self._dirty = False
        for conn in self.workers.hungry():
            jobs = self._take_jobs(conn)
            if jobs:
                self._deliver(conn, jobs, now)

    def _take_jobs(self, conn: WorkerConn) -> list[Job]:
        jobs: list[Job] = []
        taken: set[str] = set()
        credit = conn.credit
        while len(jobs) < credit:
            job = None
            for queue in conn.queue_order():
                if queue in self.state.paused:
                    continue
                job = self.state.pop_ready(queue)
                if job is not None:
                    break
            if job is None:
                break
            if job.id not in taken:
                taken.add(job.id)
                jobs.append(job)
        return jobs

    def _deliver(self, conn: WorkerConn, jobs: list[Job], now: float) -> None:
        leases = []
        deliveries = []
        for job in jobs:
            self._lease_seq += 1
            leases.append(self._lease_seq)
            deliveries.append(
                p.Delivery(
                    job.id,
                    self._lease_seq,
                    job.task,
                    job.payload,
                    job.attempts + 1,
                    self.state.max_attempts(job),
                    job.queue,
                    job.created_at,
                    self.state.timeout(job),
                    job.prev_result,
                )
            )
        if not self._send_worker(conn.identity, p.Deliver(deliveries)):
            for job in jobs:
                self.state.push_back(job)
            return
        for job, lease in zip(jobs, leases, strict=True):
            self._record(
                Leased(job.id, lease, job.attempts + 1, conn.worker_id, conn.host, conn.pid, now)
            )
            conn.leases[job.id] = lease
            self._holders[job.id] = conn.identity
        self.stats["delivered"] += len(jobs)

    # ------------------------------------------------------------ helpers

    def _record(self, record: Record) -> None:
        """Log first, then apply."""
        self.log.append(record)
        self.state.apply(record)

    def _reply(self, sock: zmq.Socket[Any] | None, identity: bytes, msg: p.Msg) -> None:
        assert sock is not None
        self._replies.append((sock, identity, p.encode(msg)))

    def _flush_replies(self) -> None:
        replies, self._replies = self._replies, []
        for sock, identity, body in replies:
            try:
                sock.send_multipart((identity, body), zmq.NOBLOCK)
            except zmq.Again:
                self.stats["replies_dropped"] += 1
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EHOSTUNREACH:
                    raise
                self.stats["replies_unroutable"] += 1

    def _send_worker(self, identity: bytes, msg: p.Msg) -> bool:
        assert self.worker_sock is not None
        try:
            self.worker_sock.send_multipart((identity, p.encode(msg)), zmq.NOBLOCK)
        except zmq.Again:
            self.stats["worker_sends_blocked"] += 1
            return False
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            self.stats["worker_sends_unroutable"] += 1
            return False
        conn = self.workers.get(identity)
        if conn is not None:
            conn.last_sent = time.monotonic()
        return True

    def _malformed(self, side: str, reason: str) -> None:
        self.stats["malformed_frames"] += 1
        n = self.stats["malformed_frames"]
        if n <= 20 or n % 1000 == 0:
            log.warning("broker.malformed_frame", side=side, reason=reason[:200], total=n)

    def _maybe_compact(self) -> None:
        threshold = max(self.config.broker.compact_min_size, 2 * self.state.live_bytes)
        if self.log.bytes_since_compaction <= threshold or self.log.pending:
            return
        started = time.monotonic()
        self.log.compact(self.state.snapshot())
        self.stats["compactions"] += 1
        log.info(
            "broker.compacted",
            jobs=len(self.state.jobs),
            seconds=round(time.monotonic() - started, 3),
        )

    def _status(self, req: int, mono: float) -> p.StatusReply:
        queues = dict(sorted(self.state.queue_counts().items()))
        workers = [
            p.WorkerInfo(
                c.worker_id,
                c.host,
                c.pid,
                c.queues,
                c.concurrency,
                c.credit,
                list(c.leases),
                c.tasks,
                round(mono - c.last_seen, 3),
                c.processed,
                c.failed,
            )
            for c in self.workers
        ]
        stats = dict(self.stats)
        stats.update({f"log_{k}": int(v) for k, v in self.log.stats().items()})
        stats["jobs"] = len(self.state.jobs)
        stats["waiters"] = sum(len(w) for w in self._waiters.values())
        registered = sorted({t for c in self.workers for t in c.tasks})
        supervisors = [
            msgspec.structs.replace(info, reported_ago=round(mono - seen, 3))
            for info, seen in self._supervisors.values()
            if mono - seen < SUPERVISOR_STALE
        ]
        info = p.StatusInfo(
            queues,
            workers,
            stats,
            self.broker_id,
            supervisors,
            sorted(self.state.paused),
            self.state.per_task(),
            self._rates.per_minute(mono),
            registered,
        )
        return p.StatusReply(req, info)
