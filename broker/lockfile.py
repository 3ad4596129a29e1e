"""One broker per state directory: an exclusive flock held while it runs."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from corral.errors import CorralError


class StateDirBusy(CorralError):
    """Another broker holds the state directory."""


class StateDirLock:
    """An advisory lock on ``state_dir/broker.lock``, released on exit or crash."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / "broker.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StateDirBusy(
                f"another broker (pid {holder}) is using {self.path.parent}; "
                "stop it first, or give this one another broker.state_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
