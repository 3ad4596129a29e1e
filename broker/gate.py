"""Who may connect to the broker: its ZAP handler, answered in the broker's loop.

Every connection to the client and worker endpoints (ipc ones too) and to
a CURVE events endpoint passes a ZAP handshake (RFC 27): libzmq asks the
handler bound at ``inproc://zeromq.zap.01`` in the socket's context
whenever the socket has a ZAP domain (``mechanism_base.cpp``,
``zap_required``), and with ``ZAP_ENFORCE_DOMAIN`` on it refuses every
connection while no handler is bound. :class:`Gate` is that handler. It
checks two things:

- on a CURVE endpoint, that the client's key is in its side's key set
  (:class:`~corral.broker.auth.KeyRing`; the reply's User-Id is the z85
  key, which :meth:`KeyRing.admits` checks again on each message);
- that the client and worker endpoints each have at most
  ``broker.max_connections`` connections open. A connection costs the
  broker about 28 KiB of libzmq's buffers and pipes, plus up to
  ``ROUTER_RCVHWM`` (:mod:`corral.transport`) messages read ahead for it,
  and a file descriptor: with no cap, thousands of peers connecting at once
  hold gigabytes (and libzmq 4.3 aborts the process when an ipc accept
  fails for want of a descriptor: ``ipc_listener.cpp`` asserts on EMFILE).

Connections are counted from each ROUTER's monitor socket (a
:class:`Tally` per endpoint): one ``ACCEPTED`` event per accepted
connection, one ``DISCONNECTED`` when it ends, however it ends (refused,
closed by the peer, timed out), preceded by a ``HANDSHAKE_FAILED_*`` event
when its handshake failed. A connection in its handshake counts, so this
one is counted when its ZAP request is answered: the requests are read
first, then the monitor events (libzmq's I/O thread sends a connection's
``ACCEPTED`` before its ZAP request), and a connection is admitted if the
count, itself included (and the requests answered after it not), is at
most the cap. The monitor's pipe has no high-water mark: libzmq's I/O
thread would block on a full one (``socket_base.cpp``, ``monitor_event``
sends without ``ZMQ_DONTWAIT``).

A connection that ended after its handshake still counts until what it
sent was read: libzmq keeps a gone peer's pipe, with up to
``ROUTER_RCVHWM`` messages, until the broker has read it. Without this, a
storm of peers that connect, send and leave fills the broker with pipes
while the cap sees next to no connections open. It is let go once the
loop found the socket empty a serve after the end was seen, or after
enough messages were read for fair queueing to have emptied its pipe
(:meth:`Tally.release`).

A refusal is ZAP status 400: libzmq sends the peer an ERROR and closes the
connection, and a DEALER does not connect again by itself after that (a
refused handshake is a protocol error to it: ``session_base.cpp``,
``engine_error``). A corral Client opens a new socket on its next request
after a timeout, a worker on its silence check, an AsyncClient after a
request that timed out with none other in flight.

Refusals are counted (``connections_refused``) and logged at most once per
:data:`REFUSAL_LOG_EVERY` seconds per endpoint (``broker.connections_full``,
naming the address of the last peer refused: on ipc it ends with the
``uid:gid:pid`` of the peer's process), so a runaway process can be found
without flooding the log.
"""

from __future__ import annotations

import resource
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
import zmq
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from corral.broker.auth import KeyRing
from corral.transport import ROUTER_RCVHWM

log = structlog.get_logger()

#: Where libzmq sends ZAP requests (RFC 27).
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
#: Seconds between two logs of refused connections on one endpoint.
REFUSAL_LOG_EVERY = 60.0
#: Descriptors the broker keeps beside its connections: log segments, the
#: lock, the events socket, a compaction's files, libzmq's own.
SPARE_FILES = 256
#: ZAP requests answered per serve, at most.
ZAP_BUDGET = 256
_VERSION = b"1.0"
# flags as plain ints: pyzmq's flag enums cost a conversion per call
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)
_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
_EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | _FAILED


