"""A structlog logger that imports structlog on its first call.

structlog imports asyncio when it is imported, so a module that must stay
light (the log, which ``corral.broker.state``'s users and the offline tools
import) takes its logger from :func:`get_logger` instead of structlog's.
"""

from __future__ import annotations

from typing import Any


class LazyLogger:
    """``structlog.get_logger(name)``, fetched when the first event is logged."""

    __slots__ = ("_logger", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._logger: Any = None

    def _get(self) -> Any:
        if self._logger is None:
            import structlog

            self._logger = structlog.get_logger(self._name)
        return self._logger

    def debug(self, event: str, **fields: Any) -> None:
        self._get().debug(event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self._get().info(event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._get().warning(event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self._get().error(event, **fields)


def get_logger(name: str) -> LazyLogger:
    """A logger for ``name`` that loads structlog only when it first logs."""
    return LazyLogger(name)
