"""Views of the broker's state: a job's info, a job's or flow's result, a
flow's info (as wire messages), listing with a cursor, counts per queue and
task, and the outcome rates. Pure functions: they read, never change."""

from __future__ import annotations

from collections import Counter, deque

from corral.broker import balance, expiring, flows
from corral.broker import protocol as p
from corral.broker.jobspec import NIL, InvalidJob
from corral.broker.protocol import STATUSES, TERMINAL
from corral.broker.records import Finished, FlowCreated
from corral.broker.state import Job, JobState
from corral.broker.workers import WorkerConn


class Rates:
    """Tries that succeeded and tries that failed (an error, a timeout, a
    lost worker; not a Retry request) over the last minute, in one-second
    buckets."""

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
            "failed_per_minute": float(total["failure"]),
        }


def outcome_of(record: Finished) -> str | None:
    """How a try's end counts: ``succeeded``, ``failure`` (a counted try
    that did not succeed: an error, a timeout, a lost worker), or None (a
    Retry request or a shutdown is neither)."""
    if record.status == "succeeded":
        return "succeeded"
    return "failure" if record.counted else None


def result_reply(req: int, job: Job) -> p.ResultReply:
    error = None
    if job.error is not None and job.status != "succeeded":
        error = p.ErrorInfo(job.error.type, job.error.message, job.error.traceback)
    result = job.result if job.result is not None else NIL
    return p.ResultReply(req, job.id, job.status, result, error)


def job_view(state: JobState, job: Job, waiting_for: str | None = None) -> p.JobInfo:
    """``job`` as a client sees it; ``waiting_for`` says what limit holds it."""
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
        max_attempts=state.max_attempts(job),
        priority=job.priority,
        created_at=job.created_at,
        next_run_at=job.next_run_at,
        started_at=job.tries[0].started_at if job.tries else None,
        ended_at=job.ended_at if job.status in TERMINAL else (last.ended_at if last else None),
        error=error,
        tries=tries,
        timeout=state.timeout(job),
        unique_key=job.unique_key,
        progress=job.progress,
        progress_note=job.progress_note,
        enqueued_at=job.created_at,
        reserved_by=job.worker if job.reserved else None,
        reason=expiring.reason_of(job),
        limit_key=job.limit_key,
        waiting_for=waiting_for,
        expires_at=expiring.deadline(job),
        headers=job.headers,
    )


def flow_info(state: JobState, flow: FlowCreated) -> p.FlowInfo:
    """A flow's status and its members' (those expired included: the flow
    keeps how they ended), and its callback's once made."""
    status, failed_step = flows.status_of(state, flow)
    ids = [step.id for step in flow.steps]
    members = flows.members_of(state, flow)
    statuses = {i: s for i, (s, _) in zip(ids, members, strict=True) if s is not None}
    callback = flow.callback.id if flow.callback is not None else None
    if callback is not None and callback in state.jobs:
        statuses[callback] = state.jobs[callback].status
    return p.FlowInfo(
        flow.id, flow.kind, status, ids, statuses, flow.created_at, failed_step, callback
    )


def flow_result(state: JobState, req: int, flow: FlowCreated) -> p.ResultReply:
    """A chain's result is its last step's; a group's, the list of its
    jobs' results in order (kept by the flow when a job expired first). A
    failure carries the failed job's error."""
    status, failed_step = flows.status_of(state, flow)
    members = flows.members_of(state, flow)
    if status == "succeeded":
        last = members[-1][1]
        result = (
            flows.results_of(members)
            if flow.kind == "group"
            else (last if last is not None else NIL)
        )
        return p.ResultReply(req, flow.id, status, result)
    error = None
    if failed_step is not None:
        step_id = flow.steps[failed_step].id
        what = f"{'step' if flow.kind == 'chain' else 'member'} {failed_step} ({step_id})"
        failed = state.jobs.get(step_id)
        if failed is not None and failed.error is not None:
            error = p.ErrorInfo(
                failed.error.type, f"{what}: {failed.error.message}", failed.error.traceback
            )
        else:
            error = p.ErrorInfo("Failed", f"{what} {status}; its details expired")
    return p.ResultReply(req, flow.id, status, NIL, error)


