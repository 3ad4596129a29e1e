"""A job that ends while its worker registers again with a restarted broker
runs once, whatever the interleaving of the handler thread (``_end``) and
the socket thread (``_register``): the READY offers the job back, or its
outcome reaches the broker before the READY. (Issue 12: a job the worker
finished was in neither, and the new broker requeued it as one "its holder
no longer has", so it ran twice.)

The real worker runtime (its methods, called on this thread at each point
the other thread could run) and its real DEALER; a ROUTER in the broker's
place hands what the worker sent, in order, to an in-process broker with
the real log, killed and started again in between (tests/inproc.py)."""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

import pytest
import zmq
from inproc import SMALL_LOG, InProcessBroker

import corral
from corral.broker import protocol as p
from corral.broker.clock import FakeClock
from corral.broker.core import WORKER
from corral.transport import connect_dealer
from corral.workers.registry import Registry
from corral.workers.runtime import Worker, WorkerOptions, _command

SENTINEL = p.encode(p.WorkerHeartbeat())


class Wire:
    """A ROUTER bound where ``worker`` connects: :meth:`pump` hands the
    broker everything the worker sent so far, in order; :meth:`back` gives
    the worker what the broker sent it."""

    def __init__(self, path: Path) -> None:
        self.endpoint = f"ipc://{path}/wire.sock"
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(self.endpoint)
        self._seen = 0

    def pump(self, worker: Worker, broker: InProcessBroker) -> list[Any]:
        """Everything ``worker`` sent up to now goes to ``broker`` in one
        pass (a heartbeat sent after it marks the end, and is kept back);
        returns what the worker sent, decoded."""
        assert worker._sock is not None
        worker._sock.send(SENTINEL)  # after everything sent before it, on the same pipe
        frames: list[list[bytes]] = []
        deadline = time.monotonic() + 30
        while True:
            assert self.router.poll(max(1, int((deadline - time.monotonic()) * 1000)))
            identity, body = self.router.recv_multipart()
            if identity == worker._identity and body == SENTINEL:
                break
            frames.append([identity, body])
        broker.run_pass(*[(WORKER, f) for f in frames])
        return [p.decode(p.worker_report_decoder, f[1]) for f in frames]

    def back(self, worker: Worker, broker: InProcessBroker) -> None:
        """What ``broker`` sent ``worker`` since the last call, handled by it."""
        sent = broker.workers.sent
        for identity, body in sent[self._seen :]:
            if identity == worker._identity:
                worker._handle(_command(body))
        self._seen = len(sent)

    def close(self) -> None:
        self.router.close()
        self.ctx.term()


def job(ctx: corral.JobContext) -> str:
    return "done"


@contextlib.contextmanager
def at_line(code: CodeType, line: int | None, action: Callable[[], None]) -> Iterator[list[int]]:
    """Run ``action`` once, as the other thread would, just before this
    thread runs line ``line`` of ``code``, or after it all if this thread
    never runs that line (None); yields the lines of ``code`` this thread
    ran, in order."""
    ran: list[int] = []

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line":
            ran.append(frame.f_lineno)
            if frame.f_lineno == line and ran.count(line) == 1:
                action()  # (a trace function's own calls are not traced)
        return local

    def calls(frame: FrameType, event: str, arg: Any) -> Any:
        return local if frame.f_code is code else None

    old = sys.gettrace()
    sys.settrace(calls)
    try:
        yield ran
    finally:
        sys.settrace(old)
    if line not in ran:  # the other thread's step came after this one
        action()


