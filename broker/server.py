"""The broker process: one thread, one loop, two ROUTER sockets.

The loop polls both sockets, then runs one pass of the
:class:`~corral.broker.core.BrokerCore` over every ready message (up to a
budget): handle, tick, commit the log once (group commit), send the
replies, dispatch. Nothing that promises durability leaves before the
fsync that covers it. This module owns what the core does not: the state
directory's lock and modes, the sockets and their CURVE key ring
(:mod:`corral.broker.auth`, re-read on SIGHUP), signals, and the exit on a
failed fsync.
"""

from __future__ import annotations

import os
import signal
import socket
from collections import Counter
from collections.abc import Iterator
from typing import Any, cast

import structlog
import zmq

from corral.broker import access
from corral.broker.auth import KeyRing
from corral.broker.clock import Clock
from corral.broker.core import CLIENT, WORKER, BrokerCore
from corral.broker.lockfile import StateDirLock
from corral.broker.log import FsyncFailed, LogError
from corral.transport import bind_router

log = structlog.get_logger()

#: Messages handled per socket per pass before the loop commits and replies.
DRAIN_BUDGET = 20_000


class Broker:
    """Owns the sockets and the loop around a :class:`BrokerCore`."""

    def __init__(
        self,
        config: Any,
        *,
        context: zmq.Context[Any] | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.config = config
        self.core = BrokerCore(config, clock=clock)
        self._ctx = context
        self._own_ctx = context is None
        self._lock = StateDirLock(self.core.state_dir)
        self._stopping = False
        self.client_sock: zmq.Socket[Any] | None = None
        self.worker_sock: zmq.Socket[Any] | None = None
        self._poller = zmq.Poller()
        self._wake_r: socket.socket | None = None
        self._keys: KeyRing | None = None
        self._reload_keys = False

    @property
    def broker_id(self) -> str:
        return self.core.broker_id

    @property
    def stats(self) -> Counter[str]:
        return self.core.stats

    # ---------------------------------------------------------- lifecycle

    def open(self) -> None:
        """Check the key directories, lock the state dir (made owner-only),
        replay the log, and bind both endpoints. Raises ConfigError."""
        bc = self.config.broker
        keys = KeyRing(self.config)  # before a long replay: a bad key dir fails fast
        access.prepare_state_dir(bc)
        self._lock.acquire()
        self.core.replay()
        if self._ctx is None:
            self._ctx = zmq.Context()
        if keys:
            keys.start(self._ctx)
            self._keys = keys
        self.client_sock = self._bind(bc.client_endpoint, CLIENT)
        self.worker_sock = self._bind(bc.worker_endpoint, WORKER)
        self._poller.register(self.client_sock, zmq.POLLIN)
        self._poller.register(self.worker_sock, zmq.POLLIN)
        self.core.attach(
            RouterLink(self.client_sock, self.core.stats, "replies"),
            RouterLink(self.worker_sock, self.core.stats, "worker_sends"),
        )
        log.info(
            "broker.listening",
            client_endpoint=bc.client_endpoint,
            worker_endpoint=bc.worker_endpoint,
            fsync=bc.fsync,
            broker_id=self.broker_id,
        )

    def _bind(self, endpoint: str, side: str) -> zmq.Socket[Any]:
        """Bind one endpoint, in its side's ZAP domain; an ipc socket file
        gets the mode and group the config asks for."""
        assert self._ctx is not None
        bc = self.config.broker
        access.prepare_socket_dir(endpoint, bc)
        sock: zmq.Socket[Any] = bind_router(
            self._ctx, endpoint, self.config, bc.max_message_size, KeyRing.domain(side)
        )
        access.secure_socket(endpoint, bc)
        return sock

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT stop the loop at the end of its pass, SIGHUP
        re-reads the key directories; the handlers only set a flag and wake
        the poll through a socket pair."""
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        self._wake_r = wake_r
        self._wake_w = wake_w
        signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        self._poller.register(wake_r, zmq.POLLIN)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        if signum == signal.SIGHUP:
            self._reload_keys = True
        else:
            self._stopping = True

    def reload_keys(self) -> None:
        """Re-read the key directories (what SIGHUP does): a removed key's
        connections are refused from their next message, an added key
        connects at once."""
        self._reload_keys = False
        if self._keys is None:
            log.info("broker.keys_reload_skipped", reason="no CURVE endpoint")
            return
        self._keys.reload()

    def stop(self) -> None:
        self._stopping = True

    def run(self) -> None:
        """The loop; returns after a stop request, with the log synced. A
        failed fsync or a log write that fails even into the reserve ends
        the process with exit code 70 (never retried: a restart replays)."""
        try:
            while not self._stopping:
                self._poller.poll(int(self.core.poll_timeout() * 1000))
                if self._wake_r is not None:
                    self._drain_wakeups()
                if self._reload_keys:
                    self.reload_keys()
                self.run_pass()
        except FsyncFailed as exc:
            log.critical(
                "broker.fsync_failed",
                error=str(exc),
                hint="exiting without retrying the fsync; a restart replays the log",
            )
            os._exit(70)
        except LogError as exc:  # e.g. the disk filled even the reserve
            log.critical(
                "broker.log_write_failed",
                error=str(exc),
                hint="exiting; nothing acknowledged is lost, a restart replays the log",
            )
            os._exit(70)
        self.close()

    def run_pass(self) -> None:
        """One pass of the core over what the sockets hold now."""
        self.core.run_pass(self._inbound())

    def poll_timeout(self) -> float:
        return self.core.poll_timeout()

    def close(self) -> None:
        for sock in (self.client_sock, self.worker_sock):
            if sock is not None:
                sock.close(linger=0)
        self.client_sock = self.worker_sock = None
        if self._keys is not None:
            self._keys.stop()
            self._keys = None
        self.core.close()
        if self._own_ctx and self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        self._lock.release()
        log.info("broker.stopped")

    def _drain_wakeups(self) -> None:
        assert self._wake_r is not None
        try:
            while self._wake_r.recv(512):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _inbound(self) -> Iterator[tuple[str, list[bytes]]]:
        """Every message ready on either socket, workers first, up to the
        budget: read lazily, so each is handled before the next is read."""
        assert self.client_sock is not None and self.worker_sock is not None
        budget = DRAIN_BUDGET
        sockets = ((self.worker_sock, WORKER), (self.client_sock, CLIENT))
        while budget > 0:
            idle = True
            for sock, side in sockets:
                if not cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                    continue
                try:
                    frames = self._recv(sock, side)
                except zmq.Again:
                    continue
                idle = False
                budget -= 1
                if frames is not None:
                    yield side, frames
            if idle:
                return

    def _recv(self, sock: zmq.Socket[Any], side: str) -> list[bytes] | None:
        """One message, or None when the key ring refuses its sender (a key
        removed since it connected). Raises zmq.Again."""
        keys = self._keys
        if keys is None or not keys.checks(side):
            return sock.recv_multipart(zmq.NOBLOCK)
        frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        if not keys.admits(side, frames):
            self.core.stats["auth_refused"] += 1
            self.core.key_revoked(side, frames[0].bytes)
            return None
        return [frame.bytes for frame in frames]


class RouterLink:
    """Sends on a ROUTER socket with ROUTER_MANDATORY: a full peer (EAGAIN)
    or a gone one (EHOSTUNREACH) is "not sent", counted as
    ``<name>_blocked`` / ``<name>_unroutable``, never an exception."""

    def __init__(self, sock: zmq.Socket[Any], stats: Counter[str], name: str) -> None:
        self.sock = sock
        self.stats = stats
        self._blocked = f"{name}_blocked"
        self._unroutable = f"{name}_unroutable"

    def send(self, identity: bytes, body: bytes) -> bool:
        try:
            self.sock.send_multipart((identity, body), zmq.NOBLOCK)
        except zmq.Again:
            self.stats[self._blocked] += 1
            return False
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            self.stats[self._unroutable] += 1
            return False
        return True
