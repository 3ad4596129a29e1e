"""Running the dashboard: ``corral dashboard`` in the foreground until
SIGTERM or Ctrl-C, on ``[dashboard] listen`` (default
:data:`DEFAULT_LISTEN`, loopback)."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import structlog

log = structlog.get_logger()

#: Where the dashboard listens when neither the config nor --listen says.
DEFAULT_LISTEN = "127.0.0.1:9465"


async def serve(config: Any, listen: str, allow_actions: bool, endpoint: str | None) -> None:
    """Serve until SIGTERM or SIGINT. Raises OSError if ``listen`` cannot be bound."""
    from aiohttp import web

    from corral.asyncclient import AsyncClient
    from corral.config import split_listen
    from corral.dashboard.app import make_app

    client = AsyncClient(endpoint, config=config, timeout=config.client.timeout)
    runner = web.AppRunner(make_app(client, allow_actions=allow_actions), access_log=None)
    await runner.setup()
    host, port = split_listen(listen)
    try:
        await web.TCPSite(runner, host, port).start()
        log.info("dashboard.listening", listen=listen, allow_actions=allow_actions)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()
        client.close()
