"""Attacks on the restart checkpoint's cold jobs (broker/coldjobs.py): what
a broker serving cold jobs does when their base file is changed under it,
and when anything reads the job table while they are cold."""

from __future__ import annotations

import errno
import os
import shutil
import types
from pathlib import Path
from typing import Any

import msgspec
import pytest
from compacting import until_compacted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inproc import SMALL_LOG, FakeWorker, InProcessBroker, deliveries
from structlog.testing import capture_logs
from test_checkpoint import (
    QUEUES,
    assert_same,
    checkpointed,
    compact_now,
    enqueue_many,
    replay,
    restarted,
)

from corral.broker import core
from corral.broker import protocol as p
from corral.broker.core import CLIENT
from corral.broker.framing import LogCorrupt


def base_of(state_dir: Path) -> Path:
    (ckpt,) = (state_dir / "log").glob("*.ckpt")
    return ckpt.with_suffix(".seg")


def flip_in_batch(path: Path, broker: InProcessBroker, number: int) -> None:
    """Flip one byte inside cold batch ``number``'s frame of ``path`` (in place)."""
    cold = broker.core.state.jobs.cold
    assert cold is not None
    batch = cold.batches[number]
    with open(path, "r+b") as f:
        f.seek(batch.offset + batch.length // 2)
        byte = f.read(1)
        f.seek(batch.offset + batch.length // 2)
        f.write(bytes([byte[0] ^ 0x40]))


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_a_base_damaged_under_the_broker_stops_it_not_its_jobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """A cold batch that no longer reads back (its base was written to under
    the broker) is damage: the broker stops (as for a failed log write), it
    never answers as if the batch's jobs were not there, and its next start
    replays the base in full (the checkpoint goes) and finds the damage."""
    monkeypatch.setattr(core, "WARM_PER_PASS", 0)
    state_dir, _ = checkpointed(tmp_path)
    broker = restarted(state_dir)
    cold = broker.core.state.jobs.cold
    assert cold is not None and 0 in cold.batches
    if how == "flip":
        flip_in_batch(base_of(state_dir), broker, 0)
    else:
        os.truncate(base_of(state_dir), cold.batches[0].offset + 10)
    jobs = len(broker.core.state.jobs)
    with pytest.raises(LogCorrupt):  # the first job of batch 0, looked up
        broker.request(p.GetJob(broker.next_req(), "a-0"))
    # (had it been caught, the broker would go on with the batch's jobs gone)
    assert len(broker.core.state.jobs) == jobs
    assert broker.core.state.jobs.cold is not None and 0 in broker.core.state.jobs.cold.batches
    broker.crash()
    assert not list((state_dir / "log").glob("*.ckpt"))  # distrusted
    with pytest.raises(LogCorrupt):
        restarted(state_dir)


@pytest.mark.parametrize("op", ["cancel", "enqueue", "delete"])
def test_every_request_that_warms_a_damaged_batch_stops_the_broker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, op: str
) -> None:
    monkeypatch.setattr(core, "WARM_PER_PASS", 0)
    state_dir, _ = checkpointed(tmp_path)
    broker = restarted(state_dir)
    flip_in_batch(base_of(state_dir), broker, 1)
    job_id = "a-600"  # in batch 1 (512 jobs a batch)
    msg: object = {
        "cancel": p.Cancel(broker.next_req(), job_id),
        "delete": p.Delete(broker.next_req(), job_id),
        "enqueue": p.Enqueue(broker.next_req(), [p.JobSpec(job_id, "t.task")]),
    }[op]
    size = sum(f.stat().st_size for f in (state_dir / "log").glob("*.seg"))
    with pytest.raises(LogCorrupt):
        broker.request(msg)
    broker.crash()
    # nothing was logged for a request the broker could not check
    assert sum(f.stat().st_size for f in (state_dir / "log").glob("*.seg")) == size


def test_a_base_replaced_under_the_broker_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker reads cold jobs from the base file it replayed, even when
    another file is renamed over that name (a copy, a restore)."""
    monkeypatch.setattr(core, "WARM_PER_PASS", 0)
    state_dir, ids = checkpointed(tmp_path)
    broker = restarted(state_dir)
    base = base_of(state_dir)
    other = base.with_name("other")
    shutil.copy2(base, other)
    flip_in_batch(other, broker, 0)
    os.replace(other, base)
    info = broker.job("a-0")
    assert info is not None and info.status == "queued"
    assert len(broker.core.state.jobs) == len(ids)
    broker.crash()


def test_a_second_restart_before_all_are_warm_is_a_full_replay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Restarted on a checkpoint, the broker works some cold jobs, takes new
    ones, pauses a queue, and is killed with most still cold: the next
    start, with the checkpoint, is the same as a full replay."""
    monkeypatch.setattr(core, "WARM_PER_PASS", 0)
    state_dir, ids = checkpointed(tmp_path)
    broker = restarted(state_dir)
    ids += enqueue_many(broker, "late", 20, priority=7)
    ids += enqueue_many(broker, "late-o", 5, queue="other")
    broker.request(p.Cancel(broker.next_req(), "a-900"))
    broker.request(p.Delete(broker.next_req(), "a-900"))
    broker.run_pass((CLIENT, [b"c", p.encode(p.Pause(broker.next_req(), "other", True))]))
    worker = FakeWorker(broker, credit=30)
    held = worker.ready()
    for d in held[:25]:
        worker.finish(d)
    assert broker.core.state.jobs.cold is not None
    broker.crash()
    log_dir = state_dir / "log"
    warm = replay(log_dir, tmp_path, "warm", checkpoint=False)
    cold = replay(log_dir, tmp_path, "cold", checkpoint=True)
    assert cold.jobs.cold is not None
    assert_same(warm, cold, [*ids, "nope"], QUEUES)


def test_a_checkpoint_of_another_generation_is_ignored(tmp_path: Path) -> None:
    """A checkpoint left from an earlier log of the same segment number (the
    log was removed and made again, or restored from elsewhere) is not
    trusted: it is ignored, said, and the base replayed in full."""
    old_dir, _ = checkpointed(tmp_path / "old")
    state_dir, ids = checkpointed(tmp_path / "new")
    (old,) = (old_dir / "log").glob("*.ckpt")
    (new,) = (state_dir / "log").glob("*.ckpt")
    assert old.name == new.name
    shutil.copy2(old, new)
    log_dir = state_dir / "log"
    with capture_logs() as logs:
        cold = replay(log_dir, tmp_path, "cold", checkpoint=True)
    assert cold.jobs.cold is None
    assert [e["reason"] for e in logs if e["event"] == "checkpoint.ignored"]
    warm = replay(log_dir, tmp_path, "warm", checkpoint=False)
    assert_same(warm, cold, ids, QUEUES)


def test_a_disk_full_while_the_checkpoint_is_written_leaves_a_whole_base_and_no_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoint is a cache: a disk that fills while it is written
    leaves no checkpoint and no tmp file, the compaction's base is whole,
    and the restart replays it in full."""
    from corral.broker import checkpoint

    real_write = os.write
    calls = {"n": 0}

    def full_after_a_few_bytes(fd: int, data: Any) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            return real_write(fd, bytes(data[:100]))
        raise OSError(errno.ENOSPC, "No space left on device")

    broker = InProcessBroker(tmp_path / "s", extra=SMALL_LOG)
    ids = enqueue_many(broker, "a", 1500)
    # (the checkpoint module's own os only: the base is written as usual)
    monkeypatch.setattr(
        checkpoint, "os", types.SimpleNamespace(**{**vars(os), "write": full_after_a_few_bytes})
    )
    with capture_logs() as logs:
        compact_now(broker)
    monkeypatch.setattr(checkpoint, "os", os)
    assert calls["n"] == 2
    assert any(e["event"] == "checkpoint.not_written" for e in logs)
    log_dir = tmp_path / "s" / "log"
    assert not list(log_dir.glob("*.ckpt")) and not list(log_dir.glob("*.tmp"))
    ids += enqueue_many(broker, "b", 3)
    broker.crash()
    broker = restarted(tmp_path / "s")
    assert broker.core.state.jobs.cold is None
    assert len(broker.core.state.jobs) == len(ids)
    broker.crash()


# -- a broker on cold jobs answers as one on a full replay --------------------


def rich_checkpointed(root: Path) -> Path:
    """A crashed broker's state dir like :func:`checkpointed`'s, whose base
    also holds jobs of every other kind beside the cold batches: with
    ``expires``, delayed, in a chain, with unique and limit keys, failed."""
    broker = InProcessBroker(root / "s", extra=SMALL_LOG)
    enqueue_many(broker, "a", 1200)
    enqueue_many(broker, "x", 50, expires=100.0)
    enqueue_many(broker, "d", 20, delay=50.0)
    enqueue_many(broker, "f", 5, max_attempts=1, queue="other", priority=9)
    worker = FakeWorker(broker, credit=5, queues=("other",))
    for d in worker.ready():
        worker.start(d)
        worker.finish(d, "error", error=p.ErrorInfo("E", "failed"))
    worker.go_silent()
    steps = [p.JobSpec(f"c-{i}", "t.task") for i in range(3)]
    broker.request(p.EnqueueFlow(broker.next_req(), "chain-1", "chain", steps))
    for i in range(10):
        broker.enqueue(id=f"u-{i}", unique_key=f"key-{i % 3}")
        broker.enqueue(id=f"l-{i}", limit_key=f"lk-{i % 2}", queue="other")
    enqueue_many(broker, "hi", 300, priority=5)
    enqueue_many(broker, "o", 100, queue="other")
    compact_now(broker)
    enqueue_many(broker, "b", 5)
    broker.crash()
    return root / "s"


_ID = st.one_of(
    st.builds("a-{}".format, st.integers(0, 1199)),
    st.builds("{}-{}".format, st.sampled_from("xdfcul"), st.integers(0, 10)),
    st.builds("hi-{}".format, st.integers(0, 299)),
    st.builds("o-{}".format, st.integers(0, 99)),
    st.builds("b-{}".format, st.integers(0, 4)),
    st.just("nope"),
)
_OPS = st.one_of(
    st.tuples(st.just("get"), _ID),
    st.tuples(st.just("cancel"), _ID),
    st.tuples(st.just("delete"), _ID),
    st.tuples(st.just("retry"), _ID),
    st.tuples(st.just("enqueue"), _ID, st.sampled_from([0, 5, 9]), st.sampled_from(QUEUES)),
    st.tuples(
        st.just("list"),
        st.sampled_from([None, *QUEUES]),
        st.sampled_from([None, "queued", "cancelled", "succeeded"]),
        st.integers(1, 700),
        st.booleans(),
        st.integers(0, 2000),
    ),
    st.tuples(st.just("status")),
    st.tuples(st.just("pause"), st.sampled_from(QUEUES), st.booleans()),
    st.tuples(st.just("work"), st.integers(1, 40)),
    st.tuples(st.just("purge"), st.sampled_from(QUEUES)),
    st.tuples(st.just("restart")),
    st.tuples(
        st.just("flow"),
        st.sampled_from(["chain", "group"]),
        st.lists(_ID, min_size=1, max_size=3),
        st.one_of(st.none(), _ID),
    ),
    st.tuples(st.just("advance"), st.sampled_from([1.0, 30.0, 120.0])),
)


def _request(broker: InProcessBroker, op: tuple[Any, ...]) -> Any:
    """The client request ``op`` names, or None for ``status`` (see _drive)."""
    kind, args, req = op[0], op[1:], broker.next_req()
    if kind == "enqueue":
        return p.Enqueue(req, [p.JobSpec(args[0], "t.task", priority=args[1], queue=args[2])])
    if kind == "list":
        queue, status, limit, newest, cursor = args
        return p.ListJobs(req, queue, status, None, limit, str(cursor), newest=newest)
    simple = {"get": p.GetJob, "cancel": p.Cancel, "delete": p.Delete, "retry": p.RetryJobs}
    if kind in simple:
        return simple[kind](req, args[0])
    if kind == "purge":
        return p.Purge(req, args[0])
    if kind == "flow":
        flow_kind, ids, callback = args
        steps = [p.JobSpec(job_id, "t.task") for job_id in ids]
        last = p.JobSpec(callback, "t.task") if callback is not None else None
        return p.EnqueueFlow(req, f"flow-{req}", flow_kind, steps, last)
    return None


def _drive(state_dir: Path, ops: list[tuple[Any, ...]], tasks: tuple[p.TaskInfo, ...]) -> list[Any]:
    """Run ``ops`` against a broker on ``state_dir`` (one worker of
    ``tasks`` taking jobs as told; ``restart``: kill -9 and start again);
    what each answered."""
    got: list[Any] = []
    broker = restarted(state_dir)
    worker = FakeWorker(broker, credit=2, queues=tuple(QUEUES), tasks=tasks)
    held = worker.ready()
    for op in ops:
        if op[0] == "restart":
            broker.crash()
            broker = restarted(state_dir)
            got.append(broker.core.state.jobs.cold is None)
            worker = FakeWorker(broker, credit=2, queues=tuple(QUEUES), tasks=tasks)
            held = worker.ready()
        elif op[0] == "work":
            taken = []
            for _ in range(op[1]):
                held += deliveries(worker.inbox())
                if not held:
                    break
                d = held.pop(0)
                worker.start(d)
                held += deliveries(worker.finish(d))
                taken.append(d.job_id)
            got.append(taken)
        elif op[0] == "advance":
            broker.advance(op[1], step=op[1])
        elif op[0] == "pause":  # (a pause waits for the worker's buffer: no reply now)
            pause = p.Pause(broker.next_req(), op[1], op[2])
            broker.run_pass((CLIENT, [b"pauser", p.encode(pause)]))
        elif op[0] == "status":
            status = broker.request(p.GetStatus(broker.next_req())).status
            got.append((status.queues, sorted(status.paused)))
        else:
            got.append(msgspec.structs.replace(broker.request(_request(broker, op)), req=0))
    broker.crash()
    return got


@settings(
    max_examples=int(os.environ.get("CORRAL_COLD_EXAMPLES", "6")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    ops=st.lists(_OPS, min_size=1, max_size=25),
    rich=st.booleans(),
    limits=st.sampled_from([{}, {"concurrency": 1}, {"key_concurrency": 1, "rate": "3/s"}]),
)
def test_a_broker_on_cold_jobs_answers_as_one_on_a_full_replay(
    tmp_path_factory: pytest.TempPathFactory,
    ops: list[tuple[Any, ...]],
    rich: bool,
    limits: dict[str, Any],
) -> None:
    """The same requests, worker reports, clock and restarts, to a broker
    whose jobs are cold and one with no checkpoint: the same answers (with
    the task's limits as its worker declares them, if any)."""
    tasks = (p.TaskInfo("t.task", **limits),)
    root = tmp_path_factory.mktemp("cold")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(core, "WARM_PER_PASS", 0)  # none warmed but by what the requests need
        state_dir = rich_checkpointed(root) if rich else checkpointed(root)[0]
        shutil.copytree(state_dir, root / "copy")
        for ckpt in (root / "copy" / "log").glob("*.ckpt"):
            ckpt.unlink()
        cold, warm = _drive(state_dir, ops, tasks), _drive(root / "copy", ops, tasks)
    answered = [op for op in ops if op[0] not in ("pause", "advance")]
    for i, (a, b) in enumerate(zip(cold, warm, strict=True)):
        if answered[i][0] == "restart":  # the one may start on cold jobs, never the other
            assert b, "a broker with no checkpoint started on cold jobs"
            continue
        assert a == b, (i, answered[i])
    shutil.rmtree(root, ignore_errors=True)


def test_retrying_every_failed_job_warms_no_cold_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``corral retry --all-failed`` reads the failed jobs only: a cold job
    is queued, never failed, so it warms none (a million cold jobs would
    otherwise all be decoded in the one pass)."""
    monkeypatch.setattr(core, "WARM_PER_PASS", 0)
    state_dir = rich_checkpointed(tmp_path)
    broker = restarted(state_dir)
    cold = broker.core.state.jobs.cold
    assert cold is not None
    before = cold.count
    reply = broker.request(p.RetryJobs(broker.next_req(), all_failed=True, queue="other"))
    assert isinstance(reply, p.Ack) and sorted(reply.ids) == [f"f-{i}" for i in range(5)]
    assert broker.core.state.jobs.cold is cold and cold.count == before
    broker.crash()


def test_a_compaction_due_at_the_restart_waits_for_the_cold_jobs_then_keeps_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restart on a checkpoint whose log is due for compaction at once:
    none starts while a batch is cold (it would replace the base they are
    read from); once all are warm it runs, and a restart after it has
    every job, with the new base's checkpoint."""
    extra = SMALL_LOG + '\ncompact_min_size = "64KiB"'
    broker = InProcessBroker(tmp_path / "s", extra=extra, fsync="never")
    ids = enqueue_many(broker, "a", 600)
    compact_now(broker)
    gone = enqueue_many(broker, "g", 1500, queue="other")  # a tail past twice the live jobs
    gone += enqueue_many(broker, "h", 1500, queue="other")
    for job_id in gone:
        broker.request(p.Cancel(broker.next_req(), job_id))
        broker.request(p.Delete(broker.next_req(), job_id))
    broker.crash()
    monkeypatch.setattr(core, "WARM_PER_PASS", 0)
    broker = InProcessBroker(tmp_path / "s", extra=extra)
    assert broker.core.state.jobs.cold is not None
    log, state = broker.core.log, broker.core.state
    assert log.bytes_since_compaction > 2 * state.live_bytes  # due
    for _ in range(5):
        broker.run_pass()
    assert broker.core.compactor.child is None and broker.core.stats["compactions"] == 0
    monkeypatch.setattr(core, "WARM_PER_PASS", 1)
    until_compacted(broker)
    assert broker.core.state.jobs.cold is None
    broker.crash()
    broker = InProcessBroker(tmp_path / "s", extra=extra)
    assert broker.core.state.jobs.cold is not None  # the new base's checkpoint
    assert len(broker.core.state.jobs) == len(ids)
    assert sorted(dict.fromkeys(broker.core.state.jobs)) == sorted(ids)
    broker.crash()
