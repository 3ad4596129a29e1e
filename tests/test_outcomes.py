"""Whatever a handler returns or raises becomes an outcome the broker can
read: texts that are not valid UTF-8, str() that raises, every kind of
BaseException, results msgpack cannot hold or that do not fit a report;
reports are cut to fit max_message_size."""

from __future__ import annotations

import itertools
import math
import os
import time
from typing import Any

import msgspec
import pytest
from conftest import Env

import corral
from corral.broker import protocol as p
from corral.workers.execute import REPORT_OVERHEAD, Execution
from corral.workers.registry import Registry
from corral.workers.reports import fit_reports


class BadStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


class Custom(BaseException):
    pass


def run_once(
    raises: BaseException | None = None, returns: Any = None, limit: int = 2**20
) -> p.Outcome:
    def handler(ctx: corral.JobContext, payload: Any) -> Any:
        if raises is not None:
            raise raises
        return returns

    fn = corral.task(name="t.h")(handler)
    registry = Registry([fn.__corral_task__])  # type: ignore[attr-defined]
    d = p.Delivery("job-1", 7, "t.h", p.encode_value(None), 1, 3, "default", 0.0)
    execution = Execution(d, registry, "w-1", max_message_size=limit)
    outcome = execution.run(lambda args: execution.call_sync(args, None))
    p.decode(p.worker_report_decoder, p.encode(p.Report([], [outcome])))  # it goes on the wire
    return outcome


def test_an_error_text_that_is_not_utf8_is_kept_escaped() -> None:
    name = os.fsdecode(b"report-\xe9t\xe9.csv")  # lone surrogates
    outcome = run_once(FileNotFoundError(name))
    assert outcome.kind == "error"
    assert outcome.error is not None and outcome.error.type == "FileNotFoundError"
    assert outcome.error.message == "report-\\udce9t\\udce9.csv"
    assert "FileNotFoundError" in outcome.error.traceback


def test_an_exception_whose_str_raises_is_named() -> None:
    outcome = run_once(BadStr())
    assert outcome.kind == "error" and outcome.error is not None
    assert outcome.error.type == "BadStr"
    assert outcome.error.message == "<str() of the BadStr raised RuntimeError>"


@pytest.mark.parametrize(
    "exc", [SystemExit(3), KeyboardInterrupt(), GeneratorExit(), Custom("odd")]
)
def test_every_base_exception_is_an_error_of_the_job(exc: BaseException) -> None:
    outcome = run_once(exc)
    assert outcome.kind == "error" and outcome.error is not None
    assert outcome.error.type == type(exc).__name__


def test_a_long_error_text_is_cut() -> None:
    outcome = run_once(ValueError("x" * 1_000_000))
    assert outcome.error is not None
    assert len(outcome.error.message) < 10_000 and "characters cut" in outcome.error.message


@pytest.mark.parametrize(
    ("value", "kind", "error"),
    [
        (2**64, "fail", "ResultNotSerializable"),
        (-(2**63) - 1, "fail", "ResultNotSerializable"),
        ({1j}, "fail", "ResultNotSerializable"),
        (os.fsdecode(b"\xff"), "fail", "ResultNotSerializable"),
        (2**64 - 1, "ok", None),
        (math.inf, "ok", None),
    ],
)
def test_a_result_msgpack_cannot_hold_fails_the_job(
    value: Any, kind: str, error: str | None
) -> None:
    outcome = run_once(returns=value)
    assert outcome.kind == kind
    assert (outcome.error.type if outcome.error else None) == error


def test_nan_is_a_result() -> None:
    outcome = run_once(returns=math.nan)
    assert outcome.kind == "ok" and math.isnan(msgspec.msgpack.decode(outcome.result))


def test_a_result_that_does_not_fit_a_report_fails_naming_size_and_limit() -> None:
    limit = 1024 * 1024
    outcome = run_once(returns="x" * limit, limit=limit)
    assert outcome.kind == "fail" and outcome.error is not None
    assert outcome.error.type == "ResultTooLarge"
    size = len(msgspec.msgpack.encode("x" * limit))
    assert f"is {size} bytes" in outcome.error.message
    assert f"{limit - REPORT_OVERHEAD} bytes" in outcome.error.message
    fits = run_once(returns="x" * (limit - REPORT_OVERHEAD - 10), limit=limit)
    assert fits.kind == "ok"


def outcome(job: str, size: int) -> p.Outcome:
    return p.Outcome(job, 1, "ok", msgspec.Raw(msgspec.msgpack.encode("y" * size)))


def test_reports_are_split_to_fit_and_keep_every_item_in_order() -> None:
    started = [p.Lease(f"s{i}", i) for i in range(5)]
    done = [outcome(f"d{i}", 30_000) for i in range(9)]
    progress = [p.Progress("s0", 1, 0.5, "half")]
    bodies = fit_reports(started, done, progress, 100_000)
    assert len(bodies) > 1 and all(len(b) <= 100_000 for b in bodies)
    reports = [p.decode(p.worker_report_decoder, b) for b in bodies]
    assert [le.job_id for r in reports for le in r.started] == [le.job_id for le in started]
    assert [o.job_id for r in reports for o in r.done] == [o.job_id for o in done]
    assert sum(len(r.progress) for r in reports) == 1
    # every start is in a report no later than the first outcome's
    first_done = next(i for i, r in enumerate(reports) if r.done)
    assert all(not r.started for r in reports[first_done + 1 :])


