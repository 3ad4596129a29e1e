"""corral's durable log: append-only, segmented, checksummed, with group commit.

The log stores :class:`~corral.broker.records.Record` values and knows nothing
of jobs or sockets. Files live in one directory:

* ``NNNNNNNNNNNNNNNNNNNN.seg`` segments, numbered without gaps. Each starts with
  a 32-byte header: magic ``CORRALOG``, format version (u16), flags (u16, bit 0
  = BASE: a full history starts here), sequence number (u64), the log's random
  generation id (u64) and a CRC32 of the preceding 28 bytes.
* Each record is framed as u32 length (of type + body), u32 CRC32 (over the
  length field, the type and the body), u8 type code, msgpack body.

Segments are preallocated, so the zero-filled tail of a segment is the end of
the log, and a full disk shows up when the next segment is allocated rather
than in the middle of a record. The last ``reserve`` bytes of a segment are
kept for records about existing jobs once the disk is full (:attr:`Log.full`).

Replay starts at the last BASE segment. Only the last segment may end in a
torn record (older ones are fsync'd before the next one exists): it is cut
with a warning. A bad record followed by a valid one is corruption and the
log refuses to open (:class:`LogCorrupt`); :func:`verify` and :func:`repair`
handle it offline.

``append()`` only frames into memory; ``commit()`` issues one write and at most
one fdatasync for everything appended since (group commit). A failed fsync
is never retried (:class:`FsyncFailed`): the caller exits and replays.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import re
import secrets
import shutil
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from struct import Struct
from typing import NamedTuple, NoReturn

import msgspec
import structlog

from corral.broker.records import (
    LOG_FORMAT_VERSION,
    Record,
    RecordError,
    decode_record,
    encode_record,
    is_known_code,
)

MiB = 1024 * 1024
MAGIC = b"CORRALOG"
FLAG_BASE = 1
#: Largest ``length`` field accepted (type byte + body).
MAX_RECORD = 64 * MiB
POLICIES = ("always", "interval", "never")

_HEADER = Struct("<8sHHQQ")
_U32 = Struct("<I")
HEADER_SIZE = _HEADER.size + _U32.size
_FRAME = Struct("<IIB")  # length, crc, type
_LEN_TYPE = Struct("<IB")  # what the CRC covers before the body
_SEG_RE = re.compile(r"^(\d{20})\.seg$")
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_NO_FALLOCATE = frozenset({errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})
_ALLOC_RETRY = 1.0
_crc32 = zlib.crc32
_log = structlog.get_logger(__name__)


class LogError(Exception):
    """Base of the log's errors."""


class LogCorrupt(LogError):
    """A segment holds a bad record (or header) that is not a torn tail."""

    def __init__(self, segment: str | os.PathLike[str], offset: int, reason: str) -> None:
        self.segment = Path(segment)
        self.offset = offset
        self.reason = reason
        super().__init__(
            f"log segment {self.segment} is corrupt at offset {offset}: {reason}; nothing was"
            " started. Run `corral log verify` to inspect it and `corral log repair` to cut"
            " the log at that point (a backup is kept)."
        )


class LogDiskFull(LogError):
    """A write could not be done, even into the reserve."""


class FsyncFailed(LogError):
    """fsync/fdatasync failed: the caller must exit, never retry."""


class VerifyReport(msgspec.Struct):
    segments: int
    records: int
    ok: bool  # False only for corruption: a torn tail is cut on start
    torn_tail: tuple[str, int] | None = None
    corrupt: tuple[str, int, str] | None = None


class RepairReport(msgspec.Struct):
    action: str  # "none" | "truncated_tail" | "cut"
    records_kept: int
    bytes_dropped: int
    segment: str | None = None
    offset: int | None = None
    backup: str | None = None


# -- file helpers -----------------------------------------------------------


def _seg_path(directory: Path, seq: int) -> Path:
    return directory / f"{seq:020d}.seg"


