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
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import structlog
import zmq

from corral.broker import flows
from corral.broker import protocol as p
from corral.broker.lockfile import StateDirLock
from corral.broker.log import FsyncFailed, Log, LogError
from corral.broker.records import (
    Cancelled,
    ErrorRec,
    FlowCreated,
    Leased,
    ProgressNoted,
    QueuePaused,
    Record,
    Removed,
    Requeued,
    Returned,
    ScheduleFired,
)
from corral.broker.schedules import Schedule, Scheduler, job_id_for
from corral.broker.state import (
    TERMINAL,
    Defaults,
    InvalidJob,
    Job,
    JobState,
    TaskDefaults,
    step_of,
    validate_spec,
)
from corral.broker.workers import WorkerConn, WorkerTable
from corral.transport import Authenticator, bind_router, check_tcp_allowed

log = structlog.get_logger()

#: Messages handled per socket per pass before the loop commits and replies.
DRAIN_BUDGET = 20_000
MAX_POLL_WAIT = 1.0
#: A supervisor not heard from for this long is left out of status.
SUPERVISOR_STALE = 15.0


@dataclass(eq=False)
class _Waiter:
    """A client long-polling for a job's result."""

    deadline: float
    job_id: str
    identity: bytes
    req: int
    answered: bool = False


class Rates:
    """Outcomes per status over the last minute, in one-second buckets."""

    WINDOW = 60

    def __init__(self) -> None:
        self._buckets: deque[tuple[int, Counter[str]]] = deque()

    def add(self, mono: float, status: str) -> None:
        second = int(mono)
        if not self._buckets or self._buckets[-1][0] != second:
            self._buckets.append((second, Counter()))
            while self._buckets and self._buckets[0][0] <= second - self.WINDOW:
                self._buckets.popleft()
        self._buckets[-1][1][status] += 1

    def per_minute(self, mono: float) -> dict[str, float]:
        total: Counter[str] = Counter()
        for second, counts in self._buckets:
            if second > mono - self.WINDOW:
                total.update(counts)
        return {
            "processed_per_minute": float(total["succeeded"]),
            "failed_per_minute": float(total["failed"] + total["retrying"]),
        }


