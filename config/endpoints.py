"""The syntax of a ZeroMQ endpoint, checked in one place: the config's
checks, the clients (``Client``, ``AsyncClient``) and the CLI's
``--endpoint`` options all ask :func:`endpoint_problem`, so a bad endpoint
is named with the forms accepted wherever it is typed, never left to a
raw ``ZMQError`` at the first call. Leaf module: stdlib only.
"""

from __future__ import annotations

import re

#: The longest ipc:// socket path the OS takes (sun_path, less its NUL), in bytes.
MAX_IPC_PATH = 107
#: tcp://HOST:PORT, the host a name, an IPv4 address, [an IPv6 one] or * (bind):
#: ASCII only, matched whole (``$`` would take a trailing newline, ``\d`` any
#: script's digits, a looser host a space or an accent: ZeroMQ refuses each).
TCP_ENDPOINT = re.compile(r"tcp://(\[[0-9A-Fa-f:.%A-Za-z_-]+\]|[A-Za-z0-9._-]+|\*):([0-9]+|\*)")
#: Control characters (a pasted newline, a NUL that would cut an ipc path short).
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: The forms accepted, as said in every error.
FORMS = 'expected an endpoint like "ipc://var/corral/client.sock" or "tcp://host:5555"'


def endpoint_problem(endpoint: object, *, connect: bool = False) -> str | None:
    """What is wrong with ``endpoint`` (None: nothing): ipc://PATH (a path
    the OS takes), tcp://HOST:PORT (a port from 1 to 65535) or
    inproc://NAME. ``connect``: it is connected to, so a wildcard (``*``)
    host or port is wrong too. The text names the endpoint and the forms
    accepted."""
    if not isinstance(endpoint, str):
        return f"{FORMS}, got {endpoint!r} (not a string)"
    if CONTROL.search(endpoint):
        return f"{FORMS}, got {endpoint!r} (a control character: a newline or NUL pasted in?)"
    scheme, sep, address = endpoint.partition("://")
    if sep and scheme == "ipc":
        return _ipc_problem(endpoint, address)
    if sep and scheme == "tcp":
        return _tcp_problem(endpoint, connect)
    if sep and scheme == "inproc" and address:
        return None
    return f"{FORMS}, got {endpoint!r}"


def _ipc_problem(endpoint: str, path: str) -> str | None:
    if not path:
        return f"{FORMS}, got {endpoint!r} (no socket path)"
    size = len(path.encode(errors="surrogateescape"))
    if size > MAX_IPC_PATH:
        return (
            f"ipc socket path is {size} bytes, more than the {MAX_IPC_PATH} the OS allows, "
            f"in {endpoint!r}: use a shorter path (a shorter broker.state_dir, or endpoint)"
        )
    return None


def _tcp_problem(endpoint: str, connect: bool) -> str | None:
    match = TCP_ENDPOINT.fullmatch(endpoint)
    if not match:
        return f"{FORMS}, got {endpoint!r} (tcp needs host:port)"
    host, port = match.group(1), match.group(2)
    if connect and "*" in (host, port):
        return f"{endpoint!r}: a wildcard (*) is for listening; connect to a host and port"
    if port != "*" and not 0 < int(port) < 65536:
        # ZeroMQ would take it modulo 65536 (99999 is port 34463)
        return f"{endpoint!r}: a tcp port is from 1 to 65535"
    return None
