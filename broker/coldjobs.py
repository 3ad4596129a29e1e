"""Cold jobs: queued jobs a restart took from an index without decoding
them, and the job table that makes them look like any other job.

After a restart, each ``JobsCreated`` batch that a compacted base's
checkpoint (see :mod:`corral.broker.checkpoint`) or a sealed segment's
index (see :mod:`corral.broker.segindex`) names is *cold*: the state counts
its jobs (per queue, task and status, bytes, creation numbers), its runs of
one priority hold one :class:`ColdRun` entry each on their ready lane, and
the creation-order index holds one :class:`ColdBlock` for it; nothing is
made per job. The batch is *warmed* (its frame read back from the base,
checked and decoded, a :class:`~corral.broker.job.Job` made per job) the
first time anything needs one of its jobs (each index is a source: its
segment, CRC seed and id hash array; batch numbers are unique across
them):

- a lookup by id (``get``, ``in``, ``[]``, ``pop``, ``setdefault`` on the
  :class:`JobTable`): an id whose hash the checkpoint's index holds warms
  its batch first, so a record naming the job, a client asking for it and
  the "id must be new" check of an enqueue all see it;
- a run reaching the front of its ready lane (dispatch, ``peek``, the
  oldest job's age): the batch is warmed and the run's jobs take its place,
  in order;
- a walk of the table (``values``, ``items``, iterating it): all batches
  are warmed first, so the broker's walks that may run while jobs are
  cold read ``warm_values`` or the ready lanes instead (a purge, a clock
  step, the start-up checks); a walk of the creation-order index (listing
  jobs) warms each batch as it reaches it, so a page costs the batches it
  shows (a filter that cannot take a batch's jobs passes it over).

The broker also warms a few batches per pass while any are cold (so a
restart is followed by about a second of background work, never a stall),
and starts no compaction while any are, since compaction replaces the
segment files the cold batches are read from.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import os
from collections.abc import Callable, ItemsView, Iterator, KeysView, ValuesView
from pathlib import Path
from typing import Any, NamedTuple

from corral.broker.checkpoint import ColdBatch, Loaded, id_hash
from corral.broker.framing import LogCorrupt, check_frame
from corral.broker.job import BLOB_HEAD, DEFAULT_QUEUE, Job
from corral.broker.records import RECORD_CODES, JobsCreated, decode_record

__all__ = ["JOBS_CREATED_CODE", "ColdBlock", "ColdJobs", "ColdRef", "ColdRun", "JobTable"]

JOBS_CREATED_CODE = RECORD_CODES[JobsCreated]
_get = dict.get
_contains = dict.__contains__
_len = dict.__len__


class ColdRef(NamedTuple):
    """What a replay yields in place of a cold batch's record: the batch's
    number in the checkpoint and its description."""

    number: int
    batch: ColdBatch

    @property
    def expect(self) -> tuple[int, ...]:
        """The frame's length, type code and, if the index recorded it, CRC
        (see :class:`~corral.broker.framing.Scan`)."""
        batch = self.batch
        if batch.crc < 0:
            return (batch.length, JOBS_CREATED_CODE)
        return (batch.length, JOBS_CREATED_CODE, batch.crc)


class ColdRun:
    """A ready-lane entry standing for one run of one priority of a cold
    batch: ``seq`` is the run's last creation number, or a bound above it
    when the batch's numbers have gaps (what an append to the lane compares
    with: see :meth:`ReadyQueues.add_cold
    <corral.broker.ready.ReadyQueues.add_cold>`), ``jobs`` the run's jobs
    once the batch is warm."""

    __slots__ = ("batch", "end", "jobs", "placed", "seq", "start")
    id = ""  # no job has it: the lane's liveness check never takes a run for a job

    def __init__(self, batch: int, start: int, end: int, seq: int) -> None:
        self.batch = batch
        self.start = start
        self.end = end
        self.seq = seq
        self.jobs: list[Job] | None = None
        #: On a lane (False: its jobs were placed one by one when warmed).
        self.placed = True


class _Mark:
    """The one entry of a :class:`ColdBlock`: its batch's last creation number."""

    __slots__ = ("seq",)
    id = ""

    def __init__(self, seq: int) -> None:
        self.seq = seq


class ColdBlock(list):  # type: ignore[type-arg]
    """A creation-order index block standing for a cold batch (one entry,
    whose ``seq`` is the batch's last creation number)."""

    __slots__ = ("batch", "first", "jobs")

    def __init__(self, batch: int, first: int, last: int) -> None:
        super().__init__([_Mark(last)])
        self.batch = batch
        self.first = first
        #: The batch's jobs once it is warmed (the block's place then holds them).
        self.jobs: list[Job] | None = None


