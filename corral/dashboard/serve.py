"""Running the dashboard: ``corral dashboard`` in the foreground until
SIGTERM or Ctrl-C, on ``[dashboard] listen`` (default
:data:`DEFAULT_LISTEN`, loopback); or, in ``corral run``, a child of the
supervisor serving on the socket the supervisor bound
(:mod:`corral.supervisor.dashboard_child`)."""

from __future__ import annotations

import asyncio
import signal
import socket
from typing import Any

import structlog

log = structlog.get_logger()

#: Where the dashboard listens when neither the config nor --listen says.
DEFAULT_LISTEN = "127.0.0.1:9465"


async def serve(
    config: Any,
    sock: socket.socket,
    allow_actions: bool,
    endpoint: str | None,
    listen: str | None = None,
) -> None:
    """Serve on the listening socket ``sock`` until SIGTERM or SIGINT.
    ``listen``: the ``HOST:PORT`` it was bound as (default: the config's),
    whose host is allowed in the Host header unless ``[dashboard]
    allowed_hosts`` says otherwise (see :mod:`corral.dashboard.hosts`)."""
    from aiohttp import web

    from corral.asyncclient import AsyncClient
    from corral.dashboard.app import make_app

    client = AsyncClient(endpoint, config=config, timeout=config.client.timeout)
    hosts = allowed_hosts(config, listen or config.dashboard.listen or DEFAULT_LISTEN)
    app = make_app(client, allow_actions=allow_actions, hosts=hosts)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        host, port = sock.getsockname()[:2]
        bound = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        log.info(
            "dashboard.listening",
            listen=bound,
            allow_actions=allow_actions,
            allowed_hosts=str(hosts),
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()
        client.close()


def allowed_hosts(config: Any, listen: str) -> Any:
    """The Host names a dashboard listening on ``listen`` answers to: the
    config's ``allowed_hosts``, else the default for that address."""
    from corral.dashboard.hosts import AllowedHosts

    entries = config.dashboard.allowed_hosts
    if entries is not None:
        return AllowedHosts(entries)
    return AllowedHosts.default(listen.rpartition(":")[0])


def run_dashboard(config: Any, fd: int) -> int:
    """The dashboard child of ``corral run``: serve ``config``'s dashboard
    on the listening socket ``fd`` (inherited from the supervisor, which
    keeps its own copy) until SIGTERM."""
    from corral import logs

    logs.configure("dashboard", config.log.level, config.log.format)
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    asyncio.run(serve(config, sock, config.dashboard.allow_actions, None))
    return 0
