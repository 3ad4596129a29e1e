"""End to end: real `corral` processes, sockets, files and signals."""

from __future__ import annotations

import contextlib
import json
import os
import signal

import psutil
from conftest import (
    Env,
    broker_processes,
    kill_broker,
    log_events,
    wait_for,
    worker_processes,
)

import corral


def test_a_thousand_jobs_through_corral_run(env: Env) -> None:
    daemon = env.start("run")
    env.wait_ready(daemon)
    client = env.client()
    ids = client.enqueue_many([corral.Job("e2e.square", n) for n in range(1000)])
    assert len(set(ids)) == 1000
    for n, job_id in enumerate(ids):
        assert client.result(job_id, timeout=60) == n * n
    status = client.status()
    assert status.queues["default"]["succeeded"] == 1000
    assert len(status.workers) == 2
    # each ran once (a worker's own count restarts when it registers again,
    # as it may on a loaded machine, so the jobs' tries are what tell)
    runs = [len(client.job(job_id).tries) for job_id in ids]
    assert runs == [1] * 1000


def test_killed_worker_job_completes_elsewhere_with_two_attempts(env: Env) -> None:
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(2)
    client = env.client()
    gate = env.home / "gate"
    job_id = client.enqueue("e2e.gate", str(gate))  # runs until the gate file exists
    info = wait_for(
        lambda: (i := client.job(job_id)).status == "running" and i, message="the job to start"
    )
    victim = info.tries[-1].pid
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(client.job(job_id).tries) == 2, message="the job to run again")
    gate.touch()
    value = client.result(job_id, timeout=30)
    assert value["attempt"] == 2
    assert value["pid"] != victim
    info = client.job(job_id)
    assert info.status == "succeeded"
    assert info.attempts == 2
    assert info.tries[0].error is not None and info.tries[0].error.type == "WorkerLost"
    assert info.tries[0].pid == victim


def test_broker_sigkill_loses_no_acknowledged_job(env: Env) -> None:
    broker = env.start("broker")
    env.wait_ready(broker)
    client = env.client()
    ids = client.enqueue_many([corral.Job("e2e.square", n) for n in range(500)])
    ids += [client.enqueue("e2e.square", n) for n in range(500, 600)]
    broker.signal(signal.SIGKILL)
    broker.wait(10)
    broker = env.start("broker", name="broker-again")
    env.wait_ready(broker)
    assert env.client().status().queues["default"]["queued"] == 600
    env.start("supervisor")
    client = env.client()
    for n, job_id in enumerate(ids):
        assert client.result(job_id, timeout=60) == n * n


def test_a_running_job_stays_with_its_worker_across_a_broker_restart(env: Env) -> None:
    env.write_config(processes=1)
    daemon = env.start("run")
    env.wait_ready(daemon)
    client = env.client()
    gate = env.home / "gate"
    job_id = client.enqueue("e2e.gate", str(gate))  # runs until the gate file exists
    wait_for(lambda: client.job(job_id).status == "running", message="the job to start")
    assert client.job(job_id).attempts == 1
    # The supervisor restarts the broker; it finds the job held in its log and
    # keeps it for its worker, which registers again offering it back: it
    # stays running there, under its lease, and is handed to no one else.
    kill_broker(env, daemon)
    client = env.client(timeout=1)
    wait_for(
        lambda: '"broker.jobs_offered_back"' in daemon.output(),
        60,
        message="the worker to offer its job back",
    )
    info = client.job(job_id)
    assert (info.status, info.attempts, info.reserved_by, len(info.tries)) == (
        "running",
        1,
        None,
        1,
    )
    gate.touch()
    value = client.result(job_id, timeout=60)
    assert value["attempt"] == 1
    info = client.job(job_id)
    assert info.status == "succeeded"
    assert info.attempts == 1
    assert [(t.attempt, t.error) for t in info.tries] == [(1, None)]
    replays = [
        json.loads(line)["held_for_reclaim"]
        for line in daemon.output().splitlines()
        if '"broker.replayed"' in line
    ]
    assert replays == [0, 1]  # the job was running when the broker died