class _Source:
    """One index that cold batches came from: the segment it describes
    (file, CRC seed), its id hash index, the index file itself (removed if
    it proves wrong), the number its first batch took, and the segment as
    the replay read it, held open (a file renamed over its name later, a
    copy or a restore, is not what the batches are in)."""

    __slots__ = ("fd", "first", "index", "loaded", "path", "seed")

    def __init__(self, loaded: Loaded, path: Path, seed: int, index: Path, first: int) -> None:
        self.loaded = loaded
        self.path = path
        self.seed = seed
        self.index = index
        self.first = first
        self.fd: int | None = os.open(path, os.O_RDONLY | os.O_CLOEXEC)


class ColdJobs:
    """The cold batches of one restart: which are still cold, the id
    indexes (one per segment they came from), and how to warm one.
    ``materialise(record, batch_number)`` adds a warmed batch's jobs to the
    state. Batch numbers are the replay's, unique across segments."""

    def __init__(self, materialise: Callable[[JobsCreated, int], list[Job]]) -> None:
        self._sources: list[_Source] = []
        #: The first batch number of each source (sorted: sources come in log order).
        self._firsts: list[int] = []
        self._materialise = materialise
        #: batch number -> batch, for the batches still cold, in log order.
        self.batches: dict[int, ColdBatch] = {}
        #: Jobs in cold batches.
        self.count = 0
        #: batch number -> the ready-lane entries of its runs.
        self.runs: dict[int, list[ColdRun]] = {}
        #: Batches warmed, for the stats.
        self.warmed = 0
        #: The replay is still reading the log: a segment's later frames may
        #: still be read back, so its file stays open even while no batch
        #: is cold (see :meth:`replayed`).
        self.replaying = True

    def replayed(self) -> None:
        """The replay is over: from now on the segments close once no batch
        is cold (at once if none is)."""
        self.replaying = False
        if not self.batches:
            self.close()

    def add_source(self, loaded: Loaded, segment: Path, seed: int, index: Path, first: int) -> None:
        """Take the batches of ``loaded`` (the index file ``index`` of
        ``segment``, CRC ``seed``), numbered from ``first`` on (above any
        source's so far)."""
        self._sources.append(_Source(loaded, segment, seed, index, first))
        self._firsts.append(first)

    def register(self, ref: ColdRef) -> None:
        self.batches[ref.number] = ref.batch
        self.count += ref.batch.count

    def warm_id(self, job_id: Any) -> bool:
        """Warm the batch that may hold ``job_id`` (by its hash); True if
        one was warmed."""
        if not isinstance(job_id, str) or not self.batches:
            return False
        h = id_hash(job_id)
        found = False
        for source in self._sources:
            hashes, owners = source.loaded.hashes, source.loaded.owners
            i = bisect.bisect_left(hashes, h)
            while i < len(hashes) and hashes[i] == h:
                number = source.first + owners[i]
                if number in self.batches:  # (a number past the batches is in none)
                    self.warm(number)
                    found = True
                i += 1
        return found

    def _source(self, number: int) -> _Source:
        return self._sources[bisect.bisect_right(self._firsts, number) - 1]

    def read(self, number: int, batch: ColdBatch) -> JobsCreated:
        """Batch ``number``'s record, read back from its segment and checked
        against ``batch`` (its description). Raises LogCorrupt if its frame
        is no longer what the replay checked (the segment changed under the
        broker; the index that described it is removed)."""
        source = self._source(number)
        if source.fd is None:
            raise LogCorrupt(
                source.path, batch.offset, "a cold batch read after its segment was closed"
            )
        try:
            data = os.pread(source.fd, batch.length, batch.offset)
        except OSError as exc:
            raise LogCorrupt(
                source.path, batch.offset, f"a cold batch cannot be read: {exc}"
            ) from exc
        with memoryview(data) as view:
            got = check_frame(data, view, 0, source.seed)
        record = None
        if got == (batch.length, JOBS_CREATED_CODE):
            record = decode_record(JOBS_CREATED_CODE, data[9:])
        if not isinstance(record, JobsCreated) or _described(record) != _description(batch):
            with contextlib.suppress(OSError):  # the next start replays it in full
                source.index.unlink()
            raise LogCorrupt(
                source.path, batch.offset, "a cold batch is not what the replay read there"
            )
        return record

    def warm(self, number: int) -> list[Job]:
        """Read batch ``number`` back from its segment, check and decode it,
        and add its jobs (see the module docstring). Raises LogCorrupt (see
        :meth:`read`): the batch then stays cold, and the broker stops
        rather than serve on without its jobs."""
        batch = self.batches[number]
        record = self.read(number, batch)
        # Only now is the batch gone from the cold ones: a batch that could not
        # be read stays counted and placed (the broker stops on the error).
        del self.batches[number]
        self.count -= batch.count
        self.warmed += 1
        jobs = self._materialise(record, number)
        for run in self.runs.pop(number, ()):
            run.jobs = jobs[run.start : run.end]
        if not self.batches and not self.replaying:
            self.close()
        return jobs

    def warm_some(self, batches: int) -> int:
        """Warm up to ``batches`` batches, oldest first; returns how many."""
        numbers = list(itertools.islice(self.batches, batches))
        for number in numbers:
            self.warm(number)
        return len(numbers)

    def warm_all(self) -> None:
        for number in list(self.batches):
            self.warm(number)

    def warm_over(self, blob_bytes: int) -> None:
        """Warm the batches that may hold a blob over ``blob_bytes``."""
        for number in [n for n, b in self.batches.items() if b.largest_blob > blob_bytes]:
            self.warm(number)

    def close(self) -> None:
        for source in self._sources:
            if source.fd is not None:
                os.close(source.fd)
                source.fd = None


