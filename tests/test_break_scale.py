"""Faults found by attacking the broker at scale (pristine jobs, batched
creation records, ready lanes, kept counts, templates) as a user would.

Each test is a reproduction of one fault, fixed since. Real processes where
the fault shows through them cheaply; the in-process broker
(``tests/inproc.py``) where the setup needs a damaged log or a full table.
"""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
from conftest import Env
from inproc import InProcessBroker

from corral.broker import logtools
from corral.broker import protocol as p
from corral.broker.framing import MAX_RECORD
from corral.broker.job import Templates

MiB = 2**20


def spec(job_id: str, task: str = "t.task", payload: object = None, **options: object) -> p.JobSpec:
    return p.JobSpec(job_id, task, p.encode_value(payload), **options)  # type: ignore[arg-type]


def enqueue(b: InProcessBroker, specs: list[p.JobSpec]) -> list[str]:
    reply = b.request(p.Enqueue(b.next_req(), specs))
    assert isinstance(reply, p.EnqueueOk), reply
    return list(reply.ids)


# --------------------------------------------------------------------------
# `corral status`: "unroutable ... waiting since" names a cancelled job's time


def test_unroutable_since_is_the_oldest_ready_job_not_a_cancelled_one(env: Env) -> None:
    broker = env.start("broker")
    env.wait_ready(broker)
    client = env.client()
    old = client.enqueue("t.nobody", 1)  # priority 0 lane
    young = client.enqueue("t.nobody", 2, priority=5)  # priority 5 lane
    assert client.cancel(old)
    created = client.job(young).created_at
    assert created != client.job(old).created_at

    out = env.run("status", "--json", "-c", str(env.config))
    assert out.returncode == 0, out.stderr
    (unroutable,) = json.loads(out.stdout)["unroutable"]
    assert unroutable["count"] == 1
    # the only ready job is `young`: it has waited since its creation
    assert unroutable["since"] == created


# --------------------------------------------------------------------------
# compaction: a run of pristine jobs over 64 MiB is one record, past the limit


def test_compacting_pristine_jobs_whose_payloads_sum_past_the_record_limit(
    tmp_path: Path,
) -> None:
    limits = 'max_message_size = "16MiB"\nmax_payload = "16MiB"'
    b = InProcessBroker(tmp_path / "state", fsync="never", extra=limits)
    big = b"x" * (13 * MiB)
    ids = [enqueue(b, [spec(f"big-{i}", payload=big)])[0] for i in range(5)]
    assert 5 * len(big) > MAX_RECORD  # each job fits; together they do not

    b.core.log.sync()
    b.core.log.compact(b.core.state.snapshot())  # raises LogError: over the limit
    b.core.log.close()

    again = InProcessBroker(tmp_path / "state", fsync="never", extra=limits)
    assert sorted(again.core.state.jobs) == sorted(ids)
    assert all(len(bytes(job.payload)) > len(big) for job in again.core.state.jobs.values())


# --------------------------------------------------------------------------
# log repair: a repaired log that revives a removed job cannot be replayed


