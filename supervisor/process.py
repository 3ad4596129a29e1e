"""One child process: fork it, give it a title, make it die with its
parent, signal it, and read its exit status."""

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
    """A forked child running ``target``; its return value is the exit code."""

    def __init__(self, name: str, title: str, target: Callable[[], int]) -> None:
        self.name = name
        self.title = title
        self.target = target
        self.pid: int | None = None
        self.started_at = 0.0
        self.exit_code: int | None = None

    @property
    def alive(self) -> bool:
        return self.pid is not None and self.exit_code is None

    def start(self) -> int:
        parent = os.getpid()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            self._child_main(parent)
        self.pid = pid
        self.started_at = time.monotonic()
        self.exit_code = None
        return pid

    def _child_main(self, parent: int) -> None:
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
            code = self.target()
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
