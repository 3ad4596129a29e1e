"""The status pipe from a worker process to its supervisor.

Each line is one write, under PIPE_BUF bytes, so lines from two threads
never interleave:

    J id=<hex> [<job_id>:<timeout> ...] [h=<job_id>:<hook>:<timeout> ...]
                                 the worker's socket identity (hex), the jobs
                                 running now (timeout 0: none) and the hooks running
                                 now; also the sign of life, written at least every
                                 heartbeat (socket thread), whether or not the broker
                                 is connected
    S <job_id>:<timeout>         a job is about to start: written by the thread that
                                 runs it, before its handler, so a process that dies
                                 in the handler is charged to that job
    E <job_id>                   a job's handler returned: written by its thread, so
                                 the supervisor knows before the next handler (one
                                 that may hold the GIL and starve the socket thread)
    H <job_id>:<timeout> <hook>  a hook of yours (``Class.point``) is about to run for the
                                 job, bounded by the pool's hook_timeout: written by the
                                 thread that runs it, so a hook that never returns is
                                 known and its worker killed
    D <job_id>                   the job's hooks of one point have run
    R <reason>                   the worker is retiring (max_jobs): start its replacement
    X <reason>                   the worker cannot start (a plugin or hooks module that
                                 cannot be loaded, or the broker refused its READY),
                                 and exits (with :data:`EXIT_REFUSED` for the latter);
                                 or cannot go on (:data:`EXIT_BROKEN`,
                                 :data:`EXIT_REPORT_REFUSED`): then S lines after it
                                 name the jobs to charge for its exit

``lock`` orders a J snapshot against S, E, H and D lines: a J written
after an S includes that job (unless it ended), one written after an E
does not; the same for a hook and its H and D lines.

A J line is a snapshot, not an event, so a line lost to a full pipe costs
nothing: the next one says the same and more. The supervisor reads the
pipes on its own tick (not on every line) and uses them to kill a job past
its hard timeout, a worker whose hook is past its hook_timeout or whose
loop stopped, to start a replacement before a recycled worker leaves, and
to say why a worker could not start. Correctness never rests on this pipe: the
broker's leases do.
"""

from __future__ import annotations

import os
import re
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import quote, unquote

#: The exit code of a worker whose READY the broker refused (it could not
#: decode it: a bad task option, another protocol version): a configuration
#: fault that no restart mends (sysexits' EX_CONFIG). Its supervisor backs
#: the pool off at once, naming the reason (the X line).
EXIT_REFUSED = 78
#: The exit code of a worker the broker refused a message of after it
#: registered (a report, a return: sysexits' EX_PROTOCOL): the fates of the
#: jobs in it are lost, so the worker stops at once and names them, and the
#: broker charges each a try (see :meth:`~corral.workers.runtime.Worker.die`).
EXIT_REPORT_REFUSED = 76
#: The exit code of a worker one of whose own threads failed (the socket
#: thread, a handler thread: a bug, a report it cannot encode; sysexits'
#: EX_SOFTWARE): it stops at once, as for :data:`EXIT_REPORT_REFUSED`.
EXIT_BROKEN = 70
#: The longest a dying worker waits for its supervisor to read its last
#: words (see :meth:`StatusWriter.last_words`), in seconds.
LAST_WORDS_WAIT = 5.0


def farewell_wait(heartbeat_interval: float, heartbeat_liveness: int) -> float:
    """How long a leaving worker waits for the broker's Farewell, in
    seconds, once drained: three liveness windows, at least 10 s (a broker
    restarted meanwhile must be noticed, and connected to). Its supervisor,
    stopping, waits this beyond shutdown_timeout before it kills it."""
    return max(3 * heartbeat_interval * heartbeat_liveness, 10.0)


