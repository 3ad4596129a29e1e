"""A job in a worker's prefetch buffer is queued, not running: cancelling
it means it never runs; its worker is named while it waits there."""

from __future__ import annotations

from conftest import Env, wait_for, wait_until


def test_a_cancelled_job_in_a_prefetch_buffer_never_runs(env: Env) -> None:
    # 1 process, concurrency 1, prefetch 2: while A runs, B waits in the
    # same worker's buffer.
    env.write_config(processes=1, concurrency=1, prefetch=2)
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(1)
    client = env.client()
    gate, marks = env.home / "gate", env.home / "marks"
    a = client.enqueue("e2e.gate", str(gate))  # runs until the gate file exists
    b = client.enqueue("e2e.mark", str(marks))
    wait_for(lambda: client.job(a).status == "running", message="A to start")
    info = wait_until(
        lambda: client.job(b), lambda i: i.reserved_by is not None, message="B to be buffered"
    )
    assert (info.status, info.attempts, info.tries, info.started_at) == ("queued", 0, [], None)
    (worker,) = client.status().workers
    assert (worker.running, worker.reserved) == ([a], [b])
    assert client.cancel(b) is True
    assert client.job(b).status == "cancelled"
    # the worker handed B back unstarted: its credit is back
    wait_until(
        lambda: client.status().workers[0],
        lambda w: w.reserved == [] and w.credit == 2,
        message="B handed back",
    )
    gate.touch()
    assert client.result(a, timeout=30)["attempt"] == 1
    # the next job runs on the same worker; B never did
    c = client.enqueue("e2e.mark", str(marks))
    assert client.result(c, timeout=30) == c
    assert [line.split()[0] for line in marks.read_text().splitlines()] == [c]
    info = client.job(b)
    assert (info.status, info.tries) == ("cancelled", [])
    assert client.status().stats.get("late_results", 0) == 0
