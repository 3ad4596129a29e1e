"""The ids that callbacks yet to be made will take: a job's (or a flow
member's) ``on_success``/``on_failure``, nested ones included, each
reserved for its owner (the job, or the flow) from its creation until the
owner is forgotten, so that no other job takes the id meanwhile and the
callback is never silently lost. Pure data, like the job state."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from corral.broker.jobspec import JobSpec, ids_of


class WithCallbacks(Protocol):
    """A job's spec or creation record: what carries its callbacks."""

    @property
    def on_success(self) -> JobSpec | None: ...

    @property
    def on_failure(self) -> JobSpec | None: ...


class AwaitedIds:
    """callback id -> the id of the job or flow that will make it."""

    def __init__(self) -> None:
        self._owner: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._owner)

    def add(self, owner: str, specs: Iterable[WithCallbacks]) -> None:
        """The callbacks of ``specs`` (not the specs themselves) are
        ``owner``'s: the nearest owner wins (a callback job, once made, owns
        its own callbacks), whatever order the records come in."""
        for job_id in _callback_ids(specs):
            self._owner[job_id] = owner

    def drop(self, owner: str, specs: Iterable[WithCallbacks]) -> None:
        """``owner`` is forgotten: its callbacks' ids are free again."""
        for job_id in _callback_ids(specs):
            if self._owner.get(job_id) == owner:
                del self._owner[job_id]

    def owner_of(self, job_id: str) -> str | None:
        return self._owner.get(job_id)


def _callback_ids(specs: Iterable[WithCallbacks]) -> list[str]:
    return [
        job_id
        for spec in specs
        for callback in (spec.on_success, spec.on_failure)
        if callback is not None
        for job_id in ids_of(callback)
    ]
