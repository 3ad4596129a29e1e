"""Expiring jobs (the ``expires`` job option): a job not started by its
deadline never runs; it ends ``cancelled``, reason ``expired``, by a timer
even when no worker asks, and the same across a restart. In process, with
a FakeClock (no test sleeps), then through the client and the CLI."""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest
from conftest import Env, wait_until
from inproc import SMALL_LOG, FakeWorker, InProcessBroker, deliveries

from corral.broker import protocol as p
from corral.broker.clock import FakeClock
from corral.broker.jobspec import OPTION_NAMES, InvalidJob, JobSpec, validate_spec
from corral.broker.records import (
    FollowedUp,
    JobCreated,
    JobsCreated,
    JobSnapshot,
    Record,
    decode_record,
    encode_record,
)
from corral.cliargs import expires_arg
from corral.clientcore import ClientCore, expires_value
from corral.cliformat import human_job
from corral.errors import JobCancelled

TASK = "t.task"


@pytest.fixture
def broker(tmp_path: Path) -> InProcessBroker:
    b = InProcessBroker(tmp_path, extra=SMALL_LOG)
    yield b
    b.close()


def expired(info: p.JobInfo | None) -> bool:
    assert info is not None
    return (
        info.status == "cancelled"
        and info.reason == "expired"
        and info.error is not None
        and info.error.type == p.EXPIRED_ERROR
    )


def test_a_job_not_started_in_time_is_cancelled_by_the_timer(broker: InProcessBroker) -> None:
    job_id = broker.enqueue(TASK, 1, expires=5.0)
    control = broker.enqueue(TASK, 2)
    assert broker.core.poll_timeout() == pytest.approx(1.0)  # an idle pass's longest wait
    broker.advance(4.5)
    assert broker.job(job_id).status == "queued"
    broker.advance(0.5)  # no worker ever asked
    assert expired(broker.job(job_id))
    assert broker.core.stats["jobs_expired"] == 1
    w = FakeWorker(broker, b"w", credit=5)
    assert [d.job_id for d in w.ready()] == [control]  # it never runs


def test_the_timer_wakes_the_loop_at_the_deadline(broker: InProcessBroker) -> None:
    broker.enqueue(TASK, 1, expires=0.3)
    assert broker.core.poll_timeout() == pytest.approx(0.3)


def test_dispatch_never_hands_out_a_lapsed_job(broker: InProcessBroker) -> None:
    """Found past its deadline by a dispatch before its timer's tick."""
    job_id = broker.enqueue(TASK, 1, expires=2.0)
    w = FakeWorker(broker, b"w")
    w.send(p.Ready("w", ["default"], 0, 1, [], "testhost", 4242))  # no credit yet
    broker.clock.advance(3.0)
    core = broker.core
    conn = core.dispatcher.workers.get(b"w")
    assert conn is not None
    conn.capacity = 1
    core.dispatcher.poke()
    core.dispatcher.dispatch(broker.clock.time(), broker.clock.monotonic())
    assert deliveries(w.inbox()) == []
    assert expired(broker.job(job_id))


def test_a_delayed_job_expires_after_it_is_due(broker: InProcessBroker) -> None:
    """Seconds count from when the job is due (Sidekiq's way), so a delay
    longer than the expiry still runs."""
    job_id = broker.enqueue(TASK, 1, delay=10.0, expires=5.0)
    broker.advance(12.0, step=1.0)
    assert broker.job(job_id).status == "queued"
    broker.advance(3.0, step=1.0)
    assert expired(broker.job(job_id))


def test_an_absolute_time_is_a_deadline(broker: InProcessBroker) -> None:
    at = datetime.fromtimestamp(broker.clock.time() + 2.0, UTC)
    job_id = broker.enqueue(TASK, 1, expires=at)
    broker.advance(1.5)
    assert broker.job(job_id).status == "queued"
    broker.advance(0.5)
    assert expired(broker.job(job_id))


def test_a_job_in_a_prefetch_buffer_is_taken_back(broker: InProcessBroker) -> None:
    first = broker.enqueue(TASK, 1)
    second = broker.enqueue(TASK, 2, expires=3.0)
    w = FakeWorker(broker, b"w", credit=2)
    got = w.ready()
    assert [d.job_id for d in got] == [first, second]
    w.start(got[0])  # the second waits behind it, reserved
    broker.advance(3.0)
    assert expired(broker.job(second))
    assert p.CancelJob(second, got[1].lease) in w.inbox()
    assert second not in broker.core.dispatcher.holders


