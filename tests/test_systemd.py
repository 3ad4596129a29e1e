"""sd_notify over a real unix datagram socket passed as NOTIFY_SOCKET, and
workers that never outlive their supervisor."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator

import psutil
from conftest import CORRAL, Env, wait_for, worker_processes

import corral
from corral.supervisor.notify import Notifier


def _messages(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


class Notified:
    """`corral run` under a notify socket, as systemd runs it: ``seen`` holds
    every datagram it sent so far (:meth:`got` reads the new ones)."""

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self.proc = proc
        self.sock = sock
        self.seen: list[str] = []

    def got(self, text: str) -> bool:
        self.seen.extend(_messages(self.sock))
        return any(text in m for m in self.seen)


@contextlib.contextmanager
def notified_run(env: Env, watchdog_usec: int) -> Iterator[Notified]:
    """Start `corral run` with NOTIFY_SOCKET and WATCHDOG_USEC set; killed
    (its whole session) and the socket closed on the way out."""
    path = str(env.home / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    log = open(env.home / "notify-run.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [CORRAL, "run", "-c", str(env.config)],
        cwd=env.home,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": str(watchdog_usec)},
    )
    try:
        yield Notified(proc, sock)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()
        sock.close()


def test_notify_ready_status_watchdog_stopping(env: Env) -> None:
    with notified_run(env, 400_000) as run:
        proc, seen, got = run.proc, run.seen, run.got
        wait_for(lambda: got("READY=1"), 30, message="READY=1")
        ready = next(m for m in seen if "READY=1" in m)
        # more time was asked for while the broker replayed its log
        assert any("EXTEND_TIMEOUT_USEC=" in m for m in seen[: seen.index(ready)])
        assert f"MAINPID={proc.pid}" in ready
        assert "STATUS=workers: default" in ready
        # The log was replayed before READY: the broker answers at once.
        assert env.client().ping()
        wait_for(
            lambda: got("WATCHDOG=1") and sum("WATCHDOG=1" in m for m in seen) >= 3,
            10,
            message="three watchdog pings",
        )
        wait_for(lambda: got("STATUS=workers: default 2/2"), 10, message="STATUS with 2 workers")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert got("STOPPING=1")


def test_watchdog_only_while_healthy_and_at_half_interval(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "n.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"})
    assert notifier.watchdog_interval == 1.0
    notifier.watchdog(100.0, healthy=False)
    assert _messages(sock) == []
    notifier.watchdog(100.0, healthy=True)
    notifier.watchdog(100.2, healthy=True)  # too soon: half the interval is 0.5 s
    assert _messages(sock) == ["WATCHDOG=1"]
    notifier.watchdog(100.6, healthy=True)
    notifier.status("a")
    notifier.status("a")  # unchanged: not resent
    notifier.reloading()
    got = _messages(sock)
    assert got[:2] == ["WATCHDOG=1", "STATUS=a"]
    assert got[2].startswith("RELOADING=1\nMONOTONIC_USEC=")
    notifier.close()
    sock.close()
    assert not Notifier({}).enabled
    assert Notifier({"NOTIFY_SOCKET": "@abstract"}).address == "\0abstract"
    assert Notifier({"WATCHDOG_USEC": "5", "WATCHDOG_PID": "1"}).watchdog_interval is None


def test_workers_die_with_a_killed_supervisor(env: Env) -> None:
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(2)
    children = daemon.descendants()
    assert len(worker_processes(daemon)) == 2
    os.kill(daemon.pid, signal.SIGKILL)

    def all_gone() -> bool:
        return not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)

    wait_for(all_gone, 2.0, message="every child to die within 2 s of the supervisor")


def test_status_shows_supervisors_pools_and_processes(env: Env) -> None:
    env.write_config(processes=2, prefetch=0)
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(2)
    client = env.client()
    # Long enough to be still running when the `corral status` below starts on
    # a loaded machine (2 s was not); teardown kills the daemon, so no one waits.
    job_id = client.enqueue("e2e.sleep", 60.0)
    wait_for(lambda: client.job(job_id).status == "running", message="the job to start")

    def reported() -> object:
        status = client.status()
        sup = status.supervisors[0] if status.supervisors else None
        return sup if sup and any(job_id in w.jobs for w in sup.workers) else None

    sup = wait_for(reported, 10, message="a supervisor report naming the running job")
    assert sup.pid == daemon.pid
    assert [(p.name, p.processes, p.failed) for p in sup.pools] == [("default", 2, False)]
    pids = {p.pid for p in worker_processes(daemon)}
    assert {w.pid for w in sup.workers} == pids
    assert all(w.rss > 1_000_000 for w in sup.workers)
    human = env.run("status", "-c", str(env.config)).stdout
    assert f"supervisor {sup.supervisor_id}" in human
    assert job_id in human


def test_unit_file_is_hardened() -> None:
    from pathlib import Path

    unit = (Path(__file__).parent.parent / "config" / "corral.service").read_text()
    settings = {}
    for line in unit.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    assert settings["Type"] == "notify"
    assert settings["DynamicUser"] == "yes" or settings.get("User")
    for key in ("StateDirectory", "RuntimeDirectory", "WatchdogSec", "ExecReload"):
        assert settings.get(key), key
    assert settings["NoNewPrivileges"] == "yes"
    assert settings["ProtectSystem"] == "strict"
    assert settings["PrivateTmp"] == "yes"
    assert settings["SystemCallFilter"].startswith("@system-service")
    assert settings["UMask"] == "0077"
    assert "AF_UNIX" in settings["RestrictAddressFamilies"]


def test_the_watchdog_goes_on_while_the_broker_replays_a_long_log(env: Env) -> None:
    """A log of 60,000 jobs takes a while to replay: meanwhile the
    supervisor's loop runs, pets the watchdog and asks for more start time,
    and READY=1 comes once the broker answers. (Each job has a unique key,
    so each is a record of its own: plain jobs are logged in batches, which
    replay too fast to see the watchdog petted twice. The watchdog's 20 ms
    is petted every 10 ms, the loop's wait shortened to match: with the
    segment's chunk indexes a quiet machine's replay and start took less
    than the 0.25 s tick, and the test saw one pet, now and then.)"""
    env.write_config(processes=1, fsync="never")
    broker = env.start("broker")
    env.wait_ready(broker)
    client = env.client(timeout=30.0)
    for batch in range(6):
        client.enqueue_many(
            [corral.Job("e2e.noop", "x" * 100, unique_key=f"k{batch}-{i}") for i in range(10_000)]
        )
    broker.signal(signal.SIGTERM)
    assert broker.wait(30) == 0
    with notified_run(env, 20_000) as run:
        seen = run.seen
        wait_for(lambda: run.got("READY=1"), 60, message="READY=1")
        before = seen[: next(i for i, m in enumerate(seen) if "READY=1" in m)]
        assert any("EXTEND_TIMEOUT_USEC=" in m for m in before)
        assert sum("WATCHDOG=1" in m for m in before) >= 3, before


def test_the_generated_unit_runs_this_installs_corral_on_the_given_config(env: Env) -> None:
    from pathlib import Path

    done = env.run("systemd-unit", "-c", str(env.config))
    assert done.returncode == 0, done.stderr
    settings = {}
    for line in done.stdout.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), value.strip())
    for key in ("ExecStartPre", "ExecStart"):
        program, *args = settings[key].split()
        assert Path(program).is_absolute() and Path(program).is_file(), settings[key]
        assert Path(program).resolve() == Path(CORRAL).resolve()
        assert args[-2:] == ["-c", str(env.config.resolve())]
    assert settings["ExecStart"].split()[1] == "run"
    assert settings["ExecStartPre"].split()[1] == "check-config"
    doc = settings.get("Documentation", "")
    assert not doc or Path(doc.removeprefix("file://")).is_file(), doc
    # the tests' home is under /tmp: the unit's PrivateTmp would hide the config
    assert "PrivateTmp=yes hides" in done.stderr
    # what the unit runs works: its ExecStartPre passes on this config
    check = subprocess.run(settings["ExecStartPre"].split(), capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    # systemd's own check of the unit, where this machine has it
    analyze = shutil.which("systemd-analyze")
    if analyze:
        unit = env.home / "corral.service"
        unit.write_text(done.stdout)
        verified = subprocess.run(
            [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
        )
        assert verified.returncode == 0, verified.stderr


def test_the_generated_unit_makes_the_service_a_member_of_its_socket_group(env: Env) -> None:
    """With ``socket_group`` the broker must be a member of the group to
    give its sockets to it; under ``DynamicUser`` only the unit can make
    it one (``SupplementaryGroups=``), so the generated unit says it. A
    config that names none gets no such line."""
    done = env.run("systemd-unit", "-c", str(env.config))
    assert done.returncode == 0, done.stderr
    assert "SupplementaryGroups" not in done.stdout
    env.write_config(extra_broker='socket_group = "corral-clients"')
    done = env.run("systemd-unit", "-c", str(env.config))
    assert done.returncode == 0, done.stderr
    service = done.stdout.split("[Service]\n", 1)[1].split("\n[", 1)[0]
    assert "SupplementaryGroups=corral-clients" in service.splitlines(), done.stdout
