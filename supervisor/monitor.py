"""Watching worker processes: what their status pipes say, and the limits
that end them (hard timeout, a hook past its hook_timeout, a stopped loop)
or recycle them (memory, age, jobs). Decisions only; the supervisor acts
on them.

A hook that never returns holds the thread that runs it, and with it the
jobs the worker prefetched for that thread: nothing but the process's end
frees them (Python cannot stop a thread), so past the pool's hook_timeout
the worker is killed, like a job past its hard timeout.

A worker's sign of life is its status line, written at least every
heartbeat. A handler holding the GIL in one long C call stops that line
while the process works on: so a worker running a job whose CPU time keeps
growing is alive too (:func:`cpu_busy`), and the supervisor vouches for it
to the broker (:func:`vouched`). Only a job's hard timeout ends it then."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psutil

from corral.supervisor.process import Child
from corral.workers.status import StatusEvent, StatusReader

if TYPE_CHECKING:
    from corral.config.schema import PoolConfig

#: Extra time past a job's timeout (or a hook's hook_timeout) before its process is killed.
HARD_TIMEOUT_GRACE = 1.0
#: How often RSS is read.
RSS_INTERVAL = 1.0


@dataclass(frozen=True)
class Verdict:
    """``kill`` (SIGKILL now) or ``recycle`` (replace, then drain), and why."""

    action: str
    reason: str
    #: The jobs the verdict is for (a hard timeout): only these are charged
    #: for the kill; the process's other jobs go back uncounted.
    jobs: tuple[str, ...] = ()
    #: The hook past its hook_timeout (``Class.point``) and its job, if that
    #: is what the kill is for: only a job whose before_job hung (in ``jobs``)
    #: is charged; one whose end hook hung has its outcome already.
    hook: str = ""
    hook_job: str = ""
    hook_timeout: float = 0.0

    def charged(self) -> list[str] | None:
        """The jobs to charge for a kill: those it was for, or None when it
        was not for any one job (no sign of life: every job the process had
        started may be the cause, and each counts)."""
        return list(self.jobs) if self.jobs or self.hook else None


def read_status(child: Child, reader: StatusReader, now: float) -> str | None:
    """Apply what the child wrote to its status pipe. Returns the reason if
    the child announced that it is retiring."""
    if child.status_fd is None:
        return None
    retiring = None
    while True:
        try:
            data = os.read(child.status_fd, 65536)
        except BlockingIOError:
            break
        if not data:  # the child closed its end: it is exiting
            child.close_status()
            break
        for event in reader.feed(data):
            retiring = _apply(child, event, now) or retiring
    return retiring


def _apply(child: Child, event: StatusEvent, now: float) -> str | None:
    """One status line's news; the reason if the child is retiring."""
    if event.kind == "X":  # its last words: it exits without starting
        child.cannot_start = event.reason
        return None
    child.last_beat = now
    child.ready = True
    if event.kind == "S":
        child.jobs.update((job_id, (now, t)) for job_id, t in event.jobs.items())
    elif event.kind == "E":
        for job_id in event.jobs:
            child.jobs.pop(job_id, None)
    elif event.kind == "H":
        child.hooks.update((job, (now, t, hook)) for job, (hook, t) in event.hooks.items())
    elif event.kind == "D":
        for job_id in event.jobs:
            child.hooks.pop(job_id, None)
    elif event.kind == "J":
        if event.identity:
            child.identities.add(event.identity)
            child.identity = event.identity
        _snapshot(child, event.jobs, event.hooks, now)
    elif event.kind == "R":
        return event.reason or "retiring"
    return None


def _snapshot(
    child: Child, jobs: dict[str, float], hooks: dict[str, tuple[str, float]], now: float
) -> None:
    """A J line: the jobs and hooks running now. Each keeps the start time
    it was first seen at (a hook: the same hook of the same job)."""
    child.jobs = {
        job_id: (child.jobs.get(job_id, (now, 0.0))[0], timeout) for job_id, timeout in jobs.items()
    }
    seen = child.hooks
    child.hooks = {
        job_id: (
            seen[job_id][0] if job_id in seen and seen[job_id][2] == hook else now,
            timeout,
            hook,
        )
        for job_id, (hook, timeout) in hooks.items()
    }


