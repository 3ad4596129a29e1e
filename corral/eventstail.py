"""``corral events``: subscribe to the broker's events endpoint
(``[broker] events_endpoint``) and print each event as it comes, one line
each (``--json``: the event as a JSON object), until Ctrl-C or ``--count``
events. ``--filter PREFIX`` (repeatable) keeps the events whose name starts
with it (``job.``, ``job.failed``, ``worker.``); the filtering is done by
ZeroMQ's subscription, so the broker does not even send the others.

A tcp endpoint is reached with CURVE like the broker's client endpoint:
``security.server_public_key`` and this host's ``client_secret_key``,
which must be in the broker's ``authorized_keys_dir``.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import msgspec
import zmq

#: How long one wait for an event lasts before Ctrl-C is looked at (ms).
POLL_MS = 200


def line(body: dict[str, Any]) -> str:
    """One event as a line: time, name, then its fields as key=value."""
    at = body.get("at") or 0.0
    stamp = time.strftime("%H:%M:%S", time.localtime(at)) + f".{int(at % 1 * 1000):03d}"
    fields = " ".join(f"{k}={v}" for k, v in body.items() if k not in ("event", "at"))
    return f"{stamp} {body.get('event', '?')} {fields}".rstrip()


def tail(
    endpoint: str, prefixes: list[str], count: int | None, as_json: bool, config: Any = None
) -> int:
    """Print events from ``endpoint`` (see the module docstring); returns
    how many were printed. A SUB socket connects even before the broker
    binds, and gets nothing until it does. Raises ConfigError for a tcp
    endpoint ``config`` gives no CURVE keys for (or a bad key file)."""
    from corral.transport import make_curve_client

    context: zmq.Context[zmq.Socket[Any]] = zmq.Context.instance()
    sock = context.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        make_curve_client(sock, endpoint, config)
    except BaseException:
        sock.close(linger=0)
        raise
    for prefix in prefixes or [""]:
        sock.setsockopt(zmq.SUBSCRIBE, prefix.encode())
    sock.connect(endpoint)
    decoder = msgspec.msgpack.Decoder(dict[str, Any])
    printed = 0
    try:
        while count is None or printed < count:
            if not sock.poll(POLL_MS):
                continue
            frames = sock.recv_multipart()
            try:
                body = decoder.decode(frames[-1])
            except msgspec.DecodeError:
                continue  # not an event of ours
            text = msgspec.json.encode(body).decode() if as_json else line(body)
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
            printed += 1
    finally:
        sock.close(linger=0)
    return printed
