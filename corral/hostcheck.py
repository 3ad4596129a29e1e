"""What ``corral check-config`` checks on this host beyond the file itself,
so that what a daemon would refuse at its start (or the unit's
``ExecStartPre``, or the check of a reload) is refused here first:

- every key file and key directory the config uses opens as the daemons
  open it: present, readable, a CURVE key, a secret key not open to group
  or others, a key directory not writable by them;
- on a broker host (one whose config has ``security.server_secret_key``),
  each tcp endpoint the broker binds (``client_endpoint``,
  ``worker_endpoint``, ``events_endpoint``) has an address of this host.
  The address is tried on a port the system picks, never on the
  endpoint's own: the broker may be running (a reload checks the config
  while it is). Whether the port is free is known only at the start.

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
    """On a broker host, each tcp endpoint it binds, tried on a port the
    system picks (``tcp://HOST:*``) with the socket type the broker uses."""
    import zmq

    from corral.transport import bind_error

    if not config.security.server_secret_key:
        return
    bc = config.broker
    context: zmq.Context[zmq.Socket[Any]] = zmq.Context.instance()
    for name in ("client_endpoint", "worker_endpoint", "events_endpoint"):
        endpoint = getattr(bc, name)
        if not _tcp(endpoint):
            continue
        host = endpoint[len("tcp://") :].rpartition(":")[0]
        sock = context.socket(zmq.PUB if name == "events_endpoint" else zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(f"tcp://{host}:*")
        except zmq.ZMQError as exc:
            yield f"broker.{name}: {bind_error(endpoint, exc)}"
        finally:
            sock.close(linger=0)
