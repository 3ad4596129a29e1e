"""`corral check-config` opens the key files and key directories a config
names, and tries the addresses a broker would bind, so that a config the
daemon would refuse at its start (or the unit's ExecStartPre, or a
reload's check) fails here first, naming the setting, the file and the fix.
And `corral run` / `corral supervisor` refuse a key they cannot use with
exit code 2, as every other config problem."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Env, free_port

from corral.cli import main
from corral.transport import write_keypair

#: An address no host here has (TEST-NET-3, RFC 5737): a bind there fails.
FOREIGN = "203.0.113.9"


def broker_host(env: Env, *, events: str | None = None, client: str | None = None) -> Path:
    """A broker host's config with tcp client, worker (and events)
    endpoints and every key it names, all good; returns the keys' directory."""
    keys = env.home / "keys"
    for name in ("server", "client", "worker"):
        write_keypair(keys, name)
    for directory, name in (("clients", "client"), ("workers", "worker")):
        (keys / directory).mkdir(mode=0o700)
        (keys / directory / f"{name}.key").write_bytes((keys / f"{name}.key").read_bytes())
    text = env.config.read_text()
    for side in ("c", "w"):
        text = text.replace(f'"ipc://{env.home}/{side}.sock"', f'"tcp://127.0.0.1:{free_port()}"')
    if client is not None:
        text = text.replace(
            'client_endpoint = "tcp://127.0.0.1:', f'client_endpoint = "{client}"\n#'
        )
    if events is not None:
        text = text.replace("[broker]\n", f'[broker]\nevents_endpoint = "{events}"\n')
    env.config.write_text(
        text + f'[security]\nserver_secret_key = "{keys}/server.key_secret"\n'
        f'server_public_key = "{keys}/server.key"\n'
        f'client_secret_key = "{keys}/client.key_secret"\n'
        f'worker_secret_key = "{keys}/worker.key_secret"\n'
        f'authorized_keys_dir = "{keys}/clients"\n'
        f'worker_keys_dir = "{keys}/workers"\n'
    )
    return keys


def check(env: Env, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["check-config", "--no-plugins", "-c", str(env.config)])
    captured = capsys.readouterr()
    return code, captured.err


