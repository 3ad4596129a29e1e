"""Tasks with concurrency and rate limits, for the end-to-end tests of the
limits (tests/test_limits_dispatch.py, tests/test_expires.py): each records when it ran."""

from __future__ import annotations

import os
import time
from pathlib import Path

import msgspec

import corral


class Span(msgspec.Struct):
    """Where to record the run (a directory), how long to run (seconds),
    and a file to wait for before ending, if any."""

    dir: str
    seconds: float = 0.0
    gate: str | None = None


def record(ctx: corral.JobContext, span: Span) -> None:
    """Run for ``span.seconds`` (and until ``span.gate`` exists), then
    write ``<job id>.<attempt>`` in ``span.dir``: the start and end (epoch
    seconds) and the pid."""
    start = time.time()
    time.sleep(span.seconds)
    while span.gate is not None and not os.path.exists(span.gate):
        time.sleep(0.02)
    end = time.time()
    path = Path(span.dir) / f"{ctx.job_id}.{ctx.attempt}"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{start} {end} {os.getpid()}")
    tmp.rename(path)


@corral.task(name="limits.pair", concurrency=2)
def pair(ctx: corral.JobContext, span: Span) -> None:
    record(ctx, span)


@corral.task(name="limits.single", concurrency=1)
def single(ctx: corral.JobContext, span: Span) -> None:
    record(ctx, span)


@corral.task(name="limits.paced", rate="3/2s")
def paced(ctx: corral.JobContext, span: Span) -> None:
    record(ctx, span)


@corral.task(name="limits.keyed", key_concurrency=1)
def keyed(ctx: corral.JobContext, span: Span) -> None:
    record(ctx, span)


@corral.task(name="limits.mark")
def mark(ctx: corral.JobContext, span: Span) -> None:
    record(ctx, span)


@corral.task(name="limits.sparse", rate="2/5m")
def sparse(ctx: corral.JobContext, span: Span) -> None:
    record(ctx, span)
