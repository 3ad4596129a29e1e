"""The broker of ``corral run``, as a child of the supervisor: started
before any worker, waited for until its log is replayed and its endpoints
are bound, and started again when it dies."""

from __future__ import annotations

import os
import select
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from corral.supervisor.process import Child
from corral.supervisor.roles import run_broker

if TYPE_CHECKING:
    from corral.config.schema import Config

log = structlog.get_logger()

BROKER_START_TIMEOUT = 120.0


class BrokerChild:
    """The broker process, if one was started. ``before_fork`` is called
    before each fork (to close what must not be inherited, such as a zmq
    context)."""

    def __init__(self, before_fork: Callable[[], None] = lambda: None) -> None:
        self.child: Child | None = None
        self.before_fork = before_fork

    @property
    def alive(self) -> bool:
        return self.child is not None and self.child.alive

    def start(self, config: Config) -> bool:
        """Fork the broker and wait until it is ready; False (and the broker
        killed) if it could not start."""
        ready_r, ready_w = os.pipe()

        def target(_: int | None) -> int:
            return run_broker(config, ready_w)  # ready_r was closed with the rest

        self.child = child = Child("broker", "corral: broker", target, keep_fds=(ready_w,))
        self.before_fork()
        child.start()
        os.close(ready_w)
        ready = _wait_readable(ready_r, BROKER_START_TIMEOUT)
        data = os.read(ready_r, 1) if ready else b""
        os.close(ready_r)
        if data != b"1":
            log.error(
                "supervisor.broker_failed_to_start",
                hint="see the broker's error above; nothing else was started",
            )
            child.signal(signal.SIGKILL)
            os.waitpid(child.pid or 0, 0)
            return False
        log.info("supervisor.broker_ready", pid=child.pid)
        return True

    def restart_if_gone(self, config: Config) -> bool:
        """Start the broker again if it exited; False if it could not."""
        if self.child is None or self.child.alive:
            return True
        self.child = None
        return self.start(config)

    def owns(self, pid: int) -> bool:
        return self.child is not None and pid == self.child.pid

    def reaped(self, status: int) -> None:
        if self.child is not None:
            self.child.reaped(status)
            log.error("supervisor.broker_exited", how=self.child.describe_exit())

    def signal(self, sig: int) -> None:
        if self.child is not None:
            self.child.signal(sig)


def _wait_readable(fd: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            readable, _, _ = select.select([fd], [], [], left)
        except InterruptedError:
            continue
        return bool(readable)
