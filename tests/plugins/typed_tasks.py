"""Typed tasks for tests/test_typed_enqueue.py: enqueued by the function,
they take its name, queue and options, and mypy checks their payloads."""

from __future__ import annotations

import msgspec

import corral


class Email(msgspec.Struct):
    to: str
    subject: str


@corral.task(queue="typed", max_attempts=2, timeout=20, result_ttl=600, max_retries=3)
def send(ctx: corral.JobContext, msg: Email) -> dict[str, object]:
    return {"to": msg.to, "subject": msg.subject, "queue": ctx.queue, "attempt": ctx.attempt}


@corral.task(queue="typed")
def shout(text: str) -> str:
    return text.upper()


@corral.task(queue="typed")
def tick(ctx: corral.JobContext) -> int:
    return ctx.attempt


@corral.task
async def send_later(ctx: corral.JobContext, msg: Email) -> str:
    return msg.to
