"""What the peers need besides corral: their venv, a redis-server, and
processes started and stopped the way bench/harness.py does it.

* :func:`ensure_venv` makes ``bench/.peers-venv`` from
  ``bench/peers/requirements.txt`` (again whenever that file changes);
* :func:`ensure_redis` finds ``redis-server``, or installs Debian's package
  with apt-get when running as root;
* :class:`RedisServer` runs one on a free loopback port in a scratch dir,
  with ``appendonly yes`` and the ``appendfsync`` under test;
* :func:`spawn` starts a process in its own process group, registered with a
  harness :class:`~harness.Instance` so that its ``close()`` stops it, and
  :func:`stop_all` also kills what left the groups (RQ's work horses call
  ``setpgrp``).

Each ``ensure_*`` returns a reason instead of raising, so run.py can skip the
peers with that message and still measure corral.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import psutil
from harness import REPO, Instance, Proc

PEERS_DIR = REPO / "bench" / "peers"
VENV = REPO / "bench" / ".peers-venv"
REQUIREMENTS = PEERS_DIR / "requirements.txt"
INSTALL_TIMEOUT = 900.0
READY_TIMEOUT = 30.0


def ensure_venv(venv: Path = VENV, requirements: Path = REQUIREMENTS) -> Path | str:
    """The peers' python, after installing ``requirements`` into ``venv`` if its
    stamp (the requirements' hash) differs; or why it could not be made."""
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()
    stamp = venv / ".requirements-sha256"
    python = venv / "bin" / "python"
    if python.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return python
    print(f"making the peers' venv {venv} from {requirements} ...", file=sys.stderr)
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"],
        [str(python), "-m", "pip", "install", "--quiet", "-r", str(requirements)],
    ]
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"`{' '.join(step)}` failed: {exc}"
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
            return f"`{' '.join(step)}` exited {done.returncode}:\n{tail}"
    stamp.write_text(digest + "\n")
    return python


def ensure_redis() -> Path | str:
    """The redis-server binary; installs Debian's ``redis-server`` package
    when it is missing and this is root with apt-get. Else why not."""
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return (
            "redis-server is not installed and this is not root with apt-get: "
            "install Debian's package `redis-server` (apt-get install redis-server)"
        )
    print("installing redis-server with apt-get ...", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "redis-server"]
    for attempt in (install, ["apt-get", "update", "-q"], install):
        try:
            subprocess.run(attempt, capture_output=True, env=env, timeout=INSTALL_TIMEOUT)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"`{' '.join(attempt)}` failed: {exc}"
        found = shutil.which("redis-server")
        if found:
            return Path(found)
    return "apt-get could not install redis-server (see `apt-get install redis-server`)"


def redis_version(binary: Path) -> str:
    try:
        return subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spawn(
    inst: Instance,
    name: str,
    command: list[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    stdin: int | None = subprocess.DEVNULL,
    stdout: int | None = None,
) -> Proc:
    """Start ``command`` in its own process group, logged to a file in the
    instance's dir (stdout too unless ``stdout`` is PIPE)."""
    log_path = inst.root / f"{name}-{len(inst.procs)}.log"
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(
            command,
            cwd=cwd or inst.root,
            env=dict(env) if env is not None else None,
            stdin=stdin,
            stdout=stdout if stdout is not None else log,
            stderr=log,
            start_new_session=True,
        )
    proc = Proc(name, popen, log_path)
    inst.procs.append(proc)
    return proc


def descendants(procs: list[Proc]) -> list[psutil.Process]:
    """Every live descendant of ``procs`` (to be killed with them)."""
    found: list[psutil.Process] = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            found += psutil.Process(proc.popen.pid).children(recursive=True)
    return found


def stop_all(inst: Instance) -> None:
    """Stop every process of ``inst`` (process groups, as harness does), then
    SIGKILL any descendant that had left its group; remove the dir."""
    strays = descendants(inst.procs)
    inst.close()
    for child in strays:
        with contextlib.suppress(psutil.Error):
            if child.is_running():
                child.send_signal(signal.SIGKILL)


def stop(inst: Instance, procs: list[Proc]) -> None:
    """Stop ``procs`` (and strays of theirs) now, leaving the rest of ``inst``."""
    strays = descendants(procs)
    for proc in procs:
        inst.stop(proc)
        inst.procs.remove(proc)
    for child in strays:
        with contextlib.suppress(psutil.Error):
            if child.is_running():
                child.send_signal(signal.SIGKILL)


def tree_cpu(pids: list[int]) -> float:
    """CPU seconds used by processes ``pids`` and all their descendants, live
    or reaped by them (user + system + reaped children's)."""
    seen: set[int] = set()
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                if proc.pid in seen:
                    continue
                seen.add(proc.pid)
                with contextlib.suppress(psutil.Error):
                    t = proc.cpu_times()
                    total += t.user + t.system + t.children_user + t.children_system
    return total


class RedisServer:
    """A redis-server of the bench: loopback TCP on a free port, state in a dir
    of ``inst``, AOF on with ``appendfsync`` = ``fsync``, no RDB snapshots
    (the AOF is its durability here, as corral's log is corral's)."""

    def __init__(self, inst: Instance, binary: Path, fsync: str) -> None:
        self.inst = inst
        self.binary = binary
        self.fsync = fsync
        self.port = 0
        self.proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start it and wait until it answers PING (a port taken meanwhile: try again)."""
        for _ in range(3):
            self.port = free_port()
            data = self.inst.root / f"redis-{self.port}"
            data.mkdir()
            command = [
                str(self.binary),
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(data),
                "--appendonly", "yes",
                "--appendfsync", self.fsync,
                "--save", "",
                "--daemonize", "no",
                "--logfile", "",
            ]  # fmt: skip
            self.proc = spawn(self.inst, "redis", command)
            if self._wait_ping():
                return
            stop(self.inst, [self.proc])
        raise RuntimeError(
            f"redis-server did not start:\n{self.proc.log_tail() if self.proc else ''}"
        )

    def _wait_ping(self) -> bool:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc is None or not self.proc.alive():
                return False
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock,
            ):
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    return True
            time.sleep(0.02)
        return False

    def cpu(self) -> float:
        return tree_cpu([self.proc.popen.pid]) if self.proc else float("nan")
