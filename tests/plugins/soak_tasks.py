"""Tasks the soak tests run: every execution leaves a line in a file.

The line is ``job_id attempt pid token`` (tests/faults/history.py reads it),
written with one ``write`` on an ``O_APPEND`` descriptor before the handler
does anything else, so a run cut short by a kill is recorded too and
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
    line = f"{ctx.job_id} {ctx.attempt} {os.getpid()} {rec.token}\n".encode()
    fd = os.open(rec.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    if rec.seconds > 0:
        time.sleep(rec.seconds)
    return ctx.attempt


@corral.task(name="soak.progress")
def progress(ctx: corral.JobContext, n: int) -> int:
    """Reports progress half way, then ends."""
    ctx.progress(0.5, f"half of {n}")
    return n
