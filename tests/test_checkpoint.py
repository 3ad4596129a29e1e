"""The restart checkpoint and segment indexes (broker/checkpoint.py,
broker/segindex.py, broker/coldjobs.py): a restart from a compacted base
with its checkpoint, or from sealed segments with their indexes, gives
exactly the state a full replay gives, and a checkpoint that cannot be
trusted is ignored (indexes: see tests/test_segindex.py)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from compacting import snapshot_of
from conftest import wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inproc import SMALL_LOG, FakeWorker, InProcessBroker, decoded

from corral.broker import core
from corral.broker import protocol as p
from corral.broker.checkpoint import ckpt_path
from corral.broker.compaction import remove_segments
from corral.broker.compactor import rewrite
from corral.broker.core import CLIENT
from corral.broker.log import Log
from corral.broker.state import JobState, checkpoint_frames


def compact_now(broker: InProcessBroker) -> None:
    """A compaction of the live broker's log, in-process: the cut, the
    child's :func:`rewrite` (which writes the checkpoint), the install."""
    log = broker.core.log
    log.commit(broker.clock.monotonic(), durable=True)
    cut = log.seal(time.monotonic())
    rewrite(cut, broker.core.compactor.defaults)
    remove_segments(log.install(cut))


def replay(
    src: Path, scratch: Path, name: str, *, checkpoint: bool, indexes: bool | None = None
) -> JobState:
    """The state a restart on a copy of log directory ``src`` replays,
    with its checkpoint or without (removed from the copy), and with its
    segment indexes or without (by default: as the checkpoint)."""
    copy = scratch / name
    shutil.rmtree(copy, ignore_errors=True)
    copy.mkdir(parents=True)
    for path in src.iterdir():
        with contextlib.suppress(FileNotFoundError):  # a stale segment removed meanwhile
            shutil.copy2(path, copy / path.name)  # (with its mtime, as a checkpoint wants)
    if not checkpoint:
        for ckpt in copy.glob("*.ckpt"):
            ckpt.unlink()
    if not (checkpoint if indexes is None else indexes):
        for index in copy.glob("*.idx"):
            index.unlink()
    state = JobState()
    log = Log(copy, fsync="never", segment_size=1 << 20, reserve=16 << 10)
    for record in log.replay(partial(checkpoint_frames, state)):
        state.apply(record)
    log.close()
    return state


def ready_order(state: JobState, queues: list[str]) -> list[list[str]]:
    """Every ready job of each queue, in the order dispatch takes them."""
    out = []
    for queue in queues:
        taken = []
        while (job := state.pop_ready(queue)) is not None:
            taken.append(job.id)
        out.append(taken)
    return out


def assert_same(warm: JobState, cold: JobState, ids: list[str], queues: list[str]) -> None:
    """``cold`` (a replay with the checkpoint) is ``warm`` (one without)."""
    assert len(cold.jobs) == len(warm.jobs)
    assert cold.counts == warm.counts
    assert cold.reserved == warm.reserved
    assert cold.live_bytes == warm.live_bytes
    assert cold.next_seq == warm.next_seq
    assert cold.largest_blob == warm.largest_blob
    for job_id in ids:  # lookups by id (each may warm a batch)
        assert (job_id in cold.jobs) == (job_id in warm.jobs), job_id
        a, b = cold.jobs.get(job_id), warm.jobs.get(job_id)
        assert (a is None) == (b is None)
        if a is not None and b is not None:
            assert (a.status, a.seq, a.priority) == (b.status, b.seq, b.priority)
    assert snapshot_of(cold) == snapshot_of(warm)
    assert ready_order(cold, queues) == ready_order(warm, queues)
    assert cold.jobs.cold is None


QUEUES = ["default", "other"]


def enqueue_many(
    broker: InProcessBroker, prefix: str, n: int, *, pad: str = "", **options: Any
) -> list[str]:
    """Enqueue ``n`` jobs ``prefix-0``...; each one's payload is its number
    (with ``pad``, the pair of both)."""
    specs = [
        p.JobSpec(f"{prefix}-{i}", "t.task", p.encode_value([i, pad] if pad else i), **options)
        for i in range(n)
    ]
    step = 200 if pad else n  # (requests of padded jobs stay under TINY_LOG's message size)
    for at in range(0, n, step):
        reply = broker.request(p.Enqueue(broker.next_req(), specs[at : at + step]))
        assert isinstance(reply, p.EnqueueOk), reply
    return [spec.id for spec in specs]


