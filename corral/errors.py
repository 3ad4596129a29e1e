"""corral's error hierarchy: everything a user can catch derives from CorralError."""

from __future__ import annotations

from typing import Any


class CorralError(Exception):
    """Base of every error corral raises."""


class ConfigError(CorralError):
    """A config file that cannot be used; the message names the bad key's path."""


class BrokerUnavailable(CorralError):
    """The broker did not answer within the timeout."""


class BrokerError(CorralError):
    """The broker refused a request; ``code`` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class DiskFull(BrokerError):
    """The broker's disk is full: the job was not accepted."""

    def __init__(self, message: str) -> None:
        super().__init__("disk_full", message)


class RequestTooLarge(CorralError, ValueError):
    """A request bigger than the broker's max_message_size: nothing was sent."""


class JobNotFound(CorralError):
    """No job, chain or group has that id (it may have expired)."""


class JobFailed(CorralError):
    """The job ended ``failed``; ``error`` holds the last try's error."""

    def __init__(self, job_id: str, error: Any = None) -> None:
        self.job_id = job_id
        self.error = error
        detail = f"{error.type}: {error.message}" if error is not None else "no error recorded"
        super().__init__(f"job {job_id} failed: {detail}")


class JobCancelled(CorralError):
    """The job was cancelled; it has no result. ``reason`` is None (by
    hand) or ``"expired"`` (it had not started by its ``expires`` time),
    and ``detail`` says more where the broker does."""

    def __init__(self, job_id: str, reason: str | None = None, detail: str = "") -> None:
        self.job_id = job_id
        self.reason = reason
        self.detail = detail
        why = f" ({detail or reason})" if reason else ""
        super().__init__(f"job {job_id} was cancelled{why}")


class ResultTimeout(CorralError, TimeoutError):
    """The job did not end within the wait."""


class HookTimeout(CorralError, TimeoutError):
    """A client's ``before_enqueue`` hook returned past the call's timeout:
    nothing was sent; the message names the hook."""


class Retry(Exception):
    """Raised by a handler: run this job again later without counting a failure."""

    def __init__(self, delay: float | None = None, reason: str = "") -> None:
        """``delay``: seconds to wait (None: the task's backoff); ``reason``:
        why, kept on the try (and named if the job runs out of retries)."""
        when = "after the task's backoff" if delay is None else f"in {delay:g}s"
        super().__init__(reason or f"retry requested {when}")
        self.delay = delay
        self.reason = reason


class SoftTimeout(Exception):
    """Raised inside a handler that runs past its task's ``soft_timeout``;
    it may clean up and return, or let it fail the try (which is retried)."""


class Fail(Exception):
    """Raised by a handler: fail this job now, with no more attempts."""
