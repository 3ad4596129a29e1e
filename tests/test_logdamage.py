"""The log's damage handling on real files: repair moves damaged bytes aside
and keeps every valid record around them, names the jobs it lost, rebuilds
damaged segment headers; CRCs seeded per segment, so a frame from another
segment, another log or inside a payload never validates; logs written in
the previous format (3) still open; new directories are made durable."""

from __future__ import annotations

import os
import struct
import time
import zlib
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.broker.framing import FORMAT_VERSION, HEADER_SIZE, MAGIC, MARK_CODE
from corral.broker.lockfile import StateDirLock
from corral.broker.log import Log, LogCorrupt, LogError
from corral.broker.logtools import repair, verify
from corral.broker.records import (
    LOG_FORMAT_VERSION,
    Finished,
    JobCreated,
    Leased,
    LeasedMany,
    Record,
    encode_record,
)

KiB = 1024
SMALL = {"segment_size": 64 * KiB, "reserve": 8 * KiB}


def raw(obj: object) -> msgspec.Raw:
    return msgspec.Raw(msgspec.msgpack.encode(obj))


def created(i: int, pad: int = 40, payload: object = None) -> JobCreated:
    body = {"i": i, "p": "x" * pad} if payload is None else payload
    return JobCreated(
        id=f"job-{i:02d}",
        task="t.task",
        payload=raw(body),
        queue="default",
        priority=0,
        seq=i,
        created_at=1.5,
    )


def enc(records: list[Record]) -> list[tuple[int, bytes]]:
    return [encode_record(r) for r in records]


def open_log(path: Path, **kw: object) -> tuple[Log, list[Record]]:
    log = Log(path, **{"fsync": "never", **SMALL, **kw})  # type: ignore[arg-type]
    return log, list(log.replay())


def write_log(path: Path, records: list[Record], **kw: object) -> None:
    log, old = open_log(path, **kw)
    assert old == []
    for r in records:
        log.append(r)
        log.commit(time.monotonic())
    log.close()


def replayed(path: Path) -> list[Record]:
    log, got = open_log(path)
    log.close()
    return got


def segments(path: Path) -> list[Path]:
    return sorted(path.glob("*.seg"))


def frames(seg: Path) -> list[tuple[int, int]]:
    """(start, end) of each frame in a segment, by walking the length fields."""
    data = seg.read_bytes()
    pos, found = HEADER_SIZE, []
    while pos + 9 <= len(data):
        (length,) = struct.unpack_from("<I", data, pos)
        if length == 0:
            break
        if data[pos + 8] != MARK_CODE:  # a sync mark is no record
            found.append((pos, pos + 8 + length))
        pos += 8 + length
    return found


def flip(path: Path, offset: int, bit: int = 0) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def without(records: list[Record], *drop: int) -> list[Record]:
    return [r for i, r in enumerate(records) if i not in drop]


# -- repair keeps the good records after the damage -----------------------------


