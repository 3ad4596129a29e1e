"""Chains, groups and callbacks, pure like the job state: which jobs a
finished job brings about, and what a flow's status and result are.

A chain's steps are created one at a time: step n+1 when step n succeeds,
with step n's result as its ``prev_result``; a failure stops the chain. A
group's jobs are all created at once; its callback (a chord) is created
when every one succeeded, with the list of their results. A job's own
``on_success``/``on_failure`` callback is created when it ends that way.
Every id is chosen up front by the client, and the follow-ups of a parent
are made in one ``FollowedUp`` record, the fact that they were made: a
replay after a crash between a result and that record makes them then,
and never again once the record is there, even when they expired since.
"""

from __future__ import annotations

import msgspec

from corral.broker.jobspec import NIL, JobSpec
from corral.broker.records import FlowCreated, FollowedUp, JobCreated
from corral.broker.state import TERMINAL, Job, JobState

__all__ = ["create", "finished", "followups", "members_of", "results_of", "status_of"]

_encoder = msgspec.msgpack.Encoder()


def create(
    state: JobState,
    step: JobSpec,
    now: float,
    *,
    flow: str | None = None,
    index: int = 0,
    prev_result: msgspec.Raw = NIL,
) -> JobCreated | None:
    """The record that creates ``step`` now (every option it carries, its
    delay counted from now), or None if it exists already. The spec was
    validated when its flow or parent job was enqueued."""
    return state.decide_create(
        step, now, validated=True, flow=flow, step=index, prev_result=prev_result
    )


def followups(state: JobState, job: Job, now: float) -> list[FollowedUp]:
    """What ``job`` ending (as it has) brings about and has not yet: a
    FollowedUp record per parent (the job itself; its group, for a chord's
    callback), each listing the jobs to create. A parent already followed
    up gets nothing, whether or not its follow-ups still exist."""
    out: list[FollowedUp] = []
    result = job.result if job.result is not None else NIL
    flow = state.flows.get(job.flow) if job.flow else None
    if job.id not in state.followed:
        own = _own_followups(state, job, flow, now, result)
        if own is not None:
            out.append(FollowedUp(job.id, own))
    if (
        flow is not None
        and flow.kind == "group"
        and flow.callback is not None
        and job.status == "succeeded"
        and flow.id not in state.followed
        and state.flowbook.tally(flow.id)[0] == len(flow.steps)  # every member succeeded
    ):
        callback = create(
            state,
            flow.callback,
            now,
            flow=flow.id,
            index=len(flow.steps),
            prev_result=results_of(members_of(state, flow)),
        )
        out.append(FollowedUp(flow.id, [callback] if callback is not None else []))
    return out


def _own_followups(
    state: JobState, job: Job, flow: FlowCreated | None, now: float, result: msgspec.Raw
) -> list[JobCreated] | None:
    """The jobs ``job`` itself brings about (its callbacks, a chain's next
    step), or None if it brings about none."""
    due: list[JobCreated | None] = []
    callback = {"succeeded": job.on_success, "failed": job.on_failure}.get(job.status)
    owed = callback is not None
    if callback is not None and _free(state, callback, now):
        prev = result
        if job.status == "failed":
            error = job.error
            failure = {
                "job_id": job.id,
                "task": job.task,
                "type": error.type if error else "",
                "message": error.message if error else "",
            }
            prev = msgspec.Raw(_encoder.encode(failure))
        due.append(create(state, callback, now, prev_result=prev))
    if (
        flow is not None
        and flow.kind == "chain"
        and job.status == "succeeded"
        and job.step + 1 < len(flow.steps)
    ):
        owed = True
        nxt = flow.steps[job.step + 1]
        due.append(create(state, nxt, now, flow=flow.id, index=job.step + 1, prev_result=result))
    if not owed:
        return None
    # A callback whose key's holder stood in for it still counts as made:
    # the FollowedUp record (maybe empty) says so, so no replay makes it.
    return [record for record in due if record is not None]


def _free(state: JobState, callback: JobSpec, now: float) -> bool:
    """A callback is due to be made: it is an enqueue made when its parent
    ends, so a unique key another job holds then makes it stand in for the
    callback (the callback is not made), as for any enqueue."""
    return state.holder_of(callback.unique_key, now) in (None, callback.id)


Member = tuple[str | None, msgspec.Raw | None]


def members_of(state: JobState, flow: FlowCreated) -> list[Member]:
    """Each step's (status, result): from its job while it is there, else
    from how it ended (kept by the flow), else (None, None): not created."""
    out: list[Member] = []
    for step in flow.steps:
        job = state.jobs.get(step.id)
        if job is not None:
            out.append((job.status, job.result))
        else:
            end = state.flowbook.end_of(flow.id, step.id)
            out.append(end if end is not None else (None, None))
    return out


def results_of(members: list[Member]) -> msgspec.Raw:
    """A msgpack array of the members' results, in order, without decoding them."""
    raws = [result if result is not None else NIL for _, result in members]
    return msgspec.Raw(_encoder.encode(raws))


def status_of(state: JobState, flow: FlowCreated) -> tuple[str, int | None]:
    """A flow's status and, if it failed, the step where. O(1) from the
    flow's tally while a member ends (a chord of 10,000 stays linear); the
    members are read only to find where it failed, or before any ended."""
    book = state.flowbook
    ok, stopped = book.tally(flow.id)
    count = len(flow.steps)
    # A chain stops at its first failure; a group has failed once all ended.
    if stopped and (flow.kind == "chain" or book.ended(flow.id) == count):
        for index, (status, _) in enumerate(members_of(state, flow)):
            if status in ("failed", "cancelled"):
                return status, index
    if ok == count:
        return "succeeded", None
    if book.ended(flow.id):
        return "running", None
    statuses = [status for status, _ in members_of(state, flow)]
    started = any(s is not None and s not in ("queued", "scheduled") for s in statuses)
    return ("running" if started else "queued"), None


def finished(state: JobState, flow: FlowCreated) -> bool:
    """The flow has ended (succeeded, failed or cancelled), and a chord's
    callback, if it is owed, was made."""
    status, _ = status_of(state, flow)
    if status not in TERMINAL:
        return False
    owes_callback = flow.kind == "group" and flow.callback is not None and status == "succeeded"
    return not owes_callback or flow.id in state.followed
