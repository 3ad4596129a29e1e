"""The restart checkpoint: an index of a compacted base's queued jobs, kept
beside the log so that a restart need not decode them.

A compaction writes its base from the state (see
:mod:`corral.broker.compaction`): the jobs nothing has happened to yet go
as ``JobsCreated`` batches, which are most of a large backlog's bytes. The
rewriter then writes ``<base seq>.ckpt`` next to the base (the way
Bitcask's merge writes a hint file beside each data file, and Kafka keeps
an index beside each segment): for each such batch, where its frame is in
the base, how many jobs, their creation numbers, queue, task and priority
runs, their bytes; and one sorted array of 64-bit hashes of every id in
them, with the batch each belongs to. Loading it is a few reads and two
``array.frombytes``: no object per job.

A restart that finds a valid checkpoint for its base checks every frame of
the base as usual (CRC, so damage is found exactly as a full replay finds
it) but does not decode the batches it names: each becomes a
:class:`ColdBatch`, counted in the state, placed in the ready queues and
the creation-order index by one entry, and decoded the first time anything
needs one of its jobs (see :class:`~corral.broker.coldjobs.ColdJobs`).

The checkpoint is a cache, never the truth: it is CRC'd with the seed of
the base segment it describes (log generation and segment number, as the
log's frames are), names the generation, segment and size of that base,
is fsync'd and renamed into place; one that is missing, torn, corrupt,
stale or of another base is ignored (``checkpoint.ignored`` is logged) and
the base is replayed in full. A batch whose frame is not where, or not
what, the checkpoint says is decoded as usual.

Format: ``MAGIC``, a u32 version, a u32 CRC of the body, a u64 body length,
then the body (msgpack of :class:`Body`). A sealed segment's index
(``<seq>.idx``, :mod:`corral.broker.segindex`) is the same format, read
and written by the same functions, and so is a chunk index of the
segment being written (``<seq>.<start>-<end>.idx``: the frames in bytes
``[start, end)`` of it; see :func:`load_chunk`). Every such file is written
0600, as the log is: it names the jobs' ids.
"""

from __future__ import annotations

import hashlib
import os
import struct
from array import array
from pathlib import Path

import msgspec

from corral.broker.framing import FORMAT_VERSION, fsync_dir, segment_seed
from corral.broker.lazylog import get_logger

__all__ = [
    "Body",
    "ColdBatch",
    "Loaded",
    "build",
    "build_keyed",
    "chunk_path",
    "chunks_of",
    "ckpt_path",
    "id_hash",
    "idx_path",
    "load",
    "load_chunk",
    "write",
    "write_file",
]

MAGIC = b"CORRALCK"
VERSION = 1
_HEAD = struct.Struct("<8sIIQ")  # magic, version, crc, body length
_log = get_logger(__name__)


class ColdBatch(msgspec.Struct, array_like=True, gc=False):
    """One ``JobsCreated`` frame of a base, as the checkpoint describes it:
    its frame at ``offset`` (``length`` bytes, header included), its
    ``count`` jobs with creation numbers ``first_seq..last_seq``, their
    ``queue`` (resolved) and ``task``, their priority ``runs``
    (``(priority, start, end)`` index ranges), the sum and the largest of
    their blobs (bytes), and the CRC its frame header holds (``crc``; -1:
    not recorded, as in a compaction's checkpoint, whose base is checked
    whole by its size and mtime instead)."""

    offset: int
    length: int
    count: int
    first_seq: int
    last_seq: int
    queue: str
    task: str
    runs: list[tuple[int, int, int]]
    blob_bytes: int
    largest_blob: int
    crc: int = -1


class Body(msgspec.Struct, array_like=True):
    """A checkpoint's content: the base it describes (log ``generation``,
    segment ``seq``, file ``size`` in bytes and ``mtime_ns``), its ``batches``, and the
    sorted 64-bit hashes of their jobs' ids (``hashes``, uint64
    little-endian) with, per hash, the index of its batch (``owners``,
    uint32 little-endian). A chunk index describes bytes ``[start, size)``
    of its segment only, and names no mtime (0): the segment grows."""

    generation: int
    seq: int
    size: int
    #: The base file's modification time (ns): an edit in place (a repair)
    #: makes the checkpoint stale even where the size stays.
    mtime_ns: int
    batches: list[ColdBatch]
    hashes: bytes
    owners: bytes
    #: Where the bytes described begin (0: the whole file).
    start: int = 0


class Loaded(msgspec.Struct):
    """A checkpoint read and checked: its batches by frame offset, and the
    id hash index (see :func:`id_hash`)."""

    batches: list[ColdBatch]
    hashes: array[int]
    owners: array[int]


