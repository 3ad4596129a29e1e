"""Making corral's ZeroMQ sockets: options, ipc directories and CURVE.

tcp endpoints are encrypted and authenticated with CURVE unless the config
says ``security.allow_insecure_tcp = true``. A CURVE server gets a ZAP
domain with enforcement on, so a client whose key is not authorised (or any
client, when the authenticator is not running) is refused; the broker's key
sets are in :mod:`corral.broker.auth`, its ZAP handler (which also caps the
connections, ipc ones too) in :mod:`corral.broker.gate`.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import zmq

from corral.errors import ConfigError

# A sync context makes zmq.Socket, a zmq.asyncio one zmq.asyncio.Socket.
SocketT = TypeVar("SocketT", bound=zmq.Socket[Any])


def is_tcp(endpoint: str) -> bool:
    return endpoint.startswith("tcp://")


def is_ipv6(endpoint: str) -> bool:
    """Whether ``endpoint`` is tcp to or on an IPv6 address
    (``tcp://[::1]:5555``, ``tcp://[::]:5555``)."""
    host = endpoint[len("tcp://") :].rpartition(":")[0]
    return is_tcp(endpoint) and ":" in host


def allow_ipv6(sock: zmq.Socket[Any], endpoint: str) -> None:
    """Set ``ZMQ_IPV6`` on ``sock`` (before its bind or connect) when
    ``endpoint`` names an IPv6 address: libzmq's sockets are IPv4-only
    without it, and ``tcp://[::1]:5555`` then fails with "No such device".
    Left off for other addresses, so a name like ``localhost`` keeps
    resolving to the IPv4 address a broker bound."""
    if is_ipv6(endpoint):
        sock.setsockopt(zmq.IPV6, 1)


def ensure_ipc_dir(endpoint: str) -> None:
    """Create the directory of an ipc:// endpoint's socket file."""
    if endpoint.startswith("ipc://"):
        path = Path(endpoint[len("ipc://") :])
        if path.parent != Path(""):
            path.parent.mkdir(parents=True, exist_ok=True)


def _security(config: Any) -> Any:
    return getattr(config, "security", None)


#: A CURVE key in a key file: z85 text of 32 bytes.
_Z85_KEY_LENGTH = 40


def load_keypair(path: str | Path, setting: str, *, secret: bool) -> tuple[bytes, bytes | None]:
    """The z85 public key and (``secret``: required) secret key in the
    zmq.auth certificate file ``path``, which the config names as
    ``setting`` (``security.server_secret_key``); a secret key file must
    be 0600. Raises ConfigError naming the setting and the file, and what
    to do, when it is missing, open to others, cannot be read, or holds no
    key (or not the one asked for)."""
    import zmq.auth

    file = Path(path)
    if not file.exists():
        raise ConfigError(
            f"{setting}: key file {file} not found; create it with `corral keys` "
            "or correct the path"
        )
    if secret:
        mode = stat.S_IMODE(file.stat().st_mode)
        if mode & 0o077:
            raise ConfigError(
                f"{setting}: secret key file {file} is readable or writable by group or "
                f"others (mode {mode:o}); run `chmod 600 {file}`"
            )
    try:
        public, secret_key = zmq.auth.load_certificate(file)
        if secret and secret_key is None:
            raise ConfigError(
                f"{setting}: the key file {file} holds no secret key; name the *.key_secret file"
            )
        for key in (public, secret_key):
            _check_z85(key)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ConfigError(
            f"{setting}: cannot read the key file {file}: {reason}; it must be a key file "
            "(`corral keys`) that the user corral runs as can read"
        ) from None
    return public, secret_key


def _check_z85(key: bytes | None) -> None:
    """Raise ValueError unless ``key`` (if any) is a z85 CURVE key."""
    from zmq.utils import z85

    if key is None:
        return
    try:
        valid = len(key) == _Z85_KEY_LENGTH and len(z85.decode(key)) == 32
    except (ValueError, KeyError, TypeError):
        valid = False
    if not valid:
        shown = key[:50].decode("ascii", "replace")
        raise ValueError(f"{shown!r} is not a CURVE key (40 characters of z85)")


def load_server_keys(config: Any) -> tuple[bytes, bytes]:
    """The broker's key pair (``security.server_secret_key``), as z85.
    Raises ConfigError as :func:`load_keypair`."""
    public, secret = load_keypair(
        _security(config).server_secret_key, "security.server_secret_key", secret=True
    )
    assert secret is not None  # load_keypair checked it
    return public, secret


def check_tcp_allowed(endpoint: str, config: Any, *, server: bool) -> bool:
    """Whether ``endpoint`` gets CURVE; raises ConfigError for an insecure
    tcp endpoint that the config does not allow."""
    if not is_tcp(endpoint):
        return False
    sec = _security(config)
    key = None
    if sec is not None:
        key = sec.server_secret_key if server else sec.server_public_key
    if key:
        return True
    if sec is not None and sec.allow_insecure_tcp:
        return False
    side = "security.server_secret_key" if server else "security.server_public_key"
    raise ConfigError(
        f"{endpoint}: tcp endpoints need CURVE keys ({side}) or security.allow_insecure_tcp = true"
    )


#: Messages a broker ROUTER queues from one peer before it stops reading
#: that peer's connection (which then waits in the kernel's socket buffers:
#: nothing is lost), so each connected peer holds at most this many in the
#: broker's memory. Above the 64 results a worker with ``prefetch = 64``
#: sends in a burst and the pipelined requests of an AsyncClient (tried
#: with 100 in flight: the broker reads them as fast at 100 as at 1,000;
#: docs/RELIABILITY.md has the figures), and low enough that
#: ``broker.max_connections`` peers times this many stay a bounded memory.
ROUTER_RCVHWM = 100
#: Milliseconds a connection to a broker endpoint may take to finish its
#: handshake (ZAP answer included) before libzmq drops it (its default is
#: 30 s): a storm of connections that the broker cannot answer as fast as
#: they come holds their descriptors this long at most, not 30 s, and
#: costs the broker nothing for those it never answers. A peer whose
#: handshake was dropped connects again by itself.
HANDSHAKE_MS = 5_000
#: Replies queued to one client before a send to it fails (counted as
#: ``replies_blocked``): a client that never reads holds at most this many.
CLIENT_SNDHWM = 1_000
#: Messages queued to one worker before a send fails: a delivery that fails
#: is not leased and goes out again later (see RouterLink).
WORKER_SNDHWM = 100_000


def bind_router(
    context: zmq.Context[SocketT],
    endpoint: str,
    config: Any,
    max_message_size: int,
    zap_domain: str = "",
    *,
    sndhwm: int = WORKER_SNDHWM,
    rcvhwm: int = ROUTER_RCVHWM,
    before_bind: Callable[[SocketT], object] | None = None,
) -> SocketT:
    """A ROUTER for a broker endpoint: mandatory routing (no silent drops),
    a message size cap, per-peer high-water marks (messages), no linger,
    CURVE on tcp. With a ``zap_domain`` every connection, ipc ones too,
    passes the ZAP handler in that domain (enforced: with no handler
    running, every connection is refused). ``before_bind`` is called with
    the socket just before it is bound (the broker starts its monitor
    there). The options are set before the bind: a listener's connections
    take the options the socket had when it was bound."""
    keys = load_server_keys(config) if check_tcp_allowed(endpoint, config, server=True) else None
    sock = context.socket(zmq.ROUTER)
    try:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_size)
        sock.setsockopt(zmq.SNDHWM, sndhwm)
        sock.setsockopt(zmq.RCVHWM, rcvhwm)
        sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)
        allow_ipv6(sock, endpoint)
        if keys is not None:
            make_curve_server(sock, config, zap_domain, keys)
        elif zap_domain:
            sock.zap_domain = zap_domain.encode()
            sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        if before_bind is not None:
            before_bind(sock)
    except BaseException:
        sock.close(linger=0)
        raise
    try:
        ensure_ipc_dir(endpoint)
        sock.bind(endpoint)
    except (zmq.ZMQError, OSError) as exc:
        sock.close(linger=0)
        raise bind_error(endpoint, exc) from None
    return sock


