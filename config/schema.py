"""The settings schema: frozen msgspec Structs, with durations in float seconds and sizes in bytes.

Fields marked ``Duration`` or ``Size`` accept ``"1s"`` or ``"512MiB"`` in a config file;
the loader converts them before msgspec validates, so the decoded structs hold plain numbers.
Defaults that depend on other fields (endpoints, a schedule's name) are filled in
``__post_init__``, so they hold however a struct is built.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec
from msgspec.structs import force_setattr, replace

DURATION = "duration"
SIZE = "size"

# The "unit" marker tells the loader to parse the value first; the bounds apply to the result.
Duration = Annotated[float, msgspec.Meta(ge=0, extra={"unit": DURATION})]
PositiveDuration = Annotated[float, msgspec.Meta(gt=0, extra={"unit": DURATION})]
Size = Annotated[int, msgspec.Meta(ge=0, extra={"unit": SIZE})]
PositiveSize = Annotated[int, msgspec.Meta(gt=0, extra={"unit": SIZE})]

NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonEmptyStr = Annotated[str, msgspec.Meta(min_length=1)]
PoolName = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[A-Za-z0-9_.-]+$",
        description='a pool name of letters, digits, "_", "-" and "."',
    ),
]
ModuleName = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$",
        description='a dotted module name like "myapp.tasks"',
    ),
]

HookName = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*(:[A-Za-z_][A-Za-z0-9_]*)?$",
        description='a dotted module name like "myapp.hooks", or "myapp.hooks:make_hooks"',
    ),
]

SocketMode = Annotated[
    int,
    msgspec.Meta(
        ge=0o600,
        le=0o777,
        description="a file mode in octal, like 0o660, that lets the owner read and write",
    ),
]

FsyncPolicy = Literal["always", "interval", "never"]
ConcurrencyMode = Literal["threads", "asyncio"]
CatchUp = Literal["skip", "once"]
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["auto", "json", "console"]
JobLines = Literal["debug", "info", "off"]

#: ``broker.max_payload`` when unset (bytes), unless max_message_size is smaller.
DEFAULT_MAX_PAYLOAD = 2**20

_WILDCARD_HOST = re.compile(r"^tcp://(\*|0\.0\.0\.0|\[::\]|\[\*\]):")


class BrokerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """The ``[broker]`` section: its log, its endpoints, and job defaults."""

    state_dir: NonEmptyStr = "var/corral"
    client_endpoint: NonEmptyStr | None = None
    worker_endpoint: NonEmptyStr | None = None
    control_endpoint: NonEmptyStr | None = None
    #: Where job and worker events are published (ZeroMQ PUB); unset: none.
    events_endpoint: NonEmptyStr | None = None
    fsync: FsyncPolicy = "always"
    fsync_interval: PositiveDuration = 1.0
    heartbeat_interval: PositiveDuration = 1.0
    heartbeat_liveness: PositiveInt = 3
    segment_size: PositiveSize = 64 * 2**20
    disk_reserve: Size = 4 * 2**20
    compact_min_size: Size = 64 * 2**20
    max_message_size: PositiveSize = 16 * 2**20
    result_ttl: Duration = 86_400.0
    failed_ttl: Duration = 30 * 86_400.0
    max_attempts: PositiveInt = 5
    #: Retry requests (corral.Retry) a job may make before it fails.
    max_retries: NonNegativeInt = 25
    retry_backoff: Duration = 1.0
    retry_backoff_max: Duration = 600.0
    #: The largest job payload (msgpack bytes) an enqueue may carry; checked
    #: again on each job the log replays. Unset: 1 MiB, or max_message_size if smaller.
    max_payload: PositiveSize | None = None
    #: Mode of the ipc:// socket files (default 0o600, or 0o660 with
    #: socket_group); the state directory opens to match. Write it in octal: 0o660.
    socket_mode: SocketMode | None = None
    #: Group that owns the ipc:// socket files (a name), for clients of another user.
    socket_group: NonEmptyStr | None = None

    def __post_init__(self) -> None:
        """Put the sockets in ``state_dir`` unless an endpoint was given;
        bound payloads by ``DEFAULT_MAX_PAYLOAD`` (or ``max_message_size``)
        unless ``max_payload`` was given."""
        if self.max_payload is None:
            force_setattr(self, "max_payload", min(DEFAULT_MAX_PAYLOAD, self.max_message_size))
        for name in ("client", "worker", "control"):
            field = f"{name}_endpoint"
            if getattr(self, field) is None:
                force_setattr(self, field, f"ipc://{self.state_dir}/{name}.sock")


class PoolConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """One ``[[pools]]`` entry: a group of identical worker processes serving some queues."""

    name: PoolName
    queues: Annotated[list[NonEmptyStr], msgspec.Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: ["default"]
    )
    processes: NonNegativeInt = 1
    plugins: list[ModuleName] = []
    concurrency: PositiveInt = 1
    concurrency_mode: ConcurrencyMode = "threads"
    prefetch: NonNegativeInt = 4
    max_jobs_per_process: NonNegativeInt = 0
    max_memory: PositiveSize | None = None
    max_age: PositiveDuration | None = None
    shutdown_timeout: Duration = 30.0
    startup_timeout: PositiveDuration = 60.0
    preload: bool = True
    max_restarts: NonNegativeInt = 5
    restart_window: PositiveDuration = 60.0
    restart_backoff: Duration = 1.0
    restart_backoff_max: Duration = 30.0
    pool_backoff: PositiveDuration = 60.0
    pool_backoff_max: PositiveDuration = 600.0
    queue_weights: dict[str, PositiveInt] = {}
    #: Hooks modules for this pool's workers, after the top-level ``hooks``
    #: (see :mod:`corral.hooks`).
    hooks: list[HookName] = []


class ScheduleConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """One ``[[schedules]]`` entry: enqueue ``task`` on a cron expression or every so often."""

    name: NonEmptyStr | None = None
    task: NonEmptyStr
    cron: NonEmptyStr | None = None
    every: PositiveDuration | None = None
    timezone: NonEmptyStr = "UTC"
    payload: Any = None
    queue: NonEmptyStr = "default"
    priority: int = 0
    catch_up: CatchUp = "skip"
    enabled: bool = True

    def __post_init__(self) -> None:
        """Name the schedule after its task unless a name was given."""
        if self.name is None:
            force_setattr(self, "name", self.task)


class LogConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """The ``[log]`` section: level and format of every process's structured
    log, and the level of a worker's line per job (``jobs``: received,
    succeeded, failed, with the duration, as Celery logs them; about 20 µs of
    worker CPU a line, so "debug" or "off" where every microsecond counts)."""

    level: LogLevel = "info"
    format: LogFormat = "auto"
    jobs: JobLines = "info"


class ClientConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """The ``[client]`` section: how the CLI and ``Client.from_config`` reach the broker."""

    endpoint: NonEmptyStr | None = None
    timeout: PositiveDuration = 5.0


class SecurityConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """The ``[security]`` section: CURVE key files for tcp endpoints (paths, not keys).

    ``authorized_keys_dir`` holds the public keys of the clients the broker
    admits, ``worker_keys_dir`` those of its workers (kept apart, so a
    client's key cannot register as a worker); SIGHUP re-reads both.
    """

    allow_insecure_tcp: bool = False
    server_secret_key: NonEmptyStr | None = None
    server_public_key: NonEmptyStr | None = None
    client_secret_key: NonEmptyStr | None = None
    client_public_key: NonEmptyStr | None = None
    #: The key pair this host's worker processes connect with; unset: client_secret_key.
    worker_secret_key: NonEmptyStr | None = None
    authorized_keys_dir: NonEmptyStr | None = None
    worker_keys_dir: NonEmptyStr | None = None
    #: Admit any client key on a CURVE client endpoint (encrypted, not authenticated).
    allow_any_client_key: bool = False


class MetricsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """The ``[metrics]`` section: where the broker serves Prometheus metrics
    (``listen = "HOST:PORT"``, e.g. "127.0.0.1:9464"; unset: not served)."""

    listen: NonEmptyStr | None = None


class DashboardConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """The ``[dashboard]`` section: where ``corral dashboard`` (and ``corral
    run``) serves the web dashboard (``listen = "HOST:PORT"``; unset: ``corral
    run`` serves none, ``corral dashboard`` uses 127.0.0.1:9465), and whether
    it may change anything (``allow_actions``: pause, resume, retry, delete)."""

    listen: NonEmptyStr | None = None
    allow_actions: bool = False


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """A whole corral config file; ``Config.default()`` is what runs when there is none."""

    broker: BrokerConfig = msgspec.field(default_factory=BrokerConfig)
    pools: list[PoolConfig] = []
    schedules: list[ScheduleConfig] = []
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    client: ClientConfig = msgspec.field(default_factory=ClientConfig)
    security: SecurityConfig = msgspec.field(default_factory=SecurityConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    dashboard: DashboardConfig = msgspec.field(default_factory=DashboardConfig)
    python_path: list[NonEmptyStr] = []
    #: Hooks modules (see :mod:`corral.hooks`) that every pool's workers and
    #: ``Client.from_config`` load: each module's ``corral_hooks()`` (or
    #: ``"module:function"``) gives its hooks.
    hooks: list[HookName] = []

    def __post_init__(self) -> None:
        """Point the client at the broker's client endpoint unless one was given."""
        if self.client.endpoint is None:
            endpoint = connect_endpoint(self.broker.client_endpoint or "")
            force_setattr(self, "client", replace(self.client, endpoint=endpoint))

    @classmethod
    def default(cls) -> Config:
        """Return the config used when no file is given: every field at its default."""
        return cls()


def split_listen(listen: str) -> tuple[str, int]:
    """("HOST", PORT) of a ``listen`` setting, "HOST:PORT" (an IPv6 host in
    brackets, which go); ``[metrics]`` and ``[dashboard]`` take this form.
    Raises ValueError for a port that is not a number."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def connect_endpoint(endpoint: str) -> str:
    """Turn a bind address into one a client can connect to: a wildcard host becomes loopback."""
    match = _WILDCARD_HOST.match(endpoint)
    if match is None:
        return endpoint
    loopback = "[::1]" if match.group(1) == "[::]" else "127.0.0.1"
    return f"tcp://{loopback}:{endpoint[match.end() :]}"
