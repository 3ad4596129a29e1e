"""Security faults (issue 12, items 11 and 12): who on the host may reach
the broker's files and sockets, payloads over ``broker.max_payload``, and
no pickle on any path a job takes.

CURVE on tcp (item 10) is in tests/test_curve.py.
"""

from __future__ import annotations

import ast
import grp
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import msgspec
import pytest
from conftest import Env, render_config, wait_for
from inproc import InProcessBroker

import corral
from corral.broker import protocol as p
from corral.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
#: The folders of the corral package (see DESIGN.md's layout).
PACKAGE = ("corral", "broker", "supervisor", "workers", "config")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------ permissions


def test_state_dir_and_sockets_are_the_owners_alone(env: Env) -> None:
    state = env.home / "state"
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)  # as a package or systemd might make it
    env.write_config(extra_broker=f'events_endpoint = "ipc://{env.home}/e.sock"')
    broker = env.start("broker")
    env.wait_ready(broker)
    wait_for(lambda: (env.home / "e.sock").exists(), 30, message="the events socket")
    assert _mode(state) == 0o700
    for name in ("c.sock", "w.sock", "e.sock"):
        assert _mode(env.home / name) == 0o600, name
    client = env.client()
    client.enqueue("e2e.square", 3)  # a log segment, a lock: written under a 0077 umask
    files = [path for path in state.rglob("*") if path.is_file()]
    assert files
    assert all(_mode(path) & 0o077 == 0 for path in files), [
        (path, oct(_mode(path))) for path in files
    ]


def test_socket_group_opens_the_sockets_and_lets_the_group_reach_them(env: Env) -> None:
    group = grp.getgrgid(1).gr_name  # "daemon" on most systems; any other group would do
    state = env.home / "state"
    env.config.write_text(
        render_config(env.home, extra_broker=f'socket_group = "{group}"')
        .replace(f"ipc://{env.home}/c.sock", f"ipc://{state}/c.sock")
        .replace(f"ipc://{env.home}/w.sock", f"ipc://{state}/w.sock")
    )
    broker = env.start("broker")
    client = corral.Client.from_config(env.config, timeout=1)
    env.clients.append(client)
    wait_for(lambda: _answers(client, broker), 30, message="the broker")
    for sock in (state / "c.sock", state / "w.sock"):
        assert _mode(sock) == 0o660
        assert sock.stat().st_gid == 1
    # the group may search the state directory (to reach the sockets), not list or write it
    assert _mode(state) == 0o710
    assert state.stat().st_gid == 1


def test_socket_group_reaches_sockets_whose_directories_the_broker_makes(env: Env) -> None:
    # The directories the broker creates on the way to a socket (the state
    # directory's missing parents, a socket directory's missing parents) are
    # made under its 0077 umask: each must still let the group search it, or
    # the group's clients see "no answer" for a socket they may use.
    group = grp.getgrgid(1).gr_name
    state = env.home / "var" / "corral"
    run = env.home / "run" / "corral"
    env.config.write_text(
        render_config(env.home, extra_broker=f'socket_group = "{group}"', state_dir=str(state))
        .replace(f"ipc://{env.home}/c.sock", f"ipc://{state}/c.sock")
        .replace(f"ipc://{env.home}/w.sock", f"ipc://{run}/w.sock")
    )
    broker = env.start("broker")
    client = corral.Client.from_config(env.config, timeout=1)
    env.clients.append(client)
    wait_for(lambda: _answers(client, broker), 30, message="the broker")
    for made in (state, env.home / "var", run, env.home / "run"):
        assert _mode(made) == 0o710, (made, oct(_mode(made)))
        assert made.stat().st_gid == 1, made


def test_socket_mode_for_everyone(env: Env) -> None:
    env.write_config(
        extra_broker=f'socket_mode = 0o666\nevents_endpoint = "ipc://{env.home}/e.sock"'
    )
    broker = env.start("broker")
    env.wait_ready(broker)
    wait_for(lambda: (env.home / "e.sock").exists(), 30, message="the events socket")
    assert _mode(env.home / "c.sock") == 0o666
    assert _mode(env.home / "e.sock") == 0o666
    assert _mode(env.home / "state") == 0o700  # no socket in it: still the owner's alone


def test_a_world_writable_state_dir_is_refused(env: Env) -> None:
    state = env.home / "state"
    state.mkdir()
    os.chmod(state, 0o777)
    broker = env.start("broker")
    assert broker.wait(30) == 2
    out = broker.output()
    assert "writable by everyone" in out and f"chmod 700 {state}" in out
    assert _mode(state) == 0o777  # refused, not repaired: someone may have been in it


