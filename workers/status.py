"""The status pipe from a worker process to its supervisor.

Each line is one write, under PIPE_BUF bytes, so lines from two threads
never interleave:

    J id=<hex> [<job_id>:<timeout> ...]
                                 the worker's socket identity (hex) and the jobs
                                 running now (timeout 0: none); also the sign of
                                 life, written at least every heartbeat (socket thread),
                                 whether or not the broker is connected
    S <job_id>:<timeout>         a job is about to start: written by the thread that
                                 runs it, before its handler, so a process that dies
                                 in the handler is charged to that job
    E <job_id>                   a job's handler returned: written by its thread, so
                                 the supervisor knows before the next handler (one
                                 that may hold the GIL and starve the socket thread)
    R <reason>                   the worker is retiring (max_jobs): start its replacement

``lock`` orders a J snapshot against S and E lines: a J written after an
S includes that job (unless it ended), one written after an E does not.

A J line is a snapshot, not an event, so a line lost to a full pipe costs
nothing: the next one says the same and more. The supervisor reads the
pipes on its own tick (not on every line) and uses them to kill a job past
its hard timeout or a worker whose loop stopped, and to start a replacement
before a recycled worker leaves. Correctness never rests on this pipe: the
broker's leases do.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field
from urllib.parse import quote, unquote


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
        with contextlib.suppress(OSError):  # a full pipe: the next snapshot covers it
            os.write(self.fd, line.encode())

    def running(self, jobs: dict[str, float | None], identity: bytes = b"") -> None:
        items = [f"id={identity.hex()}"] if identity else []
        items += [f"{_q(job_id)}:{timeout or 0}" for job_id, timeout in jobs.items()]
        self._write(f"J {' '.join(items)}\n")

    def started(self, job_id: str, timeout: float | None) -> None:
        self._write(f"S {_q(job_id)}:{timeout or 0}\n")

    def ended(self, job_id: str) -> None:
        self._write(f"E {_q(job_id)}\n")

    def retiring(self, reason: str) -> None:
        self._write(f"R {reason}\n")


def _q(job_id: str) -> str:
    """A job id as one word of a line: any id is allowed (spaces, newlines,
    colons...), so every character but letters, digits and ``_.-~`` is
    %-escaped."""
    return quote(job_id, safe="")


@dataclass
class StatusEvent:
    kind: str
    jobs: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    #: The worker's socket identity, hex ("" if it has none yet).
    identity: str = ""


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
    if kind == "J":
        jobs = {}
        identity = ""
        for item in rest.split():
            if item.startswith("id="):
                identity = item[3:]
                continue
            job_id, _, timeout = item.rpartition(":")
            try:
                jobs[unquote(job_id)] = float(timeout)
            except ValueError:
                return None  # a torn line: the next snapshot will do
        return StatusEvent("J", jobs, identity=identity)
    if kind == "S":
        job_id, _, timeout = rest.rpartition(":")
        try:
            return StatusEvent("S", {unquote(job_id): float(timeout)})
        except ValueError:
            return None
    if kind == "E":
        return StatusEvent("E", {unquote(rest): 0.0})
    if kind == "R":
        return StatusEvent("R", reason=rest)
    return None