def _list_segments(directory: Path) -> list[tuple[int, Path]]:
    found = []
    for entry in os.scandir(directory):
        match = _SEG_RE.match(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), Path(entry.path)))
    return sorted(found)


def _pack_header(flags: int, seq: int, generation: int) -> bytes:
    head = _HEADER.pack(MAGIC, LOG_FORMAT_VERSION, flags, seq, generation)
    return head + _U32.pack(_crc32(head))


class _Header(NamedTuple):
    flags: int
    seq: int
    generation: int


def _parse_header(path: Path, raw: bytes) -> _Header:
    if len(raw) < HEADER_SIZE:
        raise LogCorrupt(path, 0, f"short segment header ({len(raw)} bytes)")
    magic, version, flags, seq, generation = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise LogCorrupt(path, 0, f"bad magic {magic!r}: not a corral log segment")
    if version != LOG_FORMAT_VERSION:
        raise LogCorrupt(
            path,
            0,
            f"log format version {version} found, this corral supports version"
            f" {LOG_FORMAT_VERSION}",
        )
    if _U32.unpack_from(raw, _HEADER.size)[0] != _crc32(raw[: _HEADER.size]):
        raise LogCorrupt(path, 0, "segment header checksum mismatch")
    return _Header(flags, seq, generation)


def _read_header(path: Path) -> _Header:
    with open(path, "rb") as f:
        return _parse_header(path, f.read(HEADER_SIZE))


