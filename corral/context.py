"""The context a handler receives about the job it runs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import structlog


@dataclass
class JobContext:
    """What a handler knows about its job: ``job_id``, ``attempt`` (the run
    number: 1 on the first run, one more on every run, a Retry or a manual
    retry included), ``task``, ``queue``, ``enqueued_at`` (epoch seconds),
    ``max_attempts``, ``prev_result`` (in a chain), ``headers`` (the job's
    metadata: text keys and values set at the enqueue, e.g. a trace
    context), ``cancelled`` and a ``log`` bound to the job."""

    job_id: str
    attempt: int
    task: str
    queue: str
    enqueued_at: float
    max_attempts: int = 1
    lease: int = 0
    prev_result_raw: msgspec.Raw | None = None  # NIL or None: no previous step
    headers: dict[str, str] = field(default_factory=dict)
    #: Set by the worker's socket thread (one attribute write, atomic under
    #: the GIL); a plain flag, as an Event per job (a Condition and a lock)
    #: was a few per cent of a no-op job's cost and nobody waits on it.
    _cancelled: bool = field(default=False, repr=False)
    _on_progress: Callable[[float, str], None] | None = field(default=None, repr=False)

    def progress(self, fraction: float, note: str = "") -> None:
        """Report how far the job is (0.0 to 1.0), shown in its info."""
        if self._on_progress is not None:
            self._on_progress(min(1.0, max(0.0, float(fraction))), str(note))

    @property
    def cancelled(self) -> bool:
        """True once the job has been cancelled; a handler may stop early."""
        return self._cancelled

    @property
    def prev_result(self) -> Any:
        """The previous chain step's result, decoded (None outside chains)."""
        if self.prev_result_raw is None:
            return None
        return msgspec.msgpack.decode(self.prev_result_raw)

    @property
    def log(self) -> Any:
        return structlog.get_logger().bind(job_id=self.job_id, task=self.task, attempt=self.attempt)
