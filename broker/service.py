"""Client service: the broker's answers to clients.

Enqueue (jobs and flows), job and flow info, results (parked in
:class:`~corral.broker.waiters.Waiters` while they wait), listing, status,
and management (cancel, retry, delete, purge, pause). Each request gets one
reply, held in the pass's :class:`~corral.broker.journal.Replies` until the
commit that makes what it promises durable. No sockets; time comes in as
``now`` (epoch seconds) and ``mono`` (monotonic seconds).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from corral.broker import flows, views
from corral.broker import protocol as p
from corral.broker.admission import Admission
from corral.broker.dispatch import Dispatcher, Ended
from corral.broker.expiring import lapsed
from corral.broker.job import touched
from corral.broker.jobspec import JobSpec, ids_of, queue_problem, validate_flow, with_callback
from corral.broker.journal import Journal, Replies
from corral.broker.protocol import TERMINAL
from corral.broker.records import Cancelled, FlowCreated, JobCreated, QueuePaused, Removed, Requeued
from corral.broker.state import InvalidJob, Job, validate_spec
from corral.broker.supervisors import SupervisorTable
from corral.broker.waiters import Waiters, missing

#: The most jobs one ``ListJobs`` page holds.
MAX_PAGE = 10_000

Handler = Callable[[bytes, Any, float, float], None]


class ClientService:
    """Handlers for the client endpoint; see the module docstring."""

    def __init__(
        self,
        journal: Journal,
        replies: Replies,
        dispatcher: Dispatcher,
        waiters: Waiters,
        *,
        broker_id: str,
        state_dir: Path,
        on_ended: Ended,
        max_payload: int | None = None,
    ) -> None:
        self.journal = journal
        #: broker.max_message_size, told in each Pong (set by the core).
        self.max_message_size = 0
        self.state = journal.state
        self.stats = journal.stats
        self.replies = replies
        self.dispatcher = dispatcher
        self.waiters = waiters
        self.broker_id = broker_id
        self.state_dir = state_dir
        self._on_ended = on_ended
        #: The largest payload (msgpack bytes) an enqueue may carry.
        self.max_payload = max_payload
        #: The schedules and when each runs next (the housekeeper's; set by the core).
        self.schedules: Callable[[], list[p.ScheduleInfo]] = list
        self.admission = Admission(self.state)
        #: The supervisors heard from lately.
        self.supervisors = SupervisorTable()
        #: The last status made: in which pass, when (monotonic), of what, encoded.
        self._status: tuple[int, float, int, bytes] | None = None
        #: The pass under way (the core counts them).
        self.pass_number = 0
        #: Seconds a status made in an earlier pass may be given again when
        #: nothing it counts changed; the server sets it while a flood
        #: keeps every pass at its budget (0: a status is made each pass).
        self.status_max_age = 0.0
        self._handlers: dict[type, Handler] = {
            p.Enqueue: self._enqueue,
            p.EnqueueEach: self._enqueue_each,
            p.EnqueueFlow: self._enqueue_flow,
            p.GetJob: self._get_job,
            p.GetResult: self._get_result,
            p.GetFlow: self._get_flow,
            p.GetStatus: self._get_status,
            p.Ping: self._ping,
            p.SupervisorReport: self._supervisor_report,
            p.WorkerExited: self._worker_exited,
            p.Cancel: self._cancel,
            p.RetryJobs: self._retry,
            p.Delete: self._delete,
            p.Purge: self._purge,
            p.Pause: self._pause,
            p.ListJobs: self._list,
        }

    def on_message(self, identity: bytes, msg: Any, now: float, mono: float) -> None:
        """One decoded request from a client."""
        handler = self._handlers.get(type(msg))
        if handler is not None:
            handler(identity, msg, now, mono)

    def _reply(self, identity: bytes, msg: p.Msg) -> None:
        self.replies.add(identity, msg)

    def _invalid(self, identity: bytes, req: int, message: str) -> None:
        self._reply(identity, p.ErrorReply(req, "invalid", message))

    # ------------------------------------------------------------- enqueue

    def _refuse_if_full(
        self, identity: bytes, req: int, nothing_done: str = "no job was accepted"
    ) -> bool:
        """New work (jobs, retries) is refused while the log has no room but
        its reserve; ``nothing_done`` says what the refusal left undone."""
        if not self.journal.log.full:
            return False
        self.stats["enqueue_refused_disk_full"] += 1
        self._reply(
            identity,
            p.ErrorReply(
                req,
                "disk_full",
                f"the broker's disk is full ({self.state_dir}): {nothing_done}; "
                "free space or raise broker.disk_reserve, then retry",
            ),
        )
        return True

    def _enqueue(self, identity: bytes, msg: p.Enqueue, now: float, mono: float) -> None:
        if self._refuse_if_full(identity, msg.req):
            return
        try:
            for spec in msg.jobs:
                validate_spec(spec, self.max_payload)
            self.admission.check_batch(msg.jobs)
        except InvalidJob as exc:
            self._invalid(identity, msg.req, str(exc))
            return
        created: list[JobCreated] = []
        ids = [self._create(spec, now, created) for spec in msg.jobs]
        self._record_created(created)
        self.dispatcher.poke()
        self._reply(identity, p.EnqueueOk(msg.req, ids))

    def _enqueue_each(self, identity: bytes, msg: p.EnqueueEach, now: float, mono: float) -> None:
        """Each job as if it came alone (see :class:`~corral.broker.protocol.EnqueueEach`):
        a refused one refuses only itself. The plain creations are logged
        together at the end (one record per run of one template), unless a
        job's ids meet those of one not logged yet: then what came before is
        logged first, so the checks see it as a one-job Enqueue would."""
        if self._refuse_if_full(identity, msg.req):
            return
        replies: list[p.EnqueueOk | p.ErrorReply] = []
        created: list[JobCreated] = []
        unlogged: set[str] = set()  # the ids (callbacks' too) of the jobs in ``created``
        for spec in msg.jobs:
            try:
                validate_spec(spec, self.max_payload)
                ids = ids_of(spec)
                if unlogged and not unlogged.isdisjoint(ids):
                    self._record_created(created)
                    created = []
                    unlogged.clear()
                self.admission.check_batch([spec])
            except InvalidJob as exc:
                replies.append(p.ErrorReply(0, "invalid", str(exc)))
                continue
            made = len(created)
            replies.append(p.EnqueueOk(0, [self._create(spec, now, created)]))
            if len(created) < made:  # a unique job: logged, after what came before it
                unlogged.clear()
            elif len(created) > made:
                unlogged.update(ids)
        self._record_created(created)
        self.dispatcher.poke()
        self._reply(identity, p.EachReply(msg.req, replies))

    def _create(self, spec: JobSpec, now: float, created: list[JobCreated]) -> str:
        """Make ``spec`` (validated and admitted); its id, or the id of the
        job holding its ``unique_key``. A plain job's record is appended to
        ``created``, for the caller to log; a unique one is logged at once,
        after what ``created`` held (then emptied), so that a later job of
        the same request sees its key held."""
        holder = self.state.holder_of(spec.unique_key, now)
        if holder is not None:  # a unique job: the first one's id
            return holder
        record = self.state.decide_create(spec, now, validated=True)
        if record is not None:
            if record.unique_key:
                self._record_created(created)
                created.clear()
                self.journal.record(record)
                self.stats["enqueued"] += 1
            else:
                created.append(record)
        return spec.id

    def _record_created(self, created: list[JobCreated]) -> None:
        """Log and apply creation records, jobs of one template together."""
        for record in self.state.batched(created):
            self.journal.record(record)
        self.stats["enqueued"] += len(created)

    def _enqueue_flow(self, identity: bytes, msg: p.EnqueueFlow, now: float, mono: float) -> None:
        if self._refuse_if_full(identity, msg.req):
            return
        try:
            if msg.kind not in ("chain", "group") or not msg.jobs:
                raise InvalidJob(
                    f"kind: a flow is a chain or a group of at least one job, got "
                    f"{msg.kind!r} with {len(msg.jobs)} jobs"
                )
            for spec in with_callback(msg.jobs, msg.callback):
                validate_spec(spec, self.max_payload)
            validate_flow(msg.flow_id, msg.jobs, msg.callback, msg.result_ttl)
            if msg.flow_id not in self.state.flows:  # a resent flow is answered as before
                self.admission.check_id(msg.flow_id, field="flow_id")
                self.admission.check_flow(msg.jobs, msg.callback, now)
        except InvalidJob as exc:
            self._invalid(identity, msg.req, str(exc))
            return
        ids = [msg.flow_id] + [spec.id for spec in msg.jobs]
        if msg.flow_id not in self.state.flows:
            self.journal.record(
                FlowCreated(msg.flow_id, msg.kind, msg.jobs, now, msg.callback, msg.result_ttl)
            )
            first = msg.jobs if msg.kind == "group" else msg.jobs[:1]
            for index, spec in enumerate(first):
                record = flows.create(self.state, spec, now, flow=msg.flow_id, index=index)
                if record is not None:
                    self.journal.record(record)
            self.stats["flows"] += 1
            self.dispatcher.poke()
        self._reply(identity, p.EnqueueOk(msg.req, ids))

    # --------------------------------------------------------------- reads

    def _get_job(self, identity: bytes, msg: p.GetJob, now: float, mono: float) -> None:
        job = self.state.jobs.get(msg.job_id)
        flow = self.state.flows.get(msg.job_id)
        if job is None and flow is not None:  # a flow's id: say so, and where to look
            self._reply(
                identity,
                p.ErrorReply(
                    msg.req,
                    "not_found",
                    f"{msg.job_id!r} is a {flow.kind}, not a job: see "
                    f"`corral {flow.kind} {msg.job_id}` (client.{flow.kind}(id)) or "
                    f"`corral result {msg.job_id}`",
                ),
            )
        elif job is None:
            self._reply(identity, missing(self.state, msg.req, msg.job_id))
        else:
            held = self.dispatcher.limits.holding_back(job)
            self._reply(identity, p.JobReply(msg.req, views.job_view(self.state, job, held)))

    def _get_result(self, identity: bytes, msg: p.GetResult, now: float, mono: float) -> None:
        self.waiters.get_result(identity, msg, mono)

    def _get_flow(self, identity: bytes, msg: p.GetFlow, now: float, mono: float) -> None:
        flow = self.state.flows.get(msg.flow_id)
        if flow is None:
            where = "is a job, not a chain or group" if msg.flow_id in self.state.jobs else ""
            text = f"no chain or group with id {msg.flow_id!r} " + (
                f"({msg.flow_id!r} {where}: see `corral job {msg.flow_id}`)"
                if where
                else "(it may have finished and expired)"
            )
            self._reply(identity, p.ErrorReply(msg.req, "not_found", text))
        else:
            self._reply(identity, p.FlowReply(msg.req, views.flow_info(self.state, flow)))

    def _ping(self, identity: bytes, msg: p.Ping, now: float, mono: float) -> None:
        pong = p.Pong(msg.req, self.broker_id, max_message_size=self.max_message_size)
        self.replies.add(identity, pong, durable=False)

    def _list(self, identity: bytes, msg: p.ListJobs, now: float, mono: float) -> None:
        if msg.status is not None and msg.status not in p.STATUSES:  # a typo lists nothing
            self._invalid(
                identity, msg.req, f"status: {msg.status!r} is not one of {', '.join(p.STATUSES)}"
            )
            return
        if msg.limit < 1:
            self._invalid(identity, msg.req, f"limit: must be at least 1, got {msg.limit}")
            return
        try:
            jobs, cursor = views.list_jobs(
                self.state,
                msg.queue,
                msg.status,
                msg.task,
                min(msg.limit, MAX_PAGE),
                msg.cursor,
                newest=msg.newest,
            )
        except InvalidJob as exc:
            self._invalid(identity, msg.req, str(exc))
            return
        limits = self.dispatcher.limits
        infos = [views.job_view(self.state, job, limits.holding_back(job)) for job in jobs]
        self._reply(identity, p.JobList(msg.req, infos, cursor))

    def _get_status(self, identity: bytes, msg: p.GetStatus, now: float, mono: float) -> None:
        self.replies.add_status(identity, msg.req, self._encoded_status(mono, now))

    def _encoded_status(self, mono: float, now: float) -> bytes:
        """The status, encoded: made at most once a pass, and while the broker is loaded (see
        :attr:`status_max_age`) again only once the job state changed or it
        is that old (workers, supervisors and counters may then be that much
        behind). A flood of status requests (a status with a thousand
        supervisors takes milliseconds to make) then costs a few bytes each
        (the replies share it: :meth:`Replies.add_status`). A
        client still sees every change its earlier replies told of: those
        replies left after an earlier pass's commit, so a request that
        follows them is read in a later pass, whose status is made anew
        once the job state changed."""
        key = self.journal.records
        cached = self._status
        if cached is not None:
            made_in, made, of, encoded = cached
            if made_in == self.pass_number or (of == key and mono - made < self.status_max_age):
                return encoded
        encoded = p.encode_struct(self.status(mono, now))
        self._status = (self.pass_number, mono, key, encoded)
        return encoded

    def status(self, mono: float, now: float) -> p.StatusInfo:
        """Queues, workers, counters, supervisors: what ``corral status``
        shows (``now``: epoch seconds, for the queues' latency)."""
        state = self.state
        stats = dict(self.stats)
        stats.update({f"log_{k}": int(v) for k, v in self.journal.log.stats().items()})
        stats["jobs"] = len(state.jobs)
        stats["waiters"] = len(self.waiters)
        workers = self.dispatcher.workers
        supervisors = self.supervisors.current(mono)
        limited = bool(self.dispatcher.limits.limits)
        return p.StatusInfo(
            dict(sorted(views.queue_counts(state).items())),
            views.worker_infos(list(self.dispatcher.workers), mono),
            stats,
            self.broker_id,
            supervisors,
            sorted(state.paused),
            views.per_task(state),
            self.dispatcher.rates.per_minute(mono),
            sorted({t for c in workers for t in c.tasks}),
            views.unroutable(state, list(workers)),
            views.queue_latency(state, now),
            self.schedules(),
            self.dispatcher.limits.infos(views.ready_per_task(state)) if limited else [],
        )

    # --------------------------------------------------------- supervisors

    def _supervisor_report(
        self, identity: bytes, msg: p.SupervisorReport, now: float, mono: float
    ) -> None:
        if not self.supervisors.report(msg.info, mono):
            self.stats["supervisor_reports_refused"] += 1
        self.dispatcher.workers.vouch(msg.info.host, msg.info.workers, mono)
        queued = sum(n for (_, _, status), n in self.state.counts.items() if status == "queued")
        self._reply(identity, p.Ack(msg.req, queued))

    def _worker_exited(self, identity: bytes, msg: p.WorkerExited, now: float, mono: float) -> None:
        dropped = self.dispatcher.process_exited(
            msg.host, msg.pid, msg.reason, now, mono, msg.identities, msg.charged
        )
        self._reply(identity, p.Ack(msg.req, dropped))

    # ---------------------------------------------------------- management

    def _cancel(self, identity: bytes, msg: p.Cancel, now: float, mono: float) -> None:
        flow = self.state.flows.get(msg.job_id)
        if flow is not None:  # a chain or group: cancel what has not ended
            count = 0
            for step in with_callback(flow.steps, flow.callback):
                job = self.state.jobs.get(step.id)
                if job is not None and job.status not in TERMINAL:
                    self._cancel_job(job, now)
                    count += 1
            self._reply(identity, p.Ack(msg.req, count))
            return
        job = self.state.jobs.get(msg.job_id)
        if job is None:
            self._reply(identity, missing(self.state, msg.req, msg.job_id))
        elif job.status in TERMINAL:
            self._reply(identity, p.Ack(msg.req, 0))
        else:
            self._cancel_job(job, now)
            self._reply(identity, p.Ack(msg.req, 1, [job.id]))

    def _cancel_job(self, job: Job, now: float) -> None:
        lease = job.lease
        self.journal.record(Cancelled(job.id, now))
        self.dispatcher.revoke(job.id, lease)
        self.stats["jobs_cancelled"] += 1
        self._on_ended(job, now)

    def _retry(self, identity: bytes, msg: p.RetryJobs, now: float, mono: float) -> None:
        """Run failed or cancelled jobs again: new work, so refused on a full
        disk as an enqueue is (the reserve is for jobs that exist)."""
        if self._refuse_if_full(identity, msg.req, "no job was retried"):
            return
        if msg.job_id is None:
            # A failed job has a life: the pristine ones (a million, maybe
            # cold: see broker/coldjobs.py) are passed over, none warmed.
            jobs = [
                j
                for j in touched(self.state.jobs.warm_values())
                if j.status == "failed"
                and (msg.queue is None or j.queue == msg.queue)
                and self.state.holder_of(j.unique_key, now) in (None, j.id)
                and not lapsed(j, now)  # it would be cancelled (expired) at once
            ]
        else:
            job = self.state.jobs.get(msg.job_id)
            if job is None:
                self._reply(identity, missing(self.state, msg.req, msg.job_id))
                return
            refusal = self.admission.retry_refusal(job, now)
            if refusal is not None:
                self._invalid(identity, msg.req, refusal)
                return
            jobs = [job]
        for job in jobs:
            self.journal.record(Requeued(job.id, now))
        self.dispatcher.poke()
        self._reply(identity, p.Ack(msg.req, len(jobs), [j.id for j in jobs]))

    def _delete(self, identity: bytes, msg: p.Delete, now: float, mono: float) -> None:
        job = self.state.jobs.get(msg.job_id)
        if job is None:
            self._reply(identity, missing(self.state, msg.req, msg.job_id))
        elif job.status not in TERMINAL:
            self._invalid(
                identity,
                msg.req,
                f"job {job.id} is {job.status}: only finished jobs can be deleted; cancel it first",
            )
        else:
            self.journal.record(Removed(job.id))
            self._reply(identity, p.Ack(msg.req, 1, [job.id]))

    def _purge(self, identity: bytes, msg: p.Purge, now: float, mono: float) -> None:
        # O(jobs of the queue): its ready lanes (a cold batch of it is
        # warmed; no other is) and the jobs workers hold reserved
        jobs = self.state.ready.queued(msg.queue)
        held = self.state.jobs
        for job_id in self.dispatcher.leased_ids():
            job = dict.get(held, job_id)  # (a held job is never cold)
            if job is not None and job.queue == msg.queue and job.reserved:
                jobs.append(job)
        for job in jobs:
            if job.flow is not None:  # its flow stops, as if it was cancelled
                self._cancel_job(job, now)
            else:
                self.dispatcher.revoke(job.id, job.lease)  # reserved: it must not run
            self.journal.record(Removed(job.id))
        self._reply(identity, p.Ack(msg.req, len(jobs)))

    def _pause(self, identity: bytes, msg: p.Pause, now: float, mono: float) -> None:
        problem = queue_problem(msg.queue)  # no job could be in such a queue
        if problem is not None and (msg.paused or msg.queue not in self.state.paused):
            self._invalid(identity, msg.req, problem)  # (one an older broker paused may resume)
            return
        if (msg.queue in self.state.paused) != msg.paused:
            self.journal.record(QueuePaused(msg.queue, msg.paused))
            self.dispatcher.poke()
        ack = p.Ack(msg.req, 1)
        if msg.paused:  # answered once no buffered job of the queue can start
            self.dispatcher.withdraw_queue(msg.queue, mono, lambda: self._reply(identity, ack))
        else:
            self._reply(identity, ack)