def test_a_cold_restart_is_a_full_replay(tmp_path: Path) -> None:
    broker = InProcessBroker(tmp_path / "s", extra=SMALL_LOG)
    ids = enqueue_many(broker, "a", 1500)
    ids += enqueue_many(broker, "hi", 700, priority=5)
    ids += enqueue_many(broker, "o", 600, queue="other")
    compact_now(broker)
    log_dir = tmp_path / "s" / "log"
    assert ckpt_path(log_dir, broker.core.log._base).exists()
    ids += enqueue_many(broker, "b", 10)
    broker.crash()
    warm = replay(log_dir, tmp_path, "warm", checkpoint=False)
    cold = replay(log_dir, tmp_path, "cold", checkpoint=True)
    assert cold.jobs.cold is not None and cold.jobs.cold.count == 2800
    assert len(dict.values(cold.jobs)) == 10  # only the tail's jobs were made
    assert_same(warm, cold, [*ids, "nope"], QUEUES)


# -- random histories ---------------------------------------------------------

_kinds = st.sampled_from(["ok", "error", "fail", "retry", "interrupted"])
OPS = st.one_of(
    st.tuples(
        st.just("enqueue"),
        st.integers(1, 700),
        st.sampled_from(QUEUES),
        st.sampled_from([0, 0, 3, -2]),
        st.sampled_from([None, None, 30.0]),  # delay
        st.sampled_from([None, None, 50.0]),  # expires
    ),
    st.tuples(st.just("work"), st.integers(1, 8), st.lists(_kinds, min_size=1, max_size=8)),
    st.tuples(st.just("cancel"), st.integers(0, 10**6)),
    st.tuples(st.just("delete"), st.integers(0, 10**6)),
    st.tuples(st.just("requeue"), st.integers(0, 10**6)),
    st.tuples(st.just("chain"), st.integers(1, 3)),
    st.tuples(st.just("advance"), st.sampled_from([1.0, 20.0, 100.0])),
    st.tuples(st.just("pause"), st.sampled_from(QUEUES), st.booleans()),
)


class History:
    """Drives an in-process broker through a generated history."""

    def __init__(self, broker: InProcessBroker) -> None:
        self.broker = broker
        self.ids: list[str] = []
        self.worker: FakeWorker | None = None
        self.held: list[p.Delivery] = []
        self.n = 0

    def run(self, op: tuple[Any, ...]) -> None:
        b = self.broker
        kind = op[0]
        if kind == "enqueue":
            _, count, queue, priority, delay, expires = op
            self.n += 1
            self.ids += enqueue_many(
                b,
                f"e{self.n}",
                count,
                pad=PAD,
                queue=queue,
                priority=priority,
                delay=delay,
                expires=expires,
            )
        elif kind == "work":
            if self.worker is None:
                self.worker = FakeWorker(b, credit=op[1], queues=tuple(QUEUES))
                self.held += self.worker.ready()
            for outcome in op[2]:
                if not self.held:
                    self.held += self.worker.ready()
                if not self.held:
                    break
                d = self.held.pop(0)
                self.worker.start(d)
                delay = 5.0 if outcome == "retry" else None
                error = None if outcome in ("ok", "retry", "interrupted") else p.ErrorInfo("E", "x")
                msgs = self.worker.send(
                    p.Report([], [p.Outcome(d.job_id, d.lease, outcome, error=error, delay=delay)])
                )
                self.held += [x for m in msgs if isinstance(m, p.Deliver) for x in m.jobs]
        elif kind in ("cancel", "delete", "requeue") and self.ids:
            job_id = self.ids[op[1] % len(self.ids)]
            msg = {"cancel": p.Cancel, "delete": p.Delete}.get(kind)
            if msg is not None:
                b.request(msg(b.next_req(), job_id))
            else:
                b.request(p.RetryJobs(b.next_req(), job_id))
        elif kind == "chain":
            self.n += 1
            steps = [p.JobSpec(f"c{self.n}-{i}", "t.step") for i in range(op[1])]
            b.request(p.EnqueueFlow(b.next_req(), f"chain-{self.n}", "chain", steps))
            self.ids += [s.id for s in steps]
        elif kind == "advance":
            b.advance(op[1], step=op[1])
        elif kind == "pause":
            # (a pause waits for the worker to give back what it holds: no reply yet)
            b.run_pass((CLIENT, [b"client-1", p.encode(p.Pause(b.next_req(), op[1], op[2]))]))


