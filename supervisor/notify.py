"""systemd's notify protocol (sd_notify): READY=1, STATUS=, WATCHDOG=1,
STOPPING=1, RELOADING=1, sent as datagrams to ``$NOTIFY_SOCKET``.

Written from the protocol description in sd_notify(3) rather than with
libsystemd, so it works the same with or without systemd installed. Outside
systemd (no NOTIFY_SOCKET) every call is a no-op.
"""

from __future__ import annotations

import os
import socket
import time

import structlog

log = structlog.get_logger()


class Notifier:
    """Talks to the service manager named by NOTIFY_SOCKET, if any."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = _address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval = _watchdog_interval(env)
        self._sock: socket.socket | None = None
        self._last_watchdog = 0.0
        self._last_status = ""

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` fields in one datagram; False if not sent."""
        if self.address is None:
            return False
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            log.warning("notify.failed", error=str(exc), socket=str(self.address))
            return False
        return True

    def ready(self, status: str = "") -> None:
        fields = ["READY=1", f"MAINPID={os.getpid()}"]
        if status:
            fields.append(f"STATUS={status}")
            self._last_status = status
        self.send(*fields)

    def status(self, text: str) -> None:
        """Update STATUS= (only when it changed)."""
        if text != self._last_status:
            self._last_status = text
            self.send(f"STATUS={text}")

    def extend(self, seconds: float) -> None:
        """Ask for ``seconds`` more to start (or stop): a long log replay
        must not run into TimeoutStartSec."""
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def watchdog(self, now: float, healthy: bool) -> None:
        """Pet the watchdog at half its interval, and only while healthy:
        a hung loop then gets the service restarted."""
        if self.watchdog_interval is None or not healthy:
            return
        if now - self._last_watchdog >= self.watchdog_interval / 2:
            self._last_watchdog = now
            self.send("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _address(value: str) -> str | bytes | None:
    if not value:
        return None
    if value.startswith("@"):  # abstract namespace
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def _watchdog_interval(env: os._Environ[str] | dict[str, str]) -> float | None:
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1_000_000 if value > 0 else None
