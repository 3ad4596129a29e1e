"""What a client says when the broker does not answer."""

from __future__ import annotations

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
