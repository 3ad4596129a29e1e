"""Tasks the fault tests run: every execution leaves lines in a file.

``soak.record`` appends ``start RUN JOB_ID ATTEMPT PID TOKEN T`` before the
handler does anything else and ``done RUN T`` when it returns (RUN is unique
per run, T is ``time.monotonic()``: one clock for every process of the host);
tests/faults/history.py reads them. Each line is one ``write`` on an
``O_APPEND`` descriptor, so a run cut short by a kill is recorded too and
concurrent writers from several processes never interleave.
"""

from __future__ import annotations

import os
import time

import msgspec

import corral


class Record(msgspec.Struct):
    path: str
    token: str
    seconds: float = 0.0


# Kills must not exhaust a job's attempts: the soak tests check that nothing
# is lost, not the retry policy; the backoff stays short so the end comes soon.
@corral.task(name="soak.record", max_attempts=10_000, retry_backoff=0.05, retry_backoff_max=0.5)
def record(ctx: corral.JobContext, rec: Record) -> int:
    run = os.urandom(6).hex()
    started = f"{ctx.job_id} {ctx.attempt} {os.getpid()} {rec.token} {time.monotonic()!r}"
    _append(rec.path, f"start {run} {started}")
    if rec.seconds > 0:
        time.sleep(rec.seconds)
    _append(rec.path, f"done {run} {time.monotonic()!r}")
    return ctx.attempt


def _append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


@corral.task(name="soak.progress")
def progress(ctx: corral.JobContext, n: int) -> int:
    """Reports progress half way, then ends."""
    ctx.progress(0.5, f"half of {n}")
    return n
