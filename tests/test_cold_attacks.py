"""Attacks on the restart checkpoint's cold jobs (broker/coldjobs.py): what
a broker serving cold jobs does when their base file is changed under it,
and when anything reads the job table while they are cold."""

from __future__ import annotations

import errno
import os
import shutil
import types
from pathlib import Path
from typing import Any

import pytest
from inproc import SMALL_LOG, FakeWorker, InProcessBroker
from structlog.testing import capture_logs
from test_checkpoint import (
    QUEUES,
    assert_same,
    checkpointed,
    compact_now,
    enqueue_many,
    replay,
    restarted,
)

from corral.broker import core
from corral.broker import protocol as p
from corral.broker.core import CLIENT
from corral.broker.framing import LogCorrupt


def base_of(state_dir: Path) -> Path:
    (ckpt,) = (state_dir / "log").glob("*.ckpt")
    return ckpt.with_suffix(".seg")


def flip_in_batch(path: Path, broker: InProcessBroker, number: int) -> None:
    """Flip one byte inside cold batch ``number``'s frame of ``path`` (in place)."""
    cold = broker.core.state.jobs.cold
    assert cold is not None
    batch = cold.batches[number]
    with open(path, "r+b") as f:
        f.seek(batch.offset + batch.length // 2)
        byte = f.read(1)
        f.seek(batch.offset + batch.length // 2)
        f.write(bytes([byte[0] ^ 0x40]))


def test_a_base_damaged_under_the_broker_stops_it_not_its_jobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cold batch that no longer reads back (its base was written to under
    the broker) is damage: the broker stops (as for a failed log write), it
    never answers as if the batch's jobs were not there, and its next start
    replays the base in full (the checkpoint goes) and finds the damage."""
    monkeypatch.setattr(core, "WARM_PER_PASS", 0)
    state_dir, _ = checkpointed(tmp_path)
    broker = restarted(state_dir)
    cold = broker.core.state.jobs.cold
    assert cold is not None and 0 in cold.batches
    flip_in_batch(base_of(state_dir), broker, 0)
    jobs = len(broker.core.state.jobs)
    with pytest.raises(LogCorrupt):  # the first job of batch 0, looked up
        broker.request(p.GetJob(broker.next_req(), "a-0"))
    # (had it been caught, the broker would go on with the batch's jobs gone)
    assert len(broker.core.state.jobs) == jobs
    assert broker.core.state.jobs.cold is not None and 0 in broker.core.state.jobs.cold.batches
    broker.crash()
    assert not list((state_dir / "log").glob("*.ckpt"))  # distrusted
    with pytest.raises(LogCorrupt):
        restarted(state_dir)


@pytest.mark.parametrize("op", ["cancel", "enqueue", "delete"])
def test_every_request_that_warms_a_damaged_batch_stops_the_broker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, op: str
) -> None:
    monkeypatch.setattr(core, "WARM_PER_PASS", 0)
    state_dir, _ = checkpointed(tmp_path)
    broker = restarted(state_dir)
    flip_in_batch(base_of(state_dir), broker, 1)
    job_id = "a-600"  # in batch 1 (512 jobs a batch)
    msg: object = {
        "cancel": p.Cancel(broker.next_req(), job_id),
        "delete": p.Delete(broker.next_req(), job_id),
        "enqueue": p.Enqueue(broker.next_req(), [p.JobSpec(job_id, "t.task")]),
    }[op]
    size = sum(f.stat().st_size for f in (state_dir / "log").glob("*.seg"))
    with pytest.raises(LogCorrupt):
        broker.request(msg)
    broker.crash()
    # nothing was logged for a request the broker could not check
    assert sum(f.stat().st_size for f in (state_dir / "log").glob("*.seg")) == size


def test_a_base_replaced_under_the_broker_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker reads cold jobs from the base file it replayed, even when
    another file is renamed over that name (a copy, a restore)."""
    monkeypatch.setattr(core, "WARM_PER_PASS", 0)
    state_dir, ids = checkpointed(tmp_path)
    broker = restarted(state_dir)
    base = base_of(state_dir)
    other = base.with_name("other")
    shutil.copy2(base, other)
    flip_in_batch(other, broker, 0)
    os.replace(other, base)
    info = broker.job("a-0")
    assert info is not None and info.status == "queued"
    assert len(broker.core.state.jobs) == len(ids)
    broker.crash()


def test_a_second_restart_before_all_are_warm_is_a_full_replay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Restarted on a checkpoint, the broker works some cold jobs, takes new
    ones, pauses a queue, and is killed with most still cold: the next
    start, with the checkpoint, is the same as a full replay."""
    monkeypatch.setattr(core, "WARM_PER_PASS", 0)
    state_dir, ids = checkpointed(tmp_path)
    broker = restarted(state_dir)
    ids += enqueue_many(broker, "late", 20, priority=7)
    ids += enqueue_many(broker, "late-o", 5, queue="other")
    broker.request(p.Cancel(broker.next_req(), "a-900"))
    broker.request(p.Delete(broker.next_req(), "a-900"))
    broker.run_pass((CLIENT, [b"c", p.encode(p.Pause(broker.next_req(), "other", True))]))
    worker = FakeWorker(broker, credit=30)
    held = worker.ready()
    for d in held[:25]:
        worker.finish(d)
    assert broker.core.state.jobs.cold is not None
    broker.crash()
    log_dir = state_dir / "log"
    warm = replay(log_dir, tmp_path, "warm", checkpoint=False)
    cold = replay(log_dir, tmp_path, "cold", checkpoint=True)
    assert cold.jobs.cold is not None
    assert_same(warm, cold, [*ids, "nope"], QUEUES)


def test_a_checkpoint_of_another_generation_is_ignored(tmp_path: Path) -> None:
    """A checkpoint left from an earlier log of the same segment number (the
    log was removed and made again, or restored from elsewhere) is not
    trusted: it is ignored, said, and the base replayed in full."""
    old_dir, _ = checkpointed(tmp_path / "old")
    state_dir, ids = checkpointed(tmp_path / "new")
    (old,) = (old_dir / "log").glob("*.ckpt")
    (new,) = (state_dir / "log").glob("*.ckpt")
    assert old.name == new.name
    shutil.copy2(old, new)
    log_dir = state_dir / "log"
    with capture_logs() as logs:
        cold = replay(log_dir, tmp_path, "cold", checkpoint=True)
    assert cold.jobs.cold is None
    assert [e["reason"] for e in logs if e["event"] == "checkpoint.ignored"]
    warm = replay(log_dir, tmp_path, "warm", checkpoint=False)
    assert_same(warm, cold, ids, QUEUES)


def test_a_disk_full_while_the_checkpoint_is_written_leaves_a_whole_base_and_no_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoint is a cache: a disk that fills while it is written
    leaves no checkpoint and no tmp file, the compaction's base is whole,
    and the restart replays it in full."""
    from corral.broker import checkpoint

    real_write = os.write
    calls = {"n": 0}

    def full_after_a_few_bytes(fd: int, data: Any) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            return real_write(fd, bytes(data[:100]))
        raise OSError(errno.ENOSPC, "No space left on device")

    broker = InProcessBroker(tmp_path / "s", extra=SMALL_LOG)
    ids = enqueue_many(broker, "a", 1500)
    # (the checkpoint module's own os only: the base is written as usual)
    monkeypatch.setattr(
        checkpoint, "os", types.SimpleNamespace(**{**vars(os), "write": full_after_a_few_bytes})
    )
    with capture_logs() as logs:
        compact_now(broker)
    monkeypatch.setattr(checkpoint, "os", os)
    assert calls["n"] == 2
    assert any(e["event"] == "checkpoint.not_written" for e in logs)
    log_dir = tmp_path / "s" / "log"
    assert not list(log_dir.glob("*.ckpt")) and not list(log_dir.glob("*.tmp"))
    ids += enqueue_many(broker, "b", 3)
    broker.crash()
    broker = restarted(tmp_path / "s")
    assert broker.core.state.jobs.cold is None
    assert len(broker.core.state.jobs) == len(ids)
    broker.crash()
