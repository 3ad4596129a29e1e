"""The status pipe from a worker to its supervisor: snapshots of the running
jobs and the worker's socket identity, torn lines skipped."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from urllib.parse import quote

from hypothesis import given, settings
from hypothesis import strategies as st

from corral.workers.status import StatusEvent, StatusReader, StatusWriter, _q


def written(write: Callable[[StatusWriter], None]) -> list[StatusEvent]:
    """What a reader makes of the lines ``write`` puts on a real pipe."""
    r, w = os.pipe()
    try:
        write(StatusWriter(w))
        return StatusReader().feed(os.read(r, 65536))
    finally:
        os.close(r)
        os.close(w)


def test_snapshots_carry_the_identity_and_the_running_jobs() -> None:
    def write(writer: StatusWriter) -> None:
        writer.running({"a": 30.0, "b": None}, b"\x01\xff")
        writer.running({}, b"\x02")
        writer.running({})  # not connected yet: no identity
        writer.retiring("max_jobs")

    events = written(write)
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

    def write(writer: StatusWriter) -> None:
        writer.running(dict.fromkeys(odd, 5.0), b"\x01")
        for job_id in odd:
            writer.started(job_id, 2.0)
            writer.ended(job_id)

    events = written(write)
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


def test_hook_lines_and_snapshots_carry_the_hooks_running() -> None:
    """A hook about to run is announced with its bound (an H line, by the
    thread that runs it), its end too (D); a snapshot lists the hooks
    running, so a lost line is made good. Odd names travel whole, and so
    does why a worker cannot start (X)."""

    def write(writer: StatusWriter) -> None:
        writer.hook_started("a b:1", 30.0, "Exporter.after_job")
        writer.hooks_done("a b:1")
        writer.running({"j": 5.0}, b"\x01", {"k\nR x": ("my.<locals>.H.before_job", 2.5)})
        writer.cannot_start("plugin 'x' could not be imported:\nR poison")

    events = written(write)
    assert [(e.kind, e.jobs, e.hooks, e.reason) for e in events] == [
        ("H", {}, {"a b:1": ("Exporter.after_job", 30.0)}, ""),
        ("D", {"a b:1": 0.0}, {}, ""),
        ("J", {"j": 5.0}, {"k\nR x": ("my.<locals>.H.before_job", 2.5)}, ""),
        ("X", {}, {}, "plugin 'x' could not be imported:\nR poison"),
    ]


def test_a_hook_past_its_bound_kills_its_worker_and_charges_only_a_before_job() -> None:
    """An end hook's job has its outcome already: the kill charges no job
    (an empty list, not None). A before_job is part of its job's try: that
    job is charged, as for a hard timeout. A snapshot keeps the start time
    a hook was first seen at."""
    from corral.config.schema import PoolConfig
    from corral.supervisor.monitor import judge, read_status
    from corral.supervisor.process import Child

    pool = PoolConfig(name="p", hook_timeout=2.0)
    r, w = os.pipe()
    child = Child("w", "w", lambda fd: 0)
    child.status_fd = r
    os.set_blocking(r, False)
    reader = StatusReader()
    writer = StatusWriter(w)
    try:
        writer.started("before", 0.0)
        writer.hook_started("before", 2.0, "H.before_job")
        writer.hook_started("after", 2.0, "H.after_job")
        read_status(child, reader, 100.0)
        both = {"before": ("H.before_job", 2.0), "after": ("H.after_job", 2.0)}
        writer.running({"before": 0.0}, b"\x01", both)
        writer.running({"before": 0.0}, b"\x01", {"after": ("H.after_job", 2.0)})
        read_status(child, reader, 102.0)  # "before" ended (a lost D line), "after" still on
        assert child.hooks == {"after": (100.0, 2.0, "H.after_job")}
        assert judge(child, pool, 102.9, 10.0) is None  # within the bound and its grace
        verdict = judge(child, pool, 103.1, 10.0)
        assert verdict is not None and verdict.action == "kill" and verdict.charged() == []
        assert (verdict.hook, verdict.hook_job) == ("H.after_job", "after")
        assert "hook H.after_job of job after ran past hook_timeout 2s" in verdict.reason
        writer.hooks_done("after")
        writer.hook_started("before", 2.0, "H.before_job")
        read_status(child, reader, 104.0)
        verdict = judge(child, pool, 107.5, 10.0)
        assert verdict is not None and verdict.charged() == ["before"]
        assert verdict.hook == "H.before_job"
    finally:
        child.close_status()
        os.close(w)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40) | st.from_regex(r"[A-Za-z0-9_.~-]{1,30}", fullmatch=True))
def test_a_plain_id_is_written_as_quote_would_write_it(job_id: str) -> None:
    """The fast path for plain ids (letters, digits, ``_.-~``) writes what
    ``quote(job_id, safe="")`` writes, for any id, and it reads back whole."""
    assert _q(job_id) == quote(job_id, safe="")
    event = StatusReader().feed(f"S {_q(job_id)}:3\n".encode())
    assert [(e.kind, e.jobs) for e in event] == [("S", {job_id: 3.0})]


def test_last_words_name_every_job_through_a_pipe_read_as_the_supervisor_does() -> None:
    """A worker that dies names the jobs to charge for it: thousands, at a
    high rate (every job of the reports sent lately). One snapshot line of
    them was far past PIPE_BUF (a torn or refused write: none charged);
    they go as one S line each after the reason, waited for while the
    supervisor reads."""
    jobs = {f"job-{i:05d}": (30.0 if i % 2 else None) for i in range(5000)}
    r, w = os.pipe()
    events: list[StatusEvent] = []

    def supervise() -> None:
        reader = StatusReader()
        while data := os.read(r, 4096):
            events.extend(reader.feed(data))
            time.sleep(0.001)  # slower than the writer: the pipe fills

    thread = threading.Thread(target=supervise)
    thread.start()
    try:
        StatusWriter(w).last_words(jobs, "the broker refused this worker's report message: x")
    finally:
        os.close(w)
        thread.join(30)
        os.close(r)
    charged = {job for e in events if e.kind == "S" for job in e.jobs}
    assert charged == set(jobs)
    (said,) = [e for e in events if e.kind == "X"]
    assert "refused" in said.reason
