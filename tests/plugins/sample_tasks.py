"""Plugin module for tests/test_registry.py: one task of every shape.

Loaded by module name with tests/plugins/ prepended to sys.path (this
directory has no __init__.py), so the default task names start with
``sample_tasks.``.
"""

from __future__ import annotations

import msgspec

import corral
from corral import JobContext


class Item(msgspec.Struct):
    sku: str
    qty: int


class Order(msgspec.Struct):
    name: str
    items: list[Item] = []


@corral.task
def untyped(ctx, payload):  # type: ignore[no-untyped-def]
    return [ctx, payload]


@corral.task(
    name="orders.place",
    queue="orders",
    max_attempts=3,
    timeout=30.0,
    soft_timeout=20.0,
    retry_backoff=2.0,
    retry_backoff_max=60.0,
    result_ttl=3600.0,
)
def place_order(ctx: corral.JobContext, order: Order) -> int:
    return sum(item.qty for item in order.items)


@corral.task
def ctx_only(ctx: JobContext) -> str:
    return ctx.job_id


@corral.task
def payload_only(order: Order) -> str:
    return order.name


@corral.task
def no_args() -> int:
    return 42


@corral.task(queue="async")
async def doubled(ctx: JobContext, n: int) -> int:
    return 2 * n


def plain_function(ctx: JobContext, payload: int) -> int:
    """Not decorated: not a task."""
    return payload


class Namespace:
    """Tasks are collected from a module's top-level names only."""

    @staticmethod
    @corral.task(name="sample.hidden")
    def hidden() -> None:
        return None


NOT_A_TASK = 3
