"""One peer measured at one durability: a fresh redis-server, the peer's
driver (bench/peers/driver.py in the peers' venv) and its worker command.

The scenarios, in order, on the same Redis (emptied between them):
one-at-a-time enqueue; bulk enqueue; the drain (N jobs enqueued with no
worker running, then the worker command started, timed from just before
its start until the peer's own state shows N done; a drain not done by its
deadline gives the rate of the jobs done by then, flagged ``partial``); the
latency (the same workers, idle, unless the peer needs other settings for
it or the drain left jobs: then they are started again, on an emptied
Redis). Every process is stopped in a finally.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import Instance, Proc, Settings

from peers.services import PEERS_DIR, RedisServer, spawn, stop, stop_all, tree_cpu

WORKERS = 2
#: A drain still running then is cut short: its rate so far is reported, flagged partial.
DRAIN_TIMEOUT = 300.0
DRAIN_POLL = 0.05  # as bench/run.py polls corral's status
COMMAND_TIMEOUT = 900.0


@dataclass(frozen=True)
class Peer:
    """A peer: its task module (see driver.py) and its worker command(s).

    ``workers`` lists the commands to start, ``{python}``-relative names
    resolved in the venv's bin; one command with 2 processes, or 2 commands
    of one process each where that is how the peer scales.
    ``latency_env``: extra environment for the latency figure only.
    """

    name: str
    module: str
    workers: tuple[tuple[str, ...], ...]
    latency_env: dict[str, str] = field(default_factory=dict)


def _twice(*command: str) -> tuple[tuple[str, ...], ...]:
    return (command, command)


PEERS: tuple[Peer, ...] = (
    Peer(
        "RQ SimpleWorker",
        "task_rq",
        _twice("rq", "worker", "-u", "{url}", "-w", "rq.worker.SimpleWorker", "default"),
    ),
    Peer("RQ Worker (fork)", "task_rq", _twice("rq", "worker", "-u", "{url}", "default")),
    Peer("Dramatiq", "task_dramatiq", (("dramatiq", "task_dramatiq", "--processes", "2"),)),
    Peer(
        "Huey",
        "task_huey",
        (("huey_consumer", "task_huey.huey", "-w", "2", "-k", "process"),),
        latency_env={"PEERS_HUEY_NOTIFY": "1"},
    ),
    Peer("Celery", "task_celery", (("celery", "-A", "task_celery", "worker", "-c", "2"),)),
    Peer("arq", "task_arq", _twice("arq", "task_arq.WorkerSettings")),
)


@dataclass(frozen=True)
class PeerSizes:
    enqueue_one: int
    warmup: int
    bulk: int
    batch: int
    drain: int
    latency: int
    latency_warmup: int


class Driver:
    """The driver process: one JSON command a line in, one reply a line out."""

    def __init__(self, proc: Proc, watch: list[Proc]) -> None:
        self.proc = proc
        self.watch = watch  # processes whose death aborts a wait
        assert proc.popen.stdin is not None and proc.popen.stdout is not None
        self.stdin = proc.popen.stdin
        self.stdout = proc.popen.stdout
        self.read_reply(READY_TIMEOUT_S)

    def send(self, **command: Any) -> None:
        self.stdin.write(json.dumps(command).encode() + b"\n")
        self.stdin.flush()

    def read_reply(self, timeout: float = COMMAND_TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for proc in [self.proc, *self.watch]:
                if not proc.alive():
                    raise RuntimeError(
                        f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}"
                    )
            ready, _, _ = select.select([self.stdout], [], [], 0.25)
            if ready:
                line = self.stdout.readline()
                if not line:
                    raise RuntimeError(f"the driver closed its output:\n{self.proc.log_tail()}")
                reply: dict[str, Any] = json.loads(line)
                if "error" in reply:
                    raise RuntimeError(f"driver: {reply['error']}\n{reply.get('traceback', '')}")
                return reply
            if time.monotonic() > deadline:
                raise TimeoutError(f"no reply from the driver in {timeout}s")

    def ask(self, **command: Any) -> dict[str, Any]:
        self.send(**command)
        return self.read_reply()


READY_TIMEOUT_S = 60.0


class PeerRun:
    """The processes of one peer at one durability, in one scratch Instance."""

    def __init__(
        self,
        peer: Peer,
        python: Path,
        redis_binary: Path,
        fsync: str,
        drain_timeout: float = DRAIN_TIMEOUT,
    ) -> None:
        self.peer = peer
        self.drain_timeout = drain_timeout
        self.python = python
        self.inst = Instance(Settings())
        self.redis = RedisServer(self.inst, redis_binary, fsync)
        self.workers: list[Proc] = []
        self.driver: Driver | None = None

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env["PYTHONPATH"] = str(PEERS_DIR)
        env["PEERS_REDIS_URL"] = self.redis.url
        env["PATH"] = f"{self.python.parent}{os.pathsep}{env.get('PATH', '')}"
        return {**env, **(extra or {})}

    def start_driver(self, extra: dict[str, str] | None = None) -> Driver:
        proc = spawn(
            self.inst,
            f"driver-{self.peer.module}",
            [str(self.python), str(PEERS_DIR / "driver.py"), self.peer.module],
            env=self.env(extra),
            cwd=PEERS_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.driver = Driver(proc, self.workers)
        return self.driver

    def start_workers(self, extra: dict[str, str] | None = None) -> None:
        for command in self.peer.workers:
            argv = [str(self.python.parent / command[0])]
            argv += [part.format(url=self.redis.url) for part in command[1:]]
            self.workers.append(
                spawn(self.inst, f"worker-{command[0]}", argv, env=self.env(extra), cwd=PEERS_DIR)
            )

    def stop_workers(self) -> None:
        stop(self.inst, self.workers)
        self.workers.clear()

    def measure(self, sizes: PeerSizes) -> dict[str, dict[str, float]]:
        """Every scenario of the peer; stops every process before returning."""
        try:
            self.redis.start()
            driver = self.start_driver()
            out: dict[str, dict[str, float]] = {}
            out["enqueue_one"] = driver.ask(
                op="enqueue_one", n=sizes.enqueue_one, warmup=sizes.warmup
            )
            driver.ask(op="flush")
            out["enqueue_bulk"] = driver.ask(op="enqueue_bulk", n=sizes.bulk, batch=sizes.batch)
            driver.ask(op="flush")
            out["drain"] = self.drain(driver, sizes)
            if self.peer.latency_env:
                self.stop_workers()
                assert self.driver is not None
                stop(self.inst, [self.driver.proc])
                driver = self.start_driver(self.peer.latency_env)
                if out["drain"].get("partial"):
                    driver.ask(op="flush")
                self.start_workers(self.peer.latency_env)
            elif out["drain"].get("partial"):  # jobs left over: none may queue ahead
                self.stop_workers()
                driver.ask(op="flush")
                self.start_workers()
            out["latency"] = driver.ask(op="latency", n=sizes.latency, warmup=sizes.latency_warmup)
            return out
        finally:
            stop_all(self.inst)

    def drain(self, driver: Driver, sizes: PeerSizes) -> dict[str, float]:
        n = sizes.drain
        filled = driver.ask(op="fill", n=n, batch=sizes.batch)
        if filled["done"] != 0:
            raise RuntimeError(f"{filled['done']} jobs done before any worker ran")
        redis_cpu0 = self.redis.cpu()
        driver.send(op="wait_done", n=n, timeout=self.drain_timeout, poll=DRAIN_POLL)
        started = time.monotonic()
        self.start_workers()
        reply = driver.read_reply(self.drain_timeout + 60)
        workers_cpu = tree_cpu([w.popen.pid for w in self.workers])
        redis_cpu = self.redis.cpu() - redis_cpu0
        done = reply["done"]
        elapsed = reply["done_at"] - started
        first = reply["first_at"] - started
        figures = {
            "rate": done / elapsed,
            "seconds": elapsed,
            "first_done_s": first,
            "rate_after_first": done / max(1e-9, elapsed - first),
            "redis_cpu_us_per_job": redis_cpu / max(1.0, done) * 1e6,
            "workers_cpu_us_per_job_incl_startup": workers_cpu / max(1.0, done) * 1e6,
        }
        if reply.get("timed_out"):
            # The rate of the jobs done by the deadline (from the workers' start).
            figures.update(partial=1.0, done=done)
        return figures
