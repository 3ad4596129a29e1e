"""What a new job, a new flow or a manual retry may take: ids that no job,
flow or job yet to be made has, and unique keys no other job holds. Each
check raises InvalidJob (or returns the refusal) naming what clashed with
what, rather than letting a job take another's place in a flow, lose a
callback, or make a second holder of a key. Reads the job state only.

Also what a replayed log may hold: :func:`check_replayed_payloads`."""

from __future__ import annotations

from collections.abc import Collection
from operator import attrgetter

from corral.broker import expiring
from corral.broker.flowbook import FlowBook
from corral.broker.job import BLOB_HEAD, Job, touched
from corral.broker.jobspec import InvalidJob, JobSpec, ids_of, with_callback
from corral.broker.protocol import TERMINAL
from corral.broker.records import FlowCreated
from corral.broker.state import JobState
from corral.errors import ConfigError


class Admission:
    """The checks, over ``state``."""

    def __init__(self, state: JobState) -> None:
        self.state = state

    def check_id(self, job_id: str, *, resend_ok: bool = False, field: str = "id") -> None:
        """Refuse an id that a chain or group, a job (unless ``resend_ok``:
        a plain enqueue of an existing id is answered as a resend), a flow's
        job yet to be made, or a callback yet to be made already has."""
        state = self.state
        if job_id in state.flows:
            what = f"the id of {state.flows[job_id].kind} {job_id!r}"
        elif job_id in state.jobs:
            if resend_ok:
                return
            what = "the id of a job" if field == "flow_id" else "the id of an existing job"
        elif (pending := state.flowbook.pending(job_id)) is not None:
            what = f"taken by {FlowBook.place(*pending)}, not made yet"
        elif (owner := state.awaited.owner_of(job_id)) is not None:
            what = f"taken by a callback of {owner!r}, not made yet"
        else:
            return
        raise InvalidJob(f"{field}: {job_id!r} is {what}; pick another")

    def check_job(self, spec: JobSpec) -> None:
        """A plain job and its callbacks, nested ones included, take ids no
        one has and differ among themselves (unless it exists: a resend)."""
        self.check_id(spec.id, resend_ok=True)
        if spec.id in self.state.jobs:
            return
        ids = ids_of(spec)
        for job_id in ids[1:]:
            self.check_id(job_id)
        twice = {job_id for job_id in ids if ids.count(job_id) > 1}
        if twice:
            raise InvalidJob(
                f"id: {sorted(twice)[0]!r} is used twice by a job and its callbacks; "
                "each needs its own id"
            )

    def check_batch(self, specs: list[JobSpec]) -> None:
        """Each new job of one enqueue, as :meth:`check_job`, and no id used
        twice across them (a job and another's callback, two callbacks)."""
        seen: set[str] = set()
        for spec in specs:
            self.check_job(spec)
            if spec.id in self.state.jobs:
                continue  # a resend
            for job_id in ids_of(spec):
                if job_id in seen:
                    raise InvalidJob(
                        f"id: {job_id!r} is used twice in one enqueue; each job and "
                        "callback needs its own id"
                    )
                seen.add(job_id)

    def check_flow(self, jobs: list[JobSpec], callback: JobSpec | None, now: float) -> None:
        """A new flow's jobs (and callbacks, nested) take ids no one has, and
        hold their unique keys like any job: a key held by another job (or
        used twice in the flow) refuses the flow, naming it."""
        members = with_callback(jobs, callback)
        for spec in members:
            for job_id in ids_of(spec):
                self.check_id(job_id)
        seen: dict[str, str] = {}
        for spec in members:
            key = spec.unique_key
            if not key:
                continue
            holder = self.state.holder_of(key, now) or seen.get(key)
            if holder is not None:
                raise InvalidJob(
                    f"unique_key: {key!r} of job {spec.id!r} is held by job {holder!r}; "
                    "a flow's jobs cannot share a key with another job"
                )
            seen[key] = spec.id

    def retry_refusal(self, job: Job, now: float) -> str | None:
        """Why ``job`` cannot be retried by hand, or None."""
        holder = self.state.holder_of(job.unique_key, now)
        if holder is not None and holder != job.id:
            return (
                f"job {holder} holds the unique_key {job.unique_key!r}; "
                f"retry {job.id} once it has ended"
            )
        if job.status not in ("failed", "cancelled"):
            return f"job {job.id} is {job.status}: only failed or cancelled jobs can be retried"
        if expiring.lapsed(job, now):
            return (
                f"job {job.id} is past its expires time: put back, it would be cancelled "
                "(expired) at once; enqueue it again to run it"
            )
        flow = self.state.flows.get(job.flow) if job.flow else None
        return self._later_keys_refusal(job, flow, now) if flow is not None else None

    def _later_keys_refusal(self, job: Job, flow: FlowCreated, now: float) -> str | None:
        """Why retrying ``job`` cannot go on with its flow: a job the flow is
        yet to make needs a key another job took since, or None."""
        for index, spec in FlowBook.made_later(flow):
            holder = self.state.holder_of(spec.unique_key, now)
            made = spec.id in self.state.jobs
            if index > job.step and not made and holder not in (None, spec.id):
                return (
                    f"job {holder} holds the unique_key {spec.unique_key!r} that "
                    f"{FlowBook.place(flow, index)} needs; retry {job.id} once it has ended"
                )
        return None


_BLOB = attrgetter("blob")
_TPL = attrgetter("tpl")
_PAYLOAD = attrgetter("payload")


def check_replayed_payloads(
    jobs: Collection[Job],
    max_payload: int | None,
    largest_blob: int | None = None,
    *,
    lived: list[Job] | None = None,
) -> None:
    """Refuse to start on a log whose unfinished jobs carry payloads over
    ``max_payload`` bytes (the limit was lowered, or an older version wrote
    them): they would run with what an enqueue now refuses. Nothing is
    dropped: the message says how far to raise the limit. Ended jobs never
    run again and are not checked (nor anything, for a ``max_payload`` of
    None). ``largest_blob``: a bound on the blobs of the pristine jobs
    among ``jobs`` (JobState.largest_blob), so that only the others are
    read one by one (``lived``: those, if the caller has them already).
    Raises ConfigError."""
    if max_payload is None:
        return
    # at C speed first (a replay of a million jobs waits on this): the
    # largest blob (a pristine job's head and payload) and the largest
    # payload of a whole creation record; each job is looked at only if
    # one of them is over the limit
    if largest_blob is None:
        blobs = max(map(len, filter(None, map(_BLOB, jobs))), default=0)
        records = max(map(len, map(_PAYLOAD, map(_TPL, jobs))), default=0)
    else:  # the state's bound on pristine jobs' blobs; whole records only on the others
        blobs = largest_blob
        others = touched(jobs) if lived is None else lived
        records = max(map(len, map(_PAYLOAD, map(_TPL, others))), default=0)
    if blobs - BLOB_HEAD.size <= max_payload and records <= max_payload:
        return
    over = [job for job in jobs if job.payload_size > max_payload and job.status not in TERMINAL]
    if not over:
        return
    largest = max(over, key=lambda job: job.payload_size)
    raise ConfigError(
        f"broker.max_payload: the log holds {len(over)} unfinished job(s) whose payload is "
        f"over max_payload ({max_payload} bytes), the largest {largest.payload_size} bytes "
        f"(job {largest.id}); raise broker.max_payload to at least {largest.payload_size} "
        "until they have run, then lower it again"
    )
