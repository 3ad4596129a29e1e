"""Attacks on the restart checkpoint's cold jobs (broker/coldjobs.py): what
a broker serving cold jobs does when their base file is changed under it,
and when anything reads the job table while they are cold."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from inproc import InProcessBroker
from test_checkpoint import checkpointed, restarted

from corral.broker import core
from corral.broker import protocol as p
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
