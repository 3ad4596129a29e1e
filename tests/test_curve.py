"""tcp endpoints: CURVE encryption and authentication, or an explicit opt-out.

Every test here runs a real broker on real tcp sockets and speaks real
CURVE handshakes to it: a key is "admitted" when the broker's ZAP handler
lets the handshake succeed, "refused" when it answers status 400.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import zmq
import zmq.auth
from conftest import Env, Proc, broker_processes, free_port, render_config, wait_for
from zmq.utils.monitor import recv_monitor_message

import corral
from corral.transport import write_keypair

ADMITTED = ("succeeded", 0)
REFUSED = ("refused", 400)


def _tcp_config(env: Env, security: str) -> tuple[str, str]:
    client_port, worker_port = free_port(), free_port()
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
    """server, client, worker and stranger key pairs; the client's key is
    authorised as a client (keys/authorized), the worker's as a worker
    (keys/workers). Made in process, as `corral keys` makes them (that
    command runs in test_the_shipped_broker_host_config_lets_the_cli_on_that_host_connect)."""
    keys = env.home / "keys"
    for name in ("server", "client", "worker", "stranger"):
        write_keypair(keys, name)
    for directory, name in (("authorized", "client"), ("workers", "worker")):
        (keys / directory).mkdir(mode=0o700)
        (keys / directory / f"{name}.key").write_bytes((keys / f"{name}.key").read_bytes())
    return keys


def _curve(keys: Path, *, workers: bool = True) -> str:
    """The [security] lines of a broker host with both key directories."""
    text = (
        f'server_secret_key = "{keys}/server.key_secret"\n'
        f'server_public_key = "{keys}/server.key"\n'
        f'client_secret_key = "{keys}/client.key_secret"\n'
        f'worker_secret_key = "{keys}/worker.key_secret"\n'
        f'authorized_keys_dir = "{keys}/authorized"\n'
    )
    return text + (f'worker_keys_dir = "{keys}/workers"\n' if workers else "")


class Handshakes:
    """Bare CURVE DEALERs on one context, each telling how the broker
    answered its handshake: ("succeeded", 0), or ("refused", ZAP status)
    when the broker's authenticator turned the key down. A broker that is
    slow or away gives neither, and fails the wait."""

    def __init__(self, server_public: Path) -> None:
        self.server_key, _ = zmq.auth.load_certificate(server_public)
        self.ctx = zmq.Context()

    def __call__(self, endpoint: str, public: bytes, secret: bytes) -> tuple[str, int]:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.curve_serverkey = self.server_key
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
                    return ADMITTED
                if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    return "refused", int(event["value"])
                return "failed", int(event["event"])
            raise AssertionError(f"timed out after 30s waiting for a CURVE handshake at {endpoint}")
        finally:
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)

    def with_file(self, endpoint: str, secret_file: Path) -> tuple[str, int]:
        public, secret = zmq.auth.load_certificate(secret_file)
        assert secret is not None
        return self(endpoint, public, secret)

    def close(self) -> None:
        self.ctx.term()


@pytest.fixture
def handshakes(env: Env) -> object:
    made: list[Handshakes] = []

    def make(server_public: Path) -> Handshakes:
        made.append(Handshakes(server_public))
        return made[-1]

    yield make
    for one in made:
        one.close()


def test_tcp_without_keys_is_refused(env: Env) -> None:
    _tcp_config(env, "")
    done = env.run("check-config", "-c", str(env.config))
    assert done.returncode == 2
    assert "CURVE" in done.stderr and "allow_insecure_tcp" in done.stderr


def test_curve_round_trip_and_unauthorised_client_refused(env: Env, handshakes) -> None:  # type: ignore[no-untyped-def]
    keys = _keys(env)
    client_endpoint, worker_endpoint = _tcp_config(env, _curve(keys))
    assert oct((keys / "server.key_secret").stat().st_mode & 0o777) == "0o600"
    daemon = env.start("run")
    cfg = corral.Client.from_config(env.config, timeout=10)
    env.clients.append(cfg)
    wait_for(lambda: _pings(cfg, daemon), 30, message="the broker over tcp")
    broker_id = cfg.ping()
    assert cfg.result(cfg.enqueue("e2e.square", 4), timeout=30) == 16  # workers over CURVE

    # A client with a key pair the broker has not authorised gets nothing.
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
    shake = handshakes(keys / "server.key")
    assert shake.with_file(client_endpoint, keys / "stranger.key_secret") == REFUSED
    assert shake.with_file(client_endpoint, keys / "client.key_secret") == ADMITTED
    # Each key set is its endpoint's alone: a client's key cannot register
    # as a worker, nor a worker's act as a client.
    assert shake.with_file(worker_endpoint, keys / "client.key_secret") == REFUSED
    assert shake.with_file(worker_endpoint, keys / "worker.key_secret") == ADMITTED
    assert shake.with_file(client_endpoint, keys / "worker.key_secret") == REFUSED
    assert cfg.ping() == broker_id
    assert daemon.alive()


def test_unknown_keys_are_refused_on_both_endpoints(env: Env, handshakes) -> None:  # type: ignore[no-untyped-def]
    """200 fresh key pairs, 100 on each endpoint: none admitted."""
    keys = _keys(env)
    client_endpoint, worker_endpoint = _tcp_config(env, _curve(keys))
    broker = env.start("broker")
    shake = handshakes(keys / "server.key")
    wait_for(
        lambda: _alive(broker) and shake.with_file(client_endpoint, keys / "client.key_secret"),
        30,
        message="the broker over tcp",
    )
    outcomes = [
        shake(endpoint, *zmq.curve_keypair())
        for endpoint in (client_endpoint, worker_endpoint)
        for _ in range(100)
    ]
    assert outcomes.count(REFUSED) == 200
    assert shake.with_file(worker_endpoint, keys / "worker.key_secret") == ADMITTED
    assert broker.alive()


def test_curve_without_a_client_key_directory_refuses_to_start(env: Env) -> None:
    keys = _keys(env)
    _tcp_config(env, _curve(keys).replace(f'authorized_keys_dir = "{keys}/authorized"\n', ""))
    done = env.run("check-config", "--no-plugins", "-c", str(env.config))
    assert done.returncode == 2
    assert "security.authorized_keys_dir" in done.stderr
    assert "allow_any_client_key" in done.stderr
    broker = env.start("broker")
    assert broker.wait(30) == 2
    assert "security.authorized_keys_dir" in broker.output()

    # ... and the same for the workers' directory: a worker key set of its own.
    _tcp_config(env, _curve(keys, workers=False))
    broker = env.start("broker")
    assert broker.wait(30) == 2
    assert "security.worker_keys_dir" in broker.output()

    # One directory for both would let a client's key register as a worker.
    _tcp_config(
        env,
        _curve(keys, workers=False) + f'worker_keys_dir = "{keys}/authorized"\n',
    )
    done = env.run("check-config", "--no-plugins", "-c", str(env.config))
    assert done.returncode == 2
    assert "security.worker_keys_dir: must not be security.authorized_keys_dir" in done.stderr


def test_allow_any_client_key_admits_any_client_and_warns(env: Env, handshakes) -> None:  # type: ignore[no-untyped-def]
    keys = _keys(env)
    client_endpoint, worker_endpoint = _tcp_config(
        env,
        _curve(keys).replace(
            f'authorized_keys_dir = "{keys}/authorized"\n', "allow_any_client_key = true\n"
        ),
    )
    broker = env.start("broker")
    shake = handshakes(keys / "server.key")
    wait_for(
        lambda: _alive(broker) and shake(client_endpoint, *zmq.curve_keypair()) == ADMITTED,
        30,
        message="the broker to admit any client key",
    )
    assert "broker.any_client_key" in broker.output()
    # workers still need a known key
    assert shake(worker_endpoint, *zmq.curve_keypair()) == REFUSED


def test_sighup_adds_and_revokes_keys_without_a_restart(env: Env, handshakes) -> None:  # type: ignore[no-untyped-def]
    """Under `corral run`, a SIGHUP to the supervisor reaches the broker,
    which re-reads both key directories: an added key is admitted, a
    removed one refused, and an established connection with a revoked key
    gets nothing more (its worker is dropped as lost), until it is back."""
    keys = _keys(env)
    client_endpoint, worker_endpoint = _tcp_config(env, _curve(keys))
    daemon = env.start("run")
    client = corral.Client.from_config(env.config, timeout=10)
    env.clients.append(client)
    wait_for(lambda: _pings(client, daemon), 30, message="the broker over tcp")
    wait_for(lambda: len(client.status().workers) == 2, 30, message="2 workers over CURVE")
    (broker,) = broker_processes(daemon)
    shake = handshakes(keys / "server.key")
    new = keys / "authorized" / "stranger.key"
    assert shake.with_file(client_endpoint, keys / "stranger.key_secret") == REFUSED

    # added: admitted after the SIGHUP, on the client endpoint only
    new.write_bytes((keys / "stranger.key").read_bytes())
    daemon.signal(signal.SIGHUP)
    wait_for(
        lambda: shake.with_file(client_endpoint, keys / "stranger.key_secret") == ADMITTED,
        30,
        message="the added key to be admitted",
    )
    assert shake.with_file(worker_endpoint, keys / "stranger.key_secret") == REFUSED
    stranger_cfg = env.home / "stranger.toml"
    stranger_cfg.write_text(
        env.config.read_text().replace("client.key_secret", "stranger.key_secret")
    )
    stranger = corral.Client.from_config(stranger_cfg, timeout=1.0)
    env.clients.append(stranger)
    broker_id = stranger.ping()  # an established connection

    # revoked: a new connection is refused, the established one gets no answer
    held = client.enqueue("e2e.sleep", 2.0)
    wait_for(lambda: client.job(held).status == "running", 30, message="a worker to hold a job")
    new.unlink()
    (keys / "workers" / "worker.key").unlink()
    daemon.signal(signal.SIGHUP)
    wait_for(
        lambda: shake.with_file(client_endpoint, keys / "stranger.key_secret") == REFUSED,
        30,
        message="the removed key to be refused",
    )
    with pytest.raises(corral.BrokerUnavailable):
        stranger.ping()
    assert client.ping() == broker_id  # the other keys are served as before
    # The workers' connections were made with the revoked worker key: the
    # broker drops what they send, and their registrations at once (their
    # supervisor, whose key is a client's, still vouches for them).
    wait_for(lambda: not client.status().workers, 30, message="the revoked workers to be dropped")
    assert "key revoked" in daemon.output()
    assert client.job(held).status == "queued"  # back for other workers, not held by the revoked

    # back: the workers reconnect and register again; nothing restarted
    (keys / "workers" / "worker.key").write_bytes((keys / "worker.key").read_bytes())
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: len(client.status().workers) == 2, 60, message="the workers to come back")
    assert client.result(client.enqueue("e2e.square", 6), timeout=30) == 36
    assert client.result(held, timeout=30)["attempt"] >= 1
    assert client.job(held).status == "succeeded"
    assert broker_processes(daemon)[0].pid == broker.pid
    assert client.ping() == broker_id


def test_a_key_reload_that_fails_keeps_the_keys_it_had(env: Env, handshakes) -> None:  # type: ignore[no-untyped-def]
    keys = _keys(env)
    client_endpoint, _ = _tcp_config(env, _curve(keys))
    broker = env.start("broker")
    shake = handshakes(keys / "server.key")
    wait_for(
        lambda: _alive(broker) and shake.with_file(client_endpoint, keys / "client.key_secret"),
        30,
        message="the broker over tcp",
    )
    (keys / "authorized").chmod(0o777)
    broker.signal(signal.SIGHUP)
    wait_for(lambda: "broker.keys_reload_failed" in broker.output(), 30, message="the reload")
    assert f"chmod go-w {keys}/authorized" in broker.output()
    assert shake.with_file(client_endpoint, keys / "client.key_secret") == ADMITTED
    assert broker.alive()


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620])
def test_secret_key_readable_by_others_is_refused(env: Env, mode: int) -> None:
    keys = _keys(env)
    (keys / "server.key_secret").chmod(mode)
    _tcp_config(env, _curve(keys))
    broker = env.start("broker")
    assert broker.wait(30) == 2
    assert f"chmod 600 {keys}/server.key_secret" in broker.output()


def test_worker_secret_key_readable_by_others_is_refused(env: Env) -> None:
    keys = _keys(env)
    (keys / "worker.key_secret").chmod(0o640)
    _tcp_config(env, _curve(keys))
    for command in ("worker", "supervisor", "run"):
        proc = env.start(command)
        assert proc.wait(30) == 2
        assert f"chmod 600 {keys}/worker.key_secret" in proc.output()


def test_a_key_file_that_cannot_be_read_is_refused_by_name(env: Env) -> None:
    """A secret key the broker cannot read (here a directory stands in for
    it; a file owned by another user is the same OSError) stops it with
    exit 2 and the file's name, not a traceback."""
    keys = _keys(env)
    (keys / "server.key_secret").unlink()
    (keys / "server.key_secret").mkdir(mode=0o700)
    _tcp_config(env, _curve(keys))
    broker = env.start("broker")
    assert broker.wait(30) == 2
    assert f"cannot read the key file {keys}/server.key_secret" in broker.output()
    assert "Traceback" not in broker.output()


