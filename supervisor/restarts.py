"""A pool's restart policy: when a crashed worker's slot is filled again.

Per slot (so two workers that die at once for unrelated reasons, say the
OOM killer, both restart at once): the first crash restarts at once; a
slot that crashes again within ``restart_window`` backs off exponentially
(``restart_backoff``, x2, x4 ... up to ``restart_backoff_max``).

Per pool (circus's flapping detection, Erlang's restart intensity): more
than ``max_restarts`` counted crashes within ``restart_window`` make the
whole pool back off for ``pool_backoff``, doubling each time it happens
again, up to ``pool_backoff_max``. It is never given up on: once the time
is up it tries again, and an operator's reload (SIGHUP) restarts it at once.

A process that died running jobs is charged to those jobs (the broker
counts an attempt on each, so a poison job ends failed after its
``max_attempts``); such deaths restart at once and never count here.
Time comes in as ``now`` (monotonic seconds).
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from corral.config.schema import PoolConfig

log = structlog.get_logger()


class RestartLimit:
    """One pool's crash history, its slots' backoff and its own."""

    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        #: When each counted crash inside the window happened.
        self.crashes: deque[float] = deque()
        #: Every crash since the pool started, job-caused ones included.
        self.total = 0
        #: slot -> (crashes in a row, when the last one was).
        self._streaks: dict[int, tuple[int, float]] = {}
        #: slot -> when it may be filled again.
        self._slot_start: dict[int, float] = {}
        #: The pool fills no slot before this (monotonic seconds).
        self.backing_off_until = 0.0
        #: How many times in a row the pool backed off.
        self._trips = 0
        #: What the last counted crash died of (``worker.cannot_start``'s
        #: error, or how it ended): the pool's backoff names it.
        self.cause = ""

    def reset(self) -> None:
        """Forget the crashes (an operator's reload): start at once."""
        self.crashes.clear()
        self._streaks.clear()
        self._slot_start.clear()
        self.backing_off_until = 0.0
        self._trips = 0
        self.cause = ""

    def backing_off(self, now: float) -> bool:
        return now < self.backing_off_until

    def may_start(self, index: int, now: float) -> bool:
        """Whether slot ``index`` may be filled now."""
        return not self.backing_off(now) and now >= self._slot_start.get(index, 0.0)

    def crashed(self, index: int, now: float, *, job_caused: bool = False, cause: str = "") -> None:
        """Count a crash of slot ``index``'s worker (of ``cause``, in words):
        back the slot off, and the pool if it crashes too often.
        ``job_caused``: it died running jobs, which are charged for it; it
        restarts at once, uncounted."""
        self.total += 1
        if job_caused:
            return
        self.cause = cause
        config = self.config
        window = config.restart_window
        count, last = self._streaks.get(index, (0, 0.0))
        count = count + 1 if now - last <= window else 1
        self._streaks[index] = (count, now)
        backoff = 0.0
        if count > 1:
            backoff = min(
                config.restart_backoff_max, config.restart_backoff * 2.0 ** min(count - 2, 30)
            )
            log.warning(
                "supervisor.backoff", pool=config.name, index=index, crashes=count, seconds=backoff
            )
        self._slot_start[index] = now + backoff
        self.crashes.append(now)
        while self.crashes and self.crashes[0] < now - window:
            self.crashes.popleft()
        if len(self.crashes) > config.max_restarts:
            self._trip(now)

    def config_fault(self, index: int, now: float, *, cause: str) -> None:
        """Slot ``index``'s worker exited on a configuration fault that no
        restart mends (the broker refused its READY): the pool backs off at
        once, naming ``cause``. Its siblings exiting of the same fault
        while it backs off do not make the backoff longer."""
        self.total += 1
        self.cause = cause
        if not self.backing_off(now):
            self._trip(now)

    def _trip(self, now: float) -> None:
        config = self.config
        if now - self.backing_off_until > 2 * config.restart_window:
            self._trips = 0  # it ran well since the last time
        self._trips += 1
        seconds = min(config.pool_backoff_max, config.pool_backoff * 2.0 ** (self._trips - 1))
        self.backing_off_until = now + seconds
        crashes = len(self.crashes) or 1
        self.crashes.clear()
        log.error(
            "supervisor.pool_backing_off",
            pool=config.name,
            crashes=crashes,
            window=config.restart_window,
            seconds=seconds,
            until=wall_clock(self.backing_off_until, now),
            error=self.cause,
            hint="it tries again then; fix the cause, or reload (SIGHUP) to try at once",
        )

    def state(self, now: float) -> str:
        """``ok``, or ``backing off until <time>`` for `corral status`, with
        what its last crash died of."""
        if self.backing_off(now):
            until = f"backing off until {wall_clock(self.backing_off_until, now)}"
            cause = self.cause if len(self.cause) <= 300 else f"{self.cause[:299]}…"
            return f"{until}: {cause}" if cause else until
        return "ok"


def wall_clock(when: float, now: float) -> str:
    """The local time of monotonic ``when``, given monotonic ``now``."""
    return time.strftime("%H:%M:%S", time.localtime(time.time() + when - now))
