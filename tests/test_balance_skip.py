"""Tests for corral.broker.balance.may_withdraw: a dispatch skips
plan_withdrawals (it sorts every worker's reserved jobs) only when it could
take nothing back. Built from records applied to a real JobState, as the
broker does; no sockets."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.broker import balance
from corral.broker.records import JobCreated, Leased, Started
from corral.broker.state import JobState
from corral.broker.workers import WorkerConn

NOW = 1_700_000_000.0
QUEUES = ["q1", "q2"]


@dataclass(frozen=True)
class JobPlan:
    priority: int
    queue: str
    task: str
    #: None: ready; else (worker index, "reserved" | "started" | "withdrawing")
    held: tuple[int, str] | None


def _worker(
    n: int, concurrency: int, credit: int, queues: list[str], tasks: list[str]
) -> WorkerConn:
    """A worker with ``credit`` (its capacity grows by each job it is given)."""
    name = f"w{n}"
    return WorkerConn(
        identity=name.encode(),
        worker_id=name,
        queues=queues,
        capacity=credit,
        concurrency=concurrency,
        tasks=tasks,
        host="host-1",
        pid=1000 + n,
        last_seen=0.0,
    )


def _build(
    workers: list[WorkerConn], jobs: list[JobPlan], paused: set[str]
) -> tuple[JobState, int | None]:
    """The state and the lowest priority of a held job (None: none held)."""
    state = JobState()
    state.paused.update(paused)
    floor: int | None = None
    for seq, plan in enumerate(jobs, 1):
        job_id = f"j{seq}"
        state.apply(
            JobCreated(
                id=job_id,
                task=plan.task,
                queue=plan.queue,
                priority=plan.priority,
                seq=seq,
                created_at=NOW,
            )
        )
        if plan.held is None:
            continue
        conn = workers[plan.held[0] % len(workers)]
        lease = 100 + seq
        state.apply(Leased(job_id, lease, 1, conn.worker_id, conn.host, conn.pid, NOW))
        conn.leases[job_id] = lease
        if plan.held[1] == "started":
            state.apply(Started(job_id, lease, 1, conn.worker_id, conn.host, conn.pid, NOW))
            conn.started.add(job_id)
        elif plan.held[1] == "withdrawing":
            conn.withdrawing.add(job_id)
        floor = plan.priority if floor is None else min(floor, plan.priority)
    for conn in workers:  # ``capacity`` is given as the credit left
        conn.capacity += len(conn.leases)
    return state, floor


workers_st = st.lists(
    st.builds(
        lambda c, cap, qs, ts: (c, cap, qs, ts),
        st.integers(1, 2),
        st.sampled_from([0, 0, 0, 1, 2]),  # mostly out of credit, as in a busy pool
        st.lists(st.sampled_from(QUEUES), min_size=1, max_size=2, unique=True),
        st.sampled_from([[], ["t.a"], ["t.a", "t.b"]]),
    ),
    min_size=1,
    max_size=3,
)
jobs_st = st.lists(
    st.builds(
        JobPlan,
        st.integers(-1, 1),
        st.sampled_from(QUEUES),
        st.sampled_from(["t.a", "t.b"]),
        st.none()
        | st.tuples(
            st.integers(0, 2), st.sampled_from(["reserved", "reserved", "started", "withdrawing"])
        ),
    ),
    max_size=10,
)


#: A dispatch situation: workers, jobs, paused queues, how far below the least
#: held priority the bound is.
situations = given(workers_st, jobs_st, st.sets(st.sampled_from(QUEUES)), st.integers(0, 2))


def no_withdrawal_is_skipped(
    worker_specs: list[tuple[int, int, list[str], list[str]]],
    jobs: list[JobPlan],
    paused: set[str],
    below: int,
) -> None:
    workers = [_worker(n, *spec) for n, spec in enumerate(worker_specs)]
    state, floor = _build(workers, jobs, paused)
    # any lower bound of the held jobs' priorities will do, not only the least
    bound = None if floor is None else floor - below
    if not balance.may_withdraw(workers, state, bound):
        assert balance.plan_withdrawals(workers, state) == {}


# 100 situations in the fast suite (400 cost it 2 s of CPU), 2,000 in the soak profile.
test_no_withdrawal_is_skipped_that_plan_withdrawals_would_make = settings(
    max_examples=100, deadline=None
)(situations(no_withdrawal_is_skipped))
test_no_withdrawal_is_skipped_that_plan_withdrawals_would_make_soak = pytest.mark.soak(
    settings(max_examples=2_000, deadline=None)(situations(no_withdrawal_is_skipped))
)


def _busy_pair(priority_ready: int, priority_held: int) -> tuple[list[WorkerConn], JobState, int]:
    """One single-slot worker, out of credit, running one job with one
    buffered job of ``priority_held``; one job of ``priority_ready`` ready."""
    conn = _worker(0, 1, 0, ["q1"], [])
    jobs = [
        JobPlan(priority_held, "q1", "t.a", (0, "started")),
        JobPlan(priority_held, "q1", "t.a", (0, "reserved")),
        JobPlan(priority_ready, "q1", "t.a", None),
    ]
    state, floor = _build([conn], jobs, set())
    assert floor is not None
    return [conn], state, floor


def test_a_busy_worker_and_jobs_of_one_priority_skip_the_plan() -> None:
    workers, state, floor = _busy_pair(0, 0)
    assert not balance.may_withdraw(workers, state, floor)
    assert balance.plan_withdrawals(workers, state) == {}


def test_a_ready_job_of_higher_priority_is_not_skipped() -> None:
    workers, state, floor = _busy_pair(1, 0)
    assert balance.may_withdraw(workers, state, floor)
    assert [j.id for j in balance.plan_withdrawals(workers, state)[workers[0]]] == ["j2"]


def test_an_idle_worker_is_not_skipped() -> None:
    busy, state, floor = _busy_pair(0, 0)
    idle = _worker(1, 1, 1, ["q1"], [])
    workers = [*busy, idle]
    assert balance.may_withdraw(workers, state, floor)
    assert [j.id for j in balance.plan_withdrawals(workers, state)[busy[0]]] == ["j2"]
