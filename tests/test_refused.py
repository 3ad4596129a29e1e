"""A worker message the broker cannot decode is answered, not dropped: the
broker sends a Refused (within a budget, however fast a peer sends), the
worker whose READY was refused logs why and exits with its own code
(EXIT_REFUSED), and its supervisor takes that for a configuration fault:
the pool backs off at once, naming the reason in `corral status`."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import msgspec
import pytest
from conftest import CLI_POLL, Env, wait_for
from inproc import FakeWorker, InProcessBroker
from test_restarts import limit

from corral.broker import protocol as p
from corral.broker.core import WORKER
from corral.broker.logbudget import BURST, RATE
from corral.supervisor.restarts import RestartLimit
from corral.workers.runtime import EXIT_REFUSED


def _ready(**task: object) -> p.Ready:
    return p.Ready("w-1", ["default"], 2, 1, [p.TaskInfo("t.task", **task)], "h", 1)  # type: ignore[arg-type]


def _refusals(broker: InProcessBroker, identity: bytes) -> list[p.Refused]:
    return [m for m in broker.to_worker(identity) if isinstance(m, p.Refused)]


def test_a_ready_the_broker_cannot_decode_is_answered_with_why(tmp_path: Path) -> None:
    broker = InProcessBroker(tmp_path)
    frame = p.encode(_ready(timeout=float("nan")))
    broker.run_pass((WORKER, [b"w-1", frame]))
    (refused,) = _refusals(broker, b"w-1")
    assert refused.refused_op == "ready"
    assert "Ready.tasks[0].timeout" in refused.reason, refused.reason
    assert broker.core.stats["malformed_frames"] == 1
    # not registered: no worker in the status
    assert not broker.core.service.status(0.0, 0.0).workers


def test_any_unreadable_worker_frame_is_answered(tmp_path: Path) -> None:
    broker = InProcessBroker(tmp_path)
    broker.run_pass((WORKER, [b"w-2", b"\xc1garbage"]))
    broker.run_pass((WORKER, [b"w-3", p.encode(msgspec.structs.replace(p.Drain(), v=99))]))
    broker.run_pass((WORKER, [b"w-4", b"a", b"b"]))
    (garbage,) = _refusals(broker, b"w-2")
    assert garbage.refused_op == "" and garbage.reason
    (version,) = _refusals(broker, b"w-3")
    assert version.refused_op == "drain" and "version 99" in version.reason
    (frames,) = _refusals(broker, b"w-4")
    assert "frames" in frames.reason


def test_refusals_are_budgeted_however_fast_a_peer_sends(tmp_path: Path) -> None:
    broker = InProcessBroker(tmp_path)
    flood = [(WORKER, [f"p-{i}".encode(), b"\xc1"]) for i in range(3 * BURST)]
    broker.run_pass(*flood)
    sent = [b for _, b in broker.workers.sent]
    assert len(sent) == BURST
    assert all(len(body) < 1200 for body in sent)
    assert broker.core.stats["refusals_suppressed"] == 2 * BURST
    broker.clock.advance(1.0)
    broker.run_pass(*flood)
    assert len(broker.workers.sent) - BURST <= RATE + 1


def test_a_refusal_of_another_protocol_version_is_still_read() -> None:
    """A worker reads a Refused whatever version the broker speaks: its
    tag and first two fields are the whole contract."""
    future = msgspec.structs.replace(p.Refused("ready", "why"), v=p.PROTOCOL_VERSION + 1)
    got = p.refusal(p.encode(future))
    assert got is not None and (got.refused_op, got.reason) == ("ready", "why")
    assert p.refusal(p.encode(p.Reregister())) is None
    assert p.refusal(b"\xc1") is None
    assert p.refusal(msgspec.msgpack.encode(["refused", 7])) is None


def test_a_config_fault_backs_the_pool_off_at_once_and_once() -> None:
    r: RestartLimit = limit(max_restarts=5)
    r.config_fault(0, 10.0, cause="the broker refused this worker's READY: x")
    assert r.backing_off(10.0) and not r.may_start(1, 50.0)
    assert r.state(10.0).endswith("the broker refused this worker's READY: x")
    until = r.backing_off_until
    r.config_fault(1, 11.0, cause="the broker refused this worker's READY: x")  # its sibling
    assert r.backing_off_until == until  # the same fault: no second trip, no doubling
    assert not r.backing_off(until) and r.may_start(0, until)


def test_a_worker_whose_ready_is_refused_exits_and_its_pool_backs_off(env: Env) -> None:
    env.write_config(processes=2, plugins='["refused_tasks"]')
    daemon = env.start("run")
    env.wait_ready(daemon)

    def pool_line() -> str:
        """The pool's line in `corral status` ("" before its supervisor's
        first report)."""
        done = env.run("status", "-c", str(env.config))
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        return next((ln for ln in lines if ln.strip().startswith("pool default")), "")

    wait_for(
        lambda: "backing off until" in pool_line(), 30, CLI_POLL, message="the pool to back off"
    )
    line = pool_line()
    assert "the broker refused this worker's READY" in line and "timeout" in line, line
    events = [json.loads(ln) for ln in daemon.output().splitlines() if ln.startswith("{")]
    refused = [e for e in events if e.get("event") == "worker.refused"]
    assert refused and "Ready.tasks[0].timeout" in refused[0]["reason"], refused
    assert "hint" in refused[0]
    exits = [e for e in events if e.get("event") == "supervisor.worker_exited"]
    assert exits and all(f"code {EXIT_REFUSED}" in e["how"] for e in exits), exits
    # no crash loop: each slot started once, then the pool waits (pool_backoff)
    starts = sum(1 for e in events if e.get("event") == "worker.started")
    assert starts <= 2, starts
    assert daemon.alive() and not env.client().status().workers


def test_a_registered_worker_whose_refusal_is_suppressed_is_dropped_and_its_job_charged(
    tmp_path: Path,
) -> None:
    """A worker told nothing of its refused report (the budget was spent by
    a flood) would hold its jobs for ever: the broker drops it, and its
    started job is charged a try that says why."""
    broker = InProcessBroker(tmp_path)
    job_id = broker.enqueue("t.task")
    worker = FakeWorker(broker, b"w-9")
    (d,) = worker.ready()
    worker.start(d)
    flood = [(WORKER, [f"p-{i}".encode(), b"\xc1"]) for i in range(2 * BURST)]
    broker.run_pass(*flood)
    broker.run_pass((WORKER, [b"w-9", b"\xc1garbage"]))
    assert not _refusals(broker, b"w-9")  # suppressed
    assert not broker.core.service.status(0.0, 0.0).workers
    info = broker.job(job_id)
    assert info is not None and info.status in ("queued", "retrying"), info
    (tried,) = info.tries
    assert tried.error is not None and tried.error.type == "WorkerLost", tried
    assert "could not be read" in tried.error.message, tried.error.message


def test_a_pool_refused_then_fixed_recovers_on_reload(env: Env) -> None:
    """A refused READY -> exit 78 -> the pool backs off (the job waits) ->
    the cause fixed in the config -> SIGHUP -> the pool runs the job at
    once, without waiting out its back-off. (Not preloaded: the test's
    plugin patches corral itself, which a supervisor that imported it
    would keep across the reload; a real plugin is imported afresh.)"""
    env.write_config(plugins='["refused_tasks", "e2e_tasks"]', extra_pool="preload = false")
    daemon = env.start("run")
    env.wait_ready(daemon)
    client = env.client()
    job_id = client.enqueue("e2e.square", 6)
    wait_for(lambda: '"supervisor.pool_backing_off"' in daemon.output(), 30, message="the back-off")
    assert client.job(job_id).status == "queued"
    env.write_config(plugins='["e2e_tasks"]', extra_pool="preload = false")
    daemon.signal(signal.SIGHUP)
    assert client.result(job_id, timeout=30) == 36
    wait_for(
        lambda: [pool.state for s in client.status().supervisors for pool in s.pools] == ["ok"],
        15,
        message="the pool to say ok",
    )


def test_a_worker_message_the_broker_fails_on_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in handling a worker's report lost what it said of its jobs
    (logged as broker.handler_error, the worker told nothing: its jobs
    leased to it for ever). The worker is answered with a Refused naming
    the bug, so it exits and its jobs are charged and handed out again."""
    broker = InProcessBroker(tmp_path)
    broker.enqueue("t.task")
    worker = FakeWorker(broker, b"w-7")
    (d,) = worker.ready()

    def broken(*args: object) -> None:
        raise KeyError("boom")

    monkeypatch.setattr(broker.core.dispatcher, "_report", broken)
    got = worker.finish(d)
    (refused,) = [m for m in got if isinstance(m, p.Refused)]
    assert refused.refused_op == "report", refused
    assert "KeyError" in refused.reason and "broker.handler_error" in refused.reason
    assert broker.core.stats["handler_errors"] == 1
