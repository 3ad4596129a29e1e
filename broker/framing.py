"""The log's on-disk format: segment files, their headers and record frames.

A log is one directory of ``NNNNNNNNNNNNNNNNNNNN.seg`` segments, numbered
without gaps. Each starts with a 32-byte header (all little-endian): magic
``CORRALOG``, segment format version (u16, :data:`FORMAT_VERSION`), flags
(u8, bit 0 = BASE: a full history starts here), the records' version (u8,
:data:`~corral.broker.records.LOG_FORMAT_VERSION`), sequence number (u64),
the log's random generation id (u64) and a CRC32 of the preceding 28 bytes.

Each record is framed as u32 length (of type + body), u32 CRC32, u8 type
code, msgpack body. The CRC covers the length field, the type and the body,
and is seeded with the segment's salt: the CRC32 of its generation and
sequence number (:attr:`Header.seed`), as SQLite salts its WAL frames. So a
frame validates only in the segment it was written for: a stale frame from
another segment or another log, or one inside a payload (whose writer
cannot know the random generation), never does. Segments are preallocated,
so a segment's zero-filled tail is the end of its records.

A format-5 segment also holds *sync marks*: after each fdatasync the live
log writes one small frame of type :data:`MARK_CODE` (22, a code no record
takes) whose body is the u64 offset up to which the segment was then on
disk; it costs one small write and no fsync, and is synced with the next
commit. A mark is not a record: a :class:`Scan` checks it and yields none.
On replay, damage before an offset a later mark names was fsync'd, so
acknowledged: corruption, never a torn tail; damage that no later mark
vouches for was never synced: a torn tail, even with valid frames after it,
since unsynced writes reach the disk in any order (:meth:`Scan.problem`).
Every fsync'd commit is followed by its mark, a valid frame.

Formats 4 (no marks) and 3 (also no CRC seed: its header had u16 flags
where format 4 has flags and the records' version (3), and
:attr:`Header.seed` is 0) are still read. The live log goes on appending to
an older last segment in its own format, without marks, so the corral that
wrote it can still read it; every segment it creates is format 5.

This module packs and checks headers and frames, walks a segment's records
(:class:`Scan`), finds the segments a replay reads (:func:`plan_segments`)
and creates directories durably (:func:`make_dirs`); the live log
(:mod:`corral.broker.log`) and the offline tools
(:mod:`corral.broker.logtools`, :mod:`corral.broker.logsurvey`) build on it.
It also holds the log's errors.
"""

from __future__ import annotations

import itertools
import os
import re
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from struct import Struct
from typing import Any, NamedTuple

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
#: The segment format this code writes: 5 adds sync marks to format 4,
#: which seeds each frame's CRC.
FORMAT_VERSION = 5
#: The first format with a CRC seed, still read (and appended to, without marks).
SEEDED_VERSION = 4
#: The oldest format still read: CRCs with no seed.
LEGACY_VERSION = 3
READABLE_VERSIONS = (LEGACY_VERSION, SEEDED_VERSION, FORMAT_VERSION)
#: The frame type of a sync mark (see the module docstring); records.py
#: leaves this code unused.
MARK_CODE = 22
#: A sync mark's body: the offset up to which its segment was on disk.
MARK_BODY = Struct("<Q")
#: A sync mark's whole frame, in bytes.
MARK_SIZE = 8 + 1 + MARK_BODY.size

#: The oldest records version this corral reads: record types are only ever
#: added, so a newer corral reads every older log (version 4 added
#: ``JobsCreated`` and ``ClockStepped``).
MIN_RECORDS_VERSION = 3
_HEADER = Struct("<8sHBBQQ")  # magic, format, flags, records' version, seq, generation
_HEADER_V3 = Struct("<8sHHQQ")  # magic, format, flags, seq, generation
_U16 = Struct("<H")
_U32 = Struct("<I")
_SALT = Struct("<QQ")  # generation, seq
HEADER_SIZE = _HEADER.size + _U32.size
FRAME = Struct("<IIB")  # length, crc, type
LEN_TYPE = Struct("<IB")  # what the CRC covers before the body
_SEG_RE = re.compile(r"^(\d{20})\.seg$")
_crc32 = zlib.crc32


# -- errors -----------------------------------------------------------------


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
            " started. Stop the corral daemon (so nothing restarts the broker), run `corral"
            " log verify` to see the damage, then `corral log repair`: it moves the damaged"
            " bytes aside, keeps every valid record and names the jobs that were lost."
        )


