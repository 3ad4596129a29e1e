"""One child process: fork it, give it a title, make it die with its
parent, signal it, read its exit status, and stop children in order
(TERM, a grace period, then KILL)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable

import psutil
import structlog

log = structlog.get_logger()

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies, then
    check the parent did not die before the request took effect."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the child's own parent check still applies
    if os.getppid() != parent_pid:
        os._exit(1)


def set_title(title: str) -> None:
    """Show ``title`` in ps and top (argv and the kernel's comm name)."""
    try:
        import setproctitle

        setproctitle.setproctitle(title)
    except ImportError:
        pass


class Child:
    """A forked child running ``target``; its return value is the exit code.

    With ``status_pipe`` the child gets the write end of a pipe (passed to
    ``target``) and the parent keeps the read end as ``status_fd``."""

    def __init__(
        self,
        name: str,
        title: str,
        target: Callable[[int | None], int],
        *,
        status_pipe: bool = False,
    ) -> None:
        self.name = name
        self.title = title
        self.target = target
        self.status_pipe = status_pipe
        self.status_fd: int | None = None
        self.pid: int | None = None
        self.started_at = 0.0
        self.exit_code: int | None = None
        # What the status pipe tells: jobs running (id -> (started, timeout)),
        # the last sign of life, and whether the child is being replaced.
        self.jobs: dict[str, tuple[float, float]] = {}
        #: Every socket identity (hex) the worker has connected with.
        self.identities: set[str] = set()
        self.identity = ""  # the one it uses now, as its last status line said
        self.cpu: tuple[float, float] | None = None  # see monitor.cpu_busy
        self.last_beat = 0.0
        self.retiring = ""
        self.last_rss = 0
        self.last_rss_check = 0.0
        self.killed_for = ""
        #: The jobs a kill was for (None: the cause is not known, so every
        #: job it had started is charged).
        self.charged: list[str] | None = None

    @property
    def alive(self) -> bool:
        return self.pid is not None and self.exit_code is None

    def start(self) -> int:
        parent = os.getpid()
        read_fd, write_fd = os.pipe() if self.status_pipe else (None, None)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            if read_fd is not None:
                os.close(read_fd)
            self._child_main(parent, write_fd)
        if write_fd is not None:
            os.close(write_fd)
            os.set_blocking(read_fd, False)  # type: ignore[arg-type]
        self.status_fd = read_fd
        self.pid = pid
        self.started_at = self.last_beat = time.monotonic()
        self.exit_code = None
        return pid

    def close_status(self) -> None:
        if self.status_fd is not None:
            os.close(self.status_fd)
            self.status_fd = None

    def _child_main(self, parent: int, status_fd: int | None) -> None:
        code = 1
        try:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            signal.set_wakeup_fd(-1)
            # Its own process group: a terminal's Ctrl-C reaches only the
            # supervisor, which stops the children in order (workers first).
            os.setpgid(0, 0)
            die_with_parent(parent)
            set_title(self.title)
            code = self.target(status_fd)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def signal(self, sig: int) -> None:
        if self.alive and self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def reaped(self, status: int) -> None:
        """Record the wait status ``waitpid`` returned for this child."""
        self.exit_code = os.waitstatus_to_exitcode(status)
        self.close_status()

    def rss(self) -> int | None:
        """Resident memory in bytes, or None if the process is gone."""
        if not self.alive or self.pid is None:
            return None
        try:
            return psutil.Process(self.pid).memory_info().rss
        except psutil.Error:
            return None

    def describe_exit(self) -> str:
        code = self.exit_code
        if code is None:
            return "running"
        if code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exited with code {code}"


def stop_children(children: list[Child], timeout: float, pause: Callable[[float], None]) -> None:
    """SIGTERM each child, wait up to ``timeout`` for them to exit (``pause``
    sleeps between looks, waking early for a signal), then SIGKILL the rest."""
    for child in children:
        child.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(c.alive for c in children) and time.monotonic() < deadline:
        reap_quietly(children)
        pause(0.1)
    for child in children:
        if child.alive:
            log.warning("supervisor.kill", child=child.name, pid=child.pid)
            child.signal(signal.SIGKILL)
    reap_quietly(children, block=True)


def reap_quietly(children: list[Child], block: bool = False) -> None:
    """Collect the exit status of those ``children`` that have exited."""
    for child in children:
        if not child.alive or child.pid is None:
            continue
        try:
            pid, status = os.waitpid(child.pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            child.exit_code = -1
            continue
        if pid:
            child.reaped(status)
