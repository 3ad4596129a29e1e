"""Result waiters: clients long-polling for a job's or a flow's outcome.

A ``GetResult`` with a wait is parked here until the job or flow ends (the
broker calls :meth:`Waiters.job_ended` / :meth:`Waiters.flow_ended`) or its
wait runs out (:meth:`Waiters.expire`, on the monotonic clock); either way
it gets exactly one reply. Replies go through the pass's
:class:`~corral.broker.journal.Replies`, so they leave after the commit.
A waiter answered or run out is dropped at once, in O(1) from its id's
set and O(log n) amortised from the deadlines (see
:class:`~corral.broker.timers.Deadlines`): what is kept follows the parked
requests, never the answered ones.

Any client may park requests, so their number is bounded: one peer holds
at most :data:`MAX_WAITS_PER_PEER` (a new one answers its oldest now) and
all together at most :data:`MAX_WAITERS` (a new one answers the one due
first now). A request answered early gets the job's status as it stands,
as when its wait runs out: the client polls again (``waits_cut_short``
counts them).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TypeVar

from corral.broker import flows, views
from corral.broker import protocol as p
from corral.broker.deadlines import Deadlines
from corral.broker.journal import Replies
from corral.broker.protocol import TERMINAL
from corral.broker.state import Job, JobState

K = TypeVar("K", str, bytes)

#: The longest wait the broker parks a request for, in seconds.
MAX_WAIT = 3600.0
#: The most requests parked at once, from all clients.
MAX_WAITERS = 100_000
#: The most requests one client (socket identity) has parked at once.
MAX_WAITS_PER_PEER = 10_000


@dataclass(eq=False)
class Waiter:
    """A client long-polling for a job's or a flow's result (hashed by
    identity: each is its own request)."""

    deadline: float
    job_id: str
    identity: bytes
    req: int


class Waiters:
    """Parked result requests, by job or flow id, with their deadlines."""

    def __init__(
        self,
        state: JobState,
        replies: Replies,
        stats: Counter[str] | None = None,
        *,
        limit: int = MAX_WAITERS,
        per_peer: int = MAX_WAITS_PER_PEER,
    ) -> None:
        self.state = state
        self.replies = replies
        self.stats: Counter[str] = stats if stats is not None else Counter()
        self.limit = limit
        self.per_peer = per_peer
        #: job or flow id -> its waiters, in arrival order (a dict as an
        #: ordered set).
        self._by_id: dict[str, dict[Waiter, None]] = {}
        #: client identity -> its waiters, in arrival order.
        self._by_peer: dict[bytes, dict[Waiter, None]] = {}
        #: Each waiter's deadline (monotonic seconds).
        self.deadlines: Deadlines[Waiter, None] = Deadlines()

    def __len__(self) -> int:
        return len(self.deadlines)

    def get_result(self, identity: bytes, msg: p.GetResult, mono: float) -> None:
        """Answer now if the job or flow has ended or the caller won't wait;
        else park the request for up to ``msg.wait`` seconds."""
        job = self.state.jobs.get(msg.job_id)
        flow = self.state.flows.get(msg.job_id)
        if job is not None:
            ended = job.status in TERMINAL
        elif flow is not None:
            ended = flows.status_of(self.state, flow)[0] in TERMINAL
        elif self.state.flowbook.pending(msg.job_id) is not None:
            ended = False  # a flow's member to be made: its end is waited for
        else:
            self.replies.add(identity, missing(self.state, msg.req, msg.job_id))
            return
        if ended or msg.wait <= 0:
            self.answer(identity, msg.req, msg.job_id)
            return
        self._make_room(identity)
        waiter = Waiter(mono + min(msg.wait, MAX_WAIT), msg.job_id, identity, msg.req)
        self._by_id.setdefault(msg.job_id, {})[waiter] = None
        self._by_peer.setdefault(identity, {})[waiter] = None
        self.deadlines.set(waiter, waiter.deadline, None)

    def _make_room(self, identity: bytes) -> None:
        """Before ``identity`` parks one more: answer now its oldest if it
        holds its share, and the one due first if the table is full."""
        mine = self._by_peer.get(identity)
        if mine is not None and len(mine) >= self.per_peer:
            self._cut_short(next(iter(mine)))
        if len(self.deadlines) >= self.limit:
            entry = self.deadlines.pop_due(float("inf"))
            if entry is not None:
                self.deadlines.set(entry[0], entry[1], None)  # _cut_short discards it
                self._cut_short(entry[0])

    def _cut_short(self, waiter: Waiter) -> None:
        self._unpark(waiter)
        self.stats["waits_cut_short"] += 1
        self.answer(waiter.identity, waiter.req, waiter.job_id)

    def _unpark(self, waiter: Waiter) -> None:
        """Forget ``waiter`` everywhere it is kept."""
        self.deadlines.discard(waiter)
        _drop(self._by_id, waiter.job_id, waiter)
        _drop(self._by_peer, waiter.identity, waiter)

    def _take(self, job_id: str) -> list[Waiter]:
        """Every waiter of ``job_id``, no longer parked."""
        waiting = list(self._by_id.get(job_id, ()))
        for waiter in waiting:
            self._unpark(waiter)
        return waiting

    def job_ended(self, job: Job) -> None:
        for waiter in self._take(job.id):
            self.replies.add(waiter.identity, views.result_reply(waiter.req, job))

    def flow_ended(self, flow_id: str) -> None:
        """Answer a flow's waiters if the flow has ended."""
        flow = self.state.flows.get(flow_id)
        if flow is None or flows.status_of(self.state, flow)[0] not in TERMINAL:
            return
        for waiter in self._take(flow_id):
            self.replies.add(waiter.identity, views.flow_result(self.state, waiter.req, flow))
        for _, spec in self.state.flowbook.made_later(flow):
            if spec.id not in self.state.jobs:  # never made: say so now
                for waiter in self._take(spec.id):
                    self.replies.add(waiter.identity, missing(self.state, waiter.req, spec.id))

    def expire(self, mono: float) -> None:
        """Answer, as things stand, every request whose wait ran out."""
        while (entry := self.deadlines.pop_due(mono)) is not None:
            waiter = entry[0]
            self._unpark(waiter)
            self.answer(waiter.identity, waiter.req, waiter.job_id)

    def next_deadline(self) -> float | None:
        """The monotonic time the earliest wait runs out, if any."""
        return self.deadlines.next_due()

    def answer(self, identity: bytes, req: int, job_id: str) -> None:
        """A job's or a flow's outcome as it stands."""
        job = self.state.jobs.get(job_id)
        flow = self.state.flows.get(job_id)
        if job is not None:
            self.replies.add(identity, views.result_reply(req, job))
        elif flow is not None:
            self.replies.add(identity, views.flow_result(self.state, req, flow))
        elif self.state.flowbook.pending(job_id) is not None:
            # a flow's job not made yet: it has not ended (the caller waits on)
            self.replies.add(identity, p.ResultReply(req, job_id, "queued"))
        else:
            self.replies.add(identity, missing(self.state, req, job_id))