def test_a_running_job_runs_on_and_its_retry_never_starts(broker: InProcessBroker) -> None:
    done = broker.enqueue(TASK, 1, expires=2.0)
    failing = broker.enqueue(TASK, 2, expires=2.0)
    w = FakeWorker(broker, b"w", credit=2)
    a, b = w.ready()
    w.start(a)
    w.start(b)
    broker.advance(3.0)
    assert broker.job(done).status == broker.job(failing).status == "running"
    w.finish(a, "ok", 7)
    assert broker.job(done).status == "succeeded"
    w.finish(b, "error", error=p.ErrorInfo("ValueError", "boom"))
    info = broker.job(failing)
    assert expired(info) and info.attempts == 1 and len(info.tries) == 1


def test_expiry_is_logged_and_replayed(tmp_path: Path) -> None:
    clock = FakeClock()
    broker = InProcessBroker(tmp_path, clock=clock, extra=SMALL_LOG)
    gone = broker.enqueue(TASK, 1, expires=1.0)
    later = broker.enqueue(TASK, 2, expires=10.0)
    broker.advance(1.0)
    assert expired(broker.job(gone))
    broker.crash()
    clock.advance(20.0)  # the second lapses while no broker runs
    again = InProcessBroker(tmp_path, clock=clock, extra=SMALL_LOG)
    assert expired(again.job(gone))  # the same state from the log
    again.advance(0.1)  # its first tick
    assert expired(again.job(later))
    again.core.log.compact(again.core.state.snapshot())
    again.close()
    third = InProcessBroker(tmp_path, clock=clock, extra=SMALL_LOG)
    assert expired(third.job(gone)) and expired(third.job(later))
    third.close()


def test_a_lapsed_job_is_not_retried_by_hand(broker: InProcessBroker) -> None:
    job_id = broker.enqueue(TASK, 1, expires=1.0)
    broker.advance(1.0)
    reply = broker.request(p.RetryJobs(broker.next_req(), job_id))
    assert isinstance(reply, p.ErrorReply) and "expires" in reply.message


def test_a_chain_stops_at_an_expired_step(broker: InProcessBroker) -> None:
    steps = [JobSpec("s1", TASK), JobSpec("s2", TASK, expires=1.0), JobSpec("s3", TASK)]
    broker.request(p.EnqueueFlow(broker.next_req(), "chain", "chain", steps))
    w = FakeWorker(broker, b"w")
    (d,) = w.ready()
    broker.advance(2.0)  # s2 is made when s1 succeeds: its second counts from then
    w.start(d)
    w.finish(d, "ok", 1)
    broker.advance(1.0)
    assert expired(broker.job("s2")) and broker.job("s3") is None


@pytest.mark.parametrize(
    ("expires", "message"),
    [
        (0.0, "positive number of seconds"),
        (-1.0, "positive number of seconds"),
        (datetime(2030, 1, 1), "zone"),
    ],
)
def test_a_bad_expires_is_refused(expires: object, message: str) -> None:
    with pytest.raises(InvalidJob, match=message) as caught:
        validate_spec(JobSpec("j", TASK, expires=expires))  # type: ignore[arg-type]
    assert "between 0" not in str(caught.value)  # 0 itself is refused: say so


def test_an_absolute_expires_not_after_run_at_is_refused() -> None:
    """Such a job would lapse before it is due: it could never run."""
    at = datetime(2030, 1, 1, tzinfo=UTC)
    for run_at in (at.timestamp(), at.timestamp() + 60):
        with pytest.raises(InvalidJob, match=r"not after its run_at .* never run"):
            validate_spec(JobSpec("j", TASK, run_at=run_at, expires=at))
    validate_spec(JobSpec("j", TASK, run_at=at.timestamp() - 1, expires=at))


def test_a_naive_datetime_is_refused_on_the_wire(broker: InProcessBroker) -> None:
    spec = JobSpec("j", TASK, expires=datetime(2030, 1, 1))
    reply = broker.request(p.Enqueue(broker.next_req(), [spec]))
    assert isinstance(reply, p.ErrorReply) and "expires" in reply.message


def test_the_client_takes_seconds_a_timedelta_a_datetime_or_text() -> None:
    assert expires_value(5) == 5.0 and expires_value(timedelta(minutes=2)) == 120.0
    local = expires_value(datetime(2030, 1, 1, 9))
    assert isinstance(local, datetime) and local.tzinfo is not None
    assert expires_value("5m") == 300.0
    assert expires_value("2030-01-01T09:00:00") == datetime(2030, 1, 1, 9, tzinfo=UTC)
    with pytest.raises(ValueError, match="expires"):
        expires_value("soon")
    with pytest.raises(TypeError, match="expires"):
        expires_value([1])
    step = ClientCore().enqueue(TASK, 1, expires=timedelta(seconds=30), limit_key="c1")
    assert not isinstance(step, str)
    (spec,) = step.request.jobs  # type: ignore[union-attr]
    assert (spec.expires, spec.limit_key) == (30.0, "c1")


