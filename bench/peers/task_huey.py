"""Huey's side of bench/peers: the no-op task and the client calls the driver times.

Imported by ``huey_consumer task_huey.huey -w 2 -k process`` and by
bench/peers/driver.py, both in the peers' venv; the Redis URL comes from
``PEERS_REDIS_URL``, and ``PEERS_HUEY_NOTIFY=1`` turns on ``notify_result``
(results announced with a list push, waited for with BLPOP instead of
polled), which the latency figure uses.
"""

# mypy: allow-untyped-decorators

from __future__ import annotations

import os

from huey import RedisHuey  # type: ignore[import-not-found]

huey = RedisHuey(
    "bench",
    url=os.environ["PEERS_REDIS_URL"],
    notify_result=os.environ.get("PEERS_HUEY_NOTIFY") == "1",
)


@huey.task()
def noop(x: int) -> int:
    """The task: takes a small int and returns it."""
    return x


class Adapter:
    """Huey's own task call, map and result API; done = results stored."""

    def enqueue(self, x: int) -> None:
        noop(x)

    def enqueue_bulk(self, xs: list[int]) -> None:
        noop.map(xs)

    def call(self, x: int, timeout: float) -> int:
        return int(noop(x).get(blocking=True, timeout=timeout))

    def done(self) -> int:
        return int(huey.result_count())

    def flush(self) -> None:
        huey.storage.conn.flushall()