@pytest.mark.parametrize(
    ("where", "bit"),
    [
        ("length", 0),  # one record shorter: the CRC no longer matches
        ("length_high", 6),  # a length past the end of the segment
        ("crc", 3),
        ("type", 0),  # JobCreated (1) reads as an unknown type (0)
        ("payload", 1),
    ],
)
def test_one_flipped_byte_loses_only_its_record(tmp_path: Path, where: str, bit: int) -> None:
    records: list[Record] = [created(i) for i in range(20)]
    write_log(tmp_path, records)
    (seg,) = segments(tmp_path)
    start, end = frames(seg)[10]
    offset = {
        "length": start,
        "length_high": start + 3,
        "crc": start + 4,
        "type": start + 8,
        "payload": seg.read_bytes().index(b"x" * 40, start) + 20,
    }[where]
    flip(seg, offset, bit)
    damaged = seg.read_bytes()

    with pytest.raises(LogCorrupt) as info:
        open_log(tmp_path)
    assert info.value.offset == start

    report = verify(tmp_path)
    assert not report.ok and report.records == 19
    assert [(d.segment, d.offset, d.length) for d in report.damaged] == [
        (str(seg), start, end - start)
    ]
    assert report.lost_jobs == ["job-10"]
    assert seg.read_bytes() == damaged  # verify never writes

    fixed = repair(tmp_path)
    assert fixed.action == "repaired"
    assert fixed.records_kept == 19 and fixed.bytes_dropped == end - start
    assert fixed.lost_jobs == ["job-10"]
    (span,) = fixed.damaged
    assert (span.segment, span.offset, span.length) == (str(seg), start, end - start)
    assert [(h.type, h.id) for h in span.held] == [("JobCreated", "job-10")]
    # the side file holds exactly the damaged bytes, next to the log
    assert span.side_file is not None
    side = Path(span.side_file)
    assert side.parent.parent == tmp_path and side.read_bytes() == damaged[start:end]
    # the backup holds the segment as it was before the repair
    assert fixed.backup is not None
    assert (Path(fixed.backup) / seg.name).read_bytes() == damaged
    assert (Path(fixed.backup) / "repair.json").is_file()

    assert enc(replayed(tmp_path)) == enc(without(records, 10))
    assert verify(tmp_path).ok and repair(tmp_path).action == "none"
    assert seg.stat().st_mode & 0o777 == 0o644  # the rewritten segment keeps its mode


