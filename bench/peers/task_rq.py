"""RQ's side of bench/peers: the no-op task and the client calls the driver times.

Imported by ``rq worker`` (SimpleWorker or the default forking Worker, two
processes) and by bench/peers/driver.py, both in the peers' venv; the Redis
URL comes from ``PEERS_REDIS_URL``.
"""

from __future__ import annotations

import os

from redis import Redis  # type: ignore[import-not-found]
from rq import Queue  # type: ignore[import-not-found]


def noop(x: int) -> int:
    """The task: takes a small int and returns it."""
    return x


class Adapter:
    """RQ's own enqueue calls, result API and job registry."""

    def __init__(self) -> None:
        self.redis = Redis.from_url(os.environ["PEERS_REDIS_URL"])
        self.queue = Queue("default", connection=self.redis)

    def enqueue(self, x: int) -> None:
        self.queue.enqueue(noop, x)

    def enqueue_bulk(self, xs: list[int]) -> None:
        self.queue.enqueue_many([Queue.prepare_data(noop, (x,)) for x in xs])

    def call(self, x: int, timeout: float) -> int:
        job = self.queue.enqueue(noop, x)
        result = job.latest_result(timeout=max(1, round(timeout)))
        if result is None:
            raise TimeoutError(f"no result for RQ job {job.id} within {timeout}s")
        return int(result.return_value)

    def done(self) -> int:
        return int(self.queue.finished_job_registry.get_job_count(cleanup=False))

    def flush(self) -> None:
        self.redis.flushall()
