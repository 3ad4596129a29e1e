"""Concurrency and rate limits, enforced where jobs are handed out.

A task may declare (``@corral.task``) ``concurrency`` (at most N of its
jobs at once), ``rate`` (at most N starts per period, ``"100/m"``), and the
same per job ``limit_key`` (``key_concurrency``, ``key_rate``). The broker
alone hands jobs out, so it counts exactly, across every worker and host:

- **Running** is leased: a job counts from the moment dispatch gives it to
  a worker (its prefetch buffer included) until its lease ends (an outcome,
  a hand-back, a lost worker, a cancel, a timeout). The count is kept from
  the log's records (:meth:`Limiter.observe`), so every way a lease ends
  frees its slot; a task that gets limits (a worker registers them, after
  a restart too) counts the jobs leased already.
- **Rate** is an exact sliding window: a start (a delivery) is admitted
  only if fewer than N deliveries of the task (or key) happened in the
  last period. The windows live in memory; a restarted broker reads the
  starts of the period before it back from the job state the first time a
  task declares a rate (:mod:`corral.broker.recall`), so a restart lets no
  burst through.
- **Waiting, uncounted.** A job over a limit is never leased, so it costs
  no attempt and nothing churns. A task at its limit is *blocked*: its
  jobs stay on their ready queue, untouched, and dispatch skips the task
  (a set lookup per pass). A job whose key is at its limit is *parked*:
  taken off the ready queue once, kept aside by key in priority order, and
  put back when the key's slot frees or its rate window opens. A blocked
  task or key costs O(1) per dispatch pass, not O(its jobs).
- **Which limits.** Each connected worker registers its tasks' limits; the
  broker enforces the strictest any of them declared (the smallest
  concurrency, the slowest rate), so a rolling deploy that changes a limit
  never exceeds the old or the new one. Declarations that differ are
  logged. Jobs without a ``limit_key`` count only against the task's own
  limits.

Pure: no sockets, no log writes; time comes in as ``mono`` (monotonic
seconds), and with a declaration as ``now`` too (epoch seconds, to place
an earlier broker's starts). The dispatcher owns one :class:`Limiter` and is its
:class:`~corral.broker.balance.Gate` through :meth:`Limiter.admit`.
"""

from __future__ import annotations

import heapq
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence

import structlog

from corral.broker import protocol as p
from corral.broker.deadlines import Deadlines
from corral.broker.recall import recall
from corral.broker.records import (
    Cancelled,
    Finished,
    Leased,
    LeasedMany,
    Record,
    Removed,
    Returned,
    Started,
)
from corral.broker.state import Job, JobState
from corral.broker.tasklimits import NONE, Rate, TaskLimits, describe

log = structlog.get_logger()

#: A task's name, or (task, limit key).
ScopeKey = str | tuple[str, str]
#: The records that may start or end a lease (or end a parked job).
_LEASE_RECORDS = frozenset({Leased, Started, Finished, Returned, Cancelled, Removed})
#: Tasks remembered as having had their earlier starts recalled; past this
#: many the memory is cleared (a task recalled again counts an earlier
#: start twice: stricter for one period, never looser).
MAX_RECALLED = 10_000


class Scope:
    """The use of one task's or one key's limits: jobs leased, the start
    times in the rate window (monotonic, oldest first), and (a key's) the
    parked jobs as a heap of ``(-priority, seq, job id)``."""

    __slots__ = ("parked", "running", "starts")

    def __init__(self) -> None:
        self.running = 0
        self.starts: deque[float] = deque()
        self.parked: list[tuple[int, int, str]] = []

    def window(self, rate: Rate | None, mono: float) -> int:
        """Starts within the rate window ending at ``mono`` (older ones dropped)."""
        starts = self.starts
        if rate is None:
            starts.clear()
            return 0
        period = rate[1]
        # the same sum as the timer's due time, so a window is open at it
        while starts and starts[0] + period <= mono:
            starts.popleft()
        return len(starts)

    def room(self, concurrency: int | None, rate: Rate | None, mono: float) -> float:
        """How many more may start now (inf: no limit)."""
        room = float("inf")
        if concurrency is not None:
            room = concurrency - self.running
        if rate is not None:
            room = min(room, rate[0] - self.window(rate, mono))
        return room

    @property
    def idle(self) -> bool:
        return not self.running and not self.starts and not self.parked


