"""Segment indexes: a restart need not decode the job batches of a sealed
segment, whether or not the log was ever compacted.

When the log rolls to a new segment, the old one is sealed: whole,
fsync'd, never written again. The broker then writes ``<seq>.idx`` beside
it (the way Kafka keeps an offset index beside each segment, and Bitcask
a hint file beside each data file) describing each ``JobsCreated`` frame
of the segment exactly as a compaction's checkpoint describes a batch of
its base (see :mod:`corral.broker.checkpoint`, whose file format and
checks it shares): frame offset and length, jobs, creation numbers,
queue, task, priority runs, blob bytes, and the sorted 64-bit hashes of
the ids with the batch each belongs to. A restart that finds a valid
index for a sealed segment checks every frame's CRC as usual but leaves
the batches it names cold (see :mod:`corral.broker.coldjobs`); a later
record that names one of their jobs warms its batch by the id index.

Which batches may be cold: applying a ``JobsCreated`` later, when one of
its jobs is first looked up, must give the state applying it at once
gives. Its jobs are plain by construction (no ``run_at``/``delay``,
flow, callbacks, unique or limit key, headers: see
:func:`~corral.broker.job.plain`), so applying one only counts them and
places them on their queue's lanes and in the creation-order index. The
one option a batch may still carry that the state watches job by job is
``expires`` (the expiring heap, moved by clock steps): such batches are
never described. Nor is a batch whose ids repeat within the segment (a
log the broker wrote has none: an id is taken only if no job holds it).

An index is a cache, never the truth: it is CRC'd with its segment's
seed, names the log generation, segment number, size and mtime it
describes, is fsync'd and renamed into place; one that is missing, torn,
corrupt or stale is ignored (``segment_index.ignored`` is logged), the
segment replayed in full, and indexed again after the start. A segment
replaced or rewritten (compaction, repair) loses its index.

Building an index reads the segment back (the broker's hot path does
nothing for it): on the loop for a sealed segment of up to
:data:`INLINE_MAX` bytes (a few ms), else in a child process,
``python -m corral.broker.segindex ORDER`` (niced, killed with the broker,
as the compactor is).

The segment being written is indexed by *chunks*
(``<seq>.<start>-<end>.idx``, the same format: :func:`build_chunk`): each
time :data:`CHUNK_BYTES` more were written to it, or once the log has been
idle :data:`CHUNK_IDLE` seconds with at least :data:`CHUNK_IDLE_BYTES`
unindexed, the loop orders one for the bytes since the last (see
:meth:`Indexer.grow`), and the child fdatasyncs the segment before it
reads them, so a chunk never describes bytes that are not on disk. A chunk
cannot be tied to the growing file's size and mtime; it names its byte
range and each batch's frame CRC, which the replay compares with the
frame's own (:func:`~corral.broker.checkpoint.load_chunk`). A restart
replays only what its valid chunks do not cover, and goes on chunking from
where they end. When the segment is sealed it gets one last chunk to its
end, then a whole index merged from its chunks (:func:`merge_chunks`:
one id index per sealed segment, and no id read twice); a sealed segment
whose chunks do not cover it back to back is scanned instead.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import mmap
import os
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import msgspec

from corral.broker import checkpoint
from corral.broker.checkpoint import ColdBatch
from corral.broker.deathsig import die_with_parent
from corral.broker.framing import FRAME, HEADER_SIZE, check_frame, content_end, read_header
from corral.broker.job import BLOB_HEAD, DEFAULT_QUEUE, priority_runs
from corral.broker.lazylog import get_logger
from corral.broker.records import RECORD_CODES, JobsCreated, decode_record

__all__ = [
    "INLINE_MAX",
    "Indexer",
    "Order",
    "build_index",
    "describe",
    "describe_batch",
    "remove_indexes",
]

#: A sealed segment of up to this many bytes is indexed on the loop (a few
#: thousand jobs at most: a few ms); a larger one in a child process.
INLINE_MAX = 128 << 10
#: The child's niceness: the broker's loop comes first.
NICENESS = 10
#: The segment being written gets a chunk index each time this many bytes
#: were written to it since its last chunk (a restart replays at most about
#: this much of it in full, and what was written since the last chunk).
CHUNK_BYTES = 8 << 20
#: ... and, once the log was idle (nothing written) for ``CHUNK_IDLE``
#: seconds, when at least ``CHUNK_IDLE_BYTES`` were.
CHUNK_IDLE = 2.0
CHUNK_IDLE_BYTES = 256 << 10
#: The longest a chunk the child could not write waits to be ordered again.
RETRY_MAX = 60.0
_JOBS_CREATED = RECORD_CODES[JobsCreated]
_OWNER = 0xFFFFFFFF  # the batch number's bits of an id key
_log = get_logger(__name__)


def describe(record: JobsCreated, offset: int, length: int, crc: int = -1) -> ColdBatch | None:
    """The index entry of ``record`` (a frame at ``offset``, ``length``
    bytes, its header's CRC ``crc``), or None when its batch may not be
    cold (see the module docstring)."""
    if record.template.expires is not None or not record.ids:
        return None
    if len(set(record.ids)) != len(record.ids):
        return None
    return describe_batch(record, offset, length, crc)


def describe_batch(record: JobsCreated, offset: int, length: int, crc: int = -1) -> ColdBatch:
    """What an index (or a checkpoint) says of the batch ``record``, a
    frame at ``offset`` of ``length`` bytes (header included) whose header
    holds CRC ``crc`` (-1: not recorded)."""
    tpl = record.template
    sizes = list(map(len, record.blobs))
    runs = record.runs or priority_runs(record.blobs)
    return ColdBatch(
        offset,
        length,
        len(record.ids),
        BLOB_HEAD.unpack_from(record.blobs[0])[0],
        BLOB_HEAD.unpack_from(record.blobs[-1])[0],
        tpl.queue or DEFAULT_QUEUE,
        tpl.task,
        [tuple(run) for run in runs],  # type: ignore[misc]
        sum(sizes),
        max(sizes),
        crc,
    )


def scan_batches(
    path: Path, start: int = HEADER_SIZE, end: int | None = None
) -> tuple[int, int, list[tuple[ColdBatch, list[str]]]] | None:
    """The generation, segment number and describable batches of segment
    ``path`` (sealed; or, with ``end``, the frames in bytes ``[start,
    end)`` of it, both frame boundaries); None when a frame there is bad
    (it is then never indexed: the replay finds the damage). Raises
    OSError."""
    header = read_header(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size <= HEADER_SIZE or (end is not None and end > size):
            return (header.generation, header.seq, []) if end is None else None
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    found: list[tuple[ColdBatch, list[str]]] = []
    try:
        stop = content_end(data) if end is None else end  # type: ignore[arg-type]
        pos = start
        with memoryview(data) as view:
            while pos < stop:
                got = check_frame(data, view, pos, header.seed)  # type: ignore[arg-type]
                if isinstance(got, str) or (end is not None and got[0] > end):
                    return None
                end_at, code = got
                if code == _JOBS_CREATED:
                    record = decode_record(code, data[pos + 9 : end_at])
                    assert isinstance(record, JobsCreated)
                    crc = FRAME.unpack_from(data, pos)[1]
                    batch = describe(record, pos, end_at - pos, crc)
                    if batch is not None:
                        found.append((batch, list(record.ids)))
                pos = end_at
    finally:
        data.close()
    return header.generation, header.seq, _unique(found)


def _unique(found: list[tuple[ColdBatch, list[str]]]) -> list[tuple[ColdBatch, list[str]]]:
    """``found`` less every batch holding an id another batch holds too."""
    ids = [job_id for _, batch_ids in found for job_id in batch_ids]
    if len(set(ids)) == len(ids):
        return found
    seen: set[str] = set()
    twice = {job_id for job_id in ids if job_id in seen or seen.add(job_id)}  # type: ignore[func-returns-value]
    return [(b, batch_ids) for b, batch_ids in found if twice.isdisjoint(batch_ids)]


def build_index(path: Path) -> Path | None:
    """Write the index of sealed segment ``path``; returns its path, or
    None when the segment cannot be indexed (a bad frame) or changed while
    it was read (a compaction replaced it). Raises OSError."""
    before = path.stat()
    header = read_header(path)
    index = checkpoint.idx_path(path.parent, header.seq)
    merged = merge_chunks(path, header.generation, header.seq, before.st_size)
    if merged is not None:  # its chunks cover it: their ids need no reading again
        batches, keys = merged
        data = checkpoint.build_keyed(
            header.generation, header.seq, before.st_size, before.st_mtime_ns, batches, keys
        )
        checkpoint.write_file(path.parent, index, data)
    else:
        got = scan_batches(path)
        if got is None:
            _log.warning("segment_index.not_written", segment=str(path), reason="a bad frame")
            return None
        generation, seq, found = got
        checkpoint.write(path.parent, generation, seq, path, found, path=index, stat=before)
    seq = header.seq
    if _changed(before, path):  # replaced meanwhile: the index speaks of the old file
        index.unlink(missing_ok=True)
        return None
    for _, _, chunk in checkpoint.chunks_of(path.parent, seq):  # (the index covers them)
        chunk.unlink(missing_ok=True)
    return index


def merge_chunks(
    path: Path, generation: int, seq: int, size: int
) -> tuple[list[ColdBatch], list[int]] | None:
    """The batches and id keys (see :func:`~corral.broker.checkpoint.build_keyed`)
    of sealed segment ``path`` (``size`` bytes) taken from its chunk
    indexes, or None unless valid chunks cover it back to back and each
    batch they name is, by its frame header's length and CRC, still the
    frame there (it is then scanned instead). A batch holding an id
    (by its hash) that another batch holds too is left out, as a scan
    leaves out batches whose ids repeat. Raises OSError."""
    directory = path.parent
    parts: list[checkpoint.Loaded] = []
    covered = HEADER_SIZE
    for start, end, chunk in checkpoint.chunks_of(directory, seq):
        if start != covered:
            continue
        loaded = checkpoint.load_chunk(generation, seq, path, start, end, chunk)
        if loaded is None:
            return None
        parts.append(loaded)
        covered = end
    if covered != size or not parts:
        return None
    with open(path, "rb") as f:
        heads = [os.pread(f.fileno(), FRAME.size, b.offset) for part in parts for b in part.batches]
    batches = [b for part in parts for b in part.batches]
    for batch, head in zip(batches, heads, strict=True):
        length, crc, code = FRAME.unpack(head)
        if (length + 8, crc, code) != (batch.length, batch.crc, _JOBS_CREATED):
            return None
    keys: list[int] = []
    base = 0
    for part in parts:
        keys += [h << 32 | (o + base) for h, o in zip(part.hashes, part.owners, strict=True)]
        base += len(part.batches)
    keys.sort()  # (runs sorted already: a merge)
    twice: set[int] = set()
    for key, after in itertools.pairwise(keys):
        if key >> 32 == after >> 32:
            twice.update((key & _OWNER, after & _OWNER))
    if twice:
        kept = [i for i in range(len(batches)) if i not in twice]
        number = {old: new for new, old in enumerate(kept)}
        batches = [batches[i] for i in kept]
        keys = [k >> 32 << 32 | number[k & _OWNER] for k in keys if k & _OWNER in number]
    return batches, keys


def build_chunk(path: Path, start: int, end: int) -> Path | None:
    """Write the chunk index of bytes ``[start, end)`` of segment ``path``,
    the segment being written (both frame boundaries, everything before
    ``end`` written to the file): the segment is fdatasync'd first, so a
    chunk never describes bytes that are not on disk, whatever the log's
    fsync policy. Returns its path, or None when those bytes cannot be
    indexed (a bad frame; past the file's end) or the file was replaced
    meanwhile (a compaction). Raises OSError."""
    with open(path, "rb") as f:
        before = os.fstat(f.fileno())
        os.fdatasync(f.fileno())
    got = scan_batches(path, start, end)
    if got is None:
        _log.warning("segment_index.not_written", segment=str(path), start=start, end=end)
        return None
    generation, seq, batches = got
    chunk = checkpoint.chunk_path(path.parent, seq, start, end)
    data = checkpoint.build(generation, seq, end, 0, batches, start)
    checkpoint.write_file(path.parent, chunk, data)
    try:
        now = path.stat()
    except FileNotFoundError:
        now = None
    if now is None or now.st_ino != before.st_ino:  # replaced: the chunk speaks of the old file
        chunk.unlink(missing_ok=True)
        return None
    return chunk


def _changed(before: os.stat_result, path: Path) -> bool:
    try:
        now = path.stat()
    except FileNotFoundError:
        return True
    return (now.st_ino, now.st_size, now.st_mtime_ns) != (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )


def remove_indexes(directory: Path, *, upto: int | None = None, below: int | None = None) -> None:
    """Remove the indexes of segments ``<= upto`` (replaced by a
    compaction's base), or ``< below`` (segments no longer in the log), or
    (neither given) every one (a repair rewrote the log)."""
    for entry in directory.glob("*.idx"):
        try:
            seq = int(entry.name.split(".")[0])
        except ValueError:
            continue
        if (upto is None or seq <= upto) and (below is None or seq < below):
            entry.unlink(missing_ok=True)


# -- the child ----------------------------------------------------------------


class Order(msgspec.Struct, frozen=True):
    """What the child is asked to do: index ``chunks`` (``(segment path,
    start, end)``: bytes of the segment being written), then ``segments``
    (sealed ones' paths), then exit; ``parent`` is the broker's pid (0: do
    not watch it)."""

    segments: list[str]
    parent: int = 0
    chunks: list[tuple[str, int, int]] = []


#: At most this many failures a child reports, each error at most this long
#: (its report must fit a pipe's buffer: the broker reads it after the exit).
MAX_FAILURES = 20
MAX_ERROR = 500


class Failure(msgspec.Struct, frozen=True):
    """An index the child could not write: of ``segment``, the chunk of
    bytes ``[start, end)`` (-1, -1: its whole index), and why."""

    segment: str
    start: int = -1
    end: int = -1
    error: str = ""


class Report(msgspec.Struct, frozen=True):
    """The child's last line on stdout: what it could not write (the first
    :data:`MAX_FAILURES`) and how many in all."""

    failed: list[Failure] = []
    count: int = 0


def main(argv: list[str] | None = None) -> int:
    """The child: ``python -m corral.broker.segindex ORDER_JSON``. Exits 0
    when every segment was indexed or found unindexable, 1 on an error."""
    args = sys.argv[1:] if argv is None else argv
    try:
        order = msgspec.json.decode(args[0] if args else b"", type=Order)
    except msgspec.DecodeError as exc:
        print(f"corral.broker.segindex: bad order: {exc}", file=sys.stderr)
        return 2
    if order.parent:
        die_with_parent(order.parent)
    with contextlib.suppress(ImportError):
        import setproctitle

        setproctitle.setproctitle("corral: indexer")
    with contextlib.suppress(OSError):
        os.nice(NICENESS)
    gc.disable()
    work: list[tuple[Failure, Callable[[], object]]] = [
        (Failure(path, start, end), partial(build_chunk, Path(path), start, end))
        for path, start, end in order.chunks
    ]
    work += [(Failure(path), partial(build_index, Path(path))) for path in order.segments]
    failed: list[Failure] = []
    for what, build in work:
        try:
            build()
        except FileNotFoundError:
            continue  # compacted away meanwhile
        except Exception as exc:  # a full disk, a bug: reported, the log is whole without it
            error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR]
            failed.append(msgspec.structs.replace(what, error=error))
    # The broker logs these in its own lines (a bare text line on the
    # daemon's stderr broke a reader of its JSON lines): one line, last, so
    # that it fits the pipe (the broker reads it once this process ended).
    report = Report(failed[:MAX_FAILURES], len(failed))
    sys.stdout.write(msgspec.json.encode(report).decode() + "\n")
    sys.stdout.flush()
    return 1 if failed else 0


# -- the broker's side --------------------------------------------------------


class Indexer:
    """Indexes the segments the log seals (and those a restart found
    without an index): small ones at once, larger ones in one child process
    at a time; and the segment being written, by chunks as it grows (see
    :meth:`grow`). See the module docstring. Never raises: an index is a
    cache."""

    def __init__(self) -> None:
        #: Segments waiting for the child, by path.
        self.pending: list[Path] = []
        #: Chunks of the segment being written waiting for the child.
        self.pending_chunks: list[tuple[str, int, int]] = []
        self._proc: subprocess.Popen[bytes] | None = None
        #: Indexes written on the loop, and children started (for tests and stats).
        self.inline = 0
        self.children = 0
        #: The segment being written, where its next chunk starts, how far
        #: it was written at the last :meth:`grow` and since when it stayed so.
        self._segment: Path | None = None
        self._chunk_from = HEADER_SIZE
        self._seen_end = 0
        self._still_since = 0.0
        #: A chunk the child could not write is ordered again no sooner
        #: than this (monotonic), after a back-off doubling to RETRY_MAX.
        self._retry_at = 0.0
        self._retry_delay = CHUNK_IDLE

    def resume(self, segment: Path, end: int) -> None:
        """After a replay: the chunk indexes of ``segment`` (the one being
        written) cover it up to ``end`` (a frame boundary; the header's end
        if none)."""
        self._segment, self._chunk_from = segment, max(end, HEADER_SIZE)

    def grow(self, segment: Path, end: int, now: float) -> None:
        """The segment being written is ``segment``, written up to ``end``
        (a frame boundary), at ``now`` (monotonic seconds): order a chunk
        index of what was written since its last one, if that is
        :data:`CHUNK_BYTES`, or :data:`CHUNK_IDLE_BYTES` after
        :data:`CHUNK_IDLE` seconds without a write. Costs a few compares
        per pass; the chunk is built by the child (see :meth:`poll`)."""
        if segment != self._segment:  # a roll: a new segment
            self._segment, self._chunk_from = segment, HEADER_SIZE
        if end != self._seen_end:
            self._seen_end, self._still_since = end, now
        grown = end - self._chunk_from
        if now < self._retry_at:
            return
        if grown >= CHUNK_BYTES or (
            grown >= CHUNK_IDLE_BYTES and now - self._still_since >= CHUNK_IDLE
        ):
            self.pending_chunks.append((str(segment), self._chunk_from, end))
            self._chunk_from = end

    def due(self, segment: Path, end: int) -> bool:
        """Whether :meth:`grow` may have work (cheap; for the loop)."""
        grown = end - self._chunk_from
        if grown >= min(CHUNK_BYTES, CHUNK_IDLE_BYTES):
            return True
        # the same Path object pass after pass: `is` spares pathlib's __eq__
        return segment is not self._segment and segment != self._segment

    @property
    def child(self) -> subprocess.Popen[bytes] | None:
        return self._proc

    @property
    def busy(self) -> bool:
        """Segments or chunks are waiting, or a child is at work."""
        return bool(self.pending or self.pending_chunks) or self._proc is not None

    def want(self, path: Path, size: int) -> None:
        """Index sealed segment ``path`` (``size`` bytes used) by a whole
        index, which replaces any chunks it has: if it is the segment whose
        chunks were being written, one last chunk up to its end first, and
        the whole index is merged from them (see :func:`merge_chunks`: no
        id read or hashed again)."""
        if path == self._segment and self._chunk_from > HEADER_SIZE:
            # one last chunk, then a whole index merged from its chunks (the
            # child does chunks first): one id index per sealed segment
            if size > self._chunk_from:
                self.pending_chunks.append((str(path), self._chunk_from, size))
            self._segment = None
            self.pending.append(path)
            return
        self.pending_chunks = [c for c in self.pending_chunks if c[0] != str(path)]
        if size > INLINE_MAX:
            self.pending.append(path)
            return
        try:
            if build_index(path) is not None:
                self.inline += 1
        except Exception as exc:  # a cache: a full disk, a bad frame, a bug never stop the loop
            _log.warning("segment_index.not_written", segment=str(path), error=repr(exc))

    def poll(self) -> None:
        """Reap a finished child; start one for the waiting segments. Never waits."""
        proc = self._proc
        if proc is not None:
            code = proc.poll()
            if code is None:
                return
            self._proc = None
            self._reaped(proc, code)
        if not (self.pending or self.pending_chunks):
            return
        order = Order([str(p) for p in self.pending], os.getpid(), self.pending_chunks)
        self.pending, self.pending_chunks = [], []
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "corral.broker.segindex", msgspec.json.encode(order)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,  # its Report, read once it ended
            )
        except OSError as exc:
            _log.warning("segment_index.not_started", error=str(exc))
            return
        self.children += 1

    def _reaped(self, proc: subprocess.Popen[bytes], code: int) -> None:
        """Log what the ended child could not write, in the broker's own
        lines, and order a chunk of the segment being written that it could
        not write again (after a back-off: a full disk), if no later chunk
        was ordered since."""
        report = _report(proc)
        if report is None:
            if code != 0:
                _log.warning("segment_index.child_failed", code=code)
            return
        for failure in report.failed:
            _log.warning(
                "segment_index.not_written",
                **msgspec.structs.asdict(failure),
                hint="an index is a cache: the log is whole without it (a restart replays "
                "those bytes); free disk space if it is full",
            )
        if report.count > len(report.failed):
            _log.warning("segment_index.not_written_more", count=report.count - len(report.failed))
        again = [
            f
            for f in report.failed
            if f.start >= 0 and self._segment is not None and f.segment == str(self._segment)
        ]
        if not report.failed:
            self._retry_delay = CHUNK_IDLE
        if again and again[-1].end == self._chunk_from:
            self._chunk_from = min(f.start for f in again)
            self._retry_at = time.monotonic() + self._retry_delay
            self._retry_delay = min(self._retry_delay * 2, RETRY_MAX)

    def stop(self) -> None:
        """Kill a running child and reap it (at shutdown, or before a
        compaction replaces segments it may be reading)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()


def _report(proc: subprocess.Popen[bytes]) -> Report | None:
    """The ended child's :class:`Report` (its last line on stdout); None if
    it wrote none (killed, or an older child)."""
    if proc.stdout is None:
        return None
    with proc.stdout:
        text = proc.stdout.read()
    try:
        return msgspec.json.decode(text.strip().splitlines()[-1], type=Report)
    except (msgspec.DecodeError, IndexError):
        return None


if __name__ == "__main__":
    sys.exit(main())
