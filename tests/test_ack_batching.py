"""Ack batching: a worker sends the starts and outcomes of several jobs in
one report (``corral.workers.reports.Pacing``), none held past its bound,
and a worker killed with outcomes unsent has those jobs run again as the
delivery rules say (nothing lost, nothing charged beyond a lost worker's
due)."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

from conftest import Env, wait_for

from corral.workers.reports import Pacing


class Wakes:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def pacing(delay: float = 0.002, batch: int = 4) -> tuple[Pacing, Wakes, deque[tuple[str, Any]]]:
    wakes, outbox = Wakes(), deque[tuple[str, Any]]()
    return Pacing(wakes, outbox, delay=delay, batch=batch), wakes, outbox


def test_an_item_wakes_a_socket_thread_that_would_sleep_past_its_deadline() -> None:
    pace, wakes, outbox = pacing()
    pace.deciding()
    pace.sleeping(100.0)  # a long wait: nothing due
    outbox.append(("started", "a"))
    pace.soon(10.0)
    assert wakes.count == 1 and pace.due == 10.002
    # the socket thread works out its wait again: the deadline bounds it
    pace.deciding()
    pace.sleeping(pace.due)
    assert not pace.flush_due(10.001)
    outbox.append(("done", "a"))
    pace.soon(10.001)  # joins the first: its deadline stands, no wake
    assert wakes.count == 1 and pace.due == 10.002
    assert pace.flush_due(10.002)


def test_a_handler_wakes_a_deciding_socket_thread() -> None:
    """Between deciding and sleeping the socket thread may not have seen the
    deadline: a handler wakes it (a wake too many, never one too few)."""
    pace, wakes, outbox = pacing()
    pace.taken(5.0, flowing=True)  # due at 5.002
    pace.deciding()
    outbox.append(("started", "a"))
    pace.soon(5.0)
    assert wakes.count == 1


def test_jobs_handed_over_bound_the_wait_so_their_starts_wake_no_one() -> None:
    """The socket thread hands jobs to an idle handler: it expects their
    starts within the delay and sleeps no longer, so the handler's start
    wakes nothing and a quick job's outcome wakes it once (it was woken
    for both: a cross-thread wake and a GIL hand-off more per job)."""
    pace, wakes, outbox = pacing()
    pace.expect(7.0)  # a Deliver was read at 7.0, nothing was due
    assert pace.due == 7.002
    pace.deciding()
    pace.sleeping(min(100.0, pace.due))
    outbox.append(("started", "a"))
    pace.soon(7.0005)
    assert wakes.count == 0 and pace.due == 7.002
    outbox.append(("done", "a"))
    pace.urgent()  # nothing else to run: the outcome goes at once
    assert wakes.count == 1 and pace.flush_due(7.001)
    # a due time already set (jobs flowing) is not pushed back
    pace.taken(7.001, flowing=True)
    pace.expect(7.0015)
    assert pace.due == 7.003


def test_a_full_batch_and_an_urgent_item_go_at_once() -> None:
    pace, wakes, outbox = pacing(batch=4)
    pace.taken(0.0, flowing=True)
    pace.sleeping(pace.due or 0.0)
    for n in range(3):
        outbox.append(("done", n))
        pace.soon(0.0)
    assert wakes.count == 0 and not pace.flush_due(0.001)
    outbox.append(("done", 3))
    pace.soon(0.0)
    assert wakes.count == 1 and pace.flush_due(0.001)
    outbox.clear()
    pace.taken(0.001, flowing=False)
    assert pace.due is None and not pace.flush_due(50.0)
    outbox.append(("return", "x"))
    pace.urgent()
    assert wakes.count == 2 and pace.flush_due(0.001)
    pace.taken(0.001, flowing=False)
    assert not pace.flush_due(0.001)


#: A ``corral worker`` whose reports wait an hour (and never fill a batch):
#: every start and outcome it puts out stays unsent until it is killed.
HOLDING_WORKER = """
import sys
from corral.workers import reports
reports.Pacing.__init__.__defaults__ = (3600.0, 10**6)
from corral.cli import main
sys.exit(main(["worker", "-c", sys.argv[1]]))
"""


def runs(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [line.split()[0] for line in path.read_text().splitlines()]


def test_a_worker_killed_with_its_outcomes_unsent_has_those_jobs_run_again(env: Env) -> None:
    """Three quick jobs end and a fourth runs, their starts and outcomes all
    held back; SIGKILL: the broker, hearing nothing, takes them back when
    the worker goes silent, as for any lost worker: the oldest held job is
    charged a try (it may have been running), the others go back
    uncounted; another worker runs them all again, and every job succeeds."""
    env.write_config(processes=1, concurrency=1, prefetch=8, heartbeat="200ms", liveness=3)
    env.wait_ready(env.start("broker"))
    client = env.client()
    marks, gate = env.home / "marks", env.home / "gate"
    quick = [client.enqueue("e2e.mark", str(marks), max_attempts=3) for _ in range(3)]
    last = client.enqueue("e2e.gate", str(gate), max_attempts=3)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDING_WORKER, str(env.config)],
        cwd=env.home,
        stdout=(env.home / "holder.log").open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for(lambda: len(runs(marks)) == 3, 30, message="the quick jobs to run once")
        for job_id in [*quick, last]:  # the broker heard of no start or outcome
            info = client.job(job_id)
            assert (info.status, info.attempts) == ("queued", 0), info
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
    gate.touch()
    env.start("worker")  # an ordinary worker takes them over
    for job_id in quick:
        assert client.result(job_id, timeout=30) == job_id
    assert client.result(last, timeout=30)["attempt"] == 1  # its first run went uncounted
    assert sorted(runs(marks)) == sorted(quick * 2)  # each ran again, none lost
    charged = [j for j in [*quick, last] if client.job(j).attempts == 2]
    assert charged == quick[:1], "only the oldest held job may have been running"
