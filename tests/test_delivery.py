"""Delivery guarantees: lease timeouts, fencing of late results, workers
re-registering with a restarted broker, and the asyncio client."""

from __future__ import annotations

import asyncio
import signal

import pytest
from conftest import Env, wait_for

import corral


def test_job_past_its_timeout_is_released_and_late_result_fenced(env: Env) -> None:
    # A bare worker, no supervisor to kill it: the broker alone releases the
    # lease, and the handler's result arrives later from an expired lease.
    env.write_config(processes=0, prefetch=0)
    broker = env.start("broker")
    env.wait_ready(broker)
    env.start("worker", "--plugin", "e2e_tasks")
    env.wait_workers(1)
    client = env.client()
    job_id = client.enqueue("e2e.sleep", 1.5, timeout=0.3, max_attempts=1)
    with pytest.raises(corral.JobFailed) as failed:
        client.result(job_id, timeout=30)
    assert failed.value.error.type == "TimeoutError"
    assert "0.3" in failed.value.error.message
    # The handler finishes later; its result comes from an expired lease.
    wait_for(
        lambda: client.status().stats.get("late_results", 0) >= 1,
        20,
        message="the late result to be fenced",
    )
    info = client.job(job_id)
    assert info.status == "failed"
    assert info.attempts == 1


def test_timed_out_job_is_retried_and_first_completion_wins(env: Env) -> None:
    env.write_config(processes=2, prefetch=0)
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
    stats = client.status().stats
    assert stats["compactions"] >= 1
    # 1,800 jobs of ~300 bytes went through the log three times over (create,
    # lease, finish); what stays is the jobs still live.
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
