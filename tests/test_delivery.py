"""Delivery guarantees: lease timeouts, fencing of late results, workers
re-registering with a restarted broker, and the asyncio client."""

from __future__ import annotations

import asyncio
import signal

import pytest
from conftest import Env, wait_for

import corral


def test_job_past_its_timeout_is_released_and_late_result_fenced(env: Env) -> None:
    env.write_config(processes=1, prefetch=0)
    daemon = env.start("run")
    env.wait_ready(daemon)
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
