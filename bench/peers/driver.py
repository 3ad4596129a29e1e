"""The client side of one peer, run in the peers' venv by bench/peers/run.py.

``python driver.py MODULE`` imports ``MODULE`` (``task_rq``, ``task_huey``,
...), makes its ``Adapter`` and answers commands, one JSON object a line on
stdin, with one JSON object a line on stdout (``{"error": "..."}`` when a
command failed). The adapter's methods are the peer's own calls:
``enqueue(x)``, ``enqueue_bulk(xs)``, ``call(x, timeout) -> int`` (enqueue,
then wait for the result with the peer's result API), ``done() -> int``
(jobs finished, read from the peer's own state in Redis) and ``flush()``;
they may be coroutines (arq), and then an optional ``start()`` runs first.

Commands (times in seconds, rates in jobs/s):

* ``{"op": "enqueue_one", "n": N, "warmup": W}``: ``enqueue`` in a loop;
  rate, p50 and p99 of one call in µs.
* ``{"op": "enqueue_bulk", "n": N, "batch": B}``: ``enqueue_bulk`` of B at a
  time; rate and ms per batch.
* ``{"op": "fill", "n": N, "batch": B}``: enqueue N in batches, untimed.
* ``{"op": "wait_done", "n": N, "timeout": T, "poll": P}``: poll ``done()``
  every P s until it reaches N, or T s passed (then ``timed_out`` is 1 and
  ``done`` says how many); ``first_at`` and ``done_at`` are
  ``time.monotonic()`` readings (system-wide on Linux, so the caller can
  compare them with its own).
* ``{"op": "latency", "n": N, "warmup": W}``: ``call`` in a loop; p50, p99,
  mean and max in ms.
* ``{"op": "flush"}``: empty Redis (every database).
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import statistics
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

Figures = dict[str, float]
#: The first round trips wait for the workers to start and import.
WARMUP_TIMEOUT = 60.0
CALL_TIMEOUT = 10.0


def quantile(sorted_values: list[float], q: float) -> float:
    """The q-quantile (0..1) of already sorted values, nearest rank."""
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


class Driver:
    """Runs the commands against one adapter, awaiting its methods when they
    are coroutines."""

    def __init__(self, adapter: Any) -> None:
        self.adapter = adapter

    async def _do(self, method: Callable[..., Any], *args: Any) -> Any:
        result = method(*args)
        if inspect.isawaitable(result):
            return await result
        return result

    async def _timed(self, method: Callable[..., Any], args: list[tuple[Any, ...]]) -> list[float]:
        """Each call's duration, in order (the sync and async loops are apart so
        that a sync peer pays nothing for the other's await)."""
        times: list[float] = []
        clock = time.perf_counter
        if inspect.iscoroutinefunction(method):
            coro: Callable[..., Awaitable[Any]] = method
            for a in args:
                t0 = clock()
                await coro(*a)
                times.append(clock() - t0)
        else:
            for a in args:
                t0 = clock()
                method(*a)
                times.append(clock() - t0)
        return times

    async def enqueue_one(self, n: int, warmup: int) -> Figures:
        await self._timed(self.adapter.enqueue, [(i % 100,) for i in range(warmup)])
        started = time.perf_counter()
        times = await self._timed(self.adapter.enqueue, [(i % 100,) for i in range(n)])
        elapsed = time.perf_counter() - started
        times.sort()
        return {
            "rate": n / elapsed,
            "p50_us": quantile(times, 0.5) * 1e6,
            "p99_us": quantile(times, 0.99) * 1e6,
        }

    async def enqueue_bulk(self, n: int, batch: int) -> Figures:
        xs = [i % 100 for i in range(batch)]
        await self._do(self.adapter.enqueue_bulk, xs)  # warm up
        rounds = max(1, n // batch)
        times = await self._timed(self.adapter.enqueue_bulk, [(xs,)] * rounds)
        elapsed = sum(times)
        return {"rate": rounds * batch / elapsed, "batch_ms": elapsed / rounds * 1e3}

    async def fill(self, n: int, batch: int) -> Figures:
        left = n
        while left > 0:
            await self._do(self.adapter.enqueue_bulk, [i % 100 for i in range(min(batch, left))])
            left -= batch
        return {"done": float(await self._do(self.adapter.done))}

    async def wait_done(self, n: int, timeout: float, poll: float) -> Figures:
        deadline = time.monotonic() + timeout
        first_at = float("nan")
        next_poll = time.monotonic()
        while True:
            done = int(await self._do(self.adapter.done))
            now = time.monotonic()
            if done > 0 and first_at != first_at:  # NaN: not yet
                first_at = now
            if done >= n:
                return {"first_at": first_at, "done_at": now, "done": float(done)}
            if now > deadline:  # the rate so far is still a rate: the caller flags it
                return {"first_at": first_at, "done_at": now, "done": float(done), "timed_out": 1.0}
            next_poll += poll
            await asyncio.sleep(max(0.0, next_poll - time.monotonic()))

    async def latency(self, n: int, warmup: int) -> Figures:
        call = self.adapter.call
        for i in range(warmup):
            value = await self._do(call, i % 100, WARMUP_TIMEOUT if i == 0 else CALL_TIMEOUT)
            if value != i % 100:
                raise RuntimeError(f"the task returned {value!r} for {i % 100}")
        times = await self._timed(call, [(i % 100, CALL_TIMEOUT) for i in range(n)])
        times.sort()
        return {
            "p50_ms": quantile(times, 0.5) * 1e3,
            "p99_ms": quantile(times, 0.99) * 1e3,
            "mean_ms": statistics.fmean(times) * 1e3,
            "max_ms": times[-1] * 1e3,
        }

    async def flush(self) -> Figures:
        await self._do(self.adapter.flush)
        return {}

    async def handle(self, command: dict[str, Any]) -> Figures:
        op = command.get("op")
        args = {k: v for k, v in command.items() if k != "op"}
        ops: dict[str, Callable[..., Awaitable[Figures]]] = {
            "enqueue_one": self.enqueue_one,
            "enqueue_bulk": self.enqueue_bulk,
            "fill": self.fill,
            "wait_done": self.wait_done,
            "latency": self.latency,
            "flush": self.flush,
        }
        if op not in ops:
            raise ValueError(f"unknown op {op!r}; one of {sorted(ops)}")
        return await ops[op](**args)


async def serve(module: str) -> None:
    """Answer commands from stdin until it closes."""
    adapter = importlib.import_module(module).Adapter()
    if hasattr(adapter, "start"):
        await adapter.start()
    driver = Driver(adapter)
    loop = asyncio.get_running_loop()
    print(json.dumps({"ready": module}), flush=True)
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        try:
            reply: dict[str, Any] = await driver.handle(json.loads(line))
        except Exception as exc:  # reported to run.py, which stops the run
            reply = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1]))
