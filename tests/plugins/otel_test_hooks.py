"""The OpenTelemetry example's hooks (examples/hooks/otel_hook.py) with the
real SDK: a worker's spans go to the file ``$CORRAL_TEST_OTEL_FILE``, one
JSON line each (ids in hex)."""

from __future__ import annotations

import json
import os

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
from otel_hook import OpenTelemetryHooks

import corral


def line(span: ReadableSpan) -> str:
    assert span.context is not None
    return (
        json.dumps(
            {
                "name": span.name,
                "trace_id": f"{span.context.trace_id:032x}",
                "span_id": f"{span.context.span_id:016x}",
                "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
                "kind": span.kind.name,
                "status": span.status.status_code.name,
                "attributes": dict(span.attributes or {}),
                "events": [event.name for event in span.events],
            }
        )
        + "\n"
    )


def corral_hooks() -> corral.Hooks:
    out = open(os.environ["CORRAL_TEST_OTEL_FILE"], "a")  # noqa: SIM115 - the exporter's, for the process
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(out=out, formatter=line)))
    trace.set_tracer_provider(provider)
    return OpenTelemetryHooks()