_HISTORIES = {
    "deadline": None,
    "report_multiple_bugs": False,
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
}
_BEFORE = st.lists(OPS, min_size=1, max_size=8)
_AFTER = st.lists(OPS, max_size=8)


#: Segments of 64 KiB: a history of a few thousand jobs of PAD spans several.
PAD = "x" * 150
TINY_LOG = 'segment_size = "64KiB"\ndisk_reserve = "4KiB"\nmax_message_size = "60KiB"'


def check_history(
    tmp_path: Path,
    before: list[tuple[Any, ...]],
    after: list[tuple[Any, ...]],
    *,
    compact: bool = True,
) -> None:
    """A history over several sealed segments (each indexed as it is
    sealed), maybe a compaction (with its checkpoint) part way, more
    history, a crash: a replay with the indexes and the checkpoint, and one
    with the indexes alone, are a replay with neither."""
    root = tmp_path / f"h{time.monotonic_ns()}"
    broker = InProcessBroker(root / "s", extra=TINY_LOG, fsync="never")
    history = History(broker)
    history.ids += enqueue_many(broker, "base", 600, pad=PAD)  # at least one cold batch
    for op in before:
        history.run(op)
    if compact:
        compact_now(broker)
    for op in after:
        history.run(op)
    broker.crash()
    log_dir = root / "s" / "log"
    if not compact:
        assert not list(log_dir.glob("*.ckpt"))
    warm = replay(log_dir, root, "warm", checkpoint=False)
    cold = replay(log_dir, root, "cold", checkpoint=True)
    indexed = replay(log_dir, root, "indexed", checkpoint=False, indexes=True)
    for state in (warm, cold, indexed):  # as the broker's first tick would
        state.promote_due(broker.clock.time())
    assert_same(warm, cold, history.ids, QUEUES)
    warm = replay(log_dir, root, "warm", checkpoint=False)
    warm.promote_due(broker.clock.time())
    assert_same(warm, indexed, history.ids, QUEUES)
    shutil.rmtree(root, ignore_errors=True)


@settings(max_examples=int(os.environ.get("CORRAL_CHECKPOINT_EXAMPLES", "10")), **_HISTORIES)
@given(before=_BEFORE, after=_AFTER, compact=st.booleans())
def test_random_histories_replay_the_same_with_a_checkpoint(
    tmp_path: Path, before: list[tuple[Any, ...]], after: list[tuple[Any, ...]], compact: bool
) -> None:
    check_history(tmp_path, before, after, compact=compact)


@pytest.mark.soak
@settings(max_examples=300, **_HISTORIES)
@given(before=_BEFORE, after=_AFTER, compact=st.booleans())
def test_random_histories_at_length(
    tmp_path: Path, before: list[tuple[Any, ...]], after: list[tuple[Any, ...]], compact: bool
) -> None:
    """The same, at length (``make soak``)."""
    check_history(tmp_path, before, after, compact=compact)


# -- the broker on a checkpoint -----------------------------------------------


def checkpointed(root: Path) -> tuple[Path, list[str]]:
    """A crashed broker's state dir whose log has a base with a checkpoint
    (jobs of two priorities and two queues) and a tail; returns it and the ids."""
    broker = InProcessBroker(root / "s", extra=SMALL_LOG)
    ids = enqueue_many(broker, "a", 1200)
    ids += enqueue_many(broker, "hi", 300, priority=5)
    ids += enqueue_many(broker, "o", 100, queue="other")
    compact_now(broker)
    ids += enqueue_many(broker, "b", 5)
    broker.crash()
    return root / "s", ids


def restarted(state_dir: Path, *, checkpoint: bool = True) -> InProcessBroker:
    if not checkpoint:
        for index in [*(state_dir / "log").glob("*.ckpt"), *(state_dir / "log").glob("*.idx")]:
            index.unlink()
    return InProcessBroker(state_dir, extra=SMALL_LOG)


