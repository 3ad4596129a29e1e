"""Where ready jobs go, and which reserved jobs come back: the dispatch
policy, pure (no sockets, no log).

- **Fair dispatch.** Jobs go out one at a time, each to the worker with the
  most free execution slots (``concurrency`` minus the jobs it holds), then
  the most credit, then the one that got a job least recently; so four jobs
  and two idle single-slot workers run two at a time, not four in a row on
  one worker's prefetch buffer.
- **Stealing.** A worker with a free slot and nothing ready for it takes
  over jobs that wait in another worker's buffer behind running ones: the
  broker withdraws them there (they have not started) and they come back
  to the queue.
- **Priority.** A ready job waits only behind running jobs: when no worker
  of its queue has credit, the broker withdraws a reserved job of lower
  priority to make room, and the worker's buffer starts the higher one next.

A withdrawn job is the one that would start last on its worker (lowest
priority, latest lease). Jobs already being withdrawn are not asked twice.

**Limits.** A :class:`Gate` says which jobs may go: the jobs of a task at
its concurrency or rate limit (``blocked``) stay on their ready queue
untouched, skipped at the cost of a set lookup; a job the gate does not
admit when popped (its limit key is full, it expired) is the gate's to
keep. A rate-limited (``paced``) task's jobs go only to a worker with an
idle execution slot, so each starts as it arrives and the starts keep the
deliveries' spacing. No room is made for a job the gate holds back.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Iterable
from typing import Protocol

from corral.broker.state import Job, JobState
from corral.broker.workers import WorkerConn


class Gate(Protocol):
    """Which ready jobs may go out now (see the module docstring)."""

    @property
    def blocked(self) -> Collection[str]:
        """Tasks none of whose jobs may go now."""
        ...

    @property
    def paced(self) -> Collection[str]:
        """Tasks whose jobs go only to a worker with an idle execution slot."""
        ...

    def admit(self, job: Job) -> bool:
        """A popped job may go (its slot is taken from now); False: the
        gate keeps it (held back, or ended)."""
        ...

    def admits(self, job: Job) -> bool:
        """``job`` would be admitted now (nothing taken)."""
        ...


class OpenGate:
    """No limits: every job goes."""

    blocked: Collection[str] = frozenset()
    paced: Collection[str] = frozenset()

    def admit(self, job: Job) -> bool:
        return True

    def admits(self, job: Job) -> bool:
        return True


OPEN = OpenGate()


def serves(conn: WorkerConn, queue: str, task: str) -> bool:
    """The worker listens to ``queue`` and registered ``task`` (a worker
    that registered no tasks takes any)."""
    return queue in conn.queues and (not conn.tasks or task in conn.tasks)


def free_slots(conn: WorkerConn) -> int:
    """Execution slots the worker has with nothing held for them."""
    return conn.concurrency - len(conn.leases)


def plan_deliveries(
    workers: Iterable[WorkerConn], state: JobState, gate: Gate = OPEN
) -> dict[WorkerConn, list[Job]]:
    """Take ready jobs off their queues for the workers with credit, fairly,
    as ``gate`` admits them (see the module docstring). Returns the jobs per
    worker, each popped and admitted: the caller leases them or pushes them
    back (and gives the gate their slots back)."""
    heap: list[tuple[int, int, int, int, WorkerConn]] = []
    for n, conn in enumerate(workers):
        if conn.credit > 0:
            heap.append((-free_slots(conn), -conn.credit, conn.given, n, conn))
    heapq.heapify(heap)
    plan: dict[WorkerConn, list[Job]] = {}
    planned: set[str] = set()
    while heap:
        free, credit, given, n, conn = heapq.heappop(heap)
        job = _next_job(conn, state, gate, idle=free < 0)
        if job is None:
            continue  # nothing ready in its queues: done with this worker
        if job.id in planned:  # a second heap entry of a job given already
            heapq.heappush(heap, (free, credit, given, n, conn))
            continue
        planned.add(job.id)
        plan.setdefault(conn, []).append(job)
        if credit + 1 < 0:  # credit left
            heapq.heappush(heap, (free + 1, credit + 1, given, n, conn))
    return plan


def _next_job(conn: WorkerConn, state: JobState, gate: Gate, *, idle: bool) -> Job | None:
    """The next job for ``conn``: of its queues in their turn, and only of
    the tasks it registered (routing by task); never a job it still holds
    under an older lease (a handler past its timeout may still run it: the
    next attempt goes elsewhere, for its full timeout); only of a task the
    gate does not hold back (of no paced task unless the worker has an
    ``idle`` slot), and only a job it admits."""
    tasks = conn.tasks or None
    # the gate's own set while it is the whole exclusion (it follows the
    # limits as slots are taken), else a copy
    exclude = gate.blocked if idle or not gate.paced else {*gate.blocked, *gate.paced}
    found = None
    held: list[Job] = []
    for queue in conn.queue_order():
        if queue in state.paused:
            continue
        while (job := state.ready.pop(queue, tasks, exclude)) is not None:
            if job.id in conn.leases:
                held.append(job)
            elif gate.admit(job):
                break
            elif job.task in gate.blocked and job.task not in exclude:
                exclude = {*exclude, job.task}  # it reached a limit since the copy: skip it
        if job is not None:
            found = job
            break
    for job in held:  # back for the other workers
        state.push_back(job)
    return found


def unstarted(conn: WorkerConn, state: JobState, *, withdrawing: bool = False) -> list[Job]:
    """The worker's reserved jobs (not those being withdrawn, unless
    ``withdrawing``), in the order its buffer would start them (highest
    priority, then earliest lease)."""
    jobs = []
    for job_id, lease in conn.leases.items():
        job = state.jobs.get(job_id)
        if job is None or job_id in conn.started:
            continue
        if job_id in conn.withdrawing and not withdrawing:
            continue
        if job.lease == lease and job.reserved:
            jobs.append(job)
    jobs.sort(key=lambda j: (-j.priority, j.lease))
    return jobs


def may_withdraw(workers: Iterable[WorkerConn], state: JobState, floor: int | None) -> bool:
    """False only when :func:`plan_withdrawals` would take nothing back, so
    a dispatch can skip it (it sorts every worker's reserved jobs): no
    worker has both a free slot and credit (no idle worker to steal for),
    and no ready job outranks ``floor``, a lower bound of the priorities of
    the jobs the workers hold (None: they hold none), so no room is made
    for one. Stale ready entries in front are dropped, as a dispatch does."""
    if any(c.credit > 0 and free_slots(c) > 0 for c in workers):
        return True
    if floor is None:
        return False
    ready = state.ready
    for queue, task in ready.pairs():
        top = ready.top(queue, task)
        if top is not None and top.priority > floor:
            return True
    return False


def plan_withdrawals(
    workers: list[WorkerConn], state: JobState, gate: Gate = OPEN
) -> dict[WorkerConn, list[Job]]:
    """Reserved jobs to take back: for idle workers (stealing) and for
    ready jobs of higher priority that ``gate`` would let go (see the
    module docstring)."""
    plan: dict[WorkerConn, list[Job]] = {}
    _steal(workers, state, plan)
    _make_room(workers, state, plan, gate)
    return plan


def _steal(workers: list[WorkerConn], state: JobState, plan: dict[WorkerConn, list[Job]]) -> None:
    """One round at a time: nothing is stolen while a withdraw is in flight,
    so an idle worker is never promised more jobs than it has free slots."""
    if any(c.withdrawing for c in workers):
        return
    room = {c: free_slots(c) for c in workers if free_slots(c) > 0 and c.credit > 0}
    for victim in workers:
        waiting = unstarted(victim, state)
        # the first of them take the victim's slots not running a job: only
        # the rest wait behind running jobs
        surplus = waiting[max(0, victim.concurrency - len(victim.started)) :]
        while surplus and room:
            job = surplus[-1]
            thief = next(
                (
                    c
                    for c in room
                    if c is not victim and serves(c, job.queue, job.task) and job.id not in c.leases
                ),
                None,
            )
            if thief is None or job.queue in state.paused:
                break
            surplus.pop()
            plan.setdefault(victim, []).append(job)
            victim.withdrawing.add(job.id)
            room[thief] -= 1
            if not room[thief]:
                del room[thief]


def _make_room(
    workers: list[WorkerConn], state: JobState, plan: dict[WorkerConn, list[Job]], gate: Gate
) -> None:
    for queue, task in state.ready.pairs():
        if queue in state.paused:
            continue
        top = state.ready.top(queue, task)
        if top is None or task in gate.blocked or not gate.admits(top):
            continue  # held back by a limit: room made for it would stay empty
        serving = [c for c in workers if serves(c, queue, task)]
        if not serving or any(c.credit > 0 for c in serving):
            continue  # it goes out on the next dispatch
        if any(c.withdrawing for c in serving):
            continue  # room is being made already
        # the reserved job that would start last: lowest priority, latest lease
        candidates = [(w[-1], conn) for conn in serving if (w := unstarted(conn, state))]
        if not candidates:
            continue
        job, conn = min(candidates, key=lambda jc: (jc[0].priority, -jc[0].lease))
        if job.priority < top.priority:
            plan.setdefault(conn, []).append(job)
            conn.withdrawing.add(job.id)
