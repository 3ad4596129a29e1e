"""Typed tasks for tests/test_typed_enqueue.py: enqueued by the function,
they take its name, queue and options, and mypy checks their payloads."""

from __future__ import annotations

from typing import Any

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


# Handlers whose signature holds an Any (a return of dict[str, Any], as
# README's `-> dict` is without --strict): mypy must still check their payloads.
@corral.task(queue="typed")
def invoice(ctx: corral.JobContext, msg: Email) -> dict[str, Any]:
    return {"to": msg.to}


@corral.task(queue="typed")
def anything(ctx: corral.JobContext, count: int, *, dry_run: bool = False) -> Any:
    return count


@corral.task(queue="typed")
def ping(ctx: corral.JobContext) -> Any:
    return None


@corral.task(queue="typed")
def echo(text: str) -> Any:
    return text
