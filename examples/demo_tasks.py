"""Example tasks used by config/corral.toml (`make run`) and the README tour."""

from __future__ import annotations

import time

import msgspec

import corral


class Greeting(msgspec.Struct):
    name: str
    times: int = 1


@corral.task(name="demo.add")
def add(ctx: corral.JobContext, numbers: list[int]) -> int:
    """Sum a list of integers."""
    return sum(numbers)


@corral.task(name="demo.greet")
def greet(ctx: corral.JobContext, greeting: Greeting) -> str:
    """A typed payload: {"name": "Ada", "times": 2}; a wrong field fails the job."""
    ctx.log.info("greeting", name=greeting.name)
    return " ".join([f"hello {greeting.name}"] * greeting.times)


@corral.task(name="demo.sleep")
def sleep(ctx: corral.JobContext, seconds: float) -> float:
    """Sleep, then return how long it slept."""
    time.sleep(seconds)
    return seconds


@corral.task(name="demo.fail", max_attempts=3, retry_backoff=0.5)
def fail(ctx: corral.JobContext, message: str) -> None:
    """Always raises: shows retries, tries and the failed list."""
    raise RuntimeError(message)


@corral.task(name="demo.noop")
def noop(ctx: corral.JobContext, payload: object = None) -> None:
    """Does nothing: for throughput measurements."""
    return None
