"""Who on this host may reach the broker: the modes of its state directory
and of its ipc:// socket files.

By default both are the owner's alone: the state directory 0700, each
socket file 0600 (the broker process also runs under a 0077 umask, so
nothing it writes is readable by others). ``broker.socket_mode`` and
``broker.socket_group`` open the sockets to a group, or to everyone
(``socket_group`` alone means 0660). A directory the broker creates for a
socket (with each missing parent it creates on the way), and the state
directory when a socket lives in it (with the parents the broker creates
for it), then open for traversal only (``x``, never ``r`` or ``w``) to the same people: they can
reach the socket, not list the directory or read the log by name in a
directory they cannot read (the log files themselves are 0600).

The broker refuses a state directory that everyone may write: anyone could
have replaced its log or its lock.
"""

from __future__ import annotations

import grp
import os
import stat
from pathlib import Path
from typing import Any

from corral.broker.framing import make_dirs
from corral.errors import ConfigError

#: A socket file's mode when the config gives none: the owner's alone.
OWNER_ONLY = 0o600
#: ... and when it names a socket_group: the owner's and the group's.
WITH_GROUP = 0o660


def socket_mode(broker: Any) -> int:
    """The mode of the ipc:// socket files (``broker`` is the [broker] section)."""
    if broker.socket_mode is not None:
        return int(broker.socket_mode)
    return WITH_GROUP if broker.socket_group else OWNER_ONLY


def socket_gid(broker: Any) -> int | None:
    """The gid of ``broker.socket_group``, or None. Raises ConfigError for a
    group the system does not know."""
    if not broker.socket_group:
        return None
    try:
        return grp.getgrnam(broker.socket_group).gr_gid
    except KeyError:
        raise ConfigError(
            f"broker.socket_group: no group named {broker.socket_group!r} on this host; "
            "create it (groupadd) or name another"
        ) from None


def directory_mode(mode: int) -> int:
    """The mode of a directory holding sockets of ``mode``: 0700, plus
    search (``x``) for the group and others the sockets open to."""
    return 0o700 | (0o010 if mode & 0o070 else 0) | (0o001 if mode & 0o007 else 0)


def ipc_path(endpoint: str) -> Path | None:
    """The socket file of an ipc:// endpoint, else None."""
    return Path(endpoint[len("ipc://") :]) if endpoint.startswith("ipc://") else None


def prepare_state_dir(broker: Any) -> None:
    """Create the state directory (0700, or searchable by those the
    sockets below it open to), or bring an existing one to that mode.

    Raises ConfigError, naming the directory and the command to run, for a
    directory that everyone may write or that the broker cannot chmod."""
    state_dir = Path(broker.state_dir).absolute()
    socket_gid(broker)  # an unknown group fails here, before anything is made
    if state_dir.is_dir():
        current = stat.S_IMODE(state_dir.stat().st_mode)
        if current & 0o002:
            raise ConfigError(
                f"broker.state_dir {state_dir} is writable by everyone (mode {current:o}), "
                f"so anyone could have replaced its log; check what is in it, then run "
                f"`chmod 700 {state_dir}`"
            )
        _give_mode(state_dir, broker, "broker.state_dir")
    else:
        _make_dirs(state_dir, broker, "broker.state_dir")


def prepare_socket_dir(endpoint: str, broker: Any) -> None:
    """Create the missing directory of an ipc:// socket, searchable by those
    the socket opens to (an existing one is left as it is)."""
    path = ipc_path(endpoint)
    if path is None or path.parent.is_dir():
        return
    _make_dirs(path.parent, broker, f"the directory of {endpoint}")


def _sockets(broker: Any) -> list[Path]:
    """The absolute paths of the broker's ipc:// socket files."""
    endpoints = (broker.client_endpoint, broker.worker_endpoint, broker.events_endpoint)
    return [path.absolute() for e in endpoints if (path := ipc_path(e or "")) is not None]


def _make_dirs(directory: Path, broker: Any, what: str) -> None:
    """Create ``directory`` and its missing parents, each given its mode
    (see :func:`_give_mode`): one left to the 0077 umask would shut out the
    very people a socket below it opens to. Raises ConfigError."""
    directory = directory.absolute()
    missing = []
    while not directory.is_dir():
        missing.append(directory)
        directory = directory.parent
    for new in reversed(missing):
        make_dirs(new, 0o700)
        _give_mode(new, broker, what)


def _give_mode(directory: Path, broker: Any, what: str) -> None:
    """0700, or searchable (and owned by ``socket_group``) for those the
    sockets below ``directory`` open to. Raises ConfigError."""
    below = any(directory in path.parents for path in _sockets(broker))
    mode = directory_mode(socket_mode(broker)) if below else 0o700
    _set_mode(directory, mode, socket_gid(broker) if mode & 0o010 else None, what)


def secure_socket(endpoint: str, broker: Any) -> None:
    """Give a bound ipc:// socket file its mode and group. Raises ConfigError."""
    path = ipc_path(endpoint)
    if path is None:
        return
    _set_mode(path, socket_mode(broker), socket_gid(broker), endpoint)


def _set_mode(path: Path, mode: int, gid: int | None, what: str) -> None:
    try:
        if gid is not None:
            try:
                os.chown(path, -1, gid)
            except PermissionError:
                raise ConfigError(
                    f"broker.socket_group: cannot give {path} to group {_group_name(gid)!r}: "
                    "the broker's user is not a member of it (under systemd: "
                    "SupplementaryGroups=)"
                ) from None
        if stat.S_IMODE(path.stat().st_mode) != mode:
            os.chmod(path, mode)
    except OSError as exc:
        raise ConfigError(
            f"{what}: cannot set {path} to mode {mode:o}"
            + (f" and group {gid}" if gid is not None else "")
            + f": {exc.strerror or exc}; run corral as the owner of {path}"
        ) from None


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
