"""``corral events``: subscribe to the broker's events endpoint
(``[broker] events_endpoint``) and print each event as it comes, one line
each (``--json``: the event as a JSON object), until Ctrl-C or ``--count``
events. ``--filter PREFIX`` (repeatable) keeps the events whose name starts
with it (``job.``, ``job.failed``, ``worker.``); the filtering is done by
ZeroMQ's subscription, so the broker does not even send the others.

A tcp endpoint is reached with CURVE like the broker's client endpoint:
``security.server_public_key`` and this host's ``client_secret_key``,
which must be in the broker's ``authorized_keys_dir``.

It waits for the broker however long it takes, and says on stderr (once,
until a connection is accepted again) why nothing comes, read off the
socket's monitor (:class:`Subscription`): the broker refused this key, the
handshake failed (a CURVE key mismatch, or not an events endpoint), or no
connection was accepted within :data:`NOTICE_AFTER` seconds. Events go to
stdout, these notices to stderr. ZeroMQ does not connect again after the
broker refused a key, so a refused subscription is made afresh every few
seconds: once the key is restored (and the broker reloaded) events come
again. A connection whose broker vanished without closing it is found by
ZeroMQ's heartbeats and made again.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
import zmq
from zmq.utils.monitor import parse_monitor_message

from corral.cliformat import escaped, when_text

#: How long one wait for an event lasts before Ctrl-C is looked at (ms).
POLL_MS = 200
#: Seconds without an accepted connection before it says so on stderr.
NOTICE_AFTER = 5.0
#: Seconds before subscribing again after the broker refused the key, the
#: first time, and at most (doubling in between).
RETRY_REFUSED = 1.0
RETRY_REFUSED_MAX = 5.0
#: ZeroMQ heartbeats on the connection: a ping every HEARTBEAT_MS, and no
#: answer within HEARTBEAT_TIMEOUT_MS closes it (it is then made again).
HEARTBEAT_MS = 2_000
HEARTBEAT_TIMEOUT_MS = 6_000
#: The monitor events a subscription acts on.
_WATCHED = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_DISCONNECTED
)


def line(body: dict[str, Any]) -> str:
    """One event as a line: time, name, then its fields as key=value, each
    control character (C0, DEL, C1) and line or paragraph separator shown
    escaped (``\\n``, ``\\x1b``, ``\\u2028``): a field is a user's text (a
    job's error), and a newline in it made what read as another event, an
    escape sequence drove the terminal."""
    stamp = when_text(body.get("at") or 0.0, clock_only=True)
    fields = " ".join(f"{k}={v}" for k, v in body.items() if k not in ("event", "at"))
    return escaped(f"{stamp} {body.get('event', '?')} {fields}".rstrip())


def _stderr(text: str) -> None:
    print(f"corral events: {text}", file=sys.stderr, flush=True)


class Subscription:
    """A SUB socket on ``endpoint`` (subscribed to ``prefixes``, CURVE
    keys from ``config`` on tcp) and a monitor of its connection, which
    tells ``say`` (one line each) why no event comes, and subscribes
    again after a refusal. Raises ConfigError for a tcp endpoint
    ``config`` gives no CURVE keys for (or a bad key file)."""

    def __init__(
        self,
        endpoint: str,
        prefixes: list[str],
        config: Any = None,
        *,
        say: Callable[[str], None] = _stderr,
        notice_after: float = NOTICE_AFTER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.endpoint = endpoint
        self.prefixes = prefixes or [""]
        self.config = config
        self.say = say
        self.notice_after = notice_after
        self.clock = clock
        self.context: zmq.Context[zmq.Socket[Any]] = zmq.Context.instance()
        #: Whether the broker has accepted the connection (and not lost it since).
        self.accepted = False
        #: The notices said since the last acceptance (each at most once).
        self._said: set[str] = set()
        self._waiting_since = clock()
        self._retry_at: float | None = None
        self._retry = RETRY_REFUSED
        self.sock, self._monitor = self._subscribe()

    def _subscribe(self) -> tuple[zmq.Socket[Any], zmq.Socket[Any]]:
        from corral.transport import allow_ipv6, make_curve_client

        sock = self.context.socket(zmq.SUB)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_MS)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
            allow_ipv6(sock, self.endpoint)
            make_curve_client(sock, self.endpoint, self.config)
            for prefix in self.prefixes:
                sock.setsockopt(zmq.SUBSCRIBE, prefix.encode())
            monitor = sock.get_monitor_socket(_WATCHED)
        except BaseException:
            sock.close(linger=0)
            raise
        try:
            sock.connect(self.endpoint)
        except BaseException:
            self._close(sock, monitor)
            raise
        return sock, monitor

    def receive(self, timeout_ms: int) -> list[bytes] | None:
        """The next event's frames, or None when none came within
        ``timeout_ms``; what the monitor saw meanwhile is acted on."""
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        ready = dict(poller.poll(timeout_ms))
        if self._monitor in ready:
            while self._monitor.poll(0):
                self._watch(parse_monitor_message(self._monitor.recv_multipart()))
        self._tick(self.clock())
        if self.sock in ready:
            try:
                return list(self.sock.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return None
        return None

    def _watch(self, message: Mapping[str, Any]) -> None:
        event, now = message["event"], self.clock()
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            if self._said:
                self.say(f"subscribed to {self.endpoint}")
            self.accepted = True
            self._said.clear()
            self._retry = RETRY_REFUSED
        elif event == zmq.EVENT_DISCONNECTED:
            if self.accepted:
                self.accepted = False
                self._waiting_since = now
        elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            self._notice("refused", self._refused(message["value"]))
            self._retry_at = now + self._retry  # ZeroMQ will not connect again
            self._retry = min(self._retry * 2, RETRY_REFUSED_MAX)
        else:  # a handshake failed otherwise: ZeroMQ tries again by itself
            self._notice("handshake", self._mismatch())

    def _tick(self, now: float) -> None:
        if self._retry_at is not None and now >= self._retry_at:
            self._retry_at = None
            self._close(self.sock, self._monitor)
            self.sock, self._monitor = self._subscribe()
        if not (self.accepted or self._said) and now - self._waiting_since >= self.notice_after:
            self._notice("silent", self._silent())

    def _notice(self, kind: str, text: str) -> None:
        """Say ``text`` unless a notice of ``kind`` was said since the last
        acceptance."""
        self.accepted = False
        if kind not in self._said:
            self._said.add(kind)
            self.say(text)

    def _setting(self, name: str) -> str:
        path = getattr(getattr(self.config, "security", None), name, None)
        return f"security.{name} ({path})" if path else f"security.{name}"

    def _refused(self, status: int) -> str:
        return (
            f"the broker at {self.endpoint} refused this subscriber's CURVE key (ZAP "
            f"status {status}): the public key of {self._setting('client_secret_key')} "
            "must be in the broker's security.authorized_keys_dir, and the broker "
            "reloaded (SIGHUP); trying again every few seconds"
        )

    def _mismatch(self) -> str:
        return (
            f"the handshake with {self.endpoint} failed: is it the broker's events_endpoint "
            "(not its client_endpoint)? Over tcp, a CURVE key mismatch fails so too: "
            f"{self._setting('server_public_key')} must be the broker's public key, and "
            "both sides must use CURVE (or neither); still trying"
        )

    def _silent(self) -> str:
        text = (
            f"no connection accepted by {self.endpoint} within {self.notice_after:g}s: "
            f"is the broker running, with events_endpoint = {self.endpoint!r}?"
        )
        if self.endpoint.startswith("tcp://"):
            text += " Over tcp, is the port open to this host (a firewall)?"
        return text + " Still trying"

    @staticmethod
    def _close(sock: zmq.Socket[Any], monitor: zmq.Socket[Any]) -> None:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)

    def close(self) -> None:
        self._close(self.sock, self._monitor)


def tail(
    endpoint: str, prefixes: list[str], count: int | None, as_json: bool, config: Any = None
) -> int:
    """Print events from ``endpoint`` (see the module docstring); returns
    how many were printed. A SUB socket connects even before the broker
    binds, and gets nothing until it does. Raises ConfigError for a tcp
    endpoint ``config`` gives no CURVE keys for (or a bad key file)."""
    subscription = Subscription(endpoint, prefixes, config)
    decoder = msgspec.msgpack.Decoder(dict[str, Any])
    printed = 0
    try:
        while count is None or printed < count:
            frames = subscription.receive(POLL_MS)
            if frames is None:
                continue
            try:
                body = decoder.decode(frames[-1])
            except (msgspec.DecodeError, RecursionError):  # nested past the stack
                continue  # not an event of ours
            text = msgspec.json.encode(body).decode() if as_json else line(body)
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
            printed += 1
    finally:
        subscription.close()
    return printed
