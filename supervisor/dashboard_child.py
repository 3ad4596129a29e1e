"""The dashboard of ``corral run`` (``[dashboard] listen`` set), as a child
process of the supervisor: forked with the config the daemon runs, started
after the broker and started again when it exits (with backoff: at once the
first time, then 1 s, 2 s ... up to 30 s; one that ran a minute starts
afresh). It dies with the supervisor (PR_SET_PDEATHSIG) and gets SIGTERM at
shutdown.

The supervisor binds the dashboard's address itself, once, at its start
(:meth:`DashboardChild.open`): an address it cannot bind stops ``corral
run`` with exit 2, naming ``dashboard.listen`` and the fix, as the broker's
endpoints and metrics do. Each dashboard process then serves on that
listening socket, so a dashboard started again never fails on its port (the
socket holds it, and queues connections meanwhile), and a reload that
changes ``[dashboard]`` cannot take it away: those keys apply at a restart
(:mod:`corral.supervisor.reloadable`). It is a web page, not the queue:
nothing else waits for it.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from corral.errors import ConfigError
from corral.supervisor.process import Child, stop_children

if TYPE_CHECKING:
    from corral.config.schema import Config

log = structlog.get_logger()

RESTART_BACKOFF = 1.0
RESTART_BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0


def listening_socket(listen: str, setting: str) -> socket.socket:
    """A TCP socket bound to ``listen`` ("HOST:PORT", an IPv6 host in
    brackets) and listening. Raises ConfigError naming ``setting``, the
    address and the fix when it cannot be bound."""
    from corral.config import split_listen
    from corral.supervisor.roles import listen_error

    host, port = split_listen(listen)
    try:
        sock = socket.create_server((host, port), family=listen_family(host), backlog=128)
    except OSError as exc:
        raise ConfigError(listen_error(setting, listen, exc)) from None
    return sock


def listen_family(host: str) -> socket.AddressFamily:
    """The address family to bind ``host`` in: IPv4 for a name that has
    both (``localhost``), as the broker's endpoints do. Raises OSError
    (socket.gaierror) for a name that does not resolve."""
    families = [info[0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)]
    return socket.AF_INET if socket.AF_INET in families else families[0]


class DashboardChild:
    """The dashboard process of ``corral run`` (see the module docstring).
    ``before_fork`` is called before each fork (to close what must not be
    inherited, such as a zmq context)."""

    def __init__(
        self,
        config: Config,
        sock: socket.socket,
        before_fork: Callable[[], None] = lambda: None,
    ) -> None:
        self.config = config
        self.sock = sock
        self.before_fork = before_fork
        self.child: Child | None = None
        self._started = 0.0
        self._next_start = 0.0
        self._backoff = 0.0

    @classmethod
    def open(cls, config: Config, before_fork: Callable[[], None] = lambda: None) -> DashboardChild:
        """Bind ``dashboard.listen``. Raises ConfigError (see :func:`listening_socket`)."""
        assert config.dashboard.listen is not None
        sock = listening_socket(config.dashboard.listen, "dashboard.listen")
        return cls(config, sock, before_fork)

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child is not None else None

    def owns(self, pid: int) -> bool:
        return self.child is not None and self.child.pid == pid

    def poll(self, now: float, *, may_fork: bool = True) -> None:
        """Start the dashboard if it is not running and its backoff is over
        (not while ``may_fork`` is false)."""
        if self.child is not None or now < self._next_start or not may_fork:
            return
        config, fd = self.config, self.sock.fileno()

        def target(_: int | None) -> int:
            from corral.dashboard.serve import run_dashboard

            return run_dashboard(config, fd)

        child = Child("dashboard", "corral: dashboard", target, keep_fds=(fd,))
        self.before_fork()
        try:
            child.start()
        except OSError as exc:
            log.error("supervisor.dashboard_cannot_start", error=str(exc))
            self._after_exit(now, ran=0.0)
            return
        self.child = child
        self._started = now
        log.info("supervisor.dashboard_started", pid=child.pid)

    def reaped(self, status: int, now: float) -> None:
        """The supervisor's waitpid found the dashboard gone (exit ``status``)."""
        assert self.child is not None
        self.child.reaped(status)
        log.warning(
            "supervisor.dashboard_exited", pid=self.child.pid, how=self.child.describe_exit()
        )
        self.child = None
        self._after_exit(now, now - self._started)

    def _after_exit(self, now: float, ran: float) -> None:
        if ran >= STABLE_AFTER:
            self._backoff = 0.0
        self._next_start = now + self._backoff
        self._backoff = min(RESTART_BACKOFF_MAX, max(RESTART_BACKOFF, self._backoff * 2))

    def stop(self, pause: Callable[[float], None], timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; the socket closes."""
        child, self.child = self.child, None
        if child is not None and child.alive:
            stop_children([child], timeout, pause)
        self.sock.close()
