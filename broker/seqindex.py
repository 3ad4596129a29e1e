"""Every job in creation order, for paging and compaction without a sort.

Jobs are kept in blocks of up to :data:`BLOCK` references, in ``seq``
order; a job is created with the highest seq so far, so adding is an append
(a job replayed out of order is put in place by bisection). Removal is
lazy: the state says a job left, its block counts it, and a block that is
at least half stale is rebuilt without the stale references (an empty one
is dropped). Finding where a page starts is a bisection over the blocks'
first seqs and then within one block: O(log n), and a page of k jobs costs
O(k) more. About 8 bytes a job. Pure data.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator

from corral.broker.coldjobs import ColdBlock
from corral.broker.job import Job

#: References per block.
BLOCK = 1024


def _never(batch: int) -> bool:
    return False


def _seq(job: Job) -> int:
    return job.seq


class SeqIndex:
    """See the module docstring. ``jobs`` is the job state's table (read only):
    a reference is current while ``jobs[ref.id] is ref``."""

    def __init__(self, jobs: dict[str, Job]) -> None:
        self._jobs = jobs
        #: The table's own lookup: a job referenced here is never a cold one.
        self._get: Callable[[str], Job | None] = dict.get.__get__(jobs)
        self._blocks: list[list[Job]] = []
        #: First seq of each block.
        self._firsts: list[int] = []
        #: Stale references per block.
        self._stale: list[int] = []
        #: Warms a cold batch by its number (set by the job state).
        self.warm: Callable[[int], None] = _no_cold
        #: Cold batch number -> its block (see broker/coldjobs.py).
        self._cold: dict[int, ColdBlock] = {}

    def add_cold(self, batch: int, first: int, last: int) -> None:
        """Index cold batch ``batch`` (creation numbers ``first..last``, all
        above any indexed) by one block, filled when it is warmed."""
        block = ColdBlock(batch, first, last)
        self._cold[batch] = block
        self._blocks.append(block)
        self._firsts.append(first)
        self._stale.append(0)

    def last_seq(self) -> int:
        """The highest creation number indexed (0: none), stale ones included."""
        blocks = self._blocks
        return blocks[-1][-1].seq if blocks else 0

    def warmed(self, batch: int, jobs: list[Job]) -> None:
        """Cold batch ``batch`` was warmed: ``jobs`` take its block's place."""
        block = self._cold.pop(batch, None)
        if block is None:
            return
        i = bisect.bisect_left(self._firsts, block.first)
        block.jobs = jobs[:]
        if not (i < len(self._blocks) and self._blocks[i] is block):
            i = next(at for at, held in enumerate(self._blocks) if held is block)
        self._blocks[i] = block.jobs

    def add(self, job: Job) -> None:
        """Index a job that was just added to the table."""
        seq = job.seq
        blocks = self._blocks
        if blocks and blocks[-1][-1].seq > seq:
            self._insert(job, seq)
            return
        if not blocks or len(blocks[-1]) >= BLOCK or type(blocks[-1]) is ColdBlock:
            blocks.append([job])
            self._firsts.append(seq)
            self._stale.append(0)
        else:
            blocks[-1].append(job)

    def extend(self, jobs: list[Job]) -> None:
        """Index jobs just added, in creation order."""
        blocks = self._blocks
        if blocks and blocks[-1][-1].seq > jobs[0].seq:
            for job in jobs:
                self.add(job)
            return
        start = 0
        if blocks and len(blocks[-1]) < BLOCK and type(blocks[-1]) is not ColdBlock:
            start = BLOCK - len(blocks[-1])
            blocks[-1].extend(jobs[:start])
        for at in range(start, len(jobs), BLOCK):
            block = jobs[at : at + BLOCK]
            blocks.append(block)
            self._firsts.append(block[0].seq)
            self._stale.append(0)

    def _insert(self, job: Job, seq: int) -> None:
        i = max(0, bisect.bisect_right(self._firsts, seq) - 1)
        block = self._blocks[i]
        if type(block) is ColdBlock:
            self.warm(block.batch)
            block = self._blocks[i]
        block.insert(bisect.bisect_left(block, seq, key=_seq), job)
        self._firsts[i] = block[0].seq
        if len(block) > 2 * BLOCK:  # split a block grown by inserts
            half = len(block) // 2
            self._blocks[i : i + 1] = [block[:half], block[half:]]
            self._firsts[i : i + 1] = [block[0].seq, block[half].seq]
            self._stale[i : i + 1] = [self._stale[i], 0]

    def removed(self, job: Job) -> None:
        """``job`` left the table (or was replaced): its reference is stale."""
        i = bisect.bisect_right(self._firsts, job.seq) - 1
        if i < 0:
            return
        block = self._blocks[i]
        if type(block) is ColdBlock:
            return
        self._stale[i] += 1
        if 2 * self._stale[i] < len(block):
            return
        get = self._get
        kept = [ref for ref in block if get(ref.id) is ref]
        if kept:
            self._blocks[i] = kept
            self._firsts[i] = kept[0].seq
            self._stale[i] = 0
        else:
            del self._blocks[i], self._firsts[i], self._stale[i]

    def after(self, seq: int, passed: Callable[[int], bool] = _never) -> Iterator[Job]:
        """The current jobs with a creation number above ``seq``, in order
        (a cold batch is warmed when the walk reaches it, unless
        ``passed(batch number)``: then its jobs are passed over)."""
        get = self._get
        i = max(0, bisect.bisect_right(self._firsts, seq) - 1)
        blocks = self._blocks
        if i < len(blocks):
            block = self._jobs_of(blocks[i], passed)
            for ref in block[bisect.bisect_right(block, seq, key=_seq) :]:
                if get(ref.id) is ref:
                    yield ref
        for held in blocks[i + 1 :]:
            for ref in self._jobs_of(held, passed):
                if get(ref.id) is ref:
                    yield ref

    def before(self, seq: int | None, passed: Callable[[int], bool] = _never) -> Iterator[Job]:
        """The current jobs with a creation number below ``seq`` (None: all),
        newest first (a cold batch is warmed when the walk reaches it,
        unless ``passed(batch number)``)."""
        get = self._get
        blocks = self._blocks
        if seq is None:
            i, cut = len(blocks) - 1, None
        else:
            i = bisect.bisect_left(self._firsts, seq) - 1
            cut = seq
        for held in blocks[i::-1] if i >= 0 else []:
            block = self._jobs_of(held, passed)
            end = len(block) if cut is None else bisect.bisect_left(block, cut, key=_seq)
            cut = None  # only the first block is cut
            for ref in reversed(block[:end]):
                if get(ref.id) is ref:
                    yield ref

    def _jobs_of(self, block: list[Job], passed: Callable[[int], bool] = _never) -> list[Job]:
        """A block's jobs: a cold block's once its batch is warmed (none if
        ``passed(its batch number)``)."""
        if type(block) is not ColdBlock:
            return block
        if block.jobs is None:
            if passed(block.batch):
                return []
            self.warm(block.batch)
        return block.jobs or []

    def __iter__(self) -> Iterator[Job]:
        return self.after(-1)

    def __len__(self) -> int:
        """References held, stale ones included."""
        return sum(len(block) for block in self._blocks)


def _no_cold(batch: int) -> None:
    raise LookupError(f"cold batch {batch} with no job state to warm it")
