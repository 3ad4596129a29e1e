"""One user of a state directory at a time: an exclusive flock on
``state_dir/broker.lock``, held by the broker while it runs and by the
offline log tools (``corral log verify|repair|compact``) while they work.

The file holds the holder's pid and what it is (``12345 broker``), so the
one refused can say who holds it. The lock goes with the process, crash
included. A release (a clean stop) unlinks the file while it still holds
the lock, so the file exists only while someone holds it, or after a
crash (then it stays: the next holder takes it over, as flock is free).

Unlinking a lock file races with a starter that opened it just before:
once the holder lets go, that starter's flock succeeds on a file no longer
at the path, while a later starter creates and locks a new one. So a
starter checks, once it holds the lock, that the file it locked is the one
at the path (same device and inode), and opens the path again if not; a
holder never unlinks a file other than its own.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from corral.broker.framing import make_dirs
from corral.errors import CorralError

#: What the broker writes as its name in the lock file.
BROKER = "broker"
#: Times a starter opens the path again after locking a file unlinked meanwhile.
_REOPENS = 100


class StateDirBusy(CorralError):
    """Another process (a broker, or a log tool) holds the state directory.
    ``pid`` and ``holder`` are what its lock file says (``holder`` is
    ``broker`` or the log tool's command line)."""

    def __init__(self, message: str, pid: str, holder: str) -> None:
        super().__init__(message)
        self.pid = pid
        self.holder = holder


class StateDirLock:
    """An advisory lock on ``state_dir/broker.lock``, released on exit or crash.

    ``owner`` names the holder in the lock file: :data:`BROKER`, or a log
    tool's command such as ``corral log repair``."""

    def __init__(self, state_dir: Path, owner: str = BROKER) -> None:
        self.path = Path(state_dir) / "broker.lock"
        self.owner = owner
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, creating the state directory durably if needed.
        Raises :class:`StateDirBusy` naming the holder."""
        make_dirs(self.path.parent)
        for _ in range(_REOPENS):
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.read(fd, 256).decode(errors="replace").strip()
                os.close(fd)
                pid, _, holder = text.partition(" ")
                raise self._busy(pid or "unknown", holder or BROKER) from None
            if self._at_path(fd):
                break
            os.close(fd)  # its holder unlinked it as it stopped: lock the path's file
        else:
            raise CorralError(f"cannot lock {self.path}: it is replaced again and again")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {self.owner}\n".encode())
        self._fd = fd

    def _open(self) -> int:
        """The lock file, created if missing (owned by the state directory's
        owner when root creates it)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if os.geteuid() == 0:  # a log tool run as root: the broker's user must open it later
            state = os.stat(self.path.parent)
            os.fchown(fd, state.st_uid, state.st_gid)
        return fd

    def _at_path(self, fd: int) -> bool:
        """Whether ``fd`` is the file at :attr:`path` now (not one unlinked)."""
        held = os.fstat(fd)
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            return False
        return (held.st_dev, held.st_ino) == (current.st_dev, current.st_ino)

    def _busy(self, pid: str, holder: str) -> StateDirBusy:
        where = self.path.parent
        if self.owner == BROKER and holder == BROKER:
            message = (
                f"another broker (pid {pid}) is using {where}; "
                "stop it first, or give this one another broker.state_dir"
            )
        elif self.owner == BROKER:
            message = (
                f"`{holder}` (pid {pid}) is working on {where}; "
                "start the broker again when it has finished"
            )
        elif holder == BROKER:
            message = (
                f"a running broker (pid {pid}) holds {self.path}: `{self.owner}` works only on"
                " a stopped broker's log. Nothing was read or changed; stop the broker (or the"
                " `corral run` daemon or systemd unit that runs it), then run this again"
            )
        else:
            message = (
                f"`{holder}` (pid {pid}) holds {self.path}; nothing was read or changed: wait"
                " for it to finish, then run this again"
            )
        return StateDirBusy(message, pid, holder)

    def release(self) -> None:
        """Unlink the lock file, then let the lock go (see the module
        docstring); call it last, once nothing else in the state directory
        is touched. A file that cannot be unlinked is left: it is harmless."""
        if self._fd is None:
            return
        try:
            if self._at_path(self._fd):
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
