"""Trace jobs with OpenTelemetry, one trace from the enqueue to the handler.

Install ``corral[otel]`` (opentelemetry-api and -sdk), then in the config::

    python_path = ["examples/hooks"]     # or install your own copy of this module
    hooks = ["otel_hook"]

The client side (``Client.from_config``, or ``Client(..., hooks=[OpenTelemetryHooks()])``)
puts the current trace context into the job's headers (W3C ``traceparent``
and ``tracestate``, and ``baggage``: whatever the global propagator writes).
The worker starts a CONSUMER span ``process <task>`` as its child, current
while the handler runs (so the handler's own spans nest under it), with
the messaging attributes and ``corral.task`` / ``corral.attempt``; a failed
try records its exception and an error status, a ``corral.Retry`` an event.

The hooks only use the OpenTelemetry API: set up the SDK (a
``TracerProvider`` with an exporter) in the process, as usual; for a
worker, :func:`corral_hooks` is the place, since it runs after the fork.
Spans still buffered are flushed as the worker stops.
"""

from __future__ import annotations

import threading
from contextvars import Token

from opentelemetry import context, propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode

import corral
from corral.hooks import Enqueuing, JobEnd


class OpenTelemetryHooks(corral.Hooks):
    """Propagates the trace context through the job's headers and traces
    each try. ``tracer_provider``: None, the global one."""

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        self._tracer = trace.get_tracer("corral", tracer_provider=tracer_provider)
        self._provider = tracer_provider
        #: The span and context token of each job running here, by job id.
        self._running: dict[str, tuple[trace.Span, Token[Context]]] = {}
        self._lock = threading.Lock()

    def before_enqueue(self, job: Enqueuing) -> None:
        propagate.inject(job.headers)

    def before_job(self, ctx: corral.JobContext) -> None:
        parent = propagate.extract(ctx.headers)
        span = self._tracer.start_span(
            f"process {ctx.task}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "corral",
                "messaging.operation.type": "process",
                "messaging.destination.name": ctx.queue,
                "messaging.message.id": ctx.job_id,
                "corral.task": ctx.task,
                "corral.attempt": ctx.attempt,
            },
        )
        token = context.attach(trace.set_span_in_context(span, parent))
        with self._lock:
            self._running[ctx.job_id] = (span, token)

    def on_failure(self, ctx: corral.JobContext, error: BaseException) -> None:
        span = self._span(ctx)
        if span is not None:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))

    def on_retry(self, ctx: corral.JobContext, error: BaseException) -> None:
        span = self._span(ctx)
        if span is not None:
            span.add_event("corral.retry_asked", {"reason": str(error)})

    def after_job(self, ctx: corral.JobContext, end: JobEnd) -> None:
        with self._lock:
            running = self._running.pop(ctx.job_id, None)
        if running is None:
            return
        span, token = running
        span.set_attribute("corral.outcome", end.outcome)
        context.detach(token)
        span.end()

    def close(self) -> None:
        provider = self._provider or trace.get_tracer_provider()
        flush = getattr(provider, "force_flush", None)
        if flush is not None:
            flush()

    def _span(self, ctx: corral.JobContext) -> trace.Span | None:
        with self._lock:
            running = self._running.get(ctx.job_id)
        return running[0] if running is not None else None


def corral_hooks() -> corral.Hooks:
    """For ``hooks = ["otel_hook"]``: the hooks, with the global tracer
    provider (set it up before, e.g. in your own ``corral_hooks``)."""
    return OpenTelemetryHooks()