class Broker:
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
        self._waiters: dict[str, list[_Waiter]] = {}
        self._waiter_heap: list[tuple[float, int, _Waiter]] = []
        self._deadlines: list[tuple[float, str, int]] = []
        self._holders: dict[str, bytes] = {}
        self._supervisors: dict[str, tuple[p.SupervisorInfo, float]] = {}
        self._rates = Rates()
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
        requeued = self.state.recover()
        owed_followups = flows.pending(self.state, time.time(), self._record)
        owed = self.scheduler.restore(self.state.last_fired, time.time())
        log.info(
            "broker.replayed",
            records=count,
            jobs=len(self.state.jobs),
            requeued_running=requeued,
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
        self._drain(now, mono)
        self._tick(now, mono)
        self.log.commit(mono)
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

    # ------------------------------------------------------------ clients

    def _on_client(self, frames: list[bytes], now: float, mono: float) -> None:
        if len(frames) != 2:
            self._malformed("client", f"expected 2 frames, got {len(frames)}")
            return
        identity, body = frames
        try:
            msg = p.decode(p.client_request_decoder, body)
        except p.ProtocolError as exc:
            self._malformed("client", str(exc))
            code = "version" if "version" in str(exc) else "invalid"
            self._reply(self.client_sock, identity, p.ErrorReply(0, code, f"bad request: {exc}"))
            return
        match msg:
            case p.Enqueue():
                self._enqueue(identity, msg, now)
            case p.GetJob():
                job = self.state.jobs.get(msg.job_id)
                if job is None:
                    self._reply_not_found(identity, msg.req, msg.job_id)
                else:
                    self._reply(self.client_sock, identity, p.JobReply(msg.req, self._view(job)))
            case p.GetResult():
                self._get_result(identity, msg, mono)
            case p.GetStatus():
                self._reply(self.client_sock, identity, self._status(msg.req, mono))
            case p.Ping():
                self._reply(self.client_sock, identity, p.Pong(msg.req, self.broker_id))
            case p.SupervisorReport():
                self._supervisors[msg.info.supervisor_id] = (msg.info, mono)
                self._reply(self.client_sock, identity, p.Ack(msg.req))
            case p.Cancel():
                self._cancel(identity, msg, now)
            case p.RetryJobs():
                self._retry(identity, msg, now)
            case p.Delete():
                self._delete(identity, msg)
            case p.Purge():
                ids = [
                    j.id
                    for j in self.state.jobs.values()
                    if j.queue == msg.queue and j.status == "queued"
                ]
                for job_id in ids:
                    self._record(Removed(job_id))
                self._reply(self.client_sock, identity, p.Ack(msg.req, len(ids)))
            case p.Pause():
                if (msg.queue in self.state.paused) != msg.paused:
                    self._record(QueuePaused(msg.queue, msg.paused))
                    self._dirty = True
                self._reply(self.client_sock, identity, p.Ack(msg.req, 1))
            case p.ListJobs():
                self._list(identity, msg)
            case p.EnqueueFlow():
                self._enqueue_flow(identity, msg, now)
            case p.GetFlow():
                flow = self.state.flows.get(msg.flow_id)
                if flow is None:
                    self._reply_not_found(identity, msg.req, msg.flow_id)
                else:
                    self._reply(
                        self.client_sock, identity, p.FlowReply(msg.req, self._flow_info(flow))
                    )
            case p.WorkerExited():
                gone = [c for c in self.workers if c.host == msg.host and c.pid == msg.pid]
                for conn in gone:
                    self._lose_worker(conn, now, f"exited ({msg.reason})")
                self._reply(self.client_sock, identity, p.Ack(msg.req, len(gone)))

    def _refuse_if_full(self, identity: bytes, req: int) -> bool:
        """New jobs are refused while the log has no room but its reserve."""
        if not self.log.full:
            return False
        self.stats["enqueue_refused_disk_full"] += 1
        self._reply(
            self.client_sock,
            identity,
            p.ErrorReply(
                req,
                "disk_full",
                f"the broker's disk is full ({self.state_dir}): no job was accepted; "
                "free space or raise broker.disk_reserve, then retry",
            ),
        )
        return True

    def _enqueue(self, identity: bytes, msg: p.Enqueue, now: float) -> None:
        if self._refuse_if_full(identity, msg.req):
            return
        try:
            for spec in msg.jobs:
                validate_spec(spec)
        except InvalidJob as exc:
            self._reply(self.client_sock, identity, p.ErrorReply(msg.req, "invalid", str(exc)))
            return
        ids = []
        for spec in msg.jobs:
            holder = self.state.holder_of(spec.unique_key, now)
            if holder is not None:  # a unique job: the first one's id
                ids.append(holder)
                continue
            record = self.state.decide_create(spec, now)
            if record is not None:
                self._record(record)
                self.stats["enqueued"] += 1
            ids.append(spec.id)
        self._dirty = True
        self._reply(self.client_sock, identity, p.EnqueueOk(msg.req, ids))

    def _enqueue_flow(self, identity: bytes, msg: p.EnqueueFlow, now: float) -> None:
        if self._refuse_if_full(identity, msg.req):
            return
        try:
            if msg.kind not in ("chain", "group") or not msg.jobs:
                raise InvalidJob(
                    f"kind: a flow is a chain or a group of at least one job, got "
                    f"{msg.kind!r} with {len(msg.jobs)} jobs"
                )
            for spec in [*msg.jobs, *([msg.callback] if msg.callback else [])]:
                validate_spec(spec)
        except InvalidJob as exc:
            self._reply(self.client_sock, identity, p.ErrorReply(msg.req, "invalid", str(exc)))
            return
        ids = [msg.flow_id] + [spec.id for spec in msg.jobs]
        if msg.flow_id not in self.state.flows:
            steps = [step_of(spec) for spec in msg.jobs]
            self._record(FlowCreated(msg.flow_id, msg.kind, steps, now, step_of(msg.callback)))
            first = msg.jobs if msg.kind == "group" else msg.jobs[:1]
            for index, spec in enumerate(first):
                record = flows.create(
                    self.state,
                    steps[index],
                    now,
                    flow=msg.flow_id,
                    index=index,
                    on_success=step_of(spec.on_success),
                    on_failure=step_of(spec.on_failure),
                )
                if record is not None:
                    self._record(record)
            self.stats["flows"] += 1
            self._dirty = True
        self._reply(self.client_sock, identity, p.EnqueueOk(msg.req, ids))

    def _flow_info(self, flow: FlowCreated) -> p.FlowInfo:
        status, failed_step = flows.status_of(self.state, flow)
        ids = [step.id for step in flow.steps]
        statuses = {i: self.state.jobs[i].status for i in ids if i in self.state.jobs}
        callback = flow.callback.id if flow.callback is not None else None
        return p.FlowInfo(
            flow.id, flow.kind, status, ids, statuses, flow.created_at, failed_step, callback
        )

    def _cancel(self, identity: bytes, msg: p.Cancel, now: float) -> None:
        flow = self.state.flows.get(msg.job_id)
        if flow is not None:  # a chain or group: cancel what has not ended
            count = 0
            for step in [*flow.steps, *([flow.callback] if flow.callback else [])]:
                job = self.state.jobs.get(step.id)
                if job is not None and job.status not in TERMINAL:
                    self._cancel_job(job, now)
                    count += 1
            self._reply(self.client_sock, identity, p.Ack(msg.req, count))
            return
        job = self.state.jobs.get(msg.job_id)
        if job is None:
            self._reply_not_found(identity, msg.req, msg.job_id)
            return
        if job.status in TERMINAL:
            self._reply(self.client_sock, identity, p.Ack(msg.req, 0))
            return
        self._cancel_job(job, now)
        self._reply(self.client_sock, identity, p.Ack(msg.req, 1, [job.id]))

    def _cancel_job(self, job: Job, now: float) -> None:
        lease, holder = job.lease, self._holders.pop(job.id, None)
        self._record(Cancelled(job.id, now))
        if holder is not None and lease:  # running: tell its worker; the result is discarded
            self._send_worker(holder, p.CancelJob(job.id, lease))
        self.stats["jobs_cancelled"] += 1
        self._ended(job, now)

    def _retry(self, identity: bytes, msg: p.RetryJobs, now: float) -> None:
        if msg.job_id is not None:
            job = self.state.jobs.get(msg.job_id)
            if job is None:
                self._reply_not_found(identity, msg.req, msg.job_id)
                return
            if job.status not in ("failed", "cancelled"):
                self._reply(
                    self.client_sock,
                    identity,
                    p.ErrorReply(
                        msg.req,
                        "invalid",
                        f"job {job.id} is {job.status}: "
                        "only failed or cancelled jobs can be retried",
                    ),
                )
                return
            jobs = [job]
        else:
            jobs = [
                j
                for j in self.state.jobs.values()
                if j.status == "failed" and (msg.queue is None or j.queue == msg.queue)
            ]
        for job in jobs:
            self._record(Requeued(job.id, now))
        self._dirty = True
        self._reply(self.client_sock, identity, p.Ack(msg.req, len(jobs), [j.id for j in jobs]))

    def _delete(self, identity: bytes, msg: p.Delete) -> None:
        job = self.state.jobs.get(msg.job_id)
        if job is None:
            self._reply_not_found(identity, msg.req, msg.job_id)
        elif job.status not in TERMINAL:
            self._reply(
                self.client_sock,
                identity,
                p.ErrorReply(
                    msg.req,
                    "invalid",
                    f"job {job.id} is {job.status}: "
                    "only finished jobs can be deleted; cancel it first",
                ),
            )
        else:
            self._record(Removed(job.id))
            self._reply(self.client_sock, identity, p.Ack(msg.req, 1, [job.id]))

    def _list(self, identity: bytes, msg: p.ListJobs) -> None:
        try:
            jobs, cursor = self.state.list_jobs(
                msg.queue, msg.status, msg.task, max(1, min(msg.limit, 10_000)), msg.cursor
            )
        except InvalidJob as exc:
            self._reply(self.client_sock, identity, p.ErrorReply(msg.req, "invalid", str(exc)))
            return
        views = [self._view(job) for job in jobs]
        self._reply(self.client_sock, identity, p.JobList(msg.req, views, cursor))

    def _get_result(self, identity: bytes, msg: p.GetResult, mono: float) -> None:
        job = self.state.jobs.get(msg.job_id)
        flow = self.state.flows.get(msg.job_id)
        if job is not None:
            ended = job.status in TERMINAL
        elif flow is not None:
            ended = flows.status_of(self.state, flow)[0] in TERMINAL
        else:
            self._reply_not_found(identity, msg.req, msg.job_id)
            return
        if ended or msg.wait <= 0:
            self._answer_result(identity, msg.req, msg.job_id)
        else:
            waiter = _Waiter(mono + min(msg.wait, 3600.0), msg.job_id, identity, msg.req)
            self._waiters.setdefault(msg.job_id, []).append(waiter)
            heapq.heappush(self._waiter_heap, (waiter.deadline, id(waiter), waiter))

    def _result_reply(self, req: int, job: Job) -> p.ResultReply:
        error = None
        if job.error is not None and job.status != "succeeded":
            error = p.ErrorInfo(job.error.type, job.error.message, job.error.traceback)
        result = job.result if job.result is not None else p.NIL
        return p.ResultReply(req, job.id, job.status, result, error)

    def _reply_not_found(self, identity: bytes, req: int, job_id: str) -> None:
        self._reply(
            self.client_sock,
            identity,
            p.ErrorReply(req, "not_found", f"no job with id {job_id!r} (it may have expired)"),
        )

    def _ended(self, job: Job, now: float) -> None:
        """A job reached a terminal status: answer its waiters, create what
        it brings about (chain step, chord callback, callbacks), and answer
        its flow's waiters if the flow ended with it."""
        self._notify_waiters(job)
        for record in flows.followups(self.state, job, now):
            self._record(record)
            self._dirty = True
        if job.flow is not None:
            self._notify_flow(job.flow)

    def _notify_flow(self, flow_id: str) -> None:
        flow = self.state.flows.get(flow_id)
        if flow is None or flows.status_of(self.state, flow)[0] not in TERMINAL:
            return
        for waiter in self._waiters.pop(flow_id, ()):
            waiter.answered = True
            self._reply(self.client_sock, waiter.identity, self._flow_result(waiter.req, flow))

    def _notify_waiters(self, job: Job) -> None:
        for waiter in self._waiters.pop(job.id, ()):
            waiter.answered = True  # its heap entry is now stale
            self._reply(self.client_sock, waiter.identity, self._result_reply(waiter.req, job))

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
            job = self.state.jobs.get(note.job_id)
            if job is not None and job.status == "running" and job.lease == note.lease:
                self._record(ProgressNoted(job.id, note.fraction, note.note[:500], now))

    def _finish(self, conn: WorkerConn | None, outcome: p.Outcome, now: float) -> None:
        holder = self.workers.get(self._holders.get(outcome.job_id, b""))
        for c in {conn, holder} - {None}:
            if c.leases.get(outcome.job_id) == outcome.lease:
                c.release(outcome.job_id)
                self._dirty = True
        job = self.state.jobs.get(outcome.job_id)
        if job is None or job.status != "running" or job.lease != outcome.lease:
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
        self.stats[f"jobs_{status}"] += 1
        self._rates.add(time.monotonic(), status)
        if conn is not None:
            if status == "succeeded":
                conn.processed += 1
            elif status in ("failed", "retrying"):
                conn.failed += 1

    def _returned(self, conn: WorkerConn | None, msg: p.Return) -> None:
        for lease in msg.leases:
            if conn is not None and conn.release(lease.job_id) is None:
                continue
            job = self.state.jobs.get(lease.job_id)
            if job is not None and job.status == "running" and job.lease == lease.lease:
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
            job = self.state.jobs.get(job_id)
            if job is None or job.status != "running" or job.lease != lease:
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
        self.state.expire(now)
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
            job = self.state.jobs.get(job_id)
            if job is None or job.status != "running" or job.lease != lease:
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

    def _expire_waiters(self, mono: float) -> None:
        while self._waiter_heap and self._waiter_heap[0][0] <= mono:
            waiter = heapq.heappop(self._waiter_heap)[2]
            if waiter.answered:
                continue
            waiting = self._waiters.get(waiter.job_id, [])
            waiting.remove(waiter)
            if not waiting:
                self._waiters.pop(waiter.job_id, None)
            self._answer_result(waiter.identity, waiter.req, waiter.job_id)

    def _answer_result(self, identity: bytes, req: int, job_id: str) -> None:
        """A job's or a flow's outcome as it stands."""
        job = self.state.jobs.get(job_id)
        flow = self.state.flows.get(job_id)
        if job is not None:
            self._reply(self.client_sock, identity, self._result_reply(req, job))
        elif flow is not None:
            self._reply(self.client_sock, identity, self._flow_result(req, flow))
        else:
            self._reply_not_found(identity, req, job_id)

    def _flow_result(self, req: int, flow: FlowCreated) -> p.ResultReply:
        """A chain's result is its last step's; a group's, the list of its
        jobs' results in order. A failure carries the failed job's error."""
        status, failed_step = flows.status_of(self.state, flow)
        jobs = [self.state.jobs.get(step.id) for step in flow.steps]
        if status == "succeeded":
            last = jobs[-1]
            result = (
                flows.results_of(jobs)
                if flow.kind == "group"
                else (last.result if last is not None and last.result is not None else p.NIL)
            )
            return p.ResultReply(req, flow.id, status, result)
        error = None
        failed = jobs[failed_step] if failed_step is not None else None
        if failed is not None and failed.error is not None:
            error = p.ErrorInfo(
                failed.error.type,
                f"step {failed_step} ({failed.id}): {failed.error.message}",
                failed.error.traceback,
            )
        return p.ResultReply(req, flow.id, status, p.NIL, error)

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

    def _view(self, job: Job) -> p.JobInfo:
        tries = [
            p.TryInfo(
                t.attempt,
                t.worker,
                t.host,
                t.pid,
                t.started_at,
                t.ended_at,
                p.ErrorInfo(t.error.type, t.error.message, t.error.traceback)
                if t.error is not None
                else None,
            )
            for t in job.tries
        ]
        last = job.tries[-1] if job.tries else None
        error = None
        if job.error is not None and job.status != "succeeded":
            error = p.ErrorInfo(job.error.type, job.error.message, job.error.traceback)
        return p.JobInfo(
            id=job.id,
            task=job.task,
            queue=job.queue,
            status=job.status,
            attempts=job.attempts,
            max_attempts=self.state.max_attempts(job),
            priority=job.priority,
            created_at=job.created_at,
            next_run_at=job.next_run_at,
            started_at=job.tries[0].started_at if job.tries else None,
            ended_at=job.ended_at if job.status in TERMINAL else (last.ended_at if last else None),
            error=error,
            tries=tries,
            timeout=self.state.timeout(job),
            unique_key=job.unique_key,
            progress=job.progress,
            progress_note=job.progress_note,
            enqueued_at=job.created_at,
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