class Scenario:
    """A worker runs job ``j`` leased by a broker that is then killed; a
    new broker starts from its log, and the worker registers again with it
    (asked to, or on a new connection) around the moment ``j`` ends."""

    def __init__(self, path: Path, reconnect: bool) -> None:
        self.reconnect = reconnect
        self.clock = FakeClock()
        self.path = path
        path.mkdir()
        self.wire = Wire(path)
        fn = corral.task(name="t.h")(job)
        # (a connect waits up to a heartbeat interval for the socket to connect)
        options = WorkerOptions(
            self.wire.endpoint, ["default"], concurrency=1, prefetch=1, heartbeat_interval=5.0
        )
        self.worker = Worker(options, Registry([fn.__corral_task__]))  # type: ignore[attr-defined]
        self.first = InProcessBroker(path, clock=self.clock, extra=SMALL_LOG)
        self.second: InProcessBroker | None = None

    def run(self, side: str, line: int | None) -> list[int]:
        """Run it, the other thread's step taken whole just before this
        thread runs line ``line`` (None: after) of its step: ``side``
        "end", the handler's ``_end`` (the other: the socket thread
        registers); "register", the socket thread's ``_register`` (the
        other: the handler ends the job). Returns the lines of that step
        run, in order."""
        worker, first = self.worker, self.first
        worker._connect()
        assert [type(m) for m in self.wire.pump(worker, first)] == [p.Ready]
        first.enqueue("t.h", id="j")
        self.wire.back(worker, first)
        assert len(worker._buffer) == 1
        delivery = worker._next_delivery()
        assert delivery is not None and delivery.job_id == "j"
        execution = worker._execution(delivery)
        assert worker._claim(execution)
        worker._begin(execution)
        worker._flush_outbox()
        self.wire.pump(worker, first)  # the start is in the log
        outcome = worker._soft.run(execution, None, None)
        first.crash()
        second = self.second = InProcessBroker(self.path, clock=self.clock, extra=SMALL_LOG)

        def register() -> None:
            if self.reconnect:  # it had found the broker silent
                worker._reconnect(time.monotonic())
                worker._connect()
            else:
                worker._handle(p.Reregister(second.core.broker_id))

        def end() -> None:
            worker._end(execution, outcome)

        if side == "end":
            with at_line(Worker._end.__code__, line, register) as ran:
                end()
        else:
            with at_line(Worker._register.__code__, line, end) as ran:
                register()
        worker._flush_outbox()  # the socket thread sends what is left
        self.sent = self.wire.pump(worker, second)
        self.wire.back(worker, second)
        second.advance(second.core.dispatcher.reclaim_window + 1.0)
        return ran

    def verdict(self) -> tuple[str, int, int, int]:
        """j's status and attempts, the redeliveries and late results."""
        assert self.second is not None
        info = self.second.job("j")
        assert info is not None
        stats = self.second.core.stats
        return info.status, info.attempts, stats["redelivered"], stats["late_results"]

    def close(self) -> None:
        for broker in (self.first, self.second):
            if broker is not None:
                with contextlib.suppress(Exception):
                    broker.close()
        if self.worker._sock is not None:
            self.worker._sock.close(0)
        self.worker._ctx.term()
        os.close(self.worker._wake_fd)
        self.wire.close()


@pytest.mark.parametrize("reconnect", [False, True], ids=["reregister", "reconnect"])
@pytest.mark.parametrize("side", ["end", "register"])
def test_a_job_ending_as_its_worker_registers_again_runs_once(
    tmp_path: Path, reconnect: bool, side: str
) -> None:
    """At every line of one thread's step (``side``), the other thread's
    step runs whole: the job ends succeeded, tried once, never handed out
    again, no outcome comes late."""
    # A run with the other step after this one names the lines to try.
    probe = Scenario(tmp_path / "probe", reconnect)
    try:
        lines = probe.run(side, None)
        assert probe.verdict() == ("succeeded", 1, 0, 0)
    finally:
        probe.close()
    assert len(set(lines)) > 3, lines
    wrong = {}
    for line in sorted(set(lines)):
        scenario = Scenario(tmp_path / f"at{line}", reconnect)
        try:
            scenario.run(side, line)
            got = scenario.verdict()
        finally:
            scenario.close()
        if got != ("succeeded", 1, 0, 0):
            wrong[line] = got
    assert not wrong, f"(status, attempts, redelivered, late_results) by line: {wrong}"


