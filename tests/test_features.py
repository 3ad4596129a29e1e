"""The job features of the seeds, end to end: cancel, unique jobs, delete,
purge, pause, listing, retrying failed jobs, progress, Retry and Fail,
delayed jobs, priorities and queue weights."""

from __future__ import annotations

import json
import time

import pytest
from conftest import Env, wait_for

import corral


@pytest.fixture
def daemon(env: Env):  # type: ignore[no-untyped-def]
    env.write_config(processes=1, prefetch=0)
    proc = env.start("run")
    env.wait_ready(proc)
    env.wait_workers(1)
    return proc


def test_cancel_queued_and_running(env: Env, daemon) -> None:  # type: ignore[no-untyped-def]
    client = env.client()
    running = client.enqueue("e2e.until_cancelled", 30)
    wait_for(lambda: client.job(running).status == "running", message="the job to start")
    queued = client.enqueue("e2e.square", 3)  # behind the running one: one worker, no prefetch
    assert client.job(queued).status == "queued"
    assert client.cancel(queued) is True
    assert client.cancel(running) is True
    for job_id in (queued, running):
        assert client.job(job_id).status == "cancelled"
        with pytest.raises(corral.JobCancelled):
            client.result(job_id, timeout=5)
    # The running handler saw ctx.cancelled; what it returned was discarded.
    wait_for(
        lambda: client.status().stats.get("late_results", 0) >= 1,
        10,
        message="the handler to return",
    )
    assert client.job(running).status == "cancelled"
    assert client.job(queued).tries == []  # never ran
    assert client.cancel(queued) is False  # already ended
    done = env.run("cancel", queued, "-c", str(env.config))
    assert done.returncode == 1 and "had ended" in done.stdout


def test_cancel_scheduled(env: Env, daemon) -> None:  # type: ignore[no-untyped-def]
    client = env.client()
    later = client.enqueue("e2e.square", 4, delay=0.5)
    assert client.job(later).status == "scheduled"
    assert client.cancel(later)
    # A witness due just after it: once the witness ran, the broker's timers
    # were past the cancelled job's run time (no sleep that a slow machine
    # could make too short).
    witness = client.enqueue("e2e.square", 5, delay=0.6)
    assert client.result(witness, timeout=30) == 25
    assert client.job(later).status == "cancelled"
    assert client.job(later).tries == []


def test_unique_jobs(env: Env, daemon) -> None:  # type: ignore[no-untyped-def]
    client = env.client()
    first = client.enqueue("e2e.sleep", 0.3, unique_key="report:1", unique_for=30)
    again = client.enqueue("e2e.sleep", 0.3, unique_key="report:1")
    assert again == first
    client.result(first, timeout=30)
    assert client.enqueue("e2e.sleep", 0.1, unique_key="report:1") == first  # inside unique_for
    other = client.enqueue("e2e.sleep", 0.1, unique_key="report:2")
    assert other != first
    client.result(other, timeout=30)
    assert client.enqueue("e2e.sleep", 0.1, unique_key="report:2") != other  # no window
    cli = env.run("enqueue", "e2e.sleep", "0.1", "--unique-key", "report:1", "-c", str(env.config))
    assert cli.stdout.strip() == first


def test_delete_and_purge(env: Env) -> None:
    env.write_config(processes=0)
    broker = env.start("run")
    env.wait_ready(broker)
    client = env.client()
    ids = client.enqueue_many([corral.Job("e2e.square", n, queue="bulk") for n in range(5)])
    client.enqueue("e2e.square", 1, queue="keep")
    with pytest.raises(corral.BrokerError, match="cancel it first"):
        client.delete(ids[0])
    assert client.purge("bulk") == 5
    for job_id in ids:
        with pytest.raises(corral.JobNotFound):
            client.job(job_id)
    assert client.status().queues["keep"]["queued"] == 1
    done = env.run("purge", "keep", "--json", "-c", str(env.config))
    assert json.loads(done.stdout)["purged"] == 1


def test_delete_finished_job(env: Env, daemon) -> None:  # type: ignore[no-untyped-def]
    client = env.client()
    job_id = client.enqueue("e2e.square", 2)
    assert client.result(job_id, timeout=30) == 4
    client.delete(job_id)
    with pytest.raises(corral.JobNotFound):
        client.result(job_id, timeout=1)


