"""Where the broker's time comes from.

The broker reads two clocks once per pass and hands the readings to every
part: the wall clock (epoch seconds) for what users see and what the log
keeps (``created_at``, ``run_at``, TTLs, schedules), and the monotonic clock
(seconds from an arbitrary start) for intervals that must not jump with the
wall clock (heartbeats, lease deadlines, long-poll waits, fsync intervals).
Injecting the clock is what lets tests drive schedules, delays, retries,
TTLs and deadlines without sleeping, and step the wall clock backward or
forward (as huey's consumer takes ``now``).
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Two readings, in seconds."""

    def time(self) -> float:
        """The wall clock: epoch seconds."""
        ...

    def monotonic(self) -> float:
        """A clock that never goes backward: seconds from an arbitrary start."""
        ...


class SystemClock:
    """The real clocks: :func:`time.time` and :func:`time.monotonic`."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


class FakeClock:
    """A clock that moves only when told to, for tests and simulations.

    :meth:`advance` moves both readings (time passing); :meth:`jump` moves
    only the wall clock, either way (an NTP step, a VM resumed, an operator
    setting the date), as a real wall clock can.
    """

    def __init__(self, wall: float = 1_700_000_000.0, mono: float = 1_000.0) -> None:
        self.wall = wall
        self.mono = mono

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` (>= 0) pass on both clocks."""
        if seconds < 0:
            raise ValueError(f"time does not pass backward: advance({seconds}); use jump()")
        self.wall += seconds
        self.mono += seconds

    def jump(self, seconds: float) -> None:
        """Step the wall clock by ``seconds`` (negative: backward); the
        monotonic clock does not move."""
        self.wall += seconds
