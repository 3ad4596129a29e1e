"""A compaction's files: the cut, reading the history before it, writing its base.

A compaction rewrites the log's history up to a cut as one BASE segment, in
three steps, the way Redis's multi-part AOF rewrite and Bitcask's merge do
it (the writer goes on appending while the rewrite runs):

1. :meth:`Log.seal <corral.broker.log.Log.seal>` cuts the log: the segment
   being written is finished and appends go on in a new one. Segments
   ``first..last`` (the current base through the sealed one) hold the whole
   history up to the cut, fsync'd; the :class:`Cut` names them.
2. A rewriter reads those segments (:func:`read_cut`), rebuilds what they
   say, and writes it with :func:`write_base` to ``cut.tmp``, fsync'd. This
   runs in a child process (:mod:`corral.broker.compactor`) so the broker's
   loop never waits for it.
3. :meth:`Log.install <corral.broker.log.Log.install>` renames ``cut.tmp``
   onto segment ``last``: one atomic rename switches the log from "old
   history + later segments" to "new base + later segments", which replay
   to the same state. Older segments are stale then; the broker removes
   them on a thread, a few MiB at a time (:func:`remove_segments`).

A crash before the rename leaves a ``.tmp`` file (removed on the next
start) and the old history; a crash after it leaves the older segments,
which the next start removes as stale (replay begins at the newest BASE).

This module knows the segment format only through
:mod:`corral.broker.framing`, and nothing of jobs or processes.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import msgspec

from corral.broker.framing import (
    FLAG_BASE,
    FORMAT_VERSION,
    LogCorrupt,
    MiB,
    Scan,
    frame_into,
    pack_header,
    pack_mark,
    parse_header,
    seg_path,
    segment_seed,
)
from corral.broker.lazylog import get_logger
from corral.broker.records import Record

#: The rewriter writes its base in chunks of about this many bytes...
_CHUNK = 1 * MiB
#: ... and syncs it every this many: a journal commit that the broker's own
#: fsync waits for then never has more of the base to write out (RocksDB's
#: ``bytes_per_sync`` is the same idea).
SYNC_EVERY = 4 * MiB
#: A stale segment removed beside the loop is cut this many bytes at a time...
SHRINK_STEP = 4 * MiB
#: ... this many seconds apart (see :func:`remove_segments`).
SHRINK_PAUSE = 0.01
_log = get_logger(__name__)


class Cut(msgspec.Struct, frozen=True):
    """Where a compaction cut the log: segments ``first..last`` of log
    ``generation`` in ``directory`` hold the history it rewrites; the new
    base is written to ``tmp``. ``counted`` is how many record bytes of
    that history the log counted towards its next compaction."""

    directory: str
    first: int
    last: int
    generation: int
    tmp: str
    counted: int = 0

    @property
    def tmp_path(self) -> Path:
        return Path(self.tmp)

    @property
    def segments(self) -> list[Path]:
        """The paths of segments ``first..last``, in order."""
        return [seg_path(Path(self.directory), seq) for seq in range(self.first, self.last + 1)]


def tmp_name(last: int, what: str) -> str:
    """A compaction's file before (``what`` = "base") or after ("old": the
    replaced segment's second name) the switch: a ``.tmp`` file, so a start
    after a crash removes it, and a name no other compaction uses, so a
    thread still removing an earlier one's files never touches it."""
    return f"{last:020d}.{what}.{secrets.token_hex(4)}.tmp"


def read_cut(cut: Cut) -> Iterator[Record]:
    """Every record of segments ``cut.first..cut.last``, in order.

    Sealed segments are whole and fsync'd, so anything odd is corruption:
    raises :class:`~corral.broker.framing.LogCorrupt` for a missing segment,
    a header that is not that segment's (its number, the log's generation,
    BASE on the first), or a bad record anywhere."""
    for path in cut.segments:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise LogCorrupt(path, 0, "segment is missing: a compaction cannot read it") from None
        header = parse_header(path, data)
        seq = int(path.name.split(".")[0])
        if header.seq != seq or header.generation != cut.generation:
            raise LogCorrupt(path, 0, "segment header does not match its name or log")
        if seq == cut.first and not header.flags & FLAG_BASE:
            raise LogCorrupt(path, 0, "the first segment of a compaction is not a base segment")
        scan = Scan(path, data, header.seed)
        yield from scan
        if scan.reason is not None:
            raise LogCorrupt(path, scan.pos, scan.reason)


def write_base(
    cut: Cut,
    records: Iterable[Record],
    on_frame: Callable[[Record, int, int], None] | None = None,
) -> tuple[int, int]:
    """Write ``records`` as a BASE segment numbered ``cut.last`` to
    ``cut.tmp``, fsync'd as it goes and at the end (not renamed:
    :meth:`Log.install` does that). ``on_frame(record, offset, length)``
    is told where each record's frame went (bytes from the file's start).
    Returns (records, bytes written). Raises OSError (ENOSPC on a full
    disk) with the file removed; a record over the size limit raises
    :class:`~corral.broker.framing.LogError`."""
    tmp = cut.tmp_path
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        count = unsynced = 0
        buf = bytearray(pack_header(FLAG_BASE, cut.last, cut.generation))
        seed = segment_seed(FORMAT_VERSION, cut.generation, cut.last)
        flushed = 0
        for record in records:
            at = len(buf)
            length = frame_into(buf, record, seed)
            if on_frame is not None:
                on_frame(record, flushed + at, length)
            count += 1
            if len(buf) >= _CHUNK:
                unsynced += len(buf)
                flushed += len(buf)
                _flush(fd, buf)
                if unsynced >= SYNC_EVERY:
                    os.fdatasync(fd)
                    unsynced = 0
        buf += pack_mark(os.lseek(fd, 0, os.SEEK_CUR) + len(buf), seed)  # fsync'd just below
        _flush(fd, buf)
        os.fsync(fd)
        written = os.fstat(fd).st_size
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return count, written


def _flush(fd: int, buf: bytearray) -> None:
    """Write all of ``buf`` at the file's end, then empty it."""
    with memoryview(buf) as view:
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])
    del buf[:]


def remove_segments(paths: list[Path], *, gradually: bool = False) -> int:
    """Remove stale segments (those before a new base); one that cannot be
    removed is logged and left for the next open. Returns how many went.

    ``gradually`` (on a thread beside the broker's loop): each file is
    first cut ``SHRINK_STEP`` bytes at a time, ``SHRINK_PAUSE`` seconds
    apart. Freeing a large file's blocks in one go is one large journal
    commit, which the loop's next fsync would wait for (RocksDB deletes
    obsolete files in chunks, rate-limited, for the same reason)."""
    removed = 0
    for path in paths:
        try:
            if gradually:
                _shrink(path)
            path.unlink(missing_ok=True)
            removed += 1
        except OSError as exc:
            _log.warning("log.stale_segment_kept", segment=str(path), error=str(exc))
    return removed


def _shrink(path: Path) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    while size > SHRINK_STEP:
        size -= SHRINK_STEP
        os.truncate(path, size)
        time.sleep(SHRINK_PAUSE)  # pacing, not waiting for anything
