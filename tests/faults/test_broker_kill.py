"""Soak: the broker SIGKILLed again and again under a steady load.

Knobs: CORRAL_SOAK_KILLS (30), CORRAL_SOAK_UPTIME (longest time the broker
runs between kills, 4 s), CORRAL_SOAK_RATE (jobs/s, 40), CORRAL_SOAK_SEED.
About 2-3 minutes with the defaults.
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable

import pytest
from conftest import Env

from .harness import Producers, env_float, env_int, final_statuses, write_config
from .history import History

PROCESSES, CONCURRENCY, PREFETCH = 2, 2, 2


@pytest.mark.soak
def test_broker_kill_soak(
    env: Env, soak_rng: random.Random, soak_report: Callable[[str], None]
) -> None:
    kills = env_int("CORRAL_SOAK_KILLS", 30)
    uptime = env_float("CORRAL_SOAK_UPTIME", 4.0)
    rate = env_float("CORRAL_SOAK_RATE", 40.0)
    write_config(
        env,
        fsync="always",
        processes=PROCESSES,
        concurrency=CONCURRENCY,
        prefetch=PREFETCH,
    )
    record = env.home / "executions"
    history = History()

    broker = env.start("broker", name="broker-0")
    env.wait_ready(broker)
    env.start("supervisor")
    env.wait_workers(PROCESSES)

    acked_at_kill = []
    started = time.monotonic()
    with Producers(env.endpoint, history, record, seed=soak_rng.randrange(2**32), rate=rate):
        for n in range(1, kills + 1):
            time.sleep(soak_rng.uniform(0.5, uptime))
            acked_at_kill.append(history.counts()["ok"])
            broker.signal(signal.SIGKILL)
            assert broker.wait(10) == -signal.SIGKILL
            # Down for a moment or, now and then, past the workers'
            # heartbeat window (3 s), so that they reconnect.
            time.sleep(soak_rng.choice([0.0, 0.0, soak_rng.uniform(0.0, 4.0)]))
            broker = env.start("broker", name=f"broker-{n}")
            env.wait_ready(broker, timeout=60)
        time.sleep(1.0)  # a last stretch under load with the broker up
    faults_took = time.monotonic() - started

    acked = history.acknowledged()
    statuses = final_statuses(env, acked, timeout=max(120.0, len(acked) / 10))
    history.load_executions(record)
    verdict = history.check(final=True, statuses=statuses)

    under_load = sum(1 for a, b in zip([0, *acked_at_kill], acked_at_kill, strict=False) if b > a)
    bound = kills * PROCESSES * (CONCURRENCY + PREFETCH)
    soak_report(
        f"kills={kills} under_load={under_load} took={faults_took:.0f}s "
        f"invocations={history.counts()} executions={len(history.executions)}"
    )
    soak_report(verdict.summary() + f" duplicate_bound={bound}")

    assert acked, "no job was acknowledged"
    assert under_load >= kills // 2, f"only {under_load} of {kills} kills came under load"
    assert verdict.valid, verdict.describe()
    assert not verdict.not_succeeded, verdict.describe()
    # Workers offer their held jobs back to the restarted broker, so a kill
    # makes run again only a job whose outcome was in flight when it died
    # (DESIGN-NOTES, limits); the bound stays the loose one: every duplicate
    # comes from a kill, and a kill can make run again at most what the
    # workers held then. tests/faults/test_broker_restart.py asserts none.
    assert verdict.extra_executions <= bound, verdict.describe()
