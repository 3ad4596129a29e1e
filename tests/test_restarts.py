"""The restart policy, with times passed in: per-slot backoff, the pool's
capped backoff that never gives up, job-caused deaths uncounted."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.config.schema import PoolConfig
from corral.supervisor.restarts import RestartLimit


def limit(**options: object) -> RestartLimit:
    settings: dict[str, object] = {
        "name": "p",
        "max_restarts": 2,
        "restart_window": 60.0,
        "restart_backoff": 1.0,
        "restart_backoff_max": 8.0,
        "pool_backoff": 100.0,
        "pool_backoff_max": 300.0,
    }
    settings.update(options)
    return RestartLimit(PoolConfig(**settings))  # type: ignore[arg-type]


def test_a_slot_backs_off_on_its_own_crashes_only() -> None:
    r = limit(max_restarts=100)
    r.crashed(0, 10.0)
    assert r.may_start(0, 10.0)  # the first crash: at once
    r.crashed(0, 11.0)
    assert not r.may_start(0, 11.5) and r.may_start(0, 12.0)  # then 1 s, 2 s, ...
    assert r.may_start(1, 11.0)  # the other slot is not held back
    for n in range(10):
        r.crashed(0, 12.0 + n)
    assert not r.may_start(0, 21.0 + 7.9) and r.may_start(0, 21.0 + 8.0)  # capped at 8 s
    r.crashed(0, 200.0)  # long after: a fresh streak
    assert r.may_start(0, 200.0)


def test_the_pool_backs_off_with_a_cap_and_never_gives_up() -> None:
    r = limit()
    for t in (0.0, 1.0, 2.0):
        r.crashed(int(t) % 2, t)
    assert r.backing_off(2.0) and not r.may_start(1, 50.0)
    assert r.state(50.0).startswith("backing off until ")
    assert r.may_start(1, 102.0)  # it tries again
    for t in (103.0, 104.0, 105.0):
        r.crashed(1, t)
    assert r.backing_off(105.0 + 199.0) and not r.backing_off(105.0 + 200.0)  # doubled
    for round_ in range(5):
        base = 1000.0 + round_ * 301.0
        for t in (base, base + 1, base + 2):
            r.crashed(2, t)
        assert not r.backing_off(base + 2 + 300.0)  # capped at pool_backoff_max
    r.reset()
    assert r.may_start(2, 0.0) and r.state(0.0) == "ok"


def test_the_state_says_what_the_last_crash_died_of() -> None:
    r = limit()
    for t in (0.0, 1.0, 2.0):
        r.crashed(0, t, cause=f"plugin 'p{int(t)}' could not be imported " + "x" * 400)
    state = r.state(3.0)
    assert state.startswith("backing off until ") and ": plugin 'p2' could not" in state
    assert len(state) < 340 and state.endswith("…")
    r.reset()
    assert r.state(0.0) == "ok" and r.cause == ""


def test_deaths_charged_to_jobs_restart_at_once_and_are_not_counted() -> None:
    r = limit()
    for n in range(50):
        r.crashed(0, float(n), job_caused=True)
    assert r.may_start(0, 50.0) and not r.backing_off(50.0) and r.total == 50


def test_a_reload_whose_fork_fails_keeps_the_pool_as_it_runs(tmp_path: Path) -> None:
    """The fork of a rolled pool's new worker fails (EAGAIN): that pool
    keeps its old workers, the reload says it failed, the new workers
    started so far are drained."""
    from corral.config import loads
    from corral.supervisor.pool import Pool
    from corral.supervisor.process import Child
    from corral.supervisor.reload import ReloadError, reload_pools

    class Forker:
        def __init__(self, fail_at: int | None) -> None:
            self.forks = 0
            self.fail_at = fail_at

        def fork(self, pool: Pool, index: int) -> Child:
            self.forks += 1
            if self.forks == self.fail_at:
                raise BlockingIOError(11, "Resource temporarily unavailable")
            return Child(f"{pool.name}#{index}", "t", lambda fd: 0)

    def config(processes: int) -> object:
        text = (
            f'[broker]\nstate_dir = "{tmp_path}"\n[[pools]]\nname = "a"\nprocesses = {processes}\n'
        )
        return loads(text)

    old_config = config(1)
    running = Pool(old_config.pools[0], None, "", Forker(None))  # type: ignore[attr-defined]
    running.fill(0.0)
    with pytest.raises(ReloadError) as failed:
        reload_pools([running], config(3), Forker(fail_at=2))  # type: ignore[arg-type]
    assert "a fork failed for pool(s) a" in str(failed.value)
    assert failed.value.pools == [running] and len(running.slots) == 1
