"""What a client says when the broker does not answer."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import Env, free_port

import corral


def test_a_silent_curve_broker_is_said_to_maybe_refuse_the_key(env: Env) -> None:
    keys = env.home / "keys"
    for name in ("server", "client"):
        assert env.run("keys", name, "--directory", str(keys)).returncode == 0
    config = env.home / "remote.toml"
    config.write_text(
        f'[client]\nendpoint = "tcp://127.0.0.1:{free_port()}"\n\n'
        f'[security]\nserver_public_key = "{keys}/server.key"\n'
        f'client_secret_key = "{keys}/client.key_secret"\n'
    )
    client = corral.Client.from_config(config, timeout=0.3)
    env.clients.append(client)
    with pytest.raises(corral.BrokerUnavailable) as silent:
        client.ping()
    text = str(silent.value)
    assert "no answer from the broker" in text and "refused CURVE key" in text


def test_a_silent_ipc_broker_is_not_said_to_refuse_keys(tmp_path: Path) -> None:
    client = corral.Client(f"ipc://{tmp_path}/none.sock", timeout=0.3)
    with pytest.raises(corral.BrokerUnavailable) as silent:
        client.ping()
    client.close()
    assert "CURVE" not in str(silent.value)


def test_an_ipc_endpoint_without_its_socket_file_says_so(tmp_path: Path) -> None:
    path = tmp_path / "none.sock"
    client = corral.Client(f"ipc://{path}", timeout=0.3)
    with pytest.raises(corral.BrokerUnavailable) as silent:
        client.ping()
    client.close()
    assert f"no socket file at {path}" in str(silent.value)


def test_an_ipc_socket_this_user_may_not_reach_is_said_to_be_refused() -> None:
    # A client of another user than the broker's (a web app) that the
    # sockets' mode or a directory on the way shuts out is refused by the
    # kernel at each connect, silently on the ZeroMQ side: it must not read
    # as a broker that is down.
    home = Path(tempfile.mkdtemp(prefix="corral-shut-", dir="/tmp"))
    try:
        closed = home / "closed"
        closed.mkdir()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(closed / "c.sock"))
        listener.listen()
        os.chmod(closed, 0o700 if os.geteuid() == 0 else 0)
        code = (
            "import corral\n"
            f"c = corral.Client('ipc://{closed}/c.sock', timeout=0.3)\n"
            "try:\n    c.ping()\nexcept corral.BrokerUnavailable as e:\n    print(e)\n"
        )
        prefix = []
        if os.geteuid() == 0:  # root reaches everything: ask as nobody
            if shutil.which("setpriv") is None:
                pytest.skip("running as root without setpriv to drop to another user")
            prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        out = subprocess.run(
            [*prefix, sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=30,
            cwd="/",
        )
        assert "permission denied" in out.stdout and "socket_group" in out.stdout, (
            out.stdout + out.stderr
        )
        listener.close()
    finally:
        os.chmod(home / "closed", 0o700)
        shutil.rmtree(home, ignore_errors=True)
