"""What the broker keeps of each chain and group: its steps, and the final
status (and, where the flow needs it, the result) of each member that
ended, so the flow finishes and answers whatever its members' TTLs.

A member's end is kept from the record that ended it (derived on replay
too, never logged apart), and written out by compaction as a
``MemberEnded`` record. A flow is forgotten (``FlowRemoved``) once it has
finished and none of its jobs is left: so it lives as long as the longest
TTL of its jobs, and no longer. Pure data, like the job state.

A member made later (a chain's step past the first, a chord's callback)
is *pending* until it is made, or until its flow can no longer make it (a
member failed or was cancelled): its id can be waited on, and its
unique key is held for it from the flow's creation.
"""

from __future__ import annotations

from collections.abc import Iterator

import msgspec

from corral.broker.job import Job
from corral.broker.jobspec import NIL, JobSpec
from corral.broker.records import FlowCreated, MemberEnded, Record

#: A member that ended so is the end of its flow: nothing after it is made.
STOPS = ("failed", "cancelled")

#: How a member ended: its final status, its result where the flow needs
#: it (else None), and when (epoch seconds).
End = tuple[str, msgspec.Raw | None, float]


class FlowBook:
    """Chains and groups by id, and their members' ends. ``jobs`` is the
    job state's table and ``followed`` its set of parents followed up
    (both read only)."""

    def __init__(self, jobs: dict[str, Job], followed: set[str]) -> None:
        self._jobs = jobs
        self._followed = followed
        self.flows: dict[str, FlowCreated] = {}
        #: member id -> (its flow's id, its index), for the members made
        #: later (a chain's steps past the first, a chord's callback).
        self.later: dict[str, tuple[str, int]] = {}
        #: flow id -> member id -> (final status, result or None, when).
        self.ends: dict[str, dict[str, End]] = {}
        #: flow id -> (members that succeeded, that failed or were cancelled).
        self._tally: dict[str, tuple[int, int]] = {}
        #: Flows that lost a job since the housekeeper last looked.
        self.touched: set[str] = set()

    def add(self, flow: FlowCreated) -> None:
        if flow.id in self.flows:
            return
        self.flows[flow.id] = flow
        for index, spec in self.made_later(flow):
            self.later[spec.id] = (flow.id, index)

    @staticmethod
    def made_later(flow: FlowCreated) -> list[tuple[int, JobSpec]]:
        """(index, spec) of each member not made with the flow itself."""
        later = list(enumerate(flow.steps))[1:] if flow.kind == "chain" else []
        if flow.callback is not None:
            later.append((len(flow.steps), flow.callback))
        return later

    @staticmethod
    def place(flow: FlowCreated, index: int) -> str:
        """Where member ``index`` sits, in words: ``step 1 of chain 'c'``,
        ``member 0 of group 'g'``, ``the callback of group 'g'``."""
        if index >= len(flow.steps):
            what = "the callback"
        else:
            what = f"{'step' if flow.kind == 'chain' else 'member'} {index}"
        return f"{what} of {flow.kind} {flow.id!r}"

    def pending(self, job_id: str) -> tuple[FlowCreated, int] | None:
        """(flow, index) if ``job_id`` is a member its flow has yet to make
        and still may; else None."""
        flow_id, index = self.later.get(job_id, ("", 0))
        flow = self.flows.get(flow_id)
        if flow is None or job_id in self._jobs or job_id in self.ends.get(flow_id, {}):
            return None
        if index == len(flow.steps) and flow_id in self._followed:
            return None  # a chord's callback, made (and maybe expired since)
        if self.tally(flow_id)[1]:
            return None  # a member failed or was cancelled: the flow stops
        return flow, index

    def tally(self, flow_id: str) -> tuple[int, int]:
        """(members that succeeded, members that failed or were cancelled)."""
        ok, stopped = self._tally.get(flow_id, (0, 0))
        return ok, stopped

    def ended(self, flow_id: str) -> int:
        """How many members have ended."""
        return len(self.ends.get(flow_id, ()))

    def finished_at(self, flow_id: str) -> float:
        """When its last member ended (epoch seconds; 0.0 if none did)."""
        return max((end[2] for end in self.ends.get(flow_id, {}).values()), default=0.0)

    def keeps_result(self, flow: FlowCreated, step: int) -> bool:
        """A group's result is all its members'; a chain's, its last step's."""
        return flow.kind == "group" or step == len(flow.steps) - 1

    def member_ended(
        self,
        flow_id: str,
        job_id: str,
        step: int,
        status: str,
        result: msgspec.Raw | None,
        ended_at: float,
    ) -> None:
        """Member ``job_id`` (step ``step``) of ``flow_id`` ended at
        ``ended_at`` (epoch seconds). A chord's callback (the step past the
        last) is not a member."""
        flow = self.flows.get(flow_id)
        if flow is None or step >= len(flow.steps):
            return
        kept = result if self.keeps_result(flow, step) else None
        self._put(flow_id, job_id, (status, kept, ended_at))

    def member_reopened(self, flow_id: str, job_id: str) -> None:
        """A member was put back (a manual retry): it has not ended."""
        self._put(flow_id, job_id, None)

    def apply_ended(self, rec: MemberEnded) -> None:
        if rec.flow in self.flows:
            self._put(rec.flow, rec.id, (rec.status, msgspec.Raw(bytes(rec.result)), rec.ended_at))

    def _put(self, flow_id: str, job_id: str, end: End | None) -> None:
        """Set (or with None, clear) a member's end, keeping the tally."""
        ends = self.ends.setdefault(flow_id, {})
        old = ends.pop(job_id, None)
        ok, stopped = self.tally(flow_id)
        for entry, sign in ((old, -1), (end, 1)):
            if entry is not None:
                ok += sign * (entry[0] == "succeeded")
                stopped += sign * (entry[0] in STOPS)
        if end is not None:
            ends[job_id] = end
        self._tally[flow_id] = (ok, stopped)

    def end_of(self, flow_id: str, job_id: str) -> tuple[str, msgspec.Raw | None] | None:
        end = self.ends.get(flow_id, {}).get(job_id)
        return (end[0], end[1]) if end is not None else None

    def remove(self, flow_id: str) -> None:
        flow = self.flows.pop(flow_id, None)
        for _, spec in self.made_later(flow) if flow is not None else ():
            self.later.pop(spec.id, None)
        self.ends.pop(flow_id, None)
        self._tally.pop(flow_id, None)
        self.touched.discard(flow_id)

    def snapshot(self) -> Iterator[Record]:
        """Each flow, then its members' ends."""
        for flow in self.flows.values():
            yield flow
            for job_id, (status, result, at) in self.ends.get(flow.id, {}).items():
                kept = result if result is not None else NIL
                yield MemberEnded(flow.id, job_id, status, kept, ended_at=at)
