"""A bad endpoint is named where it is typed, with the forms accepted:
in ``Client`` and ``AsyncClient`` at construction (never a raw ZMQError
at the first call), in the config, and on the CLI (one line, exit 2)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from conftest import Env

import corral
from corral.config import loads

BAD = [
    "garbage",
    "",
    "ipc://",
    "tcp://host",
    "tcp://host:0",
    "tcp://host:99999",
    "tcp://*:5555",
    "tcp://127.0.0.1:*",
    "http://example.com:80",
    "udp://1.2.3.4:5",
    "inproc://",
    "ipc://" + "x" * 200,
    # what ZeroMQ refuses (EINVAL) though a loose pattern let it through
    "tcp://127.0.0.1:5555\n",
    "ipc:///tmp/x.sock\n",
    "tcp://127.0.0.1:\u0665\u0665\u0665\u0665",
    "tcp://h\u00e9st:5555",
    "tcp://a b:5555",
    "ipc:///tmp/a\x00b",
]
GOOD = ["ipc:///tmp/corral-x.sock", "tcp://127.0.0.1:5555", "tcp://[::1]:5555", "inproc://x"]


@pytest.mark.parametrize("endpoint", BAD)
def test_a_client_refuses_a_bad_endpoint_at_construction(endpoint: str) -> None:
    with pytest.raises(ValueError) as raised:
        corral.Client(endpoint)
    text = str(raised.value)
    assert repr(endpoint)[:60] in text, text
    assert "tcp://" in text or "the OS allows" in text, text

    async def make() -> None:
        corral.AsyncClient(endpoint)

    with pytest.raises(ValueError, match="endpoint"):
        asyncio.run(make())


@pytest.mark.parametrize("endpoint", [None, 5, b"ipc:///x"])
def test_an_endpoint_that_is_not_text_is_refused(endpoint: object) -> None:
    with pytest.raises(ValueError, match=r"not a string|give Client an endpoint"):
        corral.Client(endpoint)  # type: ignore[arg-type]


@pytest.mark.parametrize("endpoint", GOOD)
def test_good_endpoints_make_clients(endpoint: str) -> None:
    corral.Client(endpoint).close()


def test_the_config_names_a_client_endpoint_with_a_wildcard(tmp_path: Path) -> None:
    with pytest.raises(corral.ConfigError, match=r"client\.endpoint.*wildcard"):
        loads(
            f'[broker]\nstate_dir = "{tmp_path}"\n[client]\nendpoint = "tcp://*:5555"\n'
            "[security]\nallow_insecure_tcp = true\n"
        )


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("listen", "127.0.0.1:9465\n"),
        ("listen", "127.0.0.1:\u0669\u0664\u0666\u0665"),
        ("allowed_hosts", ["localhost\n"]),
    ],
)
def test_the_config_refuses_what_a_loose_pattern_took(
    tmp_path: Path, key: str, value: object
) -> None:
    text = f'[broker]\nstate_dir = "{tmp_path}"\n[dashboard]\n{key} = {json.dumps(value)}\n'
    with pytest.raises(corral.ConfigError, match=rf"dashboard\.{key}"):
        loads(text)


@pytest.mark.parametrize(
    "args",
    [
        ["status", "--endpoint", "garbage"],
        ["status", "--endpoint", "tcp://*:5555"],
        ["top", "--once", "--endpoint", "garbage"],
        ["events", "--endpoint", "garbage"],
        ["events", "--endpoint", "tcp://host:0"],
        ["dashboard", "--endpoint", "garbage", "--listen", "127.0.0.1:1"],
    ],
    ids=lambda a: " ".join(a),
)
def test_the_cli_names_a_bad_endpoint_in_one_line(env: Env, args: list[str]) -> None:
    done = env.run(*args, "-c", str(env.config), timeout=30)
    assert done.returncode == 2, (done.stdout, done.stderr)
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert repr(args[args.index("--endpoint") + 1]) in err and "tcp://" in err, err
