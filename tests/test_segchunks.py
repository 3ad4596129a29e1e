"""Chunk indexes of the segment being written (broker/segindex.py): a
restart leaves the batches its valid chunks name cold and replays only the
rest, giving exactly the state a full replay gives; a chunk is built only
from bytes fdatasync'd first; one that cannot be trusted (damaged, torn,
of other bytes, of bytes since cut and written again, half written when
its builder was killed) is ignored; a torn-tail cut, a compaction, a
repair and the sealed segment's whole index each remove the chunks they
make stale. Index files are the owner's only (0600)."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import Env, log_events, wait_for
from inproc import SMALL_LOG, FakeWorker, InProcessBroker
from test_checkpoint import PAD, QUEUES, assert_same, compact_now, damage, enqueue_many, replay

import corral
from corral.broker import checkpoint, core, logtools, segindex
from corral.broker import protocol as p
from corral.broker.framing import HEADER_SIZE, Scan, list_segments, read_header
from corral.broker.log import Log
from corral.broker.records import JobsCreated


def active(log_dir: Path) -> tuple[int, Path]:
    """The log's last segment: the one being written."""
    return list_segments(log_dir)[-1]


def chunks(log_dir: Path) -> list[tuple[int, int, Path]]:
    seq, _ = active(log_dir)
    return checkpoint.chunks_of(log_dir, seq)


