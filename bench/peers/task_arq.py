"""arq's side of bench/peers: the no-op coroutine and the client calls the
driver times (arq's client is asyncio only, so these are coroutines).

Imported by ``arq task_arq.WorkerSettings`` (two processes) and by
bench/peers/driver.py, both in the peers' venv; the Redis URL comes from
``PEERS_REDIS_URL``. arq polls (its worker reads the queue every
``poll_delay``, 0.5 s by default, and ``Job.result`` polls too): both are set
to a few ms here, so the figures show arq's work rather than its sleeps.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from arq import create_pool  # type: ignore[import-not-found]
from arq.connections import RedisSettings  # type: ignore[import-not-found]

SETTINGS = RedisSettings.from_dsn(os.environ["PEERS_REDIS_URL"])
WORKER_POLL_S = 0.005
RESULT_POLL_S = 0.001


async def noop(ctx: dict[str, Any], x: int) -> int:
    """The task: takes a small int and returns it."""
    return x


class WorkerSettings:
    """What ``arq task_arq.WorkerSettings`` runs."""

    functions = [noop]
    redis_settings = SETTINGS
    poll_delay = WORKER_POLL_S


class Adapter:
    """arq's own enqueue_job and Job.result; done = jobs gone from the queue."""

    def __init__(self) -> None:
        self.pool: Any = None
        self.sent = 0

    async def start(self) -> None:
        self.pool = await create_pool(SETTINGS)

    async def enqueue(self, x: int) -> None:
        await self.pool.enqueue_job("noop", x)
        self.sent += 1

    async def enqueue_bulk(self, xs: list[int]) -> None:
        # arq has no batch call: its way is many enqueue_job calls at once.
        await asyncio.gather(*(self.pool.enqueue_job("noop", x) for x in xs))
        self.sent += len(xs)

    async def call(self, x: int, timeout: float) -> int:
        job = await self.pool.enqueue_job("noop", x)
        self.sent += 1
        return int(await job.result(timeout=timeout, poll_delay=RESULT_POLL_S))

    async def done(self) -> int:
        # A job leaves the queue's sorted set when it finishes.
        return self.sent - int(await self.pool.zcard("arq:queue"))

    async def flush(self) -> None:
        await self.pool.flushall()
        self.sent = 0
