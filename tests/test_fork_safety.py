"""Forking is safe and a worker's subprocesses die with it: a forked child
starts with default signal dispositions, no blocked signals and none of its
parent's file descriptors; the supervisor has no zmq context (or thread)
alive when it forks; a kill ends the worker's process group, and whatever a
worker leaves in its group is killed once it has exited."""

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
    Proc,
    json_events,
    kill_broker,
    wait_for,
    worker_processes,
)

import corral
from corral.config import load
from corral.supervisor.children import Children
from corral.supervisor.process import Child, os_threads, stop_children
from corral.supervisor.report import BrokerLink

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
    """The pid a task or child writes to ``path``, once it is all there (a
    writer that opens the file, then writes, is seen in between)."""

    def written() -> bool:
        return path.exists() and path.read_text().strip().isdigit()

    wait_for(written, 30, message=f"the task to write {path.name}")
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


# ------------------------------------------------- a clean child, in-process


HANDLED = (
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGTERM,
    signal.SIGCHLD,
    signal.SIGALRM,
)


def test_a_child_starts_with_default_signals_and_nothing_blocked(tmp_path: Path) -> None:
    out = tmp_path / "signals.json"

    def report(_: int | None) -> dict[str, object]:
        return {
            "dispositions": {
                signal.Signals(s).name: str(signal.getsignal(s)) for s in (*HANDLED, signal.SIGPIPE)
            },
            "blocked": sorted(
                signal.Signals(s).name for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])
            ),
            "wakeup_fd": signal.set_wakeup_fd(-1),
        }

    def handler(signum: int, frame: object) -> None:
        pass

    previous = {sig: signal.signal(sig, handler) for sig in HANDLED}
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK)
    old_wakeup = signal.set_wakeup_fd(wake_w)
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR2, signal.SIGTTIN])
    try:
        with forked(Child("t", "corral: test child", reporting(out, report))) as code:
            assert code == 0
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGUSR2, signal.SIGTTIN])
        signal.set_wakeup_fd(old_wakeup)
        os.close(wake_r)
        os.close(wake_w)
        for sig, old in previous.items():
            signal.signal(sig, old)
    seen = json.loads(out.read_text())
    default = str(signal.SIG_DFL)
    assert seen["dispositions"] == {
        **{signal.Signals(s).name: default for s in HANDLED},
        "SIGPIPE": str(signal.SIG_IGN),  # as Python starts it: a closed pipe raises
    }
    assert seen["blocked"] == []
    assert seen["wakeup_fd"] == -1


def test_a_child_keeps_only_stdio_its_status_pipe_and_the_fds_it_is_given(
    tmp_path: Path,
) -> None:
    out = tmp_path / "fds.json"
    marker = tmp_path / "inherited-marker"
    extra = os.open(marker, os.O_CREAT | os.O_WRONLY)  # not CLOEXEC: fork keeps it
    kept_r, kept_w = os.pipe()

    def report(status_fd: int | None) -> dict[str, object]:
        targets = {}
        for name in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):  # listdir's own fd, closed by now
                targets[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        return {"targets": targets, "status_fd": status_fd}

    target = reporting(out, report)
    child = Child("t", "corral: test child", target, status_pipe=True, keep_fds=(kept_w,))
    try:
        with forked(child) as code:
            status_inode = os.fstat(child.status_fd or -1).st_ino
            kept_inode = os.fstat(kept_w).st_ino
            assert code == 0
    finally:
        for fd in (extra, kept_r, kept_w):
            os.close(fd)
    seen = json.loads(out.read_text())
    targets = {int(fd): target for fd, target in seen["targets"].items()}
    assert str(marker) not in targets.values(), "the parent's file was inherited"
    status_fd = seen["status_fd"]
    assert targets.get(status_fd) == f"pipe:[{status_inode}]", "the status pipe was not kept"
    assert targets.get(kept_w) == f"pipe:[{kept_inode}]", "a kept fd was closed"
    assert {0, 1, 2} <= set(targets)
    pipes = [t for t in targets.values() if t.startswith("pipe:")]
    # No other pipe than the two it keeps, beyond what stdio may be.
    stdio = {targets[fd] for fd in (0, 1, 2)}
    assert set(pipes) - stdio == {f"pipe:[{status_inode}]", f"pipe:[{kept_inode}]"}


# --------------------------------------------------- no zmq context at fork


def test_closing_the_broker_link_ends_its_zmq_threads(env: Env) -> None:
    """Nothing answers at the link's endpoint: the failed report still
    starts its context's threads, and close() ends them."""
    config = load(env.config)
    link = BrokerLink(config)
    before = os_threads()
    link.report(1e9, [], Children(config, 1.0))
    assert os_threads() > before, "the report made no zmq context (test premise)"
    link.close()
    wait_for(lambda: os_threads() == before, 10, message="the link's threads to end")
    link.close()  # twice is fine


def _debug(env: Env, **options: object) -> None:
    env.write_config(**options)  # type: ignore[arg-type]
    env.config.write_text(env.config.read_text().replace('level = "info"', 'level = "debug"'))


def test_the_supervisor_forks_with_no_zmq_context_or_thread_alive(env: Env) -> None:
    """Each fork is logged with the supervisor's thread count (native
    threads included). After a worker's crash the supervisor tells the
    broker (its zmq context starts I/O threads) and then forks the
    replacement; after the broker's death it forks a new broker. Both forks
    must find the supervisor with one thread: its context closed."""
    _debug(env, processes=2)
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(2)
    client = env.client()
    wait_for(lambda: client.status().supervisors, 10, message="a supervisor report")
    victim = worker_processes(daemon)[0].pid
    os.kill(victim, signal.SIGKILL)
    wait_for(
        lambda: len(forks(daemon.output(), "default#")) >= 3,
        30,
        message="the replacement worker's fork",
    )
    wait_for(lambda: reported_workers(client) == live_workers(daemon), 30, message="a report")
    kill_broker(env, daemon)  # a report came after the fork: the link is open again
    wait_for(
        lambda: len(forks(daemon.output(), "broker")) >= 2, 30, message="the new broker's fork"
    )
    events = json_events(daemon.output())
    assert [e for e in events if e["event"] == "supervisor.broker_told"], "the link was not used"
    fork_events = [e for e in events if e["event"] == "supervisor.fork"]
    assert [e["threads"] for e in fork_events] == [1] * len(fork_events), fork_events
    assert not [e for e in events if e["event"] == "supervisor.fork_with_threads"]


def reported_workers(client: corral.Client) -> set[int]:
    """The worker pids the supervisor last reported to the broker."""
    return {w.pid for s in client.status().supervisors for w in s.workers}


def live_workers(daemon: Proc) -> set[int]:
    return {p.pid for p in worker_processes(daemon)}


def events_named(output: str, name: str) -> list[dict[str, object]]:
    return [e for e in json_events(output) if e["event"] == name]


def forks(output: str, child: str) -> list[dict[str, object]]:
    return [
        e
        for e in json_events(output)
        if e["event"] == "supervisor.fork" and str(e["child"]).startswith(child)
    ]


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
