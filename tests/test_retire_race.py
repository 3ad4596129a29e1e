"""A worker that retires (max_jobs_per_process) right as the broker dies:
its last outcome is sent, the worker says Bye and exits, and the broker is
SIGKILLed before it reads them. The worker's recent reports
(workers/reports.py SentReports) would be resent to the next broker, but
the process that kept them is gone: the restarted broker holds the job
for the reclaim window, then hands it out again uncounted, and it runs a
second time with no try of the first run recorded (found by break-testing
issue 12: broker SIGKILL loops with max_jobs_per_process set ran a job
twice at attempt 1 in 3 of 5 configurations)."""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

from conftest import Env, Proc, broker_processes, log_events, wait_for

import corral
from corral.client import Client


def _running_gated_job(env: Env, client: Client) -> tuple[str, Path]:
    """An ``e2e.gate`` job, once running: it ends when the test writes the
    returned gate file."""
    gate = env.home / "gate"
    job_id = client.enqueue("e2e.gate", str(gate))
    wait_for(lambda: client.job(job_id).status == "running", timeout=30, message="the job to run")
    return job_id, gate


def _events(proc: Proc) -> list[object]:
    """The event names of ``proc``'s JSON log lines, in order."""
    return [e.get("event") for e in log_events(proc.output())]


def _shutdown_timeout(env: Env, value: str) -> None:
    """The written config's pool ``shutdown_timeout`` set to ``value``."""
    text = env.config.read_text()
    assert 'shutdown_timeout = "10s"' in text
    env.config.write_text(text.replace('shutdown_timeout = "10s"', f'shutdown_timeout = "{value}"'))


def test_a_retiring_worker_whose_last_outcome_dies_with_the_broker_runs_it_once(
    env: Env,
) -> None:
    """The worker waits for the broker's Farewell (its answer to Bye, sent
    once the last outcome is in its log): the broker is stopped and then
    killed before it read the outcome, so none comes; the worker connects
    to the next broker, sends its recent reports again and says Bye again,
    and only then exits. The job ran once, its one try recorded."""
    env.write_config(processes=1, prefetch=0, extra_pool="max_jobs_per_process = 1")
    broker = env.start("broker")
    env.wait_ready(broker)
    supervisor = env.start("supervisor")
    env.wait_workers(1)
    client = env.client(timeout=30)
    job_id, gate = _running_gated_job(env, client)
    (worker,) = [p for p in supervisor.descendants() if "worker" in " ".join(p.cmdline())]
    first = worker.pid
    os.kill(broker.pid, signal.SIGSTOP)  # reads nothing more: the outcome waits in its socket
    gate.write_text("go")

    def said_bye() -> bool:
        return any(
            e.get("event") == "job.succeeded" and e.get("pid") == first
            for e in log_events(supervisor.output())
        )

    wait_for(said_bye, timeout=30, message="the job to end on the retiring worker")
    assert worker.is_running()  # waiting for a Farewell the stopped broker cannot send
    os.kill(broker.pid, signal.SIGKILL)
    broker.wait(10)
    env.wait_ready(env.start("broker"))
    ran = client.result(job_id, timeout=60)
    assert ran == {"pid": first, "attempt": 1}, client.job(job_id).tries
    tries = client.job(job_id).tries
    assert len(tries) == 1 and tries[0].pid == first, tries

    def retired() -> list[dict[str, object]]:
        events = log_events(supervisor.output())
        return [e for e in events if e.get("event") == "supervisor.worker_retired"]

    wait_for(retired, timeout=30, message="the retired worker to exit")
    assert [(e["pid"], e["how"]) for e in retired()] == [(first, "exited with code 0")]


def test_a_worker_leaving_a_live_broker_has_its_farewell_at_once(env: Env) -> None:
    """With the broker up, the Farewell comes in the pass that read the
    Bye: a recycled worker exits at once and says nothing of a missing one."""
    env.write_config(processes=1, prefetch=0, extra_pool="max_jobs_per_process = 2")
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(1)
    client = env.client(timeout=30)
    for n in range(6):  # three workers in turn, each recycled after two jobs
        assert client.result(client.enqueue("e2e.square", n), timeout=30) == n * n
    events = log_events(daemon.output())
    retired = [e for e in events if e.get("event") == "supervisor.worker_retired"]
    assert len(retired) >= 2, retired
    assert {e["how"] for e in retired} == {"exited with code 0"}
    assert not [e for e in events if e.get("event") == "worker.no_farewell"]