def until_idle(broker: InProcessBroker) -> None:
    """Run passes until the indexing child is done and nothing waits for it."""

    def done() -> bool:
        broker.run_pass()
        return not broker.core.indexer.busy

    wait_for(done, timeout=120, message="the indexing child to finish")


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk per 24 KiB written; none for idleness but where a test asks."""
    monkeypatch.setattr(segindex, "CHUNK_BYTES", 24 << 10)
    monkeypatch.setattr(segindex, "CHUNK_IDLE", 1e9)


def chunked_log(root: Path) -> tuple[Path, list[str]]:
    """A crashed broker's state dir whose only segment (1 MiB) is being
    written: padded jobs of two queues and two priorities, indexed by
    chunks as they were written, and some jobs that lived."""
    broker = InProcessBroker(root / "s", extra=SMALL_LOG, fsync="never")
    ids = enqueue_many(broker, "a", 800, pad=PAD)
    ids += enqueue_many(broker, "hi", 400, pad=PAD, priority=5)
    ids += enqueue_many(broker, "o", 400, pad=PAD, queue="other")
    worker = FakeWorker(broker, credit=3)
    held = worker.ready()
    worker.start(held[0])
    broker.request(p.Cancel(broker.next_req(), "a-500"))
    until_idle(broker)
    ids += enqueue_many(broker, "b", 30, pad=PAD)  # (a tail no chunk covers)
    broker.crash()
    log_dir = root / "s" / "log"
    assert len(list_segments(log_dir)) == 1
    assert len(chunks(log_dir)) >= 4
    return root / "s", ids


def test_the_segment_being_written_restarts_with_its_chunks_cold(
    tmp_path: Path, small_chunks: None
) -> None:
    state_dir, ids = chunked_log(tmp_path)
    log_dir = state_dir / "log"
    ends = [(start, end) for start, end, _ in chunks(log_dir)]
    assert ends[0][0] == HEADER_SIZE
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ends))  # back to back
    warm = replay(log_dir, tmp_path, "warm", checkpoint=False)
    cold = replay(log_dir, tmp_path, "cold", checkpoint=True)
    assert warm.jobs.cold is None
    assert cold.jobs.cold is not None and cold.jobs.cold.count > 1000
    assert_same(warm, cold, [*ids, "nope"], QUEUES)


def test_the_broker_serves_jobs_of_chunks_as_any_others(tmp_path: Path, small_chunks: None) -> None:
    state_dir, _ = chunked_log(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(state_dir, copy)
    for index in (copy / "log").glob("*.idx"):
        index.unlink()
    answers = []
    for at in (state_dir, copy):
        broker = InProcessBroker(at, extra=SMALL_LOG)
        assert (broker.core.state.jobs.cold is not None) == (at == state_dir)
        got: list[object] = [broker.job("a-300"), broker.job("o-399"), broker.job("b-29")]
        got.append(broker.request(p.GetStatus(broker.next_req())).status.queues)
        worker = FakeWorker(broker, credit=30, identity=b"w2")
        got.append([d.job_id for d in worker.ready()])
        answers.append(got)
        broker.crash()
    assert answers[0] == answers[1]


def test_a_restart_goes_on_chunking_from_where_the_chunks_end(
    tmp_path: Path, small_chunks: None
) -> None:
    state_dir, _ = chunked_log(tmp_path)
    log_dir = state_dir / "log"
    covered = max(end for _, end, _ in chunks(log_dir))
    broker = InProcessBroker(state_dir, extra=SMALL_LOG, fsync="never")
    enqueue_many(broker, "c", 300, pad=PAD)
    until_idle(broker)
    broker.crash()
    later = [(start, end) for start, end, _ in chunks(log_dir) if start >= covered]
    assert later and later[0][0] == covered  # not again from the segment's start


@pytest.mark.parametrize("how", ["flip", "torn", "empty", "tmp", "renamed", "other-log"])
def test_a_damaged_or_stale_chunk_is_ignored(tmp_path: Path, small_chunks: None, how: str) -> None:
    state_dir, ids = chunked_log(tmp_path)
    log_dir = state_dir / "log"
    _, _, target = chunks(log_dir)[1]
    full = replay(log_dir, tmp_path, "full", checkpoint=True)
    assert full.jobs.cold is not None
    everything = full.jobs.cold.count
    if how == "tmp":  # a write cut short: the tmp file stays, no chunk
        target.rename(target.with_name(target.name + ".123.tmp"))
        damage(target.with_name(target.name + ".123.tmp"), "torn")
    elif how == "renamed":  # a chunk under the name of other bytes
        start, end, _ = chunks(log_dir)[2]
        target.rename(checkpoint.chunk_path(log_dir, active(log_dir)[0], start + 1, end))
    elif how == "other-log":  # another log's chunk of the same segment and bytes
        other, _ = chunked_log(tmp_path / "other")
        start, end, _ = chunks(log_dir)[1]
        twin = checkpoint.chunk_path(other / "log", active(other / "log")[0], start, end)
        assert twin.exists()
        shutil.copy2(twin, target)
    else:
        damage(target, how)
    warm = replay(log_dir, tmp_path, "warm", checkpoint=False)
    cold = replay(log_dir, tmp_path, "cold", checkpoint=True)
    assert cold.jobs.cold is not None and 0 < cold.jobs.cold.count < everything
    assert_same(warm, cold, ids, QUEUES)


def test_a_chunk_of_bytes_lost_and_written_again_never_stands_for_them(
    tmp_path: Path, small_chunks: None
) -> None:
    """A chunk outlives the bytes it describes (a disk that lost what it
    had synced): the frames written again at the same offsets have the
    same lengths and types but other jobs. The replay compares each
    frame's CRC with the chunk's, and decodes them."""
    state_dir, _ = chunked_log(tmp_path)
    log_dir = state_dir / "log"
    seq, seg = active(log_dir)
    start, end, _ = chunks(log_dir)[2]
    header = read_header(seg)
    data = seg.read_bytes()
    lost = [record for record in Scan(seg, data, header.seed) if isinstance(record, JobsCreated)]
    scan = Scan(seg, data, header.seed)
    after: list[JobsCreated] = []
    for record in scan:  # the batches from the start of that chunk on
        if scan.pos > start and isinstance(record, JobsCreated):
            after.append(record)
    assert after and len(lost) > len(after)
    with open(seg, "r+b") as f:  # the bytes from `start` on are lost (zeros)
        f.seek(start)
        f.write(bytes(len(data) - start))
    log = Log(log_dir, fsync="never", segment_size=1 << 20, reserve=16 << 10)
    for _ in log.replay():
        pass
    assert log.written_position == (seg, start)
    again = []
    for record in after:  # the same shapes, other ids (of the same lengths)
        new_ids = [f"z{job_id[1:]}" for job_id in record.ids]
        again += new_ids
        log.append(msgspec.structs.replace(record, ids=new_ids))
    log.commit(0.0)
    log.close()
    # (the chunk still loads: it is whole, of this log and segment)
    assert checkpoint.load_chunk(header.generation, seq, seg, start, end, chunks(log_dir)[2][2])
    warm = replay(log_dir, tmp_path, "warm", checkpoint=False)
    cold = replay(log_dir, tmp_path, "cold", checkpoint=True)
    assert all(job_id in warm.jobs for job_id in again)
    assert_same(warm, cold, again, QUEUES)


def test_a_torn_tail_cut_removes_the_chunks_past_it(tmp_path: Path, small_chunks: None) -> None:
    state_dir, ids = chunked_log(tmp_path)
    log_dir = state_dir / "log"
    _, seg = active(log_dir)
    start, end, _ = chunks(log_dir)[-1]
    data = bytearray(seg.read_bytes())
    data[(start + end) // 2] ^= 0x10  # damage no sync mark covers (fsync=never): a torn tail
    seg.write_bytes(bytes(data))
    warm = replay(log_dir, tmp_path, "warm", checkpoint=False)
    broker = InProcessBroker(state_dir, extra=SMALL_LOG, fsync="never")
    assert broker.core.log.stats()["torn_tail_truncations"] == 1
    assert max(e for _, e, _ in chunks(log_dir)) <= start  # the last chunk is gone
    ids += enqueue_many(broker, "c", 300, pad=PAD)
    until_idle(broker)
    broker.crash()
    warm = replay(log_dir, tmp_path, "warm", checkpoint=False)
    cold = replay(log_dir, tmp_path, "cold", checkpoint=True)
    assert_same(warm, cold, ids, QUEUES)


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.2, None])
def test_a_chunk_builder_killed_while_it_writes_leaves_no_chunk_trusted(
    tmp_path: Path, small_chunks: None, delay: float | None
) -> None:
    """The indexing child is SIGKILLed at some point of building chunks
    (None: it finished); the restart gives the state a full replay gives."""
    state_dir, ids = chunked_log(tmp_path)
    log_dir = state_dir / "log"
    ranges = [(start, end) for start, end, _ in chunks(log_dir)]
    for _, _, path in chunks(log_dir):
        path.unlink()
    _, seg = active(log_dir)
    order = segindex.Order([], 0, [(str(seg), start, end) for start, end in ranges])
    child = subprocess.Popen(
        [sys.executable, "-m", "corral.broker.segindex", msgspec.json.encode(order)]
    )
    try:
        if delay is None:
            assert child.wait(60) == 0
            assert [(s, e) for s, e, _ in chunks(log_dir)] == ranges
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
    broker = InProcessBroker(state_dir, extra=SMALL_LOG)
    assert len(broker.core.state.jobs) == len(dict.values(warm.jobs))
    assert not list(log_dir.glob("*.tmp"))  # a half-written chunk's file is gone
    broker.crash()


def test_a_chunk_is_built_only_from_bytes_synced_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever the log's fsync policy (here: never), the builder
    fdatasyncs the segment before it reads it, and writes the chunk after."""
    broker = InProcessBroker(tmp_path / "s", extra=SMALL_LOG, fsync="never")
    enqueue_many(broker, "a", 100, pad=PAD)
    broker.crash()
    _, seg = active(tmp_path / "s" / "log")
    events: list[str] = []
    real_sync, real_write = os.fdatasync, checkpoint.write_file

    def fdatasync(fd: int) -> None:
        events.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_sync(fd)

    def write_file(*args: Any) -> Path:
        events.append("write")
        return real_write(*args)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(checkpoint, "write_file", write_file)
    scan = Scan(seg, seg.read_bytes(), read_header(seg).seed)
    for _ in scan:
        pass
    assert segindex.build_chunk(seg, HEADER_SIZE, scan.pos) is not None
    assert events == [str(seg), "write"]


