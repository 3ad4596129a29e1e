"""The soak history checker on hand-made histories (fast; not marked soak)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import PLUGINS

from .history import MISSING, Execution, History, read_executions


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


def test_the_soak_task_writes_the_lines_the_checker_reads(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("soak_tasks", Path(PLUGINS) / "soak_tasks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = tmp_path / "runs"
    for n, token in enumerate(["t1", "t2"], 1):
        ctx = SimpleNamespace(job_id=f"j{n}", attempt=n)
        assert module.record(ctx, module.Record(str(path), token)) == n
    assert read_executions(path) == [
        Execution("j1", 1, os.getpid(), "t1"),
        Execution("j2", 2, os.getpid(), "t2"),
    ]