class LogFormatUnknown(LogCorrupt):
    """An intact segment header that this corral cannot read: another
    corral's format version, or not a corral segment at all."""

    def __init__(self, segment: str | os.PathLike[str], reason: str) -> None:
        LogError.__init__(
            self,
            f"log segment {segment} cannot be read: {reason}. Nothing was started or"
            " changed: run the corral version that wrote this log (or move the file away"
            " if it is not a segment).",
        )
        self.segment = Path(segment)
        self.offset = 0
        self.reason = reason


class LogDiskFull(LogError):
    """A write could not be done, even into the reserve."""


class FsyncFailed(LogError):
    """fsync/fdatasync failed: the caller must exit, never retry."""


# -- segment files and headers -----------------------------------------------


def seg_path(directory: Path, seq: int) -> Path:
    return directory / f"{seq:020d}.seg"


def list_segments(directory: Path) -> list[tuple[int, Path]]:
    found = []
    for entry in os.scandir(directory):
        match = _SEG_RE.match(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), Path(entry.path)))
    return sorted(found)


def segment_seed(version: int, generation: int, seq: int) -> int:
    """The CRC32 seed of a segment's frames: the CRC of its salt (0 in format 3)."""
    if version == LEGACY_VERSION:
        return 0
    return _crc32(_SALT.pack(generation, seq))


class Header(NamedTuple):
    """A segment header's fields; ``version`` is the segment format (3 or
    4), ``records`` the records' version."""

    flags: int
    seq: int
    generation: int
    version: int = FORMAT_VERSION
    records: int = LOG_FORMAT_VERSION

    @property
    def seed(self) -> int:
        return segment_seed(self.version, self.generation, self.seq)

    @property
    def marks(self) -> bool:
        """True if the live log writes sync marks into this segment."""
        return self.version >= FORMAT_VERSION


def pack_header(flags: int, seq: int, generation: int) -> bytes:
    """A header in the current format (:data:`FORMAT_VERSION`)."""
    head = _HEADER.pack(MAGIC, FORMAT_VERSION, flags, LOG_FORMAT_VERSION, seq, generation)
    return head + _U32.pack(_crc32(head))


class HeaderFault(NamedTuple):
    """Why a header cannot be used; ``damaged`` is False when it is intact
    but written by a corral that reads differently (or is not a segment)."""

    reason: str
    damaged: bool


def check_header(raw: bytes) -> Header | HeaderFault:
    """The header at the start of ``raw``, or why it is not a usable one."""
    if len(raw) < HEADER_SIZE:
        return HeaderFault(f"short segment header ({len(raw)} bytes)", True)
    if _U32.unpack_from(raw, _HEADER.size)[0] != _crc32(raw[: _HEADER.size]):
        return HeaderFault("segment header checksum mismatch", True)
    magic, version = raw[:8], _U16.unpack_from(raw, 8)[0]
    if magic != MAGIC:
        return HeaderFault(f"bad magic {magic!r}: not a corral log segment", False)
    if version not in READABLE_VERSIONS:
        return HeaderFault(
            f"log format version {version} found, this corral reads versions"
            f" {' and '.join(map(str, READABLE_VERSIONS))}: it was written by another corral",
            False,
        )
    if version == LEGACY_VERSION:
        _, _, flags, seq, generation = _HEADER_V3.unpack_from(raw)
        records = LEGACY_VERSION  # format 3 versioned records and framing together
    else:
        _, _, flags, records, seq, generation = _HEADER.unpack_from(raw)
    if not MIN_RECORDS_VERSION <= records <= LOG_FORMAT_VERSION:
        return HeaderFault(
            f"log records version {records} found, this corral reads versions"
            f" {MIN_RECORDS_VERSION} to {LOG_FORMAT_VERSION}: it was written by another corral",
            False,
        )
    return Header(flags, seq, generation, version, records)


def parse_header(path: Path, raw: bytes) -> Header:
    """The header of segment ``path``; raises :class:`LogCorrupt` naming why not."""
    got = check_header(raw)
    if isinstance(got, HeaderFault):
        if not got.damaged:
            raise LogFormatUnknown(path, got.reason)
        raise LogCorrupt(path, 0, got.reason)
    return got


def read_header(path: Path) -> Header:
    with open(path, "rb") as f:
        return parse_header(path, f.read(HEADER_SIZE))


