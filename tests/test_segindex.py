"""Segment indexes (broker/segindex.py): a restart of a log that was never
compacted leaves the batches of its sealed segments cold and gives exactly
the state a full replay gives; an index that cannot be trusted (damaged,
torn, stale, half written, of a replaced or repaired segment) is ignored;
and nothing that walks jobs while they are cold (a purge, a clock step,
the start-up payload check) warms batches it does not need."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
from conftest import Env, log_events, wait_for
from inproc import SMALL_LOG, FakeWorker, InProcessBroker
from test_checkpoint import (
    PAD,
    QUEUES,
    TINY_LOG,
    assert_same,
    compact_now,
    damage,
    enqueue_many,
    replay,
)

import corral
from corral.broker import core, logtools, segindex
from corral.broker import protocol as p
from corral.broker.checkpoint import idx_path
from corral.broker.framing import list_segments
from corral.errors import ConfigError


def sealed(log_dir: Path) -> list[int]:
    """The sealed segments of a log (all but the last)."""
    return [seq for seq, _ in list_segments(log_dir)[:-1]]


def indexed_log(root: Path) -> tuple[Path, list[str]]:
    """A crashed broker's state dir whose log was never compacted: padded
    jobs of two queues and two priorities over several sealed segments,
    each indexed as it was sealed, and some jobs that lived."""
    broker = InProcessBroker(root / "s", extra=TINY_LOG, fsync="never")
    ids = enqueue_many(broker, "a", 1000, pad=PAD)
    ids += enqueue_many(broker, "hi", 400, pad=PAD, priority=5)
    ids += enqueue_many(broker, "o", 400, pad=PAD, queue="other")
    worker = FakeWorker(broker, credit=3)
    held = worker.ready()
    worker.start(held[0])
    ids += enqueue_many(broker, "b", 200, pad=PAD)
    broker.request(p.Cancel(broker.next_req(), "a-500"))
    broker.crash()
    log_dir = root / "s" / "log"
    assert len(sealed(log_dir)) >= 4
    for seq in sealed(log_dir):
        assert idx_path(log_dir, seq).exists(), seq
    return root / "s", ids


def unindexed_copy(state_dir: Path, copy: Path) -> None:
    """Copy ``state_dir`` to ``copy`` without its segment indexes (a restart
    there replays every segment in full)."""
    shutil.copytree(state_dir, copy)
    for index in (copy / "log").glob("*.idx"):
        index.unlink()


def indexed(broker: InProcessBroker) -> None:
    """Run passes until the broker's indexing child is done."""

    def done() -> bool:
        broker.run_pass()
        return not broker.core.indexer.busy

    wait_for(done, timeout=120, message="the indexing child to finish")


def test_a_never_compacted_log_restarts_with_its_sealed_segments_cold(tmp_path: Path) -> None:
    state_dir, ids = indexed_log(tmp_path)
    log_dir = state_dir / "log"
    assert not list(log_dir.glob("*.ckpt"))
    warm = replay(log_dir, tmp_path, "warm", checkpoint=False)
    cold = replay(log_dir, tmp_path, "cold", checkpoint=True)
    assert cold.jobs.cold is not None and cold.jobs.cold.count > 1000
    assert_same(warm, cold, [*ids, "nope"], QUEUES)


def test_the_broker_serves_cold_jobs_of_sealed_segments_as_any_others(tmp_path: Path) -> None:
    state_dir, _ = indexed_log(tmp_path)
    unindexed_copy(state_dir, tmp_path / "copy")
    answers = []
    for at in (state_dir, tmp_path / "copy"):
        broker = InProcessBroker(at, extra=TINY_LOG)
        assert (broker.core.state.jobs.cold is not None) == (at == state_dir)
        got: list[object] = [broker.job("a-300"), broker.job("o-399")]
        got.append(broker.request(p.GetStatus(broker.next_req())).status.queues)
        worker = FakeWorker(broker, credit=30, identity=b"w2")
        got.append([d.job_id for d in worker.ready()])
        answers.append(got)
        broker.crash()
    assert answers[0] == answers[1]
    # the copy's restart indexed its sealed segments again (after its first answers)
    copy = InProcessBroker(tmp_path / "copy", extra=TINY_LOG)
    copy.core._replayed_at -= core.INDEX_AFTER
    copy.run_pass()
    log_dir = tmp_path / "copy" / "log"
    for seq in sealed(log_dir)[:-1]:  # (the last was sealed by this very restart's roll)
        assert idx_path(log_dir, seq).exists(), seq
    copy.crash()


