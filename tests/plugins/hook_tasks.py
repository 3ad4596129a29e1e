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