@pytest.mark.parametrize("what", ["directory", "key"])
def test_key_directory_writable_by_others_is_refused(env: Env, what: str) -> None:
    keys = _keys(env)
    target = keys / "workers" if what == "directory" else keys / "workers" / "worker.key"
    target.chmod(0o620 if what == "key" else 0o770)
    _tcp_config(env, _curve(keys))
    broker = env.start("broker")
    assert broker.wait(30) == 2
    assert f"chmod go-w {target}" in broker.output()


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
    _tcp_config(env, _curve(keys))
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


def _alive(proc: Proc) -> bool:
    assert proc.alive(), proc.output()
    return True


def _pings(client: corral.Client, proc: Proc) -> bool:
    assert proc.alive(), proc.output()
    try:
        client.ping()  # each try waits at most the client's timeout
    except corral.BrokerUnavailable:
        return False
    return True


def test_the_shipped_broker_host_config_lets_the_cli_on_that_host_connect(env: Env) -> None:
    """config/broker-host.toml, its keys made as its comments say (`corral
    keys`), paths moved into the test's home: `corral status` on the broker
    host connects over CURVE with the key the file names."""
    keys = env.home / "keys"
    for name in ("server", "admin"):
        assert env.run("keys", name, "--directory", str(keys)).returncode == 0
    (keys / "clients").mkdir()
    (keys / "workers").mkdir()
    (keys / "clients" / "admin.key").write_bytes((keys / "admin.key").read_bytes())
    client_port, worker_port = free_port(), free_port()
    shipped = Path(__file__).parent.parent / "config" / "broker-host.toml"
    text = (
        shipped.read_text()
        .replace("/etc/corral/keys", str(keys))
        .replace('"/var/lib/corral"', f'"{env.home}/state"')
        .replace("ipc:///run/corral/", f"ipc://{env.home}/")
        .replace("0.0.0.0:5555", f"127.0.0.1:{client_port}")
        .replace("0.0.0.0:5556", f"127.0.0.1:{worker_port}")
        .replace("127.0.0.1:5555", f"127.0.0.1:{client_port}")
    )
    config = env.home / "broker-host.toml"
    config.write_text(text)
    broker = Proc(env.home, ["broker", "-c", str(config)], "broker-host")
    env.procs.append(broker)

    def status() -> bool:
        assert broker.alive(), broker.output()
        done = env.run("status", "--json", "--timeout", "1", "-c", str(config))
        return done.returncode == 0

    wait_for(status, 30, message="corral status over CURVE on the broker host")