def test_cpu_bound_handler_keeps_heartbeating(env: Env) -> None:
    # liveness window: 200ms * 3 = 0.6s; the handler spins for 3 windows.
    env.write_config(processes=1)
    daemon = env.start("run")
    env.wait_ready(daemon)
    client = env.client()
    job_id = client.enqueue("e2e.spin", 1.8)
    assert client.result(job_id, timeout=30) == 1
    info = client.job(job_id)
    assert info.attempts == 1
    assert len(info.tries) == 1
    stats = client.status().stats
    assert stats.get("workers_lost", 0) == 0
    assert stats.get("late_results", 0) == 0


def test_typed_payload_validation_fails_without_retry(env: Env) -> None:
    daemon = env.start("run")
    env.wait_ready(daemon)
    client = env.client()
    good = client.enqueue("e2e.order", {"item": "tea", "qty": 2})
    bad = client.enqueue("e2e.order", {"item": "tea", "qty": "two"})
    assert client.result(good, timeout=30) == "2xtea"
    try:
        client.result(bad, timeout=30)
    except corral.JobFailed as exc:
        assert exc.error.type == "ValidationError"
        assert "payload.qty" in exc.error.message
    else:
        raise AssertionError("the invalid payload did not fail the job")
    assert client.job(bad).attempts == 1


def test_retries_then_success_records_every_try(env: Env) -> None:
    daemon = env.start("run")
    env.wait_ready(daemon)
    client = env.client()
    job_id = client.enqueue("e2e.flaky", 3)
    assert client.result(job_id, timeout=30) == 3
    info = client.job(job_id)
    assert [t.attempt for t in info.tries] == [1, 2, 3]
    assert [t.error.type if t.error else None for t in info.tries] == [
        "ValueError",
        "ValueError",
        None,
    ]
    failing = client.enqueue("e2e.flaky", 10)
    try:
        client.result(failing, timeout=30)
    except corral.JobFailed:
        pass
    else:
        raise AssertionError("the job should fail after max_attempts")
    assert client.job(failing).attempts == 3


def test_a_job_no_worker_takes_waits_uncounted_and_shows_as_unroutable(env: Env) -> None:
    """Routing by task: a job goes only to a worker that registered its
    task and listens to its queue. One that no worker takes waits, not
    counted, and status names it, until a worker that takes it comes."""
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(2)
    client = env.client()
    unknown = client.enqueue("no.such.task", max_attempts=1)
    later = client.enqueue("e2e.square", 6, queue="later")
    assert client.result(client.enqueue("e2e.square", 2), timeout=30) == 4  # the rest flows
    for job_id in (unknown, later):
        info = client.job(job_id)
        assert (info.status, info.attempts, info.tries, info.reserved_by) == ("queued", 0, [], None)
    routes = {(u.queue, u.task): u.count for u in client.status().unroutable}
    assert routes == {("default", "no.such.task"): 1, ("later", "e2e.square"): 1}
    shown = env.run("status", "-c", str(env.config)).stdout
    assert "unroutable: 1 job(s) of task 'no.such.task' on queue 'default'" in shown
    assert "no connected worker registered the task" in shown
    assert "no connected worker listens to queue 'later'" in shown
    env.start("worker", "--queue", "later", "--plugin", "e2e_tasks")
    assert client.result(later, timeout=30) == 36
    assert [(u.queue, u.task) for u in client.status().unroutable] == [("default", "no.such.task")]
    assert client.job(unknown).status == "queued"


