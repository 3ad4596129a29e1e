"""Fault 2 of issue 12: worker processes SIGKILLed mid-job.

``test_worker_kill_mid_job``: trials, each a job of 1 s whose worker is
SIGKILLed once its handler has started; under ``corral run`` (the
supervisor reaps the worker and tells the broker at once) and with bare
``corral worker`` processes against ``corral broker`` (the broker notices
only when the worker's heartbeats stop: 250 ms x 4). Every job completes;
the redelivery time (the kill to the job's next start) is reported per
path, p50 and p95.

``test_worker_kill_under_load``: workers of ``corral run`` killed at random
while a producer keeps jobs flowing: nothing lost, every re-run explained
by the kill of the process that ran the job before.

Knobs of the full profile (``make soak``): CORRAL_SOAK_WORKER_TRIALS (100
per path), CORRAL_SOAK_WORKER_KILLS (80), CORRAL_SOAK_WORKER_GAP (longest
pause between kills, 1.5 s), CORRAL_SOAK_RATE (jobs/s, 20),
CORRAL_SOAK_SEED. The fast profile: 8 trials per path, 5 kills under load.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import pytest
from conftest import Env, Proc, wait_for, worker_processes

from .harness import (
    PROFILES,
    TASK,
    Producers,
    Profile,
    final_statuses,
    inject,
    percentile,
    write_config,
)
from .history import Execution, History, Verdict, read_executions

#: Seconds each trial's job runs: long enough to be killed mid-job.
JOB_SECONDS = 1.0
#: Bare workers: one killed per trial, two others to take its job over.
BARE_WORKERS = 3


def runs_of(record: str, job_id: str) -> list[Execution]:
    return [r for r in read_executions(record) if r.job_id == job_id]


class Trials:
    """Jobs enqueued one at a time, each one's worker killed once it runs."""

    def __init__(self, env: Env, history: History) -> None:
        self.env = env
        self.history = history
        self.client = env.client(timeout=10.0)
        self.record = str(env.home / "executions")
        self.redelivery: list[float] = []

    def trial(self, n: int) -> int:
        """Run trial ``n``: returns the pid it killed."""
        token = f"trial-{n}"
        self.history.invoke(token)
        payload = {"path": self.record, "token": token, "seconds": JOB_SECONDS}
        job_id = self.client.enqueue(TASK, payload)
        self.history.ok(token, job_id)
        first: Execution
        (first,) = wait_for(lambda: runs_of(self.record, job_id), 30, message=f"{job_id} to run")
        assert inject(self.history, "worker", first.pid), f"worker {first.pid} was gone"
        killed_at = self.history.faults[-1].at
        runs = wait_for(
            lambda: [r for r in runs_of(self.record, job_id) if r.run != first.run],
            60,
            message=f"{job_id} to run again after its worker's kill",
        )
        assert runs[0].started_at is not None
        self.redelivery.append(runs[0].started_at - killed_at)
        return first.pid

    def verdict(self) -> Verdict:
        acked = self.history.acknowledged()
        statuses = final_statuses(self.env, acked, timeout=120.0)
        self.history.load_executions(self.record)
        return self.history.check(final=True, statuses=statuses)


def start_run(env: Env) -> Proc:
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(2)
    return daemon


def start_bare(env: Env) -> list[Proc]:
    env.wait_ready(env.start("broker"))
    workers = [env.start("worker", name=f"worker-{i}") for i in range(BARE_WORKERS)]
    env.wait_workers(BARE_WORKERS)
    return workers


