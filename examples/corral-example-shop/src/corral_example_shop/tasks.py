"""Shop tasks, as a plugin package declares them: typed payloads (msgspec
Structs, validated by the worker before the handler runs), the job context
(progress), a retry, and the tasks' own queue and options.

Declared to corral by the ``corral.tasks`` entry point in pyproject.toml, so
a worker imports this module without it being named in a pool's plugins.
"""

from __future__ import annotations

import msgspec

import corral


class Line(msgspec.Struct, frozen=True):
    """One line of an order: a product and how many."""

    sku: str
    qty: int = 1


class Order(msgspec.Struct, frozen=True):
    """An order: who placed it and its lines (at least one)."""

    customer: str
    lines: list[Line]


class Receipt(msgspec.Struct, frozen=True):
    """What placing an order returns: the customer and the item count."""

    customer: str
    items: int


class OutOfStock(Exception):
    """A product is not in stock now: worth trying again later."""


@corral.task(name="shop.place_order", max_attempts=3, retry_backoff=0.1)
def place_order(ctx: corral.JobContext, order: Order) -> Receipt:
    """Place ``order``: reports progress line by line and returns a
    :class:`Receipt`. A line with ``qty`` 0 or less fails the job at once
    (``corral.Fail``: retrying cannot fix it)."""
    items = 0
    for done, line in enumerate(order.lines, 1):
        if line.qty <= 0:
            raise corral.Fail(f"line {done}: qty must be at least 1, got {line.qty}")
        items += line.qty
        ctx.progress(done / len(order.lines), f"line {done} of {len(order.lines)}")
    return Receipt(order.customer, items)


@corral.task(name="shop.restock")
def restock(ctx: corral.JobContext, sku: str) -> str:
    """Restock ``sku``; the first try of each job finds the supplier busy
    and asks to be retried in 0.1 s (``corral.Retry``: not a failure)."""
    if ctx.attempt == 1:
        raise corral.Retry(delay=0.1, reason="supplier busy")
    return f"restocked {sku}"
