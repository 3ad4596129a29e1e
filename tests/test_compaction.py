"""Compaction off the broker's loop: the broker seals its log, a real child
process rewrites the history before the cut, the broker switches to the new
base with one rename. Tested on the real core, log and child process (a
fake clock drives the broker's time): the state replayed from disk equals
the live one, with appends made during the compaction; a restart at each
point of a compaction (the child killed, the broker killed before the
switch, between the rename and the removal of old segments, after it)
loses nothing acknowledged and runs nothing twice; a failed compaction is
tried again with backoff while the broker serves on."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import msgspec
import pytest
import structlog
from conftest import wait_for
from inproc import SMALL_LOG, FakeWorker, InProcessBroker, deliveries

from corral.broker import protocol as p
from corral.broker.compactor import RETRY_MIN, Compactor
from corral.broker.framing import seg_path
from corral.broker.log import Log
from corral.broker.records import encode_record
from corral.broker.state import TERMINAL, JobState
from corral.cli import main as cli_main

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
    shutil.copytree(log_dir(broker), copy)
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


def test_the_broker_compacts_in_a_child_and_a_replay_gives_the_live_state(
    tmp_path: Path,
) -> None:
    broker = InProcessBroker(tmp_path / "state", extra=EXTRA)
    worker = populate(broker)
    before = len(list(log_dir(broker).glob("*.seg")))
    compactor = broker.core.compactor
    with structlog.testing.capture_logs() as logs:
        churn(broker, lambda: compactor.running)
        cut = compactor.cut
        assert cut is not None
        child = stopped_child(compactor)
        during(broker, worker)
        assert compactor.running  # the loop went on without it
        os.kill(child.pid, signal.SIGCONT)
        until_compacted(broker)
    assert [e["event"] for e in logs if "compact" in e["event"]] == [
        "broker.compaction_started",
        "broker.compacted",
    ]
    # the new base sits where the cut was; every older segment is gone
    segs = sorted(log_dir(broker).glob("*.seg"))
    assert segs[0] == seg_path(log_dir(broker), cut.last)
    assert len(segs) < before + 10 and not list(log_dir(broker).glob("*.tmp"))
    assert snapshot_of(replayed(broker, tmp_path)) == snapshot_of(broker.core.state)
    assert broker.core.log.bytes_since_compaction < 256 * 1024
    broker.close()


POINTS = ["child_killed", "before_switch", "after_rename", "after_switch"]


@pytest.mark.parametrize("point", POINTS)
def test_a_restart_at_any_point_of_a_compaction_loses_nothing_and_runs_nothing_twice(
    tmp_path: Path, point: str
) -> None:
    broker = InProcessBroker(tmp_path / "state", extra=EXTRA)
    worker = populate(broker)
    compactor = broker.core.compactor
    churn(broker, lambda: compactor.running)
    child, cut = stopped_child(compactor), compactor.cut
    assert cut is not None
    new_ids = during(broker, worker)
    expected = {j.id: (j.status, result_of(j.result)) for j in broker.core.state.jobs.values()}
    os.kill(child.pid, signal.SIGCONT)
    if point == "child_killed":
        child.kill()
        wait_for(lambda: (broker.run_pass(), broker.core.stats["compactions_failed"])[1])
    elif point in ("before_switch", "after_rename"):
        wait_for(lambda: child.poll() is not None, 60, message="the child to finish")
        assert child.returncode == 0
        if point == "after_rename":  # the switch's rename, not the removals after it
            os.rename(cut.tmp, seg_path(log_dir(broker), cut.last))
    else:
        until_compacted(broker)
    broker.crash()

    again = InProcessBroker(tmp_path / "state", extra=EXTRA)
    segs = sorted(log_dir(again).glob("*.seg"))
    assert not list(log_dir(again).glob("*.tmp"))
    if point in ("after_rename", "after_switch"):
        assert segs[0] == seg_path(log_dir(again), cut.last)  # the stale ones went
    jobs = again.core.state.jobs
    assert set(new_ids) <= set(jobs)
    for job_id, (status, result) in expected.items():
        job = jobs[job_id]
        # a try under way when the broker died is not counted: the job is queued again
        assert job.status == ("queued" if status == "running" else status), job_id
        assert result_of(job.result) == result, job_id
    # a new worker gets every job that has not ended, once; none that has
    runner = FakeWorker(again, b"worker-2", credit=100)
    got = [d.job_id for d in runner.ready()]
    assert len(got) == len(set(got))
    assert not [j for j in got if expected.get(j, ("queued", None))[0] in TERMINAL]
    assert {"q5", *new_ids} <= set(got) and "q0" not in got and "q4" not in got
    again.close()


def test_a_failed_compaction_is_tried_again_with_backoff_while_the_broker_serves(
    tmp_path: Path,
) -> None:
    broker = InProcessBroker(tmp_path / "state", extra=EXTRA)
    populate(broker)
    compactor = broker.core.compactor
    with structlog.testing.capture_logs() as logs:
        churn(broker, lambda: compactor.running)
        for failures in (1, 2):
            child = compactor.child
            assert child is not None
            child.kill()
            wait_for(lambda: (broker.run_pass(), not compactor.running)[1])
            assert broker.core.stats["compactions_failed"] == failures
            assert broker.enqueue(id=f"served-{failures}") == f"served-{failures}"
            wait = RETRY_MIN * 2 ** (failures - 1)
            broker.advance(wait - 0.5)
            assert not compactor.running  # backing off
            broker.advance(0.5)
            assert compactor.running  # tried again
        until_compacted(broker)
    failed = [e for e in logs if e["event"] == "broker.compaction_failed"]
    assert [e["retry_in"] for e in failed] == [RETRY_MIN, 2 * RETRY_MIN]
    assert all("signal 9" in e["error"] and e["log_level"] == "error" for e in failed)
    assert compactor.failures == 0  # a success resets the backoff
    assert snapshot_of(replayed(broker, tmp_path)) == snapshot_of(broker.core.state)
    broker.close()


def test_a_clean_stop_during_a_compaction_kills_the_child_and_keeps_the_log(
    tmp_path: Path,
) -> None:
    broker = InProcessBroker(tmp_path / "state", extra=EXTRA)
    populate(broker)
    compactor = broker.core.compactor
    churn(broker, lambda: compactor.running)
    child = stopped_child(compactor)
    live = snapshot_of(broker.core.state)
    broker.close()
    assert child.poll() is not None and not list(log_dir(broker).glob("*.tmp"))
    assert snapshot_of(replayed(broker, tmp_path)) == live


def test_the_offline_compaction_runs_the_same_rewrite(tmp_path: Path) -> None:
    broker = InProcessBroker(tmp_path / "state", extra=SMALL_LOG)
    populate(broker)
    churn(broker, lambda: broker.core.log.stats()["segments"] >= 3)
    live = snapshot_of(broker.core.state)
    broker.close()
    config = tmp_path / "corral.toml"
    config.write_text(broker.config_text)
    assert cli_main(["log", "compact", "-c", str(config)]) == 0
    segs = sorted(log_dir(broker).glob("*.seg"))
    assert len(segs) == 2  # the new base, and the segment after the cut
    assert snapshot_of(replayed(broker, tmp_path)) == live