@pytest.mark.parametrize("path", ["run", "worker"])
@pytest.mark.parametrize("profile", PROFILES)
def test_worker_kill_mid_job(
    env: Env, profile: Profile, path: str, soak_report: Callable[[str], None]
) -> None:
    trials = profile.count("CORRAL_SOAK_WORKER_TRIALS", 4, 100)
    write_config(
        env,
        heartbeat="250ms",
        liveness=4,
        processes=2,
        concurrency=2,
        prefetch=0,
        extra_pool='max_restarts = 1000000\nrestart_backoff = "0s"',
    )
    history = History()
    runner = Trials(env, history)
    if path == "run":
        daemon = start_run(env)
        for n in range(trials):
            runner.trial(n)
        assert daemon.alive(), daemon.output()[-5000:]
    else:
        workers = start_bare(env)
        for n in range(trials):
            killed = runner.trial(n)
            # The killed worker's place is taken by a new one (not waited for).
            workers = [w for w in workers if w.pid != killed]
            workers.append(env.start("worker", name=f"worker-{BARE_WORKERS + n}"))
    verdict = runner.verdict()
    windows = verdict.kill_windows()
    p50, p95 = percentile(runner.redelivery, 0.5), percentile(runner.redelivery, 0.95)
    soak_report(
        f"path={path} trials={trials} redelivery_p50={p50 * 1000:.0f}ms "
        f"p95={p95 * 1000:.0f}ms max={max(runner.redelivery) * 1000:.0f}ms " + verdict.summary()
    )

    assert len(verdict.acknowledged) == trials
    assert verdict.valid, verdict.describe()
    assert not verdict.not_succeeded, verdict.describe()
    assert verdict.unexplained_reruns() == [], verdict.describe()
    # A trial's kill may also cut short an earlier trial's second run that
    # went to the same worker: then two jobs were in flight, and run again.
    for window in windows:
        assert 1 <= window.duplicates <= len(window.in_flight), (window, verdict.describe())


def kill_a_worker(daemon: Proc, rng: random.Random, history: History) -> None:
    """SIGKILL one of the supervisor's workers, picked at random, the fault
    recorded in ``history`` first (so no run of it is missed)."""
    workers = wait_for(lambda: worker_processes(daemon), 30, message="a worker to kill")
    inject(history, "worker", rng.choice(workers).pid)


@pytest.mark.parametrize("profile", PROFILES)
def test_worker_kill_under_load(
    env: Env, profile: Profile, soak_rng: random.Random, soak_report: Callable[[str], None]
) -> None:
    kills = profile.count("CORRAL_SOAK_WORKER_KILLS", 3, 80)
    gap = profile.seconds("CORRAL_SOAK_WORKER_GAP", 0.8, 1.5)
    rate = profile.seconds("CORRAL_SOAK_RATE", 20.0, 20.0)
    write_config(
        env,
        fsync="always",
        processes=3,
        concurrency=2,
        prefetch=2,
        # Killed workers are crashes to the supervisor: let it restart them
        # at once and never give the pool up.
        extra_pool='max_restarts = 1000000\nrestart_backoff = "0s"',
    )
    record = env.home / "executions"
    history = History()
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(3)

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
            kill_a_worker(daemon, soak_rng, history)
        time.sleep(1.0)
    faults_took = time.monotonic() - started

    acked = history.acknowledged()
    statuses = final_statuses(env, acked, timeout=max(120.0, len(acked) / 10))
    history.load_executions(record)
    verdict = history.check(final=True, statuses=statuses)
    unexplained = verdict.unexplained_reruns()
    windows = verdict.kill_windows()
    soak_report(
        f"kills={len(history.faults)} in_flight_at_kills="
        f"{sum(len(w.in_flight) for w in windows)} took={faults_took:.0f}s "
        f"invocations={history.counts()} executions={len(history.executions)}"
    )
    soak_report(verdict.summary() + f" unexplained_reruns={len(unexplained)}")

    assert daemon.alive(), daemon.output()[-5000:]
    assert acked, "no job was acknowledged"
    assert verdict.valid, verdict.describe()
    assert not verdict.not_succeeded, verdict.describe()
    assert not unexplained, "\n".join(verdict.story(r.job_id) for r in unexplained[:10])
