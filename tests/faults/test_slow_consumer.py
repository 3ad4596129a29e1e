"""Slow consumers and high-water marks: no dispatch is dropped silently,
and a stalled worker's jobs go to another.

A ROUTER drops what it cannot send unless ROUTER_MANDATORY is set; the
broker sets it, so a send to a peer whose queue is full (EAGAIN) or that
is gone (EHOSTUNREACH) is reported as not sent, and a job whose delivery
was not sent is not leased (tests/test_core.py shows that with a link that
refuses). Here: a real ROUTER made as the broker makes it, filled by a
peer that never reads, and a real worker stopped with SIGSTOP under
``corral run``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from conftest import Env, wait_for, worker_processes

from corral.broker.server import RouterLink
from corral.transport import bind_router

MIB = 1024 * 1024


@pytest.fixture
def context() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def test_a_full_or_gone_peer_is_reported_never_dropped(
    tmp_path: Path, context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    endpoint = f"ipc://{tmp_path}/w.sock"
    router = bind_router(context, endpoint, None, 16 * MIB)
    stats: Counter[str] = Counter()
    link = RouterLink(router, stats, "worker_sends")
    slow = context.socket(zmq.DEALER)
    slow.setsockopt(zmq.ROUTING_ID, b"slow")
    slow.setsockopt(zmq.RCVHWM, 1)
    slow.setsockopt(zmq.RCVBUF, 4096)
    slow.connect(endpoint)
    slow.send(b"hello")
    assert router.poll(10_000)
    assert router.recv_multipart() == [b"slow", b"hello"]
    # The slow peer never reads: sends succeed until its queue is full.
    sent = 0
    for _ in range(2_000_000):
        if not link.send(b"slow", sent.to_bytes(8, "big")):
            break
        sent += 1
    assert stats["worker_sends_blocked"] == 1, "the ROUTER never reported the full peer"
    assert sent >= 1000
    # Everything that was reported sent arrives, in order, none lost.
    got = 0
    while slow.poll(2000):
        assert slow.recv() == got.to_bytes(8, "big")
        got += 1
        if got == sent:
            break
    assert got == sent
    # A gone peer: reported unroutable, never an exception.
    slow.close(linger=0)
    wait_for(lambda: not link.send(b"slow", b"x"), 10, message="the peer to be gone")
    assert stats["worker_sends_unroutable"] >= 1
    assert not link.send(b"never-connected", b"x")
    router.close(linger=0)


def ran_again(info: Any, victim: int) -> bool:
    """The job's first try was on ``victim`` and it runs, or ran, again."""
    return (
        info.status in ("running", "succeeded")
        and len(info.tries) >= 2
        and info.tries[0].pid == victim
    )


def test_a_stalled_worker_s_jobs_are_redelivered(
    env: Env, soak_report: Callable[[str], None]
) -> None:
    """SIGSTOP a worker while it runs a job and holds another in its buffer:
    once its liveness window passes (its supervisor sees it make no
    progress, so it does not vouch for it) both go to the other worker, and
    every job completes."""
    env.write_config(processes=2, prefetch=1)
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(2)
    client = env.client()
    ids = [client.enqueue("e2e.sleep", 0.3) for _ in range(12)]
    running = wait_for(
        lambda: next((i for i in map(client.job, ids) if i.status == "running"), None),
        message="a job to start",
    )
    victim = running.tries[-1].pid
    assert victim in {p.pid for p in worker_processes(daemon)}
    os.kill(victim, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        # The job seen running may have ended just before the stop (a 0.3 s
        # job, and a loaded machine between the look and the SIGSTOP): the
        # one to follow is the job the stopped worker was charged for.
        moved = wait_for(
            lambda: next((i for i in map(client.job, ids) if ran_again(i, victim)), None),
            60,
            message="the stalled worker's job to run elsewhere",
        )
        redelivery = time.monotonic() - stopped_at
        results = [client.result(j, timeout=60) for j in ids]
    finally:
        with contextlib.suppress(ProcessLookupError):  # its supervisor may have ended it
            os.kill(victim, signal.SIGCONT)
    assert len(results) == len(ids)
    assert moved.tries[0].pid == victim and moved.tries[-1].pid != victim
    assert moved.tries[0].error is not None and moved.tries[0].error.type == "WorkerLost"
    assert all(client.job(j).status == "succeeded" for j in ids)
    assert client.status().stats["workers_lost"] >= 1
    soak_report(f"stalled worker: its running job ran elsewhere {redelivery:.2f} s after SIGSTOP")