@dataclass
class Tally:
    """The connections of one capped endpoint: open ones (from its
    monitor), and those that ended while messages they sent may still wait
    to be read. The broker's loop counts what it reads (:attr:`reads`) and
    calls :meth:`emptied` when the socket has nothing to read."""

    #: Connections accepted and not yet ended.
    open: int = 0
    #: Connections whose handshake failed (refused, timed out), their end not
    #: yet seen: libzmq reports the failure, then the end.
    failed: int = 0
    #: Ended connections still counted: (:attr:`reads` when the end was
    #: seen, the serve it was seen in), oldest first.
    draining: deque[tuple[int, int]] = field(default_factory=deque)
    #: Messages read from the socket since the start.
    reads: int = 0
    #: The last serve after which the socket was seen with nothing to read.
    empty_after: int = -1
    #: The serve the loop is in (set by Gate.serve).
    serving: int = 0

    def emptied(self) -> None:
        """The socket has nothing to read: every pipe is empty, those of
        ended connections included."""
        self.empty_after = self.serving

    def release(self, drain_reads: int) -> None:
        """Stop counting ended connections whose messages were all read:
        those seen ended before a serve after which the socket was found
        empty (one serve later, not the same one: libzmq sends a
        connection's ``DISCONNECTED`` just before it hands its last
        messages over), and those ended ``drain_reads`` messages ago or
        more (fair queueing reads one message of every pipe in turn, so a
        pipe of at most ``ROUTER_RCVHWM`` messages is empty after that many
        turns of at most ``max_connections`` pipes)."""
        draining = self.draining
        while draining and (
            draining[0][1] < self.empty_after or self.reads - draining[0][0] >= drain_reads
        ):
            draining.popleft()

    @property
    def held(self) -> int:
        """Connections counted against the cap."""
        return self.open + len(self.draining)


