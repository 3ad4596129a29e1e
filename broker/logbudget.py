"""A budget for the broker's log lines that a peer can cause at will.

A worker registering (READY) and leaving (Bye) is logged, and anything
that reaches the worker endpoint can send both as fast as it likes: one
line each would let it fill the disk and drown the lines an operator
needs. Such lines spend from a token bucket (:data:`BURST` lines at once,
then :data:`RATE` a second); past it they are counted, not written, and
the next line written says how many were left out (``suppressed``). The
broker's own stats count them too (``log_lines_suppressed``).

The same bucket budgets the answers a peer can cause: the Refused sent for
each worker frame the broker cannot decode (counted apart, as
``refusals_suppressed``), so no peer makes the broker send without bound.
"""

from __future__ import annotations

from collections import Counter

#: Lines written at once before the rate applies.
BURST = 100
#: Lines a second, once the burst is spent.
RATE = 10.0


class LogBudget:
    """One token bucket for every line (or answer) a peer can cause. Time
    is the caller's monotonic clock, in seconds; what is left out is
    counted in ``stats[counter]``."""

    def __init__(
        self,
        stats: Counter[str],
        burst: int = BURST,
        rate: float = RATE,
        counter: str = "log_lines_suppressed",
    ) -> None:
        self._stats = stats
        self._counter = counter
        self._burst = float(burst)
        self._rate = rate
        self._tokens = float(burst)
        self._at: float | None = None
        self._left_out = 0

    def allow(self, mono: float) -> dict[str, int] | None:
        """The fields to add to a line that may be written now (``{}``, or
        ``{"suppressed": n}`` after lines were left out), or None: leave
        it out (it is counted)."""
        if self._at is not None:
            self._tokens = min(self._burst, self._tokens + (mono - self._at) * self._rate)
        self._at = mono
        if self._tokens < 1.0:
            self._left_out += 1
            self._stats[self._counter] += 1
            return None
        self._tokens -= 1.0
        if not self._left_out:
            return {}
        fields = {"suppressed": self._left_out}
        self._left_out = 0
        return fields
