"""What ``corral check-config`` checks on this host beyond the file itself,
so that what a daemon would refuse at its start (or the unit's
``ExecStartPre``, or the check of a reload) is refused here first:

- every key file and key directory the config uses opens as the daemons
  open it: present, readable, a CURVE key, a secret key not open to group
  or others, a key directory not writable by them;
- on a broker host, each endpoint the broker binds (``client_endpoint``,
  ``worker_endpoint``, ``events_endpoint``) can be bound: a tcp one has an
  address of this host, an ipc one a directory this user can make its
  socket file in. A tcp address is tried on a port the system picks, never
  on the endpoint's own, and an ipc one is not bound at all (its directory
  is looked at): the broker may be running (a reload checks the config
  while it is). Whether the port is free is known only at the start. A
  config is a broker host's when it has ``security.server_secret_key``, an
  ipc endpoint, or a tcp endpoint whose address is this host's; else (every
  endpoint a tcp address of another host) this host only connects to a
  broker elsewhere, and its addresses are not this host's to bind;
- ``metrics.listen`` and ``dashboard.listen``, when set, have an address
  of this host (tried on a port the system picks, for the same reason).

A key is checked where something on this host uses it: the server's
secret key by a broker with a tcp endpoint, the server's public key and
this host's client (or worker) key by whatever connects over tcp (the
CLI, a supervisor's reports, workers, ``corral events``), the key
directories by a broker with CURVE on the endpoint they admit to.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from corral.errors import ConfigError


def host_problems(config: Any) -> list[str]:
    """Every problem found, one line each, naming the setting, the file
    or address, and what to do."""
    return [*_key_problems(config), *_address_problems(config)]


def _tcp(endpoint: str | None) -> bool:
    return bool(endpoint) and str(endpoint).startswith("tcp://")


def _key_problems(config: Any) -> Iterator[str]:
    from corral.broker.auth import load_key_dir
    from corral.transport import load_keypair

    sec = config.security
    bc = config.broker
    client = config.client.endpoint or bc.client_endpoint
    served = [bc.client_endpoint, bc.worker_endpoint, bc.events_endpoint]
    connected = [client, bc.worker_endpoint, bc.events_endpoint]
    # setting -> (a secret key?, used on this host?)
    files = {
        "server_secret_key": (True, any(map(_tcp, served))),
        "server_public_key": (False, any(map(_tcp, connected))),
        "client_secret_key": (
            True,
            any(map(_tcp, [client, bc.events_endpoint]))
            or (_tcp(bc.worker_endpoint) and not sec.worker_secret_key),
        ),
        "worker_secret_key": (True, _tcp(bc.worker_endpoint)),
    }
    for setting, (secret, used) in files.items():
        path = getattr(sec, setting)
        if not (used and path):
            continue
        try:
            load_keypair(path, f"security.{setting}", secret=secret)
        except ConfigError as exc:
            yield str(exc)
    curve = bool(sec.server_secret_key)
    directories = [
        ("authorized_keys_dir", _tcp(bc.client_endpoint) or _tcp(bc.events_endpoint)),
        ("worker_keys_dir", _tcp(bc.worker_endpoint)),
    ]
    for setting, used in directories:
        path = getattr(sec, setting)
        if not (curve and used and path):
            continue
        try:
            load_key_dir(path, setting)
        except (ConfigError, OSError) as exc:
            yield str(exc)


def _address_problems(config: Any) -> Iterator[str]:
    """The broker's endpoints, where this host is the broker's (see the
    module docstring), and the listen addresses."""
    bc = config.broker
    endpoints = [
        (f"broker.{name}", endpoint)
        for name in ("client_endpoint", "worker_endpoint", "events_endpoint")
        if (endpoint := getattr(bc, name))
    ]
    tried = {setting: _try_tcp(endpoint) for setting, endpoint in endpoints if _tcp(endpoint)}
    ipc = [(s, e) for s, e in endpoints if e.startswith("ipc://")]
    if config.security.server_secret_key or ipc or None in tried.values():
        yield from (f"{setting}: {error}" for setting, error in tried.items() if error)
        for setting, endpoint in ipc:
            error = _ipc_problem(endpoint)
            if error:
                yield f"{setting}: {error}"
    for setting, listen in (
        ("metrics.listen", config.metrics.listen),
        ("dashboard.listen", config.dashboard.listen),
    ):
        if listen:
            error = _try_listen(setting, listen)
            if error:
                yield error


def _try_tcp(endpoint: str) -> str | None:
    """Why the host of the tcp ``endpoint`` cannot be bound (tried on a port
    the system picks, with a ROUTER as the broker binds), or None."""
    import zmq

    from corral.transport import allow_ipv6, bind_error

    host = endpoint[len("tcp://") :].rpartition(":")[0]
    context: zmq.Context[zmq.Socket[Any]] = zmq.Context.instance()
    sock = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        allow_ipv6(sock, endpoint)
        sock.bind(f"tcp://{host}:*")
    except zmq.ZMQError as exc:
        return str(bind_error(endpoint, exc))
    finally:
        sock.close(linger=0)
    return None


def _ipc_problem(endpoint: str) -> str | None:
    """Why the broker could not make the socket file of the ipc ``endpoint``:
    its directory, or the nearest one that exists (the broker makes the
    rest), is not a directory this user can write in. None if it could."""
    import errno
    import os
    from pathlib import Path

    from corral.transport import bind_error

    directory = Path(os.path.abspath(endpoint[len("ipc://") :])).parent
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    if not directory.is_dir():
        error = OSError(errno.ENOTDIR, f"{directory} is not a directory")
    elif not os.access(directory, os.W_OK | os.X_OK):
        error = OSError(errno.EACCES, f"this user cannot write in {directory}")
    else:
        return None
    return str(bind_error(endpoint, error))


def _try_listen(setting: str, listen: str) -> str | None:
    """Why the host of the HTTP address ``listen`` cannot be bound (tried on
    a port the system picks), or None."""
    import socket

    from corral.config import split_listen
    from corral.supervisor.dashboard_child import listen_family
    from corral.supervisor.roles import listen_error

    host, _ = split_listen(listen)
    try:
        with socket.socket(listen_family(host), socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
    except OSError as exc:
        return listen_error(setting, listen, exc)
    return None
