"""Which Host header names the dashboard answers to (``[dashboard]
allowed_hosts``): the guard against DNS rebinding, where a page of another
site has its name made to resolve to the dashboard's address, and is then
the dashboard's own origin to the browser, free to read every page.

A request is answered only when its Host is an address (a rebinding page
is always reached by a name, so an address is always allowed) or a listed
name: ``"name"`` exactly, ``".example.com"`` (or ``"*.example.com"``) that
domain and every name below it, ``"*"`` any name (the guard off). Unset,
the list is the loopback names (``localhost`` and the names below
``.localhost``), the listen host when it is a name, and this machine's
host name when the dashboard listens on every address. Names compare
without case, a trailing dot or a port. Leaf module: stdlib only.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

#: The names every browser resolves to this machine itself.
LOOPBACK_NAMES = ("localhost", ".localhost")
#: Listen hosts meaning every address of this machine.
WILDCARDS = ("", "*", "0.0.0.0", "::")


def is_address(name: str) -> bool:
    """Whether ``name`` (brackets stripped) is an IPv4 or IPv6 address."""
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


def host_name(host: str | None) -> str:
    """A Host header's name: no port, brackets, case or trailing dot."""
    text = (host or "").strip().lower()
    if text.startswith("["):
        return text[1 : text.find("]")] if "]" in text else text[1:]
    if text.count(":") == 1:
        text = text.partition(":")[0]
    return text.rstrip(".")


class AllowedHosts:
    """The names of :mod:`this module <corral.dashboard.hosts>`'s doc."""

    def __init__(self, entries: Iterable[str]) -> None:
        self.entries: tuple[str, ...] = tuple(e.lower().rstrip(".") for e in entries)
        self.any = "*" in self.entries
        self._exact = {e for e in self.entries if not e.startswith((".", "*."))}
        self._domains = tuple(e.lstrip("*") for e in self.entries if e.startswith((".", "*.")))

    @classmethod
    def default(cls, listen_host: str) -> AllowedHosts:
        """The list when ``allowed_hosts`` is unset, for a dashboard that
        listens on ``listen_host``."""
        entries = list(LOOPBACK_NAMES)
        host = host_name(listen_host)
        if host in WILDCARDS:
            entries.append(socket.gethostname())
        elif not is_address(host):
            entries.append(host)
        return cls(entries)

    def names(self, host: str | None) -> bool:
        """Whether the name of Host ``host`` is listed (``"*"`` aside)."""
        name = host_name(host)
        return name in self._exact or any(name == d[1:] or name.endswith(d) for d in self._domains)

    def allows(self, host: str | None) -> bool:
        """Whether a request with Host ``host`` may be answered (no Host at
        all: a client that is not a browser, which no page can drive)."""
        if host is None or self.any:
            return True
        return is_address(host_name(host)) or self.names(host)

    def __str__(self) -> str:
        return ", ".join(self.entries)