def list_jobs(
    state: JobState,
    queue: str | None = None,
    status: str | None = None,
    task: str | None = None,
    limit: int = 100,
    cursor: str | None = None,
    *,
    newest: bool = False,
) -> tuple[list[Job], str | None]:
    """Jobs in creation order (``newest``: newest first) after ``cursor``,
    filtered; and the cursor for the next page (None at the end). A cursor
    is the creation number of the last job of a page, so it stays valid if
    that job is deleted. Finding the page's start is O(log n)
    (:class:`~corral.broker.seqindex.SeqIndex`); an unfiltered page of k jobs
    costs O(k), a filtered one the jobs it passes over (a cold batch the
    filter cannot take is passed over unwarmed). Raises InvalidJob
    for a cursor this broker did not give out."""
    limit = max(1, limit)
    try:
        mark = int(cursor) if cursor else None
    except ValueError:
        raise InvalidJob(f"cursor: {cursor!r} is not a cursor this broker gave out") from None
    found: list[Job] = []
    cold = state.jobs.cold

    def passed(number: int) -> bool:  # a cold batch none of whose jobs the filter takes
        batch = cold.batches.get(number) if cold is not None else None
        return batch is not None and (
            (status is not None and status != "queued")
            or (queue is not None and batch.queue != queue)
            or (task is not None and batch.task != task)
        )

    index = state.index
    if newest:
        walk = index.before(mark, passed)
    else:
        walk = index.after(-1 if mark is None else mark, passed)
    for job in walk:
        if (queue and job.queue != queue) or (status and job.status != status):
            continue
        if task and job.task != task:
            continue
        if len(found) == limit:
            return found, str(found[-1].seq)
        found.append(job)
    return found, None


def queue_latency(state: JobState, now: float) -> dict[str, float]:
    """Per queue with ready jobs, the seconds its oldest ready job has waited
    (epoch ``now`` less its creation time, as far as the fronts of its task
    queues tell: see ReadyQueues.oldest). O(queues x tasks)."""
    ready = state.ready
    latency: dict[str, float] = {}
    for queue, task in ready.pairs():
        oldest = ready.oldest(queue, task)
        if oldest is not None:
            latency[queue] = max(latency.get(queue, 0.0), round(now - oldest, 3))
    return latency


def task_counts(state: JobState) -> Counter[tuple[str, str]]:
    """Jobs per (task, status)."""
    out: Counter[tuple[str, str]] = Counter()
    for (_, task, status), n in state.counts.items():
        out[task, status] += n
    return out


def ready_per_task(state: JobState) -> dict[str, int]:
    """Ready jobs (queued, not reserved by a worker) per task."""
    out: Counter[str] = Counter()
    for (queue, task, status), n in state.counts.items():
        if status == "queued":
            out[task] += n - state.reserved.get((queue, task), 0)
    return dict(out)


def per_task(state: JobState) -> dict[str, dict[str, int]]:
    """Counts per task and status (from the counts the state keeps: O(queues x tasks))."""
    out: dict[str, dict[str, int]] = {}
    for (task, status), n in sorted(task_counts(state).items()):
        out.setdefault(task, {})[status] = n
    return out


def queue_counts(state: JobState) -> dict[str, dict[str, int]]:
    """Counts per queue and status, every status present (zeros included)."""
    out: dict[str, dict[str, int]] = {}
    for (queue, _, status), n in state.counts.items():
        if n:
            by_status = out.setdefault(queue, dict.fromkeys(STATUSES, 0))
            by_status[status] += n
    return out


def unroutable(state: JobState, workers: list[WorkerConn]) -> list[p.UnroutableInfo]:
    """Ready jobs no connected worker takes, by queue and task (paused
    queues aside: those wait for a resume, not for a worker). ``since`` is
    the creation time of the longest-waiting ready job at the front of its
    queue (see :meth:`ReadyQueues.oldest`). O(queues x tasks)."""
    out = []
    for (queue, task, status), n in sorted(state.counts.items()):
        if status != "queued" or queue in state.paused:
            continue
        ready = n - state.reserved.get((queue, task), 0)
        if ready <= 0 or any(balance.serves(c, queue, task) for c in workers):
            continue
        since = state.ready.oldest(queue, task)
        out.append(p.UnroutableInfo(queue, task, ready, since if since is not None else 0.0))
    return out


def worker_infos(workers: list[WorkerConn], mono: float) -> list[p.WorkerInfo]:
    """The connected workers as ``corral status`` shows them: running jobs
    (started) and reserved ones (in the buffer) apart."""
    return [
        p.WorkerInfo(
            c.worker_id,
            c.host,
            c.pid,
            c.queues,
            c.concurrency,
            c.credit,
            [j for j in c.leases if j in c.started],
            c.tasks,
            round(mono - c.last_seen, 3),
            c.processed,
            c.failed,
            [j for j in c.leases if j not in c.started],
        )
        for c in workers
    ]
