"""The supervisor's control path: what signals asked for, and the wake-up
pipe they ring so that the loop's sleep ends at once.

Signal handlers only set flags; the loop does the work. TERM and INT ask
for a drain (a second INT kills everything now), HUP for a reload, TTIN and
TTOU for one worker more or fewer in each pool.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
from collections.abc import Callable

#: Signals whose default action does not end a process, or that must keep
#: it (a stop from the terminal, a crash signal's core dump).
HARMLESS = {
    signal.SIGCONT,
    signal.SIGURG,
    signal.SIGWINCH,
    signal.SIGTSTP,
    signal.SIGSTOP,
    signal.SIGKILL,
    signal.SIGSEGV,
    signal.SIGBUS,
    signal.SIGFPE,
    signal.SIGILL,
    signal.SIGABRT,
    signal.SIGTRAP,
    signal.SIGSYS,
    signal.SIGQUIT,
}

#: The signals the supervisor handles.
SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGCHLD,
    signal.SIGHUP,
    signal.SIGTTIN,
    signal.SIGTTOU,
)


class Control:
    """Requests to stop, reload and scale, as the signals set them."""

    def __init__(self, kill_all: Callable[[int], None]) -> None:
        #: Sends a signal to every child; a second Ctrl-C uses it to SIGKILL.
        self._kill_all = kill_all
        #: How many times a stop was asked for.
        self.stop_requested = 0
        self._reload_requested = False
        self._scale_requests = 0
        self._wake_r = -1
        #: Signals received that the supervisor ignores (logged on the tick).
        self.stray: list[int] = []

    @property
    def stopping(self) -> bool:
        return self.stop_requested > 0

    def install(self) -> None:
        """Handle the signals and let each one wake :meth:`wait`. Every other
        signal whose default would end the supervisor (and with it the
        service: USR1 from a log rotation, ALRM, a real-time signal...) is
        logged and otherwise ignored."""
        self._wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        for sig in SIGNALS:
            signal.signal(sig, self._on_signal)
        for sig in signal.valid_signals():
            if sig in SIGNALS or sig in HARMLESS or signal.getsignal(sig) != signal.SIG_DFL:
                continue
            with contextlib.suppress(OSError, ValueError):  # KILL, STOP, glibc's own
                signal.signal(sig, self._on_stray)

    def _on_stray(self, signum: int, frame: object) -> None:
        self.stray.append(signum)

    def request_stop(self) -> None:
        self.stop_requested = 1

    def take_reload(self) -> bool:
        """Whether a reload was asked for since the last call."""
        requested, self._reload_requested = self._reload_requested, False
        return requested

    def take_scale(self) -> int:
        """Workers to add (or, if negative, remove) since the last call."""
        delta, self._scale_requests = self._scale_requests, 0
        return delta

    def wait(self, timeout: float, also: tuple[int, ...] = ()) -> None:
        """Sleep until a signal, one of the fds ``also`` is readable, or
        ``timeout`` seconds."""
        select.select([self._wake_r, *also], [], [], timeout)  # retried on EINTR (PEP 475)
        _drain(self._wake_r)

    def _on_signal(self, signum: int, frame: object) -> None:
        if signum == signal.SIGHUP:
            self._reload_requested = True
        elif signum == signal.SIGTTIN:
            self._scale_requests += 1
        elif signum == signal.SIGTTOU:
            self._scale_requests -= 1
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stop_requested += 1
            if self.stop_requested > 1 and signum == signal.SIGINT:
                self._kill_all(signal.SIGKILL)
                os._exit(1)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except (BlockingIOError, InterruptedError):
        pass
