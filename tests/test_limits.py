"""The supervisor's limits: memory, jobs per process, hard and soft
timeouts, and a poison job that kills its process every time."""

from __future__ import annotations

import json
import signal

import psutil
import pytest
from conftest import CLI_POLL, FAST_RETRY, Env, wait_for, wait_until, worker_processes

import corral


def test_worker_over_max_memory_is_recycled_after_its_job(env: Env) -> None:
    env.write_config(processes=1, prefetch=0, extra_pool='max_memory = "120MiB"')
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(1)
    client = env.client()
    hog = client.enqueue("e2e.hog", 200)
    first = client.result(hog, timeout=30)
    assert client.job(hog).attempts == 1  # the job itself succeeded, once

    def replaced() -> bool:  # the new one titled, the old one gone
        pids = {p.pid for p in worker_processes(daemon)}
        return len(pids) == 1 and first not in pids

    wait_for(replaced, 20, message="the grown worker to be replaced by one new worker")
    later = client.result(client.enqueue("e2e.pid"), timeout=30)
    assert later != first
    out = daemon.output()
    assert "supervisor.recycle" in out and "max_memory" in out


def test_max_jobs_per_process_replaces_workers_and_loses_nothing(env: Env) -> None:
    env.write_config(processes=1, prefetch=0, extra_pool="max_jobs_per_process = 3")
    daemon = env.start("run")
    env.wait_ready(daemon)
    client = env.client()
    ids = [client.enqueue("e2e.pid") for _ in range(10)]
    pids = [client.result(i, timeout=30) for i in ids]
    # One process at a time, one job at a time, in order: a process that
    # has run its 3 jobs says Drain before its last report, so it is never
    # handed a 4th. 10 jobs: 3 + 3 + 3 + 1, four processes.
    assert len(set(pids)) == 4
    assert pids == [pids[0]] * 3 + [pids[3]] * 3 + [pids[6]] * 3 + [pids[9]]
    for job_id in ids:
        assert client.job(job_id).attempts == 1
        assert len(client.job(job_id).tries) == 1
    # Three processes recycled after exactly 3 jobs each; the fourth, with
    # one job, stays. Its log lines can trail the results: poll for them.
    recycled = wait_until(
        lambda: [
            json.loads(line) for line in daemon.output().splitlines() if '"worker.recycle"' in line
        ],
        lambda events: len(events) >= 3,
        20,
        message="three worker.recycle lines",
    )
    assert sorted((e["pid"], e["reason"], e["jobs"]) for e in recycled) == sorted(
        (pid, "max_jobs", 3) for pid in pids[0:9:3]
    )
    assert "supervisor.recycle" in daemon.output()


def test_hard_timeout_kills_the_process_and_retries(env: Env) -> None:
    env.write_config(processes=1, prefetch=0, extra_broker=FAST_RETRY)
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(1)
    client = env.client()
    job_id = client.enqueue("e2e.sleep", 30, timeout=0.5, max_attempts=2)
    with pytest.raises(corral.JobFailed) as failed:
        client.result(job_id, timeout=60)
    assert failed.value.error.type == "TimeoutError"
    info = client.job(job_id)
    assert info.attempts == 2
    wait_for(
        lambda: "supervisor.kill_worker" in daemon.output(),
        20,
        message="the supervisor to kill the stuck process",
    )
    assert "ran past its timeout" in daemon.output()
    assert client.result(client.enqueue("e2e.square", 3), timeout=30) == 9


def test_soft_timeout_raises_inside_the_handler(env: Env) -> None:
    env.write_config(processes=1)
    daemon = env.start("run")
    env.wait_ready(daemon)
    client = env.client()
    assert client.result(client.enqueue("e2e.soft", 3.0), timeout=30) == "cleaned up"
    assert client.result(client.enqueue("e2e.soft", 0.01), timeout=30) == "finished"


def _pool_line(env: Env) -> str:
    done = env.run("status", "-c", str(env.config))
    assert done.returncode == 0, done.stderr
    return next(ln for ln in done.stdout.splitlines() if ln.strip().startswith("pool default"))


#: A pool that would back off for long, and give up in the old design,
#: after two counted crashes.
TOUCHY = 'max_restarts = 1\nrestart_window = "60s"\nrestart_backoff = "30s"\npool_backoff = "10m"'


