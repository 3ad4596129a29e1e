"""corral's durable log: append-only, segmented, checksummed, with group commit.

The log stores :class:`~corral.broker.records.Record` values and knows nothing
of jobs or sockets. Its files (segments of checksummed record frames, each
with a header) are described in :mod:`corral.broker.framing`; this module is
the live log that opens, replays, appends to, syncs, rolls and compacts them.

Segments are preallocated, so a full disk shows up when the next segment is
allocated rather than in the middle of a record. The last ``reserve`` bytes
of a segment are kept for records about existing jobs once the disk is full
(:attr:`Log.full`).

Each frame's CRC is seeded with its segment's salt (see
:mod:`corral.broker.framing`); appends are framed for the active segment
and re-seeded if a roll puts them in the next one. A last segment in the
previous format (3) is appended to in that format; new segments are
always in the current one.

Creating the log directory syncs the parent of every directory created
(:func:`~corral.broker.framing.make_dirs`), as creating a segment syncs the
log directory.

Replay starts at the last BASE segment; older segments and ``.tmp`` files
left by an interrupted compaction are removed on open. Only the last segment
may end in a torn record (older ones are fsync'd before the next one
exists): it is cut with a warning. After each fdatasync the log writes a
sync mark (see :mod:`corral.broker.framing`) into the segment, unsynced, so
what was fsync'd, and so acknowledged, is always followed by a valid frame.
Damage that a later mark says was on disk, or (in a segment without marks)
any damage with a valid record after it, is corruption, never a torn
write, and the log refuses to open (:class:`LogCorrupt`);
:func:`corral.broker.logtools.verify` and :func:`corral.broker.logtools.repair`
handle it offline.

``append()`` only frames into memory; ``commit()`` issues one write and at most
one fdatasync for everything appended since (group commit). A failed fsync
is never retried (:class:`FsyncFailed`): the caller exits and replays.

Compaction cuts the log (:meth:`Log.seal`), has the history before the cut
rewritten as a new base by someone else (a child process, see
:mod:`corral.broker.compaction`), then switches to it with one rename
(:meth:`Log.install`); appends go on meanwhile. :meth:`Log.compact` does the
three steps at once, in-process.

Importing this module loads neither zmq nor asyncio (hence its lazy logger).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import secrets
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from corral.broker.checkpoint import chunks_of, index_files
from corral.broker.compaction import Cut, remove_segments, tmp_name, write_base
from corral.broker.framing import (
    FLAG_BASE,
    FORMAT_VERSION,
    FRAME,
    HEADER_SIZE,
    LEN_TYPE,
    MARK_SIZE,
    MAX_RECORD,
    FsyncFailed,
    LogCorrupt,
    LogDiskFull,
    LogError,
    MiB,
    Scan,
    Segment,
    make_dirs,
    pack_header,
    pack_mark,
    plan_segments,
    reseed_frames,
    seg_path,
    segment_seed,
)
from corral.broker.lazylog import get_logger
from corral.broker.logfiles import Files
from corral.broker.records import Record, encode_record

#: The log's errors are defined with its format; they are part of this module's API.
__all__ = ["POLICIES", "FsyncFailed", "Log", "LogCorrupt", "LogDiskFull", "LogError"]

POLICIES = ("always", "interval", "never")
#: See :meth:`Log.replay`.
SkipFrames = Callable[[Path, int, int, int, bool], Mapping[int, Any] | None]
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_NO_FALLOCATE = frozenset({errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})
_ALLOC_RETRY = 1.0
_crc32 = zlib.crc32
_log = get_logger(__name__)


# -- file helpers -----------------------------------------------------------


def _preallocate(files: Files, fd: int, size: int) -> None:
    """Reserve disk blocks up to ``size``; silently skipped where unsupported."""
    try:
        files.fallocate(fd, size)
    except OSError as exc:
        if exc.errno not in _NO_FALLOCATE:
            raise


def _write_all(files: Files, fd: int, data: bytes | bytearray, offset: int) -> None:
    with memoryview(data) as view:
        done = 0
        while done < len(view):
            n = files.pwrite(fd, view[done:], offset + done)
            if n <= 0:
                raise OSError(errno.ENOSPC, "short write")
            done += n


def _mapped(path: Path) -> bytes:
    """``path``'s bytes, mapped read-only (an mmap reads as bytes do where
    a scan reads them; :func:`_unmap` it once read), or read if it is empty."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return b""
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # type: ignore[return-value]


def _unmap(data: bytes) -> None:
    """Unmap what :func:`_mapped` mapped (before the file may be cut: a
    read of a mapping past a file's end is a SIGBUS)."""
    if isinstance(data, mmap.mmap):
        with contextlib.suppress(BufferError):  # a view still held: unmapped when freed
            data.close()