def ckpt_path(directory: Path, seq: int) -> Path:
    """Where the checkpoint of base segment ``seq`` lives."""
    return directory / f"{seq:020d}.ckpt"


def idx_path(directory: Path, seq: int) -> Path:
    """Where the index of sealed segment ``seq`` lives (the same format as a
    checkpoint: see :mod:`corral.broker.segindex`)."""
    return directory / f"{seq:020d}.idx"


def chunk_path(directory: Path, seq: int, start: int, end: int) -> Path:
    """Where the chunk index of bytes ``[start, end)`` of segment ``seq`` lives."""
    return directory / f"{seq:020d}.{start:012d}-{end:012d}.idx"


def chunks_of(directory: Path, seq: int) -> list[tuple[int, int, Path]]:
    """The chunk index files of segment ``seq``: ``(start, end, path)``,
    by start (a name that does not parse is passed over)."""
    found = []
    for path in directory.glob(f"{seq:020d}.*-*.idx"):
        try:
            start, end = (int(part) for part in path.name.split(".")[1].split("-"))
        except ValueError:
            continue
        found.append((start, end, path))
    return sorted(found)


def index_files(directory: Path, seq: int) -> list[Path]:
    """Every index of segment ``seq``: its whole one and its chunks."""
    return [idx_path(directory, seq), *(path for _, _, path in chunks_of(directory, seq))]