def test_poison_jobs_fail_themselves_and_the_pool_stays_up(env: Env) -> None:
    """Two jobs that end their process every time: each death is charged
    to the job it ran (it fails after its max_attempts=3), never to the
    pool, which neither backs off nor gives up; the job buffered behind
    them is not charged and runs once."""
    env.write_config(processes=1, prefetch=2, extra_pool=TOUCHY)
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(1)
    client = env.client()
    poison = client.enqueue_many([corral.Job("e2e.crash", 3) for _ in range(2)])
    innocent = client.enqueue("e2e.square", 7)
    for job_id in poison:
        with pytest.raises(corral.JobFailed) as failed:
            client.result(job_id, timeout=60)
        assert failed.value.error.type == "WorkerLost"
        info = client.job(job_id)
        assert info.attempts == 3
        assert all(t.error is not None and "exit" in t.error.message for t in info.tries)
    assert client.result(innocent, timeout=30) == 49
    assert client.job(innocent).attempts == 1 and len(client.job(innocent).tries) == 1
    output = daemon.output()
    assert "supervisor.pool_backing_off" not in output and "supervisor.backoff" not in output
    wait_for(lambda: _pool_line(env).endswith(", ok"), 20, CLI_POLL, message="the pool's state")
    assert client.result(client.enqueue("e2e.square", 3), timeout=30) == 9


CRASH_AT_START = """
import os
if os.path.exists({mark!r}):
    os._exit(5)
"""


def test_a_crash_looping_pool_backs_off_and_sighup_restarts_it_at_once(env: Env) -> None:
    """Workers that die at start-up (no job to blame) make the pool back
    off, with a cap, never for good: `corral status` says until when.
    `corral reload` (a SIGHUP) restarts it at once."""
    plugins = env.home / "plugins"
    plugins.mkdir()
    mark = env.home / "crash-at-start"
    (plugins / "startup_tasks.py").write_text(CRASH_AT_START.format(mark=str(mark)))
    env.write_config(processes=1, extra_pool=TOUCHY + "\npreload = false")
    text = env.config.read_text().replace('python_path = ["', f'python_path = ["{plugins}", "')
    env.config.write_text(text.replace('"e2e_tasks"]', '"e2e_tasks", "startup_tasks"]'))
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(1)
    mark.touch()
    worker_processes(daemon)[0].kill()  # its successors die at start-up
    wait_for(lambda: "supervisor.pool_backing_off" in daemon.output(), 30, message="the backoff")
    wait_for(
        lambda: "backing off until" in _pool_line(env), 20, CLI_POLL, message="the pool's state"
    )
    assert daemon.alive()
    mark.unlink()
    done = env.run("reload", "-c", str(env.config))  # the command for SIGHUP
    assert done.returncode == 0 and f"pid {daemon.pid}" in done.stdout, done.stderr
    env.wait_workers(1, timeout=30)  # at once, not after pool_backoff (10 minutes)
    client = env.client()
    assert client.result(client.enqueue("e2e.square", 4), timeout=30) == 16
    wait_for(lambda: _pool_line(env).endswith(", ok"), 20, CLI_POLL, message="the pool's state")


def test_two_workers_killed_at_once_both_restart_at_once(env: Env) -> None:
    """Restart backoff is per slot: two unrelated deaths (say, the OOM
    killer) restart both workers at once, not one after restart_backoff."""
    env.write_config(processes=2, extra_pool='restart_backoff = "30s"')
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(2)
    before = worker_processes(daemon)
    for process in before:
        process.kill()
    old = {p.pid for p in before}

    def replaced() -> bool:
        pids = {p.pid for p in worker_processes(daemon)}
        return len(pids) == 2 and not pids & old

    wait_for(replaced, 20, message="both workers to be replaced")  # not 30 s apart
    assert "supervisor.backoff" not in daemon.output()


def test_asyncio_pool_runs_coroutines_concurrently(env: Env) -> None:
    env.write_config(
        processes=1, concurrency=5, prefetch=0, extra_pool='concurrency_mode = "asyncio"'
    )
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(1)
    client = env.client()
    ids = client.enqueue_many([corral.Job("e2e.async_nap", 1.0) for _ in range(5)])
    spans = [client.result(i, timeout=30) for i in ids]
    # One process, five jobs: all of them ran at the same moment.
    assert max(start for start, _ in spans) < min(end for _, end in spans)
    assert len({client.job(i).tries[0].pid for i in ids}) == 1
    # Plain functions run too, on threads of the same process.
    assert client.result(client.enqueue("e2e.square", 6), timeout=30) == 36