def fsync_dir(directory: Path) -> None:
    """Make the entries of ``directory`` durable; raises :class:`FsyncFailed`."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:
        raise FsyncFailed(f"fsync of directory {directory} failed: {exc}") from exc
    finally:
        os.close(fd)


def make_dirs(directory: Path, mode: int = 0o777) -> None:
    """Create ``directory`` and any missing parents, each made durable: after
    each ``mkdir`` its parent is fsync'd, so a power loss cannot lose the new
    entry (and with it everything later written inside). Raises OSError."""
    directory = Path(directory).absolute()
    missing = []
    while not directory.is_dir():
        missing.append(directory)
        directory = directory.parent
    for new in reversed(missing):
        try:
            new.mkdir(mode)
        except FileExistsError:
            if not new.is_dir():
                raise
            continue  # made meanwhile by someone else, who syncs it
        fsync_dir(new.parent)


# -- frames and scanning ----------------------------------------------------


def frame_into(buf: bytearray, record: Record, seed: int) -> int:
    """Append ``record``'s frame for a segment of CRC ``seed`` to ``buf``;
    return the frame's size in bytes."""
    code, body = encode_record(record)
    length = len(body) + 1
    if length > MAX_RECORD:
        raise LogError(f"record of {length} bytes is over the {MAX_RECORD} byte limit")
    buf += FRAME.pack(length, _crc32(body, _crc32(LEN_TYPE.pack(length, code), seed)), code)
    buf += body
    return length + 8


def pack_mark(upto: int, seed: int) -> bytes:
    """The sync mark frame saying its segment is on disk up to offset
    ``upto``, for a segment of CRC ``seed``."""
    body = MARK_BODY.pack(upto)
    length = len(body) + 1
    crc = _crc32(body, _crc32(LEN_TYPE.pack(length, MARK_CODE), seed))
    return FRAME.pack(length, crc, MARK_CODE) + body


def _known(code: int) -> bool:
    return code == MARK_CODE or is_known_code(code)


def read_mark(data: bytes, pos: int, end: int) -> int | None:
    """The offset a valid mark frame at ``[pos, end)`` states, or None when
    its body is not one (a mark can only speak of bytes before itself)."""
    if end - pos != MARK_SIZE:
        return None
    (upto,) = MARK_BODY.unpack_from(data, pos + 9)
    return upto if upto <= pos else None


def frame_crc(view: memoryview | bytes | bytearray, pos: int, end: int, seed: int) -> int:
    """The CRC that the frame at ``[pos, end)`` should carry under ``seed``."""
    return _crc32(view[pos + 8 : end], _crc32(view[pos : pos + 4], seed))


def reseed_frames(buf: bytearray, seed: int) -> None:
    """Recompute, in place, the CRC of every frame in ``buf`` (whole frames,
    back to back) for a segment whose CRC seed is ``seed``."""
    pos = 0
    with memoryview(buf) as view:
        while pos < len(buf):
            end = pos + 8 + _U32.unpack_from(buf, pos)[0]
            _U32.pack_into(buf, pos + 4, frame_crc(view, pos, end, seed))
            pos = end


#: The longest frame (bytes) in which a flipped bit is looked for.
FIX_MAX = 1024


class BitFix(NamedTuple):
    """A frame as it was before one of its bits flipped: its bytes, and the
    byte (``at``, from the frame's start) and bit that flipped."""

    frame: bytes
    at: int
    bit: int


