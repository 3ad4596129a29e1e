"""The ready queues: the jobs that can be handed out now, by queue and task.

One :class:`TaskQueue` per (queue, task), so a worker is offered only the
tasks it registered (routing by task) without scanning past the others.
Order: higher priority first, then creation order (``seq``); across a
queue's tasks the same order holds.

Most jobs become ready in creation order (they are created queued, and
``seq`` only grows), so a task queue keeps them in a *lane* per priority: a
deque of the jobs themselves, appended at the tail and taken from the head,
8 bytes and O(1) a job. A job that becomes ready out of order (promoted
from scheduled, retried, handed back, requeued) goes to the task queue's
heap of ``(-priority, seq, job id)`` entries instead, as does a priority
beyond the first :data:`MAX_LANES`. Entries are removed lazily: a job that
left the ready state (leased, cancelled, removed, or replaced by a newer job
of the same id) leaves an entry that is skipped when it reaches the front;
when such entries outnumber the live ones a task queue is swept. A task
queue, and a queue, with no entries left is dropped, so queues used once
cost nothing. Pure data: the job state places jobs here, dispatch takes them.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Collection
from typing import Any

from corral.broker.coldjobs import ColdRun
from corral.broker.job import Job

Entry = tuple[int, int, str]
#: Lanes per task queue; further priorities go to its heap.
MAX_LANES = 8
#: A task queue is swept when it holds more stale entries than this and
#: than live ones.
SWEEP_AFTER = 1024


class TaskQueue:
    """The ready jobs of one (queue, task): lanes by priority and a heap."""

    __slots__ = ("_get", "_owner", "heap", "lanes", "stale")

    def __init__(self, jobs: dict[str, Job], owner: ReadyQueues) -> None:
        #: The table's own lookup: a job on a lane is never a cold one.
        self._get: Callable[[str], Job | None] = dict.get.__get__(jobs)
        self._owner = owner
        #: priority -> jobs in creation order.
        self.lanes: dict[int, deque[Job]] = {}
        self.heap: list[Entry] = []
        #: Entries known to be stale (see :meth:`ReadyQueues.left`).
        self.stale = 0

    def __len__(self) -> int:
        """Entries held, stale ones included."""
        return len(self.heap) + sum(len(lane) for lane in self.lanes.values())

    @property
    def empty(self) -> bool:
        """No entry held, stale or live."""
        return not self.heap and not any(self.lanes.values())

    def push(self, job: Job) -> None:
        priority = job.priority
        lane = self.lanes.get(priority)
        if lane is None:
            if len(self.lanes) < MAX_LANES:
                self.lanes[priority] = deque((job,))
                return
        elif not lane or lane[-1].seq < job.seq:
            lane.append(job)
            return
        heapq.heappush(self.heap, (-priority, job.seq, job.id))

    def extend(self, priority: int, jobs: list[Job]) -> None:
        """Append ``jobs`` (of one priority, in creation order, all newer than
        any held) to their lane."""
        lane = self.lanes.get(priority)
        if lane is None and len(self.lanes) < MAX_LANES:
            self.lanes[priority] = deque(jobs)
        elif lane is not None and (not lane or lane[-1].seq < jobs[0].seq):
            lane.extend(jobs)
        else:
            for job in jobs:
                self.push(job)

    def top(self) -> tuple[int, int, Job, deque[Job] | None] | None:
        """``(-priority, seq, job, lane)`` of the first live job (lane None:
        it is the heap's), stale entries in front dropped."""
        best: tuple[int, int, Job, deque[Job] | None] | None = None
        for priority in sorted(self.lanes, reverse=True):
            lane = self.lanes[priority]
            job = self.lane_front(lane)
            if job is None:
                del self.lanes[priority]
                continue
            best = (-priority, job.seq, job, lane)
            break
        job = self.heap_front()
        if job is not None:
            key = (-job.priority, job.seq)
            if best is None or key < best[:2]:
                best = (key[0], key[1], job, None)
        return best

    def take(self, lane: deque[Job] | None) -> None:
        """Remove the front entry :meth:`top` returned."""
        if lane is None:
            heapq.heappop(self.heap)
        else:
            lane.popleft()

    def lane_front(self, lane: deque[Job]) -> Job | None:
        """The first live job of ``lane``, stale entries in front dropped."""
        get = self._get
        while lane:
            front: Any = lane[0]
            if type(front) is ColdRun:  # a cold batch's run: its jobs take its place
                lane.popleft()
                lane.extendleft(reversed(self._owner.run_jobs(front)))
                continue
            job: Job = front
            current = get(job.id) is job
            if current and job.is_ready:
                return job
            lane.popleft()
            self._dropped(job, current)
        return None

    def heap_front(self) -> Job | None:
        """The first live job of the heap, stale entries in front dropped."""
        heap, get = self.heap, self._get
        while heap:
            _, seq, job_id = heap[0]
            job = get(job_id)
            current = job is not None and job.seq == seq
            if current and job is not None and job.is_ready:
                return job
            heapq.heappop(heap)
            if job is not None:
                self._dropped(job, current)
        return None

    def _dropped(self, job: Job, current: bool) -> None:
        if self.stale:
            self.stale -= 1
        if current:
            job.in_ready = False

    def sweep(self) -> None:
        """Drop every stale entry (O(entries))."""
        for priority, lane in list(self.lanes.items()):
            kept = []
            for job in lane:
                if type(job) is ColdRun or self._live(job):  # type: ignore[comparison-overlap]
                    kept.append(job)
                elif self._get(job.id) is job:
                    job.in_ready = False
            if kept:
                self.lanes[priority] = deque(kept)
            else:
                del self.lanes[priority]
        heap = []
        for entry in self.heap:
            held = self._get(entry[2])
            if held is not None and held.seq == entry[1]:
                if held.is_ready:
                    heap.append(entry)
                else:
                    held.in_ready = False
        heapq.heapify(heap)
        self.heap = heap
        self.stale = 0

    def _live(self, job: Job) -> bool:
        return self._get(job.id) is job and job.is_ready


class ReadyQueues:
    """See the module docstring. ``jobs`` is the job state's table (read only)."""

    def __init__(self, jobs: dict[str, Job]) -> None:
        self._jobs = jobs
        #: queue -> task -> its ready jobs.
        self._queues: dict[str, dict[str, TaskQueue]] = {}
        #: Warms a cold batch by its number (set by the job state).
        self.warm: Callable[[int], None] = _no_cold

    def add_cold(
        self,
        batch: int,
        queue: str,
        task: str,
        runs: list[tuple[int, int, int]],
        seqs: tuple[int, int, int],
    ) -> list[ColdRun]:
        """Place cold batch ``batch`` (jobs of ``queue`` and ``task`` in
        ``runs`` of one priority; ``seqs``: the first and last job's
        creation numbers and how many jobs) by one entry per run; returns
        the entries (see broker/coldjobs.py).

        A run's creation numbers are not in the index, only bounds of them:
        a batch of a compacted base may have gaps (jobs removed between
        its jobs were created), so the job at place ``i`` of ``count`` has a
        number from ``first + i`` to ``last - (count - 1 - i)`` (both exact
        when there is no gap: a batch the broker logged as it was
        enqueued). An entry's ``seq`` (what a later job's must be above to
        be appended behind it) is its run's upper bound, and a run is put
        behind a lane's last entry only if its lower bound is above that
        entry's ``seq``: a lane stays in creation order either way (gaps
        are numbers of removed jobs, which no job has again)."""
        first, last, count = seqs
        tq = self._task_queue_of(queue, task)
        entries = []
        for priority, start, end in runs:
            entry = ColdRun(batch, start, end, last - (count - end))
            entries.append(entry)
            lane = tq.lanes.get(priority)
            if lane is None and len(tq.lanes) < MAX_LANES:
                tq.lanes[priority] = deque((entry,))  # type: ignore[arg-type]
            elif lane is not None and (not lane or lane[-1].seq < first + start):
                lane.append(entry)  # type: ignore[arg-type]
            else:  # no lane for it (too many priorities): see place_unplaced
                entry.placed = False
        return entries

    def place_unplaced(self, queue: str, task: str, entries: list[ColdRun]) -> None:
        """Place the jobs of the entries :meth:`add_cold` found no lane for
        (their batch is warmed) one by one, as :meth:`TaskQueue.extend` does."""
        unplaced = [entry for entry in entries if not entry.placed]
        if not unplaced:
            return
        tq = self._task_queue_of(queue, task)
        for entry in unplaced:
            for job in self.run_jobs(entry):
                tq.push(job)

    def run_jobs(self, run: ColdRun) -> list[Job]:
        """The jobs of a cold batch's run, the batch warmed if it is not."""
        if run.jobs is None:
            self.warm(run.batch)
        return run.jobs or []

    def add(self, job: Job) -> None:
        """Make a ready job available (once: a job on its queue stays there)."""
        if not job.in_ready and job.is_ready:
            job.in_ready = True
            self._task_queue(job).push(job)

    def add_new(self, jobs: list[Job], runs: list[tuple[int, int, int]]) -> None:
        """Make pristine jobs available (ready and ``in_ready`` by
        definition), in creation order, all of one queue and task: each run
        of one priority (``runs``: ``(priority, start, end)`` index ranges of
        ``jobs``, see :func:`~corral.broker.job.priority_runs`) goes to its
        lane at once."""
        tq = self._task_queue(jobs[0])
        for priority, start, end in runs:
            tq.extend(priority, jobs[start:end] if end - start < len(jobs) else jobs)

    def _task_queue(self, job: Job) -> TaskQueue:
        return self._task_queue_of(job.queue, job.task)

    def _task_queue_of(self, queue: str, task: str) -> TaskQueue:
        by_task = self._queues.get(queue)
        if by_task is None:
            by_task = self._queues[queue] = {}
        tq = by_task.get(task)
        if tq is None:
            tq = by_task[task] = TaskQueue(self._jobs, self)
        return tq

    def left(self, job: Job) -> None:
        """``job`` left the ready state other than by :meth:`pop` (cancelled,
        removed): its entry is stale. Sweeps its task queue when stale
        entries outnumber live ones."""
        tq = self._queues.get(job.queue, {}).get(job.task)
        if tq is None:
            return
        tq.stale += 1
        if tq.stale > SWEEP_AFTER and 2 * tq.stale > len(tq):
            tq.sweep()
            self._drop_if_empty(job.queue, job.task)

    def pop(
        self, queue: str, tasks: Collection[str] | None = None, exclude: Collection[str] = ()
    ) -> Job | None:
        """The highest-priority, oldest ready job of ``queue`` (of one of
        ``tasks``, if given, and of none of ``exclude``: tasks held back by
        a limit, whose jobs stay in place), taken off its queue (the caller
        leases it or puts it back with :meth:`add`)."""
        found = self._best(queue, tasks, exclude)
        if found is None:
            return None
        tq, lane, job = found
        tq.take(lane)
        job.in_ready = False
        if tq.empty:
            self._drop_if_empty(queue, job.task)
        return job

    def peek(self, queue: str, tasks: Collection[str] | None = None) -> Job | None:
        """The job :meth:`pop` would return, left in place."""
        found = self._best(queue, tasks)
        return None if found is None else found[2]

    def has(self, queue: str) -> bool:
        return self._best(queue, None) is not None

    def _best(
        self, queue: str, tasks: Collection[str] | None, exclude: Collection[str] = ()
    ) -> tuple[TaskQueue, deque[Job] | None, Job] | None:
        by_task = self._queues.get(queue)
        if not by_task:
            return None
        best = None
        best_key: tuple[int, int] | None = None
        names = list(by_task) if tasks is None else [t for t in tasks if t in by_task]
        if exclude:
            names = [t for t in names if t not in exclude]
        for task in names:
            tq = by_task[task]
            top = tq.top()
            if top is None:
                self._drop_if_empty(queue, task)
                continue
            if best_key is None or top[:2] < best_key:
                best_key, best = top[:2], (tq, top[3], top[2])
        return best

    def _drop_if_empty(self, queue: str, task: str) -> None:
        by_task = self._queues.get(queue)
        if by_task is None:
            return
        tq = by_task.get(task)
        if tq is not None and tq.empty:
            del by_task[task]
        if not by_task:
            del self._queues[queue]

    def queued(self, queue: str) -> list[Job]:
        """Every ready job of ``queue`` (its cold batches warmed, no other),
        in no set order: O(entries of the queue)."""
        by_task = self._queues.get(queue)
        if not by_task:
            return []
        get: Callable[[str], Job | None] = dict.get.__get__(self._jobs)
        found: dict[str, Job] = {}
        for tq in by_task.values():
            for lane in tq.lanes.values():
                for entry in list(lane):
                    front: Any = entry
                    jobs = self.run_jobs(front) if type(front) is ColdRun else (entry,)
                    for job in jobs:
                        if get(job.id) is job and job.is_ready:
                            found[job.id] = job
            for _, seq, job_id in tq.heap:
                held = get(job_id)
                if held is not None and held.seq == seq and held.is_ready:
                    found[job_id] = held
        return list(found.values())

    def pairs(self) -> list[tuple[str, str]]:
        """The (queue, task) pairs that hold entries (maybe only stale)."""
        return [(q, t) for q, by_task in self._queues.items() for t in by_task]

    def top(self, queue: str, task: str) -> Job | None:
        """The next ready job of ``task`` on ``queue``, left in place."""
        tq = self._queues.get(queue, {}).get(task)
        if tq is None:
            return None
        top = tq.top()
        if top is None:
            self._drop_if_empty(queue, task)
            return None
        return top[2]

    def oldest(self, queue: str, task: str) -> float | None:
        """The creation time (epoch seconds) of the oldest job at the front
        of ``task``'s lanes and heap on ``queue``: the longest a ready job of
        it has waited, as far as the fronts tell (a lower-priority lane's
        front is its oldest job; the heap's front is its first by priority)."""
        tq = self._queues.get(queue, {}).get(task)
        if tq is None:
            return None
        fronts = [tq.lane_front(lane) for lane in list(tq.lanes.values())]
        fronts.append(tq.heap_front())
        times = [job.created_at for job in fronts if job is not None]
        return min(times) if times else None

    def __len__(self) -> int:
        """Task queues held (for tests of what is pruned)."""
        return sum(len(by_task) for by_task in self._queues.values())


def _no_cold(batch: int) -> None:
    raise LookupError(f"cold batch {batch} with no job state to warm it")
