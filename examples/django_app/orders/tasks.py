"""The corral plugin of the example: the tasks corral's workers run.

Put ``orders.tasks`` in a pool's ``plugins`` (and this directory in
``python_path``). The module imports no model at import time: the
supervisor imports it (``preload = true``) before it forks the workers, and
Django is set up, and its database connection opened, in the worker that
runs a task, on first use.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import django
from django.db import close_old_connections, transaction
from django.utils import timezone

import corral


@functools.cache
def _setup_django() -> None:
    """Set Django up in this process, once (the settings from
    ``DJANGO_SETTINGS_MODULE``, else the example's)."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "orders_site.settings")
    django.setup()


@corral.task(name="orders.fulfil", max_attempts=3)
def fulfil(ctx: corral.JobContext, order_id: int) -> dict[str, Any]:
    """Mark the order fulfilled and return what was sent. Runs again safely:
    delivery is at least once, and an order already fulfilled stays as it is.
    Fails (no retry) for an order that does not exist."""
    _setup_django()
    from orders.models import Order

    # Outside a request Django does not manage connections: drop stale ones
    # before and after, as its request cycle does.
    close_old_connections()
    try:
        with transaction.atomic():
            try:
                order = Order.objects.select_for_update().get(pk=order_id)
            except Order.DoesNotExist:
                raise corral.Fail(f"order {order_id} does not exist") from None
            if order.fulfilled_at is None:
                order.fulfilled_at = timezone.now()
                order.save(update_fields=["fulfilled_at"])
        ctx.log.info("order fulfilled", order=order_id)
        return {"order": order.pk, "item": order.item, "quantity": order.quantity}
    finally:
        close_old_connections()
