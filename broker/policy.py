"""A job's effective options: its own, else its task's, else the broker's.

Workers register their tasks' options (:class:`TaskDefaults`); the broker's
config gives the last word (:class:`Defaults`). Pure; no clock: callers
pass ``rng`` for the backoff's jitter.
"""

from __future__ import annotations

import random

import msgspec

from corral.broker.job import Defaults, Job, TaskDefaults
from corral.broker.jobspec import NIL
from corral.broker.records import ErrorRec, Finished

_NO_TASK_DEFAULTS = TaskDefaults()


class Policy:
    """Resolves attempts, timeouts, backoff and TTLs for a job, and decides
    what a try's outcome means."""

    def __init__(self, defaults: Defaults | None = None) -> None:
        self.defaults = defaults or Defaults()
        #: task name -> its options as its workers registered them.
        self.tasks: dict[str, TaskDefaults] = {}
        self._rng = random.Random()

    def decide_finish(
        self,
        job: Job,
        kind: str,
        now: float,
        *,
        result: msgspec.Raw | None = None,
        error: ErrorRec | None = None,
        delay: float | None = None,
        started_at: float | None = None,
        rng: random.Random | None = None,
    ) -> Finished:
        """What a try's outcome means for the job. ``kind`` is ``ok``,
        ``error`` (retry with backoff while attempts remain), ``fail`` (no
        more attempts), ``retry`` (again after ``delay``, not counted),
        ``lost`` (worker gone: requeue at once while attempts remain) or
        ``interrupted`` (its worker stopped before it finished, at a
        shutdown: back to its queue at once, not counted, as Sidekiq does)."""
        status, next_run_at, counted = "failed", None, True
        if kind == "ok":
            status = "succeeded"
        elif kind == "interrupted":
            status, counted = "queued", False
        elif kind == "retry":
            return self._decide_retry(job, now, error, delay, started_at, rng)
        elif kind in ("error", "lost") and job.attempts < self.max_attempts(job):
            if kind == "lost":
                status = "queued"
            else:
                status = "retrying"
                next_run_at = now + self.backoff(job, rng or self._rng)
        return Finished(
            id=job.id,
            lease=job.lease,
            at=now,
            status=status,
            result=msgspec.Raw(bytes(result)) if result is not None else NIL,
            error=error,
            next_run_at=next_run_at,
            started_at=started_at,
            counted=counted,
        )

    def _decide_retry(
        self,
        job: Job,
        now: float,
        error: ErrorRec | None,
        delay: float | None,
        started_at: float | None,
        rng: random.Random | None,
    ) -> Finished:
        """A handler raised ``corral.Retry``: again after ``delay`` seconds
        (None: the task's backoff, growing with each request), not counted
        against max_attempts; past ``max_retries`` requests, the job fails."""
        limit = self.max_retries(job)
        if job.retries >= limit:
            why = ErrorRec(
                "RetryLimit",
                f"the handler asked for a retry more than max_retries ({limit}) times"
                + (
                    f"; the last reason: {error.message}"
                    if error and error.message and not error.message.startswith("retry requested")
                    else ""
                ),
            )
            return Finished(job.id, job.lease, now, "failed", error=why, started_at=started_at)
        wait = (
            self._backoff_for(job, job.retries + 1, rng or self._rng)
            if delay is None
            else max(0.0, delay)
        )
        due = now + wait  # a wait too small to move ``now`` is no wait
        status, next_run_at = ("retrying", due) if due > now else ("queued", None)
        return Finished(
            job.id,
            job.lease,
            now,
            status,
            error=error,
            next_run_at=next_run_at,
            started_at=started_at,
            counted=False,
            retried=True,
        )

    def max_retries(self, job: Job) -> int:
        if job.max_retries is not None:
            return job.max_retries
        task = self.task(job).max_retries
        return task if task is not None else self.defaults.max_retries

    def max_attempts(self, job: Job) -> int:
        if job.max_attempts is not None:
            return job.max_attempts
        task = self.task(job).max_attempts
        return task if task is not None else self.defaults.max_attempts

    def timeout(self, job: Job) -> float | None:
        return job.timeout if job.timeout is not None else self.task(job).timeout

    def backoff(self, job: Job, rng: random.Random) -> float:
        """Exponential backoff with equal jitter for the attempt just made."""
        return self._backoff_for(job, job.attempts, rng)

    def _backoff_for(self, job: Job, n: int, rng: random.Random) -> float:
        """The wait after the ``n``-th failure (or retry request): the task's
        backoff doubled per step up to its cap, with equal jitter."""
        task = self.task(job)
        base = task.retry_backoff if task.retry_backoff is not None else self.defaults.retry_backoff
        cap = (
            task.retry_backoff_max
            if task.retry_backoff_max is not None
            else self.defaults.retry_backoff_max
        )
        exponent = min(max(0, n - 1), 60)  # 2**60 s is past any cap
        full = min(cap, base * (2.0**exponent))
        return full / 2 + rng.uniform(0, full / 2)

    def task(self, job: Job) -> TaskDefaults:
        """The options of the job's task: as registered when the job was
        created (kept with it), else as registered now, else all None."""
        return job.task_options or self.tasks.get(job.task) or _NO_TASK_DEFAULTS

    def ttl_end(self, job: Job, ended: float) -> float:
        """When a job that ended at ``ended`` (epoch seconds) is forgotten by
        its TTL: a succeeded one after its ``result_ttl``, a failed or
        cancelled one after the broker's ``failed_ttl``."""
        if job.status == "succeeded":
            ttl = job.result_ttl
            if ttl is None:
                ttl = self.task(job).result_ttl
            return ended + (ttl if ttl is not None else self.defaults.result_ttl)
        return ended + self.defaults.failed_ttl
