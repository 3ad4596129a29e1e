"""Fault: `corral run` stopped with SIGTERM and started again, many times,
with jobs in flight.

Knobs of the full profile (``make soak``): CORRAL_SOAK_RESTARTS (20),
CORRAL_SOAK_UPTIME (longest time the daemon runs between stops, 4 s),
CORRAL_SOAK_RATE (jobs/s, 30), CORRAL_SOAK_SEED; about 2 minutes. The fast
profile: 2 cycles of at most 1.5 s.
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable

import pytest
from conftest import Env

from .harness import PROFILES, Producers, Profile, final_statuses, write_config
from .history import History

PROCESSES, CONCURRENCY, PREFETCH = 2, 2, 2


@pytest.mark.parametrize("profile", PROFILES)
def test_restart_cycles(
    env: Env, profile: Profile, soak_rng: random.Random, soak_report: Callable[[str], None]
) -> None:
    cycles = profile.count("CORRAL_SOAK_RESTARTS", 2, 20)
    uptime = profile.seconds("CORRAL_SOAK_UPTIME", 1.5, 4.0)
    rate = profile.seconds("CORRAL_SOAK_RATE", 30.0, 30.0)
    write_config(
        env, fsync="always", processes=PROCESSES, concurrency=CONCURRENCY, prefetch=PREFETCH
    )
    record = env.home / "executions"
    history = History()

    drains = []
    started = time.monotonic()
    producers = Producers(
        env.endpoint, history, record, seed=soak_rng.randrange(2**32), rate=rate, seconds=(0.0, 0.2)
    )
    with producers:
        for n in range(cycles):
            daemon = env.start("run", name=f"run-{n}")
            env.wait_ready(daemon, timeout=60)
            time.sleep(soak_rng.uniform(0.5, uptime))
            stopped_at = time.monotonic()
            daemon.signal(signal.SIGTERM)
            code = daemon.wait(60)
            assert code == 0, f"cycle {n}: `corral run` exited {code}:\n{daemon.output()[-5000:]}"
            drains.append(time.monotonic() - stopped_at)
    faults_took = time.monotonic() - started

    daemon = env.start("run", name="run-last")
    env.wait_ready(daemon, timeout=60)
    acked = history.acknowledged()
    statuses = final_statuses(env, acked, timeout=max(120.0, len(acked) / 10))
    history.load_executions(record)
    verdict = history.check(final=True, statuses=statuses)
    soak_report(
        f"cycles={cycles} took={faults_took:.0f}s longest_drain={max(drains, default=0):.1f}s "
        f"invocations={history.counts()} executions={len(history.executions)}"
    )
    soak_report(verdict.summary())

    assert acked, "no job was acknowledged"
    assert verdict.valid, verdict.describe()
    assert not verdict.not_succeeded, verdict.describe()
    # A drain finishes the jobs it runs and hands back the ones it has not
    # started (README, "Running it"), so a clean stop runs nothing twice.
    assert not verdict.more_than_once, verdict.describe()
