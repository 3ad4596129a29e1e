"""What the broker's helper processes (the compaction child, the segment
indexer) share: dying with the broker."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

__all__ = ["die_with_parent"]

#: prctl(2)'s option: the signal the kernel sends this process when its
#: parent dies (Linux).
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Be killed by the kernel when the broker (pid ``parent``) dies, so a
    helper process never outlives it (Linux; elsewhere nothing is set);
    exit at once if it is gone already."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)
