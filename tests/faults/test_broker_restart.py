"""A broker SIGKILLed and restarted while its workers hold jobs, running and
prefetched, and a worker that says READY twice: no job runs twice.

Real processes: a bare ``corral broker`` and a ``corral supervisor`` with
two workers, jobs of ``soak.record`` (tests/plugins/soak_tasks.py) that
take two seconds and append ``job_id attempt pid token`` to a file,
checked by tests/faults/history.py. The broker is killed once both workers
run a job and hold more in their buffers, and restarted at once (the
workers' sockets reconnect by themselves and are asked to register again)
or after the workers' liveness window (they reconnect on new sockets).
The duplicate READY comes from a raw DEALER speaking the protocol.
In-process checks of the same rules: tests/test_reclaim.py.

Knob: CORRAL_RESTART_TRIALS (1) kills per test, each on a fresh batch.
"""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest
import zmq
from conftest import Env, Proc, wait_for

from corral.broker import protocol as p

from .harness import TASK, env_int, final_statuses, write_config
from .history import History, Verdict

PROCESSES, CONCURRENCY, PREFETCH = 2, 1, 2
#: Jobs per trial: more than the workers hold, so some wait in the broker.
JOBS = PROCESSES * (CONCURRENCY + PREFETCH) + 2
#: How long each job runs: longer than a broker takes to restart, so the
#: workers still hold buffered jobs when it is back.
SECONDS = 2.0
#: The workers' liveness window in tests/faults/harness.py's config (0.5 s x 6).
LIVENESS = 3.0


def start(env: Env) -> Proc:
    write_config(
        env, fsync="always", processes=PROCESSES, concurrency=CONCURRENCY, prefetch=PREFETCH
    )
    broker = env.start("broker", name="broker-0")
    env.wait_ready(broker)
    env.start("supervisor")
    env.wait_workers(PROCESSES)
    return broker


def held(env: Env, job_ids: list[str]) -> bool:
    """Every worker runs a job and holds more in its buffer."""
    client = env.client(timeout=2.0)
    infos = [client.job(job_id) for job_id in job_ids]
    running = [i for i in infos if i.status == "running"]
    reserved = [i for i in infos if i.status == "queued" and i.reserved_by]
    return len(running) == PROCESSES * CONCURRENCY and len(reserved) >= PROCESSES


def trial(env: Env, broker: Proc, n: int, down: float, history: History) -> Proc:
    """Enqueue a batch, kill the broker while it is held, restart it after
    ``down`` seconds; returns the new broker."""
    client = env.client()
    record = env.home / "executions"
    ids = []
    for i in range(JOBS):
        token = f"t{n}-{i}"
        history.invoke(token)
        job_id = client.enqueue(TASK, {"path": str(record), "token": token, "seconds": SECONDS})
        history.ok(token, job_id)
        ids.append(job_id)
    wait_for(lambda: held(env, ids), 20, message="both workers to run a job and buffer more")
    broker.signal(signal.SIGKILL)
    assert broker.wait(10) == -signal.SIGKILL
    if down:
        time.sleep(down)  # the outage itself: the workers reconnect meanwhile
    broker = env.start("broker", name=f"broker-{n + 1}")
    env.wait_ready(broker)
    return broker


def verdict(env: Env, history: History) -> Verdict:
    statuses = final_statuses(env, history.acknowledged(), timeout=60)
    history.load_executions(env.home / "executions")
    return history.check(final=True, statuses=statuses)


@pytest.mark.parametrize("down", [0.0, LIVENESS + 1.0], ids=["at-once", "past-liveness"])
def test_a_broker_restart_runs_no_held_job_twice(env: Env, down: float) -> None:
    broker = start(env)
    history = History()
    for n in range(env_int("CORRAL_RESTART_TRIALS", 1)):
        broker = trial(env, broker, n, down, history)
    result = verdict(env, history)
    print(f"broker restart ({down}s down): {result.summary()}")
    assert result.valid, result.describe()
    assert not result.more_than_once, result.describe()
    assert not result.not_succeeded, result.describe()
    assert len(result.once) == len(history.acknowledged())
    out = "".join(proc.output() for proc in env.procs)
    assert "broker.jobs_offered_back" in out  # the workers offered them back


class RawWorker:
    """A DEALER speaking the worker protocol by hand."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str, name: str) -> None:
        self.name = name
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, name.encode())
        self.sock.connect(endpoint)

    def send(self, msg: p.Msg) -> None:
        self.sock.send(p.encode(msg))

    def ready(self, credit: int) -> None:
        """Register, able to run ``credit`` jobs at once (so the broker
        never moves a buffered job of its to an idle worker)."""
        self.send(p.Ready(self.name, ["default"], credit, credit, [p.TaskInfo("raw.task")], "h", 1))

    def receive(self, timeout: float) -> list[Any]:
        """Every command that arrives within ``timeout`` seconds."""
        got = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if self.sock.poll(int(left * 1000)):
                got.append(p.decode(p.worker_command_decoder, self.sock.recv()))
        return got

    def deliveries(self, want: int, timeout: float = 10.0) -> list[p.Delivery]:
        got: list[p.Delivery] = []
        deadline = time.monotonic() + timeout
        while len(got) < want and time.monotonic() < deadline:
            if self.sock.poll(100):
                msg = p.decode(p.worker_command_decoder, self.sock.recv())
                if isinstance(msg, p.Deliver):
                    got.extend(msg.jobs)
        assert len(got) == want, f"{self.name} got {len(got)} of {want} deliveries"
        return got


def test_a_worker_that_says_ready_twice_keeps_its_jobs(env: Env) -> None:
    # No supervisor: the raw DEALERs are the only workers; they never
    # heartbeat, so the liveness window is long.
    write_config(env, heartbeat="1s", liveness=60)
    broker = env.start("broker")
    env.wait_ready(broker)
    client = env.client()
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        first = RawWorker(ctx, f"ipc://{env.home}/w.sock", "raw-1")
        first.ready(credit=2)
        wait_for(lambda: len(client.status().workers) == 1, 10, message="raw-1 to register")
        ids = [client.enqueue("raw.task", i) for i in range(2)]
        got = first.deliveries(2)
        first.send(p.Report([p.Lease(got[0].job_id, got[0].lease)], []))
        wait_for(lambda: client.job(got[0].job_id).status == "running", 10, message="a start")
        first.ready(credit=2)  # READY again, on the same connection
        first.ready(credit=2)
        other = RawWorker(ctx, f"ipc://{env.home}/w.sock", "raw-2")
        other.ready(credit=2)
        wait_for(lambda: len(client.status().workers) == 2, 10, message="raw-2 to register")
        # nothing was taken back: no job goes to the other worker, nor again to the first
        assert not [m for m in other.receive(1.0) if isinstance(m, p.Deliver)]
        assert not [m for m in first.receive(0.1) if isinstance(m, p.Deliver)]
        assert client.job(ids[0]).attempts == 1
        assert client.job(ids[1]).reserved_by == "raw-1"
        for d in got:
            if d is not got[0]:
                first.send(p.Report([p.Lease(d.job_id, d.lease)], []))
            first.send(p.Report([], [p.Outcome(d.job_id, d.lease, "ok", p.encode_value(1))]))
        for job_id in ids:
            wait_for(lambda j=job_id: client.job(j).status == "succeeded", 10, message=job_id)
            info = client.job(job_id)
            assert (info.attempts, len(info.tries)) == (1, 1), info
        workers = client.status().workers
        assert sorted(w.worker_id for w in workers) == ["raw-1", "raw-2"]
    finally:
        ctx.destroy(linger=0)
