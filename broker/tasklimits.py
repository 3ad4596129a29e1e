"""A task's concurrency and rate limits as declared, and the strictest of
several declarations (see :mod:`corral.broker.limits`, which enforces
them). Leaf module."""

from __future__ import annotations

from dataclasses import dataclass

from corral.broker import protocol as p

#: (starts, period in seconds).
Rate = tuple[int, float]


@dataclass(frozen=True)
class TaskLimits:
    """One task's limits (None: no such limit)."""

    concurrency: int | None = None
    rate: Rate | None = None
    key_concurrency: int | None = None
    key_rate: Rate | None = None
    #: The rates as declared ("100/m"), for status.
    rate_text: str | None = None
    key_rate_text: str | None = None

    @classmethod
    def of(cls, info: p.TaskInfo) -> TaskLimits:
        """The limits a worker registered for a task. Raises ValueError for
        a rate :func:`~corral.broker.protocol.parse_rate` refuses."""
        return cls(
            info.concurrency,
            p.parse_rate(info.rate) if info.rate is not None else None,
            info.key_concurrency,
            p.parse_rate(info.key_rate) if info.key_rate is not None else None,
            info.rate,
            info.key_rate,
        )

    @property
    def any(self) -> bool:
        return self != NONE

    @property
    def keyed(self) -> bool:
        """It limits per key."""
        return self.key_concurrency is not None or self.key_rate is not None

    @property
    def paced(self) -> bool:
        """It limits starts per period."""
        return self.rate is not None or self.key_rate is not None

    def strictest(self, other: TaskLimits) -> TaskLimits:
        """Each limit at the stricter of the two."""
        rate, rate_text = _slower((self.rate, self.rate_text), (other.rate, other.rate_text))
        key_rate, key_text = _slower(
            (self.key_rate, self.key_rate_text), (other.key_rate, other.key_rate_text)
        )
        return TaskLimits(
            _least(self.concurrency, other.concurrency),
            rate,
            _least(self.key_concurrency, other.key_concurrency),
            key_rate,
            rate_text,
            key_text,
        )


#: No limits.
NONE = TaskLimits()


def _least(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


def _slower(
    a: tuple[Rate | None, str | None], b: tuple[Rate | None, str | None]
) -> tuple[Rate | None, str | None]:
    if a[0] is None:
        return b
    if b[0] is None:
        return a
    return min(a, b, key=lambda r: (r[0][0] / r[0][1], r[0][0]) if r[0] else (0.0, 0))


def describe(limits: TaskLimits) -> str:
    parts = [
        f"concurrency={limits.concurrency}" if limits.concurrency is not None else "",
        f"rate={limits.rate_text}" if limits.rate_text is not None else "",
        f"key_concurrency={limits.key_concurrency}" if limits.key_concurrency is not None else "",
        f"key_rate={limits.key_rate_text}" if limits.key_rate_text is not None else "",
    ]
    return " ".join(part for part in parts if part) or "none"
