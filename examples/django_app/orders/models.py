"""An order, and the id of the corral job that fulfils it."""

from __future__ import annotations

from datetime import datetime

from django.db import models


class Order(models.Model):
    """A customer's order. ``job_id`` is chosen before the job is enqueued, so
    the row names its job even though the enqueue happens after the commit."""

    # The annotations are for mypy (django-stubs without its plugin): the
    # type a field takes, and the type it gives.
    item: models.CharField[str, str] = models.CharField(max_length=100)
    quantity: models.PositiveIntegerField[int, int] = models.PositiveIntegerField()
    job_id: models.CharField[str, str] = models.CharField(max_length=64, unique=True)
    created_at: models.DateTimeField[datetime, datetime] = models.DateTimeField(auto_now_add=True)
    #: Set by the ``orders.fulfil`` task, in a corral worker.
    fulfilled_at: models.DateTimeField[datetime | None, datetime | None] = models.DateTimeField(
        null=True, blank=True
    )

    def __str__(self) -> str:
        return f"order {self.pk}: {self.quantity} x {self.item}"