def test_supervisor_restarts_a_worker_that_exits(env: Env) -> None:
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(2)
    before = {p.pid for p in worker_processes(daemon)}
    assert len(before) == 2
    victim = before.pop()
    os.kill(victim, signal.SIGKILL)

    def replaced() -> bool:
        now = {p.pid for p in worker_processes(daemon)}
        return len(now) == 2 and victim not in now

    wait_for(replaced, 20, message="a replacement worker")
    client = env.client()
    assert client.result(client.enqueue("e2e.square", 7), timeout=30) == 49


def test_sigterm_drains_and_exits_zero(env: Env) -> None:
    env.write_config(processes=2, concurrency=3, prefetch=0)
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(2)
    client = env.client()
    gate = env.home / "gate"
    ids = [client.enqueue("e2e.gate", str(gate)) for _ in range(5)]
    wait_for(lambda: client.status().queues["default"]["running"] == 5, message="5 running jobs")
    daemon.signal(signal.SIGTERM)
    # The jobs end only once the shutdown has begun: it waits for them.
    wait_for(lambda: "supervisor.stopping" in daemon.output(), message="the shutdown to begin")
    assert daemon.alive()
    gate.touch()
    assert daemon.wait(60) == 0
    broker = env.start("broker")
    env.wait_ready(broker)
    client = env.client()
    for job_id in ids:
        assert client.job(job_id).status == "succeeded"


def test_sigterm_hands_unstarted_jobs_back_uncounted(env: Env) -> None:
    env.write_config(processes=1, concurrency=1, prefetch=2)
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(1)
    client = env.client()
    gate = env.home / "gate"
    ids = [client.enqueue("e2e.gate", str(gate)) for _ in range(3)]
    wait_for(lambda: client.job(ids[0]).status == "running", message="the first job")
    # the two others wait in the worker's prefetch buffer: queued, reserved
    wait_for(
        lambda: [j.reserved_by is not None for j in map(client.job, ids[1:])] == [True, True],
        message="2 reserved jobs",
    )
    (worker,) = client.status().workers
    assert (worker.running, sorted(worker.reserved)) == ([ids[0]], sorted(ids[1:]))
    assert client.status().queues["default"]["running"] == 1
    daemon.signal(signal.SIGTERM)
    # Once the worker's drain has begun the first job may end; a buffered
    # job started by mistake would end at once too, and show as succeeded.
    # (The supervisor logs "stopping" before it signals the worker: wait for
    # the worker to hand its buffered jobs back.)
    wait_for(
        lambda: [client.job(j).reserved_by for j in ids[1:]] == [None, None],
        message="the buffered jobs handed back",
    )
    gate.touch()
    assert daemon.wait(60) == 0
    broker = env.start("broker")
    env.wait_ready(broker)
    client = env.client()
    assert client.job(ids[0]).status == "succeeded"
    for job_id in ids[1:]:
        info = client.job(job_id)
        assert info.status == "queued"
        assert info.attempts == 0
        assert info.tries == []


def test_instant_redelivery_well_inside_the_heartbeat_window(env: Env) -> None:
    # heartbeat window: 2 s x 3 = 6 s; the supervisor's word makes it ~instant.
    env.write_config(processes=2, heartbeat="2s", liveness=3, prefetch=0)
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(2)
    client = env.client()
    gate = env.home / "gate"
    job_id = client.enqueue("e2e.gate", str(gate))  # runs until the gate file exists
    info = wait_for(
        lambda: (i := client.job(job_id)).status == "running" and i, message="the job to start"
    )
    victim = info.tries[-1].pid
    before = {p.pid for p in worker_processes(daemon)}
    os.kill(victim, signal.SIGKILL)
    wait_for(
        lambda: len(t := client.job(job_id).tries) == 2 and t[1].ended_at is None,
        1.0,
        message="the job to run again within 1 s",
    )
    wait_for(
        lambda: len({p.pid for p in worker_processes(daemon)} - before) == 1,
        1.0,
        message="a replacement worker within 1 s",
    )
    info = client.job(job_id)
    assert info.tries[0].error.type == "WorkerLost"
    assert "SIGKILL" in info.tries[0].error.message
    gate.touch()
    assert client.result(job_id, timeout=30)["attempt"] == 2


