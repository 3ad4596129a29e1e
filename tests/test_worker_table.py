"""Tests for corral.broker.workers: per-worker credit and leases, fair queue
rotation, which held jobs count as an attempt when a worker is lost, and
the liveness rule (time is driven by hand)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.broker.workers import WorkerConn, WorkerTable


def conn(
    identity: bytes = b"w1",
    *,
    queues: list[str] | None = None,
    capacity: int = 4,
    concurrency: int = 2,
    last_seen: float = 100.0,
) -> WorkerConn:
    return WorkerConn(
        identity=identity,
        worker_id=identity.decode(),
        queues=["default"] if queues is None else queues,
        capacity=capacity,
        concurrency=concurrency,
        tasks=["t.a", "t.b"],
        host="host-1",
        pid=1234,
        last_seen=last_seen,
    )


# -- credit ------------------------------------------------------------------------


def test_credit_is_capacity_minus_outstanding_leases() -> None:
    c = conn(capacity=3)
    assert c.credit == 3
    c.leases["j1"] = 11
    c.leases["j2"] = 12
    assert c.credit == 1
    c.leases["j3"] = 13
    assert c.credit == 0


def test_release_returns_the_lease_and_gives_credit_back() -> None:
    c = conn(capacity=2)
    c.leases.update({"j1": 11, "j2": 12})
    c.started.add("j1")
    assert c.credit == 0
    assert c.release("j1") == 11
    assert c.credit == 1
    assert "j1" not in c.started
    assert c.leases == {"j2": 12}
    # releasing twice, or a job never held, changes nothing
    assert c.release("j1") is None
    assert c.release("nope") is None
    assert c.credit == 1


def test_release_of_an_unheld_but_started_job_forgets_it() -> None:
    c = conn()
    c.started.add("ghost")
    assert c.release("ghost") is None
    assert c.started == set()


def test_hungry_lists_only_workers_with_credit() -> None:
    table = WorkerTable(3.0)
    full, free, spare = conn(b"full", capacity=1), conn(b"free", capacity=2), conn(b"spare")
    for c in (full, free, spare):
        table.add(c)
    full.leases["j1"] = 1
    free.leases["j2"] = 2
    assert {c.identity for c in table.hungry()} == {b"free", b"spare"}
    free.leases["j3"] = 3
    assert {c.identity for c in table.hungry()} == {b"spare"}
    full.release("j1")
    assert {c.identity for c in table.hungry()} == {b"full", b"spare"}


# -- queue rotation --------------------------------------------------------------------


def test_queue_order_rotates_one_step_per_call() -> None:
    c = conn(queues=["a", "b", "c"])
    orders = [c.queue_order() for _ in range(4)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert c.queues == ["a", "b", "c"]  # the worker's own list is not reordered


def test_queue_order_of_one_or_no_queue() -> None:
    assert [conn(queues=["only"]).queue_order() for _ in range(3)] == [["only"]] * 3
    assert conn(queues=[]).queue_order() == []


@given(st.lists(st.text(min_size=1, max_size=3), min_size=2, max_size=6, unique=True))
def test_every_queue_leads_equally_often(queues: list[str]) -> None:
    c = conn(queues=list(queues))
    rounds = 3
    firsts = [c.queue_order()[0] for _ in range(rounds * len(queues))]
    for q in queues:
        assert firsts.count(q) == rounds
    # every order offers each configured queue once
    assert sorted(c.queue_order()) == sorted(queues)


def test_queue_order_of_four_queues_by_hand() -> None:
    c = conn(queues=["q1", "q2", "q3", "q4"])
    assert [c.queue_order() for _ in range(5)] == [
        ["q1", "q2", "q3", "q4"],
        ["q2", "q3", "q4", "q1"],
        ["q3", "q4", "q1", "q2"],
        ["q4", "q1", "q2", "q3"],
        ["q1", "q2", "q3", "q4"],
    ]


def test_weighted_queue_order_by_hand() -> None:
    # Smooth weighted round robin with a = 3, b = 1, worked out by hand
    # (current weights before -> after the pick; the pick loses the total 4):
    # (3, 1) -> a -> (-1, 1); (2, 2) -> a (tie: the first) -> (-2, 2);
    # (1, 3) -> b -> (1, -1); (4, 0) -> a -> (0, 0), and round again.
    c = conn(queues=["a", "b"])
    c.weights = {"a": 3, "b": 1}
    assert [c.queue_order() for _ in range(8)] == [
        ["a", "b"],
        ["a", "b"],
        ["b", "a"],
        ["a", "b"],
        ["a", "b"],
        ["a", "b"],
        ["b", "a"],
        ["a", "b"],
    ]


# -- counted on loss -------------------------------------------------------------------


def test_counted_on_loss_is_started_plus_oldest_concurrency_leases() -> None:
    c = conn(capacity=6, concurrency=2)
    for i in range(1, 6):
        c.leases[f"j{i}"] = 100 + i
    assert c.counted_on_loss() == {"j1", "j2"}
    c.started.add("j4")  # announced out of order
    assert c.counted_on_loss() == {"j1", "j2", "j4"}
    c.release("j1")
    assert c.counted_on_loss() == {"j2", "j3", "j4"}
    c.release("j4")
    assert c.counted_on_loss() == {"j2", "j3"}


def test_counted_on_loss_of_an_idle_worker_is_empty() -> None:
    assert conn().counted_on_loss() == set()


def test_counted_on_loss_follows_delivery_order_not_job_id_order() -> None:
    c = conn(concurrency=1)
    c.leases["zzz"] = 1
    c.leases["aaa"] = 2
    assert c.counted_on_loss() == {"zzz"}


@pytest.mark.parametrize(
    ("held", "concurrency", "started", "counted"),
    [
        # nothing started: the oldest `concurrency` held jobs
        (["j1", "j2", "j3", "j4", "j5"], 2, set(), {"j1", "j2"}),
        (["j1", "j2", "j3", "j4", "j5"], 3, set(), {"j1", "j2", "j3"}),
        # fewer held than the worker runs at once: all of them
        (["j1", "j2"], 3, set(), {"j1", "j2"}),
        # a later job reported started counts too
        (["a", "b", "c"], 1, {"c"}, {"a", "c"}),
        (["a", "b", "c", "d"], 2, {"c", "d"}, {"a", "b", "c", "d"}),
        # the started ones are the oldest: nothing more
        (["a", "b", "c", "d"], 2, {"a", "b"}, {"a", "b"}),
        (["a", "b", "c", "d"], 2, {"b"}, {"a", "b"}),
        # delivery order, not id order
        (["z", "m", "a"], 2, set(), {"z", "m"}),
        ([], 4, set(), set()),
    ],
)
def test_counted_on_loss_by_hand(
    held: list[str], concurrency: int, started: set[str], counted: set[str]
) -> None:
    c = conn(capacity=20, concurrency=concurrency)
    for n, job_id in enumerate(held):
        c.leases[job_id] = n + 1
    c.started.update(started)
    assert c.counted_on_loss() == counted


@given(
    st.lists(st.integers(0, 50), unique=True, max_size=12),
    st.integers(1, 5),
    st.data(),
)
def test_counted_on_loss_property(ids: list[int], concurrency: int, data: st.DataObject) -> None:
    c = conn(capacity=20, concurrency=concurrency)
    for n, i in enumerate(ids):
        c.leases[f"j{i}"] = n + 1
    held = list(c.leases)
    started = data.draw(st.sets(st.sampled_from(held)) if held else st.just(set()))
    c.started.update(started)
    counted = c.counted_on_loss()
    # bounds, not the rule: every started job counts, only held jobs count,
    # at least `concurrency` of them (or all), at most that many more than started
    assert set(started) <= counted <= set(held)
    assert min(concurrency, len(held)) <= len(counted) <= len(started) + concurrency
    # the call is a pure view
    assert c.counted_on_loss() == counted
    assert list(c.leases) == held


# -- the table and liveness --------------------------------------------------------------


def test_add_get_remove_and_replace() -> None:
    table = WorkerTable(3.0)
    first = conn(b"w1")
    assert table.add(first) is None
    assert table.get(b"w1") is first
    assert len(table) == 1
    again = conn(b"w1")
    assert table.add(again) is first  # a re-registration replaces the old connection
    assert table.get(b"w1") is again
    assert len(table) == 1
    table.add(conn(b"w2"))
    assert len(table) == 2
    assert table.remove(b"w1") is again
    assert table.remove(b"w1") is None
    assert table.get(b"w1") is None
    assert [c.identity for c in table] == [b"w2"]


def test_iterating_while_removing_is_safe() -> None:
    table = WorkerTable(3.0)
    for i in range(5):
        table.add(conn(f"w{i}".encode()))
    seen = []
    for c in table:
        seen.append(c.identity)
        table.remove(c.identity)
    assert len(seen) == 5
    assert len(table) == 0


def test_silent_after_the_liveness_window() -> None:
    table = WorkerTable(liveness_window=3.0)
    a, b = conn(b"a", last_seen=100.0), conn(b"b", last_seen=101.0)
    table.add(a)
    table.add(b)
    assert table.silent(100.0) == []
    assert table.silent(103.0) == []  # exactly the window: still alive
    assert table.silent(103.5) == [a]
    assert {c.identity for c in table.silent(104.5)} == {b"a", b"b"}


def test_seen_keeps_a_worker_alive() -> None:
    table = WorkerTable(liveness_window=3.0)
    a = conn(b"a", last_seen=100.0)
    table.add(a)
    assert table.seen(b"a", 102.5) is a
    assert a.last_seen == 102.5
    assert table.silent(105.0) == []
    assert table.silent(105.6) == [a]
    assert table.seen(b"unknown", 106.0) is None


def test_silent_does_not_remove() -> None:
    table = WorkerTable(liveness_window=1.0)
    a = conn(b"a", last_seen=0.0)
    table.add(a)
    assert table.silent(10.0) == [a]
    assert table.get(b"a") is a
    table.remove(b"a")
    assert table.silent(10.0) == []


def test_silent_by_hand() -> None:
    # window 3 s, now 103.5: gaps 3.5, 2.5, 0.0, 6.5 and 3.0 (the window itself)
    table = WorkerTable(liveness_window=3.0)
    for name, last_seen in (("a", 100.0), ("b", 101.0), ("c", 103.5), ("d", 97.0), ("e", 100.5)):
        table.add(conn(name.encode(), last_seen=last_seen))
    assert sorted(c.identity for c in table.silent(103.5)) == [b"a", b"d"]
    assert sorted(c.identity for c in table.silent(104.0)) == [b"a", b"d", b"e"]
    assert sorted(c.identity for c in table.silent(106.6)) == [b"a", b"b", b"c", b"d", b"e"]


@given(
    st.lists(st.floats(0, 100, allow_nan=False), min_size=1, max_size=8),
    st.floats(0.5, 10),
    st.floats(0, 120),
    st.floats(0, 50),
)
def test_silent_property(last_seen: list[float], window: float, now: float, later: float) -> None:
    table = WorkerTable(window)
    for i, t in enumerate(last_seen):
        table.add(conn(f"w{i}".encode(), last_seen=t))
    silent = {c.identity for c in table.silent(now)}
    # once silent, silent later too
    assert silent <= {c.identity for c in table.silent(now + later)}
    # a worker heard from at `now` (or after) is not silent
    for c in table:
        if c.last_seen >= now:
            assert c.identity not in silent


def test_the_table_counts_each_task_once_per_connected_worker() -> None:
    table = WorkerTable(liveness_window=3.0)
    a, b = conn(b"a"), conn(b"b")
    b.tasks = ["t.b", "t.c", "t.c"]
    table.add(a)
    table.add(b)
    assert table.serving == {"t.a": 1, "t.b": 2, "t.c": 1}
    again = conn(b"a")  # the same identity registers again, with other tasks
    again.tasks = ["t.d"]
    assert table.add(again) is a
    assert table.serving == {"t.b": 1, "t.c": 1, "t.d": 1}
    table.remove(b"a")
    table.remove(b"b")
    table.remove(b"b")
    assert table.serving == {}


def test_a_supervised_worker_is_vouched_for_until_its_supervisor_can_first_report() -> None:
    """A worker that registers and at once runs a handler holding the GIL
    cannot heartbeat, and its supervisor has not yet reported it (it
    reports every second; the liveness window may be shorter): it counts
    as vouched for until that first report is due. A worker with no
    supervisor gets only the liveness window."""
    from corral.broker import protocol as p
    from corral.broker.workers import VOUCH_GRACE

    window = 0.6
    table = WorkerTable(window)
    for identity, supervised in ((b"sup", True), (b"alone", False)):
        ready = p.Ready(identity.decode(), ["default"], 1, 1, [], "h", 1, supervised=supervised)
        table.add(WorkerConn.from_ready(identity, ready, 100.0))
    silent = {c.identity for c in table.silent(100.0 + window + 0.1)}
    assert silent == {b"alone"}
    assert table.silent(100.0 + window + VOUCH_GRACE - 0.1) == [table.get(b"alone")]
    later = {c.identity for c in table.silent(100.0 + window + VOUCH_GRACE + 0.1)}
    assert later == {b"sup", b"alone"}
