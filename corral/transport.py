"""Making corral's ZeroMQ sockets: options, ipc directories and CURVE.

tcp endpoints are encrypted and authenticated with CURVE unless the config
says ``security.allow_insecure_tcp = true``. A CURVE server gets a ZAP
domain with enforcement on, so a client whose key is not authorised (or any
client, when the authenticator is not running) is refused; the broker's key
sets and its ZAP handler are in :mod:`corral.broker.auth`.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, TypeVar

import zmq

from corral.errors import ConfigError

# A sync context makes zmq.Socket, a zmq.asyncio one zmq.asyncio.Socket.
SocketT = TypeVar("SocketT", bound=zmq.Socket[Any])


def is_tcp(endpoint: str) -> bool:
    return endpoint.startswith("tcp://")


def ensure_ipc_dir(endpoint: str) -> None:
    """Create the directory of an ipc:// endpoint's socket file."""
    if endpoint.startswith("ipc://"):
        path = Path(endpoint[len("ipc://") :])
        if path.parent != Path(""):
            path.parent.mkdir(parents=True, exist_ok=True)


def _security(config: Any) -> Any:
    return getattr(config, "security", None)


def _load_keypair(path: str, *, secret: bool) -> tuple[bytes, bytes | None]:
    """Load a zmq.auth certificate file; a secret key file must be 0600.
    Raises ConfigError naming the file when it is missing, open to others,
    or cannot be read (another user's file, a directory)."""
    import zmq.auth

    file = Path(path)
    if not file.exists():
        raise ConfigError(f"key file {file} not found; create it with `corral keys`")
    if secret:
        mode = stat.S_IMODE(file.stat().st_mode)
        if mode & 0o077:
            raise ConfigError(
                f"secret key file {file} is readable or writable by group or others "
                f"(mode {mode:o}); "
                f"run `chmod 600 {file}`"
            )
    try:
        public, secret_key = zmq.auth.load_certificate(file)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ConfigError(
            f"cannot read the key file {file}: {reason}; it must be a key file "
            "(`corral keys`) that the user corral runs as can read"
        ) from None
    if secret and secret_key is None:
        raise ConfigError(f"{file} holds no secret key; name the *.key_secret file")
    return public, secret_key


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
#: that peer (which then waits: nothing is lost), so a flooding peer holds
#: at most this many in the broker's memory.
ROUTER_RCVHWM = 1_000
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
) -> SocketT:
    """A ROUTER for a broker endpoint: mandatory routing (no silent drops),
    a message size cap, per-peer high-water marks (messages), no linger,
    CURVE on tcp, its clients authenticated in the ZAP domain
    ``zap_domain`` (enforced: with no ZAP handler running, every client is
    refused). The options are set before the bind: a listener's
    connections take the options the socket had when it was bound."""
    curve = check_tcp_allowed(endpoint, config, server=True)
    sock = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_size)
    sock.setsockopt(zmq.SNDHWM, sndhwm)
    sock.setsockopt(zmq.RCVHWM, rcvhwm)
    if curve:
        make_curve_server(sock, config, zap_domain)
    ensure_ipc_dir(endpoint)
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        raise ConfigError(f"cannot bind {endpoint}: {exc}") from None
    return sock


def make_curve_server(sock: zmq.Socket[Any], config: Any, zap_domain: str) -> None:
    """Make ``sock`` (not yet bound) a CURVE server with the broker's key
    pair, its peers authenticated in the ZAP domain ``zap_domain``
    (enforced). Raises ConfigError for a bad key file."""
    public, secret = _load_keypair(_security(config).server_secret_key, secret=True)
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
    if identity is not None:
        sock.setsockopt(zmq.ROUTING_ID, identity)
    if keys is not None:
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = keys
    sock.connect(endpoint)
    return sock


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
    server_public, _ = _load_keypair(sec.server_public_key, secret=False)
    secret_file = (worker and sec.worker_secret_key) or sec.client_secret_key
    if not secret_file:
        raise ConfigError(f"{endpoint}: CURVE needs security.client_secret_key on this side")
    public, secret = _load_keypair(secret_file, secret=True)
    assert secret is not None  # _load_keypair checked it
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
