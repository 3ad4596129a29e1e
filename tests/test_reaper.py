"""A pytest that is killed (SIGTERM, SIGHUP) takes every process its tests
started with it, even one in its own session (tests/reaper.py): a real
pytest, a real grandchild, a real signal."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import wait_for

INNER = """
import subprocess, sys, time
from pathlib import Path

def test_starts_a_daemon_and_waits():
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True
    )
    Path({out!r}).write_text(str(child.pid))
    time.sleep(600)
"""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def spawned() -> Iterator[list[int]]:
    pids: list[int] = []
    yield pids
    for pid in pids:  # whatever the test's verdict, nothing outlives it
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize(
    ("signum", "xdist"),
    [(signal.SIGTERM, True), (signal.SIGHUP, False)],
    ids=["sigterm-xdist", "sighup-plain"],
)
def test_a_killed_pytest_kills_what_its_tests_started(
    tmp_path: Path, spawned: list[int], signum: int, xdist: bool
) -> None:
    out = tmp_path / "daemon.pid"
    (tmp_path / "test_inner.py").write_text(INNER.format(out=str(out)))
    args = [sys.executable, "-m", "pytest", "-q", "-p", "reaper", "-p", "no:cacheprovider"]
    args += ["-n", "1"] if xdist else ["-p", "no:xdist"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    inner = subprocess.Popen(
        [*args, str(tmp_path / "test_inner.py")],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    spawned.append(inner.pid)
    try:
        wait_for(lambda: out.exists() and out.read_text(), 60, message="the inner test's daemon")
        daemon = int(out.read_text())
        spawned.append(daemon)
        assert not _gone(daemon)
        inner.send_signal(signum)
        assert inner.wait(30) == -signum  # it ends as the signal would end it
        wait_for(lambda: _gone(daemon), 10, message="the daemon to be killed with pytest")
    finally:
        if inner.poll() is None:
            os.killpg(inner.pid, signal.SIGKILL)
            inner.wait(10)