def judge(child: Child, pool: PoolConfig, now: float, liveness_window: float) -> Verdict | None:
    """The limit a live worker is past, if any."""
    overdue = past_deadline(child, now)
    if overdue is not None:
        return overdue
    if not child.ready:  # still importing its plugins: its own deadline
        if now - child.started_at > pool.startup_timeout:
            return Verdict("kill", f"not started within startup_timeout {pool.startup_timeout:g}s")
        return None
    if not alive(child, now, liveness_window):
        return Verdict("kill", f"no sign of life for {now - child.last_beat:.1f}s")
    if child.retiring:
        return None
    if pool.max_age and now - child.started_at > pool.max_age:
        return Verdict("recycle", f"max_age {pool.max_age:g}s")
    if now - child.last_rss_check >= RSS_INTERVAL:
        child.last_rss_check = now
        rss = child.rss()
        if rss is not None:
            child.last_rss = rss
            if pool.max_memory and rss > pool.max_memory:
                return Verdict("recycle", f"max_memory: RSS {rss} > {pool.max_memory}")
    return None


def past_deadline(child: Child, now: float) -> Verdict | None:
    """A kill for the jobs past their hard timeout, else for a hook past
    its hook_timeout, if any."""
    late = [
        (job_id, timeout)
        for job_id, (started, timeout) in child.jobs.items()
        if timeout and now > started + timeout + HARD_TIMEOUT_GRACE
    ]
    if late:
        job_id, timeout = late[0]
        return Verdict(
            "kill",
            f"job {job_id} ran past its timeout of {timeout:g}s",
            tuple(j for j, _ in late),
        )
    hung = [
        (job_id, hook, timeout)
        for job_id, (started, timeout, hook) in child.hooks.items()
        if timeout and now > started + timeout + HARD_TIMEOUT_GRACE
    ]
    if hung:
        job_id, hook, timeout = hung[0]
        return Verdict(
            "kill",
            f"hook {hook} of job {job_id} ran past hook_timeout {timeout:g}s",
            tuple(j for j, _, _ in hung if j in child.jobs),  # a before_job: part of the try
            hook=hook,
            hook_job=job_id,
            hook_timeout=timeout,
        )
    return None


def alive(child: Child, now: float, liveness_window: float) -> bool:
    """A status line came within ``liveness_window`` seconds, or the child
    runs a job and its CPU time grew within that window. The CPU time is
    sampled on each look once the status line is half a window late; a
    first sample taken already past the window gets one more look."""
    late = now - child.last_beat
    if late <= liveness_window / 2:
        child.cpu = None  # the next quiet spell starts from a fresh sample
        return True
    if not child.jobs:
        return late <= liveness_window
    first = child.cpu is None
    if cpu_busy(child, now, liveness_window) or late <= liveness_window:
        return True
    return first and child.cpu is not None  # sampled for the first time: look again


def cpu_busy(child: Child, now: float, liveness_window: float) -> bool:
    """Sample ``child``'s CPU time: whether it grew within
    ``liveness_window`` seconds. ``child.cpu`` holds the last sample, in
    CPU seconds, and when it was last seen to grow (0.0: not yet)."""
    seconds = cpu_seconds(child.pid)
    if seconds is None:
        return False
    if child.cpu is None:  # the first sample: nothing to compare with yet
        child.cpu = (seconds, 0.0)
    elif seconds > child.cpu[0]:
        child.cpu = (seconds, now)
    return now - child.cpu[1] <= liveness_window


def vouched(child: Child, now: float, liveness_window: float) -> bool:
    """What the supervisor tells the broker: the child is alive by its
    status line or by a busy CPU (as last sampled; this takes no sample)."""
    if now - child.last_beat <= liveness_window:
        return True
    return bool(child.jobs) and child.cpu is not None and now - child.cpu[1] <= liveness_window


def cpu_seconds(pid: int | None) -> float | None:
    """User and system CPU time of process ``pid``, in seconds; None if it
    is gone."""
    if pid is None:
        return None
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return float(times.user + times.system)