def _drop(table: dict[K, dict[Waiter, None]], key: K, waiter: Waiter) -> None:
    """Take ``waiter`` out of ``table[key]``, and the key once it has none."""
    waiting = table.get(key)
    if waiting is not None:
        waiting.pop(waiter, None)
        if not waiting:
            del table[key]


def not_found(req: int, job_id: str) -> p.ErrorReply:
    return p.ErrorReply(req, "not_found", f"no job with id {job_id!r} (it may have expired)")


def missing(state: JobState, req: int, job_id: str) -> p.ErrorReply:
    """The not_found reply for ``job_id``, which is not a job: for a flow's
    member made later, whether it is yet to be made or never will be."""
    later = state.flowbook.later.get(job_id)
    flow = state.flows.get(later[0]) if later is not None else None
    if later is None or flow is None or job_id in state.flowbook.ends.get(flow.id, {}):
        return not_found(req, job_id)
    index = later[1]
    where = state.flowbook.place(flow, index)
    see = f"see `corral {flow.kind} {flow.id}`"
    if state.flowbook.pending(job_id) is not None:
        return p.ErrorReply(
            req, "not_found", f"job {job_id!r} is {where} and has not been created yet; {see}"
        )
    if index == len(flow.steps) and flow.id in state.followed:
        return not_found(req, job_id)  # the callback was made and has expired
    return p.ErrorReply(
        req, "not_found", f"job {job_id!r} was {where} and was never created: {see}"
    )
