"""Find every valid record of a damaged log, and what the damage held.

:func:`survey` walks a log's segments from its last BASE segment on, as a
replay does, but does not stop at damage: after a bad frame it
resynchronises, scanning forward for the next frame that validates under
the segment's CRC seed and decodes (:func:`~corral.broker.framing.next_record`,
the test a replay uses to tell a torn tail from corruption). Each stretch
it skips is a :class:`Span`. A damaged segment header is rebuilt from what can be proven:
the sequence number from the file name, the generation from the other
segments (or the damaged field, give or take one flipped bit) and the CRC
seed from which candidate makes the segment's frames validate; the lowest
segment of the log is its BASE. A missing segment is a span of its own, a
segment of another log (another generation) is one span as a whole.

The survey changes nothing; :mod:`corral.broker.logtools` reports it
(``verify``) or carries it out (``repair``). Which jobs the damage cost is
told, as far as it can be, by :class:`JobLedger` (see there).
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from corral.broker.framing import (
    FLAG_BASE,
    FORMAT_VERSION,
    FRAME,
    HEADER_SIZE,
    LEGACY_VERSION,
    MARK_CODE,
    Header,
    HeaderFault,
    LogError,
    LogFormatUnknown,
    check_frame,
    check_header,
    content_end,
    durable_after,
    list_segments,
    next_record,
    one_bit_fix,
    read_mark,
    segment_seed,
)
from corral.broker.records import (
    RECORD_TYPES,
    FlowCreated,
    FlowRemoved,
    FollowedUp,
    JobCreated,
    JobsCreated,
    JobSnapshot,
    LeasedMany,
    MemberEnded,
    Record,
    RecordError,
    decode_record,
)

#: Damaged bytes kept in memory to look for known job ids in, per span.
_SAMPLE = 1024 * 1024
#: Frames along a damaged-header segment's length chain tried per seed.
_PROBE_FRAMES = 8


@dataclass
class Span:
    """Bytes ``[start, end)`` of segment ``seq`` that hold no valid record.

    ``kind`` is ``damaged``, ``torn_tail`` (the end of the last segment,
    never synced), ``header`` (rebuilt), ``missing_segment`` or
    ``foreign_segment``. ``held`` is what the bytes read as when decoded
    without their checksum: a best guess, possibly inexact."""

    seq: int
    path: Path
    start: int
    end: int
    reason: str
    kind: str = "damaged"
    held: list[Record] = field(default_factory=list)
    sample: bytes = b""


@dataclass
class SegmentPlan:
    """One segment as the survey found it and as repair would write it."""

    seq: int
    path: Path
    header: Header  # as it should read (rebuilt when damaged)
    seed: int  # the CRC seed its frames validate under now
    kept: list[tuple[int, int]] = field(default_factory=list)  # frames, [start, end)
    spans: list[Span] = field(default_factory=list)
    rewrite: bool = False  # header or frames change
    exists: bool = True


@dataclass
class Survey:
    directory: Path
    segments: list[SegmentPlan]
    lost_jobs: list[str]
    changed_jobs: list[str]

    @property
    def generation(self) -> int:
        """The generation every segment gets (the first one's, as planned)."""
        return self.segments[0].header.generation

    @property
    def spans(self) -> list[Span]:
        return [span for plan in self.segments for span in plan.spans]

    @property
    def records(self) -> int:
        return sum(len(plan.kept) for plan in self.segments)


# -- which jobs the damage cost ----------------------------------------------------


def job_ids(record: Record) -> tuple[list[str], list[str]]:
    """(ids of the jobs ``record`` creates, ids of the jobs it changes)."""
    if isinstance(record, JobCreated):
        return [record.id], []
    if isinstance(record, JobSnapshot):
        return [record.job.id], []
    if isinstance(record, JobsCreated):
        return list(record.ids), []
    if isinstance(record, FollowedUp):
        return [job.id for job in record.created], []
    if isinstance(record, FlowCreated | FlowRemoved | MemberEnded):
        return [], []  # flow ids, or a member that may rightly be gone
    if isinstance(record, LeasedMany):
        return [], list(record.ids)
    job_id = getattr(record, "id", None)
    return [], [job_id] if isinstance(job_id, str) else []


class JobLedger:
    """Tells which jobs the damage cost, from three kinds of evidence: a
    creation read (unchecked) from damaged bytes, a record after the damage
    about a job whose creation is nowhere, and a known id found verbatim in
    bytes that could not be read. A torn tail is left out: it was never
    synced, so never acknowledged."""

    def __init__(self) -> None:
        self._created: set[str] = set()
        self._events = 0
        self._damaged = False
        self._orphans: dict[str, int] = {}  # id -> first reference after damage
        self._held_created: dict[str, int] = {}
        self._held_changed: dict[str, int] = {}
        self._unread: list[tuple[int, bytes]] = []

    def kept(self, record: Record) -> None:
        self._events += 1
        made, changed = job_ids(record)
        self._created.update(made)
        if self._damaged:
            for job_id in changed:
                self._orphans.setdefault(job_id, self._events)

    def damage(self, span: Span) -> None:
        if span.kind in ("torn_tail", "header"):
            return  # never acknowledged / no record lost
        self._events += 1
        self._damaged = True
        for record in span.held:
            made, changed = job_ids(record)
            for job_id in made:
                self._held_created.setdefault(job_id, self._events)
            for job_id in changed:
                self._held_changed.setdefault(job_id, self._events)
        if not span.held and span.sample:
            self._unread.append((self._events, span.sample))

    def result(self) -> tuple[list[str], list[str]]:
        """(lost: jobs created in the damage, changed: jobs whose later
        change was in it), each in log order."""
        created = self._created
        lost = {i: n for i, n in self._held_created.items() if i not in created}
        for job_id, n in self._orphans.items():
            if job_id not in created:
                lost.setdefault(job_id, n)
        changed = {i: n for i, n in self._held_changed.items() if i in created}
        known = created | lost.keys()
        for n, sample in self._unread:
            for job_id in known:
                if _mentions(sample, job_id):
                    (changed if job_id in created else lost).setdefault(job_id, n)
        for job_id in lost:
            changed.pop(job_id, None)
        return _in_order(lost), _in_order(changed)


def _mentions(sample: bytes, job_id: str) -> bool:
    """``job_id`` is written in ``sample`` as a whole msgpack string: not
    where a string header before it gives another length ("job-5" is not
    in "job-53"), but where that header is itself damaged."""
    raw = job_id.encode()
    at = sample.find(raw)
    while at >= 0:
        fix = sample[at - 1] if at >= 1 else -1
        str8 = sample[at - 2] == 0xD9 if at >= 2 else False
        if str8:
            whole = sample[at - 1] == len(raw)
        elif 0xA0 <= fix <= 0xBF:
            whole = fix & 0x1F == len(raw)
        else:
            whole = True  # no string header before it: damaged, or not one
        if whole:
            return True
        at = sample.find(raw, at + 1)
    return False


def _in_order(found: dict[str, int]) -> list[str]:
    return [job_id for job_id, _ in sorted(found.items(), key=lambda item: item[1])]


# -- reading damaged bytes -----------------------------------------------------------


def _decode_any(code: int, body: bytes) -> Record | None:
    """``body`` decoded as record type ``code`` or, failing that, as the
    first other type it decodes as (the type byte may be the damage)."""
    for candidate in (code, *RECORD_TYPES):
        try:
            return decode_record(candidate, body)
        except RecordError:
            continue
    return None


def read_damaged(data: bytes, start: int, end: int, seed: int = 0) -> list[Record]:
    """The records ``data[start:end]`` holds, read without their checksums:
    each frame by its length field, or else as running to ``end``. A frame
    with one flipped bit is read as it was written (:func:`corrected`)."""
    held: list[Record] = []
    pos = start
    while pos + FRAME.size <= end:
        fixed = corrected(data, pos, end, seed)
        if fixed is not None:
            record = _decode_any(fixed[FRAME.size - 1], fixed[FRAME.size :])
            if record is not None:
                held.append(record)
                pos += len(fixed)
                continue
        length, _, code = FRAME.unpack_from(data, pos)
        stated_end = pos + 8 + length
        record = None
        if length > 0 and stated_end <= end:
            record = _decode_any(code, data[pos + FRAME.size : stated_end])
        if record is None:
            stated_end = end
            record = _decode_any(code, data[pos + FRAME.size : end])
        if record is None:
            break
        held.append(record)
        pos = stated_end
    return held


def corrected(data: bytes, pos: int, end: int, seed: int) -> bytes | None:
    """The frame at ``pos`` (within ``[pos, end)``) as it was before one bit
    of it flipped (:func:`~corral.broker.framing.one_bit_fix`), or None.
    Used to name what a damaged frame held, never to keep it."""
    fix = one_bit_fix(data[:end], pos, seed)
    return None if fix is None else fix.frame


# -- walking one segment -----------------------------------------------------------------


def walk(plan: SegmentPlan, data: bytes, last: bool, ledger: JobLedger) -> None:
    """Fill ``plan.kept`` and ``plan.spans`` from the segment's bytes. Sync
    marks are not kept: a rewrite moves frames, so their offsets would lie
    (the broker writes a new one at its next sync)."""
    pos, stop, seed = HEADER_SIZE, content_end(data), plan.seed
    with memoryview(data) as view:
        while pos < stop:
            got = check_frame(data, view, pos, seed)
            if not isinstance(got, str) and got[1] == MARK_CODE:
                if read_mark(data, pos, got[0]) is not None:
                    pos = got[0]  # a sync mark: no record, and dropped by a rewrite
                    continue
                got = "bad sync mark"
            if not isinstance(got, str):
                end, code = got
                try:
                    record = decode_record(code, data[pos + FRAME.size : end])
                except RecordError as exc:
                    got = str(exc)
                else:
                    plan.kept.append((pos, end))
                    ledger.kept(record)
                    pos = end
                    continue
            after = next_record(data, pos + 1, stop, seed)
            # as a replay judges it (Scan.problem): in a segment with sync
            # marks, what follows damage no mark vouches for was never synced
            torn = last and (after < 0 or _unsynced_hole(plan, data, pos, after, stop))
            end = stop if after < 0 or torn else after
            kind = "torn_tail" if torn else "damaged"
            add_span(plan, ledger, data, Span(plan.seq, plan.path, pos, end, got, kind))
            pos = end


def _unsynced_hole(plan: SegmentPlan, data: bytes, pos: int, after: int, stop: int) -> bool:
    """Damage at ``pos`` with a valid frame at ``after`` is, as a replay
    judges it (``Scan.problem``), a torn write: in a segment with sync
    marks, no later mark vouches for it."""
    return plan.header.marks and durable_after(data, after, stop, plan.seed) <= pos


def add_span(plan: SegmentPlan, ledger: JobLedger, data: bytes, span: Span) -> None:
    """Record ``span`` (of ``data``, the segment's bytes) in ``plan`` and the
    ledger, with what its bytes read as."""
    if span.kind in ("damaged", "torn_tail"):
        span.held = read_damaged(data, span.start, span.end, plan.seed)
        if span.end - span.start <= _SAMPLE:
            span.sample = data[span.start : span.end]
    plan.spans.append(span)
    plan.rewrite = True
    ledger.damage(span)


# -- headers -----------------------------------------------------------------------------


def _probe_frames(data: bytes) -> list[int]:
    """Frame offsets along the length chain from the first record on."""
    found: list[int] = []
    pos, stop = HEADER_SIZE, content_end(data)
    while pos + FRAME.size <= stop and len(found) < _PROBE_FRAMES:
        length = FRAME.unpack_from(data, pos)[0]
        if length == 0 or pos + 8 + length > len(data):
            break
        found.append(pos)
        pos += 8 + length
    return found


def recover_seed(data: bytes, seq: int, generations: Iterable[int]) -> tuple[int, int] | None:
    """(generation, seed) under which the frames of a segment whose header
    is damaged validate, trying the log's generation, the header's own
    fields and each one-bit change of its generation; None if none does."""
    raw_seq = int.from_bytes(data[12:20], "little")
    raw_gen = int.from_bytes(data[20:28], "little")
    gens = list(dict.fromkeys([*generations, raw_gen, *(raw_gen ^ 1 << b for b in range(64))]))
    candidates = [(gens[0], segment_seed(LEGACY_VERSION, 0, seq))]
    candidates += [(g, segment_seed(FORMAT_VERSION, g, s)) for g in gens for s in (seq, raw_seq)]
    probes = _probe_frames(data)
    with memoryview(data) as view:
        for gen, seed in candidates:
            if any(not isinstance(check_frame(data, view, p, seed), str) for p in probes):
                return gen, seed
    stop = min(content_end(data), HEADER_SIZE + 64 * 1024)
    for gen, seed in candidates[:3]:  # the first frame itself is damaged: look further
        if next_record(data, HEADER_SIZE, stop, seed) >= 0:
            return gen, seed
    return None


def _flags(base: bool) -> int:
    return FLAG_BASE if base else 0


def _rebuilt(
    seq: int, path: Path, data: bytes, base: bool, log_gens: list[int], reason: str
) -> tuple[SegmentPlan, list[Span]]:
    """The plan for a segment whose header is damaged, and its first spans."""
    found = recover_seed(data, seq, log_gens)
    generation = log_gens[0] if log_gens else found[0] if found else secrets.randbits(64)
    header = Header(_flags(base), seq, generation)
    plan = SegmentPlan(seq, path, header, found[1] if found else header.seed, rewrite=True)
    spans = [Span(seq, path, 0, min(len(data), HEADER_SIZE), reason, "header")]
    stop = content_end(data)
    if found is None and stop > HEADER_SIZE:
        why = "no record validates: the segment's CRC seed could not be recovered"
        spans.append(Span(seq, path, HEADER_SIZE, stop, why))
    return plan, spans


# -- the whole log ----------------------------------------------------------------------


def _headers(found: list[tuple[int, Path]]) -> dict[int, Header | HeaderFault]:
    heads: dict[int, Header | HeaderFault] = {}
    for seq, path in found:
        with open(path, "rb") as f:
            got = check_header(f.read(HEADER_SIZE))
        if isinstance(got, Header) and got.seq != seq:
            got = HeaderFault(f"header says segment {got.seq}", True)
        heads[seq] = got
    return heads


def _live_start(found: list[tuple[int, Path]], heads: dict[int, Header | HeaderFault]) -> int:
    """Index of the segment a replay starts at: the newest intact BASE, or
    the oldest segment when none is intact."""
    for i in range(len(found) - 1, -1, -1):
        head = heads[found[i][0]]
        if isinstance(head, Header) and head.flags & FLAG_BASE:
            return i
    return 0


def survey(directory: Path) -> Survey:
    """Walk the log in ``directory``; see the module docstring. Raises
    :class:`LogError` if there is no log directory and
    :class:`LogFormatUnknown` for a segment another corral wrote."""
    if not directory.is_dir():
        raise LogError(f"no log directory at {directory}: check broker.state_dir (or --state-dir)")
    return _Surveyor(directory).run()


class _Surveyor:
    """One survey: the segments from the replay's start on, the log's
    generation (the most common among intact headers) and the ledger."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        found = list_segments(directory)
        self.heads = _headers(found)
        self.live = dict(found[_live_start(found, self.heads) :])
        for seq, path in self.live.items():
            head = self.heads[seq]
            if isinstance(head, HeaderFault) and not head.damaged:
                raise LogFormatUnknown(path, head.reason)
        intact = [h for seq in self.live if isinstance(h := self.heads[seq], Header)]
        self.log_gens = [gen for gen, _ in Counter(h.generation for h in intact).most_common()]
        self.ledger = JobLedger()
        self.seqs = range(min(self.live), max(self.live) + 1) if self.live else range(0)

    def run(self) -> Survey:
        plans = [self._one(seq) for seq in self.seqs]
        lost, changed = self.ledger.result()
        return Survey(self.directory, plans, lost, changed)

    def _one(self, seq: int) -> SegmentPlan:
        base, path = seq == self.seqs[0], self.live.get(seq)
        if path is None:
            return self._missing(seq, base)
        data = path.read_bytes()
        head = self.heads[seq]
        if isinstance(head, HeaderFault):
            plan, spans = _rebuilt(seq, path, data, base, self.log_gens, head.reason)
            for span in spans:
                add_span(plan, self.ledger, data, span)
        elif head.generation != self.log_gens[0]:
            return self._foreign(seq, path, data, base, head)
        elif base and not head.flags & FLAG_BASE:
            plan = SegmentPlan(seq, path, head._replace(flags=FLAG_BASE), head.seed, rewrite=True)
            reason = "no base segment: the start of the log is missing"
            add_span(plan, self.ledger, data, Span(seq, path, 0, HEADER_SIZE, reason, "header"))
        else:
            plan = SegmentPlan(seq, path, head, head.seed)
        if not any(span.start >= HEADER_SIZE for span in plan.spans):
            walk(plan, data, seq == self.seqs[-1], self.ledger)
        return plan

    def _generation(self) -> int:
        return self.log_gens[0] if self.log_gens else secrets.randbits(64)

    def _missing(self, seq: int, base: bool) -> SegmentPlan:
        path = self.directory / f"{seq:020d}.seg"
        header = Header(_flags(base), seq, self._generation())
        plan = SegmentPlan(seq, path, header, header.seed, exists=False)
        why = f"segment {seq} is missing"
        add_span(plan, self.ledger, b"", Span(seq, path, 0, 0, why, "missing_segment"))
        return plan

    def _foreign(self, seq: int, path: Path, data: bytes, base: bool, head: Header) -> SegmentPlan:
        header = Header(_flags(base), seq, self._generation())
        plan = SegmentPlan(seq, path, header, header.seed)
        reason = f"segment belongs to another log (generation {head.generation:#x})"
        span = Span(seq, path, 0, content_end(data), reason, "foreign_segment")
        add_span(plan, self.ledger, data, span)
        return plan
