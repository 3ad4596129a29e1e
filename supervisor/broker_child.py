"""The broker of ``corral run``, as a child of the supervisor: started
before any worker, and started again when it dies.

Nothing here blocks the supervisor's loop: the broker writes one byte on
a pipe once its log is replayed and its endpoints are bound, and the loop
looks at that pipe on each tick (:meth:`BrokerChild.poll`), so reaping,
limits and the watchdog go on through a long replay. A broker that dies
again and again is restarted with backoff (at once the first time, then
1 s, 2 s, 4 s ... up to 30 s; a broker that ran a minute starts afresh).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from corral.supervisor.process import Child, reap_quietly
from corral.supervisor.roles import run_broker

if TYPE_CHECKING:
    from corral.config.schema import Config

log = structlog.get_logger()

#: How long a broker may take to replay its log and bind, in seconds.
BROKER_START_TIMEOUT = 120.0
#: Restart backoff: the first, and the cap, in seconds.
RESTART_BACKOFF = 1.0
RESTART_BACKOFF_MAX = 30.0
#: A broker that ran this long (seconds) before dying starts its backoff afresh.
STABLE_AFTER = 60.0


class BrokerChild:
    """The broker process, its start and its restarts. ``before_fork`` is
    called before each fork (to close what must not be inherited, such as
    a zmq context)."""

    def __init__(
        self,
        before_fork: Callable[[], None] = lambda: None,
        start_timeout: float = BROKER_START_TIMEOUT,
    ) -> None:
        self.child: Child | None = None
        self.before_fork = before_fork
        self.start_timeout = start_timeout
        #: ``down``, ``starting`` (forked, not yet ready) or ``up``.
        self.state = "down"
        #: Whether a broker has ever been up (the first start decides
        #: whether ``corral run`` starts at all).
        self.was_up = False
        self._ready_r: int | None = None
        self._deadline = 0.0
        self._up_since = 0.0
        self._streak = 0
        self._next_start = 0.0

    @property
    def alive(self) -> bool:
        return self.child is not None and self.child.alive

    @property
    def up(self) -> bool:
        return self.state == "up" and self.alive

    def start(self, config: Config, now: float) -> None:
        """Fork the broker; :meth:`poll` sees it become ready."""
        ready_r, ready_w = os.pipe()

        first_start = not self.was_up  # past it, a metrics port it cannot bind is logged

        def target(_: int | None) -> int:
            return run_broker(config, ready_w, first_start=first_start)  # ready_r was closed

        self.child = child = Child("broker", "corral: broker", target, keep_fds=(ready_w,))
        self.before_fork()
        try:
            child.start()
        except OSError:
            os.close(ready_r)
            os.close(ready_w)
            raise
        os.close(ready_w)
        os.set_blocking(ready_r, False)
        self._ready_r = ready_r
        self._deadline = now + self.start_timeout
        self.state = "starting"

    def poll(self, config: Config, now: float, *, may_fork: bool = True) -> str | None:
        """Advance on each tick: see a starting broker become ready (or give
        it up past its deadline), and start a gone one once its backoff is
        over (not while ``may_fork`` is false). Returns ``"up"`` when it just
        became ready, ``"failed"`` when the very first start failed, else
        None. A fork that fails is retried after the backoff."""
        if self.state == "starting":
            return self._poll_start(now)
        if self.state == "up" and not self.alive:
            self._gone(now, self._up_since)
        if self.state == "down" and self.was_up and now >= self._next_start and may_fork:
            try:
                self.start(config, now)
            except OSError as exc:
                log.error("supervisor.fork_failed", child="broker", error=str(exc))
                self._gone(now, now)
        return None

    def fds(self) -> tuple[int, ...]:
        """What the loop's sleep should wake for: a starting broker's ready pipe."""
        return (self._ready_r,) if self._ready_r is not None else ()

    def _poll_start(self, now: float) -> str | None:
        assert self._ready_r is not None
        try:
            data = os.read(self._ready_r, 1)
        except BlockingIOError:
            data = None
        if data == b"1":
            self._close_ready()
            self.state = "up"
            self.was_up = True
            self._up_since = now
            log.info("supervisor.broker_ready", pid=self.child.pid if self.child else None)
            return "up"
        if data is None and self.alive and now < self._deadline:
            return None  # still replaying its log
        reason = f"not ready within {self.start_timeout:g}s" if now >= self._deadline else "exited"
        log.error(
            "supervisor.broker_failed_to_start",
            reason=reason,
            hint="see the broker's error above",
        )
        self.signal(signal.SIGKILL)  # reaped by the loop
        self._close_ready()
        if not self.was_up:
            self.state = "down"
            return "failed"
        self._gone(now, now)
        return None

    def start_failure(self) -> int:
        """The exit code of ``corral run`` whose first broker did not
        start: 2 when the broker refused its config (its own code 2, as
        :func:`~corral.supervisor.roles.run_broker` returns), else 1.
        Reaps the broker first if the loop has not yet: its ready pipe ends
        when it exits (or it was just killed), which can come before the
        loop's next reap."""
        child = self.child
        if child is None:
            return 1
        if child.alive:
            reap_quietly([child], block=True)
        return 2 if child.exit_code == 2 else 1

    def _gone(self, now: float, since: float) -> None:
        """The broker is gone: start it again after the backoff."""
        self.state = "down"
        self._streak = 1 if now - since >= STABLE_AFTER else self._streak + 1
        delay = 0.0
        if self._streak > 1:
            delay = min(RESTART_BACKOFF_MAX, RESTART_BACKOFF * 2.0 ** (self._streak - 2))
        self._next_start = now + delay
        log.warning("supervisor.broker_restart", after=delay, failures=self._streak)

    def _close_ready(self) -> None:
        if self._ready_r is not None:
            os.close(self._ready_r)
            self._ready_r = None

    def owns(self, pid: int) -> bool:
        return self.child is not None and pid == self.child.pid

    def reaped(self, status: int) -> None:
        if self.child is not None:
            self.child.reaped(status)
            log.error("supervisor.broker_exited", how=self.child.describe_exit())

    def signal(self, sig: int) -> None:
        if self.child is not None:
            self.child.signal(sig)
