"""The corral client of this process, made on first use.

Why not one ``client = corral.AsyncClient(...)`` at module level: uvicorn
and gunicorn run the app in several worker processes, and gunicorn (with
``--preload``) imports it before it forks them. A ZeroMQ context or socket
made before a fork does not work in the child (a client used before the
fork hangs there), so each process makes its own, on first use, never at
import. An ``AsyncClient`` belongs to one event loop: uvicorn runs one per
worker process, and the endpoints use it from that loop only.
"""

from __future__ import annotations

import os

import corral

#: One client per process id: a forked child never uses its parent's.
_clients: dict[int, corral.AsyncClient] = {}


def config_path() -> str:
    """The corral config to read: ``$CORRAL_CONFIG`` (as the ``corral``
    command finds it), else ``corral.toml`` in the current directory."""
    return os.environ.get("CORRAL_CONFIG", "corral.toml")


async def corral_client() -> corral.AsyncClient:
    """This process's client (a FastAPI dependency). Raises corral.ConfigError
    for a config that cannot be read."""
    client = _clients.get(os.getpid())
    if client is None:
        client = _clients[os.getpid()] = corral.AsyncClient.from_config(config_path())
    return client


def close_client() -> None:
    """Close this process's client, if it made one (at the app's shutdown)."""
    client = _clients.pop(os.getpid(), None)
    if client is not None:
        client.close()
