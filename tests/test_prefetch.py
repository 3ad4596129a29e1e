"""A job in a worker's prefetch buffer is queued, not running: cancelling
it means it never runs; its worker is named while it waits there."""

from __future__ import annotations

from conftest import Env, kill_broker, wait_for, wait_until


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
    shown = env.run("job", b, "-c", str(env.config)).stdout
    assert f"reserved by: {worker.worker_id}" in shown and "started:     -" in shown
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


def _started_order(client, ids: list[str]) -> list[str]:  # type: ignore[no-untyped-def]
    infos = [client.job(i) for i in ids]
    return [i.id for i in sorted(infos, key=lambda i: i.started_at)]


def test_a_higher_priority_job_starts_next_behind_the_running_one(env: Env) -> None:
    # 1 process, concurrency 1, prefetch 4: the buffer is full of priority 0
    # jobs when one of priority 10 comes; it starts 2nd of 9, not 6th.
    env.write_config(processes=1, concurrency=1, prefetch=4)
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(1)
    client = env.client()
    gate, marks = env.home / "gate", env.home / "marks"
    first = client.enqueue("e2e.gate", str(gate))
    low = [client.enqueue("e2e.mark", str(marks)) for _ in range(7)]
    wait_until(
        lambda: client.status().workers[0],
        lambda w: w.running == [first] and len(w.reserved) == 4,
        message="a full buffer",
    )
    high = client.enqueue("e2e.mark", str(marks), priority=10)
    wait_until(
        lambda: client.job(high), lambda i: i.reserved_by is not None, message="high buffered"
    )
    (worker,) = client.status().workers
    assert len(worker.reserved) == 4 and high in worker.reserved  # a low one went back
    gate.touch()
    for job_id in [first, *low, high]:
        client.result(job_id, timeout=30)
    order = _started_order(client, [first, *low, high])
    assert order[:2] == [first, high]
    assert order[2:] == low  # the others in their order
    assert [line.split()[0] for line in marks.read_text().splitlines()] == [high, *low]
    assert all(client.job(i).attempts == 1 for i in [first, *low, high])


def test_jobs_spread_over_the_stock_pool_two_at_a_time(env: Env) -> None:
    # The stock pool: 2 processes, concurrency 1, prefetch 4. Four jobs run
    # two at a time, one per process, not four in a row on one.
    env.write_config(processes=2, concurrency=1, prefetch=4)
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(2)
    client = env.client()
    gate = env.home / "gate"
    ids = [client.enqueue("e2e.gate", str(gate)) for _ in range(4)]
    workers = wait_until(
        lambda: client.status().workers,
        lambda ws: sorted((len(w.running), len(w.reserved)) for w in ws) == [(1, 1), (1, 1)],
        message="one job running and one buffered on each worker",
    )
    assert len({w.pid for w in workers}) == 2
    gate.touch()
    pids = {client.result(i, timeout=30)["pid"] for i in ids}
    assert pids == {w.pid for w in workers}


def test_a_worker_that_comes_later_takes_jobs_waiting_in_another_buffer(env: Env) -> None:
    env.write_config(processes=0, concurrency=1, prefetch=3)
    broker = env.start("broker")
    env.wait_ready(broker)
    env.start("worker", "--plugin", "e2e_tasks")
    env.wait_workers(1)
    client = env.client()
    gate = env.home / "gate"
    ids = [client.enqueue("e2e.gate", str(gate)) for _ in range(4)]
    wait_until(
        lambda: client.status().workers[0],
        lambda w: len(w.running) == 1 and len(w.reserved) == 3,
        message="all four on the first worker",
    )
    env.start("worker", "--plugin", "e2e_tasks", name="second-worker")
    workers = wait_until(
        lambda: client.status().workers,
        lambda ws: len(ws) == 2 and sorted(len(w.running) for w in ws) == [1, 1],
        message="the second worker to run one of them",
    )
    assert sorted(len(w.reserved) for w in workers) == [0, 2]
    gate.touch()
    pids = {client.result(i, timeout=30)["pid"] for i in ids}
    assert len(pids) == 2
    assert all(client.job(i).attempts == 1 for i in ids)  # nothing charged for the move


def test_after_pause_returns_no_buffered_job_of_the_queue_starts(env: Env) -> None:
    env.write_config(processes=1, concurrency=1, prefetch=2)
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(1)
    client = env.client()
    gate, marks = env.home / "gate", env.home / "marks"
    first = client.enqueue("e2e.gate", str(gate))
    buffered = [client.enqueue("e2e.mark", str(marks)) for _ in range(2)]
    wait_until(
        lambda: client.status().workers[0],
        lambda w: w.running == [first] and sorted(w.reserved) == sorted(buffered),
        message="two jobs in the buffer",
    )
    client.pause("default")
    # once pause has returned, the buffered jobs are back in the queue
    for job_id in buffered:
        info = client.job(job_id)
        assert (info.status, info.reserved_by) == ("queued", None)
    gate.touch()
    assert client.result(first, timeout=30)["attempt"] == 1
    wait_until(
        lambda: client.status().workers[0],
        lambda w: w.running == [] and w.reserved == [],
        message="the worker idle",
    )
    assert not marks.exists()  # neither started
    client.resume("default")
    for job_id in buffered:
        assert client.result(job_id, timeout=30) == job_id
    assert [line.split()[0] for line in marks.read_text().splitlines()] == buffered


def test_buffered_jobs_run_once_across_a_broker_restart(env: Env) -> None:
    """The restarted broker puts every leased job back; the worker, told to
    register again, drops the unstarted jobs in its buffer, so each runs
    once (the running one is another matter: see the README's limits)."""
    env.write_config(processes=1, concurrency=1, prefetch=2)
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(1)
    client = env.client()
    gate, marks = env.home / "gate", env.home / "marks"
    first = client.enqueue("e2e.gate", str(gate))
    buffered = [client.enqueue("e2e.mark", str(marks)) for _ in range(2)]
    wait_until(
        lambda: client.status().workers[0],
        lambda w: w.running == [first] and sorted(w.reserved) == sorted(buffered),
        message="two jobs in the buffer",
    )
    kill_broker(env, daemon)
    # told to register again, or it noticed the silence and reconnected
    wait_for(
        lambda: "worker.reregister" in daemon.output() or "worker.broker_silent" in daemon.output(),
        30,
        message="the worker to register again",
    )
    gate.touch()
    client = env.client()
    for job_id in buffered:
        assert client.result(job_id, timeout=30) == job_id
    ran = [line.split()[0] for line in marks.read_text().splitlines()]
    assert sorted(ran) == sorted(buffered)  # each once
