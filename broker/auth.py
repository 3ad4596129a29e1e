"""Who may talk to the broker over tcp: the CURVE key sets and their ZAP handler.

Clients and workers are authorised apart: ``security.authorized_keys_dir``
holds the public keys (``<name>.key``) of clients (the CLI, ``corral.Client``,
and a supervisor, whose reports are a client's calls), ``security.worker_keys_dir``
those of worker processes (``security.worker_secret_key`` on their host,
else its ``client_secret_key``). Each endpoint's ROUTER is in its own ZAP domain
(:data:`CLIENT_DOMAIN`, :data:`WORKER_DOMAIN`), so a client's key is refused
on the worker endpoint and the other way round. The broker's ZAP handler
(:class:`~corral.broker.gate.Gate`, in the broker's loop, which also caps
the connections) asks the :class:`KeySet` of the request's domain
(:meth:`KeyRing.for_domain`) whether a key may connect.

The events endpoint (``broker.events_endpoint``), on tcp with CURVE, has
a ZAP domain of its own (:data:`EVENTS_DOMAIN`) whose subscribers are
admitted by the clients' keys: ``authorized_keys_dir``. A PUB socket reads
nothing from its subscribers, so a key removed by a reload cannot be
refused per message there: the broker drops every subscriber instead (see
``corral.broker.events.Events.drop_subscribers``), and each reconnects
through the handshake, where a removed key is refused.

A key refused at the handshake is logged (``broker.handshake_refused``,
once a minute per key), so the operator of a client, worker or subscriber
that sees no answer can find why on the broker.

A tcp endpoint with CURVE and no key directory refuses to start; only the
client and events endpoints may say ``security.allow_any_client_key = true``
(logged as a warning). :meth:`KeyRing.reload` re-reads both directories; the broker
calls it on SIGHUP (``corral reload`` and the supervisor's reload send one
to the broker too). A reload that fails (a directory gone, or now writable
by others) keeps the sets it had and logs why.

A connection keeps the key it was admitted with, and a ROUTER cannot close
one peer's connection, so a key removed by a reload is enforced on each
message instead: :meth:`KeyRing.admits` checks the message's ``User-Id``
(the z85 client key, which the ZAP handler sets) against the current set,
and the broker drops what it refuses (counted as ``auth_refused``). A
revoked worker's registration goes at its first refused message (its
supervisor may still vouch for the process) and its jobs go to other
workers; a new connection with that key is refused at the handshake.

Key files are checked the way ssh checks its own: a secret key readable or
writable by group or others is refused (``chmod 600``), and so is a key
directory, or a key in it, that group or others may write (``chmod go-w``):
whoever can write there can authorise a key.
"""

from __future__ import annotations

import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import zmq

from corral.errors import ConfigError
from corral.transport import is_tcp, load_keypair

log = structlog.get_logger()

#: ZAP domains of the broker's CURVE endpoints.
CLIENT_DOMAIN = "corral-client"
WORKER_DOMAIN = "corral-worker"
EVENTS_DOMAIN = "corral-events"

#: The sides (client and worker: the same strings as corral.broker.core.CLIENT / WORKER).
CLIENT, WORKER, EVENTS = "client", "worker", "events"
_DOMAINS = {CLIENT: CLIENT_DOMAIN, WORKER: WORKER_DOMAIN, EVENTS: EVENTS_DOMAIN}

#: At most this many refused connections (and keys) are remembered, so that
#: each is logged once (the set is cleared when full: memory stays bounded).
_REFUSED_LOGGED_MAX = 1024
#: Seconds between two logs of the same key refused at the handshake, and
#: how many refusals (of any keys) are logged in that while at most.
REFUSAL_LOG_EVERY = 60.0
REFUSALS_LOGGED = 20


def load_key_dir(directory: str | Path, setting: str) -> frozenset[str]:
    """The z85 public keys of the ``*.key`` files in ``directory``.

    Raises ConfigError naming the directory or file and what to run when
    the directory is missing, when it or a key in it is writable by group
    or others, or when a key file cannot be read or holds no key."""
    path = Path(directory)
    if not path.is_dir():
        raise ConfigError(
            f"security.{setting}: {path} is not a directory; create it "
            f"(`mkdir -m 700 {path}`) and put one <name>.key per authorised key in it"
        )
    _refuse_writable_by_others(path, setting)
    try:
        files = sorted(f for f in path.iterdir() if f.suffix == ".key" and f.name[0] != ".")
    except OSError as exc:
        raise ConfigError(
            f"security.{setting}: cannot read the directory {path}: "
            f"{exc.strerror or exc}; the user corral runs as must be able to read it"
        ) from None
    keys = set()
    for file in files:
        _refuse_writable_by_others(file, setting)
        public, _ = load_keypair(file, f"security.{setting}", secret=False)
        keys.add(public.decode("ascii"))
    return frozenset(keys)


