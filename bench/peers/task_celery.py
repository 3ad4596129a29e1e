"""Celery's side of bench/peers: the no-op task (Redis broker, Redis result
backend) and the client calls the driver times.

Imported by ``celery -A task_celery worker -c 2`` (prefork) and by
bench/peers/driver.py, both in the peers' venv; the Redis URL comes from
``PEERS_REDIS_URL``. Results go to database 1, so that its size is the
number of jobs done.
"""

# mypy: allow-untyped-decorators

from __future__ import annotations

import os

from celery import Celery, group  # type: ignore[import-not-found]
from redis import Redis  # type: ignore[import-not-found]

URL = os.environ["PEERS_REDIS_URL"]
app = Celery("task_celery", broker=f"{URL}/0", backend=f"{URL}/1")


@app.task
def noop(x: int) -> int:
    """The task: takes a small int and returns it."""
    return x


class Adapter:
    """Celery's own delay, group and AsyncResult; done = results stored."""

    def __init__(self) -> None:
        self.results = Redis.from_url(f"{URL}/1")

    def enqueue(self, x: int) -> None:
        noop.delay(x)

    def enqueue_bulk(self, xs: list[int]) -> None:
        group(noop.s(x) for x in xs).apply_async()

    def call(self, x: int, timeout: float) -> int:
        return int(noop.delay(x).get(timeout=timeout))

    def done(self) -> int:
        return int(self.results.dbsize())

    def flush(self) -> None:
        self.results.flushall()