def _preallocate(fd: int, size: int) -> None:
    """Reserve disk blocks up to ``size``; silently skipped where unsupported."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is None:
        return
    try:
        fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in _NO_FALLOCATE:
            raise


def _write_all(fd: int, data: bytes | bytearray, offset: int) -> None:
    with memoryview(data) as view:
        done = 0
        while done < len(view):
            n = os.pwrite(fd, view[done:], offset + done)
            if n <= 0:
                raise OSError(errno.ENOSPC, "short write")
            done += n


def _frame_into(buf: bytearray, record: Record) -> int:
    """Append ``record``'s frame to ``buf``; return the frame's size."""
    code, body = encode_record(record)
    length = len(body) + 1
    if length > MAX_RECORD:
        raise LogError(f"record of {length} bytes is over the {MAX_RECORD} byte limit")
    buf += _FRAME.pack(length, _crc32(body, _crc32(_LEN_TYPE.pack(length, code))), code)
    buf += body
    return length + 8


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:
        raise FsyncFailed(f"fsync of directory {directory} failed: {exc}") from exc
    finally:
        os.close(fd)


# -- reading ----------------------------------------------------------------


def _check_frame(data: bytes, view: memoryview, pos: int) -> tuple[int, int] | str:
    """Return ``(end, code)`` of the valid frame at ``pos``, or why it is not one."""
    if pos + _FRAME.size > len(data):
        return "short record header"
    length, crc, code = _FRAME.unpack_from(data, pos)
    if length == 0 or length > MAX_RECORD:
        return f"invalid record length {length}"
    end = pos + 8 + length
    if end > len(data):
        return f"record length {length} runs past the end of the segment"
    if _crc32(view[pos + 8 : end], _crc32(view[pos : pos + 4])) != crc:
        return "record checksum mismatch"
    if not is_known_code(code):
        return f"unknown record type {code}"
    return end, code


def _next_valid_frame(data: bytes, start: int, stop: int) -> int:
    """Offset of the first valid frame starting in ``[start, stop)``, or -1."""
    size = len(data)
    unpack = _FRAME.unpack_from
    with memoryview(data) as view:
        for pos in range(start, min(stop, size - _FRAME.size + 1)):
            length, crc, code = unpack(data, pos)
            end = pos + 8 + length
            if (
                0 < length <= MAX_RECORD
                and end <= size
                and is_known_code(code)
                and _crc32(view[pos + 8 : end], _crc32(view[pos : pos + 4])) == crc
            ):
                return pos
    return -1


def _content_end(data: bytes) -> int:
    """One past the last non-zero byte, without copying a whole segment."""
    end = len(data)
    while end > 0:
        start = max(0, end - 1 * MiB)
        kept = len(data[start:end].rstrip(b"\0"))
        if kept:
            return start + kept
        end = start
    return 0


class _Scan:
    """Walk one segment's records up to its clean end or its first bad record.

    Afterwards ``pos`` is where the good records end and ``reason`` says why
    the walk stopped early (None at a clean end). ``stop`` is one past the
    last non-zero byte: beyond it lie only preallocated zeros."""

    def __init__(self, path: Path, data: bytes) -> None:
        self.path = path
        self.data = data
        self.stop = _content_end(data)
        self.pos = HEADER_SIZE
        self.reason: str | None = None
        self.records = 0

    def __iter__(self) -> Iterator[Record]:
        data = self.data
        with memoryview(data) as view:
            while self.pos < self.stop:
                pos = self.pos
                got = _check_frame(data, view, pos)
                if isinstance(got, str):
                    self.reason = got
                    return
                end, code = got
                try:  # a bytes slice, so a kept Raw pins only its own record
                    record = decode_record(code, data[pos + 9 : end])
                except RecordError as exc:
                    self.reason = str(exc)
                    return
                self.pos = end
                self.records += 1
                yield record

    def problem(self, last: bool) -> LogCorrupt | None:
        """The corruption this walk found; None for a clean end or a torn tail."""
        if self.reason is None:
            return None
        if not last:
            return LogCorrupt(self.path, self.pos, self.reason)
        valid = _next_valid_frame(self.data, self.pos + 1, self.stop)
        if valid < 0:
            return None
        return LogCorrupt(
            self.path, self.pos, f"{self.reason}, and a valid record follows at offset {valid}"
        )


def _plan(directory: Path) -> tuple[list[tuple[int, Path]], list[Path], int]:
    """Return (segments from the last BASE on, older segments, generation)."""
    segments = _list_segments(directory)
    if not segments:
        return [], [], 0
    headers: dict[int, _Header] = {}
    base = -1
    for i in range(len(segments) - 1, -1, -1):
        seq, path = segments[i]
        header = headers[seq] = _read_header(path)
        if header.seq != seq:
            raise LogCorrupt(path, 0, f"header says segment {header.seq}")
        if header.flags & FLAG_BASE:
            base = i
            break
    if base < 0:
        raise LogCorrupt(segments[0][1], 0, "no base segment: the start of the log is missing")
    live = segments[base:]
    generation = headers[live[0][0]].generation
    for (prev, _), (seq, path) in itertools.pairwise(live):
        if seq != prev + 1:
            raise LogCorrupt(path, 0, f"segment {prev + 1} is missing")
        if headers[seq].generation != generation:
            raise LogCorrupt(path, 0, "segment belongs to another log (generation id differs)")
    return live, [p for _, p in segments[:base]], generation


# -- the log ----------------------------------------------------------------


@dataclass
class _Active:
    """The segment appends go to."""

    fd: int
    path: Path
    seq: int
    end: int  # where the next write goes
    synced: int  # offset known to be on disk


@dataclass
class _Counters:
    fsyncs: int = 0
    torn: int = 0
    since_compaction: int = 0
    finished: list[tuple[Path, int]] = field(default_factory=list)  # (path, used bytes)


class Log:
    """An append-only segmented log; see the module docstring."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        fsync: str = "always",
        fsync_interval: float = 1.0,
        segment_size: int = 64 * MiB,
        reserve: int = 4 * MiB,
    ) -> None:
        if fsync not in POLICIES:
            raise ValueError(f"fsync must be one of {', '.join(POLICIES)}, not {fsync!r}")
        if fsync_interval < 0:
            raise ValueError("fsync_interval must be >= 0")
        if segment_size < 4096 or not 0 <= reserve <= segment_size - 2 * HEADER_SIZE:
            raise ValueError("need segment_size >= 4096 and 0 <= reserve < segment_size")
        self.directory = Path(directory)
        self.fsync = fsync
        self.fsync_interval = fsync_interval
        self.segment_size = segment_size
        self.reserve = reserve
        self._limit = segment_size - reserve
        self._pending = bytearray()
        self._active: _Active | None = None
        self._generation = 0
        self._dirty = False
        self._last_sync: float | None = None
        self._full = False
        self._retry_alloc_at = 0.0
        self._failed: LogError | None = None
        self._appended = 0
        self._n = _Counters()

    # -- opening

    def replay(self) -> Iterator[Record]:
        """Yield every record in order; afterwards the log is open for appends.

        Creates the directory and first segment if missing, finishes an
        interrupted compaction, cuts a torn tail (warning ``log.torn_tail``)
        and raises :class:`LogCorrupt` for anything worse."""
        if self._active is not None:
            raise LogError("the log is already open")
        self.directory.mkdir(parents=True, exist_ok=True)
        self._remove_tmp_files()
        self._n = _Counters()
        live, stale, self._generation = _plan(self.directory)
        if not live:
            self._generation = secrets.randbits(64)
            try:
                fd, path = self._create_segment(1, FLAG_BASE, b"")
            except OSError as exc:
                cls = LogDiskFull if exc.errno in _DISK_FULL else LogError
                raise cls(f"cannot create the first log segment: {exc}") from exc
            self._active = _Active(fd, path, 1, HEADER_SIZE, HEADER_SIZE)
            return
        self._remove_stale(stale)
        for i, (_, path) in enumerate(live):
            scan = _Scan(path, path.read_bytes())
            yield from scan
            problem = scan.problem(last=i == len(live) - 1)
            if problem is not None:
                raise problem
            self._n.since_compaction += scan.pos - HEADER_SIZE
            if i < len(live) - 1:
                self._n.finished.append((path, scan.pos))
        self._open_last(live[-1][0], scan)

    def _remove_tmp_files(self) -> None:
        for tmp in sorted(self.directory.glob("*.tmp")):
            tmp.unlink(missing_ok=True)
            _log.info("log.tmp_removed", file=str(tmp))

    def _remove_stale(self, stale: list[Path]) -> None:
        if not stale:
            return
        for path in stale:
            path.unlink(missing_ok=True)
        _fsync_dir(self.directory)
        _log.info("log.stale_segments_removed", segments=[p.name for p in stale])

    def _open_last(self, seq: int, scan: _Scan) -> None:
        fd = os.open(scan.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            if scan.reason is not None:
                self._cut_torn_tail(fd, scan)
            if os.fstat(fd).st_size < self.segment_size:
                self._try_preallocate(fd, time.monotonic())
        except BaseException:
            os.close(fd)
            raise
        self._active = _Active(fd, scan.path, seq, scan.pos, scan.pos)

    def _cut_torn_tail(self, fd: int, scan: _Scan) -> None:
        os.ftruncate(fd, scan.pos)
        try:
            os.fsync(fd)
        except OSError as exc:
            raise FsyncFailed(f"fsync of {scan.path} failed: {exc}") from exc
        self._n.torn += 1
        _log.warning(
            "log.torn_tail",
            segment=str(scan.path),
            offset=scan.pos,
            dropped_bytes=scan.stop - scan.pos,
            reason=scan.reason,
        )

    def _try_preallocate(self, fd: int, now: float) -> None:
        try:
            _preallocate(fd, self.segment_size)
        except OSError as exc:
            if exc.errno not in _DISK_FULL:
                raise LogError(f"cannot preallocate log segment: {exc}") from exc
            self._mark_full(now, exc)

    def _create_segment(self, seq: int, flags: int, body: bytes | bytearray) -> tuple[int, Path]:
        """Create segment ``seq`` atomically: tmp file, preallocate, fsync, rename."""
        tmp = self.directory / f"{seq:020d}.tmp"
        final = _seg_path(self.directory, seq)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            _write_all(fd, _pack_header(flags, seq, self._generation), 0)
            _write_all(fd, body, HEADER_SIZE)
            _preallocate(fd, self.segment_size)
            os.fsync(fd)
            os.rename(tmp, final)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        try:
            _fsync_dir(self.directory)
        except BaseException:
            os.close(fd)
            raise
        return fd, final

    # -- appending

    def append(self, record: Record) -> int:
        """Frame ``record`` into the pending buffer (no I/O); return its framed size."""
        code, body = encode_record(record)  # the hot path: _frame_into, inlined
        length = len(body) + 1
        if length > MAX_RECORD:
            raise LogError(f"record of {length} bytes is over the {MAX_RECORD} byte limit")
        pending = self._pending
        pending += _FRAME.pack(length, _crc32(body, _crc32(_LEN_TYPE.pack(length, code))), code)
        pending += body
        self._appended += 1
        return length + 8

    @property
    def pending(self) -> int:
        return len(self._pending)

    def commit(self, now: float, durable: bool = True) -> bool:
        """Write the pending buffer in one call, then fdatasync per policy.

        ``now`` is ``time.monotonic()``. With ``durable=False`` (nothing the
        caller is about to acknowledge depends on it) an fsync=always log
        syncs as an interval one would: soon, but not for this commit.
        Returns True if an fsync happened."""
        active = self._open_for_write()
        if self._pending:
            self._write_pending(active, now)
        if not self._dirty or self.fsync == "never":
            return False
        if self.fsync == "interval" or not durable:
            if self._last_sync is None:
                self._last_sync = now  # the interval clock starts at the first commit
            if now - self._last_sync < self.fsync_interval:
                return False
        self._datasync(now)
        return True

    def next_sync_due(self, now: float) -> float | None:
        """Seconds until fsync=interval owes a sync of unsynced data, else None."""
        if self.fsync != "interval" or not (self._dirty or self._pending):
            return None
        if self._last_sync is None:
            return self.fsync_interval
        return max(0.0, self._last_sync + self.fsync_interval - now)

    def sync(self) -> None:
        """Write everything pending and fdatasync it now, whatever the policy."""
        active = self._open_for_write()
        now = time.monotonic()
        if self._pending:
            self._write_pending(active, now)
        if self._dirty:
            self._datasync(now)

    def _open_for_write(self) -> _Active:
        if self._failed is not None:
            raise type(self._failed)(f"the log is unusable after an earlier error: {self._failed}")
        if self._active is None:
            raise LogError("the log is not open: iterate replay() first")
        return self._active

    def _write_pending(self, active: _Active, now: float) -> None:
        data = self._pending
        crosses = active.end + len(data) > self._limit and active.end > HEADER_SIZE
        if crosses and (not self._full or now >= self._retry_alloc_at):
            active = self._roll(active, now)
        self._pending = bytearray()
        start = active.end
        try:
            _write_all(active.fd, data, start)
        except OSError as exc:
            self._undo_write(active, start, exc)
        active.end = start + len(data)
        self._dirty = True
        self._n.since_compaction += len(data)

    def _undo_write(self, active: _Active, start: int, exc: OSError) -> NoReturn:
        """Drop a partly written buffer so no half record stays behind, then raise."""
        try:
            os.ftruncate(active.fd, start)
        except OSError as trunc_exc:
            self._failed = LogError(f"cannot cut a failed write in {active.path}: {trunc_exc}")
            raise self._failed from exc
        with contextlib.suppress(OSError):  # a full disk: later writes extend the file
            _preallocate(active.fd, self.segment_size)
        if exc.errno in _DISK_FULL:
            _log.error("log.write_failed_disk_full", segment=str(active.path), error=str(exc))
            raise LogDiskFull(f"log write to {active.path} failed, disk full: {exc}") from exc
        self._failed = LogError(f"log write to {active.path} failed: {exc}")
        raise self._failed from exc

    def _roll(self, old: _Active, now: float) -> _Active:
        """Finish ``old`` and switch to a new segment; on a full disk stay on ``old``."""
        if self._dirty:  # old data must be durable before a later segment exists
            self._datasync(now)
        try:
            fd, path = self._create_segment(old.seq + 1, 0, b"")
        except OSError as exc:
            if exc.errno not in _DISK_FULL:
                raise LogError(f"cannot create log segment {old.seq + 1}: {exc}") from exc
            self._mark_full(now, exc)
            return old
        if self._full:
            self._full = False
            _log.info("log.disk_space_available", segment=str(path))
        os.ftruncate(old.fd, old.end)
        self._fsync_fd(old.fd, old.path)
        os.close(old.fd)
        self._n.finished.append((old.path, old.end))
        self._active = _Active(fd, path, old.seq + 1, HEADER_SIZE, HEADER_SIZE)
        return self._active

    def _mark_full(self, now: float, exc: OSError) -> None:
        if not self._full:
            _log.error("log.disk_full", directory=str(self.directory), error=str(exc))
        self._full = True
        self._retry_alloc_at = now + _ALLOC_RETRY

    def _fsync_fd(self, fd: int, path: Path) -> None:
        try:
            os.fsync(fd)
        except OSError as exc:
            self._failed = FsyncFailed(f"fsync of {path} failed: {exc}")
            raise self._failed from exc

    def _datasync(self, now: float) -> None:
        active = self._active
        assert active is not None
        try:
            os.fdatasync(active.fd)
        except OSError as exc:
            self._failed = FsyncFailed(
                f"fdatasync of {active.path} failed: {exc}; exit and replay, never retry"
            )
            raise self._failed from exc
        self._n.fsyncs += 1
        self._last_sync = now
        self._dirty = False
        active.synced = active.end

    # -- state

    @property
    def full(self) -> bool:
        """True while the next segment could not be allocated: refuse new jobs."""
        return self._full

    @property
    def synced_position(self) -> tuple[Path, int] | None:
        """(segment, offset) up to which the log is known to be on disk."""
        active = self._active
        return None if active is None else (active.path, active.synced)

    @property
    def written_position(self) -> tuple[Path, int] | None:
        """(segment, offset) where the next write goes."""
        active = self._active
        return None if active is None else (active.path, active.end)

    @property
    def bytes_since_compaction(self) -> int:
        """Record bytes since the last base segment (after a restart: all of them)."""
        return self._n.since_compaction + len(self._pending)

    def stats(self) -> dict[str, int]:
        active = self._active
        paths = [p for p, _ in self._n.finished] + ([active.path] if active else [])
        return {
            "segments": len(paths),
            "disk_bytes": sum(os.stat(p).st_blocks * 512 for p in paths),
            "used_bytes": sum(u for _, u in self._n.finished) + (active.end if active else 0),
            "records_appended": self._appended,
            "fsyncs": self._n.fsyncs,
            "torn_tail_truncations": self._n.torn,
            "full": int(self._full),
        }

    # -- compaction and closing

    def compact(self, live: Iterable[Record]) -> None:
        """Rewrite the log as exactly ``live`` in a new base segment, atomically."""
        active = self._open_for_write()
        if self._pending:
            raise LogError("compact() with uncommitted records: commit() first")
        body = bytearray()
        count = 0
        for record in live:
            _frame_into(body, record)
            count += 1
        try:
            fd, path = self._create_segment(active.seq + 1, FLAG_BASE, body)
        except OSError as exc:
            cls = LogDiskFull if exc.errno in _DISK_FULL else LogError
            raise cls(f"compaction could not write a new base segment: {exc}") from exc
        old = [p for p, _ in self._n.finished] + [active.path]
        os.close(active.fd)
        end = HEADER_SIZE + len(body)
        self._active = _Active(fd, path, active.seq + 1, end, end)
        self._dirty = self._full = False
        self._n.finished = []
        self._n.since_compaction = 0
        for p in old:
            p.unlink(missing_ok=True)
        _fsync_dir(self.directory)
        _log.info("log.compacted", records=count, bytes=end, removed_segments=len(old))

    def close(self) -> None:
        """Write and sync what is pending, then close; idempotent."""
        if self._active is None:
            return
        try:
            if self._failed is None:
                self.sync()  # may roll to a new segment
        finally:
            os.close(self._active.fd)
            self._active = None


# -- offline tools ----------------------------------------------------------


@dataclass
class _Analysis:
    segments: list[tuple[int, Path]]
    records: int = 0
    torn: tuple[Path, int, int] | None = None  # segment, offset, stop
    corrupt: LogCorrupt | None = None
    corrupt_stop: int = 0


def _analyze(directory: Path) -> _Analysis:
    if not directory.is_dir():
        raise LogError(f"no log directory at {directory}")
    try:
        live, _, _ = _plan(directory)
    except LogCorrupt as exc:
        return _Analysis(_list_segments(directory), corrupt=exc)
    result = _Analysis(live)
    for i, (_, path) in enumerate(live):
        scan = _Scan(path, path.read_bytes())
        for _ in scan:
            pass
        result.records += scan.records
        problem = scan.problem(last=i == len(live) - 1)
        if problem is not None:
            result.corrupt, result.corrupt_stop = problem, scan.stop
            break
        if scan.reason is not None:
            result.torn = (path, scan.pos, scan.stop)
    return result


def verify(directory: str | os.PathLike[str]) -> VerifyReport:
    """Check a log offline without changing anything."""
    a = _analyze(Path(directory))
    report = VerifyReport(segments=len(a.segments), records=a.records, ok=a.corrupt is None)
    if a.torn is not None:
        report.torn_tail = (str(a.torn[0]), a.torn[1])
    if a.corrupt is not None:
        report.corrupt = (str(a.corrupt.segment), a.corrupt.offset, a.corrupt.reason)
    return report


def _truncate_file(path: Path, size: int) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def _new_backup_dir(directory: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    backup = directory / f"backup-{stamp}"
    n = 0
    while backup.exists():
        n += 1
        backup = directory / f"backup-{stamp}-{n}"
    backup.mkdir()
    return backup


def _cut(directory: Path, a: _Analysis) -> RepairReport:
    assert a.corrupt is not None
    seg, offset = a.corrupt.segment, a.corrupt.offset
    backup = _new_backup_dir(directory)
    cut_seq = int(seg.name.split(".")[0])
    dropped = 0
    for seq, path in _list_segments(directory):
        if seq < cut_seq or (seq == cut_seq and offset >= HEADER_SIZE):
            continue
        dropped += _content_end(path.read_bytes())
        os.replace(path, backup / path.name)
    if offset >= HEADER_SIZE:
        shutil.copy2(seg, backup / seg.name)
        dropped += a.corrupt_stop - offset
        _truncate_file(seg, offset)
    _fsync_dir(backup)
    _fsync_dir(directory)
    kept = _analyze(directory).records
    _log.warning("log.repaired", segment=str(seg), offset=offset, backup=str(backup))
    return RepairReport("cut", kept, dropped, str(seg), offset, str(backup))


def repair(directory: str | os.PathLike[str]) -> RepairReport:
    """Cut a corrupt log at its first bad record (keeping a backup) or cut a torn tail."""
    path = Path(directory)
    a = _analyze(path)
    if a.corrupt is not None:
        return _cut(path, a)
    if a.torn is not None:
        seg, offset, stop = a.torn
        _truncate_file(seg, offset)
        return RepairReport("truncated_tail", a.records, stop - offset, str(seg), offset)
    return RepairReport("none", a.records, 0)