def test_an_outcome_that_alone_cannot_fit_becomes_a_failure_that_says_so() -> None:
    (body,) = fit_reports([], [outcome("big", 200_000)], [], 100_000)
    (done,) = p.decode(p.worker_report_decoder, body).done
    assert (done.job_id, done.kind) == ("big", "fail")
    assert done.error is not None and done.error.type == "ReportTooLarge"


def test_a_result_too_large_and_an_error_text_not_utf8_end_their_jobs_and_the_worker_goes_on(
    env: Env,
) -> None:
    env.write_config(processes=1, concurrency=1, prefetch=2)
    daemon = env.start("run")
    env.wait_ready(daemon)
    client = env.client(timeout=30)
    big = client.enqueue("e2e.big_result", 20)
    odd = client.enqueue("e2e.odd_error")
    after = client.enqueue("e2e.square", 7)
    with pytest.raises(corral.JobFailed) as failed:
        client.result(big, timeout=60)
    assert failed.value.error.type == "ResultTooLarge"
    assert "over the" in failed.value.error.message and "bytes" in failed.value.error.message
    assert client.job(big).attempts == 1  # not retried
    with pytest.raises(corral.JobFailed) as failed:
        client.result(odd, timeout=60)
    assert failed.value.error.type == "FileNotFoundError"
    assert failed.value.error.message == "report-\\udce9t\\udce9.csv"
    info = client.job(odd)
    assert (info.status, info.attempts) == ("failed", 2)
    assert client.result(after, timeout=30) == 49
    (worker,) = client.status().workers
    assert worker.running == [] and worker.credit == 3  # every slot came back
    assert "worker.socket_error" not in daemon.output()


def test_retry_requests_are_bounded_and_each_run_has_its_number(env: Env) -> None:
    # Retry() with no delay, from a task with max_retries=3 and a 50 ms
    # backoff: 4 runs numbered 1 to 4, then the job fails; not thousands.
    env.write_config(processes=1)
    daemon = env.start("run")
    env.wait_ready(daemon)
    client = env.client()
    runs = env.home / "runs"
    job_id = client.enqueue("e2e.always_retry", str(runs))
    with pytest.raises(corral.JobFailed) as failed:
        client.result(job_id, timeout=60)
    assert failed.value.error.type == "RetryLimit"
    assert runs.read_text().split() == ["1", "2", "3", "4"]
    info = client.job(job_id)
    assert [t.attempt for t in info.tries] == [1, 2, 3, 4]
    assert info.attempts == 1  # only the last run, which failed, counts
    started = [t.started_at for t in info.tries]
    gaps = [b - a for a, b in itertools.pairwise(started)]
    assert all(g >= 0.025 for g in gaps)  # each waited at least half the backoff
    (worker,) = client.status().workers
    assert worker.failed == 1  # the job's one failure, not each Retry


def test_a_report_the_socket_cannot_take_is_kept_and_sent_first_later(tmp_path: Any) -> None:
    """EAGAIN (no broker connected yet, or a full queue): the encoded report
    waits in order and goes out before anything newer; nothing is dropped."""
    import zmq

    from corral.transport import connect_dealer
    from corral.workers.runtime import Worker, WorkerOptions

    endpoint = f"ipc://{tmp_path}/w.sock"
    worker = Worker(WorkerOptions(endpoint=endpoint, queues=["default"]), Registry())
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    try:
        worker._sock = connect_dealer(ctx, endpoint, None)  # nobody there: EAGAIN
        first = p.Return([p.Lease("a", 1)])
        worker._send(first, keep=True)
        worker._send(p.WorkerHeartbeat())  # a heartbeat is not kept
        assert list(worker._unsent) == [p.encode(first)]
        router.bind(endpoint)
        worker._outbox.append(("return", p.Lease("b", 2)))
        deadline = time.monotonic() + 30
        while worker._unsent or worker._outbox:
            assert time.monotonic() < deadline, "the kept report was never sent"
            worker._flush_outbox()
            time.sleep(0.01)
        got = []
        while len(got) < 2 and router.poll(10_000):
            got.append(p.decode(p.worker_report_decoder, router.recv_multipart()[1]))
        assert [[le.job_id for le in m.leases] for m in got] == [["a"], ["b"]]
    finally:
        if worker._sock is not None:
            worker._sock.close(0)
        router.close()
        ctx.term()
        os.close(worker._wake_fd)


def test_a_retry_keeps_its_reason_on_the_try() -> None:
    outcome = run_once(corral.Retry(delay=5, reason="rate limited"))
    assert (outcome.kind, outcome.delay) == ("retry", 5)
    assert outcome.error is not None and outcome.error.message == "rate limited"
    plain = run_once(corral.Retry())
    assert plain.error is not None
    assert plain.error.message == "retry requested after the task's backoff"


def test_a_small_max_message_size_still_carries_results() -> None:
    """At a broker.max_message_size of 64 KiB or less (the config takes
    16 KiB up), no result fitted: the room kept for a report's other
    fields was all of it, and even None failed as ResultTooLarge."""
    for limit in (16 * 1024, 60 * 1024, 64 * 1024):
        assert run_once(returns=None, limit=limit).kind == "ok"
        half = run_once(returns="x" * (limit // 2), limit=limit)
        assert half.kind == "ok", half.error
        report = fit_reports([], [half], [], limit)
        assert len(report) == 1 and len(report[0]) <= limit
