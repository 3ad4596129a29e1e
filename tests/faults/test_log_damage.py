"""Log damage (issue 12, fault 5) on logs a real in-process broker wrote
with ``fsync = "always"``: a torn tail at every offset of the last records
is cut and loses nothing acknowledged; random bit flips anywhere in the used
log are all detected (start refused, or a torn tail cut with a warning) and
none drops an acknowledged record silently, flips in the last record
included; after a refused start ``repair`` names every acknowledged job it
lost. The fast profile runs in ``make test``; the ``soak`` one (1,000 flips,
CORRAL_SOAK_FLIPS) under ``make soak``. Single cases of damage and repair
are in tests/test_logdamage.py and tests/test_log_cli.py."""

from __future__ import annotations

import json
import random
import shutil
import signal
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest
import structlog
from conftest import Env
from inproc import SMALL_LOG, FakeWorker, InProcessBroker, deliveries

import corral
from corral.broker import framing
from corral.broker import protocol as p
from corral.broker.framing import HEADER_SIZE, MARK_CODE, LogCorrupt, check_frame, content_end
from corral.broker.log import Log
from corral.broker.logsurvey import job_ids
from corral.broker.logtools import repair
from corral.broker.records import (
    LOG_FORMAT_VERSION,
    JobCreated,
    Record,
    decode_record,
    encode_record,
)

from .harness import env_int

SIZES = {"segment_size": 1 << 20, "reserve": 16 << 10}


@dataclass
class Frame:
    start: int
    end: int
    code: int
    record: Record | None  # None: a sync mark


@dataclass
class Written:
    """A log as the broker left it at a kill -9: its one segment's bytes,
    its frames, and the offset up to which it had been fsync'd (everything
    acknowledged lies before it)."""

    seg_name: str
    data: bytes
    frames: list[Frame]
    synced: int

    @property
    def used(self) -> int:
        return content_end(self.data)

    @property
    def records(self) -> list[Record]:
        return [f.record for f in self.frames if f.record is not None]

    @property
    def acked(self) -> list[Record]:
        return [f.record for f in self.frames if f.record is not None and f.end <= self.synced]


def walk_frames(data: bytes, seed: int) -> list[Frame]:
    found, pos = [], HEADER_SIZE
    with memoryview(data) as view:
        while pos < content_end(data):
            got = check_frame(data, view, pos, seed)
            assert not isinstance(got, str), (pos, got)
            end, code = got
            body = data[pos + 9 : end]
            found.append(
                Frame(pos, end, code, None if code == MARK_CODE else decode_record(code, body))
            )
            pos = end
    return found


def broker_log(state: Path, jobs: int = 60, unsynced_tail: bool = True) -> Written:
    """Run a broker: ``jobs`` acknowledged enqueues (some batched), a worker
    running some of them. With ``unsynced_tail`` the last passes only start
    and finish jobs: records no reply waits for, written but not fsync'd.
    Then kill -9 it."""
    broker = InProcessBroker(state, fsync="always", extra=SMALL_LOG)
    worker = FakeWorker(broker, credit=1)
    worker.ready()

    held: list[p.Delivery] = []

    def run_some(result: object, limit: int = 2) -> None:
        held.extend(deliveries(worker.inbox()))
        for _ in range(min(limit, len(held))):
            d = held.pop(0)
            held.extend(deliveries(worker.start(d)))
            held.extend(deliveries(worker.finish(d, "ok", result)))

    for i in range(jobs):
        if i % 7 == 3:
            specs = [
                p.JobSpec(f"job-{i}-{n}", "t.task", p.encode_value({"i": i, "pad": "b" * n}))
                for n in range(3)
            ]
            reply = broker.request(p.Enqueue(broker.next_req(), specs))
            assert isinstance(reply, p.EnqueueOk), reply
        else:
            broker.enqueue(payload={"i": i, "pad": "x" * (i % 41)}, id=f"job-{i}")
        if i % 4 == 0:
            run_some(i)
    synced = broker.core.log.synced_position
    assert synced is not None
    if unsynced_tail:
        for _ in range(2):
            run_some("tail")
        assert broker.core.log.synced_position != broker.core.log.written_position
    broker.crash()
    (seg,) = sorted((state / "log").glob("*.seg"))
    data = seg.read_bytes()
    header = framing.parse_header(seg, data)
    return Written(seg.name, data, walk_frames(data, header.seed), synced[1])


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Written:
    got = broker_log(tmp_path_factory.mktemp("written"))
    assert got.acked and len(got.acked) < len(got.records)  # an unsynced tail
    assert sum(f.record is None for f in got.frames) >= 60  # a sync mark per commit
    return got