def _refuse_writable_by_others(path: Path, setting: str) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o022:
        raise ConfigError(
            f"security.{setting}: {path} is writable by group or others (mode {mode:o}), so "
            f"anyone could authorise a key; run `chmod go-w {path}`"
        )


@dataclass
class KeySet:
    """The keys one side may use; the broker's ZAP handler calls
    :meth:`callback` in the broker's loop. ``keys`` is replaced whole on a
    reload."""

    side: str
    setting: str
    directory: str | None
    allow_any: bool = False
    keys: frozenset[str] = frozenset()
    #: Monotonic seconds, for :meth:`callback`'s rate limit.
    clock: Callable[[], float] = time.monotonic
    #: Refused key -> when its refusal was last logged (cleared when full,
    #: so memory stays bounded).
    _refusals: dict[str, float] = field(default_factory=dict)
    #: When the current while began, and the refusals logged in it; the
    #: refusals left out since the last line.
    _window: tuple[float, int] = (float("-inf"), 0)
    _unlogged: int = 0

    def load(self) -> None:
        """Read the directory (nothing to read when any key is allowed).
        Raises ConfigError."""
        if self.directory is not None and not self.allow_any:
            self.keys = load_key_dir(self.directory, self.setting)

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP: whether the z85 client ``key`` may connect. A refusal is
        logged (``broker.handshake_refused``), at most once a
        :data:`REFUSAL_LOG_EVERY` seconds per key and
        :data:`REFUSALS_LOGGED` times in that while in all: a peer that
        retries, or one that tries key after key, does not flood the log
        (the next line counts the refusals left out, ``unlogged``)."""
        text = key.decode("ascii", "replace")
        if self.allow_any or text in self.keys:
            return True
        now = self.clock()
        if now - self._window[0] >= REFUSAL_LOG_EVERY:
            self._window = (now, 0)
        last = self._refusals.get(text)
        if last is not None and now - last < REFUSAL_LOG_EVERY:
            return False
        if self._window[1] >= REFUSALS_LOGGED:
            self._unlogged += 1
            return False
        if len(self._refusals) >= _REFUSED_LOGGED_MAX:
            self._refusals.clear()
        self._refusals[text] = now
        self._window = (self._window[0], self._window[1] + 1)
        left_out = {"unlogged": self._unlogged} if self._unlogged else {}
        log.warning(
            "broker.handshake_refused",
            side=self.side,
            key=text,
            **left_out,
            hint=f"this key is not in security.{self.setting}; to admit it, put its "
            "<name>.key there and reload (SIGHUP). Logged once a minute per key",
        )
        self._unlogged = 0
        return False

    def admits(self, user_id: str) -> bool:
        return self.allow_any or user_id in self.keys


class KeyRing:
    """The key sets of the broker's CURVE endpoints, which its ZAP handler
    (:class:`~corral.broker.gate.Gate`) applies. Built from the config
    (raises ConfigError when a CURVE endpoint has no key directory, or a
    directory is refused)."""

    def __init__(self, config: Any) -> None:
        sec = config.security
        bc = config.broker
        self.sets: dict[str, KeySet] = {}
        if sec.server_secret_key and is_tcp(bc.client_endpoint):
            self.sets[CLIENT] = _client_keys(
                CLIENT,
                sec,
                f"broker.client_endpoint {bc.client_endpoint} uses CURVE but "
                "security.authorized_keys_dir is not set, so any key would be admitted: "
                "set it to a directory of the clients' <name>.key files",
            )
        if sec.server_secret_key and is_tcp(bc.worker_endpoint):
            if not sec.worker_keys_dir:
                raise ConfigError(
                    f"broker.worker_endpoint {bc.worker_endpoint} uses CURVE but "
                    "security.worker_keys_dir is not set: set it to a directory of the "
                    "workers' <name>.key files (apart from the clients' authorized_keys_dir)"
                )
            self.sets[WORKER] = KeySet(WORKER, "worker_keys_dir", sec.worker_keys_dir)
        events = getattr(bc, "events_endpoint", None)
        if sec.server_secret_key and events and is_tcp(events):
            self.sets[EVENTS] = _client_keys(
                EVENTS,
                sec,
                f"broker.events_endpoint {events} uses CURVE but "
                "security.authorized_keys_dir is not set: set it to a directory of the "
                "<name>.key files of the clients that may subscribe",
            )
        for keyset in self.sets.values():
            keyset.load()
        self._refused_logged: set[bytes] = set()

    def __bool__(self) -> bool:
        """Whether any endpoint uses CURVE."""
        return bool(self.sets)

    @staticmethod
    def domain(side: str) -> str:
        """The ZAP domain of ``side``'s endpoint."""
        return _DOMAINS[side]

    def keys(self, side: str) -> frozenset[str]:
        """The keys ``side`` admits now (none when it has no key set)."""
        keyset = self.sets.get(side)
        return keyset.keys if keyset is not None else frozenset()

    def checks(self, side: str) -> bool:
        """Whether messages on ``side`` are checked against a key set."""
        keyset = self.sets.get(side)
        return keyset is not None and not keyset.allow_any

    def for_domain(self, domain: str) -> KeySet | None:
        """The key set of the endpoint in ZAP ``domain`` (None: not CURVE)."""
        for side, keyset in self.sets.items():
            if _DOMAINS[side] == domain:
                return keyset
        return None

    def log_loaded(self) -> None:
        """Say which key sets are in force (at the start)."""
        for side, keyset in self.sets.items():
            if keyset.allow_any:
                log.warning(
                    "broker.any_client_key",
                    endpoint=side,
                    hint="security.allow_any_client_key = true: any client key is admitted; "
                    "set security.authorized_keys_dir to admit only known keys",
                )
            else:
                log.info(
                    "broker.keys_loaded",
                    side=side,
                    directory=keyset.directory,
                    keys=len(keyset.keys),
                )

    def reload(self) -> bool:
        """Re-read every key directory (SIGHUP). All or nothing: if one
        fails, every set stays as it was and the error is logged. Returns
        whether it took effect."""
        loaded: dict[str, frozenset[str]] = {}
        try:
            for side, keyset in self.sets.items():
                if keyset.directory is not None and not keyset.allow_any:
                    loaded[side] = load_key_dir(keyset.directory, keyset.setting)
        except (ConfigError, OSError) as exc:
            log.error(
                "broker.keys_reload_failed",
                error=str(exc),
                hint="the keys loaded before stay in force; fix this and send SIGHUP again",
            )
            return False
        for side, keys in loaded.items():
            old = self.sets[side].keys
            self.sets[side].keys = keys
            log.info(
                "broker.keys_reloaded",
                side=side,
                keys=len(keys),
                added=len(keys - old),
                revoked=len(old - keys),
            )
        self._refused_logged.clear()
        return True

    def admits(self, side: str, frames: list[zmq.Frame]) -> bool:
        """Whether a message received on ``side`` (uncopied frames, the
        routing id first) comes from a key that is still authorised; a
        refusal is counted and logged once per connection."""
        keyset = self.sets.get(side)
        if keyset is None:
            return True
        try:
            user_id = frames[0].get("User-Id")
        except zmq.ZMQError:  # no metadata: not a CURVE connection
            user_id = None
        if isinstance(user_id, str) and keyset.admits(user_id):
            return True
        identity = frames[0].bytes
        if identity not in self._refused_logged:
            if len(self._refused_logged) >= _REFUSED_LOGGED_MAX:
                self._refused_logged.clear()
            self._refused_logged.add(identity)
            log.warning(
                "broker.key_refused",
                side=side,
                key=user_id,
                hint=f"this key is no longer in security.{keyset.setting}; its messages "
                "are dropped, and a new connection with it is refused",
            )
        return False


def _client_keys(side: str, sec: Any, unset: str) -> KeySet:
    """The clients' key set for ``side`` (the client or the events
    endpoint): ``security.authorized_keys_dir``, or any key where
    ``allow_any_client_key`` says so. Raises ConfigError (``unset``, and how
    to admit any key) when neither is set."""
    if not sec.authorized_keys_dir and not sec.allow_any_client_key:
        raise ConfigError(
            f"{unset}, or set security.allow_any_client_key = true to admit any client key"
        )
    return KeySet(
        side,
        "authorized_keys_dir",
        sec.authorized_keys_dir,
        allow_any=sec.allow_any_client_key and not sec.authorized_keys_dir,
    )
