"""Poison jobs: a job that ends its worker process every time (``os._exit``
or a SIGKILL of itself) fails after its ``max_attempts``, each crash in its
tries, while the pool keeps serving the other jobs. Real processes:
``corral run`` with its supervisor and two workers."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from conftest import FAST_RETRY, Env, wait_for

import corral

#: Poison jobs per run, and the innocent jobs enqueued among them.
POISON = 3
INNOCENT = 40


@pytest.mark.parametrize(
    ("task", "payload", "says"),
    [("e2e.crash", 3, "exit"), ("e2e.sigkill", None, "SIGKILL")],
    ids=["os._exit", "sigkill"],
)
def test_poison_job_fails_after_max_attempts_and_the_pool_serves_on(
    env: Env, task: str, payload: object, says: str, soak_report: Callable[[str], None]
) -> None:
    env.write_config(processes=2, prefetch=1, extra_broker=FAST_RETRY)
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(2)
    client = env.client()
    poison, innocent = [], []
    for i in range(INNOCENT):
        if i % (INNOCENT // POISON) == 0 and len(poison) < POISON:
            poison.append(client.enqueue(task, payload))
        innocent.append(client.enqueue("e2e.square", i))
    for job_id in poison:
        with pytest.raises(corral.JobFailed) as failed:
            client.result(job_id, timeout=120)
        assert failed.value.error is not None and failed.value.error.type == "WorkerLost"
        info = client.job(job_id)
        assert info.status == "failed"
        assert info.attempts == 3  # the task's max_attempts
        assert len(info.tries) == 3
        for attempt in info.tries:
            assert attempt.error is not None and attempt.error.type == "WorkerLost"
            assert says in attempt.error.message, attempt.error.message
    assert [client.result(j, timeout=120) for j in innocent] == [i * i for i in range(INNOCENT)]
    infos = [client.job(j) for j in innocent]
    assert all(i.status == "succeeded" for i in infos)
    charged = sum(i.attempts - 1 for i in infos)
    # the pool is still there and serving: both workers back, a new job runs
    env.wait_workers(2)
    assert client.result(client.enqueue("e2e.square", 9), timeout=60) == 81
    assert daemon.alive()
    assert "supervisor.pool_backing_off" not in daemon.output()
    soak_report(
        f"{task}: {POISON} poison jobs failed after 3 attempts each; {INNOCENT} others "
        f"succeeded, {charged} extra attempts charged to them"
    )
    wait_for(lambda: len(client.status().workers) == 2, message="two workers")
