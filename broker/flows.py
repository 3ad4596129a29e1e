"""Chains, groups and callbacks, pure like the job state: which jobs a
finished job brings about, and what a flow's status and result are.

A chain's steps are created one at a time: step n+1 when step n succeeds,
with step n's result as its ``prev_result``; a failure stops the chain. A
group's jobs are all created at once; its callback (a chord) is created
when every one succeeded, with the list of their results. A job's own
``on_success``/``on_failure`` callback is created when it ends that way.
Every id is chosen up front by the client, so creating a follow-up twice
(replaying after a crash between a result and its follow-up) is a no-op.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from corral.broker.jobspec import NIL, JobSpec
from corral.broker.records import FlowCreated, JobCreated
from corral.broker.state import TERMINAL, Job, JobState

__all__ = ["create", "followups", "pending", "results_of", "status_of"]

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


def followups(state: JobState, job: Job, now: float) -> list[JobCreated]:
    """The jobs that ``job`` ending (as it has) brings about."""
    out: list[JobCreated | None] = []
    result = job.result if job.result is not None else NIL
    if job.status == "succeeded" and job.on_success is not None:
        out.append(create(state, job.on_success, now, prev_result=result))
    if job.status == "failed" and job.on_failure is not None:
        error = job.error
        failure = {
            "job_id": job.id,
            "task": job.task,
            "type": error.type if error else "",
            "message": error.message if error else "",
        }
        out.append(
            create(state, job.on_failure, now, prev_result=msgspec.Raw(_encoder.encode(failure)))
        )
    flow = state.flows.get(job.flow) if job.flow else None
    if flow is not None and job.status == "succeeded":
        if flow.kind == "chain" and job.step + 1 < len(flow.steps):
            out.append(
                create(
                    state,
                    flow.steps[job.step + 1],
                    now,
                    flow=flow.id,
                    index=job.step + 1,
                    prev_result=result,
                )
            )
        elif flow.kind == "group" and flow.callback is not None:
            jobs = [state.jobs.get(step.id) for step in flow.steps]
            if all(j is not None and j.status == "succeeded" for j in jobs):
                out.append(
                    create(
                        state,
                        flow.callback,
                        now,
                        flow=flow.id,
                        index=len(flow.steps),
                        prev_result=results_of(jobs),
                    )
                )
    return [record for record in out if record is not None]


def pending(state: JobState, now: float, record: Callable[[JobCreated], None]) -> int:
    """Create the follow-ups owed by finished jobs but missing (the broker
    stopped between a result and its follow-up): run once after replay.
    ``record`` logs and applies each; returns how many."""
    count = 0
    for job in list(state.jobs.values()):
        if job.status in TERMINAL:
            for created in followups(state, job, now):
                record(created)
                count += 1
    return count


def results_of(jobs: list[Job | None]) -> msgspec.Raw:
    """A msgpack array of the jobs' results, in order, without decoding them."""
    raws = [j.result if j is not None and j.result is not None else NIL for j in jobs]
    return msgspec.Raw(_encoder.encode(raws))


def jobs_of(state: JobState, flow: FlowCreated) -> list[Job | None]:
    return [state.jobs.get(step.id) for step in flow.steps]


def status_of(state: JobState, flow: FlowCreated) -> tuple[str, int | None]:
    """A flow's status and, if it failed, the step where."""
    jobs = jobs_of(state, flow)
    # A chain stops at its first failure; a group has failed once all ended.
    ended = flow.kind == "chain" or all(j is not None and j.status in TERMINAL for j in jobs)
    for index, job in enumerate(jobs):
        if ended and job is not None and job.status in ("failed", "cancelled"):
            return job.status, index
    if all(j is not None and j.status == "succeeded" for j in jobs):
        return "succeeded", None
    started = any(j is not None and j.status not in ("queued", "scheduled") for j in jobs)
    return ("running" if started else "queued"), None