@pytest.mark.parametrize("how", ["flip", "torn", "empty", "stale", "tmp", "segment-edited"])
def test_a_damaged_or_stale_index_is_ignored(tmp_path: Path, how: str) -> None:
    state_dir, ids = indexed_log(tmp_path)
    log_dir = state_dir / "log"
    seqs = sealed(log_dir)
    target = idx_path(log_dir, seqs[1])
    full = replay(log_dir, tmp_path, "full", checkpoint=True)
    assert full.jobs.cold is not None
    everything = full.jobs.cold.count
    if how == "stale":  # another segment's index under this one's name
        shutil.copy2(idx_path(log_dir, seqs[2]), target)
    elif how == "tmp":  # a write cut short: the tmp file stays, no index
        target.rename(target.with_name(target.name + ".123.tmp"))
        damage(target.with_name(target.name + ".123.tmp"), "torn")
    elif how == "segment-edited":  # e.g. rewritten in place: a new mtime
        seg = log_dir / f"{seqs[1]:020d}.seg"
        st = seg.stat()
        os.utime(seg, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    else:
        damage(target, how)
    warm = replay(log_dir, tmp_path, "warm", checkpoint=False)
    cold = replay(log_dir, tmp_path, "cold", checkpoint=True)
    assert cold.jobs.cold is not None and 0 < cold.jobs.cold.count < everything
    assert_same(warm, cold, ids, QUEUES)


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.2, None])
def test_an_indexer_killed_while_it_writes_leaves_no_index_trusted(
    tmp_path: Path, delay: float | None
) -> None:
    """The indexing child (the one a large sealed segment gets) is
    SIGKILLed at some point of its work (None: it finished); the restart,
    with whatever index is there, gives the state a full replay gives."""
    state_dir, ids = indexed_log(tmp_path)
    log_dir = state_dir / "log"
    for index in log_dir.glob("*.idx"):
        index.unlink()
    order = segindex.Order([str(log_dir / f"{seq:020d}.seg") for seq in sealed(log_dir)])
    child = subprocess.Popen(
        [sys.executable, "-m", "corral.broker.segindex", msgspec.json.encode(order)]
    )
    try:
        if delay is None:
            assert child.wait(60) == 0
            assert all(idx_path(log_dir, seq).exists() for seq in sealed(log_dir))
        else:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(delay)
    finally:
        child.kill()
        child.wait()
    warm = replay(log_dir, tmp_path, "warm", checkpoint=False)
    cold = replay(log_dir, tmp_path, "cold", checkpoint=True)
    if delay is None:
        assert cold.jobs.cold is not None
    assert_same(warm, cold, ids, QUEUES)
    broker = InProcessBroker(state_dir, extra=TINY_LOG)  # and the broker itself starts on it
    assert len(broker.core.state.jobs) == len(dict.values(warm.jobs))
    assert not list(log_dir.glob("*.tmp"))  # a half-written index's file is gone
    broker.crash()


def test_the_broker_indexes_a_large_segment_in_a_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(segindex, "INLINE_MAX", 0)
    broker = InProcessBroker(tmp_path / "s", extra=TINY_LOG, fsync="never")
    enqueue_many(broker, "a", 800, pad=PAD)
    log_dir = tmp_path / "s" / "log"
    indexer = broker.core.indexer
    assert indexer.children >= 1 and indexer.inline == 0
    indexed(broker)
    assert all(idx_path(log_dir, seq).exists() for seq in sealed(log_dir))
    broker.close()


