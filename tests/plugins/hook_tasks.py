"""Tasks for tests/test_hooks.py."""

from __future__ import annotations

import corral


@corral.task(name="hooks.headers")
def headers(ctx: corral.JobContext) -> dict[str, str]:
    return ctx.headers


@corral.task(name="hooks.boom", max_attempts=2, retry_backoff=0.05)
def boom(ctx: corral.JobContext, text: str) -> None:
    raise ValueError(text)


@corral.task(name="hooks.quick", timeout=1, max_attempts=2)
def quick(ctx: corral.JobContext) -> int:
    """Returns at once; a slow hook (see recorder_hooks.slow_hooks) may not make it time out."""
    return ctx.attempt


@corral.task(name="hooks.hang_after")
def hang_after(ctx: corral.JobContext) -> int:
    """Returns at once; its after_job hook never does (see recorder_hooks.hang_hooks)."""
    return ctx.attempt


@corral.task(name="hooks.hang_before", max_attempts=3)
def hang_before(ctx: corral.JobContext) -> int:
    """Its first try's before_job hook never returns (see recorder_hooks.hang_hooks)."""
    return ctx.attempt
