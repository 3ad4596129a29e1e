"""Tasks the end-to-end tests run in real worker processes."""

from __future__ import annotations

import os
import time

import msgspec

import corral


class Order(msgspec.Struct):
    item: str
    qty: int


@corral.task(name="e2e.square")
def square(ctx: corral.JobContext, n: int) -> int:
    return n * n


@corral.task(name="e2e.sleep")
def sleep(ctx: corral.JobContext, seconds: float) -> dict[str, object]:
    time.sleep(seconds)
    return {"pid": os.getpid(), "attempt": ctx.attempt}


@corral.task(name="e2e.spin")
def spin(ctx: corral.JobContext, seconds: float) -> int:
    """Pure-Python CPU work holding the GIL in a tight loop."""
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        n += 1
    return ctx.attempt


@corral.task(name="e2e.order")
def order(ctx: corral.JobContext, o: Order) -> str:
    return f"{o.qty}x{o.item}"


@corral.task(name="e2e.noop")
def noop(ctx: corral.JobContext, payload: object = None) -> None:
    return None


@corral.task(name="e2e.flaky", max_attempts=3, retry_backoff=0.05)
def flaky(ctx: corral.JobContext, succeed_on: int) -> int:
    if ctx.attempt < succeed_on:
        raise ValueError(f"attempt {ctx.attempt} fails")
    return ctx.attempt
