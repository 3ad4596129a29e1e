"""Group commit with fsync = "always": requests that wait together are
written together and covered by one fdatasync, and none is acknowledged
before it. Counted (the broker's ``log_fsyncs``), never timed."""

from __future__ import annotations

import asyncio
import math
import os
import signal
from pathlib import Path

import pytest
from conftest import Env, wait_for
from inproc import FakeWorker, InProcessBroker

import corral
from corral.asyncclient import JOIN_MAX
from corral.broker import protocol as p
from corral.broker.core import CLIENT

N = 300


def test_one_pass_of_many_clients_is_one_fsync_and_every_reply_follows_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """N enqueues from many clients read in one pass: one fdatasync covers
    all of them, and every reply leaves after it."""
    broker = InProcessBroker(tmp_path, fsync="always")
    events = broker.events
    real = os.fdatasync

    def recording_fdatasync(fd: int) -> None:
        real(fd)
        events.append(("fsync", None))

    monkeypatch.setattr(os, "fdatasync", recording_fdatasync)
    inbound = [
        (
            CLIENT,
            [
                f"client-{i % 37}".encode(),
                p.encode(p.Enqueue(i + 1, [p.JobSpec(f"job-{i}", "t.task", p.encode_value(i))])),
            ],
        )
        for i in range(N)
    ]
    events.clear()
    broker.core.run_pass(inbound)
    kinds = [kind for kind, _ in events]
    assert kinds.count("fsync") == 1, kinds
    assert kinds.count("send-client") == N
    assert kinds.index("fsync") < kinds.index("send-client")
    replies = [p.decode(p.client_reply_decoder, body) for _, body in broker.clients.sent]
    assert all(isinstance(reply, p.EnqueueOk) for reply in replies), replies[:3]


def _fsyncs(client: corral.Client) -> int:
    return int(client.status().stats["log_fsyncs"])


def test_requests_waiting_when_the_broker_runs_again_share_an_fsync(env: Env) -> None:
    """A real broker, stopped (SIGSTOP) while an AsyncClient puts N enqueues
    in flight, then let go: what waits on its socket when its loop wakes is
    read and synced in a few passes, not one fdatasync per job; and every
    job is there. (The first goes alone, the others join in EnqueueEach
    requests of JOIN_MAX jobs: tests/test_enqueue_each.py.)"""
    env.write_config(fsync="always")
    broker = env.start("broker")
    env.wait_ready(broker)
    client = env.client(timeout=30)
    before = _fsyncs(client)

    async def burst() -> list[str]:
        async with corral.AsyncClient(env.endpoint, timeout=60) as aclient:
            await aclient.ping()  # connected before the broker stops
            broker.signal(signal.SIGSTOP)
            try:
                calls = asyncio.gather(*(aclient.enqueue("e2e.noop", i) for i in range(N)))

                requests = 1 + math.ceil((N - 1) / JOIN_MAX)

                async def all_sent() -> None:
                    while len(aclient._pending) < requests:
                        await asyncio.sleep(0.005)

                await asyncio.wait_for(all_sent(), 30)
            finally:
                broker.signal(signal.SIGCONT)
            return await calls

    ids = asyncio.run(burst())
    assert len(set(ids)) == N
    fsyncs = _fsyncs(client) - before  # (a ping or a status writes nothing: no fsync)
    # one pass reads what waits (a pass is bounded to 50 ms of reading, so a
    # slow machine may split it): a handful of fsyncs, far fewer than N
    assert fsyncs <= N // 20, f"{fsyncs} fdatasyncs for {N} enqueues"
    wait_for(
        lambda: client.status().queues.get("default", {}).get("queued", 0) == N,
        30,
        message=f"{N} jobs queued",
    )


def test_a_pass_answering_only_pings_and_unreadable_requests_syncs_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pong, or the refusal of a request that could not be read, promises
    nothing about the log, so a pass whose only replies are those leaves
    what earlier passes wrote to the interval's sync (a storm of garbage on
    the client endpoint cost an fdatasync per pass while a forged READY's
    records were unsynced). A reply that shows state still waits for it."""
    broker = InProcessBroker(tmp_path, fsync="always")
    broker.enqueue("t.task", 1)
    fsyncs: list[int] = []
    real = os.fdatasync

    def counting_fdatasync(fd: int) -> None:
        real(fd)
        fsyncs.append(fd)

    monkeypatch.setattr(os, "fdatasync", counting_fdatasync)
    worker = FakeWorker(broker)
    assert worker.ready()  # its lease is written, and left to the interval's sync
    assert not fsyncs
    garbage = [(CLIENT, [f"storm-{i}".encode(), b"\xc1" * (i + 1)]) for i in range(50)]
    broker.run_pass(*garbage, (CLIENT, [b"client-1", p.encode(p.Ping(broker.next_req()))]))
    replies = [p.decode(p.client_reply_decoder, body) for _, body in broker.clients.sent[-51:]]
    assert sum(isinstance(r, p.ErrorReply) for r in replies) == 50
    assert isinstance(replies[-1], p.Pong)
    assert not fsyncs, "a pass of pongs and refusals synced the log"
    job = broker.job("job-1")  # shows the lease: it waits for its record's sync
    assert job is not None and job.reserved_by == "worker-1"
    assert len(fsyncs) == 1