@pytest.fixture(scope="module")
def acked(tmp_path_factory: pytest.TempPathFactory) -> Written:
    """A log whose broker was killed right after an acknowledgement: its
    last record is an acknowledged one (the case of issue 12's 40 of 40)."""
    got = broker_log(tmp_path_factory.mktemp("acked"), unsynced_tail=False)
    assert len(got.acked) == len(got.records)
    return got


def put(log_dir: Path, w: Written, data: bytes) -> None:
    """Make ``log_dir`` hold ``w``'s segment with ``data`` for its bytes, up
    to a little past where they end (the preallocated zeros beyond change
    nothing, and writing them would only slow the test)."""
    if log_dir.exists():
        for old in log_dir.iterdir():
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / w.seg_name).write_bytes(data[: w.frames[-1].end + 512])


class Opened:
    """One start of the log: the records replayed, or the refusal."""

    def __init__(self, log_dir: Path) -> None:
        self.records: list[Record] = []
        self.refused: LogCorrupt | None = None
        self.torn = 0
        log = Log(log_dir, fsync="never", **SIZES)  # type: ignore[arg-type]
        try:
            self.records = list(log.replay())
        except LogCorrupt as exc:
            self.refused = exc
            return
        self.torn = log.stats()["torn_tail_truncations"]
        log.close()


def enc(records: list[Record]) -> list[tuple[int, bytes]]:
    return [encode_record(r) for r in records]


# -- a torn tail at every offset --------------------------------------------------------


def test_a_torn_tail_at_every_offset_of_the_last_records_loses_nothing_acknowledged(
    written: Written, tmp_path: Path, soak_report: Callable[[str], None]
) -> None:
    """A crash mid-write leaves the unsynced end of the last segment cut
    short, or zeros where the preallocated file was never written: every
    offset from the last fsync'd byte (its sync mark included) to the end."""
    log_dir = tmp_path / "log"
    data, end = written.data, written.frames[-1].end
    trials = lost = cut = 0
    for offset in range(written.synced, end):
        for shape in ("truncated", "zeroed"):
            torn = data[:offset]
            if shape == "zeroed":
                torn += bytes(len(data) - offset)
            put(log_dir, written, torn)
            opened = Opened(log_dir)
            trials += 1
            assert opened.refused is None, (offset, shape, opened.refused)
            got = enc(opened.records)
            lost += got[: len(written.acked)] != enc(written.acked)
            assert got == enc(written.records)[: len(got)], (offset, shape)
            cut += opened.torn
            # a frame cut short (zeros over its own trailing zeros change nothing)
            split = any(
                f.start < offset < f.end and torn[f.start : f.end] != data[f.start : f.end]
                for f in written.frames
            )
            assert opened.torn == split, (offset, shape)
    soak_report(
        f"torn tail: {trials} trials over {end - written.synced} bytes"
        f" ({len(written.records) - len(written.acked)} unsynced records), cut {cut}, lost {lost}"
    )
    assert lost == 0


# -- bit flips ---------------------------------------------------------------------------


