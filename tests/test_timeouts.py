"""A try past its timeout: its holder is told (ctx.cancelled), the next
attempt goes to another process for its full timeout, and a hard-timeout
kill charges only the job that timed out."""

from __future__ import annotations

from conftest import FAST_RETRY, Env, wait_for, wait_until


def test_the_next_attempt_runs_elsewhere_and_the_old_holder_sees_the_cancel(env: Env) -> None:
    env.write_config(processes=2, concurrency=1, prefetch=2, extra_broker=FAST_RETRY)
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(2)
    client = env.client()
    gate = env.home / "gate"
    job_id = client.enqueue("e2e.stubborn", str(gate), timeout=2, max_attempts=2)
    (first,) = wait_until(
        lambda: client.job(job_id).tries, lambda t: len(t) == 1, message="try 1 to start"
    )
    # The other process is busy too, so both look alike to the dispatcher
    # (and the stuck one got a job first): only the rule sends try 2 away.
    busy = client.enqueue("e2e.gate", str(gate))
    wait_for(lambda: client.job(busy).status == "running", message="the other process busy")
    assert client.job(busy).tries[0].pid != first.pid
    info = wait_until(
        lambda: client.job(job_id),
        lambda i: len(i.tries) == 1 and i.tries[0].error is not None and i.reserved_by,
        30,
        message="try 1 to time out and try 2 to be handed out",
    )
    assert info.tries[0].error.type == "TimeoutError"  # type: ignore[union-attr]
    stuck = next(w for w in client.status().workers if w.pid == first.pid)
    assert info.reserved_by != stuck.worker_id  # not the process still running try 1
    gate.touch()
    # (once the gate opens, the old process is free again and may take
    # try 2 over from the busy one: that is fair, so not checked here)
    assert client.result(job_id, timeout=30)["attempt"] == 2
    log = env.home / "gate.log"
    lines = wait_for(lambda: log.exists() and log.read_text().splitlines(), 30, message="the log")
    runs = {line.split()[0]: line.split()[2] for line in lines}
    assert runs["2"] == "False"
    if "1" in runs:  # unless the supervisor's hard-timeout kill came first
        assert runs["1"] == "True"  # try 1's handler saw ctx.cancelled


def test_a_hard_timeout_kill_charges_only_the_job_that_timed_out(env: Env) -> None:
    env.write_config(processes=1, concurrency=2, prefetch=0, extra_broker=FAST_RETRY)
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(1)
    client = env.client()
    gate = env.home / "gate"
    late = client.enqueue("e2e.stubborn", str(gate), timeout=1, max_attempts=2)
    other = client.enqueue("e2e.gate", str(gate))  # no timeout: an innocent job
    wait_for(
        lambda: client.job(late).status == "running" and client.job(other).status == "running",
        message="both jobs on the one process",
    )
    victim = client.job(late).tries[0].pid
    wait_for(lambda: "supervisor.kill_worker" in daemon.output(), 30, message="the kill")
    info = wait_until(
        lambda: client.job(other),
        lambda i: i.status in ("queued", "running") and all(t.pid != victim for t in i.tries),
        30,
        message="the innocent job back, uncounted",
    )
    assert info.attempts in (0, 1) and all(t.error is None for t in info.tries)
    gate.touch()
    assert client.result(other, timeout=30)["attempt"] == 1
    info = client.job(other)
    assert (info.attempts, [t.attempt for t in info.tries]) == (1, [1])
    assert info.tries[0].pid != victim
    info = client.job(late)
    assert info.tries[0].error is not None and info.tries[0].error.type == "TimeoutError"
    assert not any(t.error and t.error.type == "WorkerLost" for t in info.tries)


def test_a_frozen_worker_killed_by_its_supervisor_charges_its_running_job(env: Env) -> None:
    """The supervisor kills a worker with no sign of life: the job it ran
    counts an attempt (WorkerLost) and its try stays in the history,
    whichever of the supervisor and the broker noticed first."""
    import os
    import signal

    env.write_config(processes=1, concurrency=1, prefetch=0)
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(1)
    client = env.client()
    gate = env.home / "gate"
    job_id = client.enqueue("e2e.gate", str(gate), max_attempts=2)
    (first,) = wait_until(
        lambda: client.job(job_id).tries, lambda t: len(t) == 1, message="the job to start"
    )
    os.kill(first.pid, signal.SIGSTOP)  # frozen: no heartbeat, no status line
    info = wait_until(
        lambda: client.job(job_id),
        lambda i: bool(i.tries) and i.tries[0].ended_at is not None,
        30,
        message="the frozen try to end",
    )
    assert info.tries[0].error is not None and info.tries[0].error.type == "WorkerLost"
    # the frozen try counted once; the restarted worker may have begun the
    # retry already (the gate holds it), which counts the second
    assert info.attempts == len(info.tries) <= 2, info
    gate.touch()
    assert client.result(job_id, timeout=30)["attempt"] == 2
    info = client.job(job_id)
    assert (info.status, info.attempts, [t.attempt for t in info.tries]) == ("succeeded", 2, [1, 2])