def test_cold_jobs_are_dispatched_in_order(tmp_path: Path) -> None:
    state_dir, _ = checkpointed(tmp_path)
    shutil.copytree(state_dir, tmp_path / "copy")
    orders = []
    for broker in (restarted(state_dir), restarted(tmp_path / "copy", checkpoint=False)):
        if broker.state_dir == state_dir:
            assert broker.core.state.jobs.cold is not None  # the restart left them cold
        worker = FakeWorker(broker, credit=40)
        got = [d.job_id for d in worker.ready()]
        orders.append(got)
        broker.crash()
    assert orders[0] == orders[1]
    assert orders[0][:3] == ["hi-0", "hi-1", "hi-2"]  # priority first, then creation order


def test_an_enqueue_with_a_cold_jobs_id_is_no_new_job(tmp_path: Path) -> None:
    state_dir, _ = checkpointed(tmp_path)
    broker = restarted(state_dir)
    state = broker.core.state
    assert state.jobs.cold is not None
    assert not dict.__contains__(state.jobs, "a-700")  # cold
    jobs = len(state.jobs)
    spec = p.JobSpec("a-700", "t.task", p.encode_value("another payload"))
    reply = broker.request(p.Enqueue(broker.next_req(), [spec]))
    assert isinstance(reply, p.EnqueueOk) and reply.ids == ["a-700"]
    assert len(state.jobs) == jobs
    info = broker.job("a-700")
    assert info is not None and info.status == "queued"
    held = state.jobs["a-700"].created.payload
    assert decoded(held) == 700  # the job the log holds, not the resent one
    broker.crash()


def test_the_broker_warms_cold_jobs_in_the_background(tmp_path: Path) -> None:
    state_dir, ids = checkpointed(tmp_path)
    broker = restarted(state_dir)
    assert broker.core.poll_timeout() == 0.0  # more to do at once
    for _ in range(100):
        if broker.core.state.jobs.cold is None:
            break
        broker.run_pass()
    assert broker.core.state.jobs.cold is None
    assert len(dict.values(broker.core.state.jobs)) == len(ids)
    broker.crash()


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x10
    elif how == "torn":
        del data[len(data) // 3 :]
    elif how == "empty":
        del data[:]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["flip", "torn", "empty", "stale", "tmp", "base-edited"])