def test_an_unknown_socket_group_is_refused(env: Env) -> None:
    env.write_config(extra_broker='socket_group = "no-such-group-corral"')
    broker = env.start("broker")
    assert broker.wait(30) == 2
    assert "broker.socket_group: no group named 'no-such-group-corral'" in broker.output()


def test_a_socket_group_the_broker_cannot_give_stops_it(tmp_path: Path) -> None:
    # Not a member of the group, the broker cannot chown its socket to it: that
    # fails after the bind, and the socket then bound must be closed, or the
    # context's term() waits for it for good and the broker hangs, silent.
    from conftest import CORRAL

    member = set(os.getgroups()) | {os.getegid()}
    prefix: list[str] = []
    if os.geteuid() == 0:  # root may chown to any group: run it as nobody
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv to drop to another user")
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        member = {65534}
    group = next((g for g in grp.getgrall() if g.gr_gid not in member), None)
    if group is None:
        pytest.skip("no group on this host that the test's user is not a member of")
    home = Path(tempfile.mkdtemp(prefix="corral-nogroup-", dir="/tmp"))
    try:
        config = home / "corral.toml"
        config.write_text(
            f'[broker]\nstate_dir = "{home}/state"\nclient_endpoint = "ipc://{home}/c.sock"\n'
            f'worker_endpoint = "ipc://{home}/w.sock"\nsocket_group = "{group.gr_name}"\n'
        )
        if prefix:
            os.chown(home, 65534, 65534)
            os.chown(config, 65534, 65534)
        proc = subprocess.run(
            [*prefix, CORRAL, "broker", "-c", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=home,
        )
        assert proc.returncode == 2, proc.stderr
        said = f"group {group.gr_name!r}: the broker's user is not a member"
        assert said in proc.stderr, proc.stderr
        assert not (home / "c.sock").exists()  # a failed start leaves no socket file
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _answers(client: corral.Client, proc) -> bool:  # type: ignore[no-untyped-def]
    assert proc.alive(), proc.output()
    try:
        client.ping()
    except corral.BrokerUnavailable:
        return False
    return True


# ------------------------------------------------------------------- max_payload

LIMIT = 'max_payload = "1KiB"'


def _spec(job_id: str, size: int, **options: object) -> p.JobSpec:
    return p.JobSpec(job_id, "t.task", p.encode_value("x" * size), **options)  # type: ignore[arg-type]


def test_an_enqueue_over_max_payload_is_refused(tmp_path: Path) -> None:
    b = InProcessBroker(tmp_path / "state", extra=LIMIT)
    fits = _spec("fits", 1000)
    assert len(fits.payload) <= 1024
    assert isinstance(b.request(p.Enqueue(b.next_req(), [fits])), p.EnqueueOk)
    for enqueue in (
        p.Enqueue(b.next_req(), [_spec("big", 2000)]),
        p.Enqueue(b.next_req(), [_spec("ok", 10, on_success=_spec("big-callback", 2000))]),
        p.EnqueueFlow(b.next_req(), "flow", "chain", [_spec("a", 10), _spec("big-step", 2000)]),
    ):
        reply = b.request(enqueue)
        assert isinstance(reply, p.ErrorReply), reply
        assert reply.code == "invalid"
        assert "over the broker's max_payload of 1024 bytes" in reply.message
        assert "big" in reply.message
    assert sorted(b.core.state.jobs) == ["fits"]  # nothing of the refused ones was made
    b.close()


def test_the_client_names_the_limit(env: Env) -> None:
    env.write_config(extra_broker=LIMIT)
    broker = env.start("broker")
    env.wait_ready(broker)
    client = env.client()
    with pytest.raises(corral.CorralError, match="max_payload of 1024 bytes"):
        client.enqueue("e2e.square", "x" * 2000)
    assert client.enqueue("e2e.square", 4)


def test_a_replayed_job_over_max_payload_refuses_start_and_loses_nothing(
    tmp_path: Path, env: Env
) -> None:
    """The limit lowered under unfinished jobs: the broker does not start
    (a clear message, exit 2, never a crash), and with the limit raised
    again every job is there."""
    state = env.home / "state"
    b = InProcessBroker(state, extra='max_payload = "64KiB"')
    big = b.enqueue(payload="x" * 5000, id="big")
    small = b.enqueue(payload="x" * 10, id="small")
    b.close()
    with pytest.raises(ConfigError, match=r"raise broker\.max_payload to at least 500"):
        InProcessBroker(state, extra=LIMIT)

    env.write_config(extra_broker=LIMIT)
    broker = env.start("broker")
    assert broker.wait(30) == 2
    out = broker.output()
    assert "broker.cannot_start" in out and "job big" in out and "Traceback" not in out

    again = InProcessBroker(state, extra='max_payload = "64KiB"')
    assert {big, small} <= set(again.core.state.jobs)
    again.close()


def test_an_ended_job_over_max_payload_does_not_stop_a_start(tmp_path: Path) -> None:
    b = InProcessBroker(tmp_path / "state", extra='max_payload = "64KiB"')
    b.enqueue(payload="x" * 5000, id="big")
    b.request(p.Cancel(b.next_req(), "big"))
    b.close()
    again = InProcessBroker(tmp_path / "state", extra=LIMIT)
    job = again.job("big")
    assert job is not None and job.status == "cancelled"
    again.close()


# ------------------------------------------------------------------------ pickle

#: Modules that (de)serialise with pickle, or are pickle.
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "jsonpickle", "shelve"}
#: pyzmq's calls that pickle: Socket.send_pyobj / recv_pyobj (and the
#: serialised variants corral never needs).
PICKLE_CALLS = {"send_pyobj", "recv_pyobj", "send_serialized", "recv_serialized"}