def test_the_cli_reads_a_duration_or_a_time() -> None:
    assert expires_arg("90s") == 90.0 and expires_arg("300") == 300.0
    assert expires_arg("2030-01-01T09:00:00Z") == datetime(2030, 1, 1, 9, tzinfo=UTC)
    with pytest.raises(argparse.ArgumentTypeError, match="duration"):
        expires_arg("tomorrow")


def test_a_jobs_info_shows_its_deadline_and_headers(broker: InProcessBroker) -> None:
    """``corral job`` (and its --json) says when a job expires, in its
    headers' company."""
    now = broker.clock.time()
    job_id = broker.enqueue(delay=30.0, expires=60.0, headers={"tenant": "acme"})
    info = broker.job(job_id)
    assert info is not None
    assert info.expires_at == pytest.approx(now + 90.0)
    assert info.headers == {"tenant": "acme"}
    text = human_job(info)
    assert "expires:     " in text and "headers:     tenant=acme" in text
    shown = json.loads(msgspec.json.encode(info))
    assert shown["expires_at"] == pytest.approx(now + 90.0)
    assert shown["headers"] == {"tenant": "acme"}
    plain = broker.job(broker.enqueue())
    assert plain is not None and plain.expires_at is None and plain.headers is None
    assert "expires:" not in human_job(plain) and "headers:" not in human_job(plain)


def test_result_says_the_job_expired() -> None:
    step = ClientCore().result("j1", timeout=0)
    assert not isinstance(step, str)
    error = p.ErrorInfo(p.EXPIRED_ERROR, "expired: not started by 2030-01-01T00:00:00+00:00")
    with pytest.raises(JobCancelled) as caught:
        step.answer(p.ResultReply(1, "j1", "cancelled", error=error))  # type: ignore[union-attr]
    assert caught.value.reason == "expired" and "expired" in str(caught.value)


# ------------------------------------------------------- with real workers


def test_an_expired_job_never_runs_on_a_worker_that_comes_later(env: Env) -> None:
    """No worker serves the queue while the job's time runs out: the
    broker's timer cancels it (expired), and the worker that comes then
    never runs it, and runs the rest. (A restart replays the expiry:
    test_expiry_is_logged_and_replayed.)"""
    env.write_config(plugins='["limit_tasks"]', processes=1)
    broker = env.start("broker")
    env.wait_ready(broker)
    out = env.home / "runs"
    out.mkdir()
    payload = json.dumps({"dir": str(out)})
    cli = env.run("enqueue", "-c", str(env.config), "limits.mark", payload, "--expires", "1s")
    assert cli.returncode == 0, cli.stderr
    by_cli = cli.stdout.strip()
    client = env.client()
    soon = client.enqueue("limits.mark", {"dir": str(out)}, expires=1.0)
    control = client.enqueue("limits.mark", {"dir": str(out)})
    for job_id in (by_cli, soon):
        wait_until(lambda j=job_id: client.job(j), expired, 30, message=f"{job_id} to expire")
    env.start("supervisor")
    assert client.result(control, timeout=60) is None
    with pytest.raises(JobCancelled) as caught:
        client.result(soon, timeout=5)
    assert caught.value.reason == "expired"
    assert sorted(path.name for path in out.iterdir()) == [f"{control}.1"]
    assert "cancelled (expired)" in human_job(client.job(soon))


# ------------------------------------------------ logs written before these options


def _legacy_created(raw: bytes) -> msgspec.Raw:
    """A JobCreated array as records version 4 wrote it: without the
    options added in version 5 (``expires``, ``limit_key``, ``headers``),
    which sit before JobCreated's own fields."""
    items = msgspec.msgpack.decode(raw, type=list[msgspec.Raw])
    first_new = 5 + OPTION_NAMES.index("expires")
    del items[first_new : 5 + len(OPTION_NAMES)]
    return msgspec.Raw(msgspec.msgpack.encode(items))


def legacy_body(record: Record) -> tuple[int, bytes]:
    code, body = encode_record(record)
    items = msgspec.msgpack.decode(body, type=list[msgspec.Raw])
    if isinstance(record, JobCreated):
        return code, bytes(_legacy_created(body))
    if isinstance(record, FollowedUp):
        created = msgspec.msgpack.decode(items[1], type=list[msgspec.Raw])
        items[1] = msgspec.Raw(msgspec.msgpack.encode([_legacy_created(c) for c in created]))
    elif isinstance(record, JobSnapshot | JobsCreated):
        items[0] = _legacy_created(items[0])
    return code, msgspec.msgpack.encode(items)


def _old_records() -> list[Record]:
    step = JobSpec("cb", "t.cb", timeout=3.0)
    job = JobCreated(
        id="j1", task=TASK, payload=p.encode_value([1]), queue="q", priority=2,
        max_retries=4, seq=7, created_at=1.5, flow="f", step=1, on_success=step,
    )  # fmt: skip
    return [
        job,
        JobSnapshot(job, "failed", 2, [], error=None),
        FollowedUp("j0", [job, msgspec.structs.replace(job, id="j2", seq=8)]),
        JobsCreated(msgspec.structs.replace(job, id="", seq=0), ["a", "b"], [b"x", b"y"]),
    ]


