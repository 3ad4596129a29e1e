"""Tasks for tests/test_hooks.py."""

from __future__ import annotations

import corral


@corral.task(name="hooks.headers")
def headers(ctx: corral.JobContext) -> dict[str, str]:
    return ctx.headers


@corral.task(name="hooks.boom", max_attempts=2, retry_backoff=0.05)
def boom(ctx: corral.JobContext, text: str) -> None:
    raise ValueError(text)