class Limiter:
    """See the module docstring. ``state`` is the job state (read, and
    parked jobs are put back on its ready queues); ``leased`` gives the ids
    of the jobs leased now (held by a worker, or waiting for their holder
    after a restart)."""

    def __init__(self, state: JobState, leased: Callable[[], Iterable[str]]) -> None:
        self.state = state
        self._leased = leased
        #: task -> the limits enforced (only tasks that have some).
        self.limits: dict[str, TaskLimits] = {}
        #: task -> worker identity -> the limits it registered.
        self._declared: dict[str, dict[bytes, TaskLimits]] = {}
        self._by_worker: dict[bytes, list[str]] = {}
        #: Tasks at a task-level limit: none of their jobs may go now.
        self.blocked: set[str] = set()
        #: Tasks with a rate (or key rate).
        self.paced: set[str] = set()
        self.tasks: dict[str, Scope] = {}
        self.keys: dict[tuple[str, str], Scope] = {}
        #: task -> its limit keys that have a scope.
        self._task_keys: dict[str, set[str]] = {}
        #: job id -> (task, limit key) of every job of a limited task
        #: counted as running.
        self.held: dict[str, tuple[str, str | None]] = {}
        #: job id -> (task, limit key) of every parked job.
        self.parked: dict[str, tuple[str, str]] = {}
        self.parked_per_task: Counter[str] = Counter()
        #: When a full rate window opens again (monotonic), by scope.
        self.timers: Deadlines[ScopeKey, None] = Deadlines()
        #: Keys whose parked jobs may go again (a slot freed, a window opened).
        self._woken: set[tuple[str, str]] = set()
        #: job id -> (task, key) of jobs woken and not yet admitted: one
        #: that ends or goes first (a cancel) wakes the next of its key.
        self.waking: dict[str, tuple[str, str]] = {}
        #: The latest monotonic time seen (admissions, ticks).
        self.mono = 0.0
        #: When this broker started (epoch seconds; set after its replay):
        #: starts before it were an earlier broker's (see :meth:`_recall`).
        self.since: float | None = None
        #: Tasks whose earlier starts were recalled.
        self._recalled: set[str] = set()
        #: A slot freed or a window opened since the last dispatch: one is owed.
        self.changed = False

    # ---------------------------------------------------------- declaring

    def declare(
        self,
        identity: bytes,
        worker_id: str,
        tasks: Sequence[p.TaskInfo],
        now: float | None = None,
        mono: float | None = None,
    ) -> None:
        """The worker on ``identity`` registered ``tasks`` (replacing what it
        registered before), at ``now`` (epoch seconds) and ``mono``
        (monotonic). A limit that cannot be read is logged and ignored (the
        worker validates them before it sends them)."""
        mine: dict[str, TaskLimits] = {}
        for info in tasks:
            try:
                limits = TaskLimits.of(info)
            except ValueError as exc:
                log.warning(
                    "broker.task_limit_invalid",
                    worker=worker_id,
                    task=info.name,
                    error=str(exc),
                    hint="the task's rate is ignored; fix it in @corral.task",
                )
                continue
            if limits.any:
                mine[info.name] = limits
        touched = self._drop_worker(identity)
        for name, limits in mine.items():
            declared = self._declared.setdefault(name, {})
            others = {lim for ident, lim in declared.items() if ident != identity}
            if others and others != {limits}:
                log.warning(
                    "broker.task_limits_differ",
                    task=name,
                    worker=worker_id,
                    declared=describe(limits),
                    others=sorted(describe(o) for o in others),
                    hint="workers declare different limits for the task: the strictest of "
                    "each applies while they are connected",
                )
            declared[identity] = limits
        if mine:
            self._by_worker[identity] = list(mine)
        self._settle(touched | set(mine), now, mono)

    def forget(self, identity: bytes) -> None:
        """The worker on ``identity`` is gone: its declarations no longer count."""
        self._settle(self._drop_worker(identity))

    def _drop_worker(self, identity: bytes) -> set[str]:
        names = self._by_worker.pop(identity, [])
        for name in names:
            declared = self._declared.get(name)
            if declared is not None:
                declared.pop(identity, None)
                if not declared:
                    del self._declared[name]
        return set(names)

    def _settle(
        self, names: Iterable[str], now: float | None = None, mono: float | None = None
    ) -> None:
        """Recompute the limits of ``names``; where they changed, the
        task's held-back jobs get another look."""
        changed: list[tuple[str, TaskLimits | None, TaskLimits | None]] = []
        for name in names:
            declared = self._declared.get(name)
            limits = None
            for one in (declared or {}).values():
                limits = one if limits is None else limits.strictest(one)
            before = self.limits.get(name)
            if limits == before:
                continue
            if limits is None:
                del self.limits[name]
            else:
                self.limits[name] = limits
            changed.append((name, before, limits))
        if now is not None and mono is not None:
            self._recall([n for n, _, lim in changed if lim is not None and lim.paced], now, mono)
        for name, before, limits in changed:
            if before is None:
                self._count_leased(name)
            (self.paced.add if limits is not None and limits.paced else self.paced.discard)(name)
            self._woken.update((name, key) for key in self._task_keys.get(name, ()))
            self._check_task(name)
            self.changed = True

    # ----------------------------------------------------------- dispatch

    def admit(self, job: Job, mono: float) -> bool:
        """Dispatch popped ``job``: take its slots (it counts as running,
        and as a start, from now) and return True; or, over a key's limit,
        park it and return False. A job of a blocked task (it reached its
        limit within this pass) goes back to its queue: False."""
        task = job.task
        limits = self.limits.get(task)
        if limits is None:
            return True  # no limits: nothing counted
        self.mono = mono
        if task in self.blocked:
            self.state.push_back(job)
            return False
        self.waking.pop(job.id, None)
        key = job.limit_key if limits.keyed else None
        if key is not None:
            scope = self.keys.get((task, key))
            if scope is not None and scope.room(limits.key_concurrency, limits.key_rate, mono) < 1:
                self._park(job, task, key, scope, limits)
                return False
        self._count(job.id, task, job.limit_key)
        if limits.rate is not None:
            self._scope(task).starts.append(mono)
        if key is not None and limits.key_rate is not None:
            self._key_scope(task, key).starts.append(mono)
        self._check_task(task)
        return True

    def admits(self, job: Job) -> bool:
        """``job`` would be admitted now (nothing taken)."""
        if job.task in self.blocked:
            return False
        limits = self.limits.get(job.task)
        key = job.limit_key
        if limits is None or key is None or not limits.keyed:
            return True
        scope = self.keys.get((job.task, key))
        return scope is None or scope.room(limits.key_concurrency, limits.key_rate, self.mono) >= 1

    def unadmit(self, job: Job) -> None:
        """A job :meth:`admit` took a slot for was not sent: its slots come
        back (the caller puts it back on its queue)."""
        if job.id not in self.held:
            return
        self._release(job.id)
        limits = self.limits.get(job.task)
        if limits is None:
            return
        scope = self.tasks.get(job.task)
        if limits.rate is not None and scope is not None and scope.starts:
            scope.starts.pop()
        key = job.limit_key
        key_scope = self.keys.get((job.task, key)) if key is not None else None
        if limits.key_rate is not None and key_scope is not None and key_scope.starts:
            key_scope.starts.pop()
        self._check_task(job.task)

    def wake(self, mono: float) -> int:
        """Before a dispatch: put back on their ready queues the parked
        jobs of the keys that have room again, as many as each has; returns
        how many."""
        self.mono = mono
        self.changed = False
        woken, self._woken = self._woken, set()
        back = 0
        for task, key in woken:
            scope = self.keys.get((task, key))
            if scope is None:
                continue
            limits = self.limits.get(task, NONE)
            room = scope.room(limits.key_concurrency, limits.key_rate, self.mono)
            while scope.parked and room >= 1:
                _, seq, job_id = heapq.heappop(scope.parked)
                job = self._unpark(job_id)
                if job is None or job.seq != seq or not job.is_ready:
                    continue
                self.state.push_back(job)
                self.waking[job_id] = (task, key)
                back += 1
                room -= 1
            self._tidy_key(task, key, scope)
        return back

    # -------------------------------------------------------------- time

    def next_wakeup(self) -> float | None:
        """When (monotonic) the next full rate window opens, if any."""
        return self.timers.next_due()

    def tick(self, mono: float) -> bool:
        """Rate windows that opened by ``mono``: their tasks may go again,
        their keys' parked jobs are woken at the next dispatch. True if any
        did (a dispatch is owed)."""
        self.mono = mono
        due = []
        while (entry := self.timers.pop_due(mono)) is not None:
            due.append(entry[0])
        for scope_key in due:  # (a timer set again meanwhile waits for the next tick)
            if isinstance(scope_key, str):
                self._check_task(scope_key)
            else:
                scope = self.keys.get(scope_key)
                if scope is not None:
                    if scope.parked:
                        self._woken.add(scope_key)
                    self._tidy_key(*scope_key, scope)
        if due:
            self.changed = True
        return bool(due)

    # ------------------------------------------------------- bookkeeping

    def observe(self, record: Record, state: JobState) -> None:
        """A journal observer: after each record that may start or end a
        lease, the job counts as running exactly while it holds one; a
        parked job that ended or went is forgotten."""
        kind = type(record)
        if kind is LeasedMany:
            for job_id in record.ids:  # type: ignore[attr-defined]
                self._observe(job_id, Leased, state)
        elif kind in _LEASE_RECORDS:
            self._observe(record.id, kind, state)  # type: ignore[attr-defined]

    def _observe(self, job_id: str, kind: type[Record], state: JobState) -> None:
        held, parked = job_id in self.held, job_id in self.parked
        followed = held or parked or job_id in self.waking
        if not followed and (kind is not Leased or not self.limits):
            return  # the usual case: a job of a task without limits
        job = state.jobs.get(job_id)
        gone = job is None or not job.is_ready
        if parked and gone:
            self._unpark(job_id)
        if gone and job_id in self.waking:  # it will not take the slot it was woken for
            self._woken.add(self.waking.pop(job_id))
            self.changed = True
        leased = job is not None and job.lease != 0
        if held:
            if not leased:
                self._release(job_id)
        elif leased and job is not None and job.task in self.limits:
            self._count(job_id, job.task, job.limit_key)  # leased other than by admit

    def _recall(self, names: list[str], now: float, mono: float) -> None:
        """Put in the windows of the tasks ``names`` (just given a rate) the
        starts an earlier broker made of them, once per task (see
        :mod:`corral.broker.recall`); ``now`` and ``mono`` are this moment."""
        names = [n for n in names if n not in self._recalled]
        if self.since is None or not names:
            return
        if len(self._recalled) + len(names) > MAX_RECALLED:
            self._recalled.clear()
        self._recalled.update(names)
        limits = {name: self.limits[name] for name in names}
        # (only jobs that started count: never a cold one, so none is warmed)
        started = self.state.jobs.warm_values()
        per_task, per_key = recall(started, limits, self.since, now, mono)
        self.mono = mono
        for task, starts in per_task.items():  # all before any start made since
            self._scope(task).starts.extendleft(reversed(starts))
        for (task, key), starts in per_key.items():
            scope = self._key_scope(task, key)
            scope.starts.extendleft(reversed(starts))
            self._tidy_key(task, key, scope)
        if per_task or per_key:
            log.info(
                "broker.rate_windows_recalled",
                tasks=sorted(per_task),
                starts=sum(map(len, per_task.values())),
                keys=len(per_key),
            )

    def _count_leased(self, task: str) -> None:
        """``task`` just got limits: its jobs leased now count."""
        jobs = self.state.jobs
        for job_id in self._leased():
            job = jobs.get(job_id)
            if job is not None and job.lease and job.task == task and job_id not in self.held:
                self._count(job_id, task, job.limit_key)

    def _count(self, job_id: str, task: str, key: str | None) -> None:
        self.held[job_id] = (task, key)
        self._scope(task).running += 1
        if key is not None:
            self._key_scope(task, key).running += 1

    def _release(self, job_id: str) -> None:
        task, key = self.held.pop(job_id)
        scope = self.tasks.get(task)
        if scope is not None:
            scope.running -= 1
            if scope.idle and task not in self.limits:
                del self.tasks[task]
        if key is not None:
            key_scope = self.keys.get((task, key))
            if key_scope is not None:
                key_scope.running -= 1
                if key_scope.parked:
                    self._woken.add((task, key))
                    self.changed = True
                self._tidy_key(task, key, key_scope)
        if task in self.blocked:
            self._check_task(task)
            self.changed = self.changed or task not in self.blocked

    def _check_task(self, task: str) -> None:
        """Block or unblock ``task`` by its limits now; a task full by its
        rate gets a timer for when its window opens."""
        limits = self.limits.get(task)
        scope = self.tasks.get(task)
        if limits is None or scope is None:
            self.blocked.discard(task)
            return
        if scope.room(limits.concurrency, limits.rate, self.mono) >= 1:
            self.blocked.discard(task)
            return
        self.blocked.add(task)
        if limits.rate is not None and scope.window(limits.rate, self.mono) >= limits.rate[0]:
            self.timers.set(task, scope.starts[0] + limits.rate[1], None)

    def _park(self, job: Job, task: str, key: str, scope: Scope, limits: TaskLimits) -> None:
        heapq.heappush(scope.parked, (-job.priority, job.seq, job.id))
        self.parked[job.id] = (task, key)
        self.parked_per_task[task] += 1
        rate = limits.key_rate
        if rate is not None and scope.window(rate, self.mono) >= rate[0]:
            self.timers.set((task, key), scope.starts[0] + rate[1], None)

    def _unpark(self, job_id: str) -> Job | None:
        """Forget that ``job_id`` is parked (its heap entry, if any, goes
        stale); returns the job if it still exists."""
        entry = self.parked.pop(job_id, None)
        if entry is not None:
            left = self.parked_per_task[entry[0]] - 1
            if left:
                self.parked_per_task[entry[0]] = left
            else:
                del self.parked_per_task[entry[0]]
        return self.state.jobs.get(job_id)

    def _scope(self, task: str) -> Scope:
        scope = self.tasks.get(task)
        if scope is None:
            scope = self.tasks[task] = Scope()
        return scope

    def _key_scope(self, task: str, key: str) -> Scope:
        scope = self.keys.get((task, key))
        if scope is None:
            scope = self.keys[task, key] = Scope()
            self._task_keys.setdefault(task, set()).add(key)
        return scope

    def _tidy_key(self, task: str, key: str, scope: Scope) -> None:
        """Drop a key's scope once nothing of it is left (its parked heap
        may hold only stale entries: those are dropped with it)."""
        while scope.parked and scope.parked[0][2] not in self.parked:
            heapq.heappop(scope.parked)  # stale: it ended or went while parked
        if scope.running or scope.parked:
            return
        rate = self.limits.get(task, NONE).key_rate
        if scope.window(rate, self.mono) and rate is not None:
            # its starts still count: look again once the last has left the window
            self.timers.set((task, key), scope.starts[-1] + rate[1], None)
            return
        self.timers.discard((task, key))
        del self.keys[task, key]
        keys = self._task_keys.get(task)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._task_keys[task]

    # ------------------------------------------------------------- status

    def holding_back(self, job: Job) -> str | None:
        """What keeps ready ``job`` waiting, for ``corral job``: its key's
        limit (it is parked), its task's (the task is at its limit), or
        None."""
        limits = self.limits.get(job.task)
        if limits is None or not job.is_ready:
            return None
        parked = self.parked.get(job.id)
        if parked is not None:
            scope = self.keys.get(parked)
            full = _full(scope, limits.key_concurrency, limits.key_rate, self.mono, "key_")
            return f"limit key {parked[1]!r} at its {full}"
        if job.task in self.blocked:
            full = _full(self.tasks.get(job.task), limits.concurrency, limits.rate, self.mono)
            return f"task {job.task!r} at its {full}"
        return None

    def infos(self, ready: dict[str, int]) -> list[p.LimitInfo]:
        """Each limited task as ``corral status`` shows it; ``ready`` is
        the count of ready (queued, unreserved) jobs per task."""
        out = []
        for task, limits in sorted(self.limits.items()):
            scope = self.tasks.get(task) or Scope()
            waiting = self.parked_per_task.get(task, 0)
            if task in self.blocked:
                waiting += ready.get(task, 0)
            keys = self._task_keys.get(task, set())
            out.append(
                p.LimitInfo(
                    task,
                    limits.concurrency,
                    limits.rate_text,
                    limits.key_concurrency,
                    limits.key_rate_text,
                    scope.running,
                    waiting,
                    scope.window(limits.rate, self.mono) if limits.rate else 0,
                    len(keys),
                    sum(1 for k in keys if self.keys[task, k].parked),
                )
            )
        return out


def _full(
    scope: Scope | None, concurrency: int | None, rate: Rate | None, mono: float, prefix: str = ""
) -> str:
    """Which of a scope's limits is full: ``concurrency (2 running)`` or
    ``rate 3/2s (3 started in the window)``."""
    running = scope.running if scope is not None else 0
    if concurrency is not None and running >= concurrency:
        return f"{prefix}concurrency ({running} running)"
    if rate is not None:
        started = scope.window(rate, mono) if scope is not None else 0
        return f"{prefix}rate of {rate[0]} per {rate[1]:g}s ({started} started in the window)"
    return f"{prefix}limits"