def test_max_age_recycles_workers(env: Env) -> None:
    env.write_config(processes=1, extra_pool='max_age = "1s"')
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(1)
    first = {p.pid for p in worker_processes(daemon)}
    wait_for(
        lambda: (now := {p.pid for p in worker_processes(daemon)}) and not (now & first),
        20,
        message="the aged worker to be replaced",
    )
    # the supervisor's line may come just after the replacement shows up
    wait_for(lambda: "max_age" in daemon.output(), 20, message="the recycle to be logged")
    client = env.client()
    assert client.result(client.enqueue("e2e.square", 4), timeout=30) == 16


def test_second_sigint_stops_at_once(env: Env) -> None:
    env.write_config(processes=1, prefetch=0)
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(1)
    client = env.client()
    job_id = client.enqueue("e2e.sleep", 60)
    wait_for(lambda: client.job(job_id).status == "running", message="the long job")
    children = daemon.descendants()
    daemon.signal(signal.SIGINT)  # drain: would wait for the 60 s job
    wait_for(lambda: "supervisor.stopping" in daemon.output(), 10, message="the drain")
    daemon.signal(signal.SIGINT)
    assert daemon.wait(10) != 0
    wait_for(
        lambda: not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children),
        5,
        message="every child gone",
    )


def test_drain_past_shutdown_timeout_requeues_the_unfinished_try_uncounted(env: Env) -> None:
    """A job still running when shutdown_timeout ends goes back to its
    queue, its try recorded as interrupted and not counted: with
    max_attempts=1 it runs again after the restart, not fails for good."""
    env.write_config(processes=1, prefetch=0)
    env.config.write_text(
        env.config.read_text().replace('shutdown_timeout = "10s"', 'shutdown_timeout = "500ms"')
    )
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(1)
    client = env.client()
    gate = env.home / "gate"
    job_id = client.enqueue("e2e.gate", str(gate), max_attempts=1)
    wait_for(lambda: client.job(job_id).status == "running", message="the long job")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(60) == 0
    broker = env.start("broker")
    env.wait_ready(broker)
    client = env.client()
    info = client.job(job_id)
    assert (info.status, info.attempts) == ("queued", 0)
    assert [t.error.type if t.error else None for t in info.tries] == ["Interrupted"]
    assert info.tries[0].ended_at is not None
    assert "shutdown_timeout" in info.tries[0].error.message  # type: ignore[union-attr]
    # it runs again, to success, under its one attempt
    gate.touch()
    env.start("worker", "--plugin", "e2e_tasks")
    assert client.result(job_id, timeout=30)["attempt"] == 2  # the second run
    info = client.job(job_id)
    assert (info.status, info.attempts) == ("succeeded", 1)
    assert [t.attempt for t in info.tries] == [1, 2]


SLOW_IMPORT = "import time\ntime.sleep({seconds})\n"


def _slow_plugin(env: Env, seconds: float, extra: str = "") -> None:
    plugins = env.home / "plugins"
    plugins.mkdir()
    (plugins / "slow_tasks.py").write_text(SLOW_IMPORT.format(seconds=seconds))
    env.write_config(processes=1, extra_pool="preload = false\n" + extra)
    text = env.config.read_text().replace('python_path = ["', f'python_path = ["{plugins}", "')
    env.config.write_text(text.replace('"e2e_tasks"]', '"e2e_tasks", "slow_tasks"]'))


def test_a_slow_start_is_not_a_hang(env: Env) -> None:
    """A plugin that takes 2 s to import (the liveness window is 0.6 s
    here): the worker is judged by its startup_timeout until it speaks."""
    _slow_plugin(env, 2.0)
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(1)
    client = env.client()
    assert client.result(client.enqueue("e2e.square", 5), timeout=30) == 25
    assert "supervisor.kill_worker" not in daemon.output()


def test_a_start_past_startup_timeout_is_killed_and_backs_off(env: Env) -> None:
    _slow_plugin(env, 30.0, 'startup_timeout = "1s"\nrestart_backoff = "1s"')
    daemon = env.start("run")
    env.wait_ready(daemon)
    wait_for(
        lambda: daemon.output().count("not started within startup_timeout 1s") >= 2,
        30,
        message="two starts killed",
    )
    wait_for(lambda: "supervisor.backoff" in daemon.output(), 20, message="the backoff")
    assert daemon.alive()