def test_compaction_and_repair_leave_no_index_of_a_replaced_segment(tmp_path: Path) -> None:
    state_dir, ids = indexed_log(tmp_path)
    log_dir = state_dir / "log"
    broker = InProcessBroker(state_dir, extra=TINY_LOG, fsync="never")
    broker.core.state.jobs.warm_all()  # (the broker compacts only once no job is cold)
    compact_now(broker)
    base = broker.core.log._base
    assert not [i for i in log_dir.glob("*.idx") if int(i.name.split(".")[0]) <= base]
    enqueue_many(broker, "c", 600, pad=PAD)
    broker.crash()
    assert list(log_dir.glob("*.idx"))  # the segments sealed since
    warm = replay(log_dir, tmp_path, "warm", checkpoint=False)
    cold = replay(log_dir, tmp_path, "cold", checkpoint=True)
    assert_same(warm, cold, ids, QUEUES)
    # a repair rewrites a damaged segment: the history after it changed
    seg = log_dir / f"{sealed(log_dir)[-1]:020d}.seg"
    data = bytearray(seg.read_bytes())
    data[len(data) // 2] ^= 0x10
    seg.write_bytes(bytes(data))
    logtools.repair(log_dir)
    assert not list(log_dir.glob("*.idx"))


def test_a_purge_warms_no_other_queue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A purge at 40,000 cold jobs of another queue costs the purged
    queue's jobs only, and removes exactly its queued jobs (those reserved
    in a worker's buffer included)."""
    monkeypatch.setattr(core, "WARM_PER_PASS", 0)  # none warmed but by the requests
    broker = InProcessBroker(tmp_path / "s", extra=SMALL_LOG, fsync="never")
    for at in range(0, 40_000, 10_000):
        specs = [p.JobSpec(f"x-{i}", "t.task", queue="other") for i in range(at, at + 10_000)]
        assert isinstance(broker.request(p.Enqueue(broker.next_req(), specs)), p.EnqueueOk)
    enqueue_many(broker, "p", 700, queue="purged")
    enqueue_many(broker, "x2", 10, queue="other")
    indexed(broker)
    broker.crash()
    broker = InProcessBroker(tmp_path / "s", extra=SMALL_LOG, fsync="never")
    state = broker.core.state
    assert state.jobs.cold is not None and state.jobs.cold.count >= 30_000
    worker = FakeWorker(broker, credit=4, queues=("purged",))
    held = worker.ready()
    assert len(held) == 4
    worker.start(held[0])  # running: not purged; the three reserved are
    before = state.jobs.cold.count
    reply = broker.request(p.Purge(broker.next_req(), "purged"))
    assert reply == p.Ack(reply.req, 699)
    assert state.jobs.cold is not None and state.jobs.cold.count == before
    left = [job_id for job_id in dict(state.counts) if job_id[0] == "purged"]
    assert left == [("purged", "t.task", "running")]
    assert state.counts["other", "t.task", "queued"] == 40_010
    broker.crash()


def test_a_clock_step_warms_no_cold_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(core, "WARM_PER_PASS", 0)  # none warmed in the background
    state_dir, _ = indexed_log(tmp_path)
    broker = InProcessBroker(state_dir, extra=TINY_LOG)
    enqueue_many(broker, "exp", 3, expires=600.0)
    state = broker.core.state
    assert state.jobs.cold is not None
    cold = state.jobs.cold.count
    deadline = state.expiring.next_due()
    broker.clock.jump(3600.0)
    broker.run_pass()
    assert broker.core.stats["clock_steps"] == 1
    assert state.jobs.cold is not None and state.jobs.cold.count == cold
    after = state.expiring.next_due()
    assert deadline is not None and after is not None and after == pytest.approx(deadline + 3600)
    broker.crash()


def test_a_filtered_listing_warms_only_batches_it_may_show(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(core, "WARM_PER_PASS", 0)
    state_dir, _ = indexed_log(tmp_path)
    unindexed_copy(state_dir, tmp_path / "copy")
    pages = []
    for at in (state_dir, tmp_path / "copy"):
        broker = InProcessBroker(at, extra=TINY_LOG)
        cold = broker.core.state.jobs.cold
        before = cold.count if cold is not None else 0
        got = []
        for filters in ({"status": "cancelled"}, {"status": "queued", "queue": "other"}):
            for newest in (False, True):
                page = broker.request(
                    p.ListJobs(broker.next_req(), limit=1000, newest=newest, **filters)
                )
                got.append([job.id for job in page.jobs])
        if cold is not None:  # only the batches of queue "other" were warmed
            assert before - cold.count == 400
        pages.append(got)
        broker.crash()
    assert pages[0] == pages[1]
    assert pages[0][0] == ["a-500"]


@pytest.mark.parametrize("limit", ["50KiB", "50B"])
def test_the_payload_check_warms_only_batches_that_may_be_over(
    tmp_path: Path, limit: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(core, "WARM_PER_PASS", 0)
    state_dir, _ = indexed_log(tmp_path)
    extra = f'{TINY_LOG}\nmax_payload = "{limit}"'
    if limit == "50B":  # every padded job is over it: the start is refused
        with pytest.raises(ConfigError, match="max_payload"):
            InProcessBroker(state_dir, extra=extra)
        return
    warmed = []
    for config in (TINY_LOG, extra):  # (the replay warms the batches its records name)
        broker = InProcessBroker(state_dir, extra=config)
        assert broker.core.state.jobs.cold is not None
        warmed.append(broker.core.state.jobs.cold.warmed)
        broker.crash()
    assert warmed[0] == warmed[1]


# -- a real broker --------------------------------------------------------------


def test_a_real_broker_restarts_on_its_indexed_segments(env: Env) -> None:
    """A broker with 1 MiB segments (each indexed by a child) is killed and
    started again: it answers with the same jobs, its sealed segments cold."""
    env.write_config(
        extra_broker='segment_size = "1MiB"\ndisk_reserve = "16KiB"\nmax_message_size = "512KiB"'
    )
    broker = env.start("broker")
    env.wait_ready(broker)
    client = env.client(timeout=30)
    for _ in range(12):
        client.enqueue_many([corral.Job("e2e.noop", bytes(300))] * 1000)
    log_dir = env.home / "state" / "log"
    segs = len(list_segments(log_dir))
    assert segs >= 4
    wait_for(
        lambda: all(idx_path(log_dir, s).exists() for s in sealed(log_dir)),
        timeout=60,
        message="the sealed segments' indexes",
    )
    status = client.status().queues
    os.killpg(broker.pid, 9)
    broker.wait(10)
    again = env.start("broker")
    env.wait_ready(again)
    assert client.status().queues == status
    wait_for(lambda: "cold_jobs" in again.output(), timeout=30)
    replayed = [e for e in log_events(again.output()) if e.get("event") == "broker.replayed"][-1]
    assert replayed["cold_jobs"] > 0, replayed
    assert client.purge("default") == 12_000


def test_a_segment_that_cannot_be_indexed_gets_no_index_and_stops_nothing(tmp_path: Path) -> None:
    state_dir, _ = indexed_log(tmp_path)
    log_dir = state_dir / "log"
    seq = sealed(log_dir)[0]
    seg = log_dir / f"{seq:020d}.seg"
    idx_path(log_dir, seq).unlink()
    data = bytearray(seg.read_bytes())
    data[len(data) // 2] ^= 0x10  # a bad frame: the replay, not the indexer, reports it
    seg.write_bytes(bytes(data))
    indexer = segindex.Indexer()
    indexer.want(seg, len(data))
    assert not idx_path(log_dir, seq).exists()
    garbage = log_dir / f"{seq + 100:020d}.seg"
    garbage.write_bytes(b"not a segment")  # a bad header: LogCorrupt, caught and logged
    indexer.want(garbage, 13)
    assert not idx_path(log_dir, seq + 100).exists()
    assert indexer.inline == 0


def test_a_segment_stays_readable_after_its_first_batches_warm_during_the_replay(
    tmp_path: Path,
) -> None:
    """A record between two batches of one sealed segment names a job of the
    first (a cancel): the replay warms that batch while no other is cold,
    and must still read the segment's later batches back (its file was
    closed as soon as nothing was cold, and the next batch then stopped the
    broker as damaged)."""
    broker = InProcessBroker(tmp_path / "s", extra=TINY_LOG, fsync="never")
    enqueue_many(broker, "a", 5, pad=PAD)
    broker.request(p.Cancel(broker.next_req(), "a-0"))
    ids = enqueue_many(broker, "b", 1000, pad=PAD)
    broker.crash()
    log_dir = tmp_path / "s" / "log"
    assert idx_path(log_dir, sealed(log_dir)[0]).exists()
    again = InProcessBroker(tmp_path / "s", extra=TINY_LOG)
    assert again.core.state.jobs.cold is not None
    for job_id in (ids[0], ids[500], ids[-1], "a-1"):
        job = again.job(job_id)
        assert job is not None and job.status == "queued", job_id
    again.advance(5)  # the rest is warmed, pass by pass
    assert again.core.state.jobs.cold is None
    assert again.job("a-0").status == "cancelled"
    again.close()