def test_a_broker_hosts_good_keys_pass(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    broker_host(env, events=f"tcp://0.0.0.0:{free_port()}")
    assert check(env, capsys) == (0, "")


def _mode(name: str, mode: int) -> Callable[[Path], Path]:
    def apply(keys: Path) -> Path:
        (keys / name).chmod(mode)
        return keys / name

    return apply


def _gone(name: str) -> Callable[[Path], Path]:
    def apply(keys: Path) -> Path:
        (keys / name).unlink()
        return keys / name

    return apply


def _garbage(name: str) -> Callable[[Path], Path]:
    def apply(keys: Path) -> Path:
        (keys / name).write_text("public-key = nonsense\n")
        return keys / name

    return apply


@pytest.mark.parametrize(
    ("setting", "fault", "fix"),
    [
        ("security.server_secret_key", _mode("server.key_secret", 0o644), "chmod 600"),
        ("security.server_secret_key", _gone("server.key_secret"), "corral keys"),
        ("security.server_public_key", _garbage("server.key"), "cannot read"),
        ("security.client_secret_key", _mode("client.key_secret", 0o644), "chmod 600"),
        ("security.client_secret_key", _garbage("client.key_secret"), "no secret key"),
        ("security.worker_secret_key", _gone("worker.key_secret"), "corral keys"),
        ("security.worker_secret_key", _mode("worker.key_secret", 0o640), "chmod 600"),
        ("security.authorized_keys_dir", _garbage("clients/client.key"), "cannot read"),
        ("security.worker_keys_dir", _mode("workers", 0o777), "chmod go-w"),
        ("security.authorized_keys_dir", _mode("clients/client.key", 0o666), "chmod go-w"),
    ],
)
def test_check_config_opens_every_key_file_and_directory(
    env: Env,
    capsys: pytest.CaptureFixture[str],
    setting: str,
    fault: Callable[[Path], Path],
    fix: str,
) -> None:
    """Each key the config names is opened as the daemon would: missing,
    garbage, unreadable, or a secret open to others (it passed before)."""
    keys = broker_host(env)
    path = fault(keys)
    code, err = check(env, capsys)
    assert code == 2
    line = next(line for line in err.splitlines() if setting in line)
    assert str(path) in line and fix in line, err
    assert "Traceback" not in err


def test_every_key_problem_is_reported_at_once(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = broker_host(env)
    (keys / "client.key_secret").chmod(0o644)
    (keys / "worker.key_secret").unlink()
    code, err = check(env, capsys)
    assert code == 2
    assert "security.client_secret_key" in err and "security.worker_secret_key" in err


@pytest.mark.parametrize("side", ["client", "events"])
def test_check_config_tries_the_addresses_a_broker_binds(
    env: Env, capsys: pytest.CaptureFixture[str], side: str
) -> None:
    """On a broker host (it has the server's secret key) a tcp endpoint's
    address must be one of this host's; the port is not taken (the
    broker may be running: a reload checks the config while it is)."""
    endpoint = f"tcp://{FOREIGN}:{free_port()}"
    if side == "client":
        broker_host(env, client=endpoint)
    else:
        broker_host(env, events=endpoint)
    code, err = check(env, capsys)
    assert code == 2
    assert f"broker.{side}_endpoint" in err and endpoint in err, err


def test_a_port_out_of_range_is_refused(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    """ZeroMQ takes tcp://host:99999 and binds port 99999 - 65536."""
    broker_host(env, events="tcp://127.0.0.1:99999")
    code, err = check(env, capsys)
    assert code == 2 and "broker.events_endpoint" in err and "65535" in err, err


@pytest.mark.parametrize("command", ["run", "supervisor"])
def test_a_client_key_open_to_others_stops_run_and_supervisor_with_exit_2(
    env: Env, command: str
) -> None:
    """The supervisor reports to the broker as a client: a client key it
    cannot use made every report fail in silence (and the watchdog fire)."""
    keys = broker_host(env)
    (keys / "client.key_secret").chmod(0o644)
    proc = env.start(command)
    assert proc.wait(30) == 2
    assert f"chmod 600 {keys}/client.key_secret" in proc.output()
    assert "Traceback" not in proc.output()


def insecure_tcp(env: Env, client: str, worker: str, extra: str = "") -> None:
    """The env's config with tcp client and worker endpoints and no CURVE."""
    text = env.config.read_text()
    text = text.replace(f'"ipc://{env.home}/c.sock"', f'"{client}"')
    text = text.replace(f'"ipc://{env.home}/w.sock"', f'"{worker}"')
    env.config.write_text(text + extra + "\n[security]\nallow_insecure_tcp = true\n")


def test_the_addresses_are_tried_without_curve_keys_too(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    """A broker host whose tcp endpoints have no CURVE (insecure tcp allowed):
    one of its addresses is this host's, so each is tried (they were only
    with security.server_secret_key set)."""
    worker = f"tcp://{FOREIGN}:{free_port()}"
    insecure_tcp(env, f"tcp://127.0.0.1:{free_port()}", worker)
    code, err = check(env, capsys)
    assert code == 2
    assert "broker.worker_endpoint" in err and worker in err, err


def test_an_ipc_endpoint_whose_directory_cannot_be_made_is_refused(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    (env.home / "afile").write_text("")
    text = env.config.read_text()
    bad = f"ipc://{env.home}/afile/c.sock"
    env.config.write_text(text.replace(f'"ipc://{env.home}/c.sock"', f'"{bad}"'))
    code, err = check(env, capsys)
    assert code == 2
    assert "broker.client_endpoint" in err and bad in err, err


def test_a_worker_hosts_config_for_a_remote_broker_passes(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    """No endpoint is this host's and none is ipc: the broker is elsewhere,
    and this host only connects."""
    insecure_tcp(env, f"tcp://{FOREIGN}:5555", f"tcp://{FOREIGN}:5556")
    assert check(env, capsys) == (0, "")


@pytest.mark.parametrize("section", ["metrics", "dashboard"])
def test_a_listen_address_of_another_host_is_refused(
    env: Env, capsys: pytest.CaptureFixture[str], section: str
) -> None:
    listen = f"{FOREIGN}:{free_port()}"
    env.config.write_text(env.config.read_text() + f'\n[{section}]\nlisten = "{listen}"\n')
    code, err = check(env, capsys)
    assert code == 2
    assert f"{section}.listen" in err and listen in err, err