def test_a_sealed_segment_keeps_its_chunks_and_compaction_or_repair_removes_them(
    tmp_path: Path, small_chunks: None
) -> None:
    state_dir, ids = chunked_log(tmp_path)
    log_dir = state_dir / "log"
    broker = InProcessBroker(state_dir, extra=SMALL_LOG, fsync="never")
    broker.core.state.jobs.warm_all()  # (the broker compacts only once no job is cold)
    compact_now(broker)
    base = broker.core.log._base
    assert not [i for i in log_dir.glob("*.idx") if int(i.name.split(".")[0]) <= base]
    ids += enqueue_many(broker, "c", 600, pad=PAD)
    until_idle(broker)
    first = active(log_dir)[0]
    assert checkpoint.chunks_of(log_dir, first)  # the new segment's
    ids += enqueue_many(broker, "d", 6000, pad=PAD)  # ... until it is sealed
    until_idle(broker)
    assert active(log_dir)[0] > first
    seg = log_dir / f"{first:020d}.seg"
    # a last chunk to its end, then a whole index merged from them, which replaces them
    assert checkpoint.idx_path(log_dir, first).exists()
    assert not checkpoint.chunks_of(log_dir, first)
    assert chunks(log_dir)  # the next one's
    broker.crash()
    warm = replay(log_dir, tmp_path, "warm", checkpoint=False)
    cold = replay(log_dir, tmp_path, "cold", checkpoint=True)
    assert_same(warm, cold, ids, QUEUES)
    # killed between its last chunk and the merge: its chunks serve, the merge follows
    checkpoint.idx_path(log_dir, first).unlink()
    scan = Scan(seg, seg.read_bytes(), read_header(seg).seed)
    bounds = [scan.pos for _ in scan]
    cuts = [HEADER_SIZE, bounds[len(bounds) // 2], seg.stat().st_size]
    for start, end in itertools.pairwise(cuts):
        assert segindex.build_chunk(seg, start, end) is not None
    again = InProcessBroker(state_dir, extra=SMALL_LOG, fsync="never")
    assert [path for path, _ in again.core._unindexed] == [seg]
    assert again.core.state.jobs.cold is not None
    again.core._replayed_at -= core.INDEX_AFTER
    until_idle(again)
    assert checkpoint.idx_path(log_dir, first).exists()
    assert not checkpoint.chunks_of(log_dir, first)
    again.crash()
    warm = replay(log_dir, tmp_path, "warm", checkpoint=False)
    cold = replay(log_dir, tmp_path, "cold", checkpoint=True)
    assert_same(warm, cold, ids, QUEUES)
    data = bytearray(seg.read_bytes())
    data[len(data) // 2] ^= 0x10
    seg.write_bytes(bytes(data))
    logtools.repair(log_dir)
    assert not list(log_dir.glob("*.idx"))


def sealed_copy(state_dir: Path, at: Path) -> Path:
    """A copy of ``state_dir``'s segment being written, cut where its chunks
    end back to back (as a roll seals it), with those chunks: a sealed
    segment whose chunks cover it."""
    log_dir = state_dir / "log"
    seq, seg = active(log_dir)
    at.mkdir()
    covered = HEADER_SIZE
    for start, end, path in checkpoint.chunks_of(log_dir, seq):
        if start == covered:
            shutil.copy2(path, at / path.name)
            covered = end
    copy = at / seg.name
    copy.write_bytes(seg.read_bytes()[:covered])
    return copy


def test_a_whole_index_merged_from_chunks_is_the_one_a_scan_writes(
    tmp_path: Path, small_chunks: None
) -> None:
    """A sealed segment's chunks are merged into its whole index without
    reading an id again: it is byte for byte the index a scan of the
    segment writes, a batch whose id another batch of the segment holds
    too (a job deleted, its id enqueued again later) left out by both."""
    broker = InProcessBroker(tmp_path / "s", extra=SMALL_LOG, fsync="never")
    enqueue_many(broker, "r", 200, pad=PAD)
    broker.request(p.Cancel(broker.next_req(), "r-5"))
    broker.request(p.Delete(broker.next_req(), "r-5"))
    enqueue_many(broker, "a", 400, pad=PAD)  # (past a chunk's end)
    again = [p.JobSpec(f"r-{i}", "t.task", p.encode_value([i, PAD])) for i in (5, 1000)]
    assert isinstance(broker.request(p.Enqueue(broker.next_req(), again)), p.EnqueueOk)
    enqueue_many(broker, "b", 400, pad=PAD)
    until_idle(broker)
    broker.crash()
    copy = sealed_copy(tmp_path / "s", tmp_path / "sealed")
    header = read_header(copy)
    size, mtime = copy.stat().st_size, copy.stat().st_mtime_ns
    merged = segindex.merge_chunks(copy, header.generation, header.seq, size)
    assert merged is not None
    got = segindex.scan_batches(copy)
    assert got is not None
    scanned = checkpoint.build(header.generation, header.seq, size, mtime, got[2])
    assert checkpoint.build_keyed(header.generation, header.seq, size, mtime, *merged) == scanned
    frames = [r for r in Scan(copy, copy.read_bytes(), header.seed) if isinstance(r, JobsCreated)]
    assert len(merged[0]) == len(frames) - 2  # the two batches holding r-5
    assert segindex.build_index(copy) == checkpoint.idx_path(copy.parent, header.seq)
    assert not checkpoint.chunks_of(copy.parent, header.seq)


@pytest.mark.parametrize("how", ["hole", "stale-frame"])
def test_chunks_that_do_not_cover_a_sealed_segment_are_not_merged(
    tmp_path: Path, small_chunks: None, how: str
) -> None:
    state_dir, _ = chunked_log(tmp_path)
    copy = sealed_copy(state_dir, tmp_path / "sealed")
    header = read_header(copy)
    (_, _, second), *_ = checkpoint.chunks_of(copy.parent, header.seq)[1:]
    if how == "hole":
        second.unlink()
    else:  # a batch it names is other bytes now (same length, another CRC)
        start, end, _ = checkpoint.chunks_of(copy.parent, header.seq)[1]
        loaded = checkpoint.load_chunk(header.generation, header.seq, copy, start, end, second)
        assert loaded is not None
        data = bytearray(copy.read_bytes())
        data[loaded.batches[0].offset + 4] ^= 0x01  # its frame header's CRC
        copy.write_bytes(bytes(data))
    size = copy.stat().st_size
    assert segindex.merge_chunks(copy, header.generation, header.seq, size) is None


def test_index_files_are_the_owners_only(tmp_path: Path, small_chunks: None) -> None:
    old = os.umask(0o022)  # (the broker runs under 0077; `corral log compact` under yours)
    try:
        state_dir, _ = chunked_log(tmp_path)
        broker = InProcessBroker(state_dir, extra=SMALL_LOG, fsync="never")
        broker.core.state.jobs.warm_all()
        enqueue_many(broker, "c", 100, pad=PAD)
        compact_now(broker)
        broker.crash()
    finally:
        os.umask(old)
    log_dir = state_dir / "log"
    files = [*log_dir.glob("*.ckpt"), *log_dir.glob("*.idx")]
    assert list(log_dir.glob("*.ckpt"))
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_the_indexer_orders_chunks_as_the_segment_grows_or_idles(tmp_path: Path) -> None:
    indexer = segindex.Indexer()
    seg, nxt = tmp_path / "1.seg", tmp_path / "2.seg"
    big, idle, little = segindex.CHUNK_BYTES, segindex.CHUNK_IDLE, segindex.CHUNK_IDLE_BYTES
    indexer.grow(seg, HEADER_SIZE + big - 1, 0.0)
    assert indexer.pending_chunks == []
    indexer.grow(seg, HEADER_SIZE + big, 0.1)
    assert indexer.pending_chunks == [(str(seg), HEADER_SIZE, HEADER_SIZE + big)]
    at = HEADER_SIZE + big + little
    indexer.grow(seg, at, 1.0)
    indexer.grow(seg, at, 1.0 + idle / 2)  # not idle long enough
    assert len(indexer.pending_chunks) == 1
    indexer.grow(seg, at, 1.0 + idle)
    assert indexer.pending_chunks[-1] == (str(seg), HEADER_SIZE + big, at)
    indexer.want(seg, at + 10)  # sealed: one last chunk to its end, then the merge
    assert indexer.pending_chunks[-1] == (str(seg), at, at + 10)
    assert indexer.pending == [seg]
    indexer.pending = []
    indexer.grow(nxt, HEADER_SIZE + big, 10.0)  # the roll's new segment, from its start
    assert indexer.pending_chunks[-1] == (str(nxt), HEADER_SIZE, HEADER_SIZE + big)
    indexer.pending_chunks = []
    indexer.want(tmp_path / "0.seg", 1 << 20)  # sealed, never chunked: a whole index
    assert indexer.pending == [tmp_path / "0.seg"]
    indexer.pending = []  # (nothing to build: the files do not exist)
    indexer.resume(seg, at + 100)
    indexer.grow(seg, at + 100 + big, 20.0)
    assert indexer.pending_chunks[-1] == (str(seg), at + 100, at + 100 + big)


def test_a_restart_on_chunks_warms_them_in_the_background(
    tmp_path: Path, small_chunks: None
) -> None:
    """The broker itself, restarted on chunks: everything cold is warmed
    pass by pass in the background, and each pass warms a few batches."""
    state_dir, _ = chunked_log(tmp_path)
    broker = InProcessBroker(state_dir, extra=SMALL_LOG)
    cold = broker.core.state.jobs.cold
    assert cold is not None and cold.count > 1000
    broker.run_pass()
    assert broker.core.state.jobs.cold is None or cold.warmed <= 2 * core.WARM_PER_PASS
    broker.advance(5)
    assert broker.core.state.jobs.cold is None
    assert broker.job("a-500").status == "cancelled"
    broker.close()


def test_a_batch_with_gaps_in_its_creation_numbers_keeps_the_dispatch_order(
    tmp_path: Path,
) -> None:
    """A compacted base's batch whose jobs' creation numbers have gaps
    (jobs deleted between them), in runs of two priorities: restarted cold
    or warm, with jobs enqueued after, the workers get the same jobs in
    the same order (a cold run's place in its lane is bounded, not guessed
    from a gapless count)."""
    broker = InProcessBroker(tmp_path / "s", extra=SMALL_LOG, fsync="never")
    specs = [
        p.JobSpec(f"x-{i}", "t.task", p.encode_value(i), priority=5 if 20 <= i < 40 else 0)
        for i in range(60)
    ]
    assert isinstance(broker.request(p.Enqueue(broker.next_req(), specs)), p.EnqueueOk)
    for i in [*range(10, 15), *range(25, 30), 41]:  # cancelled, then deleted: gone
        assert isinstance(broker.request(p.Cancel(broker.next_req(), f"x-{i}")), p.Ack)
        assert isinstance(broker.request(p.Delete(broker.next_req(), f"x-{i}")), p.Ack)
    compact_now(broker)
    broker.crash()
    log_dir = tmp_path / "s" / "log"
    (ckpt,) = log_dir.glob("*.ckpt")
    base_seq, base = int(ckpt.stem), ckpt.with_suffix(".seg")
    loaded = checkpoint.load(log_dir, read_header(base).generation, base_seq, base)
    assert loaded is not None
    assert [b.last_seq - b.first_seq + 1 - b.count for b in loaded.batches] == [11]  # gaps
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "s", copy)
    for index in [*(copy / "log").glob("*.ckpt"), *(copy / "log").glob("*.idx")]:
        index.unlink()
    orders = []
    for at in (tmp_path / "s", copy):
        again = InProcessBroker(at, extra=SMALL_LOG, fsync="never")
        assert (again.core.state.jobs.cold is not None) == (at != copy)
        later = [
            p.JobSpec(f"y-{i}", "t.task", p.encode_value(i), priority=(0, 5)[i % 2])
            for i in range(10)
        ]
        assert isinstance(again.request(p.Enqueue(again.next_req(), later)), p.EnqueueOk)
        worker = FakeWorker(again, credit=100)
        orders.append([d.job_id for d in worker.ready()])
        again.crash()
    assert orders[0] == orders[1]
    assert len(orders[0]) == 60 - 11 + 10


# -- a real broker --------------------------------------------------------------


def test_a_real_broker_chunks_its_idle_tail_and_restarts_on_it(env: Env) -> None:
    """A real broker writes ~1 MB of jobs and goes idle: after CHUNK_IDLE
    seconds its child writes the tail's chunk. Killed and started again,
    it answers with the same queues, the jobs of its only segment cold."""
    broker = env.start("broker")
    env.wait_ready(broker)
    client = env.client(timeout=30)
    for _ in range(3):
        client.enqueue_many([corral.Job("e2e.noop", bytes(300))] * 1000)
    log_dir = env.home / "state" / "log"
    assert len(list_segments(log_dir)) == 1
    wait_for(lambda: chunks(log_dir), timeout=60, message="the idle tail's chunk")
    status = client.status().queues
    os.killpg(broker.pid, 9)
    broker.wait(10)
    again = env.start("broker")
    env.wait_ready(again)
    assert client.status().queues == status
    wait_for(lambda: "broker.replayed" in again.output(), timeout=30)
    replayed = [e for e in log_events(again.output()) if e.get("event") == "broker.replayed"][-1]
    assert replayed["cold_jobs"] == 3000, replayed
    assert client.purge("default") == 3000


def test_a_chunk_the_disk_has_no_room_for_is_logged_as_json_and_built_once_there_is(
    env: Env, tmpfs: Any
) -> None:
    """The indexing child finds the disk full: the broker logs it in its own
    lines (JSON, as every other line of the daemon's output: the child's bare
    text line broke a user's jq), and orders the same bytes again once there
    is room (they stayed unindexed until a restart replayed them)."""
    from conftest import fill_disk

    disk = tmpfs("8m", at=env.home / "disk")
    env.write_config(
        state_dir=f"{disk}/state",
        extra_broker='segment_size = "4MiB"\nmax_message_size = "1MiB"\ndisk_reserve = "64KiB"',
    )
    broker = env.start("broker")
    env.wait_ready(broker)
    client = env.client(timeout=30)
    client.enqueue_many([corral.Job("e2e.noop", "x" * 300)] * 1000)
    filler = fill_disk(disk, leave=4096)  # before the idle tail's chunk (2 s): no room for it
    log_dir = disk / "state" / "log"

    def refused() -> list[dict[str, Any]]:
        return [
            e for e in log_events(broker.output()) if e.get("event") == "segment_index.not_written"
        ]

    wait_for(refused, timeout=60, message="the chunk refused for room")
    assert refused()[0]["start"] == HEADER_SIZE and "No space" in refused()[0]["error"]
    for line in broker.output().splitlines():
        msgspec.json.decode(line)  # every line of the output is a JSON object
    filler.unlink()
    wait_for(lambda: chunks(log_dir), timeout=60, message="the chunk once there is room")
    assert chunks(log_dir)[0][0] == HEADER_SIZE
