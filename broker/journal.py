"""The log and the job state, changed together, and the links out.

:class:`Journal` is the one way any part of the broker changes a job: the
record goes to the log first, then to the state (log first, then apply), so
a replay rebuilds exactly what the live broker had. :class:`Replies` holds
the pass's answers to clients until the commit that covers them; the links
are what the loop gives the parts to reach the sockets (tests give
recorders instead).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Protocol

from corral.broker import protocol as p
from corral.broker.log import Log
from corral.broker.records import Record, TaskForgotten, TaskRegistered
from corral.broker.state import JobState


class Journal:
    """The job state, its log and the broker's counters."""

    def __init__(self, state: JobState, log: Log) -> None:
        self.state = state
        self.log = log
        #: Counters shown by ``corral status``.
        self.stats: Counter[str] = Counter()
        #: Records made since start that change jobs: a change of job state
        #: changes it (a task's registered options, which any READY may
        #: change, do not: a status made since is not made again for them).
        self.records = 0
        #: Told every record once it is applied (metrics, events).
        self.observers: list[Callable[[Record, JobState], None]] = []

    def record(self, record: Record) -> None:
        """Log first, then apply. The record is durable at the pass's commit."""
        self.log.append(record)
        self.state.apply(record)
        if not isinstance(record, TaskRegistered | TaskForgotten):
            self.records += 1
        for observer in self.observers:
            observer(record, self.state)


class WorkerLink(Protocol):
    """Sends one message to a worker now. False: not sent (a full or gone
    peer); the caller must not act as if it was delivered."""

    def send(self, identity: bytes, body: bytes) -> bool: ...


class ClientLink(Protocol):
    """Sends one reply to a client. False: dropped (a full or gone peer),
    which the client's own timeout covers."""

    def send(self, identity: bytes, body: bytes) -> bool: ...

    def send_frames(self, identity: bytes, frames: tuple[bytes, ...]) -> bool:
        """One reply in several frames, sent without copying them (a frame
        may be shared by many replies: see :meth:`Replies.add_status`)."""
        ...


class Replies:
    """The pass's replies to clients, sent only after the pass's commit, so
    none that promises durability leaves before its fsync."""

    def __init__(self) -> None:
        self.pending: list[tuple[bytes, bytes | tuple[bytes, ...]]] = []
        #: The held replies' bodies, summed (bytes; a shared status once).
        self.size = 0
        self._counted: bytes | None = None
        #: A held reply tells of the state (an acknowledgement, a job, a
        #: status): the pass's commit must sync what the log holds before
        #: it leaves. False while the only replies promise nothing (a pong,
        #: the refusal of a request that could not be read).
        self.durable = False

    def __bool__(self) -> bool:
        return bool(self.pending)

    def __len__(self) -> int:
        return len(self.pending)

    def add(self, identity: bytes, msg: p.Msg, *, durable: bool = True) -> None:
        """Hold ``msg`` for ``identity``. ``durable=False``: it tells
        nothing of the state (see :attr:`durable`), so it needs no sync."""
        body = p.encode(msg)
        self.pending.append((identity, body))
        self.size += len(body)
        if durable:
            self.durable = True

    def add_status(self, identity: bytes, req: int, status: bytes) -> None:
        """A status reply carrying ``status`` (an encoded StatusInfo), which
        every status reply of the pass shares rather than copies (see
        :func:`protocol.status_reply_frames`): a flood of status requests,
        even from clients that never read, holds one status in memory, not
        one per reply."""
        frames = p.status_reply_frames(req, status)
        self.pending.append((identity, frames))
        self.durable = True
        self.size += len(frames[0]) + len(frames[2])
        if status is not self._counted:
            self._counted = status
            self.size += len(status)

    def flush(self, link: ClientLink) -> int:
        """Send every held reply; returns how many."""
        pending, self.pending = self.pending, []
        self.size = 0
        self._counted = None
        self.durable = False
        for identity, body in pending:
            if isinstance(body, bytes):
                link.send(identity, body)
            else:
                link.send_frames(identity, body)
        return len(pending)