class Gate:
    """The ZAP handler of one broker: CURVE keys and the connection cap.
    Built on the broker's context before its endpoints are bound;
    :meth:`watch` each capped ROUTER before its bind, poll :attr:`zap`,
    and call :meth:`serve` when it is readable."""

    def __init__(
        self,
        context: zmq.Context[Any],
        keys: KeyRing | None,
        max_connections: int,
        stats: Counter[str],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ctx = context
        self._keys = keys
        self.max_connections = max_connections
        self._stats = stats
        self._clock = clock
        self.zap: zmq.Socket[Any] = context.socket(zmq.ROUTER)
        self.zap.setsockopt(zmq.LINGER, 0)
        try:
            self.zap.bind(ZAP_ENDPOINT)
        except zmq.ZMQError:
            self.zap.close(linger=0)
            raise
        #: Messages read after a connection ended by which its pipe is empty.
        self.drain_reads = (ROUTER_RCVHWM + 1) * max_connections
        #: ZAP domain -> its ROUTER's monitor, and its connections.
        self._monitors: dict[str, zmq.Socket[Any]] = {}
        self._sockets: tuple[zmq.Socket[Any], ...] = (self.zap,)
        self.tallies: dict[str, Tally] = {}
        self._serves = 0
        #: ZAP domain -> when refusals were last logged, refusals since, last address.
        self._refusals: dict[str, tuple[float, int, str]] = {}

    def watch(self, sock: zmq.Socket[Any], domain: str) -> Tally:
        """Count ``sock``'s connections (call before it is bound) and cap
        them at ``max_connections``; its ZAP domain is ``domain``. The
        broker's loop keeps the returned tally's reads."""
        address = f"inproc://corral-monitor-{domain}-{id(sock):x}"
        sock.monitor(address, _EVENTS)
        monitor: zmq.Socket[Any] = self._ctx.socket(zmq.PAIR)
        monitor.setsockopt(zmq.LINGER, 0)
        monitor.setsockopt(zmq.RCVHWM, 0)  # 0 on our side: the pipe has no limit
        monitor.connect(address)
        self._monitors[domain] = monitor
        self._sockets = (self.zap, *self._monitors.values())
        tally = self.tallies[domain] = Tally()
        return tally

    @property
    def sockets(self) -> tuple[zmq.Socket[Any], ...]:
        """The sockets the loop polls for the gate: ZAP and the monitors
        (made as each is added: the loop asks every turn)."""
        return self._sockets

    def serve(self, ready: bool = True) -> None:
        """Count the connections that opened and closed since the last call,
        then answer the ZAP requests waiting, at most :data:`ZAP_BUDGET`
        (the rest wait for the next call, and those that wait past the
        handshake interval are dropped by libzmq with their connection), so
        a storm of connections cannot starve the reading of messages. Call
        it on every turn of the loop; ``ready``: one of :attr:`sockets` has
        something to read (if not, only the ended connections whose
        messages were read since are released: no socket is asked)."""
        self._serves += 1
        if not ready:
            for tally in self.tallies.values():
                tally.serving = self._serves
                tally.release(self.drain_reads)
            return
        requests = []
        for _ in range(ZAP_BUDGET):
            frames = _recv_frames(self.zap)
            if frames is None:
                break
            requests.append(frames)
        self._count()
        # the requests of a domain answered after one are counted open: as if refused
        later = Counter(frames[4] for frames in requests if len(frames) > 4)
        for frames in requests:
            if len(frames) > 4:
                later[frames[4]] -= 1
            self._answer(frames, later[frames[4]] if len(frames) > 4 else 0)

    def _count(self) -> None:
        for domain, monitor in self._monitors.items():
            tally = self.tallies[domain]
            tally.serving = self._serves
            while True:
                frames = _recv_frames(monitor)
                if frames is None:
                    break
                event = parse_monitor_message(frames)
                kind = event["event"]
                if kind == zmq.EVENT_ACCEPTED:
                    tally.open += 1
                elif kind & _FAILED:
                    tally.failed += 1
                elif kind == zmq.EVENT_DISCONNECTED and tally.open > 0:
                    tally.open -= 1
                    if tally.failed:  # its handshake failed: it never had a pipe
                        tally.failed -= 1
                    else:
                        tally.draining.append((tally.reads, self._serves))
            tally.release(self.drain_reads)
            self._stats[f"connections_{domain.removeprefix('corral-')}"] = tally.held

    def _answer(self, frames: list[bytes], undecided: int) -> None:
        """One ZAP request: [routing id, "", version, request id, domain,
        address, identity, mechanism, credentials...]; ``undecided``: the
        requests of its domain read with it and answered after it."""
        if len(frames) < 8 or frames[2] != _VERSION:
            return  # not from libzmq; nothing to answer
        peer, request_id = frames[0], frames[3]
        domain = frames[4].decode("utf-8", "replace")
        address = frames[5].decode("utf-8", "replace")
        mechanism, credentials = frames[7], frames[8:]
        user_id = b""
        keyset = self._keys.for_domain(domain) if self._keys is not None else None
        if keyset is not None:
            if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
                self._reply(peer, request_id, b"400", b"CURVE required")
                return
            key = z85.encode(credentials[0])
            if not keyset.callback(domain, key):
                self._reply(peer, request_id, b"400", b"key not authorised")
                return
            user_id = key
        tally = self.tallies.get(domain)
        if tally is not None and tally.held - undecided > self.max_connections:
            self._refused(domain, address)
            self._reply(peer, request_id, b"400", b"too many connections")
            return
        self._reply(peer, request_id, b"200", b"OK", user_id)

    def _reply(
        self, peer: bytes, request_id: bytes, status: bytes, text: bytes, user_id: bytes = b""
    ) -> None:
        # a request whose connection ended meanwhile has no route: dropped
        send = self.zap.send
        for frame in (peer, b"", _VERSION, request_id, status, text, user_id):
            send(frame, _SNDMORE)
        send(b"", 0)

    def _refused(self, domain: str, address: str) -> None:
        """Count a connection refused for the cap; log it, at most once per
        :data:`REFUSAL_LOG_EVERY` seconds per endpoint."""
        self._stats["connections_refused"] += 1
        now = self._clock()
        logged_at, unlogged, _ = self._refusals.get(domain, (float("-inf"), 0, ""))
        if now - logged_at < REFUSAL_LOG_EVERY:
            self._refusals[domain] = (logged_at, unlogged + 1, address)
            return
        self._refusals[domain] = (now, 0, address)
        log.warning(
            "broker.connections_full",
            domain=domain,
            max_connections=self.max_connections,
            refused_since_last_line=unlogged + 1,
            last_address=address,
            hint="a peer that connects while broker.max_connections peers are connected to "
            "this endpoint is refused; if these are legitimate clients or workers, raise "
            "broker.max_connections (the broker's file limit must allow twice that); "
            "otherwise find the process at last_address (on ipc it ends with uid:gid:pid)",
        )

    def close(self) -> None:
        for monitor in self._monitors.values():
            monitor.close(linger=0)
        self._monitors.clear()
        self.zap.close(linger=0)


def files_needed(max_connections: int) -> int:
    """Descriptors the broker may hold at once: ``max_connections`` per
    capped endpoint, as many again in connections accepted and not yet
    refused (a burst of connections is refused one pass later), and
    :data:`SPARE_FILES`."""
    return 4 * max_connections + SPARE_FILES


def raise_file_limit(max_connections: int) -> None:
    """Raise the soft open-file limit to :func:`files_needed` if it is
    lower, as far as the hard limit allows (systemd's default soft limit is
    1,024, its hard limit far higher: the unit in config/ sets both); say so
    when the hard limit is too low, since running out of descriptors on an
    ipc endpoint aborts libzmq."""
    needed = files_needed(max_connections)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning(
            "broker.file_limit_low",
            open_files=soft,
            needed=needed,
            max_connections=max_connections,
            hint="the broker may run out of file descriptors before broker.max_connections "
            "is reached on both endpoints; raise the limit (LimitNOFILE= in the systemd "
            "unit, ulimit -n) or lower broker.max_connections",
        )


def _recv_frames(sock: zmq.Socket[Any]) -> list[bytes] | None:
    """The next message's frames, or None when there is none (read uncopied
    and told apart by each frame's ``more`` flag: cheaper than asking the
    socket for ``RCVMORE`` after each)."""
    try:
        frame = sock.recv(_NOBLOCK, copy=False)
    except zmq.Again:
        return None
    frames = [frame.bytes]
    while frame.more:
        frame = sock.recv(0, copy=False)
        frames.append(frame.bytes)
    return frames
