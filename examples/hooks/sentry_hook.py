"""Report job failures to Sentry, tagged with the job's id, task and attempt.

Install ``corral[sentry]`` (sentry-sdk), then in the config::

    python_path = ["examples/hooks"]     # or install your own copy of this module
    hooks = ["sentry_hook"]

and give the workers ``SENTRY_DSN`` (and, if you like, ``SENTRY_ENVIRONMENT``
and ``SENTRY_RELEASE``) in their environment. Each worker calls
:func:`corral_hooks` after its fork: it starts the SDK unless the process
already did. A process that starts Sentry itself can pass
``SentryHooks()`` to ``Worker(..., hooks=[...])`` instead.

Every try that ends in an error is one event (``corral.Retry`` is not an
error), with the tags ``corral.job_id``, ``corral.task``, ``corral.queue``
and ``corral.attempt`` and a "corral job" context (those, ``max_attempts``
and ``enqueued_at``), so Sentry groups a job's tries and shows which run
failed. Pending events are flushed as the worker stops.
"""

from __future__ import annotations

import sentry_sdk

import corral

#: Seconds a stopping worker waits for pending events to go out.
FLUSH_TIMEOUT = 2.0


class SentryHooks(corral.Hooks):
    """Sends each failed try's exception to Sentry, tagged with its job."""

    def on_failure(self, ctx: corral.JobContext, error: BaseException) -> None:
        with sentry_sdk.new_scope() as scope:
            scope.set_tag("corral.job_id", ctx.job_id)
            scope.set_tag("corral.task", ctx.task)
            scope.set_tag("corral.queue", ctx.queue)
            scope.set_tag("corral.attempt", str(ctx.attempt))
            scope.set_context(
                "corral job",
                {
                    "job_id": ctx.job_id,
                    "task": ctx.task,
                    "queue": ctx.queue,
                    "attempt": ctx.attempt,
                    "max_attempts": ctx.max_attempts,
                    "enqueued_at": ctx.enqueued_at,
                },
            )
            sentry_sdk.capture_exception(error)

    def close(self) -> None:
        sentry_sdk.flush(timeout=FLUSH_TIMEOUT)


def corral_hooks() -> corral.Hooks:
    """For ``hooks = ["sentry_hook"]``: start the SDK from the environment
    (``SENTRY_DSN``; none: nothing is sent) unless it was started, and
    report failures."""
    if not sentry_sdk.is_initialized():
        sentry_sdk.init()
    return SentryHooks()