def id_hash(job_id: str) -> int:
    """A 64-bit hash of a job id that is the same in every process (Python's
    own ``hash`` is salted per process)."""
    digest = hashlib.blake2b(job_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def build(
    generation: int,
    seq: int,
    size: int,
    mtime_ns: int,
    batches: list[tuple[ColdBatch, list[str]]],
    start: int = 0,
) -> bytes:
    """The bytes of a checkpoint of base ``seq`` (``size`` bytes, modified
    at ``mtime_ns``) of log ``generation``, for ``batches`` (each with its
    jobs' ids); of a chunk index: bytes ``[start, size)``, ``mtime_ns`` 0."""
    # One int per id, hash above batch number: ints sort several times
    # faster than (hash, batch) tuples.
    keys = sorted(id_hash(job_id) << 32 | i for i, (_, ids) in enumerate(batches) for job_id in ids)
    return build_keyed(generation, seq, size, mtime_ns, [b for b, _ in batches], keys, start)


def build_keyed(
    generation: int,
    seq: int,
    size: int,
    mtime_ns: int,
    batches: list[ColdBatch],
    keys: list[int],
    start: int = 0,
) -> bytes:
    """:func:`build`, given the id index as sorted ``keys``: per id, its
    hash above 32 bits, the number of its batch (in ``batches``) below."""
    hashes = array("Q", [key >> 32 for key in keys])
    owners = array("I", [key & 0xFFFFFFFF for key in keys])
    body = msgspec.msgpack.encode(
        Body(
            generation,
            seq,
            size,
            mtime_ns,
            batches,
            _le(hashes).tobytes(),
            _le(owners).tobytes(),
            start,
        )
    )
    crc = _crc(body, generation, seq)
    return _HEAD.pack(MAGIC, VERSION, crc, len(body)) + body


def write(
    directory: Path,
    generation: int,
    seq: int,
    base: Path,
    batches: list[tuple[ColdBatch, list[str]]],
    *,
    path: Path | None = None,
    stat: os.stat_result | None = None,
) -> Path:
    """Write the checkpoint of base ``seq`` (the file ``base``, whole and
    synced; it may still have its tmp name) atomically: to a ``.tmp`` file,
    fsync'd, renamed into place, the directory fsync'd. Returns its path.
    ``path``: where (default :func:`ckpt_path`; a segment index is written
    to :func:`idx_path`); ``stat``: ``base``'s stat when it was read (by
    default, now). Raises OSError (the tmp file is removed)."""
    st = base.stat() if stat is None else stat
    data = build(generation, seq, st.st_size, st.st_mtime_ns, batches)
    return write_file(directory, ckpt_path(directory, seq) if path is None else path, data)


def write_file(directory: Path, path: Path, data: bytes) -> Path:
    """Write ``data`` (built by :func:`build`) to ``path`` in ``directory``
    atomically, owner-only (0600, whatever the umask): to a ``.tmp`` file,
    fsync'd, renamed into place, the directory fsync'd. Raises OSError
    (the tmp file is removed)."""
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # (a tmp file of the same name left by a killed writer)
        with memoryview(data) as view:
            done = 0
            while done < len(data):
                done += os.write(fd, view[done:])
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(directory)
    return path


class _Unusable(Exception):
    """An index file that cannot be used, and why."""


def load(
    directory: Path, generation: int, seq: int, base: Path, path: Path | None = None
) -> Loaded | None:
    """The checkpoint of base ``seq`` (the file ``base``) of log
    ``generation``, or None when there is none or it cannot be used
    (logged as ``checkpoint.ignored`` with the reason). ``path``: the file
    to read (default :func:`ckpt_path`; a segment's index: :func:`idx_path`).
    Never raises for a bad file."""
    path = ckpt_path(directory, seq) if path is None else path
    try:
        st = base.stat()
        got = _read(path, generation, seq)
        if got is None:
            return None
        if (got.generation, got.seq, got.size, got.mtime_ns, got.start) != (
            generation,
            seq,
            st.st_size,
            st.st_mtime_ns,
            0,
        ):
            raise _Unusable("it describes another base (stale)")
        return _loaded(got)
    except FileNotFoundError:
        return None
    except _Unusable as exc:
        _ignored(path, str(exc))
        return None


def load_chunk(
    generation: int, seq: int, segment: Path, start: int, end: int, path: Path
) -> Loaded | None:
    """The chunk index ``path`` of bytes ``[start, end)`` of segment ``seq``
    (the file ``segment``, maybe still being written) of log
    ``generation``, or None when it cannot be used (logged as
    ``segment_index.ignored``). The segment's size and mtime change as it
    grows, so what ties a chunk to its bytes is, beside its CRC seed, the
    CRC of every frame it names (:attr:`ColdBatch.crc`, which the replay
    compares with the frame's): a chunk of bytes since cut and written
    again never stands for them. Never raises for a bad file."""
    try:
        size = segment.stat().st_size
        got = _read(path, generation, seq)
        if got is None:
            return None
        if (got.generation, got.seq, got.start, got.size, got.mtime_ns) != (
            generation,
            seq,
            start,
            end,
            0,
        ):
            raise _Unusable("it describes other bytes than its name says (stale)")
        if end > size:
            raise _Unusable(f"it describes bytes up to {end}, the segment has {size} (stale)")
        for batch in got.batches:
            if batch.crc < 0 or not start <= batch.offset < batch.offset + batch.length <= end:
                raise _Unusable(f"its batch at offset {batch.offset} is not of its bytes")
        return _loaded(got)
    except FileNotFoundError:
        return None
    except _Unusable as exc:
        _ignored(path, str(exc))
        return None


def _read(path: Path, generation: int, seq: int) -> Body | None:
    """The body of index file ``path`` (a checkpoint, a segment's index or
    chunk) of segment ``seq`` of log ``generation``, checked whole; None if
    it is missing. Raises _Unusable (torn, damaged, of another segment)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _Unusable(f"cannot read it: {exc}") from exc
    if len(data) < _HEAD.size:
        raise _Unusable("shorter than its header (torn)")
    magic, version, crc, length = _HEAD.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise _Unusable("not a checkpoint of this version")
    body = memoryview(data)[_HEAD.size :]
    if len(body) != length:
        raise _Unusable(f"body is {len(body)} bytes, its header says {length} (torn)")
    if _crc(body, generation, seq) != crc:
        raise _Unusable("checksum mismatch (damaged, or of another log or segment)")
    try:
        return msgspec.msgpack.decode(body, type=Body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise _Unusable(f"cannot decode it: {exc}") from exc


def _loaded(got: Body) -> Loaded:
    """Raises _Unusable."""
    hashes, owners = array("Q"), array("I")
    hashes.frombytes(got.hashes)
    owners.frombytes(got.owners)
    if len(hashes) != len(owners):
        raise _Unusable("its id index does not match its batches")
    return Loaded(got.batches, _le(hashes), _le(owners))


def remove_others(directory: Path, keep: int | None) -> None:
    """Remove every checkpoint but base ``keep``'s (older bases' are stale)."""
    for entry in directory.glob("*.ckpt"):
        if keep is None or entry.name != ckpt_path(directory, keep).name:
            entry.unlink(missing_ok=True)


def _crc(body: bytes | memoryview, generation: int, seq: int) -> int:
    import zlib

    return zlib.crc32(body, segment_seed(FORMAT_VERSION, generation, seq))


def _le(values: array[int]) -> array[int]:
    """``values`` in little-endian order (swapped in place on a big-endian host)."""
    if struct.pack("=H", 1) != struct.pack("<H", 1):
        values.byteswap()
    return values


def _ignored(path: Path, reason: str) -> None:
    event = "segment_index.ignored" if path.suffix == ".idx" else "checkpoint.ignored"
    _log.warning(event, file=str(path), reason=reason)
