"""JSON views: create an order (its job enqueued once the order is
committed), and show an order with its job's status and result.

``POST /orders/`` takes ``{"item": "pen", "quantity": 2}`` and answers 201
with ``{"order": 1, "job": "<id>", "pid": ...}``; an item out of stock
answers 409, and its transaction rolls back: no order, no job.
``GET /orders/<id>/`` answers ``{"order", "item", "quantity", "fulfilled",
"job": {"id", "status", "attempts", "result", "error"}, "pid"}``.
``pid`` is the web worker's process id, to see which worker answered.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

from django.db import transaction
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET, require_POST

import corral
from orders.corral_client import client
from orders.models import Order
from orders.tasks import fulfil

#: What the shop has, per item (a real shop would keep it in the database).
STOCK = {"pen": 100, "ink": 20, "paper": 500}


class OutOfStock(Exception):
    """The order asks for more than the shop has."""


def check_stock(order: Order) -> None:
    """Raise OutOfStock if the shop cannot serve ``order``."""
    if order.quantity > STOCK.get(order.item, 0):
        raise OutOfStock(f"not enough {order.item!r} in stock for {order.quantity}")


@require_POST
def create_order(request: HttpRequest) -> JsonResponse:
    try:
        body = json.loads(request.body)
        item, quantity = str(body["item"]), int(body["quantity"])
    except (ValueError, KeyError, TypeError):
        return _error('expected a JSON object {"item": str, "quantity": int}', 400)
    if quantity < 1:
        return _error("quantity must be at least 1", 400)
    # The job's id is chosen here, so the row can name its job although the
    # enqueue only happens after the commit.
    job_id = uuid.uuid4().hex
    try:
        with transaction.atomic():
            order = Order.objects.create(item=item, quantity=quantity, job_id=job_id)
            # After the commit, so the worker finds the row; never if the
            # transaction rolls back, so no job runs for an order that is not.
            transaction.on_commit(lambda: client().enqueue(fulfil, order.pk, id=job_id))
            check_stock(order)  # raising here rolls the order back
    except OutOfStock as exc:
        return _error(str(exc), 409)
    except corral.BrokerUnavailable:
        # Committed, not enqueued. The row holds the job id, and an enqueue
        # with an id the broker has is a no-op: enqueueing it again is safe.
        return _error(f"order {order.pk} saved, but its job {job_id} was not enqueued", 503)
    return JsonResponse({"order": order.pk, "job": job_id, "pid": os.getpid()}, status=201)


@require_GET
def show_order(request: HttpRequest, order_id: int) -> JsonResponse:
    try:
        order = Order.objects.get(pk=order_id)
    except Order.DoesNotExist:
        return _error(f"no order {order_id}", 404)
    try:
        job = _job(order.job_id)
    except corral.BrokerUnavailable as exc:
        return _error(str(exc), 503)
    return JsonResponse(
        {
            "order": order.pk,
            "item": order.item,
            "quantity": order.quantity,
            "fulfilled": order.fulfilled_at is not None,
            "job": job,
            "pid": os.getpid(),
        }
    )


def _job(job_id: str) -> dict[str, Any]:
    """The job's status, attempts, result (once succeeded) and last error."""
    shown: dict[str, Any] = {"id": job_id, "status": "unknown", "attempts": 0}
    shown.update(result=None, error=None)
    try:
        info = client().job(job_id)
        shown.update(status=info.status, attempts=info.attempts)
        if info.error is not None:
            shown["error"] = f"{info.error.type}: {info.error.message}"
        if info.status == "succeeded":
            shown["result"] = client().result(job_id, timeout=0)
    except corral.JobNotFound:
        pass  # never enqueued, or expired (result_ttl)
    return shown


def _error(message: str, status: int) -> JsonResponse:
    return JsonResponse({"error": message}, status=status)
