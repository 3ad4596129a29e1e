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
import signal
import threading
from pathlib import Path

import psutil
import pytest
import structlog
from compacting import (
    EXTRA,
    churn,
    during,
    log_dir,
    populate,
    replayed,
    result_of,
    snapshot_of,
    stopped_child,
    until_compacted,
)
from conftest import Env, titled, wait_for
from inproc import SMALL_LOG, FakeWorker, InProcessBroker

import corral
from corral.broker.compaction import remove_segments, write_base
from corral.broker.compactor import RETRY_MIN
from corral.broker.framing import seg_path
from corral.broker.log import Log
from corral.broker.records import Removed
from corral.broker.state import TERMINAL
from corral.cli import main as cli_main


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
    # the new base sits where the cut was; every older segment goes (on a thread)
    base = seg_path(log_dir(broker), cut.last)
    wait_for(
        lambda: (
            min(log_dir(broker).glob("*.seg")) == base and not list(log_dir(broker).glob("*.tmp"))
        ),
        message="the old history's files to go",
    )
    segs = sorted(log_dir(broker).glob("*.seg"))
    assert len(segs) < before + 10
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
        # a try under way when the broker died waits for its worker to reclaim it
        assert job.status == status, job_id
        assert result_of(job.result) == result, job_id
    again.advance(again.core.dispatcher.reclaim_window)  # the old worker never comes back
    for job_id, (status, _) in expected.items():
        if status == "running":  # not counted: queued again
            assert jobs[job_id].status == "queued", job_id
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


def test_a_real_broker_killed_mid_compaction_takes_its_child_along_and_loses_nothing(
    env: Env,
) -> None:
    """`corral broker` compacts in a child titled "corral: compactor", and
    answers while that child is stopped; killed (-9) then, the child dies
    with it (the kernel's parent-death signal) and a restart has every job."""
    env.write_config(
        extra_broker='segment_size = "256KiB"\ndisk_reserve = "32KiB"\n'
        'max_message_size = "128KiB"\ncompact_min_size = "64KiB"'
    )
    broker = env.start("broker")
    env.wait_ready(broker)
    client = env.client()
    keep: list[str] = []
    for _ in range(15):
        keep += client.enqueue_many([corral.Job("e2e.noop", "k" * 200) for _ in range(200)])

    def compactor() -> psutil.Process | None:
        client.enqueue_many([corral.Job("e2e.noop", "c" * 400, queue="churn") for _ in range(100)])
        client.purge("churn")
        found = titled(broker, "corral: compactor")
        return found[0] if found else None

    child = wait_for(compactor, 120, interval=0, message="a compaction")
    child.suspend()
    more = client.enqueue_many([corral.Job("e2e.noop", n) for n in range(10)])  # still served
    assert client.job(keep[0]).status == "queued"
    broker.signal(signal.SIGKILL)
    broker.wait(10)
    _, alive = psutil.wait_procs([child], timeout=10)
    assert not alive, "the compaction outlived its broker"
    logdir = env.home / "state" / "log"
    left = set(logdir.glob("*.tmp"))  # the killed compaction's
    broker = env.start("broker", name="broker-again")
    env.wait_ready(broker)
    client = env.client()
    assert client.status().queues["default"]["queued"] == len(keep) + len(more)
    assert {client.job(i).status for i in (keep[0], keep[-1], *more)} == {"queued"}
    # removed on open (a compaction the new broker may have begun since has
    # a file of another name)
    assert not left & set(logdir.glob("*.tmp"))


def test_back_to_back_compactions_never_share_a_file_with_a_removal_under_way(
    tmp_path: Path,
) -> None:
    """The old history is removed on a thread, a few MiB at a time; a second
    compaction at once (nothing appended in between: the same cut) names its
    files apart, so the removal never touches the live log."""
    log = Log(tmp_path, fsync="never", segment_size=1 << 20, reserve=16 << 10)
    assert list(log.replay()) == []
    for n in range(3000):
        log.append(Removed(f"history-{n}-" + "h" * 1000))
    log.commit(0.0)
    cut = log.seal(0.0)
    write_base(cut, [Removed(f"first-{n}-" + "f" * 1000) for n in range(5000)])
    stale = log.install(cut)
    removal = threading.Thread(target=remove_segments, args=(stale,), kwargs={"gradually": True})
    removal.start()
    second = [Removed(f"second-{n}") for n in range(10)]
    log.compact(second)  # the same cut.last: the segment after the cut is empty
    removal.join()
    log.close()
    assert not list(tmp_path.glob("*.tmp"))
    again = Log(tmp_path, fsync="never", segment_size=1 << 20, reserve=16 << 10)
    assert list(again.replay()) == second
    again.close()
