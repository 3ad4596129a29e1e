"""The log's on-disk format: segment files, their headers and record frames.

A log is one directory of ``NNNNNNNNNNNNNNNNNNNN.seg`` segments, numbered
without gaps. Each starts with a 32-byte header: magic ``CORRALOG``, format
version (u16), flags (u16, bit 0 = BASE: a full history starts here),
sequence number (u64), the log's random generation id (u64) and a CRC32 of
the preceding 28 bytes. Each record is framed as u32 length (of type +
body), u32 CRC32 (over the length field, the type and the body), u8 type
code, msgpack body. Segments are preallocated, so a segment's zero-filled
tail is the end of its records.

This module packs and checks headers and frames, walks a segment's records
(:class:`Scan`) and finds the segments a replay reads (:func:`plan_segments`);
the live log (:mod:`corral.broker.log`) and the offline tools
(:mod:`corral.broker.logtools`) both build on it. It also holds the log's
errors.
"""

from __future__ import annotations

import itertools
import os
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from struct import Struct
from typing import NamedTuple

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

_HEADER = Struct("<8sHHQQ")
_U32 = Struct("<I")
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
            " started. Run `corral log verify` to inspect it and `corral log repair` to cut"
            " the log at that point (a backup is kept)."
        )


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


def pack_header(flags: int, seq: int, generation: int) -> bytes:
    head = _HEADER.pack(MAGIC, LOG_FORMAT_VERSION, flags, seq, generation)
    return head + _U32.pack(_crc32(head))


class Header(NamedTuple):
    flags: int
    seq: int
    generation: int


def parse_header(path: Path, raw: bytes) -> Header:
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
    return Header(flags, seq, generation)


def read_header(path: Path) -> Header:
    with open(path, "rb") as f:
        return parse_header(path, f.read(HEADER_SIZE))


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:
        raise FsyncFailed(f"fsync of directory {directory} failed: {exc}") from exc
    finally:
        os.close(fd)


# -- frames and scanning ----------------------------------------------------


def frame_into(buf: bytearray, record: Record) -> int:
    """Append ``record``'s frame to ``buf``; return the frame's size."""
    code, body = encode_record(record)
    length = len(body) + 1
    if length > MAX_RECORD:
        raise LogError(f"record of {length} bytes is over the {MAX_RECORD} byte limit")
    buf += FRAME.pack(length, _crc32(body, _crc32(LEN_TYPE.pack(length, code))), code)
    buf += body
    return length + 8


def check_frame(data: bytes, view: memoryview, pos: int) -> tuple[int, int] | str:
    """Return ``(end, code)`` of the valid frame at ``pos``, or why it is not one."""
    if pos + FRAME.size > len(data):
        return "short record header"
    length, crc, code = FRAME.unpack_from(data, pos)
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


def next_valid_frame(data: bytes, start: int, stop: int) -> int:
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
                and is_known_code(code)
                and _crc32(view[pos + 8 : end], _crc32(view[pos : pos + 4])) == crc
            ):
                return pos
    return -1


def content_end(data: bytes) -> int:
    """One past the last non-zero byte, without copying a whole segment."""
    end = len(data)
    while end > 0:
        start = max(0, end - 1 * MiB)
        kept = len(data[start:end].rstrip(b"\0"))
        if kept:
            return start + kept
        end = start
    return 0


class Scan:
    """Walk one segment's records up to its clean end or its first bad record.

    Afterwards ``pos`` is where the good records end and ``reason`` says why
    the walk stopped early (None at a clean end). ``stop`` is one past the
    last non-zero byte: beyond it lie only preallocated zeros."""

    def __init__(self, path: Path, data: bytes) -> None:
        self.path = path
        self.data = data
        self.stop = content_end(data)
        self.pos = HEADER_SIZE
        self.reason: str | None = None
        self.records = 0

    def __iter__(self) -> Iterator[Record]:
        data = self.data
        with memoryview(data) as view:
            while self.pos < self.stop:
                pos = self.pos
                got = check_frame(data, view, pos)
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
        valid = next_valid_frame(self.data, self.pos + 1, self.stop)
        if valid < 0:
            return None
        return LogCorrupt(
            self.path, self.pos, f"{self.reason}, and a valid record follows at offset {valid}"
        )


def plan_segments(directory: Path) -> tuple[list[tuple[int, Path]], list[Path], int]:
    """Return (segments from the last BASE on, older segments, generation)."""
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
    live = segments[base:]
    generation = headers[live[0][0]].generation
    for (prev, _), (seq, path) in itertools.pairwise(live):
        if seq != prev + 1:
            raise LogCorrupt(path, 0, f"segment {prev + 1} is missing")
        if headers[seq].generation != generation:
            raise LogCorrupt(path, 0, "segment belongs to another log (generation id differs)")
    return live, [p for _, p in segments[:base]], generation
