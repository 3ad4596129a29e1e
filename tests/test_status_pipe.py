"""The status pipe from a worker to its supervisor: snapshots of the running
jobs and the worker's socket identity, torn lines skipped."""

from __future__ import annotations

import os

from corral.workers.status import StatusReader, StatusWriter


def test_snapshots_carry_the_identity_and_the_running_jobs() -> None:
    r, w = os.pipe()
    try:
        writer = StatusWriter(w)
        writer.running({"a": 30.0, "b": None}, b"\x01\xff")
        writer.running({}, b"\x02")
        writer.running({})  # not connected yet: no identity
        writer.retiring("max_jobs")
        events = StatusReader().feed(os.read(r, 65536))
    finally:
        os.close(r)
        os.close(w)
    assert [(e.kind, e.identity, e.jobs, e.reason) for e in events] == [
        ("J", "01ff", {"a": 30.0, "b": 0.0}, ""),
        ("J", "02", {}, ""),
        ("J", "", {}, ""),
        ("R", "", {}, "max_jobs"),
    ]


def test_any_job_id_travels_whole_and_never_makes_a_line_of_its_own() -> None:
    """Job ids are any string: spaces, colons, an "id=" prefix, and even a
    newline that would otherwise inject an R (retiring) line."""
    odd = ["a b", "x:1", "id=ff", "E x\nR poison", "é%"]
    r, w = os.pipe()
    try:
        writer = StatusWriter(w)
        writer.running(dict.fromkeys(odd, 5.0), b"\x01")
        for job_id in odd:
            writer.started(job_id, 2.0)
            writer.ended(job_id)
        events = StatusReader().feed(os.read(r, 65536))
    finally:
        os.close(r)
        os.close(w)
    assert [e.kind for e in events] == ["J"] + ["S", "E"] * len(odd)
    assert events[0].identity == "01" and events[0].jobs == dict.fromkeys(odd, 5.0)
    assert [next(iter(e.jobs)) for e in events[1:]] == [i for i in odd for _ in (0, 1)]


def test_a_torn_line_is_skipped_and_a_split_one_joined() -> None:
    reader = StatusReader()
    assert reader.feed(b"J id=0a job:1") == []  # no newline yet
    (event,) = reader.feed(b"0\nJ id=0a bad:xx\n")
    assert (event.identity, event.jobs) == ("0a", {"job": 10.0})


def test_a_kill_charges_the_jobs_it_was_for_or_every_started_one() -> None:
    """A hard-timeout kill names its jobs; a kill for no sign of life names
    none, and None (not an empty list) tells the broker to charge every job
    the process had started."""
    from corral.config.schema import PoolConfig
    from corral.supervisor.monitor import judge
    from corral.supervisor.process import Child

    child = Child("w", "w", lambda fd: 0)  # never started: no pid, no CPU to vouch
    child.jobs = {"late": (0.0, 1.0), "fine": (0.0, 0.0)}
    child.last_beat = 100.0
    child.retiring = ""
    pool = PoolConfig(name="p")
    verdict = judge(child, pool, 100.0 + 0.5, 10.0)
    assert verdict is not None and verdict.charged() == ["late"]
    child.jobs = {"a": (0.0, 0.0)}
    verdict = judge(child, pool, 200.0, 10.0)  # silent for 100 s
    assert verdict is not None and verdict.action == "kill" and verdict.charged() is None
