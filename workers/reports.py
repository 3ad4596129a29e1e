"""A worker's reports, cut to fit the broker's max_message_size.

A report carries the starts, outcomes and progress notes gathered since the
last one. One larger than the broker accepts would be dropped with the
worker's connection and every outcome in it lost, so a report that does not
fit is split in halves until each part fits. An outcome that alone cannot
fit (results are capped before this, see
:data:`corral.workers.execute.REPORT_OVERHEAD`) becomes a failure that says
so, rather than a job that runs forever.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec

from corral.broker import protocol as p
from corral.broker.jobspec import NIL


def fit_reports(
    started: list[p.Lease],
    done: list[p.Outcome],
    progress: list[p.Progress],
    limit: int,
) -> list[bytes]:
    """The encoded Report messages that carry everything given, in order,
    each at most ``limit`` bytes."""
    body = p.encode(p.Report(started, done, progress=progress))
    if len(body) <= limit:
        return [body]
    if len(started) + len(done) + len(progress) <= 1:
        if done:
            return [p.encode(p.Report([], [_too_large(done[0], len(body), limit)]))]
        return []  # a start or a progress note cannot be this large; nothing to keep
    # Halve the items taken in order (starts, then outcomes, then notes), so
    # each half is strictly smaller and a start never follows its outcome.
    half = (len(started) + len(done) + len(progress)) // 2
    s = min(half, len(started))
    d = min(half - s, len(done))
    g = half - s - d
    first = fit_reports(started[:s], done[:d], progress[:g], limit)
    return first + fit_reports(started[s:], done[d:], progress[g:], limit)


def _too_large(outcome: p.Outcome, size: int, limit: int) -> p.Outcome:
    error = p.ErrorInfo(
        "ReportTooLarge",
        f"the job's outcome is {size} bytes encoded, over broker.max_message_size ({limit})",
    )
    return p.Outcome(
        outcome.job_id,
        outcome.lease,
        "fail",
        NIL,
        error,
        None,
        outcome.started_at,
        outcome.ended_at,
    )


def encode_outbox(outbox: deque[tuple[str, Any]], limit: int) -> tuple[list[bytes], list[p.Lease]]:
    """Empty a worker's outbox of ``(kind, item)`` (kinds ``started``,
    ``done``, ``progress``, ``return``): the encoded reports that carry the
    first three (only the newest progress note per job), cut to ``limit``
    bytes each, and the leases to hand back."""
    batches: dict[str, list[Any]] = {"started": [], "done": [], "return": [], "progress": []}
    while outbox:
        kind, item = outbox.popleft()
        batches[kind].append(item)
    reports: list[bytes] = []
    if batches["started"] or batches["done"] or batches["progress"]:
        latest = {note.job_id: note for note in batches["progress"]}
        try:
            reports = fit_reports(batches["started"], batches["done"], list(latest.values()), limit)
        except Exception as exc:  # taken from the outbox: name them, or they are lost unseen
            jobs = {item.job_id for kind in ("started", "done") for item in batches[kind]}
            raise Unencodable(sorted(jobs), exc) from exc
    return reports, batches["return"]


class Unencodable(Exception):
    """A report could not be encoded (``cause``); ``jobs`` (ids) are those
    whose starts or outcomes it carried, taken from the outbox: no report
    will tell the broker of them."""

    def __init__(self, jobs: list[str], cause: BaseException) -> None:
        super().__init__(f"a report of {len(jobs)} job(s) cannot be encoded: {cause!r}"[:1000])
        self.jobs = jobs


class _JobRef(msgspec.Struct, array_like=True):
    """The first field of a Lease or an Outcome; the rest are skipped."""

    job_id: str


class _ReportJobs(msgspec.Struct, array_like=True):
    """A Report's tag and the ids in its starts and outcomes, whatever else
    it holds (a report the broker refused may not decode in full)."""

    op: str
    started: list[_JobRef]
    done: list[_JobRef]


_report_jobs_decoder = msgspec.msgpack.Decoder(_ReportJobs)


def report_jobs(body: bytes) -> set[str]:
    """The ids of the jobs whose starts or outcomes the encoded message
    ``body`` carries (none if it is not a Report). Read shallowly: a report
    the broker refused (a field it does not take, another protocol
    version) still names its jobs."""
    try:
        msg = _report_jobs_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return set()
    if msg.op != "report":
        return set()
    return {ref.job_id for ref in msg.started} | {ref.job_id for ref in msg.done}


def interrupted(job_id: str, lease: int, why: str) -> p.Outcome:
    """The outcome of a job its worker stopped running (shutdown_timeout):
    back to its queue, uncounted, the try recorded as Interrupted."""
    error = p.ErrorInfo("Interrupted", why)
    return p.Outcome(job_id, lease, "interrupted", NIL, error, None, None, time.time())


#: Longest a start or an outcome waits in the outbox before the socket
#: thread sends it, in seconds, while the worker has more jobs to run.
REPORT_DELAY = 0.002
#: Outbox items (starts and outcomes) that make a report go at once.
REPORT_BATCH = 32


class Pacing:
    """When the socket thread sends what the handler threads put in the
    worker's outbox: the starts and outcomes of several jobs in one report
    (ack batching), none of them later than ``delay`` seconds after it was
    put there.

    A handler calls :meth:`urgent` for what must go at once (an outcome
    after which the worker has nothing buffered to run, so nothing would
    join it; a job handed back) and :meth:`soon` for the rest (a start, an
    outcome with more jobs to run, a progress note). :meth:`soon` wakes the
    socket thread only if its wait would end after the item's deadline, or
    once ``batch`` items wait. The socket thread calls :meth:`deciding`
    before it works out how long to wait (never past :attr:`due`),
    :meth:`sleeping` with the monotonic time its wait ends, sends when
    :meth:`flush_due` says so, and calls :meth:`taken` just before it
    empties the outbox. While jobs flow (it sent something, and more jobs
    are buffered) it expects more within ``delay`` and wakes for them on
    its own, so a busy worker's handlers wake it only for a full batch.

    Every read and write here is one attribute's, atomic under the GIL: a
    wake more than needed is possible, a missed one is not (the socket
    thread is ``deciding`` until its wait's end is known, and a handler
    wakes it while it is)."""

    def __init__(
        self,
        wake: Callable[[], None],
        outbox: deque[tuple[str, Any]],
        delay: float = REPORT_DELAY,
        batch: int = REPORT_BATCH,
    ) -> None:
        self.delay = delay
        self.batch = batch
        self._wake = wake
        self._outbox = outbox
        #: When the socket thread sends next, at the latest (monotonic);
        #: None: nothing waits for it.
        self.due: float | None = None
        self._now = False
        self._sleep_until = math.inf

    def urgent(self) -> None:
        """Something was put in the outbox that must go at once."""
        self._now = True
        self._wake()

    def soon(self, now: float) -> None:
        """Something was put in the outbox at ``now`` (monotonic) that may
        wait up to ``delay`` seconds for others to join it."""
        due = self.due
        if due is None:
            due = self.due = now + self.delay
        if self._sleep_until > due or len(self._outbox) >= self.batch:
            self._wake()

    def expect(self, now: float) -> None:
        """The socket thread handed jobs to the handlers at ``now``: their
        starts, put in the outbox soon after, go by ``now`` + ``delay`` at
        the latest; its next wait ends by then, so a :meth:`soon` for them
        finds it due to wake and need not wake it (a one-at-a-time job then
        costs one wake of this thread, for its outcome, instead of two)."""
        if self.due is None:
            self.due = now + self.delay

    def deciding(self) -> None:
        """The socket thread is about to work out its wait."""
        self._sleep_until = math.inf

    def sleeping(self, until: float) -> None:
        """The socket thread waits until ``until`` (monotonic) at most."""
        self._sleep_until = until

    def flush_due(self, now: float) -> bool:
        """Whether the socket thread sends the outbox now."""
        due = self.due
        return self._now or (due is not None and now >= due) or len(self._outbox) >= self.batch

    def taken(self, now: float, flowing: bool) -> None:
        """The socket thread empties the outbox at ``now``; ``flowing``:
        it holds something to send and more jobs are buffered, so more
        will come (the next send is due ``delay`` from now)."""
        self._now = False
        self.due = now + self.delay if flowing else None


#: The most bytes of sent reports a worker keeps to send again.
KEEP_BYTES = 8 * 2**20


class SentReports:
    """Reports (starts and outcomes) sent lately, kept to be sent again when
    the worker registers again: a report on its way to a broker that died,
    or read by it but not yet in its log, is lost with it, and its jobs,
    which this worker no longer holds, would run again. A report is kept
    until the broker has been heard from ``keep_for`` seconds after it was
    sent (while the broker is silent nothing goes), at most
    :data:`KEEP_BYTES` in all (the oldest go first). Sending one again is
    harmless: the broker takes an outcome only under the lease the job is
    held under, and counts the others as ``resent_ignored``."""

    def __init__(self, keep_for: float) -> None:
        self.keep_for = keep_for
        self._kept: deque[tuple[float, bytes]] = deque()
        self._bytes = 0
        #: The broker last sent them again, and when (monotonic).
        self._resent_to = ""
        self._resent_at = -1e9

    def due(self, at: float, broker_id: str, every: float) -> bool:
        """Whether to send the kept reports again as the worker registers at
        ``at`` with the broker ``broker_id`` ("" when it registers unasked,
        on a new connection): at once for a broker it has not resent to (a
        broker that restarted again soon after the last resend may have
        lost that resend with its unsynced log), else at most once per
        ``every`` seconds since the last resend (a burst of Reregister from
        one broker, each the answer to a message sent before the READY got
        there, resends once). A resend counts once :meth:`resent` says it
        went out whole."""
        fresh = bool(broker_id) and broker_id != self._resent_to
        return fresh or at - self._resent_at >= every

    def resent(self, at: float, broker_id: str) -> None:
        """The kept reports all went out again at ``at`` (monotonic), to
        ``broker_id`` ("" : unasked, the broker unknown). A resend the
        socket did not take whole is not marked, so the next
        registration sends them again, to whichever broker asks."""
        self._resent_at = at
        self._resent_to = broker_id or self._resent_to

    def __len__(self) -> int:
        return len(self._kept)

    def sent(self, body: bytes, at: float) -> None:
        """``body`` (an encoded Report) went out at ``at`` (monotonic)."""
        if len(body) > KEEP_BYTES:
            return
        self._kept.append((at, body))
        self._bytes += len(body)
        while self._bytes > KEEP_BYTES:
            self._bytes -= len(self._kept.popleft()[1])

    def prune(self, heard_at: float) -> None:
        """The broker was last heard from at ``heard_at``: forget what it
        has had ``keep_for`` seconds to take."""
        while self._kept and self._kept[0][0] < heard_at - self.keep_for:
            self._bytes -= len(self._kept.popleft()[1])

    def jobs(self) -> set[str]:
        """The ids of the jobs whose starts or outcomes the kept reports
        carry: what the broker may not have had, if one went astray."""
        return {job_id for _, body in self._kept for job_id in report_jobs(body)}

    def again(self, at: float) -> list[bytes]:
        """Every kept report, marked ``resent``, to send before the READY;
        they are kept on, as sent at ``at``."""
        out = []
        for _, body in self._kept:
            report = p.decode(p.worker_report_decoder, body)
            out.append(p.encode(msgspec.structs.replace(report, resent=True)))
        self._kept = deque((at, body) for _, body in self._kept)
        return out
