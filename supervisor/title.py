"""A process's title in ps and top: a leaf module, so that a process that
only names itself (the broker started by ``corral broker``) need not
import what :mod:`corral.supervisor.process` needs (psutil)."""

from __future__ import annotations

__all__ = ["set_title"]


def set_title(title: str) -> None:
    """Show ``title`` in ps and top (argv and the kernel's comm name);
    nothing where setproctitle is not installed."""
    try:
        import setproctitle
    except ImportError:
        return
    setproctitle.setproctitle(title)
