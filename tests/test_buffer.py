"""The worker's prefetch buffer: start order, withdraw, stop, and threads."""

from __future__ import annotations

import threading

from conftest import wait_for

from corral.broker import protocol as p
from corral.workers.buffer import Buffer


def delivery(job_id: str, lease: int = 1, priority: int = 0) -> p.Delivery:
    return p.Delivery(job_id, lease, "t", p.encode_value(None), 1, 3, "q", 0.0, priority=priority)


def test_jobs_start_highest_priority_first_then_in_delivery_order() -> None:
    buffer = Buffer()
    for n, prio in enumerate([0, 0, 5, 0, 10, 5]):
        buffer.put(delivery(f"j{n}", priority=prio))
    order = [buffer.take(0).job_id for _ in range(6)]  # type: ignore[union-attr]
    assert order == ["j4", "j2", "j5", "j0", "j1", "j3"]
    assert buffer.take(0) is None and len(buffer) == 0


def test_a_withdrawn_job_never_starts_and_a_started_one_cannot_be_withdrawn() -> None:
    buffer = Buffer()
    buffer.put(delivery("a", lease=1))
    buffer.put(delivery("b", lease=2))
    assert buffer.withdraw("b", 99) is None  # another lease: not this job
    assert buffer.withdraw("b", 2) is not None
    assert buffer.withdraw("b", 2) is None  # once
    taken = buffer.take(0)
    assert taken is not None and taken.job_id == "a"
    assert buffer.withdraw("a", 1) is None  # started: too late
    assert buffer.take(0) is None


def test_clear_takes_back_everything_in_start_order() -> None:
    buffer = Buffer()
    for n, prio in enumerate([1, 3, 2]):
        buffer.put(delivery(f"j{n}", priority=prio))
    buffer.withdraw("j2", 1)
    assert [d.job_id for d in buffer.clear()] == ["j1", "j0"]
    assert len(buffer) == 0


def test_stop_releases_each_waiting_taker_once() -> None:
    buffer = Buffer()
    got: list[p.Delivery | None] = []
    takers = [threading.Thread(target=lambda: got.append(buffer.take())) for _ in range(3)]
    for t in takers:
        t.start()
    buffer.stop(3)
    for t in takers:
        t.join(10)
        assert not t.is_alive()
    assert got == [None, None, None]


def test_each_job_is_taken_or_withdrawn_exactly_once_across_threads() -> None:
    """Handler threads take while the socket thread withdraws: no job is
    lost, none goes out twice."""
    buffer = Buffer()
    n = 5000
    taken: list[str] = []
    lock = threading.Lock()

    def take() -> None:
        while (d := buffer.take()) is not None:
            with lock:
                taken.append(d.job_id)

    takers = [threading.Thread(target=take) for _ in range(4)]
    for t in takers:
        t.start()
    withdrawn = []
    for i in range(n):
        buffer.put(delivery(f"j{i}", lease=i))
        if i % 3 == 0 and buffer.withdraw(f"j{i - 1}", i - 1) is not None:
            withdrawn.append(f"j{i - 1}")
    wait_for(lambda: len(taken) + len(withdrawn) >= n, 30, message="the buffer to empty")
    buffer.stop(4)
    for t in takers:
        t.join(10)
    assert sorted(taken + withdrawn) == sorted(f"j{i}" for i in range(n))
    assert len(set(taken)) == len(taken)


def test_a_paused_buffer_starts_nothing_until_resumed_but_still_stops() -> None:
    buffer = Buffer()
    buffer.put(delivery("a"))
    buffer.pause()
    assert buffer.take(0.05) is None and len(buffer) == 1
    got: list[p.Delivery | None] = []
    taker = threading.Thread(target=lambda: got.append(buffer.take()))
    taker.start()
    buffer.resume()
    taker.join(10)
    assert [d.job_id for d in got if d is not None] == ["a"]
    buffer.pause()
    buffer.stop(1)
    assert buffer.take() is None  # a stop ends a wait on a paused buffer


def test_holding_offers_running_buffered_and_taken_not_yet_begun_jobs() -> None:
    from corral.context import JobContext
    from corral.workers.buffer import Held

    held = Held()
    for n in range(3):
        held.buffer.put(delivery(f"j{n}", lease=10 + n))
    running = held.buffer.take(0)
    assert running is not None
    held.claim(running, JobContext(running.job_id, 1, "t", "q", 0.0, 3, running.lease))
    taken = held.buffer.take(0)  # by a handler that has not begun it yet
    assert taken is not None
    offered = held.holding()
    assert offered[0] == p.Holding("j0", 10, True)
    assert sorted(offered[1:], key=lambda h: h.job_id) == [
        p.Holding("j1", 11, False),
        p.Holding("j2", 12, False),
    ]
    # refused while taken: the claim refuses it, it is never begun
    assert held.cancel("j1", 11) == "pending"
    assert not held.claim(taken, JobContext("j1", 1, "t", "q", 0.0, 3, 11))
    assert [h.job_id for h in held.holding()] == ["j0", "j2"]
