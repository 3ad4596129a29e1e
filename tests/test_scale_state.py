"""The job state at scale: pristine jobs (a shared template and a blob),
batched creation records, lanes in the ready queues, the creation-order
index, and counts that are dropped when they fall to zero. Pure: JobState
driven with records, the way the broker drives it."""

from __future__ import annotations

import gc
import itertools
import random
import uuid
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from inproc import InProcessBroker

from corral.broker import core as core_module
from corral.broker import protocol as p
from corral.broker import views as state_views
from corral.broker.job import BLOB_HEAD, priority_runs, runs_of
from corral.broker.jobspec import JobSpec
from corral.broker.ready import SWEEP_AFTER
from corral.broker.records import (
    Cancelled,
    JobCreated,
    JobsCreated,
    JobSnapshot,
    Leased,
    Record,
    Removed,
    decode_record,
    encode_record,
)
from corral.broker.state import JobState
from corral.broker.timers import SWEEP_AFTER as TIMER_SWEEP

NOW = 1_700_000_000.0


def payload(n: int) -> msgspec.Raw:
    return msgspec.Raw(msgspec.msgpack.encode(n))


def create(state: JobState, specs: list[JobSpec], now: float = NOW) -> list[Record]:
    """Decide, batch, round-trip through the log's encoding, apply: as an enqueue does."""
    created = [state.decide_create(spec, now) for spec in specs]
    records = state.batched([rec for rec in created if rec is not None])
    out = []
    for rec in records:
        code, body = encode_record(rec)
        again = decode_record(code, body)
        state.apply(again)
        out.append(again)
    return out


def replay(records: list[Record]) -> JobState:
    fresh = JobState()
    for rec in records:
        fresh.apply(rec)
    return fresh


def test_plain_jobs_of_one_kind_are_pristine_and_share_one_template() -> None:
    state = JobState()
    records = create(state, [JobSpec(f"j{i}", "t.a", payload(i)) for i in range(5)])
    assert [type(r) for r in records] == [JobsCreated]
    jobs = list(state.jobs.values())
    assert all(job.pristine and job.blob is not None for job in jobs)
    assert len({id(job.tpl) for job in jobs}) == 1
    assert len(state.templates) == 1
    # the blob is the seq and created_at, then the payload
    first = jobs[0]
    assert BLOB_HEAD.unpack_from(first.blob or b"") == (first.seq, NOW, 0)
    assert bytes(first.payload) == bytes(payload(0))
    # what a pristine job reads is what its creation record said
    rec = first.created
    assert (rec.id, rec.task, rec.queue, rec.seq, rec.created_at) == (
        "j0",
        "t.a",
        "default",
        1,
        NOW,
    )
    assert bytes(rec.payload) == bytes(payload(0))


def test_jobs_of_each_their_own_priority_share_a_template_and_keep_their_order() -> None:
    state = JobState()
    priorities = [0, 5, -3, 5, 0, 2**31 - 1, -(2**31)]
    specs = [JobSpec(f"j{i}", "t.a", payload(i), priority=p) for i, p in enumerate(priorities)]
    records = create(state, specs)
    assert [type(r) for r in records] == [JobsCreated]
    assert len({id(job.tpl) for job in state.jobs.values()}) == 1
    assert [state.jobs[f"j{i}"].created.priority for i in range(7)] == priorities
    fresh = replay(records)
    for st_ in (state, fresh):
        order = [job.id for job in iter(lambda s=st_: s.pop_ready("default"), None)]
        assert order == ["j5", "j1", "j3", "j0", "j4", "j2", "j6"]


def test_a_batch_says_its_priority_runs_and_one_written_before_replays_the_same() -> None:
    state = JobState()
    priorities = [0, 0, 5, 5, 5, -3, 0, 0]
    specs = [JobSpec(f"j{i}", "t.a", payload(i), priority=p) for i, p in enumerate(priorities)]
    (rec,) = create(state, specs)
    assert isinstance(rec, JobsCreated)
    assert rec.runs == [(0, 0, 2), (5, 2, 5), (-3, 5, 6), (0, 6, 8)]
    # a record from before ``runs`` was added: the replay reads the blobs
    old = msgspec.structs.replace(rec, runs=None)
    expected = ["j2", "j3", "j4", "j0", "j1", "j6", "j7", "j5"]
    for records in ([rec], [old]):
        fresh = replay(records)
        assert [job.id for job in iter(lambda s=fresh: s.pop_ready("default"), None)] == expected


