"""SIGHUP reloads only what changed, rolling, losing nothing and running
nothing twice; SIGTTIN and SIGTTOU scale every pool by one."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from conftest import (
    CLI_POLL,
    PLUGINS,
    Env,
    Proc,
    kill_broker,
    log_events,
    render_config,
    wait_for,
    worker_processes,
)

import corral

DYN = """
import corral

@corral.task(name="dyn.version")
def version(ctx: corral.JobContext, n: int) -> str:
    import time
    time.sleep(0.01)
    return "{version}"
"""


def _pids(daemon, pool: str) -> set[int]:  # type: ignore[no-untyped-def]
    return {p.pid for p in worker_processes(daemon) if f"worker {pool}#" in " ".join(p.cmdline())}


def _two_pools(env: Env, plugin_dir: Path) -> None:
    base = render_config(env.home, processes=2, prefetch=1, plugins='["dyn_tasks"]')
    base = base.replace(
        f'python_path = ["{PLUGINS}"]', f'python_path = ["{PLUGINS}", "{plugin_dir}"]'
    )
    base = base.replace('queues = ["default"]', 'queues = ["dyn"]', 1)
    base = base.replace('name = "default"', 'name = "dyn"', 1)
    other = (
        '\n[[pools]]\nname = "other"\nqueues = ["default"]\n'
        'processes = 1\nplugins = ["e2e_tasks"]\n'
    )
    env.config.write_text(base.replace("\n[log]", other + "\n[log]"))


def _dyn_daemon(env: Env, *, preload: bool = True) -> tuple[Proc, Path]:
    """`corral run` with a "dyn" pool on the module dyn_tasks (v1, in its
    own directory) and an "other" pool, every worker registered; the
    daemon and the module's path."""
    plugin_dir = env.home / "dyn"
    plugin_dir.mkdir()
    module = plugin_dir / "dyn_tasks.py"
    module.write_text(DYN.format(version="v1"))
    _two_pools(env, plugin_dir)
    if not preload:
        text = env.config.read_text()
        env.config.write_text(text.replace("[[pools]]", "[[pools]]\npreload = false", 1))
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(3)
    return daemon, module


def test_sighup_reloads_changed_plugin_code_only(env: Env) -> None:
    daemon, module = _dyn_daemon(env)
    client = env.client()
    other_before = _pids(daemon, "other")
    dyn_before = _pids(daemon, "dyn")
    assert client.result(client.enqueue("dyn.version", 0, queue="dyn"), timeout=30) == "v1"

    ids = client.enqueue_many([corral.Job("dyn.version", n, queue="dyn") for n in range(150)])
    module.write_text(DYN.format(version="v2"))
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: "supervisor.reloaded" in daemon.output(), 20, message="the reload")
    results = [client.result(i, timeout=60) for i in ids]
    for job_id in ids:  # nothing lost, nothing run twice
        info = client.job(job_id)
        assert info.status == "succeeded"
        assert info.attempts == 1 and len(info.tries) == 1
    assert set(results) <= {"v1", "v2"}
    assert client.result(client.enqueue("dyn.version", 1, queue="dyn"), timeout=30) == "v2"
    wait_for(
        lambda: not (_pids(daemon, "dyn") & dyn_before), 20, message="the old dyn workers to leave"
    )
    assert _pids(daemon, "other") == other_before  # unchanged pool untouched
    assert len(_pids(daemon, "dyn")) == 2


def test_sighup_with_a_bad_config_keeps_running(env: Env) -> None:
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(2)
    before = {p.pid for p in worker_processes(daemon)}
    good = env.config.read_text()
    env.config.write_text(good.replace("processes = 2", "processes = -1"))
    daemon.signal(signal.SIGHUP)
    wait_for(
        lambda: "supervisor.reload_failed" in daemon.output(),
        20,
        message="the reload to be refused",
    )
    assert "pools[0].processes" in daemon.output()
    assert {p.pid for p in worker_processes(daemon)} == before
    client = env.client()
    assert client.result(client.enqueue("e2e.square", 2), timeout=30) == 4


