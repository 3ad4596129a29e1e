"""The file operations the live log changes the disk with, in one place.

:class:`~corral.broker.log.Log` writes, syncs, truncates, renames, links
and removes its files only through a :class:`Files`, given to it as a
constructor parameter (as the broker's clock is). :class:`Files` is the
real thing, plain ``os`` calls. Tests give a layer that also keeps what was
not yet synced, so that they can play a power loss (SQLite's ``test6.c``
does the same): every change is still made on the real files, so reads
(replay, the compaction child, the tools) need no layer. Errors are the
``OSError`` of the call, unchanged.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from corral.broker.framing import fsync_dir


class Files:
    """The real file operations; paths are :class:`~pathlib.Path`, sizes
    and offsets bytes."""

    def open(self, path: Path, flags: int, mode: int = 0o644) -> int:
        return os.open(path, flags, mode)

    def close(self, fd: int) -> None:
        os.close(fd)

    def pwrite(self, fd: int, data: memoryview | bytes, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def ftruncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def fallocate(self, fd: int, size: int) -> None:
        """Reserve blocks for the first ``size`` bytes. Raises OSError,
        EOPNOTSUPP where the filesystem cannot."""
        fallocate = getattr(os, "posix_fallocate", None)
        if fallocate is None:
            raise OSError(errno.EOPNOTSUPP, "posix_fallocate is not available")
        fallocate(fd, 0, size)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def rename(self, src: Path, dst: Path) -> None:
        os.rename(src, dst)

    def link(self, src: Path, dst: Path) -> None:
        os.link(src, dst)

    def unlink(self, path: Path) -> None:
        """Remove ``path``; nothing if it is gone already."""
        path.unlink(missing_ok=True)

    def fsync_dir(self, directory: Path) -> None:
        """Make ``directory``'s entries durable; raises
        :class:`~corral.broker.framing.FsyncFailed`."""
        fsync_dir(directory)
