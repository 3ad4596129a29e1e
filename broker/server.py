"""The broker process: one thread, one loop, two ROUTER sockets.

The loop polls both sockets, then runs one pass of the
:class:`~corral.broker.core.BrokerCore` over every ready message (up to a
budget): handle, tick, commit the log once (group commit), send the
replies, dispatch. Nothing that promises durability leaves before the
fsync that covers it. This module owns what the core does not: the state
directory's lock and modes, the sockets and their CURVE key ring
(:mod:`corral.broker.auth`, re-read on SIGHUP), the events publisher
(:mod:`corral.broker.events`), signals, and the exit on a failed fsync.

A clean stop (SIGTERM, SIGINT) closes the sockets and the log, then
unlinks the ipc socket files this broker bound and, last, its lock file
(while still holding it: see :mod:`corral.broker.lockfile`), so it leaves
neither behind; so does a start that fails at an endpoint (one that
cannot be bound, a key file that cannot be used: a ConfigError naming the
setting). A crash leaves both: the next broker takes the lock over and
binds over the socket files.

Hostile or runaway peers (see ``tests/faults/test_hostile*.py``) are met
here by bounds, none of which drops a message silently:

- a pass reads at most :data:`DRAIN_BUDGET` messages, for at most
  :data:`PASS_SECONDS`, and stops once its held replies reach
  :data:`REPLY_BYTES`: a flood delays a legitimate request by one short
  pass at most, not by the flood (ZeroMQ's fair queueing takes one message
  per peer in turn), and the replies a pass holds stay bounded;
- a message of more than two frames is read no further than its third: the
  rest are let go uncopied, and it is counted malformed;
- each endpoint holds at most ``broker.max_connections`` connections, a
  peer that left counted until what it sent is read; one past that is
  refused at its handshake (:mod:`corral.broker.gate`, the broker's ZAP
  handler, which the loop serves on every turn);
- per peer, ZeroMQ holds at most its receive high-water mark of messages
  (100: then the peer is pushed back, nothing is lost) and its send
  high-water mark (1,000 replies to a client, then a reply is counted
  ``replies_blocked``; 100,000 messages to a worker, then a delivery is
  not leased and goes out later); each frame is at most
  ``broker.max_message_size`` (``ZMQ_MAXMSGSIZE``: a peer that sends a
  larger one is disconnected);
- once a flood is over, the memory it took is handed back to the system
  (``malloc_trim``), at most every :data:`TRIM_EVERY` seconds;
- ``ROUTER_HANDOVER`` stays off: a worker takes a fresh random identity on
  every connection, so nobody needs a live identity handed over, and no
  peer can take over another's (and with it the deliveries meant for it).

The tables kept per peer (workers, parked result waits, supervisors, task
names) bound themselves; see their modules.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import signal
import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import structlog
import zmq

from corral.broker import access
from corral.broker.auth import EVENTS, KeyRing
from corral.broker.clock import Clock
from corral.broker.core import CLIENT, WORKER, BrokerCore
from corral.broker.events import Events, Publisher
from corral.broker.gate import Gate, Tally, raise_file_limit
from corral.broker.lockfile import StateDirLock
from corral.broker.log import FsyncFailed, LogCorrupt, LogError
from corral.errors import ConfigError
from corral.transport import CLIENT_SNDHWM, bind_router, load_server_keys

log = structlog.get_logger()

#: Messages handled per pass (both sockets) before the loop commits and replies.
DRAIN_BUDGET = 20_000
#: Longest a pass reads messages before it commits and replies (seconds).
PASS_SECONDS = 0.05
#: A pass stops reading once the replies it holds reach this size (bytes).
REPLY_BYTES = 16 * 1024 * 1024
#: Frames in a message: [identity, body]. A message with more is read no
#: further than one frame past this.
FRAMES = 2
#: Messages read since the last trim before an idle loop trims the heap.
TRIM_AFTER = 1_000
#: Least seconds between two trims of the heap.
TRIM_EVERY = 10.0
#: zmq.NOBLOCK as a plain int: pyzmq's flag enums cost a conversion per call.
_NOBLOCK = int(zmq.NOBLOCK)
_NOBLOCK_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)
#: While passes end on their budget (a flood), seconds a status is given
#: again when nothing it shows changed (see ClientService._encoded_status).
STATUS_MAX_AGE = 0.5


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
        #: The client and worker sockets alone, for the pass's reads.
        self._inbound_poller = zmq.Poller()
        self._wake_r: socket.socket | None = None
        #: Its file descriptor: how a zmq.Poller names a plain socket in
        #: what ``poll`` returns (never the socket object); -1: none.
        self._wake_fd = -1
        self._keys: KeyRing | None = None
        self._gate: Gate | None = None
        #: Each endpoint's connections, as its gate counts them (see Gate).
        self._tallies: dict[str, Tally] = {}
        self._reload_keys = False
        #: The events publisher (``broker.events_endpoint``), once bound.
        self.events: Events | None = None
        #: The ipc socket files this broker bound: (path, device, inode).
        self._socket_files: list[tuple[Path, int, int]] = []
        #: Messages read since the heap was last trimmed, and when that was.
        self._since_trim = 0
        self._trimmed_at = 0.0
        #: The last pass ended on its budget, not because all was read.
        self._loaded = False

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
        # before a long replay, a bad key dir or key file fails fast
        keys = KeyRing(self.config)
        publisher = (
            Publisher(bc.events_endpoint, self.config, KeyRing.domain(EVENTS))
            if bc.events_endpoint
            else None
        )
        access.prepare_state_dir(bc)
        self._lock.acquire()
        self.core.replay()
        try:
            self._open_sockets(keys, publisher)
        except BaseException:
            self._release()  # no socket or lock file left by a start that failed
            raise
        log.info(
            "broker.listening",
            client_endpoint=bc.client_endpoint,
            worker_endpoint=bc.worker_endpoint,
            fsync=bc.fsync,
            broker_id=self.broker_id,
        )

    def _open_sockets(self, keys: KeyRing, publisher: Publisher | None) -> None:
        """Start the ZAP handler (key sets and connection caps), bind both
        endpoints and the events one."""
        bc = self.config.broker
        if self._ctx is None:
            self._ctx = zmq.Context()
        if keys:
            self._keys = keys
            keys.log_loaded()
        raise_file_limit(bc.max_connections)
        self._gate = Gate(self._ctx, self._keys, bc.max_connections, self.core.stats)
        self.client_sock = self._bind(bc.client_endpoint, CLIENT)
        self.worker_sock = self._bind(bc.worker_endpoint, WORKER)
        for sock in self._gate.sockets:
            self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self.client_sock, zmq.POLLIN)
        self._poller.register(self.worker_sock, zmq.POLLIN)
        for sock in (self.worker_sock, self.client_sock):
            self._inbound_poller.register(sock, zmq.POLLIN)
        self.core.attach(
            RouterLink(self.client_sock, self.core.stats, "replies"),
            RouterLink(self.worker_sock, self.core.stats, "worker_sends"),
        )
        if publisher is not None:
            self._open_events(publisher)

    def _bind(self, endpoint: str, side: str) -> zmq.Socket[Any]:
        """Bind one endpoint, in its side's ZAP domain; an ipc socket file
        gets the mode and group the config asks for. Raises ConfigError
        naming the setting."""
        assert self._ctx is not None
        bc = self.config.broker
        access.prepare_socket_dir(endpoint, bc)
        gate = self._gate
        assert gate is not None
        domain = KeyRing.domain(side)
        try:
            sock: zmq.Socket[Any] = bind_router(
                self._ctx,
                endpoint,
                self.config,
                bc.max_message_size,
                domain,
                before_bind=lambda sock: gate.watch(sock, domain),
                **({"sndhwm": CLIENT_SNDHWM} if side == CLIENT else {}),
            )
        except ConfigError as exc:
            raise ConfigError(f"broker.{side}_endpoint: {exc}") from None
        self._tallies[side] = gate.tallies[domain]
        self._own_socket_file(endpoint)
        try:
            access.secure_socket(endpoint, bc)
        except BaseException:
            sock.close(linger=0)  # else the context's term() waits for it for good
            raise
        return sock

    def _open_events(self, publisher: Publisher) -> None:
        """Publish events on ``broker.events_endpoint``: an ipc socket file
        gets the mode and group of the others, a tcp endpoint CURVE
        (subscribers need a client key). Raises ConfigError naming the
        setting when it cannot be bound, as the other endpoints do."""
        assert self._ctx is not None
        sock = publisher.bind(self._ctx)
        self.events = Events(sock, functools.partial(publisher.socket, self._ctx))
        self._own_socket_file(publisher.endpoint)
        access.secure_socket(publisher.endpoint, self.config.broker)
        self.core.attach_events(self.events)
        log.info("events.publishing", endpoint=publisher.endpoint)

    def _own_socket_file(self, endpoint: str) -> None:
        """Note the socket file an ipc:// bind made, to unlink it on a clean stop."""
        path = access.ipc_path(endpoint)
        if path is not None:
            made = path.stat()
            self._socket_files.append((path, made.st_dev, made.st_ino))

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT stop the loop at the end of its pass, SIGHUP
        re-reads the key directories; the handlers only set a flag and wake
        the poll through a socket pair."""
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        self._wake_r = wake_r
        self._wake_w = wake_w
        self._wake_fd = wake_r.fileno()
        signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        self._poller.register(self._wake_fd, zmq.POLLIN)
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
        subscribers = self._keys.keys(EVENTS)
        self._keys.reload()
        if self.events is not None and subscribers - self._keys.keys(EVENTS):
            self.events.drop_subscribers(time.monotonic())  # a PUB cannot refuse one peer
            log.info("events.subscribers_dropped", reason="a subscriber key was revoked")
        self._check_server_key()

    def _check_server_key(self) -> None:
        """Say so when the broker's key file would stop a start now (a
        SIGHUP is when an operator expects files to be read): the running
        broker keeps the key pair it read at its start and serves on."""
        try:
            load_server_keys(self.config)
        except ConfigError as exc:
            log.error(
                "broker.server_key_unusable",
                error=str(exc),
                hint="the broker keeps the key it read at its start and serves on, "
                "but would not start again: fix the file",
            )

    def stop(self) -> None:
        self._stopping = True

    def run(self) -> None:
        """The loop; returns after a stop request, with the log synced. A
        failed fsync, a log write that fails even into the reserve, or a log
        found damaged under the broker (a cold batch that no longer reads
        back) ends the process with exit code 70 (never retried: a restart
        replays)."""
        try:
            while not self._stopping:
                ready = dict(self._poller.poll(int(self.core.poll_timeout() * 1000)))
                if self._gate is not None:
                    self._gate.serve(any(sock in ready for sock in self._gate.sockets))
                if self._wake_fd in ready:  # (a recv finding nothing costs a syscall a turn)
                    self._drain_wakeups()  # else it stays readable: every poll returns at once
                if self._reload_keys:
                    self.reload_keys()
                if self.events is not None and self.events.unbound:
                    self.events.bind_again(time.monotonic())
                self.run_pass()
        except FsyncFailed as exc:
            log.critical(
                "broker.fsync_failed",
                error=str(exc),
                hint="exiting without retrying the fsync; a restart replays the log",
            )
            os._exit(70)
        except LogCorrupt as exc:  # e.g. a cold batch's base changed under the broker
            log.critical("broker.log_corrupt", error=str(exc))
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
        """One pass of the core over what the sockets hold now; an idle one
        after a flood gives the flood's memory back."""
        read = self._since_trim
        self._loaded = False
        self.core.run_pass(self._inbound())
        # While passes end on their budget, a status may be given again for
        # up to STATUS_MAX_AGE if nothing it shows changed.
        self.core.service.status_max_age = STATUS_MAX_AGE if self._loaded else 0.0
        if self._since_trim == read and self._since_trim >= TRIM_AFTER:
            self._trim()

    def _trim(self) -> None:
        """Hand the heap's free memory back to the system (glibc's
        ``malloc_trim``; nothing elsewhere): the flood's messages were freed
        but their pages stay with the process otherwise."""
        now = time.monotonic()
        if now - self._trimmed_at < TRIM_EVERY:
            return
        self._trimmed_at = now
        self._since_trim = 0
        trim = _malloc_trim()
        if trim is not None:
            trim(0)
            self.stats["heap_trims"] += 1

    def poll_timeout(self) -> float:
        return self.core.poll_timeout()

    def close(self) -> None:
        """Close the sockets and the log, then unlink the socket files and,
        last, the lock file (see the module docstring)."""
        self._release()
        log.info("broker.stopped")

    def _release(self) -> None:
        """What :meth:`close` does, once the log is replayed and the lock held."""
        if self.events is not None:
            self.events.close()
            self.events = None
        for sock in (self.client_sock, self.worker_sock):
            if sock is not None:
                sock.close(linger=0)
        self.client_sock = self.worker_sock = None
        if self._gate is not None:
            self._gate.close()
            self._gate = None
        self._keys = None
        self.core.close()
        if self._own_ctx and self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        self._unlink_socket_files()
        self._lock.release()

    def _unlink_socket_files(self) -> None:
        """Unlink the socket files this broker bound that are still its own
        (same inode): it still holds the lock, so no other broker bound
        them since."""
        for path, device, inode in self._socket_files:
            try:
                now = path.stat()
                if (now.st_dev, now.st_ino) == (device, inode):
                    path.unlink()
            except OSError:
                continue
        self._socket_files.clear()

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
        until = time.monotonic() + PASS_SECONDS
        replies = self.core.replies
        tallies = self._tallies
        sockets = (
            (self.worker_sock, WORKER, tallies[WORKER]),
            (self.client_sock, CLIENT, tallies[CLIENT]),
        )
        # One zmq_poll per round says which of the two sockets hold a
        # message (asking each for ZMQ_EVENTS costs pyzmq an enum per call).
        poll = self._inbound_poller.poll
        while budget > 0:
            ready = dict(poll(0))
            idle = True
            for sock, side, tally in sockets:
                if sock not in ready:
                    tally.emptied()
                    continue
                frames = self._recv(sock, side)
                if frames is None:
                    tally.emptied()
                    continue
                idle = False
                budget -= 1
                tally.reads += 1
                self._since_trim += 1
                if frames:  # [] : read, and refused by the key ring
                    yield side, frames
            if idle:
                return
            if budget <= 0 or time.monotonic() > until or replies.size >= REPLY_BYTES:
                self._loaded = True
                return

    def _recv(self, sock: zmq.Socket[Any], side: str) -> list[bytes] | None:
        """One message's frames; None when there is none. A message the key
        ring refuses (its sender's key was removed since it connected) is
        read, counted (``auth_refused``) and returned as []."""
        keys = self._keys
        if keys is None or not keys.checks(side):
            return _recv(sock)
        frames = _recv(sock, copy=False)
        if frames is None:
            return None
        if not keys.admits(side, frames):
            self.core.stats["auth_refused"] += 1
            self.core.key_revoked(side, frames[0].bytes)
            return []
        return [frame.bytes for frame in frames]