@given(st.lists(st.integers(-(2**31), 2**31 - 1) | st.sampled_from([0, 1]), max_size=40))
def test_priority_runs_read_off_blobs_are_the_runs_of_the_priorities(priorities: list[int]) -> None:
    blobs = [BLOB_HEAD.pack(i, NOW, p) + b"x" for i, p in enumerate(priorities)]
    runs = priority_runs(blobs)
    assert runs == runs_of(priorities)
    # the runs cover the batch in order, each of one priority, no two alike side by side
    assert [i for _, start, end in runs for i in range(start, end)] == list(range(len(blobs)))
    assert all(priorities[i] == p for p, start, end in runs for i in range(start, end))
    assert all(a[0] != b[0] for a, b in itertools.pairwise(runs))


def test_a_job_is_outside_the_cyclic_collector_and_compares_by_identity() -> None:
    state = JobState()
    create(state, [JobSpec(f"j{i}", "t.a") for i in range(2)])
    a, b = state.jobs["j0"], state.jobs["j1"]
    assert not gc.is_tracked(a)
    a.status = "running"  # its first change gives it a life
    assert not a.pristine and not gc.is_tracked(a)
    assert a == a and a != b and len({a, b, a}) == 2


def test_jobs_with_other_options_get_their_own_template_and_odd_jobs_keep_their_record() -> None:
    state = JobState()
    records = create(
        state,
        [
            JobSpec("a", "t.a"),
            JobSpec("b", "t.a"),
            JobSpec("c", "t.a", timeout=5.0),  # another template
            JobSpec("d", "t.a", unique_key="k"),  # not plain: its whole record
            JobSpec("e", "t.a", delay=10.0),  # scheduled: its whole record
            JobSpec("f", "t.a", on_success=JobSpec("g", "t.b")),
            JobSpec("h", "t.a"),
        ],
    )
    assert [type(r) for r in records] == [JobsCreated] + [JobCreated] * 5
    jobs = state.jobs
    assert jobs["a"].tpl is jobs["b"].tpl is jobs["h"].tpl
    assert jobs["c"].tpl is not jobs["a"].tpl and jobs["c"].timeout == 5.0
    for odd in ("d", "e", "f"):
        assert jobs[odd].blob is None and jobs[odd].tpl.id == odd
    assert jobs["e"].status == "scheduled" and not jobs["e"].pristine


def test_the_first_change_gives_a_job_its_own_life_and_others_stay_pristine() -> None:
    state = JobState()
    create(state, [JobSpec(f"j{i}", "t.a") for i in range(3)])
    job = state.pop_ready("default")
    assert job is not None and job.id == "j0"
    state.apply(Leased("j0", 7, 1, "w", "h", 1, NOW))
    assert not job.pristine and job.lease == 7 and job.reserved and job.status == "queued"
    assert state.jobs["j1"].pristine and state.jobs["j1"].lease == 0
    assert state.jobs["j1"].tries == ()  # the shared empty life cannot be appended to


def test_a_replay_of_batched_records_equals_the_live_state() -> None:
    state = JobState()
    records = create(
        state, [JobSpec(f"j{i}", "t.a", payload(i), priority=i % 3) for i in range(50)]
    )
    fresh = replay(records)
    assert state_views.queue_counts(fresh) == state_views.queue_counts(state)
    assert [j.created for j in fresh.index] == [j.created for j in state.index]
    order = [job.id for job in iter(lambda: fresh.pop_ready("default"), None)]
    expected = sorted(state.jobs.values(), key=lambda j: (-j.priority, j.seq))
    assert order == [job.id for job in expected]


def test_a_resent_batch_makes_only_the_jobs_not_made_yet() -> None:
    state = JobState()
    (rec,) = create(state, [JobSpec(f"j{i}", "t.a") for i in range(4)])
    assert isinstance(rec, JobsCreated)
    state.apply(Removed("j1"))
    state.apply(rec)  # a replay that sees it again: j1 comes back, no one twice
    assert sorted(state.jobs) == ["j0", "j1", "j2", "j3"]
    assert state_views.queue_counts(state)["default"]["queued"] == 4


def test_compaction_writes_runs_of_pristine_jobs_as_batches_and_others_whole() -> None:
    state = JobState()
    create(state, [JobSpec(f"a{i}", "t.a") for i in range(3)])
    create(state, [JobSpec("x", "t.a", unique_key="k")])
    create(state, [JobSpec(f"b{i}", "t.a") for i in range(2)])
    job = state.pop_ready("default")
    assert job is not None
    state.apply(Leased(job.id, 9, 1, "w", "h", 1, NOW))  # a0 is no longer pristine
    snap = list(state.snapshot())
    kinds = [(type(r).__name__, len(r.ids) if isinstance(r, JobsCreated) else 1) for r in snap]
    assert kinds == [("JobSnapshot", 1), ("JobsCreated", 2), ("JobSnapshot", 1), ("JobsCreated", 2)]
    fresh = replay(snap)
    assert {k: (j.status, j.lease, j.seq) for k, j in fresh.jobs.items()} == {
        k: (j.status, j.lease, j.seq) for k, j in state.jobs.items()
    }
    assert isinstance(snap[0], JobSnapshot)