def test_records_of_an_older_log_decode() -> None:
    """A JobCreated written before ``expires``, ``limit_key`` and ``headers``
    lacks them in the middle of its array: it still reads, with them None."""
    for record in _old_records():
        code, body = legacy_body(record)
        assert body != encode_record(record)[1]
        assert decode_record(code, body) == record, type(record).__name__


def test_an_older_log_replays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from corral.broker import log as log_module
    from corral.broker.log import Log

    monkeypatch.setattr(log_module, "encode_record", legacy_body)
    old = Log(tmp_path, fsync="never", segment_size=2**20, reserve=2**14)
    assert list(old.replay()) == []
    records = _old_records()
    for record in records:
        old.append(record)
    old.commit(time.monotonic())
    old.close()
    monkeypatch.undo()
    again = Log(tmp_path, fsync="never", segment_size=2**20, reserve=2**14)
    assert list(again.replay()) == records
    again.close()


HOUR = 3600.0
STEPS = [pytest.param(-HOUR, id="back"), pytest.param(HOUR, id="forward")]


def expiry_times(broker: InProcessBroker, ids: list[str], seconds: float) -> dict[str, float]:
    """Let ``seconds`` pass, a pass a second; when (monotonic seconds from
    now) each of ``ids`` expired, for those that did."""
    start = broker.clock.mono
    when: dict[str, float] = {}
    for _ in range(round(seconds)):
        broker.advance(1.0, step=1.0)
        for job_id in ids:
            if job_id not in when and expired(broker.job(job_id)):
                when[job_id] = broker.clock.mono - start
    return when


def expiring_jobs(broker: InProcessBroker) -> list[str]:
    """Each kind of deadline, 60 s wide: seconds from the enqueue (a
    pristine job, and one that keeps its own record), seconds from a delay's
    end, seconds from an explicit run_at, an absolute time."""
    now = broker.clock.time()
    broker.enqueue(id="rel", expires=60.0)
    broker.enqueue(id="rel-own", expires=60.0, headers={"h": "v"})
    broker.enqueue(id="delayed", delay=30.0, expires=60.0)
    broker.enqueue(id="at", run_at=now + 30.0, expires=60.0)
    broker.enqueue(id="abs", expires=datetime.fromtimestamp(now + 60.0, UTC))
    return ["rel", "rel-own", "delayed", "at", "abs"]


@pytest.mark.parametrize("step", STEPS)
def test_expires_in_seconds_keeps_its_length_across_a_step(tmp_path: Path, step: float) -> None:
    """As a ``delay`` does: a window asked for as seconds from the enqueue
    (or from a delay's end, which the step moves too) keeps its length
    when the wall clock steps either way; one that names a wall time (an
    absolute ``expires``, or seconds after an explicit ``run_at``) stays on
    the wall clock."""
    broker = InProcessBroker(tmp_path, extra=SMALL_LOG)
    ids = expiring_jobs(broker)
    broker.advance(10.0, step=1.0)
    broker.clock.jump(step)
    when = expiry_times(broker, ids, 120.0)
    assert when["rel"] == when["rel-own"] == pytest.approx(50.0, abs=1.0)
    assert when["delayed"] == pytest.approx(80.0, abs=1.0)
    if step > 0:  # the wall times passed in the step: expired at once
        assert when["at"] == when["abs"] == pytest.approx(1.0)
    else:  # an hour more to wait
        assert "at" not in when and "abs" not in when
    broker.close()


@pytest.mark.parametrize("compacted", [False, True])
def test_expires_in_seconds_keeps_its_length_across_a_step_and_a_restart(
    tmp_path: Path, compacted: bool
) -> None:
    """The step is logged, so a replay moves the deadlines as the live
    broker did, also from a compacted log."""
    clock = FakeClock()
    first = InProcessBroker(tmp_path, clock=clock, extra=SMALL_LOG)
    ids = expiring_jobs(first)
    first.advance(10.0, step=1.0)
    clock.jump(HOUR)
    first.advance(1.0)
    if compacted:
        first.core.log.compact(first.core.state.snapshot())
    first.crash()
    second = InProcessBroker(tmp_path, clock=clock, extra=SMALL_LOG)
    when = expiry_times(second, ids, 120.0)
    assert when["rel"] == when["rel-own"] == pytest.approx(49.0, abs=1.0)
    assert when["delayed"] == pytest.approx(79.0, abs=1.0)
    # (expired before the restart)
    assert expired(second.job("at")) and expired(second.job("abs"))
    second.close()
