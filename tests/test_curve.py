"""tcp endpoints: CURVE encryption and authentication, or an explicit opt-out."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import zmq
import zmq.auth
from conftest import Env, render_config, wait_for
from zmq.utils.monitor import recv_monitor_message

import corral


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tcp_config(env: Env, security: str) -> tuple[str, str]:
    client_port, worker_port = _free_port(), _free_port()
    text = (
        render_config(env.home)
        .replace(
            f'client_endpoint = "ipc://{env.home}/c.sock"',
            f'client_endpoint = "tcp://127.0.0.1:{client_port}"',
        )
        .replace(
            f'worker_endpoint = "ipc://{env.home}/w.sock"',
            f'worker_endpoint = "tcp://127.0.0.1:{worker_port}"',
        )
    )
    env.config.write_text(text + "\n[security]\n" + security)
    return f"tcp://127.0.0.1:{client_port}", f"tcp://127.0.0.1:{worker_port}"


def _keys(env: Env) -> Path:
    keys = env.home / "keys"
    for name in ("server", "client"):
        done = env.run("keys", name, "--directory", str(keys))
        assert done.returncode == 0, done.stderr
    authorized = keys / "authorized"
    authorized.mkdir()
    (authorized / "client.key").write_bytes((keys / "client.key").read_bytes())
    return keys


def test_tcp_without_keys_is_refused(env: Env) -> None:
    _tcp_config(env, "")
    done = env.run("check-config", "-c", str(env.config))
    assert done.returncode == 2
    assert "CURVE" in done.stderr and "allow_insecure_tcp" in done.stderr


def _handshake(endpoint: str, server_public: Path, client_secret: Path) -> tuple[str, int]:
    """Connect a bare CURVE DEALER with these keys and say how the broker
    answered its handshake: ("succeeded", 0), or ("refused", ZAP status)
    when the broker's authenticator turned the key down. A broker that is
    slow or away gives neither, and fails the wait."""
    server_key, _ = zmq.auth.load_certificate(server_public)
    public, secret = zmq.auth.load_certificate(client_secret)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.curve_serverkey = server_key
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    monitor = sock.get_monitor_socket(
        zmq.EVENT_HANDSHAKE_SUCCEEDED
        | zmq.EVENT_HANDSHAKE_FAILED_AUTH
        | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
        | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    )
    try:
        sock.connect(endpoint)
        deadline = time.monotonic() + 30
        while (left := deadline - time.monotonic()) > 0:
            if not monitor.poll(left * 1000):
                break
            event = recv_monitor_message(monitor)
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return "succeeded", 0
            if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                return "refused", int(event["value"])
            return "failed", int(event["event"])
        raise AssertionError(f"timed out after 30s waiting for a CURVE handshake at {endpoint}")
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)
        ctx.term()


def test_curve_round_trip_and_unauthorised_client_refused(env: Env) -> None:
    keys = _keys(env)
    client_endpoint, _ = _tcp_config(
        env,
        f'server_secret_key = "{keys}/server.key_secret"\n'
        f'server_public_key = "{keys}/server.key"\n'
        f'client_secret_key = "{keys}/client.key_secret"\n'
        f'authorized_keys_dir = "{keys}/authorized"\n',
    )
    assert oct((keys / "server.key_secret").stat().st_mode & 0o777) == "0o600"
    daemon = env.start("run")
    cfg = corral.Client.from_config(env.config, timeout=10)
    env.clients.append(cfg)
    wait_for(lambda: _pings(cfg, daemon), 30, message="the broker over tcp")
    broker_id = cfg.ping()
    assert cfg.result(cfg.enqueue("e2e.square", 4), timeout=30) == 16

    # A client with a key pair the broker has not authorised gets nothing.
    done = env.run("keys", "stranger", "--directory", str(keys))
    assert done.returncode == 0
    stranger_cfg = env.home / "stranger.toml"
    stranger_cfg.write_text(
        env.config.read_text().replace("client.key_secret", "stranger.key_secret")
    )
    stranger = corral.Client.from_config(stranger_cfg, timeout=1.0)
    with pytest.raises(corral.BrokerUnavailable):
        stranger.ping()
    stranger.close()
    # Refused, not slow: the broker's authenticator turns the stranger's key
    # down (ZAP status 400) and takes the authorised one, at the same time as
    # the same broker answers the authorised client.
    server_public = keys / "server.key"
    assert _handshake(client_endpoint, server_public, keys / "stranger.key_secret") == (
        "refused",
        400,
    )
    assert _handshake(client_endpoint, server_public, keys / "client.key_secret") == (
        "succeeded",
        0,
    )
    assert cfg.ping() == broker_id
    assert daemon.alive()


def test_secret_key_readable_by_others_is_refused(env: Env) -> None:
    keys = _keys(env)
    (keys / "server.key_secret").chmod(0o644)
    _tcp_config(
        env,
        f'server_secret_key = "{keys}/server.key_secret"\n'
        f'server_public_key = "{keys}/server.key"\n',
    )
    broker = env.start("broker")
    assert broker.wait(30) == 2
    assert "chmod 600" in broker.output()


def test_insecure_tcp_when_allowed(env: Env) -> None:
    client_endpoint, _ = _tcp_config(env, "allow_insecure_tcp = true\n")
    daemon = env.start("run")
    client = corral.Client(client_endpoint, timeout=10, config=None)
    env.clients.append(client)
    with pytest.raises(corral.ConfigError):
        client.ping()  # a bare Client refuses insecure tcp unless its config allows it
    client = corral.Client.from_config(env.config, timeout=10)
    env.clients.append(client)
    wait_for(lambda: _pings(client, daemon), 30, message="the broker over tcp")
    assert client.result(client.enqueue("e2e.square", 5), timeout=30) == 25


def test_remote_supervisor_over_curve(env: Env) -> None:
    keys = _keys(env)
    _tcp_config(
        env,
        f'server_secret_key = "{keys}/server.key_secret"\n'
        f'server_public_key = "{keys}/server.key"\n'
        f'client_secret_key = "{keys}/client.key_secret"\n'
        f'authorized_keys_dir = "{keys}/authorized"\n',
    )
    broker = env.start("broker")
    client = corral.Client.from_config(env.config, timeout=10)
    env.clients.append(client)
    wait_for(lambda: _pings(client, broker), 30, message="the broker over tcp")
    supervisor = env.start("supervisor")
    wait_for(lambda: len(client.status().workers) == 2, 30, message="2 remote workers")
    assert client.result(client.enqueue("e2e.square", 7), timeout=30) == 49
    sup = wait_for(lambda: client.status().supervisors, 10, message="the supervisor report")[0]
    assert sup.pid == supervisor.pid
    assert len(sup.workers) == 2


def _pings(client: corral.Client, proc) -> bool:  # type: ignore[no-untyped-def]
    assert proc.alive(), proc.output()
    try:
        client.ping()  # each try waits at most the client's timeout
    except corral.BrokerUnavailable:
        return False
    return True
