"""Helpers for compaction tests: a broker with jobs in every status, churn
that grows the log without growing the live jobs, the state a replay of the
log gives, and the compaction's child held still (SIGSTOP)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import msgspec
from conftest import wait_for
from inproc import SMALL_LOG, FakeWorker, InProcessBroker, deliveries

from corral.broker import protocol as p
from corral.broker.compactor import Compactor
from corral.broker.log import Log
from corral.broker.records import encode_record
from corral.broker.state import JobState

#: Small segments; compaction once 256 KiB were written since the last one.
EXTRA = SMALL_LOG + '\ncompact_min_size = "256KiB"'


def log_dir(broker: InProcessBroker) -> Path:
    return broker.state_dir / "log"


def snapshot_of(state: JobState) -> list[tuple[int, bytes]]:
    """A state in comparable form: its snapshot records, encoded."""
    return [encode_record(r) for r in state.snapshot()]


def replayed(broker: InProcessBroker, scratch: Path) -> JobState:
    """The state a replay of ``broker``'s log gives at the broker's time now
    (of a copy: the broker's own log stays open), without a start's
    recovery records."""
    copy = scratch / "copy"
    shutil.rmtree(copy, ignore_errors=True)
    copy.mkdir(parents=True)
    for path in log_dir(broker).iterdir():
        with contextlib.suppress(FileNotFoundError):  # a stale segment removed meanwhile
            shutil.copy(path, copy / path.name)
    state = JobState(broker.core.compactor.defaults)
    log = Log(copy, fsync="never", segment_size=1 << 20, reserve=16 << 10)
    for record in log.replay():
        state.apply(record)
    log.close()
    state.promote_due(broker.clock.time())  # as the live broker's tick did, unlogged
    return state


def populate(broker: InProcessBroker) -> FakeWorker:
    """Jobs in every status, a chain and a chord, a paused queue, a unique
    key; two jobs left running under a worker."""
    for i in range(40):
        broker.enqueue(payload="x" * 500, id=f"q{i}")
    broker.enqueue(id="later", delay=3600)
    broker.enqueue(id="uniq", queue="other", unique_key="k")
    steps = [p.JobSpec(f"c{i}", "t.step") for i in range(3)]
    broker.request(p.EnqueueFlow(broker.next_req(), "chain-1", "chain", steps))
    members = [p.JobSpec(f"g{i}", "t.member") for i in range(2)]
    callback = p.JobSpec("g-cb", "t.cb")
    broker.request(p.EnqueueFlow(broker.next_req(), "group-1", "group", members, callback))
    broker.request(p.Pause(broker.next_req(), "other"))
    worker = FakeWorker(broker, credit=6)
    ds = {d.job_id: d for d in worker.ready()}
    assert sorted(ds) == [f"q{i}" for i in range(6)]
    for d in ds.values():
        worker.start(d)
    worker.finish(ds["q0"], "ok", {"answer": 42})
    worker.finish(ds["q1"], "error", error=p.ErrorInfo("E", "try again"))
    worker.finish(ds["q2"], "fail", error=p.ErrorInfo("E", "no"))
    broker.request(p.Cancel(broker.next_req(), "q3"))
    return worker  # q4 and q5 still run


def result_of(raw: msgspec.Raw | None) -> Any:
    """A job's result, decoded (a compacted job keeps "no result" as nil)."""
    return None if raw is None else msgspec.msgpack.decode(raw)


def churn(broker: InProcessBroker, until: Any, batch: int = 50) -> None:
    """Enqueue and purge jobs of a queue no one reads until ``until()``."""
    for round_ in range(1000):
        if until():
            return
        specs = [
            p.JobSpec(f"churn-{round_}-{n}", "t.churn", p.encode_value("c" * 400), queue="churn")
            for n in range(batch)
        ]
        assert isinstance(broker.request(p.Enqueue(broker.next_req(), specs)), p.EnqueueOk)
        broker.request(p.Purge(broker.next_req(), "churn"))
    raise AssertionError("churning never got there")


def stopped_child(compactor: Compactor) -> subprocess.Popen[bytes]:
    """The running compaction's child, stopped (SIGSTOP) so that what the
    test does next happens while the compaction is under way."""
    child = compactor.child
    assert child is not None
    os.kill(child.pid, signal.SIGSTOP)
    return child


def until_compacted(broker: InProcessBroker, count: int = 1) -> None:
    """Run passes until ``count`` compactions were installed (the broker
    polls its child on each pass, never waiting)."""

    def done() -> bool:
        broker.run_pass()
        return broker.core.stats["compactions"] >= count

    wait_for(done, 60, interval=0.01, message=f"{count} compaction(s)")


def during(broker: InProcessBroker, worker: FakeWorker) -> list[str]:
    """Changes made after the cut, while the child runs: new jobs, a result,
    a cancel, a queue resumed. Returns the new ids."""
    ids = [broker.enqueue(payload=i, id=f"during-{i}") for i in range(5)]
    d = next(d for d in deliveries(broker.to_worker(worker.identity)) if d.job_id == "q4")
    worker.finish(d, "ok", "late but fine")
    broker.request(p.Cancel(broker.next_req(), "later"))
    broker.request(p.Pause(broker.next_req(), "other", False))
    return ids
