"""What the broker keeps of each chain and group: its steps, and the final
status (and, where the flow needs it, the result) of each member that
ended, so the flow finishes and answers whatever its members' TTLs.

A member's end is kept from the record that ended it (derived on replay
too, never logged apart), and written out by compaction as a
``MemberEnded`` record. A flow is forgotten (``FlowRemoved``) once it has
finished and none of its jobs is left: so it lives as long as the longest
TTL of its jobs, and no longer. Pure data, like the job state.
"""

from __future__ import annotations

from collections.abc import Iterator

import msgspec

from corral.broker.jobspec import NIL
from corral.broker.records import FlowCreated, MemberEnded, Record


class FlowBook:
    """Chains and groups by id, and their members' ends."""

    def __init__(self) -> None:
        self.flows: dict[str, FlowCreated] = {}
        #: flow id -> member id -> (final status, result or None).
        self.ends: dict[str, dict[str, tuple[str, msgspec.Raw | None]]] = {}
        #: Flows that lost a job since the housekeeper last looked.
        self.touched: set[str] = set()

    def add(self, flow: FlowCreated) -> None:
        self.flows.setdefault(flow.id, flow)

    def keeps_result(self, flow: FlowCreated, step: int) -> bool:
        """A group's result is all its members'; a chain's, its last step's."""
        return flow.kind == "group" or step == len(flow.steps) - 1

    def member_ended(
        self, flow_id: str, job_id: str, step: int, status: str, result: msgspec.Raw | None
    ) -> None:
        """Member ``job_id`` (step ``step``) of ``flow_id`` ended. A chord's
        callback (the step past the last) is not a member."""
        flow = self.flows.get(flow_id)
        if flow is None or step >= len(flow.steps):
            return
        kept = result if self.keeps_result(flow, step) else None
        self.ends.setdefault(flow_id, {})[job_id] = (status, kept)

    def member_reopened(self, flow_id: str, job_id: str) -> None:
        """A member was put back (a manual retry): it has not ended."""
        self.ends.get(flow_id, {}).pop(job_id, None)

    def apply_ended(self, rec: MemberEnded) -> None:
        flow = self.flows.get(rec.flow)
        if flow is not None:
            self.ends.setdefault(rec.flow, {})[rec.id] = (
                rec.status,
                msgspec.Raw(bytes(rec.result)),
            )

    def end_of(self, flow_id: str, job_id: str) -> tuple[str, msgspec.Raw | None] | None:
        return self.ends.get(flow_id, {}).get(job_id)

    def remove(self, flow_id: str) -> None:
        self.flows.pop(flow_id, None)
        self.ends.pop(flow_id, None)
        self.touched.discard(flow_id)

    def snapshot(self) -> Iterator[Record]:
        """Each flow, then its members' ends."""
        for flow in self.flows.values():
            yield flow
            for job_id, (status, result) in self.ends.get(flow.id, {}).items():
                yield MemberEnded(flow.id, job_id, status, result if result is not None else NIL)