def test_no_ready_goes_ahead_of_an_outcome_the_socket_did_not_take(tmp_path: Path) -> None:
    """The broker comes up while the worker registers: the outcome the
    socket refused a moment before (nobody connected) still goes before
    any READY, or the broker would requeue that job as one the worker no
    longer has. The READY waits for the broker's Reregister."""
    endpoint = f"ipc://{tmp_path}/w.sock"
    worker = Worker(WorkerOptions(endpoint, ["default"], heartbeat_interval=1.0), Registry())
    worker._identity = b"w-1"
    worker._sock = connect_dealer(worker._ctx, endpoint, None, identity=worker._identity)
    router = worker._ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    worker._outbox.append(("done", p.Outcome("j", 7, "ok")))

    def broker_comes_up() -> None:
        router.bind(endpoint)
        assert worker._sock is not None and worker._sock.poll(30_000, zmq.POLLOUT)

    source, first = inspect.getsourcelines(Worker._register)
    ready = first + next(n for n, text in enumerate(source) if "p.Ready(" in text) - 1
    try:
        with at_line(Worker._register.__code__, ready, broker_comes_up):
            worker._register()
        worker._flush_outbox()  # the next pass of the socket thread
        got = []
        while router.poll(500):
            got.append(p.decode(p.worker_report_decoder, router.recv_multipart()[1]))
        kinds = [type(m).__name__ for m in got]
        assert "Report" in kinds, kinds
        assert kinds.index("Report") < (kinds.index("Ready") if "Ready" in kinds else len(kinds))
    finally:
        worker._sock.close(0)
        router.close()
        worker._ctx.term()
        os.close(worker._wake_fd)


def test_the_last_job_under_max_jobs_drains_the_worker_before_its_report(tmp_path: Path) -> None:
    """Whenever the socket thread sends the outcome of the worker's last
    job (max_jobs) during ``_end``, the worker's Drain goes before that
    report, so the credit it gives back brings no job this worker would
    not run."""
    fn = corral.task(name="t.h")(job)
    registry = Registry([fn.__corral_task__])  # type: ignore[attr-defined]
    delivery = p.Delivery("j", 7, "t.h", p.encode_value(None), 1, 3, "default", 0.0)

    def last_job(line: int | None) -> tuple[list[int], list[str]]:
        endpoint = f"ipc://{tmp_path}/m{line}.sock"
        worker = Worker(WorkerOptions(endpoint, ["default"], max_jobs=1), registry)
        router = worker._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.bind(endpoint)
        worker._identity = b"w-1"
        worker._sock = connect_dealer(worker._ctx, endpoint, None, identity=worker._identity)
        try:
            assert worker._sock.poll(30_000, zmq.POLLOUT)
            worker._buffer.put(delivery)
            taken = worker._next_delivery()
            assert taken is not None
            execution = worker._execution(taken)
            assert worker._claim(execution)
            worker._begin(execution)
            outcome = worker._soft.run(execution, None, None)
            with at_line(Worker._end.__code__, line, worker._flush_outbox) as ran:
                worker._end(execution, outcome)
            worker._flush_outbox()
            sent: list[str] = []
            while "outcome" not in sent:  # (what went before it is here by then)
                assert router.poll(30_000), sent
                m = p.decode(p.worker_report_decoder, router.recv_multipart()[1])
                sent.append("outcome" if isinstance(m, p.Report) and m.done else type(m).__name__)
            return ran, sent
        finally:
            worker._sock.close(0)
            router.close()
            worker._ctx.term()
            os.close(worker._wake_fd)

    lines, _ = last_job(None)
    for line in sorted(set(lines)):
        _, sent = last_job(line)
        assert "Drain" in sent and sent.index("Drain") < sent.index("outcome"), (line, sent)
