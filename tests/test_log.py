"""Tests for corral.broker.log on real files: framing, replay, torn tails,
corruption, fsync policies, compaction, a real full disk and a stateful
crash model (kill -9 and simulated power loss)."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import resource
import shutil
import signal
import struct
import tempfile
import time
import zlib
from pathlib import Path

import msgspec
import pytest
import structlog
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from corral.broker.framing import FORMAT_VERSION, HEADER_SIZE, MAGIC, MARK_CODE
from corral.broker.job import BLOB_HEAD
from corral.broker.jobspec import JobSpec
from corral.broker.log import Log, LogCorrupt, LogDiskFull, LogError
from corral.broker.logtools import repair, verify
from corral.broker.records import (
    NIL,
    RECORD_TYPES,
    BrokerStarted,
    Cancelled,
    ClockStepped,
    ErrorRec,
    Finished,
    FlowCreated,
    FlowRemoved,
    FollowedUp,
    JobCreated,
    JobsCreated,
    JobSnapshot,
    Leased,
    LeasedMany,
    MemberEnded,
    ProgressNoted,
    QueuePaused,
    Record,
    Removed,
    Requeued,
    Returned,
    ScheduleFired,
    Started,
    TaskForgotten,
    TaskOptions,
    TaskRegistered,
    TryRec,
    encode_record,
)

KiB = 1024
SMALL = {"segment_size": 64 * KiB, "reserve": 8 * KiB}


def raw(obj: object) -> msgspec.Raw:
    return msgspec.Raw(msgspec.msgpack.encode(obj))


def created(i: int, pad: int = 0) -> JobCreated:
    return job_rec(f"job-{i}", i, "t.task", "default", 0, raw({"i": i, "p": "x" * pad}), 1.5)


def job_rec(
    job_id: str, seq: int, task: str, queue: str, priority: int, payload: msgspec.Raw, at: float
) -> JobCreated:
    return JobCreated(
        id=job_id,
        task=task,
        payload=payload,
        queue=queue,
        priority=priority,
        seq=seq,
        created_at=at,
    )


def enc(records: list[Record]) -> list[tuple[int, bytes]]:
    """Records in a comparable form (msgspec.Raw compares by content too)."""
    return [encode_record(r) for r in records]


def open_log(path: Path, **kw: object) -> tuple[Log, list[Record]]:
    log = Log(path, **{"fsync": "never", **SMALL, **kw})  # type: ignore[arg-type]
    return log, list(log.replay())


def write_log(path: Path, records: list[Record], every: int = 1, **kw: object) -> list[int]:
    """Append and commit ``records`` (``every`` per commit); return framed sizes."""
    log, old = open_log(path, **kw)
    assert old == []
    sizes = []
    for i, r in enumerate(records, 1):
        sizes.append(log.append(r))
        if i % every == 0:
            log.commit(time.monotonic())
    log.close()
    return sizes


def kill(log: Log) -> None:
    """kill -9: whatever was written stays in the file, the pending buffer is lost."""
    active = log._active
    assert active is not None
    os.close(active.fd)
    log._active = None


def segments(path: Path) -> list[Path]:
    return sorted(path.glob("*.seg"))


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    offset, bit = offset + bit // 8, bit % 8
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


# -- framing and replay -------------------------------------------------------


def every_record_type(result: msgspec.Raw = NIL) -> list[Record]:
    err = ErrorRec("ValueError", "bad", "Traceback ...")
    tri = TryRec(1, "w1", "host", 42, 10.0, 11.0, err)
    return [
        JobCreated(
            id="a",
            task="t",
            payload=raw({"a": 1}),
            queue="q",
            priority=5,
            run_at=2.0,
            max_attempts=3,
            timeout=4.5,
            unique_key="u",
            result_ttl=60.0,
            unique_for=5.0,
            on_success=JobSpec("ok", "t", raw(1), delay=3.0),
            on_failure=JobSpec("ko", "t"),
            seq=1,
            created_at=1.0,
            flow="f",
            step=2,
            prev_result=raw([1]),
        ),
        Leased("a", 7, 1, "w1", "host", 42, 10.0),
        LeasedMany(["b", "c"], 8, "w1", "host", 42, 10.25),
        Started("a", 7, 1, "w1", "host", 42, 10.5),
        Finished("a", 7, 11.0, "failed", result, err, 12.0, 10.0, False),
        Returned("a", 7),
        JobSnapshot(
            job_rec("a", 1, "t", "q", 5, raw({"a": 1}), 1.0), "succeeded", 1, [tri], result=result
        ),
        JobsCreated(
            job_rec("", 0, "t", "q", 2, NIL, 0.0),
            ["m1", "m2"],
            [BLOB_HEAD.pack(30, 19.0, 2) + bytes(raw(1)), BLOB_HEAD.pack(31, 19.0, -7) + b"\xc0"],
        ),
        Removed("a"),
        Cancelled("a", 13.0),
        Requeued("a", 14.0),
        QueuePaused("q", True),
        ProgressNoted("a", 0.5, "half", 15.0),
        ScheduleFired("nightly", 1700000000.0),
        BrokerStarted(3, 17.0),
        MemberEnded("f", "s1", "succeeded", result),
        MemberEnded("f", "s2", "failed"),
        FlowRemoved("f"),
        ClockStepped(-3600.25, 19.0),
        TaskRegistered("t", TaskOptions(max_attempts=3, queue="emails", retry_backoff=0.5)),
        TaskForgotten("t"),
        FollowedUp("a", [job_rec("b", 2, "t", "q", 0, raw(2), 18.0)]),
        FlowCreated(
            "f",
            "chain",
            [JobSpec("s1", "t", raw(1)), JobSpec("s2", "t", raw(2), queue="q", priority=3)],
            16.0,
            JobSpec("cb", "t", result),
        ),
    ]


@pytest.mark.parametrize("result", [NIL, raw({"ok": True}), raw([1, "two", None])])
def test_every_record_type_round_trips(tmp_path: Path, result: msgspec.Raw) -> None:
    records = every_record_type(result)
    assert {type(r) for r in records} == set(RECORD_TYPES.values())
    write_log(tmp_path, records, every=3)
    log, got = open_log(tmp_path)
    assert got == records
    assert enc(got) == enc(records)
    log.close()


def test_replay_across_segments_and_reopen(tmp_path: Path) -> None:
    records: list[Record] = [created(i, pad=i % 50) for i in range(3000)]
    write_log(tmp_path, records, every=37)
    assert len(segments(tmp_path)) >= 3
    log, got = open_log(tmp_path)
    assert enc(got) == enc(records)
    more = [created(i) for i in range(3000, 3500)]
    for r in more:
        log.append(r)
    log.commit(time.monotonic())
    log.close()
    log.close()  # idempotent
    log, got = open_log(tmp_path)
    assert enc(got) == enc(records + more)
    assert log.stats()["segments"] == len(segments(tmp_path))
    log.close()


def test_append_does_no_io_until_commit(tmp_path: Path) -> None:
    log, _ = open_log(tmp_path)
    before = segments(tmp_path)[0].read_bytes()
    size = log.append(created(1))
    assert log.pending == size and size == 9 + len(encode_record(created(1))[1])
    assert segments(tmp_path)[0].read_bytes() == before
    log.commit(0.0)
    assert log.pending == 0 and segments(tmp_path)[0].read_bytes() != before
    log.close()


def test_misuse_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        Log(tmp_path, fsync="sometimes")
    log = Log(tmp_path)
    with pytest.raises(LogError):
        log.commit(0.0)
    list(log.replay())
    log.append(created(1))
    with pytest.raises(LogError, match="commit"):
        log.compact([])
    log.close()


# -- torn tails and corruption ------------------------------------------------


def test_truncation_at_every_offset_of_last_record(tmp_path: Path) -> None:
    records: list[Record] = [created(i, pad=i * 7) for i in range(6)]
    src = tmp_path / "src"
    sizes = write_log(src, records, every=2)
    seg = segments(src)[0]
    pristine = seg.read_bytes()
    end = HEADER_SIZE + sum(sizes)
    start = end - sizes[-1]
    for cut in range(start, end):
        for mode in ("truncate", "zero"):
            work = tmp_path / f"w-{cut}-{mode}"
            work.mkdir()
            data = pristine[:cut] if mode == "truncate" else pristine[:cut] + bytes(end - cut)
            (work / seg.name).write_bytes(data)
            with structlog.testing.capture_logs() as logs:
                log, got = open_log(work)
            assert enc(got) == enc(records[:-1]), (cut, mode)
            torn = [e for e in logs if e["event"] == "log.torn_tail"]
            assert len(torn) == (cut > start)
            if torn:
                assert torn[0]["offset"] == start and torn[0]["segment"] == str(work / seg.name)
                assert torn[0]["dropped_bytes"] > 0
            log.append(created(99))
            log.commit(time.monotonic())
            log.close()
            log, got = open_log(work)
            assert enc(got) == enc([*records[:-1], created(99)])
            log.close()
            shutil.rmtree(work)


def _corrupt_fixture(tmp_path: Path) -> tuple[Path, list[Record], list[int]]:
    records: list[Record] = [created(i, pad=i % 13) for i in range(2000)]
    src = tmp_path / "src"
    sizes = write_log(src, records, every=10)
    assert len(segments(src)) >= 3
    return src, records, sizes


def _record_starts(path: Path) -> list[int]:
    data = path.read_bytes()
    pos, starts = HEADER_SIZE, []
    while pos + 9 <= len(data):
        (length,) = struct.unpack_from("<I", data, pos)
        if length == 0:
            break
        if data[pos + 8] != MARK_CODE:  # a sync mark is no record
            starts.append(pos)
        pos += 8 + length
    return starts


@pytest.mark.parametrize("where", ["first_segment", "last_segment"])
@pytest.mark.parametrize(("field", "bit"), [(0, 0), (0, 30), (4, 3), (8, 1), (12, 5)])
def test_flipped_bit_is_corruption(tmp_path: Path, where: str, field: int, bit: int) -> None:
    src, records, sizes = _corrupt_fixture(tmp_path)
    segs = segments(src)
    seg = segs[0] if where == "first_segment" else segs[-1]
    starts = _record_starts(seg)
    k = len(starts) // 2
    before = sum(len(_record_starts(s)) for s in segs if s < seg) + k
    flip_bit(seg, starts[k] + field, bit)

    with pytest.raises(LogCorrupt) as info:
        open_log(src)
    assert info.value.segment == seg and info.value.offset == starts[k]
    assert str(seg) in str(info.value) and "corral log repair" in str(info.value)

    report = verify(src)
    assert not report.ok and report.corrupt is not None
    assert report.corrupt[:2] == (str(seg), starts[k])

    # repair moves the one damaged record aside and keeps all the others
    fixed = repair(src)
    assert fixed.action == "repaired" and fixed.records_kept == len(records) - 1
    assert fixed.bytes_dropped == sizes[before]
    lost = records[before]
    assert isinstance(lost, JobCreated)
    if field != 12:  # the frame's header is damaged, its body reads as it was
        assert fixed.lost_jobs == [lost.id]
    assert fixed.backup is not None
    backup = Path(fixed.backup)
    assert {p.name for p in backup.glob("*.seg")} == {seg.name}
    log, got = open_log(src)
    assert enc(got) == enc(records[:before] + records[before + 1 :])
    log.close()
    assert verify(src).ok and repair(src).action == "none"


def test_verify_reports_torn_tail_and_repair_cuts_it(tmp_path: Path) -> None:
    sizes = write_log(tmp_path, [created(i) for i in range(10)])
    seg = segments(tmp_path)[0]
    end = HEADER_SIZE + sum(sizes)
    os.truncate(seg, end - 3)
    before = seg.read_bytes()
    report = verify(tmp_path)
    assert report.ok and report.records == 9
    assert report.torn_tail == (str(seg), end - sizes[-1])
    assert seg.read_bytes() == before  # verify never writes
    fixed = repair(tmp_path)
    assert fixed.action == "truncated_tail" and fixed.records_kept == 9
    assert verify(tmp_path).torn_tail is None


def test_zero_tail_is_the_end_of_the_log(tmp_path: Path) -> None:
    records: list[Record] = [created(i) for i in range(100)]
    write_log(tmp_path, records, every=7, segment_size=256 * KiB)
    seg = segments(tmp_path)[0]
    assert seg.stat().st_size == 256 * KiB  # preallocated, zero-filled
    with open(seg, "ab") as f:  # even more zeros beyond the preallocation
        f.write(bytes(10 * KiB))
    log, got = open_log(tmp_path, segment_size=256 * KiB)
    assert enc(got) == enc(records)
    assert log.stats()["torn_tail_truncations"] == 0
    log.close()


def test_zeros_after_a_finished_segment_are_fine(tmp_path: Path) -> None:
    records: list[Record] = [created(i, pad=20) for i in range(3000)]
    write_log(tmp_path, records, every=50)
    first = segments(tmp_path)[0]
    with open(first, "ab") as f:  # as if the crash came before the ftruncate
        f.write(bytes(8 * KiB))
    log, got = open_log(tmp_path)
    assert enc(got) == enc(records)
    log.close()


def _rewrite_header(seg: Path, version: int = FORMAT_VERSION, magic: bytes = MAGIC) -> None:
    data = bytearray(seg.read_bytes())
    struct.pack_into("<8sH", data, 0, magic, version)
    struct.pack_into("<I", data, 28, zlib.crc32(bytes(data[:28])))
    seg.write_bytes(bytes(data))


def test_wrong_version_names_both_versions(tmp_path: Path) -> None:
    write_log(tmp_path, [created(1)])
    seg = segments(tmp_path)[0]
    _rewrite_header(seg, version=FORMAT_VERSION + 41)
    with pytest.raises(LogCorrupt) as info:
        open_log(tmp_path)
    assert info.value.segment == seg and info.value.offset == 0
    assert str(FORMAT_VERSION + 41) in info.value.reason
    assert str(FORMAT_VERSION) in info.value.reason.replace(str(FORMAT_VERSION + 41), "")
    assert "another corral" in str(info.value) and "corral log repair" not in str(info.value)


def test_bad_magic_and_bad_header_crc(tmp_path: Path) -> None:
    write_log(tmp_path, [created(1)])
    seg = segments(tmp_path)[0]
    _rewrite_header(seg, magic=b"NOTCORRL")
    with pytest.raises(LogCorrupt, match="magic"):
        open_log(tmp_path)
    _rewrite_header(seg)
    flip_bit(seg, 12)  # inside the sequence number
    with pytest.raises(LogCorrupt, match="checksum"):
        open_log(tmp_path)


def test_gap_and_foreign_segment_are_corruption(tmp_path: Path) -> None:
    write_log(tmp_path / "a", [created(i, pad=30) for i in range(3000)], every=40)
    write_log(tmp_path / "b", [created(i, pad=30) for i in range(3000)], every=40)
    a, b = segments(tmp_path / "a"), segments(tmp_path / "b")
    shutil.copy(b[1], a[1])  # same number, another log's generation
    with pytest.raises(LogCorrupt, match="another log") as info:
        open_log(tmp_path / "a")
    assert info.value.segment == a[1]
    a[1].unlink()
    with pytest.raises(LogCorrupt, match="missing"):
        open_log(tmp_path / "a")


# -- fsync policies -------------------------------------------------------------


def test_fsync_always(tmp_path: Path) -> None:
    log, _ = open_log(tmp_path, fsync="always")
    assert log.commit(0.0) is False and log.stats()["fsyncs"] == 0
    for i in range(3):
        log.append(created(i))
        log.append(created(i + 100))
        assert log.commit(float(i)) is True
    assert log.commit(5.0) is False
    assert log.stats()["fsyncs"] == 3
    assert log.synced_position == log.written_position
    assert log.next_sync_due(5.0) is None
    log.close()


def test_fsync_interval(tmp_path: Path) -> None:
    log, _ = open_log(tmp_path, fsync="interval", fsync_interval=1.0)
    assert log.next_sync_due(0.0) is None
    log.append(created(1))
    assert log.next_sync_due(0.0) == 1.0
    assert log.commit(10.0) is False
    log.append(created(2))
    assert log.commit(10.5) is False
    assert log.next_sync_due(10.5) == pytest.approx(0.5)
    assert log.commit(10.99) is False
    assert log.stats()["fsyncs"] == 0
    assert log.commit(11.0) is True
    assert log.stats()["fsyncs"] == 1 and log.next_sync_due(11.0) is None
    assert log.commit(13.0) is False  # nothing new to sync
    log.append(created(3))
    assert log.commit(13.1) is True  # more than an interval since the last sync
    assert log.stats()["fsyncs"] == 2
    log.close()


def test_fsync_never(tmp_path: Path) -> None:
    log, _ = open_log(tmp_path, fsync="never")
    for i in range(20):
        log.append(created(i))
        assert log.commit(float(i * 10)) is False
    assert log.stats()["fsyncs"] == 0 and log.next_sync_due(1000.0) is None
    log.sync()  # forced, e.g. at shutdown
    assert log.stats()["fsyncs"] == 1
    log.close()


# -- compaction -------------------------------------------------------------------


def test_compaction_follows_live_records(tmp_path: Path) -> None:
    log, _ = open_log(tmp_path)
    records = [created(i, pad=10) for i in range(5000)]
    for i, r in enumerate(records):
        log.append(r)
        if i % 100 == 0:
            log.commit(0.0)
    log.commit(0.0)
    before = log.stats()
    assert before["segments"] >= 3 and log.bytes_since_compaction > 100 * KiB
    live = records[-10:]
    log.compact(live)
    after = log.stats()
    # the new base (at the cut) and the segment appends go on in
    assert after["segments"] == 2 == len(segments(tmp_path))
    assert after["used_bytes"] < before["used_bytes"] / 50
    assert after["disk_bytes"] < before["disk_bytes"] / 2
    assert log.bytes_since_compaction == 0
    later = [Removed("job-4999"), created(6000)]
    for r in later:
        log.append(r)
    log.commit(0.0)
    log.close()
    log, got = open_log(tmp_path)
    assert enc(got) == enc([*live, *later])
    log.close()


def _old_and_new(tmp_path: Path) -> tuple[Path, Path, list[Record], list[Record]]:
    """A log before and after a compaction, as two directories."""
    old_dir, new_dir = tmp_path / "old", tmp_path / "new"
    records: list[Record] = [created(i, pad=30) for i in range(3000)]
    write_log(old_dir, records, every=50)
    shutil.copytree(old_dir, new_dir)
    log, _ = open_log(new_dir)
    live = records[:5]
    log.compact(live)
    log.close()
    return old_dir, new_dir, records, live


def test_crash_before_compaction_rename_keeps_old_state(tmp_path: Path) -> None:
    old_dir, new_dir, records, _ = _old_and_new(tmp_path)
    base = segments(new_dir)[0]  # the new base, at the cut; a segment after it
    shutil.copy(base, old_dir / base.name.replace(".seg", ".base.0123abcd.tmp"))
    log, got = open_log(old_dir)
    assert enc(got) == enc(records)
    assert not list(old_dir.glob("*.tmp"))
    log.close()


def test_crash_before_old_segments_deleted_gives_new_state(tmp_path: Path) -> None:
    old_dir, new_dir, _, live = _old_and_new(tmp_path)
    base = segments(new_dir)[0]  # renamed onto the last segment before the cut
    for seg in segments(old_dir):
        if seg.name < base.name:
            shutil.copy(seg, new_dir / seg.name)
    assert len(segments(new_dir)) > 3
    log, got = open_log(new_dir)
    assert enc(got) == enc(live)
    assert segments(new_dir) == [base, base.with_name(f"{int(base.stem) + 1:020d}.seg")]
    log.close()


# -- a real full disk ---------------------------------------------------------------

LIMIT = 60 * KiB
FULL = {"segment_size": 64 * KiB, "reserve": 16 * KiB, "fsync": "always"}


def _fill_under_rlimit(path: str, out: str) -> None:
    """Child: fill the log under RLIMIT_FSIZE, then lift the limit again."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, hard))
    log = Log(path, **FULL)  # type: ignore[arg-type]
    n = len(list(log.replay()))
    result: dict[str, object] = {"full_at": None, "err": None}
    now = 0.0
    while n < 100_000:
        log.append(created(n, pad=40))
        now += 0.1
        try:
            log.commit(now)
        except LogDiskFull as exc:  # the failed record is dropped; go on without it
            result["err"] = str(exc)
            break
        n += 1
        if log.full and result["full_at"] is None:
            result["full_at"] = n
    result["at_error"] = n
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))  # space comes back
    for _ in range(3):
        log.append(created(n, pad=40))
        now += 2.0
        log.commit(now)
        n += 1
    result.update(committed=n, full_after=log.full, segments=log.stats()["segments"])
    log.close()
    Path(out).write_text(json.dumps(result))


