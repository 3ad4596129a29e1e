"""A pool's restart policy: when a crashed worker may be started again.

The first crash in the window restarts at once; crashing again backs off
exponentially (``restart_backoff``, x2, x4 ... up to ``restart_backoff_max``);
more than ``max_restarts`` crashes in ``restart_window`` marks the pool
failed (circus's flapping detection). Time comes in as ``now``.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from corral.config.schema import PoolConfig

log = structlog.get_logger()


class RestartLimit:
    """One pool's crash history, its backoff and whether it has failed."""

    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        #: When each crash inside the window happened.
        self.crashes: deque[float] = deque()
        #: Every crash since the pool started (for ``corral status``).
        self.total = 0
        self.backoff = 0.0
        self.next_start = 0.0
        self.failed = False

    def reset(self) -> None:
        """Forget the crashes (an operator's reload): start at once."""
        self.crashes.clear()
        self.backoff = self.next_start = 0.0
        self.failed = False

    def may_start(self, now: float) -> bool:
        """Whether empty slots may be filled now."""
        return not self.failed and now >= self.next_start

    def crashed(self, now: float) -> None:
        """Count a crash: back off, or mark the pool failed."""
        config = self.config
        self.crashes.append(now)
        self.total += 1
        window = config.restart_window
        while self.crashes and self.crashes[0] < now - window:
            self.crashes.popleft()
        if len(self.crashes) > config.max_restarts:
            self.failed = True
            log.error(
                "supervisor.pool_failed",
                pool=config.name,
                restarts=len(self.crashes),
                window=window,
                hint="fix the cause, then reload or restart corral",
            )
            return
        crashes = len(self.crashes)
        self.backoff = 0.0
        if crashes > 1:
            base, cap = config.restart_backoff, config.restart_backoff_max
            self.backoff = min(cap, base * 2.0 ** min(crashes - 2, 30))
        self.next_start = now + self.backoff
        if self.backoff:
            log.warning(
                "supervisor.backoff", pool=config.name, crashes=crashes, seconds=self.backoff
            )
