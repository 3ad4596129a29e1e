"""A stop signal sent to a child right as it is forked is not lost: the
child inherits the supervisor's own handlers until it resets them, and a
SIGTERM landing in that window ran the supervisor's handler in the child
and was gone; the worker then ran on, unstopped, until the stopping
supervisor SIGKILLed it (found stopping ``corral run`` as a recycled
worker was replaced)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from corral.supervisor.process import Child


@pytest.fixture
def supervisor_handlers() -> Iterator[list[int]]:
    """SIGTERM and SIGINT handled in Python, as the supervisor does."""
    seen: list[int] = []
    old = {
        sig: signal.signal(sig, lambda n, f: seen.append(n))
        for sig in (signal.SIGTERM, signal.SIGINT)
    }
    yield seen
    for sig, handler in old.items():
        signal.signal(sig, handler)


def _nap(fd: int | None) -> int:
    time.sleep(30)
    return 0


def test_a_sigterm_sent_as_the_child_is_forked_still_stops_it(
    supervisor_handlers: list[int],
) -> None:
    children = []
    try:
        for _ in range(20):
            child = Child("nap", "nap", _nap)
            child.start()
            child.signal(signal.SIGTERM)  # at once: the child may not have run yet
            children.append(child)
        deadline = time.monotonic() + 10
        left = {c.pid for c in children}
        while left and time.monotonic() < deadline:
            for pid in list(left):
                assert pid is not None
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done:
                    left.discard(pid)
            time.sleep(0.05)
        assert not left, f"{len(left)} of 20 children lived on after their SIGTERM"
    finally:
        for child in children:
            if child.pid is not None:
                try:
                    os.kill(child.pid, signal.SIGKILL)
                    os.waitpid(child.pid, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass
    assert not supervisor_handlers  # the parent's handler never ran for them