def test_sighup_after_a_config_change_restarts_that_pool(env: Env) -> None:
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(2)
    before = {p.pid for p in worker_processes(daemon)}
    env.config.write_text(env.config.read_text().replace("processes = 2", "processes = 3"))
    daemon.signal(signal.SIGHUP)
    wait_for(
        lambda: len(now := {p.pid for p in worker_processes(daemon)}) == 3 and not (now & before),
        30,
        message="3 new workers",
    )


def test_sigttin_and_sigttou_scale_each_pool(env: Env) -> None:
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(2)
    daemon.signal(signal.SIGTTIN)
    wait_for(lambda: len(worker_processes(daemon)) == 3, 60, message="3 workers")
    daemon.signal(signal.SIGTTOU)  # one at a time: a pending signal is not queued twice
    # a retired worker drains first (at most shutdown_timeout, 10 s here)
    wait_for(lambda: len(worker_processes(daemon)) == 2, 60, message="2 workers")
    daemon.signal(signal.SIGTTOU)
    wait_for(lambda: len(worker_processes(daemon)) == 1, 60, message="1 worker")
    client = env.client()
    assert client.result(client.enqueue("e2e.square", 5), timeout=30) == 25
    # to 0, never silently: the log and `corral status` say so
    daemon.signal(signal.SIGTTOU)
    wait_for(lambda: "supervisor.scaled_to_zero" in daemon.output(), 60, message="the warning")
    wait_for(lambda: not worker_processes(daemon), 60, message="no worker")
    wait_for(lambda: "scaled to 0" in _status_text(env), 20, CLI_POLL, message="the status")
    # SIGHUP restores the configured count
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: len(worker_processes(daemon)) == 2, 60, message="2 workers again")
    assert client.result(client.enqueue("e2e.square", 6), timeout=30) == 36
    wait_for(lambda: "scaled to 0" not in _status_text(env), 20, CLI_POLL, message="the status")


def _status_text(env: Env) -> str:
    done = env.run("status", "-c", str(env.config))
    assert done.returncode == 0, done.stderr
    return done.stdout


BROKEN_IMPORT = 'import corral\nraise RuntimeError("the database is not configured")\n'


@pytest.mark.parametrize("preload", [True, False])
def test_a_reload_with_a_broken_plugin_changes_nothing(env: Env, preload: bool) -> None:
    """A syntax error (preloaded pool) or an import that raises (a pool that
    imports in each worker): the error names the file and line, the daemon
    and its workers go on as they were, and `corral status` says why the
    last reload failed. Fixing the file and reloading again then works."""
    daemon, module = _dyn_daemon(env, preload=preload)
    client = env.client()
    before = {p.pid for p in worker_processes(daemon)}
    slow = client.enqueue("e2e.sleep", 2.0)  # running in the other pool across the reload
    wait_for(lambda: client.job(slow).status == "running", 20, message="the job to start")
    if preload:
        module.write_text(module.read_text() + "\ndef broken(:\n")
        line = len(module.read_text().splitlines())
    else:
        module.write_text(BROKEN_IMPORT)
        line = 2
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: "supervisor.reload_failed" in daemon.output(), 30, message="the failure")
    failure = next(ln for ln in daemon.output().splitlines() if "supervisor.reload_failed" in ln)
    assert f"{module}:{line}" in failure, failure
    assert daemon.popen.poll() is None  # the daemon goes on
    assert {p.pid for p in worker_processes(daemon)} == before
    assert client.result(slow, timeout=30)["attempt"] == 1  # drained? no: never touched
    assert client.result(client.enqueue("dyn.version", 0, queue="dyn"), timeout=30) == "v1"
    wait_for(lambda: "last reload failed" in _status_text(env), 20, CLI_POLL, message="the status")
    assert f"{module}:{line}" in _status_text(env)
    module.write_text(DYN.format(version="v2"))
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: "supervisor.reloaded" in daemon.output(), 30, message="the second reload")
    assert client.result(client.enqueue("dyn.version", 1, queue="dyn"), timeout=30) == "v2"
    wait_for(lambda: "last reload ok" in _status_text(env), 20, CLI_POLL, message="the status")