class StatusWriter:
    """The worker's end; every method is a no-op without a pipe."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd
        #: Held while taking a snapshot of the running jobs and writing it,
        #: and while adding a job and writing its S line.
        self.lock = threading.Lock()
        if fd is not None:
            os.set_blocking(fd, False)

    def _write(self, line: str) -> None:
        if self.fd is None:
            return
        # try/except rather than contextlib.suppress: two lines per job,
        # and the context manager cost more than the write itself
        try:  # noqa: SIM105
            os.write(self.fd, line.encode())
        except OSError:  # a full pipe: the next snapshot covers it
            pass

    def running(
        self,
        jobs: dict[str, float | None],
        identity: bytes = b"",
        hooks: dict[str, tuple[str, float]] | None = None,
    ) -> None:
        """The snapshot: ``jobs`` (id -> timeout) and ``hooks`` running (job
        id -> (hook, timeout)), with the socket ``identity``."""
        items = [f"id={identity.hex()}"] if identity else []
        items += [f"{_q(job_id)}:{timeout or 0}" for job_id, timeout in jobs.items()]
        items += [f"h={_q(job)}:{_q(hook)}:{t}" for job, (hook, t) in (hooks or {}).items()]
        self._write(f"J {' '.join(items)}\n")

    def started(self, job_id: str, timeout: float | None) -> None:
        self._write(f"S {_q(job_id)}:{timeout or 0}\n")

    def ended(self, job_id: str) -> None:
        self._write(f"E {_q(job_id)}\n")

    def hook_started(self, job_id: str, timeout: float, hook: str) -> None:
        self._write(f"H {_q(job_id)}:{timeout} {_q(hook)}\n")

    def hooks_done(self, job_id: str) -> None:
        self._write(f"D {_q(job_id)}\n")

    def retiring(self, reason: str) -> None:
        self._write(f"R {reason}\n")

    def last_words(self, jobs: dict[str, float | None], reason: str) -> None:
        """Why the worker exits now (an X line) and the jobs to charge for
        it (id -> timeout: an S line each, as if each had just started;
        thousands at a high rate, so never one snapshot line, which past
        PIPE_BUF could be torn or refused whole). Each line is written
        whole, waiting while the supervisor reads a full pipe, at most
        :data:`LAST_WORDS_WAIT` seconds in all."""
        if self.fd is None:
            return
        deadline = time.monotonic() + LAST_WORDS_WAIT
        lines = [f"X {_q(reason[:2000])}\n"]
        lines += [f"S {_q(job_id)}:{timeout or 0}\n" for job_id, timeout in jobs.items()]
        for line in lines:
            if not self._write_whole(line.encode(), deadline):
                return

    def _write_whole(self, data: bytes, deadline: float) -> bool:
        """Write one line (under PIPE_BUF: all of it or nothing), waiting
        for room until ``deadline`` (monotonic); False if it could not."""
        assert self.fd is not None
        while True:
            try:
                os.write(self.fd, data)
                return True
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return False
                select.select([], [self.fd], [], 0.05)
            except OSError:  # the supervisor is gone
                return False

    def cannot_start(self, reason: str) -> None:
        """Why the worker cannot start; it exits next (its supervisor reads
        the line as it reaps it)."""
        self._write(f"X {_q(reason[:2000])}\n")


class HookClock:
    """A worker's :class:`~corral.hooks.HookWatch`: the hooks running now
    (job id -> (hook, bound in seconds)), each call told on the status
    pipe with the bound ``timeout``, and listed in each snapshot."""

    def __init__(self, writer: StatusWriter, timeout: float) -> None:
        self.writer = writer
        self.timeout = timeout
        #: Read under ``writer.lock`` for a snapshot.
        self.running: dict[str, tuple[str, float]] = {}

    def hook_started(self, job_id: str, hook: str) -> None:
        with self.writer.lock:
            self.running[job_id] = (hook, self.timeout)
            self.writer.hook_started(job_id, self.timeout, hook)

    def hooks_done(self, job_id: str) -> None:
        with self.writer.lock:
            self.running.pop(job_id, None)
            self.writer.hooks_done(job_id)


#: A word ``quote(word, safe="")`` leaves as it is: ASCII letters, digits, ``_.-~``.
_PLAIN = re.compile(r"[A-Za-z0-9_.~-]+").fullmatch


def _q(job_id: str) -> str:
    """A job id as one word of a line: any id is allowed (spaces, newlines,
    colons...), so every character but letters, digits and ``_.-~`` is
    %-escaped. A plain id (the usual case, written twice per job) is
    returned as it is, without ``quote``'s work."""
    return job_id if _PLAIN(job_id) else quote(job_id, safe="")


@dataclass
class StatusEvent:
    kind: str
    jobs: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    #: The worker's socket identity, hex ("" if it has none yet).
    identity: str = ""
    #: Hooks running (H, J): job id -> (hook, timeout in seconds).
    hooks: dict[str, tuple[str, float]] = field(default_factory=dict)


class StatusReader:
    """The supervisor's end: turns bytes read from the pipe into events."""

    def __init__(self) -> None:
        self._partial = b""

    def feed(self, data: bytes) -> list[StatusEvent]:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        events = []
        for raw in lines:
            event = _parse(raw.decode(errors="replace"))
            if event is not None:
                events.append(event)
        return events


def _parse(line: str) -> StatusEvent | None:
    kind, _, rest = line.partition(" ")
    parse = _PARSERS.get(kind)
    if parse is None:
        return None
    try:
        return parse(rest)
    except ValueError:
        return None  # a torn line: the next snapshot will do


def _timed(rest: str) -> tuple[str, float]:
    """``<job_id>:<seconds>`` as (job id, seconds); ValueError if torn."""
    job_id, _, seconds = rest.rpartition(":")
    return unquote(job_id), float(seconds)


def _hook(rest: str) -> StatusEvent:
    started, _, hook = rest.partition(" ")
    job_id, timeout = _timed(started)
    return StatusEvent("H", hooks={job_id: (unquote(hook), timeout)})


def _snapshot(rest: str) -> StatusEvent:
    """A J line's event; ValueError if it is torn."""
    event = StatusEvent("J")
    for item in rest.split():
        if item.startswith("id="):
            event.identity = item[3:]
        elif item.startswith("h="):
            job_id, hook, timeout = item[2:].split(":")
            event.hooks[unquote(job_id)] = (unquote(hook), float(timeout))
        else:
            job_id, seconds = _timed(item)
            event.jobs[job_id] = seconds
    return event


_PARSERS: dict[str, Callable[[str], StatusEvent | None]] = {
    "J": _snapshot,
    "S": lambda rest: StatusEvent("S", dict([_timed(rest)])),
    "E": lambda rest: StatusEvent("E", {unquote(rest): 0.0}),
    "H": _hook,
    "D": lambda rest: StatusEvent("D", {unquote(rest): 0.0}),
    "R": lambda rest: StatusEvent("R", reason=rest),
    "X": lambda rest: StatusEvent("X", reason=unquote(rest)),
}
