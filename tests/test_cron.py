"""Cron and interval schedules fire in the broker, once per due time, also
across a broker crash; the catch-up policy decides about missed times."""

from __future__ import annotations

import itertools
import json
import signal
import time

import pytest
from conftest import Env, Proc, wait_for


def _due_times(client) -> list[float]:  # type: ignore[no-untyped-def]
    jobs = client.jobs(limit=10_000)
    return sorted(int(j.id.rsplit("-", 1)[1], 16) / 1000 for j in jobs if j.id.startswith("cron-"))


def _config(env: Env, catch_up: str) -> None:
    env.write_config(processes=0)
    env.config.write_text(
        env.config.read_text().replace(
            "\n[log]",
            f"""
[[schedules]]
name = "tick"
task = "e2e.stamp"
every = "400ms"
payload = "tick"
catch_up = "{catch_up}"

[log]""",
        )
    )


def _run_crash_restart(env: Env) -> tuple[list[float], list[float], Proc]:
    broker = env.start("broker")
    env.wait_ready(broker)
    client = env.client()
    wait_for(lambda: len(_due_times(client)) >= 4, 10, message="4 fires")
    broker.signal(signal.SIGKILL)
    broker.wait(10)
    down_at = time.time()
    wait_for(lambda: time.time() > down_at + 1.7, 5, message="the downtime to pass")
    broker = env.start("broker", name="broker-again")
    env.wait_ready(broker)
    client = env.client()
    wait_for(
        lambda: len([d for d in _due_times(client) if d > down_at]) >= 3,
        10,
        message="fires after the restart",
    )
    times = _due_times(client)
    return [d for d in times if d <= down_at], [d for d in times if d > down_at], broker


def _on_grid(times: list[float]) -> bool:
    steps = [b - a for a, b in itertools.pairwise(times)]
    return all(step > 0 and abs(step / 0.4 - round(step / 0.4)) < 0.01 for step in steps)


def test_interval_schedule_survives_a_crash_without_double_fires(env: Env) -> None:
    _config(env, "skip")
    earlier, later, broker = _run_crash_restart(env)
    assert len(earlier) >= 4
    assert _on_grid(earlier + later)  # no due time twice, none off the schedule
    assert later[0] - earlier[-1] > 1.7 - 0.4  # skip: the downtime's due times never fired
    assert "broker.schedule_caught_up" not in broker.output()


def test_catch_up_once_fires_one_missed_time(env: Env) -> None:
    _config(env, "once")
    earlier, later, broker = _run_crash_restart(env)
    assert _on_grid(earlier + later)
    caught = [
        json.loads(line)
        for line in broker.output().splitlines()
        if "broker.schedule_caught_up" in line
    ]
    assert len(caught) == 1  # exactly one catch-up...
    assert caught[0]["due_at"] == pytest.approx(later[0])  # ...the first fire after the crash
    assert later[0] > earlier[-1] + 0.4  # from the downtime, not a repeat of a fired time


def test_bad_cron_expression_is_a_config_error(env: Env) -> None:
    env.write_config()
    env.config.write_text(
        env.config.read_text().replace(
            "\n[log]",
            """
[[schedules]]
task = "e2e.stamp"
cron = "61 * * * *"

[log]""",
        )
    )
    done = env.run("check-config", "-c", str(env.config))
    assert done.returncode == 2
    assert "61 * * * *" in done.stderr
