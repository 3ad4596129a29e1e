"""Cron and interval schedules fire in the broker, once per due time, also
across a real broker crash (SIGKILL). The catch-up policies are checked
in-process with a fake clock in tests/test_core.py, steps of the wall clock
in tests/test_clock_steps.py."""

from __future__ import annotations

import itertools
import signal
import time
from collections import Counter

from conftest import Env, Proc, json_events, wait_for, wait_until


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


def _fires(*procs: Proc) -> list[float]:
    """The due time of every fire the brokers made, in the order they made
    them: one log line per fire, also for a fire whose job id existed
    already (which the job listing cannot show)."""
    return [
        event["due_at"]
        for proc in procs
        for event in json_events(proc.output())
        if event["event"] in ("broker.schedule_fired", "broker.schedule_caught_up")
    ]


#: How long the broker stays down, in seconds: at least two due times.
DOWNTIME = 1.2


def _run_crash_restart(env: Env) -> tuple[list[float], list[float], Proc, list[float]]:
    """Run, SIGKILL and restart a broker with the 400 ms "tick" schedule;
    returns the due times of the jobs before and after the crash, the new
    broker and the due times of all the fires both brokers made."""
    first = env.start("broker")
    env.wait_ready(first)
    client = env.client()
    wait_for(lambda: len(_due_times(client)) >= 3, 10, message="3 fires")
    # Kill half way between two due times, not while a fire is being logged.
    wait_for(lambda: 0.15 < time.time() % 0.4 < 0.25, 5, 0.005, message="the middle of a period")
    first.signal(signal.SIGKILL)
    first.wait(10)
    down_at = time.time()
    wait_for(lambda: time.time() > down_at + DOWNTIME, 5, message="the downtime to pass")
    broker = env.start("broker", name="broker-again")
    env.wait_ready(broker)
    client = env.client()
    wait_for(
        lambda: len([d for d in _due_times(client) if d > down_at]) >= 2,
        10,
        message="fires after the restart",
    )
    times = _due_times(client)
    fires = _fires(first, broker)
    return [d for d in times if d <= down_at], [d for d in times if d > down_at], broker, fires


def _on_grid(times: list[float]) -> bool:
    steps = [b - a for a, b in itertools.pairwise(times)]
    return all(step > 0 and abs(step / 0.4 - round(step / 0.4)) < 0.01 for step in steps)


def _fired_once_each(fires: list[float], jobs: list[float], first_fires: int) -> None:
    """Every due time fired at most once (a repeat would be deduplicated by
    its job id, so only the fires show it), and every job came from a fire.
    Compared in milliseconds, as job ids carry them."""
    fired = [round(d * 1000) for d in fires]
    made = {round(d * 1000) for d in jobs}
    repeated = sorted(d for d, n in Counter(fired).items() if n > 1)
    assert not repeated, f"due times (ms) fired twice: {repeated}"
    assert made <= set(fired)
    # A fire with no job: only the first broker's last one, cut by the crash
    # before its records reached the log.
    assert set(fired) - made <= {fired[first_fires - 1]}


def test_interval_schedule_survives_a_crash_without_double_fires(env: Env) -> None:
    _config(env, "skip")
    earlier, later, broker, fires = _run_crash_restart(env)
    assert len(earlier) >= 3
    assert _on_grid(earlier + later)  # no due time twice, none off the schedule
    assert later[0] - earlier[-1] > DOWNTIME - 0.4  # skip: the downtime's due times never fired
    assert "broker.schedule_caught_up" not in broker.output()
    first_fires = len(_fires(env.procs[0]))
    _fired_once_each(fires, earlier + later, first_fires)
    # The restarted broker fired each of its due times once and made a job
    # each time: its count of fires matches its fire lines and the jobs.
    client = env.client()
    _, later_jobs, later_fires = wait_until(
        lambda: (
            client.status().stats.get("schedules_fired", 0),
            [d for d in _due_times(client) if d > earlier[-1]],
            _fires(broker),
        ),
        lambda v: v[0] == len(v[1]) == len(v[2]),
        10,
        message="the second broker's fire count, fire lines and jobs to agree",
    )
    assert [round(d * 1000) for d in later_fires] == [round(d * 1000) for d in later_jobs]


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
