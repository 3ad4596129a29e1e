"""NaN and the infinities are refused in every float field a peer sends.

The fields are found by introspection (:func:`corral.broker.wirepath.float_paths`
over both inbound unions), so a float added to any message is covered the
day it is added: the test fails until its message has a sample below.
"""

from __future__ import annotations

import math
import time
from typing import Any

import msgspec
import pytest
import zmq
from conftest import Env
from inproc import InProcessBroker
from structlog.testing import capture_logs

import corral
from corral.broker import protocol as p
from corral.broker.core import WORKER
from corral.broker.wirepath import float_paths

BAD = [math.nan, math.inf, -math.inf]


def _spec(job_id: str = "job-2") -> p.JobSpec:
    return p.JobSpec(job_id, "t.task")


#: A valid message of each kind that holds floats, with every list along a
#: float's path non-empty and every optional struct along it set.
SAMPLES: dict[type, p.Msg] = {
    p.Enqueue: p.Enqueue(1, [_spec()]),
    p.EnqueueEach: p.EnqueueEach(1, [_spec()]),
    p.EnqueueFlow: p.EnqueueFlow(1, "flow-1", "chain", [_spec()], _spec("cb-1")),
    p.GetResult: p.GetResult(1, "job-1", 1.0),
    p.SupervisorReport: p.SupervisorReport(
        1,
        p.SupervisorInfo("host/1", "host", 1, [], [p.ProcessInfo("default", 0, 2, 1, [], 1.0)]),
    ),
    p.Ready: p.Ready("w", ["default"], 1, 1, [p.TaskInfo("t.task")], "host", 3),
    p.Report: p.Report([], [p.Outcome("job-1", 1, "ok")], progress=[p.Progress("job-1", 1, 0.5)]),
}


def _with(value: Any, path: tuple[str, ...], bad: float) -> Any:
    """``value`` with the float at ``path`` replaced by ``bad``."""
    if not path:
        return bad
    step, rest = path[0], path[1:]
    if step == "[]":
        return [_with(value[0], rest, bad), *value[1:]]
    return msgspec.structs.replace(value, **{step: _with(getattr(value, step), rest, bad)})


def _cases(union: Any) -> list[tuple[type, tuple[str, ...]]]:
    return list(float_paths(union))


CLIENT_FLOATS = _cases(p.ClientRequest)
WORKER_FLOATS = _cases(p.WorkerReport)


def _spelt(cls: type, path: tuple[str, ...]) -> str:
    """How the refusal names the field: ``Enqueue.jobs[0].delay``."""
    return cls.__name__ + "".join("[0]" if s == "[]" else f".{s}" for s in path)


def test_every_inbound_float_field_is_enumerated_and_sampled() -> None:
    # Both sides hold floats; every message class holding one has a sample.
    assert len(CLIENT_FLOATS) >= 10 and len(WORKER_FLOATS) >= 5
    for cls, _ in CLIENT_FLOATS + WORKER_FLOATS:
        assert cls in SAMPLES, f"{cls.__name__} holds a float: add a sample to SAMPLES"
    assert (p.GetResult, ("wait",)) in CLIENT_FLOATS
    assert (p.Report, ("progress", "[]", "fraction")) in WORKER_FLOATS


@pytest.mark.parametrize("bad", BAD, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(
    ("cls", "path"), CLIENT_FLOATS, ids=[_spelt(c, f) for c, f in CLIENT_FLOATS]
)
def test_client_float_fields_refuse_non_finite(
    tmp_path: Any, cls: type, path: tuple[str, ...], bad: float
) -> None:
    broker = InProcessBroker(tmp_path)
    try:
        broker.enqueue(id="job-1")
        msg = _with(SAMPLES[cls], path, bad)
        # the sample itself is accepted (only the bad float is refused)
        p.decode(p.client_request_decoder, p.encode(SAMPLES[cls]))
        reply = broker.request(msg, identity=b"hostile")
        assert isinstance(reply, p.ErrorReply), reply
        assert reply.code == "invalid"
        assert _spelt(cls, path) in reply.message
        assert "finite" in reply.message
        # the broker goes on serving, and nothing was parked or created
        assert isinstance(broker.request(p.Ping(2)), p.Pong)
        assert len(broker.core.waiters) == 0
        assert set(broker.core.state.jobs) == {"job-1"}
    finally:
        broker.close()


@pytest.mark.parametrize("bad", BAD, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(
    ("cls", "path"), WORKER_FLOATS, ids=[_spelt(c, f) for c, f in WORKER_FLOATS]
)
def test_worker_float_fields_refuse_non_finite(
    tmp_path: Any, cls: type, path: tuple[str, ...], bad: float
) -> None:
    broker = InProcessBroker(tmp_path)
    try:
        p.decode(p.worker_report_decoder, p.encode(SAMPLES[cls]))
        with capture_logs() as logs:
            broker.run_pass((WORKER, [b"hostile", p.encode(_with(SAMPLES[cls], path, bad))]))
        assert broker.core.stats["malformed_frames"] == 1
        (event,) = [e for e in logs if e["event"] == "broker.malformed_frame"]
        assert _spelt(cls, path) in event["reason"]
        assert "finite" in event["reason"]
        assert len(broker.core.dispatcher.workers) == 0  # not registered
    finally:
        broker.close()


def test_a_nan_wait_does_not_break_other_clients_long_polls(env: Env) -> None:
    """The issue's case, end to end: one GetResult with wait = NaN, then a
    real client's ``result(id, timeout=1)`` must end in ResultTimeout."""
    broker = env.start("broker")
    env.wait_ready(broker)
    client = env.client()
    job_id = client.enqueue("e2e.square", 3)  # no worker: it stays queued
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(env.endpoint)
    try:
        for bad in BAD:
            sock.send(msgspec.msgpack.encode(["getresult", 7, job_id, bad, p.PROTOCOL_VERSION]))
            assert sock.poll(10_000)
            reply = msgspec.msgpack.decode(sock.recv())
            assert reply[0] == "errorreply" and reply[2] == "invalid"
            assert "GetResult.wait" in reply[3]
        started = time.monotonic()
        with pytest.raises(corral.ResultTimeout):
            client.result(job_id, timeout=1)
        # a generous bound: the failure was BrokerUnavailable only after 3 s
        assert time.monotonic() - started < 10
        assert broker.alive()
        assert client.ping()
    finally:
        sock.close(0)
        ctx.term()