def test_a_repaired_log_that_revived_a_job_reused_in_a_batch_still_replays(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    b = InProcessBroker(state, fsync="never")
    enqueue(b, [spec("report-1", payload=1)])
    assert isinstance(b.request(p.Cancel(b.next_req(), "report-1")), p.Ack)
    assert isinstance(b.request(p.Delete(b.next_req(), "report-1")), p.Ack)
    # the id is free again: a batch of plain jobs (one JobsCreated) reuses it
    enqueue(b, [spec("a", payload=2), spec("report-1", payload=3), spec("b", payload=4)])
    b.core.log.close()

    # one flipped byte in the Removed record of report-1
    (segment,) = sorted((state / "log").glob("*.seg"))
    data = bytearray(segment.read_bytes())
    removed = bytes([5]) + msgspec.msgpack.encode(["report-1"])  # type code, then body
    at = data.find(removed)
    assert at > 0
    data[at + 2] ^= 0xFF
    segment.write_bytes(bytes(data))
    report = logtools.repair(state / "log")
    assert report.action == "repaired"
    assert "report-1" in report.changed_jobs  # named: it may run again or show an older status

    again = InProcessBroker(state, fsync="never")  # ValueError: "a log applied out of order"
    assert {"a", "report-1", "b"} <= set(again.core.state.jobs)


# --------------------------------------------------------------------------
# templates: the table is never pruned, so past 10,000 kinds no job is pristine


def test_templates_of_jobs_gone_make_room_for_new_kinds(tmp_path: Path) -> None:
    b = InProcessBroker(tmp_path / "state", fsync="never")
    cap = Templates().cap
    # one-off kinds: a priority per job (a deadline as priority, a queue per tenant)
    for start in range(0, cap, 2000):
        enqueue(b, [spec(f"old-{i}", priority=i) for i in range(start, start + 2000)])
    ack = b.request(p.Purge(b.next_req(), "default"))
    assert isinstance(ack, p.Ack) and ack.count == cap
    assert not b.core.state.jobs

    (new,) = enqueue(b, [spec("new-1", task="t.new")])
    assert b.core.state.jobs[new].pristine


# --------------------------------------------------------------------------
# config: a disk_reserve not below segment_size passes check-config, then the
# broker dies with a traceback


def test_check_config_refuses_a_disk_reserve_not_below_the_segment_size(env: Env) -> None:
    env.write_config(extra_broker='segment_size = "4MiB"\nmax_message_size = "1MiB"')
    out = env.run("check-config", "-c", str(env.config))
    assert out.returncode != 0
    assert "disk_reserve" in out.stdout + out.stderr


# --------------------------------------------------------------------------
# log repair: jobs created by a JobsCreated record are unknown to its ledger


def _batch_then_damage(tmp_path: Path, damage: bytes, flip_at: int) -> logtools.RepairReport:
    """Job x, then a batch of plain jobs (one JobsCreated record), then x and
    batch-1 cancelled; one byte flipped ``flip_at`` bytes into the first
    occurrence of ``damage``; then ``corral log repair``'s report."""
    state = tmp_path / "state"
    b = InProcessBroker(state, fsync="never")
    enqueue(b, [spec("x", payload=0)])
    enqueue(b, [spec(f"batch-{i}", payload=i) for i in range(3)])
    for job_id in ("x", "batch-1"):
        assert isinstance(b.request(p.Cancel(b.next_req(), job_id)), p.Ack)
    b.core.log.close()
    (segment,) = sorted((state / "log").glob("*.seg"))
    data = bytearray(segment.read_bytes())
    at = data.find(damage)
    assert at > 0
    data[at + flip_at] ^= 0x01
    segment.write_bytes(bytes(data))
    report = logtools.repair(state / "log")
    assert report.action == "repaired"
    return report


def test_repair_does_not_name_a_batched_job_lost_when_it_is_kept(tmp_path: Path) -> None:
    # the damage: x's Cancelled record (type 7, body [id, at])
    report = _batch_then_damage(tmp_path, b"\x07\x93\xa1x", 6)
    assert report.changed_jobs == ["x"]
    assert report.lost_jobs == []  # batch-1 is in the repaired log: it was only cancelled after


def test_repair_names_every_job_of_a_damaged_batch_lost(tmp_path: Path) -> None:
    # the damage: a byte of batch-2's blob (its seq, 4, as int64, then its
    # created_at), inside the JobsCreated record; the ids stay readable
    report = _batch_then_damage(tmp_path, (4).to_bytes(8, "little"), 9)
    assert sorted(report.lost_jobs) == ["batch-0", "batch-1", "batch-2"]


# --------------------------------------------------------------------------
# enqueue: one enqueue_many is one record, which may pass the record limit
# (a max_message_size over the record limit is refused by check-config now:
# tests/test_config.py)


def test_an_enqueue_of_jobs_that_each_fit_is_accepted_whatever_their_sum(
    tmp_path: Path,
) -> None:
    limits = 'segment_size = "256MiB"\nmax_message_size = "64MiB"\nmax_payload = "64MiB"'
    b = InProcessBroker(tmp_path / "state", fsync="never", extra=limits)
    big = b"x" * (20 * MiB)
    ids = enqueue(b, [spec(f"big-{i}", payload=big) for i in range(3)])
    assert ids == ["big-0", "big-1", "big-2"]
    created = [b.core.state.decide_create(spec(f"more-{i}", payload=big), 0.0) for i in range(4)]
    records = b.core.state.batched([rec for rec in created if rec is not None])
    assert len(records) == 4  # past 4 MiB a batch is cut: no record sums the jobs
    b.core.log.close()
    again = InProcessBroker(tmp_path / "state", fsync="never", extra=limits)
    assert sorted(again.core.state.jobs) == ids