def _idle_worker(client: corral.Client) -> bool:
    """One worker registered, with credit and no job."""
    workers = client.status().workers
    return len(workers) == 1 and workers[0].credit == 1 and workers[0].running == []


def _stays_queued(client: corral.Client, job_id: str, seconds: float) -> None:
    """The job is queued now and at every look for ``seconds``."""
    until = time.monotonic() + seconds
    while True:
        assert client.job(job_id).status == "queued"
        if time.monotonic() > until:
            return
        time.sleep(0.02)


def test_pause_and_resume_survive_a_restart(env: Env) -> None:
    env.write_config(processes=1, prefetch=0)
    daemon = env.start("run")
    env.wait_ready(daemon)
    client = env.client()
    # A worker with credit first: without the pause, the broker would hand
    # the job out in the very pass that acknowledges the enqueue.
    wait_for(lambda: _idle_worker(client), message="the worker to register")
    assert env.run("pause", "default", "-c", str(env.config)).returncode == 0
    assert client.status().paused == ["default"]
    job_id = client.enqueue("e2e.square", 5)
    _stays_queued(client, job_id, 0.5)
    assert _idle_worker(client)  # the worker was there all along, and got nothing
    daemon.signal(15)
    assert daemon.wait(30) == 0
    daemon = env.start("run", name="run-again")
    env.wait_ready(daemon)
    client = env.client()
    assert client.status().paused == ["default"]
    wait_for(lambda: _idle_worker(client), message="the worker to register again")
    _stays_queued(client, job_id, 0.5)
    client.resume("default")
    assert client.result(job_id, timeout=30) == 25


def test_listing_with_filters_and_cursor(env: Env, daemon) -> None:  # type: ignore[no-untyped-def]
    client = env.client()
    ids = [client.enqueue("e2e.square", n) for n in range(7)]
    for job_id in ids:
        client.result(job_id, timeout=30)
    bad = client.enqueue("e2e.give_up", "no")
    with pytest.raises(corral.JobFailed):
        client.result(bad, timeout=30)
    page = client.jobs(status="succeeded", limit=3)
    assert [j.id for j in page] == ids[:3]
    page2 = client.jobs(status="succeeded", limit=3, cursor=page.cursor)
    assert [j.id for j in page2] == ids[3:6]
    last = client.jobs(status="succeeded", limit=3, cursor=page2.cursor)
    assert [j.id for j in last] == ids[6:] and last.cursor is None
    assert [j.id for j in client.jobs(status="failed")] == [bad]
    assert [j.id for j in client.jobs(task="e2e.give_up")] == [bad]
    cli = env.run("jobs", "--status", "failed", "--json", "-c", str(env.config))
    assert [j["id"] for j in json.loads(cli.stdout)["jobs"]] == [bad]
    status = client.status()
    assert status.tasks["e2e.square"]["succeeded"] == 7
    assert status.tasks["e2e.give_up"]["failed"] == 1
    assert status.rates["processed_per_minute"] >= 7
    assert "e2e.square" in status.registered_tasks


def test_retry_failed_jobs_by_hand(env: Env, daemon) -> None:  # type: ignore[no-untyped-def]
    client = env.client()
    bad = [client.enqueue("e2e.give_up", f"r{n}") for n in range(3)]
    for job_id in bad:
        with pytest.raises(corral.JobFailed) as failed:
            client.result(job_id, timeout=30)
        assert failed.value.error.type == "Fail"
        assert client.job(job_id).attempts == 1  # Fail: no more attempts
    good = client.enqueue("e2e.square", 2)
    client.result(good, timeout=30)
    with pytest.raises(corral.BrokerError, match="only failed or cancelled"):
        client.retry(good)
    assert client.retry(bad[0]) == bad[0]
    with pytest.raises(corral.JobFailed):
        client.result(bad[0], timeout=30)
    info = client.job(bad[0])
    assert len(info.tries) == 2  # every try kept
    cli = env.run("retry", "--failed", "--json", "-c", str(env.config))
    assert sorted(json.loads(cli.stdout)["retried"]) == sorted(bad)


