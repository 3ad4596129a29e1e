"""The status pipe from a worker process to its supervisor.

One line per event, each written with a single ``write`` (atomic below
PIPE_BUF), so handler threads and the socket thread may all write:

    H                      the worker's loop is alive (every heartbeat)
    S <job_id> <timeout>   a handler started a job (timeout 0: none)
    E <job_id>             a handler ended a job
    R <reason>             the worker is retiring (max_jobs): start its replacement

The supervisor uses it to kill a job past its hard timeout or a worker whose
loop stopped, and to start a replacement before a recycled worker leaves.
Nothing here is needed for correctness: the broker's leases are.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass


class StatusWriter:
    """The worker's end; every method is a no-op without a pipe."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd
        if fd is not None:
            os.set_blocking(fd, False)

    def _write(self, line: str) -> None:
        if self.fd is None:
            return
        # If the supervisor is busy or gone the line is dropped: the broker's
        # leases, not this pipe, are what correctness rests on.
        with contextlib.suppress(OSError):
            os.write(self.fd, line.encode())

    def beat(self) -> None:
        self._write("H\n")

    def started(self, job_id: str, timeout: float | None) -> None:
        self._write(f"S {job_id} {timeout or 0}\n")

    def ended(self, job_id: str) -> None:
        self._write(f"E {job_id}\n")

    def retiring(self, reason: str) -> None:
        self._write(f"R {reason}\n")


@dataclass
class StatusEvent:
    kind: str
    job_id: str = ""
    timeout: float = 0.0
    reason: str = ""


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
    parts = line.split(" ")
    kind = parts[0]
    if kind == "H":
        return StatusEvent("H")
    if kind == "S" and len(parts) == 3:
        try:
            return StatusEvent("S", parts[1], float(parts[2]))
        except ValueError:
            return None
    if kind == "E" and len(parts) == 2:
        return StatusEvent("E", parts[1])
    if kind == "R":
        return StatusEvent("R", reason=" ".join(parts[1:]))
    return None
