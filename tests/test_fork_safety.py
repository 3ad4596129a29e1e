"""A worker's subprocesses die with it: a kill ends the worker's process
group, and whatever a worker leaves in its group is killed once it has
exited; a drain's SIGTERM goes to the worker alone."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from conftest import (
    FAST_RETRY,
    Env,
    json_events,
    wait_for,
    worker_processes,
)

import corral
from corral.supervisor.process import Child, stop_children

# ------------------------------------------------------------ helpers


@contextlib.contextmanager
def forked(child: Child) -> Iterator[int]:
    """Start ``child``, yield its exit code once it has exited (polled
    against a deadline), and kill it if it has not."""
    pid = child.start()
    try:

        def exited() -> bool:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:  # recorded, but its status pipe stays open for the test
                child.exit_code = os.waitstatus_to_exitcode(status)
            return not child.alive

        wait_for(exited, 30, message="the forked child to exit")
        yield child.exit_code or 0
    finally:
        if child.alive:
            kill_pid(pid)
            os.waitpid(pid, 0)
        child.close_status()


def gone(pid: int) -> bool:
    """Whether ``pid`` no longer runs (a zombie left for PID 1 to reap counts
    as gone: it was killed)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def spawn(path: Path, then: str, seconds: float) -> dict[str, object]:
    """The payload of e2e.subprocess."""
    return {"path": str(path), "then": then, "seconds": seconds}


def read_pid(path: Path) -> int:
    wait_for(path.exists, 30, message=f"the task to write {path.name}")
    return int(path.read_text())


def kill_pid(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def reporting(out: Path, report: Callable[[int | None], object]) -> Callable[[int | None], int]:
    """A child target that writes what ``report`` returns to ``out`` as JSON."""

    def target(status_fd: int | None) -> int:
        out.write_text(json.dumps(report(status_fd)))
        return 0

    return target


# ------------------------------------------- a worker's subprocesses die with it


def test_a_hard_timeout_kill_takes_the_tasks_subprocess_with_it(env: Env) -> None:
    env.write_config(processes=1, prefetch=0, extra_broker=FAST_RETRY)
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(1)
    client = env.client()
    pid_file = env.home / "sleep.pid"
    job_id = client.enqueue(
        "e2e.subprocess", spawn(pid_file, "hang", 300), timeout=1, max_attempts=1
    )
    sleeper = read_pid(pid_file)
    try:
        assert not gone(sleeper)
        with pytest.raises(corral.JobFailed):
            client.result(job_id, timeout=60)
        wait_for(lambda: gone(sleeper), 30, message=f"the task's sleep {sleeper} to be killed")
    finally:
        kill_pid(sleeper)
    assert "supervisor.kill_worker" in daemon.output()


def test_a_crashed_worker_leaves_no_child_of_its_task(env: Env) -> None:
    env.write_config(processes=1, prefetch=0)
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(1)
    client = env.client()
    pid_file = env.home / "sleep.pid"
    job_id = client.enqueue("e2e.subprocess", spawn(pid_file, "crash", 300), max_attempts=1)
    sleeper = read_pid(pid_file)
    try:
        with pytest.raises(corral.JobFailed):
            client.result(job_id, timeout=60)
        wait_for(lambda: gone(sleeper), 30, message=f"the task's sleep {sleeper} to be killed")
    finally:
        kill_pid(sleeper)
    killed = wait_for(
        lambda: [
            e for e in json_events(daemon.output()) if e["event"] == "supervisor.group_killed"
        ],
        10,
        message="the group_killed line",
    )
    assert killed[0]["processes"] == 1 and killed[0]["pids"] == [sleeper]


def test_a_drain_lets_the_tasks_subprocess_finish(env: Env) -> None:
    """SIGTTOU scales the pool down: its worker drains (SIGTERM to it alone),
    and its job's subprocess runs to its end rather than being terminated."""
    env.write_config(processes=1, prefetch=0)
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(1)
    client = env.client()
    pid_file = env.home / "sleep.pid"
    job_id = client.enqueue("e2e.subprocess", spawn(pid_file, "wait", 2))
    sleeper = read_pid(pid_file)
    try:
        daemon.signal(signal.SIGTTOU)
        wait_for(lambda: "supervisor.scaled" in daemon.output(), 10, message="the scale-down")
        assert client.result(job_id, timeout=30) == 0  # not -15: the sleep was not TERMed
    finally:
        kill_pid(sleeper)
    wait_for(lambda: not worker_processes(daemon), 30, message="the drained worker to leave")


def test_stop_children_kills_the_group_of_a_child_that_ignores_sigterm(tmp_path: Path) -> None:
    """Shutdown: the TERM goes to the child alone (it ignores it here), the
    final KILL to its group, so its subprocess goes too."""
    pid_file = tmp_path / "sleep.pid"

    def target(_: int | None) -> int:
        import subprocess
        import time

        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sleeper = subprocess.Popen(["sleep", "300"])
        pid_file.write_text(str(sleeper.pid))
        time.sleep(300)
        return 0

    child = Child("t", "corral: test child", target)
    pid = child.start()
    sleeper: int | None = None
    try:
        sleeper = read_pid(pid_file)
        stop_children([child], 0.5, time.sleep)
        assert child.describe_exit() == "killed by SIGKILL"
        wait_for(lambda: gone(sleeper), 30, message=f"the child's sleep {sleeper} to be killed")
    finally:
        if child.alive:
            kill_pid(pid)
            os.waitpid(pid, 0)
        if sleeper is not None:
            kill_pid(sleeper)
