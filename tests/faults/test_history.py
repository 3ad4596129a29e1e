"""The fault suite's history checker on hand-made histories (fast; not
marked soak): it must find a loss, a duplicate, a phantom, and a re-run no
fault explains."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import PLUGINS

from .history import MISSING, Execution, History, HistoryFile, read_executions


def acked(history: History, token: str, job_id: str) -> None:
    history.invoke(token)
    history.ok(token, job_id)


def ran(history: History, job_id: str, token: str | None, pid: int = 100, attempt: int = 1) -> None:
    history.executed(Execution(job_id, attempt, pid, token))


def test_every_acknowledged_job_run_once_is_valid() -> None:
    h = History()
    for n in range(3):
        acked(h, f"t{n}", f"j{n}")
        ran(h, f"j{n}", f"t{n}")
    verdict = h.check(final=True)
    assert verdict.valid
    assert sorted(verdict.once) == ["j0", "j1", "j2"]
    assert not verdict.more_than_once and not verdict.lost and not verdict.pending
    assert verdict.extra_executions == 0
    assert "acknowledged=3 once=3 more_than_once=0" in verdict.summary()


def test_a_job_that_never_ran_is_lost_once_the_run_is_over() -> None:
    h = History()
    acked(h, "t1", "j1")
    acked(h, "t2", "j2")
    ran(h, "j1", "t1")
    verdict = h.check(final=True)
    assert not verdict.valid
    assert verdict.lost == ["j2"]
    assert "lost: ['j2']" in verdict.describe()


def test_a_job_that_has_not_run_yet_is_pending_while_the_run_goes_on() -> None:
    h = History()
    acked(h, "t1", "j1")
    verdict = h.check(final=False)
    assert verdict.valid
    assert verdict.pending == ["j1"] and verdict.lost == []


@pytest.mark.parametrize("status", ["succeeded", "failed", MISSING])
def test_not_run_but_ended_or_unknown_to_the_broker_is_lost_at_once(status: str) -> None:
    h = History()
    acked(h, "t1", "j1")
    verdict = h.check(final=False, statuses={"j1": status})
    assert verdict.lost == ["j1"] and verdict.pending == []


def test_a_duplicate_is_reported_with_its_runs() -> None:
    h = History()
    acked(h, "t1", "j1")
    acked(h, "t2", "j2")
    ran(h, "j1", "t1", pid=10, attempt=1)
    ran(h, "j1", "t1", pid=11, attempt=2)
    ran(h, "j1", "t1", pid=12, attempt=3)
    ran(h, "j2", "t2", pid=11)
    verdict = h.check(final=True)
    assert verdict.valid  # at least once: a duplicate is not a loss
    assert list(verdict.more_than_once) == ["j1"]
    assert [r.pid for r in verdict.more_than_once["j1"]] == [10, 11, 12]
    assert verdict.once == ["j2"]
    assert verdict.extra_executions == 2
    assert "ran 3 times: j1 [(1, 10), (2, 11), (3, 12)]" in verdict.describe()


def test_a_duplicate_is_explained_only_by_kills_of_all_runs_but_one() -> None:
    h = History()
    acked(h, "t1", "j1")
    ran(h, "j1", "t1", pid=10)
    ran(h, "j1", "t1", pid=11)
    verdict = h.check(final=True)
    assert list(verdict.unexplained_duplicates(killed_pids=[])) == ["j1"]
    assert list(verdict.unexplained_duplicates(killed_pids=[99])) == ["j1"]
    assert verdict.unexplained_duplicates(killed_pids=[10]) == {}
    assert verdict.unexplained_duplicates(killed_pids=[11]) == {}
    ran(h, "j1", "t1", pid=12)
    assert list(h.check(final=True).unexplained_duplicates(killed_pids=[10])) == ["j1"]
    assert h.check(final=True).unexplained_duplicates(killed_pids=[10, 11]) == {}


def test_an_unanswered_enqueue_may_run_or_not() -> None:
    h = History()
    h.invoke("t1")
    h.unknown("t1", "BrokerUnavailable")
    h.invoke("t2")
    h.unknown("t2", "BrokerUnavailable")
    h.invoke("t3")  # never completed: also unknown
    ran(h, "j1", "t1")
    ran(h, "j3", "t3")
    ran(h, "j3", "t3", pid=101)
    verdict = h.check(final=True)
    assert verdict.valid
    assert verdict.acknowledged == []
    assert verdict.unacknowledged_ran == ["j1", "j3"]
    assert list(verdict.more_than_once) == ["j3"]
    assert h.counts() == {"invoked": 1, "ok": 0, "fail": 0, "unknown": 2}


def test_executions_nobody_asked_for_are_phantoms() -> None:
    h = History()
    acked(h, "t1", "j1")
    h.invoke("t2")
    h.fail("t2", "DiskFull")
    ran(h, "j1", "t1")
    ran(h, "j2", "t2")  # refused, yet it ran
    ran(h, "jx", "t1")  # another id under an acknowledged token
    ran(h, "j9", "t9")  # a token never invoked
    ran(h, "j8", None)  # no token, and not an acknowledged id
    verdict = h.check(final=True)
    assert not verdict.valid
    assert [r.job_id for r in verdict.phantom] == ["j2", "jx", "j9", "j8"]
    assert verdict.once == ["j1"]


def test_a_line_without_token_counts_for_its_acknowledged_job() -> None:
    h = History()
    acked(h, "t1", "j1")
    ran(h, "j1", None)
    assert h.check(final=True).once == ["j1"]


def test_a_job_that_ran_but_did_not_succeed_is_listed() -> None:
    h = History()
    acked(h, "t1", "j1")
    acked(h, "t2", "j2")
    ran(h, "j1", "t1")
    ran(h, "j2", "t2")
    verdict = h.check(final=True, statuses={"j1": "succeeded", "j2": "failed"})
    assert verdict.valid
    assert verdict.not_succeeded == {"j2": "failed"}


def test_an_invocation_completes_once() -> None:
    h = History()
    h.invoke("t1")
    with pytest.raises(ValueError):
        h.invoke("t1")
    h.ok("t1", "j1")
    with pytest.raises(ValueError):
        h.unknown("t1")
    assert h.acknowledged() == {"j1": "t1"}


def test_execution_lines_round_trip_and_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "runs"
    assert read_executions(path) == []
    runs = [Execution("j1", 1, 10, "t1"), Execution("j2", 2, 11, None)]
    path.write_text("".join(r.line() for r in runs) + "j3 1 1")
    assert read_executions(path) == runs
    h = History()
    assert h.load_executions(path) == 2
    path.write_text("j1 one 10\n")
    with pytest.raises(ValueError):
        read_executions(path)


def timed(
    history: History, job_id: str, token: str, start: float, done: float | None, pid: int = 100
) -> None:
    run = f"r{len(history.executions)}"
    history.executed(Execution(job_id, 1, pid, token, run, start, done))


def test_a_rerun_of_a_job_in_flight_at_a_broker_kill_is_explained() -> None:
    h = History()
    acked(h, "t1", "j1")
    timed(h, "j1", "t1", start=1.0, done=None, pid=10)  # running when the broker died
    h.fault("broker", 1, at=2.0)
    timed(h, "j1", "t1", start=3.0, done=3.5, pid=11)
    verdict = h.check(final=True)
    assert verdict.valid and verdict.extra_executions == 1
    assert verdict.unexplained_reruns() == []
    (window,) = verdict.kill_windows()
    assert window.in_flight == {"j1"} and window.duplicates == 1


def test_a_result_on_its_way_at_a_broker_kill_may_be_lost() -> None:
    h = History()
    acked(h, "t1", "j1")
    timed(h, "j1", "t1", start=1.0, done=1.9, pid=10)  # done, not yet in the log
    h.fault("broker", 1, at=2.0)
    timed(h, "j1", "t1", start=3.0, done=3.5, pid=11)
    assert h.check(final=True).unexplained_reruns() == []
    strict = h.check(final=True, settle=0.0)
    assert [r.pid for r in strict.unexplained_reruns()] == [11]


def test_a_prefetched_job_run_twice_after_a_broker_kill_is_unexplained() -> None:
    h = History()
    acked(h, "t1", "j1")
    acked(h, "t2", "j2")
    timed(h, "j2", "t2", start=1.0, done=None, pid=10)  # j2 running, j1 only buffered
    h.fault("broker", 1, at=2.0)
    timed(h, "j1", "t1", start=2.5, done=2.6, pid=10)  # the buffer kept it...
    timed(h, "j1", "t1", start=3.0, done=3.1, pid=11)  # ...and the new broker sent it again
    verdict = h.check(final=True)
    assert [(r.job_id, r.pid) for r in verdict.unexplained_reruns()] == [("j1", 11)]
    (window,) = verdict.kill_windows()
    assert window.in_flight == {"j2"}
    assert window.duplicates == 1  # within the bound (1 in flight), yet unexplained


def test_duplicates_are_counted_per_kill_window() -> None:
    h = History()
    for n in range(4):
        acked(h, f"t{n}", f"j{n}")
    timed(h, "j0", "t0", start=1.0, done=2.2, pid=10)  # ran on past the kill
    h.fault("broker", 1, at=2.0)
    timed(h, "j0", "t0", start=2.5, done=2.7, pid=11)
    timed(h, "j1", "t1", start=3.0, done=None, pid=10)
    timed(h, "j2", "t2", start=3.1, done=None, pid=11)
    h.fault("broker", 2, at=4.0)
    timed(h, "j1", "t1", start=4.5, done=4.6, pid=10)
    timed(h, "j2", "t2", start=4.5, done=4.6, pid=11)
    timed(h, "j3", "t3", start=4.7, done=4.8, pid=11)
    windows = h.check(final=True).kill_windows()
    assert [(len(w.in_flight), w.duplicates) for w in windows] == [(1, 1), (2, 2)]
    assert [w.fault.pid for w in windows] == [1, 2]


def test_a_worker_kill_explains_only_the_reruns_of_that_worker_s_jobs() -> None:
    h = History()
    acked(h, "t1", "j1")
    acked(h, "t2", "j2")
    timed(h, "j1", "t1", start=1.0, done=None, pid=10)
    timed(h, "j2", "t2", start=1.0, done=1.8, pid=11)
    h.fault("worker", 10, at=2.0)
    timed(h, "j1", "t1", start=2.1, done=2.2, pid=11)
    timed(h, "j2", "t2", start=2.1, done=2.2, pid=12)  # its first run had ended
    verdict = h.check(final=True)
    assert [(r.job_id, r.pid) for r in verdict.unexplained_reruns()] == [("j2", 12)]
    (window,) = verdict.kill_windows()
    assert window.in_flight == {"j1"} and window.duplicates == 2


def test_a_run_without_faults_explains_no_rerun() -> None:
    h = History()
    acked(h, "t1", "j1")
    timed(h, "j1", "t1", start=1.0, done=None, pid=10)
    timed(h, "j1", "t1", start=2.0, done=2.1, pid=11)
    verdict = h.check(final=True)
    assert verdict.kill_windows() == []
    assert [r.pid for r in verdict.unexplained_reruns()] == [11]


def test_start_and_done_lines_pair_up_by_run(tmp_path: Path) -> None:
    path = tmp_path / "runs"
    path.write_text(
        "start a j1 1 10 t1 1.5\n"
        "start b j1 2 11 t1 2.5\n"
        "done b 3.0\n"
        "j2 1 12 t2\n"
        "done a 4.0\n"
        "start c j3 1 13 t3 5.0\n"
        "done c 5."  # torn by a kill: not done
    )
    assert read_executions(path) == [
        Execution("j1", 1, 10, "t1", "a", 1.5, 4.0),
        Execution("j1", 2, 11, "t1", "b", 2.5, 3.0),
        Execution("j2", 1, 12, "t2"),
        Execution("j3", 1, 13, "t3", "c", 5.0, None),
    ]
    assert Execution.parse(Execution("j1", 1, 10, "t1", "a", 1.5).line()) == Execution(
        "j1", 1, 10, "t1", "a", 1.5
    )
    path.write_text("done zz 1.0\n")
    with pytest.raises(ValueError, match="not a done line"):
        read_executions(path)


def test_invocations_written_by_a_producer_process_load_into_a_history(tmp_path: Path) -> None:
    path = tmp_path / "invocations"
    writer = HistoryFile(path)
    for token in ("t1", "t2", "t3", "t4"):
        writer.invoke(token)
    writer.ok("t1", "j1")
    writer.fail("t2", "DiskFull('no room\non the disk')")
    writer.unknown("t3", "BrokerUnavailable")
    h = History()
    assert h.load_invocations(path) == 7
    assert h.counts() == {"invoked": 1, "ok": 1, "fail": 1, "unknown": 1}
    assert h.acknowledged() == {"j1": "t1"}
    assert h.invocations["t2"].reason == "DiskFull('no room on the disk')"
    ran(h, "j1", "t1")
    ran(h, "j2", "t2")
    verdict = h.check(final=True)
    assert [r.job_id for r in verdict.phantom] == ["j2"]


def test_the_soak_task_writes_the_lines_the_checker_reads(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("soak_tasks", Path(PLUGINS) / "soak_tasks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = tmp_path / "runs"
    for n, token in enumerate(["t1", "t2"], 1):
        ctx = SimpleNamespace(job_id=f"j{n}", attempt=n)
        assert module.record(ctx, module.Record(str(path), token)) == n
    runs = read_executions(path)
    assert [(r.job_id, r.attempt, r.pid, r.token) for r in runs] == [
        ("j1", 1, os.getpid(), "t1"),
        ("j2", 2, os.getpid(), "t2"),
    ]
    for r in runs:
        assert r.started_at is not None and r.done_at is not None
        assert r.started_at <= r.done_at <= time.monotonic()
