"""Where the broker's time comes from.

The broker reads two clocks once per pass and hands the readings to every
part: the wall clock (epoch seconds) for what users see and what the log
keeps (``created_at``, ``run_at``, TTLs, schedules), and the monotonic clock
(seconds from an arbitrary start) for intervals that must not jump with the
wall clock (heartbeats, lease deadlines, long-poll waits, fsync intervals).
Injecting the clock is what lets tests drive schedules, delays, retries,
TTLs and deadlines without sleeping, and step the wall clock backward or
forward (as huey's consumer takes ``now``).

A step of the wall clock (an NTP step, an operator setting the date, a VM
restored) shows as a change of the offset between the two readings;
:class:`StepDetector` notices it, and the broker moves the waits that were
asked for as intervals by the step (see ``ClockStepped``). A system
suspend also shows as a step forward: the monotonic clock stops while the
machine sleeps.
"""

from __future__ import annotations

import time
from typing import Protocol

#: The smallest change of the offset (wall - monotonic) taken for a step, in
#: seconds. Under it an interval errs by less than a heartbeat (1 s by
#: default), which is not worth a log record; ntpd steps from 0.128 s and
#: chrony's usual ``makestep 1 3`` from 1 s, so real steps of note are seen.
STEP_TOLERANCE = 1.0
#: How fast the wall clock may drift from the monotonic clock without a
#: step: 500 ppm, the kernel's limit on the NTP frequency correction
#: (adjtimex ``MAXFREQ``). So a long gap between two readings (a broker
#: stopped for an hour may see 1.8 s of drift) is not taken for a step. A
#: faster slew (chrony can change the tick by up to 8.3 %) that moves the
#: clock by more than the tolerance is a correction as good as a step, and
#: is treated as one: intervals then hold by the monotonic clock.
MAX_SLEW = 500e-6


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


class StepDetector:
    """Notices steps of the wall clock from successive readings of both clocks.

    Both clocks are read back to back, so between two readings their offset
    (wall - monotonic) moves only by a step, or by slewing at most
    :data:`MAX_SLEW` of the time between the readings. A move beyond that
    plus :data:`STEP_TOLERANCE` is a step.
    """

    def __init__(self) -> None:
        self._offset: float | None = None
        self._mono = 0.0

    def observe(self, wall: float, mono: float) -> float | None:
        """Take a reading (epoch seconds, monotonic seconds); returns the
        size in seconds of the step since the previous reading (negative:
        backward), or None if there was none (or this is the first)."""
        offset, last = wall - mono, self._offset
        elapsed = mono - self._mono
        self._offset, self._mono = offset, mono
        if last is None:
            return None
        delta = offset - last
        if abs(delta) <= STEP_TOLERANCE + MAX_SLEW * max(0.0, elapsed):
            return None
        return delta
