"""Dramatiq's side of bench/peers: the no-op actor (results stored in Redis)
and the client calls the driver times.

Imported by ``dramatiq task_dramatiq --processes 2`` and by
bench/peers/driver.py, both in the peers' venv; the Redis URL comes from
``PEERS_REDIS_URL``.
"""

# mypy: allow-untyped-decorators

from __future__ import annotations

import os
from typing import Any

import dramatiq  # type: ignore[import-not-found]
from dramatiq.brokers.redis import RedisBroker  # type: ignore[import-not-found]
from dramatiq.results import Results  # type: ignore[import-not-found]
from dramatiq.results.backends import RedisBackend  # type: ignore[import-not-found]

URL = os.environ["PEERS_REDIS_URL"]
broker = RedisBroker(url=URL)
broker.add_middleware(Results(backend=RedisBackend(url=URL)))
dramatiq.set_broker(broker)


@dramatiq.actor(store_results=True)
def noop(x: int) -> int:
    """The task: takes a small int and returns it."""
    return x


class Adapter:
    """Dramatiq's own send, group and result API; done = messages acked."""

    def __init__(self) -> None:
        self.redis: Any = broker.client
        self.sent = 0

    def enqueue(self, x: int) -> None:
        noop.send(x)
        self.sent += 1

    def enqueue_bulk(self, xs: list[int]) -> None:
        dramatiq.group([noop.message(x) for x in xs]).run()
        self.sent += len(xs)

    def call(self, x: int, timeout: float) -> int:
        message = noop.send(x)
        self.sent += 1
        return int(message.get_result(block=True, timeout=int(timeout * 1000)))

    def done(self) -> int:
        # A message stays in the queue's hash until its worker acks it.
        return self.sent - int(self.redis.hlen("dramatiq:default.msgs"))

    def flush(self) -> None:
        self.redis.flushall()
        self.sent = 0
