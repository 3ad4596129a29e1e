"""The broker's answers to clients: enqueue, flows, results with long
polls, job info and listing, and management (cancel, retry, delete, purge,
pause). A mixin of :class:`corral.broker.server.Broker`, which owns the
state, the log and the sockets; kept apart so each file owns one side."""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

from corral.broker import flows, views
from corral.broker import protocol as p
from corral.broker.records import (
    Cancelled,
    FlowCreated,
    QueuePaused,
    Removed,
    Requeued,
)
from corral.broker.state import TERMINAL, InvalidJob, Job, validate_spec


@dataclass(eq=False)
class Waiter:
    """A client long-polling for a job's or a flow's result."""

    deadline: float
    job_id: str
    identity: bytes
    req: int
    answered: bool = False


class ClientRequests:
    """Handlers for the client endpoint; see the module docstring."""

    state: Any
    log: Any
    stats: Any
    workers: Any
    client_sock: Any
    broker_id: str
    state_dir: Any
    _dirty: bool
    _holders: dict[str, bytes]
    _supervisors: dict[str, Any]
    _waiters: dict[str, list[Waiter]]
    _waiter_heap: list[tuple[float, int, Waiter]]

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
                    self._reply(
                        self.client_sock,
                        identity,
                        p.JobReply(msg.req, views.job_view(self.state, job)),
                    )
            case p.GetResult():
                self._get_result(identity, msg, mono)
            case p.GetStatus():
                self._reply(self.client_sock, identity, self._status(msg.req, mono))
            case p.Ping():
                self._reply(self.client_sock, identity, p.Pong(msg.req, self.broker_id))
            case p.SupervisorReport():
                self._supervisors[msg.info.supervisor_id] = (msg.info, mono)
                queued = sum(
                    n for (_, status), n in self.state.counts.items() if status == "queued"
                )
                self._reply(self.client_sock, identity, p.Ack(msg.req, queued))
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
                        self.client_sock,
                        identity,
                        p.FlowReply(msg.req, views.flow_info(self.state, flow)),
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
        created = 0
        for spec in msg.jobs:
            holder = self.state.holder_of(spec.unique_key, now)
            if holder is not None:  # a unique job: the first one's id
                ids.append(holder)
                continue
            record = self.state.decide_create(spec, now, validated=True)
            if record is not None:
                self._record(record)
                created += 1
            ids.append(spec.id)
        self.stats["enqueued"] += created
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
            self._record(FlowCreated(msg.flow_id, msg.kind, msg.jobs, now, msg.callback))
            first = msg.jobs if msg.kind == "group" else msg.jobs[:1]
            for index, spec in enumerate(first):
                record = flows.create(self.state, spec, now, flow=msg.flow_id, index=index)
                if record is not None:
                    self._record(record)
            self.stats["flows"] += 1
            self._dirty = True
        self._reply(self.client_sock, identity, p.EnqueueOk(msg.req, ids))

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
            holder = self.state.holder_of(job.unique_key, now)
            if holder is not None and holder != job.id:
                self._reply(
                    self.client_sock,
                    identity,
                    p.ErrorReply(
                        msg.req,
                        "invalid",
                        f"job {holder} holds the unique_key {job.unique_key!r}; "
                        f"retry {job.id} once it has ended",
                    ),
                )
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
                if j.status == "failed"
                and (msg.queue is None or j.queue == msg.queue)
                and self.state.holder_of(j.unique_key, now) in (None, j.id)
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
        infos = [views.job_view(self.state, job) for job in jobs]
        self._reply(self.client_sock, identity, p.JobList(msg.req, infos, cursor))

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
            waiter = Waiter(mono + min(msg.wait, 3600.0), msg.job_id, identity, msg.req)
            self._waiters.setdefault(msg.job_id, []).append(waiter)
            heapq.heappush(self._waiter_heap, (waiter.deadline, id(waiter), waiter))

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
            self._reply(
                self.client_sock, waiter.identity, views.flow_result(self.state, waiter.req, flow)
            )

    def _notify_waiters(self, job: Job) -> None:
        for waiter in self._waiters.pop(job.id, ()):
            waiter.answered = True  # its heap entry is now stale
            self._reply(self.client_sock, waiter.identity, views.result_reply(waiter.req, job))

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
            self._reply(self.client_sock, identity, views.result_reply(req, job))
        elif flow is not None:
            self._reply(self.client_sock, identity, views.flow_result(self.state, req, flow))
        else:
            self._reply_not_found(identity, req, job_id)