def bind_error(endpoint: str, exc: zmq.ZMQError | OSError) -> ConfigError:
    """The ConfigError of an endpoint that cannot be bound, with what to do."""
    # pyzmq's strerror names the address it tried (check-config tries port *), not ours
    if isinstance(exc, zmq.ZMQError) and exc.errno is not None:
        reason = zmq.strerror(exc.errno)
    else:
        reason = exc.strerror or str(exc)
    if is_tcp(endpoint):
        hint = (
            "use an address of this host (0.0.0.0 for all of them) and a port no other "
            "process listens on"
        )
    else:
        hint = "the user corral runs as must be able to create the socket file there"
    return ConfigError(f"cannot bind {endpoint}: {reason}; {hint}")


def make_curve_server(
    sock: zmq.Socket[Any], config: Any, zap_domain: str, keys: tuple[bytes, bytes] | None = None
) -> None:
    """Make ``sock`` (not yet bound) a CURVE server with the broker's key
    pair (``keys``, else read from the config), its peers authenticated in
    the ZAP domain ``zap_domain`` (enforced). Raises ConfigError for a bad
    key file."""
    public, secret = keys or load_server_keys(config)
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.curve_server = True
    sock.zap_domain = zap_domain.encode()
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)


def make_curve_client(sock: zmq.Socket[Any], endpoint: str, config: Any) -> None:
    """Give ``sock`` (not yet connected) this side's CURVE client keys for
    ``endpoint`` when it is tcp with CURVE (see :func:`check_tcp_allowed`).
    Raises ConfigError."""
    if check_tcp_allowed(endpoint, config, server=False):
        keys = _client_keys(endpoint, config, worker=False)
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = keys


