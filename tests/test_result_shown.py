"""``corral result`` shows any result a worker can send: msgpack holds
values JSON has no form for (bytes, a map keyed by an array, nil or a
bool, NaN), and the command printed a traceback for them, with --json or
without."""

from __future__ import annotations

import argparse
import io
import json
import math
from contextlib import redirect_stdout
from typing import Any

import pytest
from conftest import Env

from corral.cliformat import emit, result_text

ODD: list[tuple[Any, Any]] = [
    (b"\xff\x00", "/wA="),  # base64, as msgspec writes bytes
    ({(1, "a"): [b"x"]}, {'[1,"a"]': ["eA=="]}),  # a key is its JSON text
    ({None: 1, True: 2, 3: 4}, {"null": 1, "true": 2, "3": 4}),
    ([{"ключ": "värde"}], [{"ключ": "värde"}]),
]


@pytest.mark.parametrize(("value", "shown"), ODD)
def test_a_result_json_cannot_hold_is_shown_as_json(value: Any, shown: Any) -> None:
    assert json.loads(result_text(value)) == shown
    for as_json in (True, False):
        out = io.StringIO()
        with redirect_stdout(out):
            emit(
                argparse.Namespace(json=as_json),
                {"id": "j", "result": value},
                lambda v: result_text(v["result"]),
            )
        got = json.loads(out.getvalue())
        assert (got["result"] if as_json else got) == shown


def test_a_nan_result_is_shown() -> None:
    assert math.isnan(json.loads(result_text(float("nan"))))


@pytest.mark.parametrize("kind", ["bytes", "array_key", "nil_key"])
def test_corral_result_shows_a_result_json_cannot_hold(env: Env, kind: str) -> None:
    daemon = env.start("run")
    env.wait_ready(daemon)
    cfg = ["-c", str(env.config)]
    job_id = env.run("enqueue", "e2e.odd_result", json.dumps(kind), *cfg).stdout.strip()
    for extra in ([], ["--json"]):
        done = env.run("result", job_id, "--wait", *extra, *cfg)
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
        json.loads(done.stdout)
