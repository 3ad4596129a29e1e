"""Soak: worker processes SIGKILLed again and again while jobs flow.

Knobs: CORRAL_SOAK_WORKER_KILLS (80), CORRAL_SOAK_WORKER_GAP (longest pause
between kills, 1.5 s), CORRAL_SOAK_RATE (jobs/s, 20), CORRAL_SOAK_SEED.
About 1.5-2 minutes with the defaults.
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable

import psutil
import pytest
from conftest import Env, Proc, wait_for, worker_processes

from .harness import Producers, env_float, env_int, final_statuses, write_config
from .history import History

PROCESSES, CONCURRENCY, PREFETCH = 3, 2, 2


def kill_a_worker(daemon: Proc, rng: random.Random, killed: list[int]) -> None:
    """SIGKILL one of the supervisor's workers, picked at random; its pid
    goes into ``killed`` before the signal, so no run of it is missed."""
    workers = wait_for(lambda: worker_processes(daemon), 30, message="a worker to kill")
    victim = rng.choice(workers)
    killed.append(victim.pid)
    try:
        victim.send_signal(signal.SIGKILL)
    except psutil.NoSuchProcess:
        killed.pop()


@pytest.mark.soak
def test_worker_kill_soak(
    env: Env, soak_rng: random.Random, soak_report: Callable[[str], None]
) -> None:
    kills = env_int("CORRAL_SOAK_WORKER_KILLS", 80)
    gap = env_float("CORRAL_SOAK_WORKER_GAP", 1.5)
    rate = env_float("CORRAL_SOAK_RATE", 20.0)
    write_config(
        env,
        fsync="always",
        processes=PROCESSES,
        concurrency=CONCURRENCY,
        prefetch=PREFETCH,
        # Killed workers are crashes to the supervisor: let it restart them
        # at once and never give the pool up.
        extra_pool='max_restarts = 1000000\nrestart_backoff = "0s"',
    )
    record = env.home / "executions"
    history = History()
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(PROCESSES)

    killed: list[int] = []
    started = time.monotonic()
    producers = Producers(
        env.endpoint,
        history,
        record,
        seed=soak_rng.randrange(2**32),
        rate=rate,
        seconds=(0.02, 0.3),  # long enough that kills often hit running jobs
        timeout=10.0,  # the broker stays up: a slow answer is not a fault here
    )
    with producers:
        for _ in range(kills):
            time.sleep(soak_rng.uniform(0.1, gap))
            kill_a_worker(daemon, soak_rng, killed)
        time.sleep(1.0)
    faults_took = time.monotonic() - started

    acked = history.acknowledged()
    statuses = final_statuses(env, acked, timeout=max(120.0, len(acked) / 10))
    history.load_executions(record)
    verdict = history.check(final=True, statuses=statuses)
    unexplained = verdict.unexplained_duplicates(killed)
    pids_that_ran = {run.pid for runs in verdict.executions.values() for run in runs}
    killed_after_running = len(pids_that_ran & set(killed))
    soak_report(
        f"kills={len(killed)} killed_after_running={killed_after_running} took={faults_took:.0f}s "
        f"invocations={history.counts()} executions={len(history.executions)}"
    )
    soak_report(verdict.summary() + f" unexplained_duplicates={len(unexplained)}")

    assert daemon.alive(), daemon.output()[-5000:]
    assert acked, "no job was acknowledged"
    assert verdict.valid, verdict.describe()
    assert not verdict.not_succeeded, verdict.describe()
    assert not unexplained, "\n".join(
        f"{job_id}: {[(r.attempt, r.pid) for r in runs]} killed={sorted(killed)}"
        for job_id, runs in list(unexplained.items())[:10]
    )
