"""When pytest itself is killed (``timeout``, a CI runner's SIGTERM, a
closed terminal's SIGHUP), it runs no teardown: every broker, supervisor
and producer a test started would run on, in its own session, for as long
as its test would have. :func:`install` makes those signals first kill
every process descended from this one (the xdist workers, the fork server
and what each started), then end pytest as the signal would have."""

from __future__ import annotations

import contextlib
import os
import signal
from types import FrameType

import psutil

SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def kill_descendants() -> int:
    """SIGKILL every living descendant of this process, deepest first
    found; returns how many were signalled."""
    try:
        found = psutil.Process().children(recursive=True)
    except psutil.Error:
        return 0
    killed = 0
    for proc in found:
        with contextlib.suppress(psutil.Error):
            proc.kill()
            killed += 1
    return killed


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    kill_descendants()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def install() -> None:
    """Reap descendants on SIGTERM and SIGHUP (main thread only; a handler
    someone installed already is kept)."""
    for signum in SIGNALS:
        if signal.getsignal(signum) in (signal.SIG_DFL, None):
            signal.signal(signum, _on_signal)


def pytest_configure() -> None:
    """As a plugin (``-p reaper``): :func:`install` (tests/conftest.py calls
    it for the suite)."""
    install()