def _described(record: JobsCreated) -> tuple[Any, ...]:
    """What a checkpoint says of a batch, read off the batch itself."""
    tpl = record.template
    first = BLOB_HEAD.unpack_from(record.blobs[0])[0] if record.blobs else -1
    last = BLOB_HEAD.unpack_from(record.blobs[-1])[0] if record.blobs else -1
    return (len(record.ids), first, last, tpl.queue or DEFAULT_QUEUE, tpl.task)


def _description(batch: ColdBatch) -> tuple[Any, ...]:
    return (batch.count, batch.first_seq, batch.last_seq, batch.queue, batch.task)


class JobTable(dict[str, Job]):
    """The job table: a ``dict`` of id -> :class:`~corral.broker.job.Job`,
    which warms cold jobs as they are looked up or walked (see the module
    docstring). ``cold`` is None when none are cold: each lookup then costs
    one attribute test more than a plain dict's."""

    __slots__ = ("cold",)

    def __init__(self) -> None:
        super().__init__()
        self.cold: ColdJobs | None = None

    def _warm(self, key: Any) -> bool:
        cold = self.cold
        if cold is None:
            return False
        warmed = cold.warm_id(key)
        if not cold.batches:
            self.cold = None
        return warmed

    def warm_all(self) -> None:
        """Warm every cold job."""
        if self.cold is not None:
            self.cold.warm_all()
            self.cold = None

    def warm_over(self, blob_bytes: int) -> None:
        """Warm the cold batches that may hold a blob over ``blob_bytes``."""
        if self.cold is not None:
            self.cold.warm_over(blob_bytes)
            if not self.cold.batches:
                self.cold = None

    def warm_some(self, batches: int) -> int:
        """Warm up to ``batches`` cold batches; returns how many."""
        if self.cold is None:
            return 0
        done = self.cold.warm_some(batches)
        if not self.cold.batches:
            self.cold = None
        return done

    def get(self, key: str, default: None = None) -> Job | None:  # type: ignore[override]
        job = _get(self, key)
        if job is None and self.cold is not None and self._warm(key):
            job = _get(self, key)
        return job

    def __contains__(self, key: object) -> bool:
        if _contains(self, key):
            return True
        return self.cold is not None and self._warm(key) and _contains(self, key)

    def __getitem__(self, key: str) -> Job:
        job = _get(self, key)
        if job is None:
            if self.cold is not None and self._warm(key):
                return dict.__getitem__(self, key)
            raise KeyError(key)
        return job

    def pop(self, key: str, default: None = None) -> Job | None:  # type: ignore[override]
        """The job ``key`` removed, or None (never KeyError: the state's only use)."""
        if self.cold is not None and not _contains(self, key):
            self._warm(key)
        return dict.pop(self, key, default)

    def setdefault(self, key: str, default: Any = None) -> Any:
        if self.cold is not None and not _contains(self, key):
            self._warm(key)
        return dict.setdefault(self, key, default)

    def __len__(self) -> int:
        cold = self.cold
        return _len(self) + (cold.count if cold is not None else 0)

    def values(self) -> ValuesView[Job]:  # type: ignore[override]
        self.warm_all()
        return dict.values(self)

    def items(self) -> ItemsView[str, Job]:  # type: ignore[override]
        self.warm_all()
        return dict.items(self)

    def keys(self) -> KeysView[str]:  # type: ignore[override]
        self.warm_all()
        return dict.keys(self)

    def __iter__(self) -> Iterator[str]:
        self.warm_all()
        return dict.__iter__(self)

    def warm_values(self) -> ValuesView[Job]:
        """The jobs that are not cold (every job that is not pristine is
        among them), warming none."""
        return dict.values(self)