def test_a_sighup_during_a_reload_check_is_not_lost(env: Env) -> None:
    """A broken plugin, SIGHUP, the plugin fixed and SIGHUP again while the
    first check still runs: the files as they are at the end are reloaded."""
    daemon, module = _dyn_daemon(env)
    module.write_text('import time\ntime.sleep(2)\nraise RuntimeError("broken")\n')  # slow, fails
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: "supervisor.reload_checking" in daemon.output(), 20, message="the check")
    module.write_text(DYN.format(version="v2"))
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: "supervisor.reloaded" in daemon.output(), 60, message="the reload")
    assert "supervisor.reload_again" in daemon.output()
    client = env.client()
    assert client.result(client.enqueue("dyn.version", 0, queue="dyn"), timeout=30) == "v2"


def test_a_slow_plugin_import_on_reload_does_not_stall_the_loop(env: Env) -> None:
    """A preloaded pool's plugin takes 3 s to import: while the supervisor
    imports it for the reload, its loop goes on (a worker that dies is
    reaped at once); the reload then applies."""
    daemon, module = _dyn_daemon(env)
    module.write_text("import time\ntime.sleep(3)\n" + DYN.format(version="v2"))
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: "supervisor.reload_importing" in daemon.output(), 30, message="the import")
    victim = next(iter(_pids(daemon, "other")))
    os.kill(victim, signal.SIGKILL)

    def reaped() -> bool:
        return any(
            e.get("event") == "supervisor.worker_exited" and e.get("pid") == victim
            for e in log_events(daemon.output())
        )

    wait_for(reaped, 10, message="the worker reaped")
    assert "supervisor.reloaded" not in daemon.output()  # the import still runs
    wait_for(lambda: "supervisor.reloaded" in daemon.output(), 30, message="the reload")
    client = env.client()
    assert client.result(client.enqueue("dyn.version", 0, queue="dyn"), timeout=30) == "v2"
    wait_for(lambda: len(_pids(daemon, "other")) == 1, 20, message="the other pool refilled")


def test_a_reload_never_imports_stale_bytecode(tmp_path: Path) -> None:
    """An edit within the same second that keeps the file's size leaves a
    timestamp .pyc that looks current (CPython checks mtime in whole
    seconds, and size). Forgetting a module for a reload drops its cached
    bytecode, so the next import reads the source on disk."""
    import importlib
    import py_compile
    import sys

    from corral.supervisor.reload import forget_modules

    name = f"stale_pyc_{tmp_path.name}"
    source = tmp_path / f"{name}.py"
    source.write_text('VERSION = "v1"\n')
    py_compile.compile(str(source), invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
    stamp = source.stat().st_mtime_ns
    sys.path.insert(0, str(tmp_path))
    try:
        assert importlib.import_module(name).VERSION == "v1"
        source.write_text('VERSION = "v2"\n')  # same size
        os.utime(source, ns=(stamp, stamp))  # same second
        forget_modules([name])
        assert importlib.import_module(name).VERSION == "v2"
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)


def test_a_broker_restarted_after_a_reload_keeps_the_settings_it_runs_with(env: Env) -> None:
    """A reload applies what the supervisor can (the pools); keys only a
    restart applies (here broker.state_dir) are named in the log and in
    `corral status` with "restart to apply", and a broker the supervisor
    restarts after a crash keeps the running ones: it comes back on its
    own log, not on an empty one in the new directory."""
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(2)
    client = env.client()
    waiting = client.enqueue("e2e.square", 2, queue="nobody")  # no worker serves it
    before = {p.pid for p in worker_processes(daemon)}
    moved = env.home / "elsewhere"
    text = env.config.read_text()
    text = text.replace(f'state_dir = "{env.home}/state"', f'state_dir = "{moved}"')
    env.config.write_text(text.replace("processes = 2", "processes = 1"))
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: "supervisor.reloaded" in daemon.output(), 30, message="the reload")
    lines = daemon.output().splitlines()
    line = next(ln for ln in lines if "supervisor.reload_needs_restart" in ln)
    assert "broker.state_dir" in line and "restart" in line, line
    assert "pools" not in line  # applied by the reload: no restart needed
    wait_for(  # the pool's change applied
        lambda: len(now := {p.pid for p in worker_processes(daemon)}) == 1 and not now & before,
        30,
        message="1 new worker",
    )
    shown = "restart to apply: broker.state_dir"
    wait_for(lambda: shown in _status_text(env), 20, CLI_POLL, message="the status")
    kill_broker(env, daemon)
    assert client.job(waiting).status == "queued"
    assert not moved.exists()
