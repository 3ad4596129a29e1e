"""A full disk, on real small filesystems (tmpfs): a compaction that finds no
room is tried again later while the broker serves on (it never exits for
it, nor on every restart after); schedule fires and follow-ups, being new
jobs, leave the log's reserve to records about jobs that exist, as enqueues
do, and are made once space returns: a fire later, held follow-ups once,
across restarts too. The broker's time is a fake clock where it can be."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
from compacting import (
    EXTRA,
    churn,
    log_dir,
    populate,
    replayed,
    snapshot_of,
    stopped_child,
    until_compacted,
)
from conftest import Env, fill_disk, json_events, wait_for, wait_until
from inproc import SMALL_LOG, FakeWorker, InProcessBroker, deliveries

import corral
from corral.broker import protocol as p
from corral.broker.clock import FakeClock
from corral.broker.compactor import RETRY_MIN
from corral.broker.schedules import job_id_for

Mount = Callable[..., Path]


def fill_log(broker: InProcessBroker, fs: Path) -> Path:
    """Fill the filesystem, then enqueue until the broker refuses for want
    of space: the log is in its reserve. Returns the filler file."""
    filler = fill_disk(fs, leave=0)
    for batch in range(1000):  # batches well under the reserve (16 KiB)
        specs = [
            p.JobSpec(f"fill-{batch}-{n}", "t.fill", p.encode_value("f" * 2000), queue="fill")
            for n in range(3)
        ]
        reply = broker.request(p.Enqueue(broker.next_req(), specs))
        if isinstance(reply, p.ErrorReply):
            assert reply.code == "disk_full", reply
            assert broker.core.log.full
            return filler
    raise AssertionError("the log never filled up")


def events(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


# -- compaction ----------------------------------------------------------------------


def test_a_compaction_that_finds_the_disk_full_is_tried_again_later(
    tmp_path: Path, tmpfs: Mount
) -> None:
    fs = tmpfs("8m")
    broker = InProcessBroker(fs / "state", extra=EXTRA)
    worker = populate(broker)
    compactor = broker.core.compactor
    with structlog.testing.capture_logs() as logs:
        churn(broker, lambda: compactor.running)
        child = stopped_child(compactor)
        filler = fill_disk(fs, leave=0)  # no room for the new base
        os.kill(child.pid, signal.SIGCONT)
        wait_for(lambda: (broker.run_pass(), not compactor.running)[1])
        assert broker.core.stats["compactions_failed"] == 1
        assert not list(log_dir(broker).glob("*.tmp"))
        # it serves on, new jobs included: the log itself has room
        assert not broker.core.log.full
        assert broker.enqueue(id="new") == "new"
        d = next(d for d in deliveries(broker.to_worker(worker.identity)) if d.job_id == "q5")
        worker.finish(d, "ok", "done")
        broker.advance(RETRY_MIN)  # tried again: no room to cut the log now
        assert broker.core.stats["compactions_failed"] == 2 and not compactor.running
        assert not broker.core.log.full  # still only the compaction is refused
        filler.unlink()
        broker.advance(2 * RETRY_MIN)
        until_compacted(broker)
    failed = events(logs, "broker.compaction_failed")
    assert [(e["disk_full"], e["retry_in"]) for e in failed] == [
        (True, RETRY_MIN),
        (True, 2 * RETRY_MIN),
    ]
    assert "No space left" in failed[0]["error"] and "free disk space" in failed[0]["hint"]
    assert broker.job("q5").status == "succeeded"  # type: ignore[union-attr]
    assert snapshot_of(replayed(broker, tmp_path)) == snapshot_of(broker.core.state)
    broker.close()


def test_a_broker_whose_compaction_finds_the_disk_full_never_exits_for_it(
    env: Env, tmpfs: Mount
) -> None:
    """`corral broker` on a full 2 MiB disk: its compaction fails, it serves
    on; restarted, its first pass compacts and fails again, and it still
    serves; once space returns the compaction is made."""
    disk = tmpfs("2m", at=env.home / "disk")
    env.write_config(
        state_dir=f"{disk}/state",
        extra_broker='segment_size = "256KiB"\ndisk_reserve = "64KiB"\n'
        'max_message_size = "128KiB"\ncompact_min_size = "64KiB"',
    )
    broker = env.start("broker")
    env.wait_ready(broker)
    filler = fill_disk(disk, leave=0)
    client = env.client()
    keep = client.enqueue_many([corral.Job("e2e.noop", n) for n in range(20)])

    def failed(proc: Any) -> int:
        return len([e for e in json_events(proc.output()) if "compaction_failed" in e["event"]])

    def churned() -> int:
        client.enqueue_many([corral.Job("e2e.noop", "c" * 400, queue="churn") for _ in range(20)])
        client.purge("churn")
        return failed(broker)

    wait_for(churned, 60, interval=0, message="a compaction to fail")
    assert broker.alive() and client.ping()
    broker.signal(signal.SIGKILL)
    broker.wait(10)
    broker = env.start("broker", name="broker-again")
    env.wait_ready(broker)
    wait_for(lambda: failed(broker), 30, message="the restart's compaction to fail")
    client = env.client()
    assert broker.alive() and client.ping()
    assert {client.job(i).status for i in keep} == {"queued"}
    filler.unlink()
    wait_until(lambda: client.status().stats, lambda s: s.get("compactions", 0) >= 1, 60)
    assert client.status().queues["default"]["queued"] == len(keep)


# -- schedule fires ------------------------------------------------------------------

SCHEDULE = """
[[schedules]]
name = "tick"
task = "t.tick"
every = "60s"
catch_up = "skip"
"""


def fires(broker: InProcessBroker) -> list[str]:
    return sorted(j.id for j in broker.core.state.jobs.values() if j.task == "t.tick")


def test_a_schedule_fire_on_a_full_disk_waits_for_space_then_fires(tmpfs: Mount) -> None:
    fs = tmpfs("4m")
    clock = FakeClock(wall=1_700_000_010.0)  # due times at ...040, ...100, ...160
    broker = InProcessBroker(fs / "state", clock=clock, schedules=SCHEDULE, extra=SMALL_LOG)
    filler = fill_log(broker, fs)
    where = broker.core.log.written_position
    with structlog.testing.capture_logs() as logs:
        broker.advance(60.0)  # due: held, and nothing written into the reserve for it
        assert fires(broker) == [] and broker.core.log.written_position == where
        broker.advance(60.0)  # due again: the later fire replaces the held one
        assert fires(broker) == []
        filler.unlink()
        broker.advance(1.0)  # space is seen again: the held fire is made
        assert fires(broker) == [job_id_for("tick", 1_700_000_100.0)]
        broker.advance(60.0)  # and the schedule goes on
    assert fires(broker) == sorted(
        [job_id_for("tick", 1_700_000_100.0), job_id_for("tick", 1_700_000_160.0)]
    )
    held = events(logs, "broker.schedule_fire_held")
    assert [e["due_at"] for e in held] == [1_700_000_040.0, 1_700_000_100.0]
    assert all(e["log_level"] == "warning" for e in held)
    (superseded,) = events(logs, "broker.schedule_fire_superseded")
    assert (superseded["due_at"], superseded["by_due_at"]) == (1_700_000_040.0, 1_700_000_100.0)
    assert len(events(logs, "broker.schedule_fire_resumed")) == 1
    assert broker.core.state.last_fired["tick"] == 1_700_000_160.0


# -- follow-ups ----------------------------------------------------------------------

KINDS = ["chain", "chord", "on_success", "on_failure"]
#: The parent's TTL, seconds: shorter than the disk stays full.
TTL = 5.0


def enqueue_parent(broker: InProcessBroker, kind: str) -> None:
    """Job "p", whose follow-up "x" is a chain's next step, a chord's
    callback, an on_success or an on_failure job."""
    follow = p.JobSpec("x", "t.x")
    parent = p.JobSpec("p", "t.p", result_ttl=TTL)
    if kind == "chain":
        msg: Any = p.EnqueueFlow(broker.next_req(), "f", "chain", [parent, follow])
    elif kind == "chord":
        msg = p.EnqueueFlow(broker.next_req(), "f", "group", [parent], callback=follow)
    elif kind == "on_success":
        parent = p.JobSpec("p", "t.p", result_ttl=TTL, on_success=follow)
        msg = p.Enqueue(broker.next_req(), [parent])
    else:
        parent = p.JobSpec("p", "t.p", max_attempts=1, on_failure=follow)
        msg = p.Enqueue(broker.next_req(), [parent])
    assert isinstance(broker.request(msg), p.EnqueueOk)


@pytest.mark.parametrize("kind", KINDS)
def test_follow_ups_on_a_full_disk_wait_for_space_and_are_made_once(
    tmpfs: Mount, kind: str
) -> None:
    fs = tmpfs("4m")
    clock = FakeClock()
    extra = f'{SMALL_LOG}\nfailed_ttl = "{TTL}s"'

    def start() -> InProcessBroker:
        return InProcessBroker(fs / "state", clock=clock, extra=extra)

    broker = start()
    worker = FakeWorker(broker)
    worker.ready()
    enqueue_parent(broker, kind)
    (d,) = deliveries(broker.to_worker(worker.identity))
    worker.start(d)
    filler = fill_log(broker, fs)
    with structlog.testing.capture_logs() as logs:
        worker.finish(d, "fail" if kind == "on_failure" else "ok", "r")
    assert broker.core.state.jobs["p"].status in ("succeeded", "failed")  # its end is logged
    assert "x" not in broker.core.state.jobs  # its follow-up waits
    assert [e["job_id"] for e in events(logs, "broker.followups_held")] == ["p"]
    broker.advance(2 * TTL)
    assert "p" in broker.core.state.jobs  # kept past its TTL while "x" waits
    broker.crash()
    broker = start()  # still full: the follow-up still waits
    assert broker.core.log.full and "x" not in broker.core.state.jobs
    broker.advance(2 * TTL)
    assert "p" in broker.core.state.jobs
    filler.unlink()
    broker.advance(1.0)  # space is seen again: "x" is made, "p" forgotten
    assert broker.core.state.jobs["x"].status == "queued" and "p" not in broker.core.state.jobs
    worker = FakeWorker(broker)
    (d,) = worker.ready()
    assert d.job_id == "x"
    worker.start(d)
    worker.finish(d, "ok", "x done")
    for _ in range(2):  # made once: never again, however often the broker restarts
        broker.crash()
        broker = start()
        assert FakeWorker(broker).ready() == []
        assert broker.core.state.jobs["x"].status == "succeeded"
    if kind in ("chain", "chord"):
        reply = broker.request(p.GetFlow(broker.next_req(), "f"))
        assert isinstance(reply, p.FlowReply) and reply.flow.status == "succeeded", reply


# -- retries asked for -----------------------------------------------------------------


@pytest.mark.parametrize("which", ["one", "all_failed"])
def test_a_retry_asked_for_on_a_full_disk_is_refused_as_an_enqueue_is(
    tmpfs: Mount, which: str
) -> None:
    """``corral retry`` brings a finished job back to run again: new work,
    whose records the reserve was not kept for. On a full disk it is
    refused with ``disk_full`` (nothing written), and done once space is back."""
    fs = tmpfs("4m")
    broker = InProcessBroker(fs / "state", extra=SMALL_LOG)
    assert isinstance(
        broker.request(p.Enqueue(broker.next_req(), [p.JobSpec("bad", "t.p", max_attempts=1)])),
        p.EnqueueOk,
    )
    worker = FakeWorker(broker)
    (d,) = worker.ready()
    worker.start(d)
    worker.finish(d, "error", error=p.ErrorInfo("E", "boom"))
    worker.go_silent()
    assert broker.job("bad").status == "failed"  # type: ignore[union-attr]
    filler = fill_log(broker, fs)
    where = broker.core.log.written_position

    def retry() -> Any:
        if which == "one":
            return broker.request(p.RetryJobs(broker.next_req(), "bad"))
        return broker.request(p.RetryJobs(broker.next_req(), all_failed=True))

    reply = retry()
    assert isinstance(reply, p.ErrorReply) and reply.code == "disk_full", reply
    assert broker.core.log.written_position == where
    assert broker.job("bad").status == "failed"  # type: ignore[union-attr]
    filler.unlink()
    broker.advance(1.0)  # space is seen again
    reply = retry()
    assert isinstance(reply, p.Ack) and reply.ids == ["bad"], reply
    assert broker.job("bad").status == "queued"  # type: ignore[union-attr]