def test_flips_at_several_places_across_segments(tmp_path: Path) -> None:
    records: list[Record] = [created(i, pad=300) for i in range(400)]
    write_log(tmp_path, records)
    segs = segments(tmp_path)
    assert len(segs) >= 3
    counts = [len(frames(s)) for s in segs]
    # three records in the first segment, one in the middle of the second,
    # the first record of the last segment
    hits = [(0, 3), (0, 4), (0, 60), (1, counts[1] // 2), (len(segs) - 1, 0)]
    lost = []
    for seg_index, k in hits:
        start, end = frames(segs[seg_index])[k]
        flip(segs[seg_index], (start + end) // 2, 2)
        lost.append(sum(counts[:seg_index]) + k)

    fixed = repair(tmp_path)
    assert fixed.records_kept == 400 - len(hits)
    # records 3 and 4 are adjacent: one damaged span holds both
    assert len(fixed.damaged) == len(hits) - 1
    assert fixed.lost_jobs == [f"job-{i:02d}" for i in lost]
    assert enc(replayed(tmp_path)) == enc(without(records, *lost))


def test_jobs_named_by_their_later_records_when_the_creation_is_unreadable(
    tmp_path: Path,
) -> None:
    records: list[Record] = [created(i) for i in range(10)]
    records += [
        Leased("job-04", lease=7, attempt=1, worker="w", host="h", pid=1, at=2.0),
        Finished("job-04", lease=7, at=3.0, status="succeeded"),
        Leased("job-06", lease=8, attempt=1, worker="w", host="h", pid=1, at=2.0),
        Finished("job-06", lease=8, at=3.0, status="succeeded"),
        created(10),  # so the damage is not the last record (a torn tail)
    ]
    write_log(tmp_path, records)
    (seg,) = segments(tmp_path)
    all_frames = frames(seg)
    start, end = all_frames[4]  # job-04's creation: garbled beyond reading
    overwrite(seg, start, b"\xc1" * (end - start))
    start, end = all_frames[13]  # job-06's Finished: its id is still legible
    flip(seg, start + 4)

    fixed = repair(tmp_path)
    assert fixed.records_kept == len(records) - 2
    assert fixed.lost_jobs == ["job-04"]  # its Leased and Finished refer to it
    assert fixed.changed_jobs == ["job-06"]  # created, but a later change is gone
    assert enc(replayed(tmp_path)) == enc(without(records, 4, 13))


def test_a_job_named_only_in_a_batched_lease_is_found_lost(tmp_path: Path) -> None:
    """A LeasedMany names each job it leases: one whose creation is
    unreadable is reported lost, as a Leased of its own would say."""
    records: list[Record] = [created(i) for i in range(10)]
    records += [
        LeasedMany(["job-03", "job-04"], first_lease=7, worker="w", host="h", pid=1, at=2.0),
        created(10),  # so the damage is not the last record (a torn tail)
    ]
    write_log(tmp_path, records)
    (seg,) = segments(tmp_path)
    start, end = frames(seg)[4]  # job-04's creation: garbled beyond reading
    overwrite(seg, start, b"\xc1" * (end - start))

    fixed = repair(tmp_path)
    assert fixed.records_kept == len(records) - 1
    assert fixed.lost_jobs == ["job-04"]
    assert enc(replayed(tmp_path)) == enc(without(records, 4))


def test_torn_tail_is_cut_and_kept_aside(tmp_path: Path) -> None:
    records: list[Record] = [created(i) for i in range(10)]
    write_log(tmp_path, records)
    (seg,) = segments(tmp_path)
    start, end = frames(seg)[-1]
    os.truncate(seg, end - 3)
    fixed = repair(tmp_path)
    assert fixed.action == "truncated_tail" and fixed.records_kept == 9
    assert fixed.lost_jobs == []  # a torn record was never synced, so never acknowledged
    (span,) = fixed.damaged
    assert span.kind == "torn_tail" and span.offset == start and span.side_file
    assert Path(span.side_file).stat().st_size == end - 3 - start
    assert enc(replayed(tmp_path)) == enc(records[:-1])


HEADER_FIELDS = {"magic": 3, "version": 8, "flags": 10, "seq": 12, "generation": 22, "crc": 29}


@pytest.mark.parametrize("field", sorted(HEADER_FIELDS))
@pytest.mark.parametrize("which", ["first", "middle", "only"])
def test_damaged_segment_header_is_rebuilt(tmp_path: Path, field: str, which: str) -> None:
    n = 40 if which == "only" else 400
    records: list[Record] = [created(i, pad=300) for i in range(n)]
    write_log(tmp_path, records)
    segs = segments(tmp_path)
    seg = segs[1] if which == "middle" else segs[0]
    assert (len(segs) == 1) == (which == "only")
    original = seg.read_bytes()[:HEADER_SIZE]
    flip(seg, HEADER_FIELDS[field], 1)
    damaged = seg.read_bytes()[:HEADER_SIZE]
    with pytest.raises(LogCorrupt) as info:
        open_log(tmp_path)
    assert info.value.segment == seg and info.value.offset == 0

    fixed = repair(tmp_path)
    assert fixed.action == "repaired" and fixed.records_kept == n and fixed.lost_jobs == []
    (span,) = fixed.damaged
    assert span.kind == "header" and span.segment == str(seg) and span.offset == 0
    assert span.side_file is not None and Path(span.side_file).read_bytes() == damaged
    assert seg.read_bytes()[:HEADER_SIZE] == original
    assert enc(replayed(tmp_path)) == enc(records)


def test_missing_and_foreign_segments(tmp_path: Path) -> None:
    records: list[Record] = [created(i, pad=300) for i in range(600)]
    write_log(tmp_path / "a", records)
    write_log(tmp_path / "b", [created(i, pad=300) for i in range(600)])
    a, b = segments(tmp_path / "a"), segments(tmp_path / "b")
    assert len(a) >= 4
    in_seg = [len(frames(s)) for s in a]
    a[1].write_bytes(b[1].read_bytes())  # same number, another log's generation
    a[2].unlink()

    fixed = repair(tmp_path / "a")
    kinds = sorted(d.kind for d in fixed.damaged)
    assert kinds == ["foreign_segment", "missing_segment"]
    lost = range(in_seg[0], in_seg[0] + in_seg[1] + in_seg[2])
    assert fixed.records_kept == len(records) - len(lost)
    assert enc(replayed(tmp_path / "a")) == enc([r for i, r in enumerate(records) if i not in lost])
    assert fixed.backup is not None
    assert (Path(fixed.backup) / a[1].name).read_bytes() == b[1].read_bytes()


def _spy_syncs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Path]]:
    """Record every fsync (of a file or a directory) and every os.replace, in order."""
    events: list[tuple[str, Path]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def spy_fsync(fd: int) -> None:
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def spy_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        events.append(("replace", Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    return events


def test_repair_makes_its_backups_durable_before_changing_the_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_log(tmp_path, [created(i) for i in range(20)])
    (seg,) = segments(tmp_path)
    start, _ = frames(seg)[5]
    flip(seg, start + 4)
    events = _spy_syncs(monkeypatch)
    fixed = repair(tmp_path)
    monkeypatch.undo()

    assert fixed.backup is not None and fixed.damaged[0].side_file is not None
    backup = Path(fixed.backup)
    changed = events.index(("replace", seg))
    before = events[:changed]
    for synced in (backup / seg.name, Path(fixed.damaged[0].side_file), backup / "repair.json"):
        assert ("fsync", synced) in before, synced
    assert ("fsync", backup) in before  # the entries of the files in it
    assert ("fsync", tmp_path) in before  # the backup directory's own entry
    assert ("fsync", tmp_path) in events[changed:]  # the rename of the segment


# -- seeded CRCs -------------------------------------------------------------------


def test_a_frame_from_another_segment_or_log_does_not_validate(tmp_path: Path) -> None:
    records: list[Record] = [created(i, pad=300) for i in range(300)]
    write_log(tmp_path / "a", records)
    # the same sizes, other contents: b's frames sit where a's do
    write_log(tmp_path / "b", [created(i, payload={"i": i, "p": "y" * 300}) for i in range(300)])
    a = segments(tmp_path / "a")
    assert len(a) >= 2
    first, second = frames(a[0]), frames(a[1])
    # the same record size everywhere: a copied frame fits exactly
    (s0, e0), (s1, e1) = first[-1], second[0]
    assert e0 - s0 == e1 - s1
    pristine = a[1].read_bytes()
    overwrite(a[1], s1, a[0].read_bytes()[s0:e0])
    with pytest.raises(LogCorrupt) as info:
        open_log(tmp_path / "a")
    assert (info.value.segment, info.value.offset) == (a[1], s1)

    a[1].write_bytes(pristine)
    b = segments(tmp_path / "b")
    s, e = frames(b[0])[7]
    overwrite(a[0], s, b[0].read_bytes()[s:e])  # same position, another log
    with pytest.raises(LogCorrupt) as info:
        open_log(tmp_path / "a")
    assert (info.value.segment, info.value.offset) == (a[0], s)


def test_a_stale_frame_after_a_torn_tail_is_not_taken_for_a_record(tmp_path: Path) -> None:
    records: list[Record] = [created(i, pad=300) for i in range(300)]
    write_log(tmp_path, records)
    segs = segments(tmp_path)
    start, end = frames(segs[-1])[-1]
    s0, e0 = frames(segs[0])[0]
    # a crash tore the last record; beyond it lies an old frame of this log
    overwrite(segs[-1], start + 20, bytes(end - start - 20) + segs[0].read_bytes()[s0:e0])
    log, got = open_log(tmp_path)
    assert enc(got) == enc(records[:-1])
    assert log.stats()["torn_tail_truncations"] == 1
    log.close()


def _foreign_frame(tmp_path: Path) -> bytes:
    """A frame that is valid in some other corral log."""
    other = tmp_path / "other"
    write_log(other, [created(99, pad=10)])
    (seg,) = segments(other)
    start, end = frames(seg)[0]
    return seg.read_bytes()[start:end]


def test_repair_does_not_resync_onto_a_frame_inside_a_payload(tmp_path: Path) -> None:
    embedded = _foreign_frame(tmp_path)
    records: list[Record] = [created(i) for i in range(8)]
    records.insert(4, created(50, payload=msgspec.Raw(msgspec.msgpack.encode(embedded))))
    log_dir = tmp_path / "log"
    write_log(log_dir, records)
    (seg,) = segments(log_dir)
    start, _ = frames(seg)[4]
    flip(seg, start + 1, 3)  # job-50's length: the scan must look for the next frame

    fixed = repair(log_dir)
    assert fixed.lost_jobs == ["job-50"]
    assert enc(replayed(log_dir)) == enc(without(records, 4))


def test_replay_does_not_take_a_torn_payload_frame_for_a_record(tmp_path: Path) -> None:
    embedded = _foreign_frame(tmp_path)
    records: list[Record] = [created(i) for i in range(8)]
    records.append(created(50, payload=msgspec.Raw(msgspec.msgpack.encode(embedded))))
    log_dir = tmp_path / "log"
    write_log(log_dir, records)
    (seg,) = segments(log_dir)
    _, end = frames(seg)[-1]
    os.truncate(seg, end - 2)  # torn after the embedded frame
    log, got = open_log(log_dir)
    assert enc(got) == enc(records[:-1])
    log.close()


# -- the previous format (3) -----------------------------------------------------------


def _write_v3_segment(
    path: Path, seq: int, flags: int, generation: int, records: list[Record]
) -> None:
    """A segment as format 3 wrote it: a 32-byte header whose u16 flags
    follow the version, and CRCs with no seed."""
    head = struct.pack("<8sHHQQ", MAGIC, 3, flags, seq, generation)
    data = bytearray(head + struct.pack("<I", zlib.crc32(head)))
    for r in records:
        code, body = encode_record(r)
        length = len(body) + 1
        crc = zlib.crc32(body, zlib.crc32(struct.pack("<IB", length, code)))
        data += struct.pack("<IIB", length, crc, code) + body
    path.mkdir(parents=True, exist_ok=True)
    (path / f"{seq:020d}.seg").write_bytes(bytes(data) + bytes(1000))


def test_a_log_in_the_previous_format_opens_and_goes_on(tmp_path: Path) -> None:
    old: list[Record] = [created(i) for i in range(30)]
    _write_v3_segment(tmp_path, 1, 1, 0xC0FFEE, old[:20])
    _write_v3_segment(tmp_path, 2, 0, 0xC0FFEE, old[20:])
    assert verify(tmp_path).ok
    log, got = open_log(tmp_path)
    assert enc(got) == enc(old)
    more: list[Record] = [created(i, pad=300) for i in range(100, 400)]
    for r in more:  # into the old last segment, then on into new ones
        log.append(r)
        log.commit(time.monotonic())
    log.close()
    segs = segments(tmp_path)
    versions = [struct.unpack_from("<H", s.read_bytes(), 8)[0] for s in segs]
    assert versions[:2] == [3, 3] and set(versions[2:]) == {FORMAT_VERSION}
    assert enc(replayed(tmp_path)) == enc(old + more)

    # damage in an old segment is repaired like any other
    start, _ = frames(segs[0])[7]
    flip(segs[0], start + 4)
    fixed = repair(tmp_path)
    assert fixed.lost_jobs == ["job-07"]
    assert enc(replayed(tmp_path)) == enc(without(old + more, 7))


def test_compaction_of_an_old_log_writes_the_new_format(tmp_path: Path) -> None:
    old: list[Record] = [created(i) for i in range(10)]
    _write_v3_segment(tmp_path, 1, 1, 42, old)
    log, got = open_log(tmp_path)
    log.compact(got[5:])
    log.close()
    # the base took the sealed segment's number; appends go on in the next
    assert len(segments(tmp_path)) == 2
    for seg in segments(tmp_path):
        assert struct.unpack_from("<H", seg.read_bytes(), 8)[0] == FORMAT_VERSION
    assert enc(replayed(tmp_path)) == enc(old[5:])


def test_a_records_version_this_corral_does_not_know_is_refused(tmp_path: Path) -> None:
    write_log(tmp_path, [created(1)])
    (seg,) = segments(tmp_path)
    data = bytearray(seg.read_bytes())
    data[11] = LOG_FORMAT_VERSION + 1  # the header's record version
    struct.pack_into("<I", data, 28, zlib.crc32(bytes(data[:28])))
    seg.write_bytes(bytes(data))
    with pytest.raises(LogCorrupt) as info:
        open_log(tmp_path)
    assert str(LOG_FORMAT_VERSION + 1) in info.value.reason
    with pytest.raises(LogError, match="another corral"):
        repair(tmp_path)
    assert seg.read_bytes() == bytes(data)  # repair never touches a log it cannot read


# -- directories are made durable --------------------------------------------------------


def _synced_dirs(events: list[tuple[str, Path]], candidates: list[Path]) -> list[Path]:
    return [path for kind, path in events if kind == "fsync" and path in candidates]


def test_creating_the_log_directory_syncs_each_new_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = _spy_syncs(monkeypatch)
    log_dir = tmp_path / "a" / "b" / "log"
    log, _ = open_log(log_dir)
    log.close()
    assert log_dir.is_dir()
    # each created directory's entry is synced in its parent, outermost first
    parents = [tmp_path, tmp_path / "a", tmp_path / "a" / "b"]
    assert _synced_dirs(events, parents) == parents
    events.clear()
    log, _ = open_log(log_dir)  # exists: nothing created, nothing to sync
    log.close()
    assert _synced_dirs(events, parents) == []


def test_the_state_dir_lock_syncs_a_new_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = _spy_syncs(monkeypatch)
    lock = StateDirLock(tmp_path / "state")
    lock.acquire()
    lock.release()
    assert _synced_dirs(events, [tmp_path]) == [tmp_path]


# -- any damage: repair never invents a record and keeps every untouched one ---------------


@settings(max_examples=25)
@given(
    flips=st.lists(
        st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 7)),
        min_size=1,
        max_size=6,
    ),
)
def test_repair_keeps_exactly_the_untouched_records(
    tmp_path_factory: pytest.TempPathFactory, flips: list[tuple[float, int]]
) -> None:
    log_dir = tmp_path_factory.mktemp("fuzz")
    records: list[Record] = [created(i, pad=(i * 37) % 400) for i in range(260)]
    write_log(log_dir, records)
    segs = segments(log_dir)
    # where each record lies: (segment index, start, end)
    places = [(n, s, e) for n, seg in enumerate(segs) for s, e in frames(seg)]
    assert len(places) == len(records)
    ends = [frames(seg)[-1][1] for seg in segs]
    total = sum(ends)
    hit: set[tuple[int, int]] = set()  # (segment index, offset)
    for where, bit in flips:
        offset = int(where * total)
        n = 0
        while offset >= ends[n]:
            offset -= ends[n]
            n += 1
        flip(segs[n], offset, bit)
        hit.add((n, offset))
    headers_hit = {n for n, offset in hit if offset < HEADER_SIZE}
    # every record not hit is kept, but where two flips in one header make
    # its CRC seed unrecoverable
    must_keep = [
        i
        for i, (n, s, e) in enumerate(places)
        if n not in headers_hit and not any(m == n and s <= offset < e for m, offset in hit)
    ]

    repair(log_dir)
    got = enc(replayed(log_dir))
    want = enc(records)
    # a subsequence of what was written: nothing invented, nothing reordered
    it = iter(want)
    assert all(any(g == w for w in it) for g in got)
    kept = set(got)
    assert [i for i in must_keep if want[i] not in kept] == []


def test_an_older_records_version_is_read(tmp_path: Path) -> None:
    """Record types are only added: a log whose segments say records
    version 3 (before JobsCreated and ClockStepped) still opens."""
    write_log(tmp_path, [created(1), created(2)])
    (seg,) = segments(tmp_path)
    data = bytearray(seg.read_bytes())
    data[11] = 3
    struct.pack_into("<I", data, 28, zlib.crc32(bytes(data[:28])))
    seg.write_bytes(bytes(data))
    log, got = open_log(tmp_path)
    assert [r.id for r in got] == ["job-01", "job-02"]  # type: ignore[attr-defined]
    log.close()