def test_a_broker_that_keeps_failing_is_restarted_with_backoff_without_stalling(
    env: Env,
) -> None:
    """The broker cannot start again (another process holds its state
    directory's lock): the supervisor retries with growing delays, and its
    loop goes on meanwhile (a killed worker is replaced). Once the lock is
    free the broker comes back and serves."""
    import fcntl

    env.write_config(processes=2)
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(2)
    lock = os.open(env.home / "state" / "broker.lock", os.O_RDWR)
    try:

        def broker_killed_and_lock_taken() -> bool:
            for p in broker_processes(daemon):
                with contextlib.suppress(psutil.Error):
                    p.kill()
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # the old one is not dead yet, or a new one took it
                return False
            return True

        wait_for(broker_killed_and_lock_taken, 30, message="the lock")
        wait_for(
            lambda: daemon.output().count("supervisor.broker_restart") >= 3,
            60,
            message="three restarts",
        )
        restarts = [
            e for e in log_events(daemon.output()) if e.get("event") == "supervisor.broker_restart"
        ]
        assert any(e.get("after") == 1.0 for e in restarts), restarts
        victim = worker_processes(daemon)[0]
        victim.kill()
        wait_for(
            lambda: (
                len(worker_processes(daemon)) == 2
                and victim.pid not in {p.pid for p in worker_processes(daemon)}
            ),
            30,
            message="the worker replaced while the broker is down",
        )
        assert daemon.alive()
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        os.close(lock)
    client = env.client()
    assert client.result(client.enqueue("e2e.square", 8), timeout=60) == 64


def test_stray_signals_never_take_the_service_down(env: Env) -> None:
    """USR1 (a log rotation's), USR2, ALRM and a real-time signal to the
    supervisor are logged and ignored; a worker ended by a real-time signal
    (which Python has no name for) is told to the broker and replaced."""
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(2)
    before = {p.pid for p in worker_processes(daemon)}
    for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM, signal.SIGRTMIN + 3):
        daemon.signal(sig)
    wait_for(lambda: daemon.output().count("supervisor.signal_ignored") >= 4, 20, message="the log")
    assert daemon.alive() and {p.pid for p in worker_processes(daemon)} == before
    victim = min(before)
    os.kill(victim, signal.SIGRTMIN + 3)
    wait_for(
        lambda: (
            victim not in {p.pid for p in worker_processes(daemon)}
            and len(worker_processes(daemon)) == 2
        ),
        20,
        message="the worker replaced",
    )
    assert f"killed by signal {int(signal.SIGRTMIN) + 3}" in daemon.output()
    assert "supervisor.tick_failed" not in daemon.output()
    client = env.client()
    assert client.result(client.enqueue("e2e.square", 9), timeout=30) == 81


def test_what_a_handler_hands_the_worker_never_wedges_its_reports(env: Env) -> None:
    """A progress note with a lone surrogate made every report of the worker
    fail to encode (worker.socket_error: the job and its worker stuck); a
    Retry(delay=nan) had the broker refuse the whole report (the job stuck),
    and one of 1e300 seconds was kept and broke `corral job`."""
    daemon = env.start("run")
    env.wait_ready(daemon)
    client = env.client()
    assert client.result(client.enqueue("e2e.odd_progress", "note"), timeout=30) == "done"
    for delay in ("nan", "inf", "1e300"):
        job_id = client.enqueue("e2e.retry_in", delay)
        with contextlib.suppress(corral.JobFailed):
            client.result(job_id, timeout=30)
        info = client.job(job_id)
        assert info.status == "failed" and info.error and "delay" in info.error.message, info
        shown = env.run("job", job_id, "-c", str(env.config))
        assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
    assert client.result(client.enqueue("e2e.square", 3), timeout=30) == 9
