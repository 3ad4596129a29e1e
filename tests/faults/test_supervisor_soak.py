"""Soak: a pool under mixed faults for a long stretch: poison jobs that end
their process, broker SIGKILLs, and reloads (good ones that roll the pool,
and broken ones that must change nothing), all while jobs flow.

It shows that the supervisor never takes the service down: the pool never
backs off (the poison jobs are charged, not the pool), the daemon stays up,
no acknowledged job is lost, every poison job ends failed, and once
``corral run`` stops no process of its session is left.

Knobs of the full profile (``make soak``): CORRAL_SOAK_SUPERVISOR_MINUTES
(30), CORRAL_SOAK_RATE (jobs/s, 20), CORRAL_SOAK_SEED. The fast profile
runs 9 s (two or three faults).
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from conftest import Env, Proc, broker_processes, wait_for

import corral

from .harness import PROFILES, Producers, Profile, final_statuses, write_config
from .history import History

DYN = """import corral

@corral.task(name="dyn.version")
def version(n: int) -> str:
    return "{v}"
"""


def session_processes(sid: int) -> list[psutil.Process]:
    out = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid:
                out.append(proc)
        except (OSError, psutil.Error):
            continue
    return out


def pool_state(env: Env) -> str:
    done = env.run("status", "-c", str(env.config), "--timeout", "5")
    if done.returncode != 0:
        return ""  # the broker is restarting
    lines = [ln for ln in done.stdout.splitlines() if ln.strip().startswith("pool default")]
    return lines[0] if lines else ""


class Faults:
    """The faults, one at a time, on ``corral run``: a poison job, a broker
    SIGKILL, a reload that rolls the pool, a reload with a broken plugin."""

    def __init__(self, env: Env, daemon: Proc, module: Path) -> None:
        self.env = env
        self.daemon = daemon
        self.module = module
        self.client = env.client(timeout=10.0)
        self.poison: list[str] = []
        self.version = 0
        self.counts = {"poison": 0, "broker_kills": 0, "reloads": 0, "broken_reloads": 0}

    def inject(self, fault: str) -> None:
        getattr(self, fault)()

    def poison_job(self) -> None:
        try:
            self.poison.append(self.client.enqueue("e2e.crash", 3))
            self.counts["poison"] += 1
        except corral.BrokerUnavailable:
            pass

    def broker_kill(self) -> None:
        for p in broker_processes(self.daemon):
            try:
                p.kill()
                self.counts["broker_kills"] += 1
            except psutil.Error:
                pass

    def reload(self) -> None:
        self.version += 1
        self.module.write_text(DYN.format(v=self.version))
        self.daemon.signal(signal.SIGHUP)
        self.counts["reloads"] += 1

    def broken_reload(self) -> None:
        before = self.daemon.output().count("supervisor.reload_failed")
        self.module.write_text("def broken(:\n")
        self.daemon.signal(signal.SIGHUP)
        wait_for(
            lambda: self.daemon.output().count("supervisor.reload_failed") > before,
            120,
            message="the broken reload to be refused",
        )
        self.counts["broken_reloads"] += 1
        self.module.write_text(DYN.format(v=self.version))


FAULTS = ["poison_job", "poison_job", "broker_kill", "reload", "broken_reload"]


def start(env: Env) -> tuple[Proc, Path]:
    dyn_dir = env.home / "dyn"
    dyn_dir.mkdir()
    module = dyn_dir / "soak_dyn.py"
    module.write_text(DYN.format(v=0))
    write_config(
        env,
        fsync="always",
        processes=2,
        concurrency=1,
        prefetch=2,
        plugins='["soak_tasks", "e2e_tasks", "soak_dyn"]',
        # touchy on purpose: the pool is to blame for few of the crashes here
        extra_pool='max_restarts = 3\nrestart_window = "60s"\npool_backoff = "10m"',
    )
    text = env.config.read_text()
    env.config.write_text(text.replace('python_path = ["', f'python_path = ["{dyn_dir}", "', 1))
    daemon = env.start("run")
    env.wait_ready(daemon, timeout=60)
    env.wait_workers(2)
    return daemon, module


@pytest.mark.parametrize("profile", PROFILES)
def test_a_pool_survives_poison_jobs_broker_kills_and_reloads(
    env: Env, profile: Profile, soak_rng: random.Random, soak_report: Callable[[str], None]
) -> None:
    minutes = profile.seconds("CORRAL_SOAK_SUPERVISOR_MINUTES", 0.1, 30.0)
    rate = profile.seconds("CORRAL_SOAK_RATE", 20.0, 20.0)
    daemon, module = start(env)
    faults = Faults(env, daemon, module)
    record = env.home / "executions"
    history = History()
    states: set[str] = set()
    deadline = time.monotonic() + minutes * 60
    seed = soak_rng.randrange(2**32)
    with Producers(env.endpoint, history, record, seed=seed, rate=rate, timeout=10.0):
        while time.monotonic() < deadline:
            time.sleep(soak_rng.uniform(2.0, 6.0))
            faults.inject(soak_rng.choice(FAULTS))
            assert daemon.alive(), daemon.output()[-5000:]
            state = pool_state(env)
            states.add(state.rsplit(", ", 1)[-1] if state else "")
            assert "backing off" not in state, state
    acked = history.acknowledged()
    statuses = final_statuses(env, acked, timeout=max(300.0, len(acked) / 10))
    history.load_executions(record)
    verdict = history.check(final=True, statuses=statuses)
    for job_id in faults.poison:
        with pytest.raises(corral.JobFailed):
            faults.client.result(job_id, timeout=120)
    soak_report(
        f"supervisor: {minutes:g} min, {faults.counts}, pool states seen {sorted(states)}, "
        f"invocations={history.counts()}; " + verdict.summary()
    )
    assert "supervisor.pool_backing_off" not in daemon.output()
    assert verdict.valid, verdict.describe()
    assert not verdict.not_succeeded, verdict.describe()
    sid = daemon.pid
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(120) == 0
    wait_for(lambda: not session_processes(sid), 30, message="no process of corral's session")