def flipped(data: bytes, offset: int, bit: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 1 << bit
    return bytes(out)


def named_in(job_id: str, names: set[str]) -> bool:
    """``job_id`` is among ``names``, or one of them is it with one byte
    changed: the flip hit the id in the record that was lost, and repair
    read the record without its checksum."""
    if job_id in names:
        return True
    return any(
        len(n) == len(job_id) and sum(a != b for a, b in zip(n, job_id, strict=True)) == 1
        for n in names
    )


@dataclass
class FlipCounts:
    trials: int = 0
    refused: int = 0
    torn_cut: int = 0
    undetected: int = 0
    silently_lost: int = 0  # acknowledged records gone with start not refused
    unreported: int = 0  # acknowledged jobs a repair lost without naming them
    repaired_jobs_lost: int = 0
    in_last_record: int = 0
    repaired: int = 0

    def __str__(self) -> str:
        return (
            f"flips={self.trials} (in the last record: {self.in_last_record})"
            f" detected={self.refused + self.torn_cut} (refused start: {self.refused},"
            f" torn tail cut with a warning: {self.torn_cut}) undetected={self.undetected}"
            f" silently_lost={self.silently_lost} repaired={self.repaired}"
            f" repair_lost_jobs={self.repaired_jobs_lost} unreported_by_repair={self.unreported}"
        )


def flip_trial(
    w: Written, log_dir: Path, offset: int, bit: int, counts: FlipCounts, mend: bool = True
) -> None:
    """One flip at ``offset``: the start is refused, or it replays every
    acknowledged record and reports a cut torn tail. With ``mend`` a
    refused start is repaired, and every acknowledged job the repair lost
    must be named."""
    put(log_dir, w, flipped(w.data, offset, bit))
    counts.trials += 1
    opened = Opened(log_dir)
    if opened.refused is None:
        got = enc(opened.records)
        counts.torn_cut += opened.torn
        counts.undetected += not opened.torn
        if got[: len(w.acked)] != enc(w.acked):
            counts.silently_lost += 1
        return
    counts.refused += 1
    if not mend:
        return
    counts.repaired += 1
    report = repair(log_dir)
    again = Opened(log_dir)
    assert again.refused is None and again.torn == 0, again.refused
    kept = set(enc(again.records))
    names = set(report.lost_jobs) | set(report.changed_jobs)
    names |= {h.id for d in report.damaged for h in d.held if h.id}
    for record in w.acked:
        if encode_record(record) in kept:
            continue
        made, changed = job_ids(record)
        counts.repaired_jobs_lost += len(made)
        counts.unreported += sum(not named_in(i, names) for i in made + changed)


def flip_campaign(
    w: Written, log_dir: Path, rng: random.Random, flips: int, mend_every: int = 1
) -> FlipCounts:
    """``flips`` random flips over the used log (header, records, sync
    marks), a fifth of them in the last acknowledged record; the refused
    starts of those and of every ``mend_every``-th other are repaired (a
    repair fsyncs a dozen files: slow on a busy disk)."""
    counts = FlipCounts()
    last = next(f for f in reversed(w.frames) if f.record is not None and f.end <= w.synced)
    others = 0
    for n in range(flips):
        in_last = n % 5 == 0
        if in_last:
            offset = rng.randrange(last.start, last.end)
            counts.in_last_record += 1
        else:
            offset = rng.randrange(w.used)
            others += 1
        mend = in_last or others % mend_every == 0
        flip_trial(w, log_dir, offset, rng.randrange(8), counts, mend)
    return counts


def check_flips(counts: FlipCounts) -> None:
    assert counts.undetected == 0, counts
    assert counts.silently_lost == 0, counts
    assert counts.unreported == 0, counts


def test_bit_flips_are_all_detected_and_none_drops_an_acknowledged_record(
    acked: Written,
    tmp_path: Path,
    soak_rng: random.Random,
    soak_report: Callable[[str], None],
) -> None:
    counts = flip_campaign(acked, tmp_path / "log", soak_rng, 200, mend_every=5)
    soak_report(str(counts))
    check_flips(counts)


@pytest.mark.soak
def test_bit_flips_soak(
    tmp_path: Path, soak_rng: random.Random, soak_report: Callable[[str], None]
) -> None:
    w = broker_log(tmp_path / "state", jobs=400, unsynced_tail=False)
    counts = flip_campaign(w, tmp_path / "log", soak_rng, env_int("CORRAL_SOAK_FLIPS", 1000))
    soak_report(str(counts))
    check_flips(counts)


def test_a_flip_in_the_last_acknowledged_record_is_corruption_not_a_torn_tail(
    tmp_path: Path,
) -> None:
    """The case the campaign found 40 times of 40: the broker was killed
    right after acknowledging, so the record is the last one in the log.
    Its sync mark follows it, so the start is refused and repair names it."""
    w = broker_log(tmp_path / "state", jobs=3, unsynced_tail=False)
    last = [f for f in w.frames if f.record is not None][-1]
    assert last.end <= w.synced and isinstance(last.record, JobCreated)
    assert w.frames[-1].code == MARK_CODE  # what follows it: its sync mark
    for offset in (last.start, last.start + 4, last.start + 8, last.end - 1):
        put(tmp_path / "log", w, flipped(w.data, offset, 2))
        opened = Opened(tmp_path / "log")
        assert opened.refused is not None, offset
        assert "not a torn write" in opened.refused.reason
        assert repair(tmp_path / "log").lost_jobs == [last.record.id]


def test_a_flip_in_the_last_sync_mark_loses_no_record(tmp_path: Path) -> None:
    """The one flip a start takes for a torn write: in the sync mark the
    log wrote last, after its last fsync, which is no record. It is cut
    with a warning."""
    w = broker_log(tmp_path / "state", jobs=3, unsynced_tail=False)
    mark = w.frames[-1]
    assert mark.code == MARK_CODE
    with structlog.testing.capture_logs() as logs:
        put(tmp_path / "log", w, flipped(w.data, mark.start + 10, 0))
        opened = Opened(tmp_path / "log")
    assert opened.refused is None and opened.torn == 1
    assert enc(opened.records) == enc(w.records)
    assert [e["offset"] for e in logs if e["event"] == "log.torn_tail"] == [mark.start]


def test_a_flip_after_the_last_sync_mark_cuts_only_what_was_never_synced(
    written: Written, tmp_path: Path
) -> None:
    """Records written after the last fsync, one bit of one flipped: no
    sync mark vouches for them, and a flip there cannot be told from a
    write that a power loss tore, so the tail is cut from it with a warning
    naming the bytes dropped; every acknowledged record stays."""
    tail = [f for f in written.frames if f.start >= written.synced and f.record is not None]
    hit = tail[0]
    with structlog.testing.capture_logs() as logs:
        put(tmp_path / "log", written, flipped(written.data, hit.start + 12, 3))
        opened = Opened(tmp_path / "log")
    assert opened.refused is None and opened.torn == 1
    assert enc(opened.records) == enc(written.records)[: len(opened.records)]
    assert len(opened.records) >= len(written.acked)
    (event,) = [e for e in logs if e["event"] == "log.torn_tail"]
    assert event["offset"] == hit.start and event["dropped_bytes"] > 0


# -- end to end: a real broker refuses, repair names the job, the broker starts ----------


def test_a_broker_killed_after_an_ack_refuses_a_damaged_last_record_until_repair(
    env: Env,
) -> None:
    """``corral broker`` SIGKILLed right after acknowledging an enqueue; one
    bit of that last record flips on disk. The next start is refused with
    the segment and what to run; ``corral log repair`` names the job; the
    broker then starts with every other job."""
    env.write_config(extra_broker=SMALL_LOG)
    broker = env.start("broker")
    env.wait_ready(broker)
    client = env.client()
    ids = [client.enqueue("e2e.square", n) for n in range(10)]
    broker.signal(signal.SIGKILL)
    assert broker.wait(30) == -signal.SIGKILL
    log_dir = env.home / "state" / "log"
    (segment,) = sorted(log_dir.glob("*.seg"))
    data = segment.read_bytes()
    header = framing.parse_header(segment, data)
    frames = walk_frames(data, header.seed)
    last = [f for f in frames if f.record is not None][-1]
    assert isinstance(last.record, JobCreated) and last.record.id == ids[-1]
    segment.write_bytes(flipped(data, last.end - 3, 4))

    refused = env.start("broker", name="broker-refused")
    assert refused.wait(60) != 0
    out = refused.output()
    assert "broker.cannot_start" in out and "not a torn write" in out
    assert str(segment) in out and "corral log repair" in out

    done = env.run("log", "repair", "--json", "-c", str(env.config))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["lost_jobs"] == [ids[-1]]

    broker = env.start("broker", name="broker-repaired")
    env.wait_ready(broker)
    client = env.client()
    assert [client.job(i).status for i in ids[:-1]] == ["queued"] * 9
    with pytest.raises(corral.JobNotFound):
        client.job(ids[-1])


def test_unsynced_writes_that_reached_the_disk_out_of_order_are_a_torn_tail(
    written: Written, tmp_path: Path
) -> None:
    """Power loss: of the writes after the last fsync, a later one reached
    the disk and an earlier one did not (zeros, or garbage). No sync mark
    vouches for the hole, so the tail is cut from it, with a warning, and
    every acknowledged record stays; the same hole before a sync mark is
    corruption."""
    data = written.data
    tail = [f for f in written.frames if f.start >= written.synced]
    assert len(tail) >= 3
    for hole in tail[:-1]:
        for fill in (bytes(hole.end - hole.start), random.Random(hole.start).randbytes(9)):
            torn = data[: hole.start] + fill + data[hole.start + len(fill) :]
            put(tmp_path / "log", written, torn)
            opened = Opened(tmp_path / "log")
            assert opened.refused is None and opened.torn == 1, hole
            assert enc(opened.records) == enc(written.records)[: len(opened.records)]
            assert len(opened.records) >= len(written.acked)
    acked = [f for f in written.frames if f.record is not None and f.end <= written.synced]
    hole = acked[-1]
    put(tmp_path / "log", written, data[: hole.start] + bytes(9) + data[hole.start + 9 :])
    assert Opened(tmp_path / "log").refused is not None


# -- the previous format ---------------------------------------------------------------


def _write_v4_segment(
    path: Path, seq: int, flags: int, generation: int, records: list[Record]
) -> None:
    """A segment as format 4 wrote it: seeded CRCs, no sync marks."""
    head = struct.pack("<8sHBBQQ", framing.MAGIC, 4, flags, LOG_FORMAT_VERSION, seq, generation)
    data = bytearray(head + struct.pack("<I", zlib.crc32(head)))
    seed = framing.segment_seed(4, generation, seq)
    for r in records:
        framing.frame_into(data, r, seed)
    path.mkdir(parents=True, exist_ok=True)
    (path / f"{seq:020d}.seg").write_bytes(bytes(data) + bytes(1000))


def _created(i: int) -> JobCreated:
    payload = msgspec.Raw(msgspec.msgpack.encode({"i": i, "p": "z" * 300}))
    return JobCreated(
        id=f"job-{i}", task="t", payload=payload, queue="q", priority=0, seq=i, created_at=1.0
    )


def test_a_format_4_log_is_read_and_appended_to_without_marks(tmp_path: Path) -> None:
    old: list[Record] = [_created(i) for i in range(20)]
    _write_v4_segment(tmp_path, 1, framing.FLAG_BASE, 0xBEEF, old)
    log = Log(tmp_path, fsync="always", segment_size=64 << 10, reserve=8 << 10)
    assert enc(list(log.replay())) == enc(old)
    more: list[Record] = [_created(i) for i in range(100, 400)]
    for r in more:  # into the old last segment, then on into new ones
        log.append(r)
        log.commit(0.0)
    log.close()
    segs = sorted(tmp_path.glob("*.seg"))
    versions = [framing.read_header(s).version for s in segs]
    assert versions[0] == 4 and set(versions[1:]) == {framing.FORMAT_VERSION}
    codes = [
        {f.code for f in walk_frames(s.read_bytes(), framing.read_header(s).seed)} for s in segs
    ]
    assert MARK_CODE not in codes[0]  # the corral that wrote it can still read it
    assert all(MARK_CODE in c for c in codes[1:])
    assert enc(Opened(tmp_path).records) == enc(old + more)

    # in a segment without marks, damage with a valid record after it is corruption
    first = walk_frames(segs[0].read_bytes(), framing.read_header(segs[0]).seed)
    data = segs[0].read_bytes()
    segs[0].write_bytes(flipped(data, first[-2].start + 20, 1))
    (tmp_path / "held").mkdir()
    for s in segs[1:]:
        s.rename(tmp_path / "held" / s.name)  # make the format-4 segment the last one
    refused = Opened(tmp_path).refused
    assert refused is not None and "a valid record follows" in refused.reason