def one_bit_fix(data: bytes, pos: int, seed: int) -> BitFix | None:
    """The frame at ``pos`` with the one bit flipped back that makes its CRC
    match (CRC-32 tells every one-bit error apart in frames this short), or
    None: no one-bit change does, or the frame is over :data:`FIX_MAX`."""
    if pos + FRAME.size > len(data):
        return None
    length, crc, _ = FRAME.unpack_from(data, pos)
    for n, size in enumerate([length] + [length ^ (1 << b) for b in range(32)]):
        if not 0 < size <= FIX_MAX or pos + 8 + size > len(data):
            continue
        frame = bytearray(data[pos : pos + 8 + size])
        _U32.pack_into(frame, 0, size)
        got = frame_crc(frame, 0, len(frame), seed)
        if n > 0:  # the length field's bit
            if got == crc:
                return BitFix(bytes(frame), (n - 1) // 8, (n - 1) % 8)
            continue
        if bin(got ^ crc).count("1") == 1:  # the CRC field's bit
            bit = (got ^ crc).bit_length() - 1
            _U32.pack_into(frame, 4, got)
            return BitFix(bytes(frame), 4 + bit // 8, bit % 8)
        for i in range(8, len(frame)):
            for bit in range(8):
                frame[i] ^= 1 << bit
                if frame_crc(frame, 0, len(frame), seed) == crc:
                    return BitFix(bytes(frame), i, bit)
                frame[i] ^= 1 << bit
    return None


def check_frame(data: bytes, view: memoryview, pos: int, seed: int) -> tuple[int, int] | str:
    """Return ``(end, code)`` of the valid frame at ``pos``, or why it is not one."""
    if pos + FRAME.size > len(data):
        return "short record header"
    length, crc, code = FRAME.unpack_from(data, pos)
    if length == 0 or length > MAX_RECORD:
        return f"invalid record length {length}"
    end = pos + 8 + length
    if end > len(data):
        return f"record length {length} runs past the end of the segment"
    if frame_crc(view, pos, end, seed) != crc:
        return "record checksum mismatch"
    if not _known(code):
        return f"unknown record type {code}"
    return end, code


def next_valid_frame(data: bytes, start: int, stop: int, seed: int) -> int:
    """Offset of the first valid frame starting in ``[start, stop)``, or -1."""
    size = len(data)
    unpack = FRAME.unpack_from
    with memoryview(data) as view:
        for pos in range(start, min(stop, size - FRAME.size + 1)):
            length, crc, code = unpack(data, pos)
            end = pos + 8 + length
            if (
                0 < length <= MAX_RECORD
                and end <= size
                and _known(code)
                and _crc32(view[pos + 8 : end], _crc32(view[pos : pos + 4], seed)) == crc
            ):
                return pos
    return -1


def next_record(data: bytes, start: int, stop: int, seed: int) -> int:
    """Offset of the first frame in ``[start, stop)`` that validates under
    ``seed`` and decodes, or -1: where a walk resynchronises after damage."""
    while True:
        pos = next_valid_frame(data, start, stop, seed)
        if pos < 0:
            return -1
        length, _, code = FRAME.unpack_from(data, pos)
        if code == MARK_CODE:
            if read_mark(data, pos, pos + 8 + length) is not None:
                return pos
            start = pos + 1
            continue
        try:
            decode_record(code, data[pos + 9 : pos + 8 + length])
        except RecordError:
            start = pos + 1
            continue
        return pos


_ZEROS = bytes(MiB)
#: The block sizes content_end narrows the end down with, largest first.
_STEPS = (MiB, 64 * 1024, 4096, 256)


def content_end(data: bytes) -> int:
    """One past the last non-zero byte. Blocks of preallocated zeros are
    skipped by comparing them with zeros (a memcmp), a MiB, then 64 KiB,
    4 KiB and 256 bytes at a time, so only the last 256 bytes where the
    content ends are stripped byte by byte."""
    end = len(data)
    for step in _STEPS:
        while end > 0:
            start = max(0, end - step)
            if data[start:end] != _ZEROS[: end - start]:
                break
            end = start
    start = max(0, end - _STEPS[-1])
    return start + len(data[start:end].rstrip(b"\0"))


class Scan:
    """Walk one segment's records up to its clean end or its first bad record.

    Afterwards ``pos`` is where the good frames end and ``reason`` says why
    the walk stopped early (None at a clean end). ``stop`` is one past the
    last non-zero byte: beyond it lie only preallocated zeros. ``seed`` is
    the segment's CRC seed (:attr:`Header.seed`). Sync marks are checked
    and passed over, not yielded. ``skip``: frame offset -> an object to
    yield instead of decoding the frame there, if the frame is valid and
    its ``(length, type code)``, or ``(length, type code, CRC)``, is the
    object's ``expect`` (a restart checkpoint's or an index's cold
    batches; any other frame there is decoded)."""

    def __init__(
        self, path: Path, data: bytes, seed: int, skip: Mapping[int, Any] | None = None
    ) -> None:
        self.path = path
        self.data = data
        self.seed = seed
        self.skip = skip
        self.stop = content_end(data)
        self.pos = HEADER_SIZE
        self.reason: str | None = None
        self.records = 0

    def __iter__(self) -> Iterator[Record]:
        data = self.data
        with memoryview(data) as view:
            while self.pos < self.stop:
                pos = self.pos
                got = check_frame(data, view, pos, self.seed)
                if isinstance(got, str):
                    self.reason = got
                    return
                end, code = got
                if code == MARK_CODE:
                    if read_mark(data, pos, end) is None:
                        self.reason = "bad sync mark"
                        return
                    self.pos = end
                    continue
                if self.skip is not None and pos in self.skip:
                    stand_in = self.skip[pos]
                    want = stand_in.expect
                    if len(want) == 2:
                        seen: tuple[int, ...] = (end - pos, code)
                    else:  # with the CRC its frame had when it was described
                        seen = (end - pos, code, FRAME.unpack_from(data, pos)[1])
                    if want == seen:
                        self.pos = end
                        self.records += 1
                        yield stand_in
                        continue
                try:  # a bytes slice, so a kept Raw pins only its own record
                    record = decode_record(code, data[pos + 9 : end])
                except RecordError as exc:
                    self.reason = str(exc)
                    return
                self.pos = end
                self.records += 1
                yield record

    def problem(self, last: bool, marks: bool = False) -> LogCorrupt | None:
        """The corruption this walk found; None for a clean end or a torn
        tail. Only the last segment may end torn. Where nothing valid
        follows the damage it is a torn write, unless a sync mark said its
        bytes were on disk. In a segment with sync marks (``marks``) a valid
        frame after the damage is no proof of corruption: unsynced writes
        reach the disk in any order. Damage there is a torn tail unless a
        later sync mark says the damaged bytes were fsync'd; every fsync'd
        commit is followed by its mark, so damage to what was acknowledged
        is never taken for a torn write."""
        if self.reason is None:
            return None
        if not last:
            return LogCorrupt(self.path, self.pos, self.reason)
        valid = next_record(self.data, self.pos + 1, self.stop, self.seed)
        if valid < 0:
            return None
        durable = durable_after(self.data, valid, self.stop, self.seed)
        if durable > self.pos:
            why = f"bytes the log had fsync'd (a later sync mark says up to offset {durable})"
            return LogCorrupt(self.path, self.pos, f"{self.reason}, in {why}: not a torn write")
        if marks:
            return None  # a torn tail of unsynced writes, some of which reached the disk
        return LogCorrupt(
            self.path, self.pos, f"{self.reason}, and a valid record follows at offset {valid}"
        )


def durable_after(data: bytes, pos: int, stop: int, seed: int) -> int:
    """The highest offset a valid sync mark at or after ``pos`` says was on
    disk (0: none), resynchronising past damage as a survey does."""
    durable = 0
    with memoryview(data) as view:
        while 0 <= pos < stop:
            got = check_frame(data, view, pos, seed)
            if isinstance(got, str):
                pos = next_record(data, pos + 1, stop, seed)
                continue
            end, code = got
            if code == MARK_CODE:
                durable = max(durable, read_mark(data, pos, end) or 0)
            pos = end
    return durable


class Segment(NamedTuple):
    """A segment of the log a replay reads: its number, file and header."""

    seq: int
    path: Path
    header: Header


def plan_segments(directory: Path) -> tuple[list[Segment], list[Path], int]:
    """Return (segments from the last BASE on, older segments, generation).

    Raises :class:`LogCorrupt` for a bad header, a gap, a segment of another
    log, or no BASE segment."""
    segments = list_segments(directory)
    if not segments:
        return [], [], 0
    headers: dict[int, Header] = {}
    base = -1
    for i in range(len(segments) - 1, -1, -1):
        seq, path = segments[i]
        header = headers[seq] = read_header(path)
        if header.seq != seq:
            raise LogCorrupt(path, 0, f"header says segment {header.seq}")
        if header.flags & FLAG_BASE:
            base = i
            break
    if base < 0:
        raise LogCorrupt(segments[0][1], 0, "no base segment: the start of the log is missing")
    live = [Segment(seq, path, headers[seq]) for seq, path in segments[base:]]
    generation = live[0].header.generation
    for prev, (seq, path, header) in itertools.pairwise(live):
        if seq != prev.seq + 1:
            raise LogCorrupt(path, 0, f"segment {prev.seq + 1} is missing")
        if header.generation != generation:
            raise LogCorrupt(path, 0, "segment belongs to another log (generation id differs)")
    return live, [p for _, p in segments[:base]], generation