def test_a_damaged_or_stale_checkpoint_is_ignored(tmp_path: Path, how: str) -> None:
    state_dir, ids = checkpointed(tmp_path)
    log_dir = state_dir / "log"
    (ckpt,) = log_dir.glob("*.ckpt")
    if how == "stale":  # a checkpoint of another base: the log was compacted again
        broker = restarted(state_dir)
        compact_now(broker)
        broker.crash()
        newer = max(log_dir.glob("*.ckpt"))
        assert newer != ckpt
        old = ckpt.read_bytes()
        newer.write_bytes(old)  # an older base's checkpoint under the new base's name
    elif how == "base-edited":  # e.g. repaired in place: same size, a new mtime
        base = ckpt.with_suffix(".seg")
        st = base.stat()
        os.utime(base, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    elif how == "tmp":  # a write cut short: the tmp file stays, no checkpoint
        ckpt.rename(ckpt.with_name(ckpt.name + ".123.tmp"))
        damage(ckpt.with_name(ckpt.name + ".123.tmp"), "torn")
    else:
        damage(ckpt, how)
    warm = replay(log_dir, tmp_path, "warm", checkpoint=False)
    cold = replay(log_dir, tmp_path, "cold", checkpoint=True)
    assert cold.jobs.cold is None  # nothing taken from it
    assert_same(warm, cold, ids, QUEUES)


def test_a_checkpoint_that_misplaces_a_batch_costs_only_that_batch(tmp_path: Path) -> None:
    """A valid checkpoint whose batch is not where it says (a bug, never the
    log's truth): that frame is decoded as usual."""
    from corral.broker import checkpoint
    from corral.broker.framing import read_header

    state_dir, ids = checkpointed(tmp_path)
    log_dir = state_dir / "log"
    (ckpt,) = log_dir.glob("*.ckpt")
    seq = int(ckpt.name.split(".")[0])
    base = log_dir / f"{seq:020d}.seg"
    header = read_header(base)
    loaded = checkpoint.load(log_dir, header.generation, seq, base)
    assert loaded is not None and len(loaded.batches) >= 3
    moved = list(loaded.batches)
    moved[1] = checkpoint.ColdBatch(*[getattr(moved[1], f) for f in moved[1].__struct_fields__])
    moved[1].offset += 1
    ids_of: list[list[str]] = [[] for _ in moved]
    warm = replay(log_dir, tmp_path, "warm0", checkpoint=False)
    for job_id in ids:
        job = dict.get(warm.jobs, job_id)
        for i, b in enumerate(moved):
            if job is not None and job.pristine and b.first_seq <= job.seq <= b.last_seq:
                ids_of[i].append(job_id)
    checkpoint.write(log_dir, header.generation, seq, base, list(zip(moved, ids_of, strict=True)))
    cold = replay(log_dir, tmp_path, "cold", checkpoint=True)
    assert cold.jobs.cold is not None and cold.jobs.cold.count == 1600 - moved[1].count
    warm = replay(log_dir, tmp_path, "warm", checkpoint=False)
    assert_same(warm, cold, ids, QUEUES)


@pytest.mark.parametrize("delay", [0.0, 0.3, None])
def test_a_broker_killed_while_its_compaction_writes_restarts_the_same(
    tmp_path: Path, delay: float | None
) -> None:
    """The compaction child (it writes the base, then the checkpoint) is
    SIGKILLed with the broker at some point of its work (None: it finished
    and the broker installed its base); the restart, with whatever
    checkpoint is there, gives the state a full replay gives."""
    broker = InProcessBroker(tmp_path / "s", extra=SMALL_LOG)
    ids = enqueue_many(broker, "a", 1500)
    compact_now(broker)  # a checkpoint of the first base, stale once the second is in
    ids += enqueue_many(broker, "b", 1500, priority=2)
    compactor = broker.core.compactor
    assert compactor.start(broker.clock.monotonic())
    child = compactor.child
    assert child is not None
    if delay is None:
        wait_for(lambda: compactor.poll(broker.clock.monotonic()) is not None, timeout=60)
    else:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(delay)
    broker.crash()  # kills the child, if it still runs
    log_dir = tmp_path / "s" / "log"
    warm = replay(log_dir, tmp_path, "warm", checkpoint=False)
    cold = replay(log_dir, tmp_path, "cold", checkpoint=True)
    if delay is None:
        assert cold.jobs.cold is not None
    assert_same(warm, cold, ids, QUEUES)
    broker = restarted(tmp_path / "s")  # and the broker itself starts on it
    assert len(broker.core.state.jobs) == len(ids)
    broker.crash()


def test_clients_see_cold_jobs_as_any_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Status counts, a job by id, a page of the listing, a cancel and a
    purge, asked of a broker whose jobs are cold, answer as a full replay's."""
    monkeypatch.setattr(core, "WARM_PER_PASS", 0)  # none warmed but by the requests
    state_dir, _ = checkpointed(tmp_path)
    shutil.copytree(state_dir, tmp_path / "copy")
    answers = []
    for broker in (restarted(state_dir), restarted(tmp_path / "copy", checkpoint=False)):
        cold = broker.core.state.jobs.cold is not None
        got: list[Any] = []
        status = broker.request(p.GetStatus(broker.next_req()))
        got.append(status.status.queues)  # (it warms the lanes' fronts: their age)
        if broker.state_dir == state_dir:
            assert broker.core.state.jobs.cold is not None  # a-1000 is cold
        got.append(broker.job("a-1000"))
        page = broker.request(p.ListJobs(broker.next_req(), queue="default", limit=5))
        got.append([job.id for job in page.jobs])
        page = broker.request(p.ListJobs(broker.next_req(), limit=3, newest=True))
        got.append([job.id for job in page.jobs])
        got.append(broker.request(p.Cancel(broker.next_req(), "a-1100")))
        got.append(broker.request(p.Purge(broker.next_req(), "other")))
        got.append(broker.request(p.GetStatus(broker.next_req())).status.queues)
        answers.append(got)
        if broker.state_dir == state_dir:
            assert cold  # the first request found them cold
        broker.crash()
    assert answers[0] == answers[1]