def test_queues_used_once_leave_no_ready_queue_and_no_count_behind() -> None:
    state = JobState()
    for i in range(2_000):
        create(state, [JobSpec(f"j{i}", "t.a", queue=f"q{i}")])
        job = state.pop_ready(f"q{i}")
        assert job is not None
        state.apply(Cancelled(job.id, NOW))
        state.apply(Removed(job.id))
    assert len(state.ready) == 0
    assert not state.counts and not state.reserved
    assert len(state.index) == 0


def test_cancelled_and_removed_ready_jobs_are_swept_from_their_lane() -> None:
    state = JobState()
    n = 4 * SWEEP_AFTER
    create(state, [JobSpec(f"j{i}", "t.a") for i in range(n)])
    for i in range(n - 10):
        state.apply(Cancelled(f"j{i}", NOW))
        state.apply(Removed(f"j{i}"))
    (tq,) = [tq for by_task in state.ready._queues.values() for tq in by_task.values()]
    assert len(tq) < 2 * SWEEP_AFTER + 10  # swept, not 4,096 entries kept
    order = [job.id for job in iter(lambda: state.pop_ready("default"), None)]
    assert order == [f"j{i}" for i in range(n - 10, n)]


def test_cancelled_and_deleted_delayed_jobs_leave_the_timer_heap_before_their_time() -> None:
    state = JobState()
    n = 4 * TIMER_SWEEP
    create(state, [JobSpec(f"d{i}", "t.a", delay=3600.0 + i) for i in range(n)])
    assert len(state.timers) == n
    for i in range(n - 5):
        if i % 2:
            state.apply(Cancelled(f"d{i}", NOW))
        state.apply(Removed(f"d{i}"))
    assert len(state.timers) < 2 * TIMER_SWEEP + 5  # not 4,096 entries until their time
    assert state.next_wakeup() == NOW + 3600.0 + n - 5
    assert state.promote_due(NOW + 3600.0 + n) == 5
    assert len(state.timers) == 0


def test_status_counts_come_from_kept_counts() -> None:
    state = JobState()
    create(state, [JobSpec(f"j{i}", f"t.{i % 2}", queue="q") for i in range(10)])
    assert state_views.per_task(state) == {"t.0": {"queued": 5}, "t.1": {"queued": 5}}
    assert state_views.queue_counts(state)["q"]["queued"] == 10
    (gone,) = state_views.unroutable(state, [])[:1]
    assert (gone.queue, gone.count, gone.since) == ("q", 5, NOW)


@given(
    st.lists(
        st.tuples(st.sampled_from(["add", "remove", "page"]), st.integers(0, 10**6)),
        max_size=120,
    )
)
def test_pages_walk_every_job_once_in_creation_order_either_way(ops: list[tuple[str, int]]) -> None:
    state = JobState()
    rng = random.Random(0)
    n = 0
    for op, arg in ops:
        if op == "add":
            count = 1 + arg % 40
            create(state, [JobSpec(f"j{n + i}", "t.a") for i in range(count)])
            n += count
        elif op == "remove" and state.jobs:
            for job_id in rng.sample(sorted(state.jobs), k=min(len(state.jobs), 1 + arg % 30)):
                state.apply(Cancelled(job_id, NOW))
                state.apply(Removed(job_id))
        else:
            expected = [j.id for j in sorted(state.jobs.values(), key=lambda j: j.seq)]
            for newest in (False, True):
                seen: list[str] = []
                cursor = None
                while True:
                    page, cursor = state_views.list_jobs(
                        state, limit=1 + arg % 7, cursor=cursor, newest=newest
                    )
                    seen += [job.id for job in page]
                    if cursor is None:
                        break
                assert seen == (expected[::-1] if newest else expected)
    assert [j.id for j in state.index] == [
        j.id for j in sorted(state.jobs.values(), key=lambda j: j.seq)
    ]


def test_the_broker_freezes_what_it_made_after_replay_and_every_so_many_jobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(core_module, "FREEZE_EVERY", 500)
    try:
        broker = InProcessBroker(tmp_path)  # the replay freezes once
        assert broker.core.stats["gc_freezes"] == 1
        frozen = gc.get_freeze_count()
        for _ in range(3):
            jobs = [JobSpec(f"j{uuid.uuid4().hex}", "t.a") for _ in range(250)]
            broker.request(p.Enqueue(broker.next_req(), jobs))
        assert broker.core.stats["gc_freezes"] == 2  # after the first 500 made
        assert gc.get_freeze_count() > frozen
    finally:
        gc.unfreeze()