def test_release_with_retry_is_not_a_failure(env: Env, daemon) -> None:  # type: ignore[no-untyped-def]
    client = env.client()
    job_id = client.enqueue("e2e.release", 3)
    assert client.result(job_id, timeout=30) == 3
    info = client.job(job_id)
    assert info.attempts == 1  # three releases, none counted (max_attempts is 2)
    assert [t.error.type if t.error else None for t in info.tries] == [
        "Retry",
        "Retry",
        "Retry",
        None,
    ]
    assert [t.attempt for t in info.tries] == [1, 2, 3, 4]  # ctx.attempt: the run number


def test_progress_is_visible(env: Env, daemon) -> None:  # type: ignore[no-untyped-def]
    client = env.client()
    gate = env.home / "gate"
    job_id = client.enqueue("e2e.progress", str(gate))  # runs until the gate file exists
    info = wait_for(
        lambda: (i := client.job(job_id)).progress is not None and i, 10, message="progress to show"
    )
    assert info.progress == 0.5 and info.progress_note == "half way"
    gate.touch()
    assert client.result(job_id, timeout=30) == "done"


def test_delayed_job_runs_on_time(env: Env, daemon) -> None:  # type: ignore[no-untyped-def]
    client = env.client()
    run_at = time.time() + 0.6
    job_id = client.enqueue("e2e.stamp", "late", run_at=run_at)
    info = client.job(job_id)
    assert info.status == "scheduled" and info.next_run_at == pytest.approx(run_at)
    label, ran = client.result(job_id, timeout=30)
    assert label == "late"
    assert ran >= run_at
    assert client.job(job_id).tries[0].started_at - run_at < 0.05  # released on time


def test_priorities_higher_first_fifo_among_equals(env: Env) -> None:
    env.write_config(processes=0)
    broker = env.start("run")
    env.wait_ready(broker)
    client = env.client()
    low = [client.enqueue("e2e.stamp", f"low{n}") for n in range(3)]
    high = [client.enqueue("e2e.stamp", f"high{n}", priority=10) for n in range(3)]
    mid = client.enqueue("e2e.stamp", "mid", priority=5)
    env.start("worker", "--plugin", "e2e_tasks")  # one worker, concurrency 1
    order = sorted((client.result(i, timeout=30)[1], i) for i in [*low, *high, mid])
    assert [i for _, i in order] == [*high, mid, *low]


def test_queue_weights_share_without_starving(env: Env) -> None:
    env.write_config(processes=0)
    broker = env.start("run")
    env.wait_ready(broker)
    client = env.client()
    client.enqueue_many([corral.Job("e2e.stamp", "a", queue="a") for _ in range(40)])
    client.enqueue_many([corral.Job("e2e.stamp", "b", queue="b") for _ in range(40)])
    text = env.config.read_text().replace("processes = 0", "processes = 1")
    weighted = 'queues = ["a", "b"]\nqueue_weights = { a = 3, b = 1 }'
    env.config.write_text(text.replace('queues = ["default"]', weighted))
    env.start("supervisor")
    wait_for(lambda: client.status().queues["a"]["succeeded"] == 40, 60, message="queue a")
    first_40 = client.jobs(status="succeeded", limit=200)
    order = sorted(first_40, key=lambda j: j.tries[0].started_at)[:40]
    from_b = sum(1 for j in order if j.queue == "b")
    assert 5 <= from_b <= 15  # about a quarter, and never zero


def test_result_ttl_expires_results(env: Env, daemon) -> None:  # type: ignore[no-untyped-def]
    client = env.client()
    short = client.enqueue("e2e.square", 3, result_ttl=0.3)
    kept = client.enqueue("e2e.square", 4)
    assert client.result(short, timeout=30) == 9
    assert client.result(kept, timeout=30) == 16
    wait_for(lambda: _gone(client, short), 10, message="the short-lived result to expire")
    assert client.result(kept, timeout=5) == 16  # the default TTL is a day


def _gone(client: corral.Client, job_id: str) -> bool:
    try:
        client.job(job_id)
    except corral.JobNotFound:
        return True
    return False
