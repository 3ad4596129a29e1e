"""Withdraws waiting for their answers: a pause is answered only once every
worker asked for its buffered jobs has answered, left, or let the liveness
window pass. Pure: time comes in as ``mono`` (monotonic seconds)."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import structlog

log = structlog.get_logger()


class PendingWithdraws:
    """Withdraw number -> the workers yet to answer, a deadline, and what to
    do once all have answered (or the deadline passed)."""

    def __init__(self) -> None:
        self._refs = itertools.count(1)
        self._waiting: dict[int, tuple[set[bytes], float, Callable[[], None]]] = {}

    def next_ref(self) -> int:
        """A new Withdraw number (never 0, which means "no withdraw")."""
        return next(self._refs)

    def expect(
        self, ref: int, asked: set[bytes], deadline: float, done: Callable[[], None]
    ) -> None:
        """Call ``done`` once every worker in ``asked`` answered ``ref``, or
        at ``deadline``; at once if none was asked."""
        if asked:
            self._waiting[ref] = (asked, deadline, done)
        else:
            done()

    def answered(self, ref: int, identity: bytes) -> None:
        entry = self._waiting.get(ref)
        if entry is not None:
            entry[0].discard(identity)
            if not entry[0]:
                del self._waiting[ref]
                entry[2]()

    def gone(self, identity: bytes) -> None:
        """A worker left or died: it answers nothing any more."""
        for ref in list(self._waiting):
            self.answered(ref, identity)

    def excuse(self, seconds: float) -> None:
        """The broker did not run for ``seconds``: every wait gets them back."""
        for ref, (asked, deadline, done) in list(self._waiting.items()):
            self._waiting[ref] = (asked, deadline + seconds, done)

    def expire(self, mono: float) -> None:
        for ref, (asked, deadline, _) in list(self._waiting.items()):
            if deadline <= mono:
                log.warning("broker.withdraw_unanswered", workers=len(asked))
                self._waiting.pop(ref)[2]()