def _recv(sock: zmq.Socket[Any], copy: bool = True) -> list[Any] | None:
    """The next message's frames, as bytes (``copy=False``: as zmq.Frame, whose
    User-Id the key ring reads); None: there is none. Past :data:`FRAMES` + 1
    frames the rest are let go: the message is malformed anyway, and the
    core counts it so. Frames are read uncopied and told apart by their
    ``more`` flag, which is cheaper than asking the socket for ``RCVMORE``."""
    try:
        frame = sock.recv(_NOBLOCK, copy=False)
    except zmq.Again:
        return None
    frames = [frame]
    while frame.more:
        frame = sock.recv(0, copy=False)
        if len(frames) <= FRAMES:
            frames.append(frame)
    return [f.bytes for f in frames] if copy else frames


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None on another C library."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


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
        return self._send((identity, body), copy=True)

    def send_frames(self, identity: bytes, frames: tuple[bytes, ...]) -> bool:
        """Frames over pyzmq's copy threshold (64 KiB) go without a copy:
        libzmq holds a reference to the bytes object until sent."""
        return self._send((identity, *frames), copy=False)

    def _send(self, frames: tuple[bytes, ...], copy: bool) -> bool:
        # Frame by frame with plain int flags (send_multipart ORs pyzmq's
        # flag enums per frame). A ROUTER refuses a message (full or gone
        # peer) at its first frame; once that is taken the rest go too.
        sock = self.sock
        last = len(frames) - 1
        try:
            for i, frame in enumerate(frames):
                sock.send(frame, _NOBLOCK_MORE if i < last else _NOBLOCK, copy=copy)
        except zmq.Again:
            self.stats[self._blocked] += 1
            return False
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            self.stats[self._unroutable] += 1
            return False
        return True