def connect_dealer(
    context: zmq.Context[SocketT],
    endpoint: str,
    config: Any,
    *,
    identity: bytes | None = None,
    worker: bool = False,
) -> SocketT:
    """A DEALER to a broker endpoint, with CURVE client keys on tcp: a
    worker's (``worker``) are ``security.worker_secret_key`` if set, else,
    like any client's, ``security.client_secret_key``."""
    keys = (
        _client_keys(endpoint, config, worker)
        if check_tcp_allowed(endpoint, config, server=False)
        else None
    )
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    allow_ipv6(sock, endpoint)
    if identity is not None:
        sock.setsockopt(zmq.ROUTING_ID, identity)
    if keys is not None:
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = keys
    sock.connect(endpoint)
    return sock


def check_client_keys(config: Any) -> None:
    """Load the keys a client of the broker on this host would connect
    with (a supervisor's reports are a client's calls), so a bad key file
    stops the supervisor at its start rather than failing each report in
    silence. Raises ConfigError."""
    endpoint = config.client.endpoint or config.broker.client_endpoint
    if check_tcp_allowed(endpoint, config, server=False):
        _client_keys(endpoint, config, worker=False)


def check_worker_keys(config: Any) -> None:
    """Load the keys a worker would connect with, so a bad key file stops a
    worker or supervisor at its start rather than in its socket thread.
    Raises ConfigError."""
    endpoint = config.broker.worker_endpoint
    if check_tcp_allowed(endpoint, config, server=False):
        _client_keys(endpoint, config, worker=True)


def _client_keys(endpoint: str, config: Any, worker: bool) -> tuple[bytes, bytes, bytes]:
    """The broker's public key and this side's key pair, as z85. Raises ConfigError."""
    sec = _security(config)
    server_public, _ = load_keypair(
        sec.server_public_key, "security.server_public_key", secret=False
    )
    setting = "worker_secret_key" if worker and sec.worker_secret_key else "client_secret_key"
    secret_file = getattr(sec, setting)
    if not secret_file:
        raise ConfigError(f"{endpoint}: CURVE needs security.client_secret_key on this side")
    public, secret = load_keypair(secret_file, f"security.{setting}", secret=True)
    assert secret is not None  # load_keypair checked it
    return server_public, public, secret


def write_keypair(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Create a CURVE key pair: ``name.key`` (public) and ``name.key_secret``
    (mode 0600, written under a 0077 umask so it is never readable by others)."""
    import zmq.auth

    old = os.umask(0o077)
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        public, secret = zmq.auth.create_certificates(os.fspath(directory), name)
    finally:
        os.umask(old)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)
