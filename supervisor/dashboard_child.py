"""The dashboard of ``corral run`` (``[dashboard] listen`` set): ``corral
dashboard`` on the same config, as a child process of the supervisor,
started after the broker and started again when it exits (with backoff: at
once the first time, then 1 s, 2 s ... up to 30 s; one that ran a minute
starts afresh). It dies with the supervisor (PR_SET_PDEATHSIG) and gets
SIGTERM at shutdown. It is a web page, not the queue: a dashboard that cannot
start (its port taken) is logged and tried again, and nothing else waits for it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import structlog

from corral.supervisor.process import die_with_parent

log = structlog.get_logger()

RESTART_BACKOFF = 1.0
RESTART_BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0


class DashboardChild:
    """The ``corral dashboard`` process of ``corral run`` (see the module docstring)."""

    def __init__(self, config_path: str) -> None:
        self.config_path = os.path.abspath(config_path)
        self.proc: subprocess.Popen[bytes] | None = None
        self._started = 0.0
        self._next_start = 0.0
        self._backoff = 0.0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def owns(self, pid: int) -> bool:
        return self.proc is not None and self.proc.pid == pid

    def poll(self, now: float) -> None:
        """Start the dashboard if it is not running and its backoff is over."""
        if self.proc is not None or now < self._next_start:
            return
        parent = os.getpid()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "corral.cli", "dashboard", "-c", self.config_path],
                stdin=subprocess.DEVNULL,
                preexec_fn=lambda: die_with_parent(parent),
            )
        except OSError as exc:
            log.error("supervisor.dashboard_cannot_start", error=str(exc))
            self._after_exit(now, ran=0.0)
            return
        self._started = now
        log.info("supervisor.dashboard_started", pid=self.proc.pid)

    def reaped(self, status: int, now: float) -> None:
        """The supervisor's waitpid found the dashboard gone (exit ``status``)."""
        assert self.proc is not None
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        log.warning("supervisor.dashboard_exited", pid=self.proc.pid, code=self.proc.returncode)
        ran = now - self._started
        self.proc = None
        self._after_exit(now, ran)

    def _after_exit(self, now: float, ran: float) -> None:
        if ran >= STABLE_AFTER:
            self._backoff = 0.0
        self._next_start = now + self._backoff
        self._backoff = min(RESTART_BACKOFF_MAX, max(RESTART_BACKOFF, self._backoff * 2))

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        except ChildProcessError:  # reaped by the supervisor's waitpid meanwhile
            pass
