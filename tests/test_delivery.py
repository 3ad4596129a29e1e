"""Delivery guarantees: lease timeouts, fencing of late results, workers
re-registering with a restarted broker, and the asyncio client."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq
from conftest import FAST_RETRY, Env, wait_for, wait_until

import corral
from corral.broker import protocol as p


def test_job_past_its_timeout_is_released_and_late_result_fenced(env: Env) -> None:
    # A bare worker, no supervisor to kill it: the broker alone releases the
    # lease, and the handler's result arrives later from an expired lease.
    env.write_config(processes=0, prefetch=0)
    broker = env.start("broker")
    env.wait_ready(broker)
    env.start("worker", "--plugin", "e2e_tasks")
    env.wait_workers(1)
    client = env.client()
    gate = env.home / "gate"
    job_id = client.enqueue("e2e.gate", str(gate), timeout=0.3, max_attempts=1)
    with pytest.raises(corral.JobFailed) as failed:
        client.result(job_id, timeout=30)
    assert failed.value.error.type == "TimeoutError"
    assert "0.3" in failed.value.error.message
    # The handler finishes later; its result comes from an expired lease.
    gate.touch()
    wait_for(
        lambda: client.status().stats.get("late_results", 0) >= 1,
        20,
        message="the late result to be fenced",
    )
    info = client.job(job_id)
    assert info.status == "failed"
    assert info.attempts == 1


def test_timed_out_job_is_retried_until_its_attempts_run_out(env: Env) -> None:
    env.write_config(processes=2, prefetch=0, extra_broker=FAST_RETRY)
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(2)
    client = env.client()
    job_id = client.enqueue("e2e.sleep", 1.0, timeout=0.4, max_attempts=3)
    with pytest.raises(corral.JobFailed):
        client.result(job_id, timeout=30)
    info = client.job(job_id)
    assert info.attempts == 3
    assert all(t.error is not None and t.error.type == "TimeoutError" for t in info.tries)


class RawWorker:
    """A worker that is nothing but a DEALER socket speaking the worker
    protocol, driven step by step by the test."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str, name: str) -> None:
        self.name = name
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTING_ID, name.encode())
        self.sock.connect(endpoint)

    def send(self, msg: p.Msg) -> None:
        self.sock.send(p.encode(msg))

    def ready(self, task: str, credit: int = 1) -> None:
        # A tiny retry backoff, so the timed-out job is handed out again at once.
        info = p.TaskInfo(task, retry_backoff=0.01, retry_backoff_max=0.01)
        self.send(p.Ready(self.name, ["default"], credit, 1, [info], "raw-host", os.getpid()))

    def deliveries(self, timeout: float = 30.0) -> list[p.Delivery]:
        """The jobs of the next Deliver, skipping heartbeats."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not self.sock.poll(left * 1000):
                break
            msg = p.decode(p.worker_command_decoder, self.sock.recv())
            if isinstance(msg, p.Deliver):
                return list(msg.jobs)
            assert isinstance(msg, p.BrokerHeartbeat), f"{self.name} got {msg!r}"
        raise AssertionError(f"timed out after {timeout}s waiting for a delivery to {self.name}")

    def done(self, delivery: p.Delivery, value: object, *, started: bool = False) -> None:
        """Report the job finished with ``value`` under the lease it came with."""
        lease = p.Lease(delivery.job_id, delivery.lease)
        outcome = p.Outcome(delivery.job_id, delivery.lease, "ok", p.encode_value(value))
        self.send(p.Report([lease] if started else [], [outcome]))

    def close(self) -> None:
        self.sock.close(linger=0)


@pytest.fixture
def raw_workers(env: Env) -> Iterator[Any]:
    ctx = zmq.Context()
    made: list[RawWorker] = []

    def make(name: str) -> RawWorker:
        worker = RawWorker(ctx, f"ipc://{env.home}/w.sock", name)
        made.append(worker)
        return worker

    try:
        yield make
    finally:
        for worker in made:
            worker.close()
        ctx.term()


def test_timed_out_job_is_retried_and_first_completion_wins(env: Env, raw_workers: Any) -> None:
    # Two workers that are bare sockets, so the test decides who completes
    # when. A liveness window of a minute: neither is ever declared lost.
    env.write_config(processes=0, heartbeat="1s", liveness=60)
    broker = env.start("broker")
    env.wait_ready(broker)
    client = env.client()

    def late() -> int:
        return client.status().stats.get("late_results", 0)

    def registered(name: str) -> bool:
        return any(w.worker_id == name for w in client.status().workers)

    a, b = raw_workers("raw-a"), raw_workers("raw-b")
    a.ready("race.job")
    wait_for(lambda: registered("raw-a"), message="raw-a to register")
    job_id = client.enqueue("race.job", "x", timeout=0.3, max_attempts=3)
    [first] = a.deliveries()
    assert (first.job_id, first.attempt) == (job_id, 1)
    a.send(p.Report([p.Lease(job_id, first.lease)], []))  # started: its timeout runs
    a.send(p.Drain())  # A takes nothing more, whatever becomes of its credit

    # Past the timeout the broker takes lease A back; the retry goes to B
    # under a new lease.
    b.ready("race.job")
    [second] = b.deliveries()
    assert (second.job_id, second.attempt) == (job_id, 2)
    assert second.lease != first.lease
    # Leased to B and not started: still queued, reserved by B; try 2
    # begins when B starts it.
    info = client.job(job_id)
    assert (info.status, info.attempts, info.reserved_by) == ("queued", 1, "raw-b")
    assert [t.worker for t in info.tries] == ["raw-a"]
    assert info.tries[0].error is not None and info.tries[0].error.type == "TimeoutError"
    assert late() == 0

    # A's handler finishes first, under the revoked lease: fenced, not a result.
    a.done(first, "from A")
    wait_for(lambda: late() == 1, 10, message="the stale completion to be fenced")
    info = client.job(job_id)
    assert (info.status, info.attempts, info.reserved_by) == ("queued", 1, "raw-b")

    # Then three completions race, all waiting for the broker together: A's
    # stale lease again, B's (the first valid one) and a second one under
    # B's lease with another result. Only B's first may stand.
    broker.signal(signal.SIGSTOP)
    try:
        a.done(first, "from A again")
        b.done(second, "from B", started=True)
        b.done(second, "from B, twice")
        time.sleep(0.1)  # let the frames reach the stopped broker (not needed to pass)
    finally:
        broker.signal(signal.SIGCONT)
    wait_for(lambda: late() == 3, 10, message="both losing completions to be fenced")
    assert client.result(job_id, timeout=10) == "from B"
    info = client.job(job_id)
    assert (info.status, info.attempts) == ("succeeded", 2)
    assert [t.worker for t in info.tries] == ["raw-a", "raw-b"]
    assert info.tries[1].error is None and info.tries[1].ended_at is not None
    stats = client.status().stats
    assert stats["late_results"] == 3
    assert stats["jobs_succeeded"] == 1
    assert stats["timeouts"] == 1


def test_workers_reregister_after_broker_restart(env: Env) -> None:
    broker = env.start("broker")
    env.wait_ready(broker)
    env.start("supervisor")
    env.wait_workers(2)
    client = env.client()
    assert client.result(client.enqueue("e2e.square", 3), timeout=30) == 9
    broker.signal(signal.SIGKILL)
    broker.wait(10)
    broker = env.start("broker", name="broker-again")
    env.wait_ready(broker)
    env.wait_workers(2, timeout=60)
    client = env.client()
    assert client.result(client.enqueue("e2e.square", 4), timeout=30) == 16


def test_async_client(env: Env) -> None:
    daemon = env.start("run")
    env.wait_ready(daemon)

    async def main() -> None:
        async with corral.AsyncClient(env.endpoint, timeout=10) as client:
            ids = await client.enqueue_many([corral.Job("e2e.square", n) for n in range(20)])
            results = await asyncio.gather(*(client.result(i, timeout=30) for i in ids))
            assert results == [n * n for n in range(20)]
            info = await client.job(ids[0])
            assert info.status == "succeeded"
            status = await client.status()
            assert status.queues["default"]["succeeded"] == 20
            with pytest.raises(corral.JobNotFound):
                await client.job("missing")

    asyncio.run(main())


def test_compaction_keeps_disk_use_near_the_live_jobs(env: Env) -> None:
    env.write_config(
        extra_broker='segment_size = "256KiB"\ndisk_reserve = "32KiB"\n'
        'max_message_size = "128KiB"\ncompact_min_size = "128KiB"'
    )
    daemon = env.start("run")
    env.wait_ready(daemon)
    client = corral.Client.from_config(env.config, timeout=10)
    env.clients.append(client)
    with pytest.raises(corral.RequestTooLarge, match="max_message_size"):
        client.enqueue_many([corral.Job("e2e.noop", "p" * 1000) for _ in range(200)])
    payload = "p" * 200
    for _ in range(6):
        ids = client.enqueue_many(
            [corral.Job("e2e.noop", payload, result_ttl=0.2) for _ in range(300)]
        )
        client.result(ids[-1], timeout=60)
        wait_for(
            lambda: client.status().queues.get("default", {}).get("queued", 0) == 0,
            message="the batch to drain",
        )
    keep = client.enqueue("e2e.square", 6)
    assert client.result(keep, timeout=30) == 36
    # 1,800 jobs of ~300 bytes went through the log three times over (create,
    # lease, finish); once their 0.2 s results expired, what stays is the one
    # job still live. Expiry and compaction run in the broker's own time.
    stats = wait_until(
        lambda: client.status().stats,
        lambda s: (
            s["jobs"] == 1 and s.get("compactions", 0) >= 1 and s["log_used_bytes"] < 600 * 1024
        ),
        30,
        message="the expired jobs to be compacted away",
    )
    assert stats["compactions"] >= 1
    assert stats["log_used_bytes"] < 600 * 1024
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(60) == 0
    broker = env.start("broker")
    env.wait_ready(broker)
    assert env.client().result(keep, timeout=10) == 36


def test_foreground_worker_command(env: Env) -> None:
    broker = env.start("broker")
    env.wait_ready(broker)
    env.start("worker", "--queue", "special", "--plugin", "e2e_tasks")
    env.wait_workers(1)
    client = env.client()
    job_id = client.enqueue("e2e.square", 8, queue="special")
    assert client.result(job_id, timeout=30) == 64
    assert client.job(job_id).queue == "special"