def _seq_of(path: Path) -> int:
    return int(path.name.split(".")[0])


# -- the log ----------------------------------------------------------------


@dataclass
class _Active:
    """The segment appends go to."""

    fd: int
    path: Path
    seq: int
    end: int  # where the next write goes
    synced: int  # offset known to be on disk
    seed: int  # its frames' CRC seed
    marks: bool = True  # write sync marks (format 5; not into an older segment)


@dataclass
class _Counters:
    fsyncs: int = 0
    torn: int = 0
    marks_failed: int = 0
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
        files: Files | None = None,
    ) -> None:
        """``files``: the file operations to use (tests give a layer that
        plays power losses); the real ones by default."""
        if fsync not in POLICIES:
            raise ValueError(f"fsync must be one of {', '.join(POLICIES)}, not {fsync!r}")
        if fsync_interval < 0:
            raise ValueError("fsync_interval must be >= 0")
        if segment_size < 4096 or not 0 <= reserve <= segment_size - 2 * HEADER_SIZE:
            raise ValueError("need segment_size >= 4096 and 0 <= reserve < segment_size")
        self.directory = Path(directory)
        self.files = files or Files()
        self.fsync = fsync
        self.fsync_interval = fsync_interval
        self.segment_size = segment_size
        self.reserve = reserve
        self._limit = segment_size - reserve
        self._pending = bytearray()
        self._seed = 0  # the CRC seed the pending frames were built with
        self._active: _Active | None = None
        self._generation = 0
        self._dirty = False
        self._last_sync: float | None = None
        self._full = False
        self._retry_alloc_at = 0.0
        self._failed: LogError | None = None
        self._appended = 0
        self._n = _Counters()
        #: The sequence number of the base segment replay starts at.
        self._base = 1
        #: The compaction under way, between seal() and install()/abandon().
        self._cut: Cut | None = None
        #: Segments a roll finished, whole and fsync'd, never written again:
        #: ``(seq, path, size)``, for their owner to index and clear (see
        #: :mod:`corral.broker.segindex`).
        self.sealed: list[tuple[int, Path, int]] = []

    # -- opening

    def replay(self, skip: SkipFrames | None = None) -> Iterator[Record]:
        """Yield every record in order; afterwards the log is open for appends.

        Creates the directory and first segment if missing, finishes an
        interrupted compaction, cuts a torn tail (warning ``log.torn_tail``)
        and raises :class:`LogCorrupt` for anything worse. ``skip`` is
        asked, for each segment, which of its frames to yield a stand-in
        for instead of decoding them (see
        :class:`~corral.broker.framing.Scan`): ``skip(path, generation,
        seq, size, sealed)`` -> frame offset -> stand-in; ``sealed`` is
        False for the last segment (the one appends go on in: its size and
        mtime say nothing of its frames)."""
        if self._active is not None:
            raise LogError("the log is already open")
        make_dirs(self.directory)
        self._remove_tmp_files()
        self._n = _Counters()
        self._cut = None
        live, stale, self._generation = plan_segments(self.directory)
        if not live:
            self._generation = secrets.randbits(64)
            try:
                fd, path = self._create_segment(1, FLAG_BASE, b"")
            except OSError as exc:
                cls = LogDiskFull if exc.errno in _DISK_FULL else LogError
                raise cls(f"cannot create the first log segment: {exc}") from exc
            self._activate(_Active(fd, path, 1, HEADER_SIZE, HEADER_SIZE, self._new_seed(1)))
            return
        self._remove_stale(stale)
        self._base = live[0].seq
        for i, (_, path, header) in enumerate(live):
            frames = None
            if skip is not None:  # (sealed: every one but the last, never written again)
                sealed = i < len(live) - 1
                frames = skip(path, self._generation, header.seq, path.stat().st_size, sealed)
            # Mapped, not copied: a sealed segment with an index is mostly
            # frames that are only checked, and the last segment mostly
            # preallocated zeros (half the CPU of reading them).
            data = _mapped(path)
            scan = Scan(path, data, header.seed, frames)
            try:
                yield from scan
                problem = scan.problem(last=i == len(live) - 1, marks=header.marks)
            finally:
                _unmap(data)
            if problem is not None:
                raise problem
            # A compaction's base is never appended to: what counts towards
            # the next compaction is what came after it (a new log's first
            # segment, base and active at once, counts whole).
            if i > 0 or len(live) == 1:
                self._n.since_compaction += scan.pos - HEADER_SIZE
            if i < len(live) - 1:
                self._n.finished.append((path, scan.pos))
        self._open_last(live[-1], scan)

    def _new_seed(self, seq: int) -> int:
        """The CRC seed of a segment this log creates."""
        return segment_seed(FORMAT_VERSION, self._generation, seq)

    def _activate(self, active: _Active) -> _Active:
        """Make ``active`` the segment appends go to. Pending frames keep
        their seed: ``_write_pending`` re-seeds them if they land here."""
        self._active = active
        if not self._pending:
            self._seed = active.seed
        return active

    def _remove_tmp_files(self) -> None:
        for tmp in sorted(self.directory.glob("*.tmp")):
            self.files.unlink(tmp)
            _log.info("log.tmp_removed", file=str(tmp))

    def _remove_stale(self, stale: list[Path]) -> None:
        if not stale:
            return
        for path in stale:
            self.files.unlink(path)
        self.files.fsync_dir(self.directory)
        _log.info("log.stale_segments_removed", segments=[p.name for p in stale])

    def _open_last(self, last: Segment, scan: Scan) -> None:
        fd = self.files.open(scan.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            if scan.reason is not None:
                for _, end, chunk in chunks_of(self.directory, last.seq):
                    if end > scan.pos:  # it speaks of bytes about to be cut
                        self.files.unlink(chunk)
                self._cut_torn_tail(fd, scan)
            if os.fstat(fd).st_size < self.segment_size:
                self._try_preallocate(fd, time.monotonic())
        except BaseException:
            self.files.close(fd)
            raise
        active = self._activate(
            _Active(fd, scan.path, last.seq, scan.pos, scan.pos, scan.seed, last.header.marks)
        )
        if scan.pos > self._limit and not self._full:
            # it ended in its reserve: full, unless a next segment can be made
            self._roll(active, time.monotonic())
        self._retry_alloc_at = 0.0  # the caller's clock paces the next try

    def _cut_torn_tail(self, fd: int, scan: Scan) -> None:
        self.files.ftruncate(fd, scan.pos)
        try:
            self.files.fsync(fd)
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
            _preallocate(self.files, fd, self.segment_size)
        except OSError as exc:
            if exc.errno not in _DISK_FULL:
                raise LogError(f"cannot preallocate log segment: {exc}") from exc
            self._mark_full(now, exc)

    def _create_segment(self, seq: int, flags: int, body: bytes | bytearray) -> tuple[int, Path]:
        """Create segment ``seq`` atomically: tmp file, preallocate, fsync, rename."""
        tmp = self.directory / f"{seq:020d}.tmp"
        final = seg_path(self.directory, seq)
        files = self.files
        fd = files.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            _write_all(files, fd, pack_header(flags, seq, self._generation), 0)
            _write_all(files, fd, body, HEADER_SIZE)
            _preallocate(files, fd, self.segment_size)
            files.fsync(fd)
            files.rename(tmp, final)
        except BaseException:
            files.close(fd)
            files.unlink(tmp)
            raise
        try:
            files.fsync_dir(self.directory)
        except BaseException:
            files.close(fd)
            raise
        return fd, final

    # -- appending

    def append(self, record: Record) -> int:
        """Frame ``record`` into the pending buffer (no I/O); return its framed size."""
        code, body = encode_record(record)  # the hot path: frame_into, inlined
        length = len(body) + 1
        if length > MAX_RECORD:
            raise LogError(f"record of {length} bytes is over the {MAX_RECORD} byte limit")
        pending = self._pending
        pending += FRAME.pack(
            length, _crc32(body, _crc32(LEN_TYPE.pack(length, code), self._seed)), code
        )
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

    def sync(self, now: float | None = None) -> None:
        """Write everything pending and fdatasync it now, whatever the policy.
        ``now``: ``time.monotonic()`` (by default) or the caller's clock."""
        active = self._open_for_write()
        now = time.monotonic() if now is None else now
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
        if active.seed != self._seed:  # framed for the segment before a roll
            reseed_frames(data, active.seed)
            self._seed = active.seed
        self._pending = bytearray()
        start = active.end
        try:
            _write_all(self.files, active.fd, data, start)
        except OSError as exc:
            self._undo_write(active, start, exc)
        active.end = start + len(data)
        self._dirty = True
        self._n.since_compaction += len(data)

    def _undo_write(self, active: _Active, start: int, exc: OSError) -> NoReturn:
        """Drop a partly written buffer so no half record stays behind, then raise."""
        try:
            self.files.ftruncate(active.fd, start)
        except OSError as trunc_exc:
            self._failed = LogError(f"cannot cut a failed write in {active.path}: {trunc_exc}")
            raise self._failed from exc
        with contextlib.suppress(OSError):  # a full disk: later writes extend the file
            _preallocate(self.files, active.fd, self.segment_size)
        if exc.errno in _DISK_FULL:
            _log.error("log.write_failed_disk_full", segment=str(active.path), error=str(exc))
            raise LogDiskFull(f"log write to {active.path} failed, disk full: {exc}") from exc
        self._failed = LogError(f"log write to {active.path} failed: {exc}")
        raise self._failed from exc

    def _roll(self, old: _Active, now: float, *, mark_full: bool = True) -> _Active:
        """Finish ``old`` and switch to a new segment. On a full disk stay on
        ``old``, marked full (or, without ``mark_full``, raise LogDiskFull)."""
        if self._dirty:  # old data must be durable before a later segment exists
            self._datasync(now)
        try:
            fd, path = self._create_segment(old.seq + 1, 0, b"")
        except OSError as exc:
            if exc.errno not in _DISK_FULL:
                raise LogError(f"cannot create log segment {old.seq + 1}: {exc}") from exc
            if not mark_full:
                raise LogDiskFull(f"no room for log segment {old.seq + 1}: {exc}") from exc
            self._mark_full(now, exc)
            return old
        if self._full:
            self._full = False
            _log.info("log.disk_space_available", segment=str(path))
        self.files.ftruncate(old.fd, old.end)
        self._fsync_fd(old.fd, old.path)
        self.files.close(old.fd)
        self._n.finished.append((old.path, old.end))
        self.sealed.append((old.seq, old.path, old.end))
        seq = old.seq + 1
        return self._activate(_Active(fd, path, seq, HEADER_SIZE, HEADER_SIZE, self._new_seed(seq)))

    def _mark_full(self, now: float, exc: OSError) -> None:
        if not self._full:
            _log.error("log.disk_full", directory=str(self.directory), error=str(exc))
        self._full = True
        self._retry_alloc_at = now + _ALLOC_RETRY

    def _fsync_fd(self, fd: int, path: Path) -> None:
        try:
            self.files.fsync(fd)
        except OSError as exc:
            self._failed = FsyncFailed(f"fsync of {path} failed: {exc}")
            raise self._failed from exc

    def _datasync(self, now: float) -> None:
        active = self._active
        assert active is not None
        try:
            self.files.fdatasync(active.fd)
        except OSError as exc:
            self._failed = FsyncFailed(
                f"fdatasync of {active.path} failed: {exc}; exit and replay, never retry"
            )
            raise self._failed from exc
        self._n.fsyncs += 1
        self._last_sync = now
        self._dirty = False
        active.synced = active.end
        if active.marks:
            self._write_mark(active)

    def _write_mark(self, active: _Active) -> None:
        """Write the sync mark for what was just synced (no fsync of its own:
        the next commit's syncs it). Damage before it is then never taken
        for a torn write. A mark that cannot be written is left out: the
        next write goes where it would have been."""
        try:
            _write_all(self.files, active.fd, pack_mark(active.synced, active.seed), active.end)
        except OSError as exc:
            self._n.marks_failed += 1
            _log.warning("log.sync_mark_failed", segment=str(active.path), error=str(exc))
            return
        active.end += MARK_SIZE
        self._n.since_compaction += MARK_SIZE

    # -- state

    @property
    def full(self) -> bool:
        """True while the next segment could not be allocated: refuse new jobs."""
        return self._full

    def recheck_space(self, now: float) -> bool:
        """While full, try again for room (at most once a second, by ``now``,
        ``time.monotonic()``): the next segment, or the preallocation of an
        empty current one. Returns True if the log is full no more. Lets an
        idle broker, which writes nothing, see space come back."""
        active = self._active
        if not self._full or active is None or self._failed or now < self._retry_alloc_at:
            return False
        if active.end > HEADER_SIZE:
            self._roll(active, now)  # clears full, or marks it again
        else:
            try:
                _preallocate(self.files, active.fd, self.segment_size)
            except OSError as exc:
                if exc.errno not in _DISK_FULL:
                    raise LogError(f"cannot preallocate log segment: {exc}") from exc
                self._mark_full(now, exc)
                return False
            self._full = False
            _log.info("log.disk_space_available", segment=str(active.path))
        return not self._full

    @property
    def synced_position(self) -> tuple[Path, int] | None:
        """(segment, offset) up to which every record is known to be on
        disk: :attr:`written_position` when nothing was written since the
        last sync (the sync mark written after it is no record)."""
        active = self._active
        if active is None:
            return None
        return (active.path, active.synced if self._dirty else active.end)

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
            "sync_marks_failed": self._n.marks_failed,
            "full": int(self._full),
        }

    # -- compaction and closing

    def seal(self, now: float) -> Cut:
        """Cut the log for a compaction: finish the segment being written
        (unless it is empty) so appends go on in a new one; return the
        :class:`Cut` naming the fsync'd segments before it. Records appended
        but not yet committed land after the cut.

        ``now`` is ``time.monotonic()``. Raises :class:`LogDiskFull` if the
        disk has no room for the new segment (the log is not marked full:
        appends go on where they were), :class:`LogError` if a compaction
        is under way or the segment cannot be made."""
        active = self._open_for_write()
        if self._cut is not None:
            raise LogError("a compaction is already under way: install() or abandon() it first")
        if active.end == HEADER_SIZE and active.seq > self._base:
            last = active.seq - 1  # nothing since the last roll: cut there
        else:
            active = self._roll(active, now, mark_full=False)
            last = active.seq - 1
            # its base, not this segment, is what lasts: the compaction writes its checkpoint
            self.sealed = [entry for entry in self.sealed if entry[0] != last]
        self._cut = Cut(
            str(self.directory),
            self._base,
            last,
            self._generation,
            str(self.directory / tmp_name(last, "base")),
            self._n.since_compaction,
        )
        return self._cut

    def install(self, cut: Cut) -> list[Path]:
        """Switch to the base a rewriter wrote to ``cut.tmp``: rename it onto
        segment ``cut.last`` (atomic) and sync the directory. Returns the
        files of the old history, stale now, for the caller to remove (the
        segments before ``cut.last``, and the replaced one under a ``.tmp``
        name: :func:`~corral.broker.compaction.remove_segments`; those left
        are removed on the next open). Raises :class:`LogError` if the rename
        fails (the compaction is abandoned, the log unchanged) and
        :class:`FsyncFailed` if the directory cannot be synced."""
        if cut != self._cut:
            raise LogError("install() of a cut this log did not make, or made earlier")
        final = seg_path(self.directory, cut.last)
        # The renamed-over segment keeps a second name, so the rename does
        # not free its blocks here (slow for a large file): its caller does.
        kept = self.directory / tmp_name(cut.last, "old")
        try:
            self.files.unlink(kept)
            self.files.link(final, kept)
        except OSError:
            kept = final  # no hard links here: the rename frees it
        try:
            self.files.rename(cut.tmp_path, final)
        except OSError as exc:
            self.abandon(cut)
            if kept != final:
                self.files.unlink(kept)
            raise LogError(f"compaction could not switch to its new base {cut.tmp}: {exc}") from exc
        self._cut = None
        self.files.fsync_dir(self.directory)
        for seq in range(cut.first, cut.last + 1):  # their indexes speak of replaced files
            for index in index_files(self.directory, seq):
                index.unlink(missing_ok=True)
        self._base = cut.last
        self._n.since_compaction -= cut.counted
        later = [(p, used) for p, used in self._n.finished if _seq_of(p) > cut.last]
        self._n.finished = [(final, os.stat(final).st_size), *later]
        return [*cut.segments[:-1], *([kept] if kept != final else [])]

    def abandon(self, cut: Cut) -> None:
        """Give up the compaction at ``cut``: its file goes, the log is as it was."""
        if cut == self._cut:
            self._cut = None
        try:
            self.files.unlink(cut.tmp_path)
        except OSError as exc:
            _log.warning("log.tmp_kept", file=cut.tmp, error=str(exc))

    def compact(self, live: Iterable[Record]) -> None:
        """Rewrite the log's history as exactly ``live``, in-process: seal,
        write the base, install. Raises :class:`LogDiskFull` when the disk has
        no room for it (the log is left as it was)."""
        if self._pending:
            raise LogError("compact() with uncommitted records: commit() first")
        cut = self.seal(time.monotonic())
        try:
            count, size = write_base(cut, live)
        except BaseException as exc:
            self.abandon(cut)
            if isinstance(exc, OSError):
                cls = LogDiskFull if exc.errno in _DISK_FULL else LogError
                raise cls(f"compaction could not write a new base segment: {exc}") from exc
            raise
        removed = remove_segments(self.install(cut))
        _log.info("log.compacted", records=count, bytes=size, removed_segments=removed)

    def close(self) -> None:
        """Write and sync what is pending, then close; idempotent."""
        if self._active is None:
            return
        if self._cut is not None:
            self.abandon(self._cut)
        try:
            if self._failed is None:
                self.sync()  # may roll to a new segment
        finally:
            self.files.close(self._active.fd)
            self._active = None
