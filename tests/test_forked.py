"""The tests' fork server (tests/zygote.py) runs a corral command as a
fresh ``corral`` process would: same exit code, output, error output,
standard input, directory and environment. The suite rests on it."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import forked
import pytest
from conftest import CORRAL, ZYGOTE, Env, wait_for

#: (argv, stdin, extra environment): commands that end without a broker.
CASES = [
    (["--version"], None, {}),
    (["check-config", "-c", "/nonexistent/corral.toml"], None, {}),
    (["enqueue", "t.x", "-", "--endpoint", "ipc:///nonexistent/c.sock"], "{", {}),
    (["status"], None, {"CORRAL_CONFIG": "missing.toml"}),
    (["jobs", "--limit", "0", "--endpoint", "ipc:///nonexistent/c.sock"], None, {}),
]


@pytest.mark.parametrize(("args", "stdin", "environ"), CASES, ids=lambda c: str(c)[:30])
def test_a_forked_command_ends_as_a_fresh_process_does(
    tmp_path: Path, args: list[str], stdin: str | None, environ: dict[str, str]
) -> None:
    environment = {**os.environ, **environ}
    fresh = subprocess.run(
        [CORRAL, *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        input=stdin,
        env=environment,
        timeout=60,
    )
    fork = forked.run(
        ZYGOTE, args, cwd=tmp_path, scratch=tmp_path, timeout=60, stdin=stdin, env=environment
    )
    assert (fork.returncode, fork.stdout, fork.stderr) == (
        fresh.returncode,
        fresh.stdout,
        fresh.stderr,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # its files are gone


def test_a_forked_daemon_is_titled_signalled_and_reaped(env: Env) -> None:
    """A daemon forked by the server leads its own session, shows as
    ``corral`` in ps (``corral reload`` looks for that), and its exit code
    (a signal's, negated, as Popen says) reaches the test."""
    if not forked.enabled():
        pytest.skip("CORRAL_TEST_EXEC=1: no fork server")
    broker = env.start("broker")
    env.wait_ready(broker)
    assert os.getsid(broker.pid) == broker.pid
    cmdline = Path(f"/proc/{broker.pid}/cmdline").read_bytes().replace(b"\0", b" ")
    assert b"corral" in cmdline
    assert broker.popen.poll() is None
    broker.signal(15)
    assert broker.wait(30) == 0  # a SIGTERM is a clean stop
    supervisor = env.start("supervisor")
    wait_for(lambda: "supervisor.started" in supervisor.output(), 30, message="the start")
    os.kill(supervisor.pid, 9)
    assert supervisor.wait(30) == -9


def test_a_forked_command_past_its_timeout_is_killed(tmp_path: Path) -> None:
    if not forked.enabled():
        pytest.skip("CORRAL_TEST_EXEC=1: no fork server")
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        forked.run(
            ZYGOTE,
            ["events", "--endpoint", "ipc:///nonexistent/e.sock"],
            cwd=tmp_path,
            scratch=tmp_path,
            timeout=0.5,
            stdin=None,
            env=None,
        )
    assert time.monotonic() - started < 30


def test_a_command_with_its_own_start_up_variables_runs_afresh(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``PYTHONPATH`` or ``LD_PRELOAD`` act when a process starts: a
    command given its own runs as a fresh process, which sees them."""
    site = env.home / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nprint('fresh', file=sys.stderr)\n")
    monkeypatch.setenv("PYTHONPATH", str(site))
    assert not ZYGOTE.can_run()
    done = env.run("--version")
    assert done.returncode == 0 and "fresh" in done.stderr
    monkeypatch.delenv("PYTHONPATH")
    monkeypatch.setenv("CORRAL_SOMETHING", "1")  # read at run time: a fork is fine
    assert ZYGOTE.can_run() == forked.enabled()


#: A hooks module that records its process's collector state, then fails to
#: load (so that ``corral enqueue`` stops there, exit 2).
GC_PROBE = """
import gc, json, os
with open(os.environ["GC_PROBE_OUT"], "w") as out:
    json.dump({"enabled": gc.isenabled(), "frozen": gc.get_freeze_count()}, out)
raise RuntimeError("probed")
"""


def test_a_forked_commands_collector_leaves_the_preloaded_modules_alone(env: Env) -> None:
    """What the server imported is frozen (``gc.freeze``) before each fork:
    a command's cyclic collections walk only what the command made, as in a
    fresh ``corral``, instead of writing to every page of the inherited
    heap (a copy-on-write fault each: 120 ms of CPU for ``--version``, not
    50). The collector itself runs in the command, as it does in a fresh one."""
    if not forked.enabled():
        pytest.skip("CORRAL_TEST_EXEC=1: no fork server")
    (env.home / "gc_probe.py").write_text(GC_PROBE)
    config = env.config.read_text().replace(
        "python_path = [", f'hooks = ["gc_probe"]\npython_path = ["{env.home}", '
    )
    env.config.write_text(config)
    out = env.home / "gc.json"
    done = env.run("enqueue", "e2e.noop", "-c", str(env.config), environ={"GC_PROBE_OUT": str(out)})
    assert done.returncode == 2 and "probed" in done.stderr, done.stderr
    state = json.loads(out.read_text())
    assert state["enabled"] is True
    assert state["frozen"] > 10_000, state  # corral's modules, zmq, structlog ...