def test_a_worker_waiting_for_its_farewell_past_shutdown_timeout_abandons_nothing(
    env: Env,
) -> None:
    """The worker's last outcome goes to a stopped broker; stopped, the
    worker is drained at once and waits for the Farewell past
    shutdown_timeout. That is no drain running out of time: no
    worker.shutdown_timeout (it once said so, naming no job), and the
    worker leaves on the Farewell of the broker once it runs again."""
    env.write_config(processes=1, prefetch=0)
    _shutdown_timeout(env, "0.3s")
    broker = env.start("broker")
    env.wait_ready(broker)
    worker = env.start("worker")
    env.wait_workers(1)
    client = env.client(timeout=30)
    job_id, gate = _running_gated_job(env, client)
    os.kill(broker.pid, signal.SIGSTOP)  # the outcome waits, kept by the worker
    gate.write_text("go")

    wait_for(lambda: "job.succeeded" in _events(worker), timeout=30, message="the job to end")
    worker.signal(signal.SIGTERM)
    wait_for(
        lambda: "worker.broker_silent" in _events(worker), timeout=30, message="a wait past 0.3 s"
    )
    os.kill(broker.pid, signal.SIGCONT)
    assert worker.wait(30) == 0
    events = _events(worker)
    assert "worker.stopped" in events
    assert "worker.shutdown_timeout" not in events
    assert "worker.no_farewell" not in events
    assert client.job(job_id).status == "succeeded"


def test_a_worker_with_nothing_unconfirmed_leaves_a_gone_broker_at_once(env: Env) -> None:
    """A Farewell confirms the reports the worker sent lately; with none
    kept (idle since the broker last heard it, or it never ran a job) there
    is nothing for it to confirm: a worker stopped while its broker is gone
    leaves without waiting the bound for it (it once waited 10 s and said
    worker.no_farewell, and so did a supervisor's stop with its broker
    down)."""
    env.write_config(processes=1, prefetch=0)
    broker = env.start("broker")
    env.wait_ready(broker)
    worker = env.start("worker")
    env.wait_workers(1)
    broker.kill()
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    events = _events(worker)
    assert "worker.stopped" in events
    assert "worker.no_farewell" not in events


def test_a_stopping_supervisor_lets_its_workers_wait_for_their_farewell(env: Env) -> None:
    """A supervisor stopping gives its workers shutdown_timeout and then
    the Farewell's bound before it kills them: a worker whose last outcome
    went to a broker that is gone waits the bound (10 s here) and leaves on
    its own, saying worker.no_farewell (it was SIGKILLed at shutdown_timeout
    + 5 s, the Farewell's wait not counted)."""
    env.write_config(processes=1, prefetch=0)
    _shutdown_timeout(env, "0.5s")
    broker = env.start("broker")
    env.wait_ready(broker)
    supervisor = env.start("supervisor")
    env.wait_workers(1)
    client = env.client(timeout=30)
    _, gate = _running_gated_job(env, client)
    os.kill(broker.pid, signal.SIGSTOP)  # the outcome is never read: the worker keeps it
    gate.write_text("go")

    wait_for(lambda: "job.succeeded" in _events(supervisor), timeout=30, message="the job to end")
    os.kill(broker.pid, signal.SIGKILL)
    supervisor.signal(signal.SIGTERM)
    assert supervisor.wait(60) == 0
    events = _events(supervisor)
    assert "supervisor.kill" not in events
    assert "worker.no_farewell" in events and "worker.stopped" in events


def test_corral_run_stopping_restarts_a_broker_killed_as_its_workers_leave(env: Env) -> None:
    """``corral run`` stops; its broker is killed before it read a leaving
    worker's last outcome. The supervisor starts the broker again while
    its workers leave: the worker sends its recent reports to it and has
    its Farewell, and the job's one run is recorded (it waited its bound
    for a broker that never came, and the job ran again, uncounted)."""
    env.write_config(processes=1, prefetch=0)
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(1)
    client = env.client(timeout=30)
    job_id, gate = _running_gated_job(env, client)
    (broker,) = broker_processes(daemon)
    broker.suspend()  # reads nothing more: the outcome waits in its socket
    daemon.signal(signal.SIGTERM)
    gate.write_text("go")

    wait_for(lambda: "job.succeeded" in _events(daemon), timeout=30, message="the job to end")
    broker.kill()
    assert daemon.wait(60) == 0
    events = _events(daemon)
    assert "worker.no_farewell" not in events and "supervisor.kill" not in events
    again = env.start("broker")
    env.wait_ready(again)
    tries = client.job(job_id).tries
    assert client.job(job_id).status == "succeeded" and len(tries) == 1, tries


def test_jobs_taken_as_a_recycle_begins_end_before_the_bye(env: Env) -> None:
    """A handler that took a job from the buffer just before the recycle's
    drain began holds it, neither buffered nor running yet: the worker is
    not drained until it ends, so its outcome goes before the Bye (the Bye
    went first, the broker requeued the job as one the leaving worker had
    not started, and it ran twice at attempt 1: 3 of 1500 quick jobs with
    max_jobs_per_process = 3 and four async handlers). Probabilistic: it catches
    the race in some runs, not every one."""
    env.write_config(processes=2, prefetch=0, concurrency=4, extra_pool="max_jobs_per_process = 3")
    daemon = env.start("run")
    env.wait_ready(daemon)
    client = env.client(timeout=30)
    mark = env.home / "marks"
    ids = client.enqueue_many([corral.Job("e2e.amark", str(mark))] * 1000)
    wait_for(
        lambda: client.status().queues["default"]["succeeded"] == len(ids),
        timeout=120,
        message="every job to end",
    )
    runs = Counter(line.split()[0] for line in mark.read_text().splitlines())
    assert set(runs) == set(ids)
    assert [job for job, n in runs.items() if n > 1] == []