def _pickle_uses(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Attribute) and node.attr in PICKLE_CALLS:
            found.append(f"{path}:{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "__import__":
            found.append(f"{path}:{node.lineno}: __import__")
        found += [
            f"{path}:{node.lineno}: import {name}"
            for name in names
            if name.split(".")[0] in PICKLE_MODULES
        ]
    return found


def test_no_pickle_in_the_package_or_the_payload_codec() -> None:
    """An AST scan: corral's own code, and msgspec (every payload, result and
    wire message goes through it), import no pickle module and call none of
    pyzmq's pickling socket methods. (pyzmq itself imports pickle, for
    send_pyobj: hence the ban on those calls, and the runtime trap below.)"""
    files = [path for folder in PACKAGE for path in (ROOT / folder).rglob("*.py")]
    assert len(files) > 50
    msgspec_files = list(Path(msgspec.__file__).parent.glob("*.py"))
    assert msgspec_files
    uses = [use for path in files + msgspec_files for use in _pickle_uses(path)]
    assert uses == []


SITECUSTOMIZE = '''
"""Installed by tests/faults/test_security.py: every pickle entry point
records its use in $CORRAL_PICKLE_TRAP and raises."""
import os

_TRAP = os.environ.get("CORRAL_PICKLE_TRAP")
if _TRAP:
    import _pickle
    import pickle

    def _trapped(name):
        def trap(*args, **kwargs):
            with open(_TRAP, "a") as file:
                file.write(f"{os.getpid()} {name}\\n")
            raise RuntimeError(f"pickle used: {name}")
        return trap

    for _module in (pickle, _pickle):
        for _name in ("loads", "load", "dumps", "dump", "Unpickler", "Pickler"):
            setattr(_module, _name, _trapped(f"{_module.__name__}.{_name}"))
'''

PROBE_TASKS = '''
import sys

import msgspec

import corral


class Shape(msgspec.Struct):
    name: str
    sides: list[int]


@corral.task(name="probe.modules")
def modules(ctx: corral.JobContext, shape: Shape) -> list[str]:
    """The pickle-based serialisers this worker has imported."""
    banned = {"dill", "cloudpickle", "jsonpickle", "shelve", "joblib"}
    return sorted(name for name in sys.modules if name.split(".")[0] in banned)
'''


def test_no_pickle_runs_on_a_jobs_path(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """At run time, in a real `corral run` (supervisor, broker, workers):
    every pickle entry point is replaced by a trap before corral loads, jobs
    of typed, nested and plain payloads run, fail and return results, and
    the trap never fires; no pickle-based serialiser is imported. pickle
    itself is in sys.modules (pyzmq imports it), so its absence would be
    no proof: a call to it is what would matter."""
    trapdir = env.home / "trap"
    trapdir.mkdir()
    (trapdir / "sitecustomize.py").write_text(SITECUSTOMIZE)
    (trapdir / "probe_tasks.py").write_text(PROBE_TASKS)
    trap = env.home / "trap.log"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(trapdir), *sys.path]))
    monkeypatch.setenv("CORRAL_PICKLE_TRAP", str(trap))
    env.write_config(plugins='["e2e_tasks", "probe_tasks"]')
    daemon = env.start("run")
    env.wait_ready(daemon)
    client = env.client()
    assert client.result(client.enqueue("e2e.square", 9), timeout=30) == 81
    shape = {"name": "tri", "sides": [3, 4, 5]}
    assert client.result(client.enqueue("probe.modules", shape), timeout=30) == []
    order = client.enqueue("e2e.order", {"item": "x", "qty": 2})
    assert client.result(order, timeout=30)
    bad = client.enqueue("probe.modules", {"name": 1}, max_attempts=1)
    with pytest.raises(corral.JobFailed):
        client.result(bad, timeout=30)
    assert daemon.alive()
    assert not trap.exists(), trap.read_text()