def test_full_disk_uses_the_reserve_and_loses_nothing(tmp_path: Path) -> None:
    log = Log(tmp_path / "log", **FULL)  # type: ignore[arg-type]
    list(log.replay())
    log.close()
    out = tmp_path / "out.json"
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_fill_under_rlimit, args=(str(tmp_path / "log"), str(out)))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    result = json.loads(out.read_text())
    assert result["full_at"] is not None, result
    assert result["at_error"] > result["full_at"]  # records still went into the reserve
    assert result["err"] is not None and "disk full" in result["err"]
    assert result["full_after"] is False and result["segments"] == 2
    assert not list((tmp_path / "log").glob("*.tmp"))
    log = Log(tmp_path / "log", **FULL)  # type: ignore[arg-type]
    got = list(log.replay())
    assert enc(got) == enc([created(i, pad=40) for i in range(result["committed"])])
    assert not log.full
    log.close()


# -- stateful model: kill -9 and power loss -----------------------------------------


def _seq(path: Path) -> int:
    return int(path.name.split(".")[0])


class LogMachine(RuleBasedStateMachine):
    """A dict model {id: payload} driven through the log, with crashes."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="corral-log-sm-"))
        self.log: Log | None = None
        self.next_id = 0
        self.now = 0.0

    def _open(self) -> list[Record]:
        self.log = Log(self.dir, fsync=self.policy, segment_size=4096, reserve=512)
        return list(self.log.replay())

    def _mark(self) -> None:
        assert self.log is not None and self.log.written_position is not None
        path, end = self.log.written_position
        self.marks.append((_seq(path), end, len(self.committed)))

    def _restart_from(self, replayed: list[Record]) -> None:
        self.committed = replayed
        self.pending: list[Record] = []
        self.model: dict[str, bytes] = {}
        for r in replayed:
            if isinstance(r, JobCreated):
                self.model[r.id] = bytes(r.payload)
            else:
                assert isinstance(r, Removed)
                del self.model[r.id]
        self.marks: list[tuple[int, int, int]] = []
        self._mark()

    @initialize(policy=st.sampled_from(["always", "interval", "never"]))
    def start(self, policy: str) -> None:
        self.policy = policy
        self._restart_from(self._open())

    def _append(self, record: Record) -> None:
        assert self.log is not None
        self.log.append(record)
        self.pending.append(record)

    @rule(sizes=st.lists(st.integers(0, 900), min_size=1, max_size=10), then=st.booleans())
    def add(self, sizes: list[int], then: bool) -> None:
        for size in sizes:
            self.next_id += 1
            payload = raw(bytes([self.next_id % 251]) * size)
            job = job_rec(f"j{self.next_id}", self.next_id, "t", "q", 0, payload, 0.0)
            self._append(job)
            self.model[job.id] = bytes(job.payload)
        if then:
            self.commit(0.25)

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        job_id = data.draw(st.sampled_from(sorted(self.model)))
        self._append(Removed(job_id))
        del self.model[job_id]

    @rule(dt=st.floats(0.0, 1.5))
    def commit(self, dt: float) -> None:
        assert self.log is not None
        self.now += dt
        self.log.commit(self.now)
        self.committed += self.pending
        self.pending = []
        self._mark()

    @precondition(lambda self: len(self.committed) >= 10)
    @rule()
    def compact(self) -> None:
        self.commit(0.0)
        live = [
            job_rec(i, int(i[1:]), "t", "q", 0, msgspec.Raw(p), 0.0) for i, p in self.model.items()
        ]
        assert self.log is not None
        self.log.compact(live)
        self.committed, self.marks = list(live), []
        self._mark()

    def _synced_count(self) -> int:
        assert self.log is not None and self.log.synced_position is not None
        path, offset = self.log.synced_position
        key = (_seq(path), offset)
        return max((count for s, o, count in self.marks if (s, o) <= key), default=0)

    @precondition(lambda self: len(self.marks) > 1)  # something committed since the start
    @rule(
        kind=st.sampled_from(["kill9", "reopen", "truncate", "zero", "garble"]),
        frac=st.floats(0.0, 1.0),
        seed=st.integers(0, 2**32),
    )
    def crash(self, kind: str, frac: float, seed: int) -> None:
        """kill -9, a clean restart, or a power loss that cuts, zeroes or garbles
        the unsynced end of the last segment."""
        assert self.log is not None
        if kind == "reopen":
            self.log.close()
            got = self._open()
            assert enc(got) == enc(self.committed + self.pending)
        elif kind == "kill9":
            kill(self.log)
            got = self._open()
            assert enc(got) == enc(self.committed)
        else:
            must_keep = self._power_loss(kind, frac, seed)
            got = self._open()
            assert must_keep <= len(got) <= len(self.committed)
            assert enc(got) == enc(self.committed[: len(got)])
        self._restart_from(got)

    def _power_loss(self, kind: str, frac: float, seed: int) -> int:
        assert self.log is not None and self.log.synced_position and self.log.written_position
        (spath, synced), (wpath, end) = self.log.synced_position, self.log.written_position
        assert spath == wpath
        must_keep = self._synced_count()
        kill(self.log)
        cut = synced + int((end - synced) * frac)
        with open(wpath, "r+b") as f:
            if kind == "truncate":
                f.truncate(cut)
            else:
                f.seek(cut)
                n = end - cut
                f.write(bytes(n) if kind == "zero" else random.Random(seed).randbytes(n))
        return must_keep

    @invariant()
    def pending_matches(self) -> None:
        if self.log is not None:
            assert self.log.pending == sum(9 + len(encode_record(r)[1]) for r in self.pending)

    def teardown(self) -> None:
        if self.log is not None:
            self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


LogMachine.TestCase.settings = settings(max_examples=50, stateful_step_count=30, deadline=None)
test_log_state_machine = LogMachine.TestCase
