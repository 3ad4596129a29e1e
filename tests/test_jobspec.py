"""A job's options are declared once (broker/jobspec.py) and survive every
path a job can take: enqueue, a chain step created later, a group member,
compaction and replay. Adding an option to JobOptions is enough for it to
come through here unchanged; this property test is what says so."""

from __future__ import annotations

import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inproc import SMALL_LOG, FakeWorker, InProcessBroker, deliveries

import corral
from corral.broker import protocol as p
from corral.broker.clock import FakeClock
from corral.broker.jobspec import OPTION_NAMES, JobOptions, JobSpec
from corral.broker.records import JobCreated

NOW = 1_700_000_000.0
#: Small preallocated segments: each example opens a fresh log.

finite = st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_infinity=False)
names = st.text("abcdefghij._-", min_size=1, max_size=12)

#: A strategy for every option, by name: a new option must be added here,
#: and test_every_option_has_a_strategy says so.
OPTION_STRATEGIES: dict[str, st.SearchStrategy[Any]] = {
    "queue": st.none() | names,
    "priority": st.integers(-(2**31), 2**31 - 1),
    "delay": st.none() | finite,
    "run_at": st.none() | st.floats(NOW - 1e5, NOW + 1e5),
    "max_attempts": st.none() | st.integers(1, 1000),
    "timeout": st.none() | st.floats(0.001, 1e6),
    "unique_key": st.none() | names,
    "result_ttl": st.none() | finite,
    "unique_for": st.none() | finite,
    "max_retries": st.none() | st.integers(0, 1000),
    "expires": st.none()
    | st.floats(0.001, 1e6)
    | st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
    ),
    "limit_key": st.none() | names,
    "headers": st.none() | st.dictionaries(names, st.text(max_size=30), max_size=3),
}


@st.composite
def specs(draw: st.DrawFn, job_id: str, depth: int = 1) -> JobSpec:
    options = {name: draw(strategy) for name, strategy in OPTION_STRATEGIES.items()}
    if options["unique_key"] is not None:
        # each spec its own key: a flow whose job's key another job holds is
        # refused (tests/test_followups.py), and this test is about options
        options["unique_key"] = f"{job_id}:{options['unique_key']}"
    expires, run_at = options["expires"], options["run_at"]
    if isinstance(expires, datetime) and run_at is not None and expires.timestamp() <= run_at:
        options["run_at"] = None  # refused: it would lapse before it is due (test_expires.py)
    callbacks: dict[str, Any] = {}
    if depth > 0:
        for name in ("on_success", "on_failure"):
            callbacks[name] = draw(st.none() | specs(f"{job_id}-{name}", depth - 1))
    payload = p.encode_value(draw(st.integers(-(2**63), 2**63 - 1) | st.text(max_size=20)))
    return JobSpec(job_id, draw(names), payload, **callbacks, **options)


def test_every_option_has_a_strategy() -> None:
    assert set(OPTION_STRATEGIES) == set(OPTION_NAMES) == set(JobOptions.__struct_fields__)


def test_corral_job_takes_every_option() -> None:
    """The client's Job is the same declaration: every option is a field."""
    fields = set(corral.Job.__struct_fields__)
    assert set(OPTION_NAMES) <= fields
    job = corral.Job("t", 1, **{name: None for name in OPTION_NAMES if name != "priority"})
    assert job.task == "t"


def expected(spec: JobSpec, now: float) -> dict[str, Any]:
    """What the broker keeps of a spec created at ``now``: every option as
    given, the queue resolved, ``delay`` folded into ``run_at`` (and kept)."""
    want = {name: getattr(spec, name) for name in OPTION_NAMES}
    want["queue"] = spec.queue or "default"
    run_at = now + spec.delay if spec.delay else spec.run_at
    want["run_at"] = run_at if run_at is not None and run_at > now else None
    want.update(id=spec.id, task=spec.task, payload=bytes(spec.payload))
    want.update(on_success=spec.on_success, on_failure=spec.on_failure)
    return want


def kept(created: JobCreated) -> dict[str, Any]:
    got = {name: getattr(created, name) for name in OPTION_NAMES}
    got.update(id=created.id, task=created.task, payload=bytes(created.payload))
    got.update(on_success=created.on_success, on_failure=created.on_failure)
    return got


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    plain=specs("plain"),
    step=specs("step"),
    member=specs("member"),
)
def test_a_spec_with_every_option_survives_enqueue_flows_compaction_and_replay(
    plain: JobSpec, step: JobSpec, member: JobSpec
) -> None:
    state_dir = Path(tempfile.mkdtemp(prefix="corral-spec-"))
    try:
        clock = FakeClock(wall=NOW)
        broker = InProcessBroker(state_dir, clock=clock, extra=SMALL_LOG)
        # enqueue
        reply = broker.request(p.Enqueue(1, [plain]))
        assert isinstance(reply, p.EnqueueOk)
        # a chain whose second step is ``step``: created when the first succeeds
        first = JobSpec("first", "t.first", queue="first-q")
        broker.request(p.EnqueueFlow(2, "chain-1", "chain", [first, step]))
        # a group with ``member``
        broker.request(p.EnqueueFlow(3, "group-1", "group", [member]))
        worker = FakeWorker(broker, queues=("first-q",))
        (d,) = deliveries(worker.send(p.Ready("w", ["first-q"], 1, 1, [], "h", 1)))
        assert d.job_id == "first"
        worker.finish(d, "ok", 7)
        jobs = broker.core.state.jobs
        for spec in (plain, step, member):
            if spec is plain and plain.id not in jobs:
                continue  # impossible: no other job holds its unique key yet
            assert kept(jobs[spec.id].created) == expected(spec, NOW), spec.id
        assert broker.core.state.flows["chain-1"].steps == [first, step]
        assert broker.core.state.flows["group-1"].steps == [member]
        assert jobs["step"].prev_result == p.encode_value(7)
        before = {i: msgspec.msgpack.encode(j.created) for i, j in jobs.items()}
        # compaction, then a restart that replays the compacted log
        broker.core.log.compact(broker.core.state.snapshot())
        broker.core.log.close()
        again = InProcessBroker(state_dir, clock=clock, extra=SMALL_LOG)
        after = {i: msgspec.msgpack.encode(j.created) for i, j in again.core.state.jobs.items()}
        assert after == before
        assert again.core.state.flows == broker.core.state.flows
        again.core.log.close()
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


def test_every_option_has_a_keyword_in_enqueue_and_a_flag_in_the_cli() -> None:
    """The typed keywords of ``enqueue`` and the CLI's flags are the two
    places an option is named again: a new option missing from either
    fails here."""
    import inspect

    from corral import cli
    from corral.broker.jobspec import OPTION_NAMES
    from corral.clicommands import _OPTION_FLAGS
    from corral.clientcore import ClientCore

    for method in (ClientCore.enqueue, corral.Client.enqueue, corral.AsyncClient.enqueue):
        params = inspect.signature(method).parameters
        assert set(OPTION_NAMES) <= set(params), method
    parser = cli.build_parser()
    args = parser.parse_args(["enqueue", "t.task"])
    for name in OPTION_NAMES:
        assert hasattr(args, _OPTION_FLAGS.get(name, name)), f"no CLI flag for {name}"
    assert set(corral.Job.__struct_fields__) >= set(OPTION_NAMES)
