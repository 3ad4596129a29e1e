"""Fault 3 of issue 12: a zombie worker.

A bare ``corral worker`` is SIGSTOPped while its handler runs a job, and
kept stopped past its liveness window (250 ms x 4), so the broker takes it
for dead and the job runs, and completes, on the other worker. Then it gets
SIGCONT: its handler ends and reports, and that late result is fenced
(counted in ``late_results``, the job's result and status unchanged); the
worker registers again; the job completed once.

Bare workers, not ``corral run``: a supervisor may kill a worker whose
status lines stop, which is another fault (test_worker_kill.py).

Knob of the full profile (``make soak``): CORRAL_SOAK_ZOMBIE_TRIALS (20).
The fast profile: 2 trials.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

import pytest
from conftest import Env, Proc, wait_for

import corral

from .harness import PROFILES, TASK, Profile, inject, write_config
from .history import Execution, History, read_executions

#: Seconds the job's handler sleeps: the stop comes while it runs.
JOB_SECONDS = 1.5


def worker_pids(client: corral.Client) -> set[int]:
    return {w.pid for w in client.status().workers}


def zombie_trial(
    n: int, client: corral.Client, workers: dict[int, Proc], record: str, history: History
) -> None:
    """One trial: a job's worker stopped past its liveness window, the job
    done elsewhere, the worker continued; fails naming what did not hold."""
    token = f"zombie-{n}"
    history.invoke(token)
    job_id = client.enqueue(TASK, {"path": record, "token": token, "seconds": JOB_SECONDS})
    history.ok(token, job_id)

    def runs() -> list[Execution]:
        return [r for r in read_executions(record) if r.job_id == job_id]

    (first,) = wait_for(runs, 30, message=f"trial {n}: the job to start")
    zombie = first.pid
    late_before = client.status().stats.get("late_results", 0)
    assert inject(history, "stop", zombie, signal.SIGSTOP)
    try:
        wait_for(
            lambda: zombie not in worker_pids(client),
            30,
            message=f"trial {n}: the broker to take the stopped worker for dead",
        )
        value = client.result(job_id, timeout=60)
        assert client.job(job_id).status == "succeeded"
        second = [r for r in runs() if r.pid != zombie]
        assert len(second) == 1 and value == second[0].attempt, (value, runs())
    finally:
        workers[zombie].signal(signal.SIGCONT)

    wait_for(
        lambda: client.status().stats.get("late_results", 0) > late_before,
        30,
        message=f"trial {n}: the zombie's late result to be fenced",
    )
    wait_for(
        lambda: zombie in worker_pids(client), 30, message=f"trial {n}: the zombie to come back"
    )
    # The late result changed nothing: one completion, the other worker's.
    assert client.job(job_id).status == "succeeded"
    assert client.result(job_id, timeout=5) == value
    assert all(r.done_at is not None for r in runs()), runs()  # the zombie's ran to its end


@pytest.mark.parametrize("profile", PROFILES)
def test_a_zombie_worker_is_fenced_and_registers_again(
    env: Env, profile: Profile, soak_report: Callable[[str], None]
) -> None:
    trials = profile.count("CORRAL_SOAK_ZOMBIE_TRIALS", 2, 20)
    write_config(env, heartbeat="250ms", liveness=4, concurrency=1, prefetch=0)
    env.wait_ready(env.start("broker"))
    workers = {p.pid: p for p in (env.start("worker", name=f"worker-{i}") for i in range(2))}
    client = env.client(timeout=10.0)
    wait_for(lambda: worker_pids(client) == set(workers), 30, message="2 workers to register")
    record = str(env.home / "executions")
    history = History()
    for n in range(trials):
        zombie_trial(n, client, workers, record, history)

    history.load_executions(record)
    verdict = history.check(final=True)
    soak_report(
        f"trials={trials} fenced={trials} re_registered={trials} "
        f"late_results={client.status().stats.get('late_results', 0)} " + verdict.summary()
    )
    assert verdict.valid, verdict.describe()
    assert verdict.extra_executions == trials  # the zombie's run and the one that counted
    assert verdict.unexplained_reruns() == [], verdict.describe()
