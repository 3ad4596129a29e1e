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

#: The longest duration a setting may give: 100 years, as for a job's options
#: (corral.broker.jobspec.MAX_SECONDS). Past it a wait overflows (threading's
#: TIMEOUT_MAX is 292 years; 1e20 seconds raises OverflowError) and means never.
MAX_DURATION = 36_525 * 86_400.0
_DURATION_WHY = "as long as a job option may be; a longer wait overflows the timers"

# The "unit" marker tells the loader to parse the value first; the bounds apply to the
# result, and "why" says where the upper bound comes from.
Duration = Annotated[
    float, msgspec.Meta(ge=0, le=MAX_DURATION, extra={"unit": DURATION, "why": _DURATION_WHY})
]
PositiveDuration = Annotated[
    float, msgspec.Meta(gt=0, le=MAX_DURATION, extra={"unit": DURATION, "why": _DURATION_WHY})
]
#: The shortest period a timer that repeats may have (seconds): a shorter one
#: busies the loop that runs it and does nothing else.
MIN_PERIOD = 0.01
Period = Annotated[
    float,
    msgspec.Meta(
        ge=MIN_PERIOD,
        le=MAX_DURATION,
        extra={
            "unit": DURATION,
            "why": "a shorter period busies the loop that runs it; a longer one overflows the "
            "timers",
        },
    ),
]
Size = Annotated[int, msgspec.Meta(ge=0, extra={"unit": SIZE})]
PositiveSize = Annotated[int, msgspec.Meta(gt=0, extra={"unit": SIZE})]
#: The smallest and largest log segment: room for its header and a record
#: (corral.broker.log refuses less); every segment is preallocated whole.
MIN_SEGMENT, MAX_SEGMENT = 4096, 4 * 2**30
SegmentSize = Annotated[
    int,
    msgspec.Meta(
        ge=MIN_SEGMENT,
        le=MAX_SEGMENT,
        extra={
            "unit": SIZE,
            "why": "room for a segment's header and records, and at most what is "
            "preallocated on disk for each segment at once",
        },
    ),
]

#: The smallest broker.max_message_size: room for a READY of a few hundred
#: tasks and a report of one outcome with a result (a broker taking less
#: dropped every peer's first message).
MIN_MESSAGE = 16 * 2**10
MessageSize = Annotated[
    int,
    msgspec.Meta(
        ge=MIN_MESSAGE,
        extra={
            "unit": SIZE,
            "why": "room for a worker's READY and a report of one job's outcome",
        },
    ),
]

NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]

#: The most jobs one worker may hold (its concurrency + prefetch): the
#: broker refuses a READY over it (corral.broker.protocol.MAX_CREDIT, the same).
MAX_WORKER_CREDIT = 100_000
#: Attempts and retries are 32-bit numbers in the log and on the wire.
MAX_INT32 = 2**31 - 1

Liveness = Annotated[
    int,
    msgspec.Meta(
        ge=1,
        le=1000,
        description="a whole number of heartbeats from 1 to 1000 (past it a dead worker is "
        "never declared dead in effect, and its jobs wait with it)",
    ),
]
#: Each connection costs the broker up to 4 file descriptors (corral.broker.gate.files_needed),
#: and a process may hold at most fs.nr_open of them (1,048,576 by default).
MAX_CONNECTIONS = 250_000
Connections = Annotated[
    int,
    msgspec.Meta(
        ge=1,
        le=MAX_CONNECTIONS,
        description=f"a whole number from 1 to {MAX_CONNECTIONS:,} (each connection costs "
        "the broker up to 4 file descriptors, and a process may hold at most the "
        "kernel's fs.nr_open, 1,048,576 by default)",
    ),
]
#: Worker processes one pool may run.
MAX_PROCESSES = 4096
Processes = Annotated[
    int,
    msgspec.Meta(
        ge=0,
        le=MAX_PROCESSES,
        description=f"a whole number from 0 to {MAX_PROCESSES:,} (each worker is a Python "
        "process of tens of MiB, and the kernel's pid_max is 32,768 by default)",
    ),
]
Concurrency = Annotated[
    int,
    msgspec.Meta(
        ge=1,
        le=MAX_WORKER_CREDIT,
        description=f"a whole number from 1 to {MAX_WORKER_CREDIT:,} (a worker may hold at "
        "most that many jobs: the broker refuses more)",
    ),
]
Prefetch = Annotated[
    int,
    msgspec.Meta(
        ge=0,
        le=MAX_WORKER_CREDIT,
        description=f"a whole number from 0 to {MAX_WORKER_CREDIT:,} (a worker may hold at "
        "most that many jobs: the broker refuses more)",
    ),
]
Restarts = Annotated[
    int,
    msgspec.Meta(
        ge=0,
        le=1_000_000,
        description="a whole number from 0 to 1,000,000 (crashes in restart_window before the "
        "pool backs off; the time of each is kept in memory until it leaves the window)",
    ),
]
Weight = Annotated[
    int,
    msgspec.Meta(
        ge=1,
        le=1_000_000,
        description="a whole number from 1 to 1,000,000 (a queue's share of the worker's "
        "picks, against the others')",
    ),
]
Attempts = Annotated[
    int,
    msgspec.Meta(
        ge=1,
        le=MAX_INT32,
        description=f"a whole number from 1 to {MAX_INT32} (a job's attempts are 32 bits "
        "in the log and on the wire)",
    ),
]
Retries = Annotated[
    int,
    msgspec.Meta(
        ge=0,
        le=MAX_INT32,
        description=f"a whole number from 0 to {MAX_INT32} (a job's retries are 32 bits "
        "in the log and on the wire)",
    ),
]

NonEmptyStr = Annotated[str, msgspec.Meta(min_length=1)]
#: A task or queue name, as the broker takes one (jobspec.MAX_NAME).
Name = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=200,
        description="a name of 1 to 200 characters",
    ),
]
#: A job's priority: 32 bits, as the broker takes it.
Priority = Annotated[
    int,
    msgspec.Meta(
        ge=-(2**31),
        le=2**31 - 1,
        description="a whole number from -2147483648 to 2147483647",
    ),
]
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

    #: Directory of the broker's log (``log/``), its lock file and, unless the endpoints say
    #: otherwise, its ipc sockets.
    state_dir: NonEmptyStr = "var/corral"
    #: Where the broker listens for clients (the CLI, ``Client``, supervisors): ``ipc://PATH``,
    #: or ``tcp://HOST:PORT`` with CURVE keys. Unset: ``ipc://STATE_DIR/client.sock``.
    client_endpoint: NonEmptyStr | None = None
    #: Where worker processes connect for jobs, written as client_endpoint. Unset:
    #: ``ipc://STATE_DIR/worker.sock``.
    worker_endpoint: NonEmptyStr | None = None
    #: Reserved: nothing listens on it in this version (checked like the other endpoints).
    #: Unset: ``ipc://STATE_DIR/control.sock``.
    control_endpoint: NonEmptyStr | None = None
    #: Where job and worker events are published (ZeroMQ PUB, read by ``corral events``):
    #: ``ipc://PATH``, or ``tcp://HOST:PORT`` with CURVE, where a subscriber needs a key in
    #: authorized_keys_dir. Like the other endpoints, one that cannot be bound stops the
    #: broker at its start. Unset: no events.
    events_endpoint: NonEmptyStr | None = None
    #: When an enqueue is acknowledged: ``always`` once its record is fsync'd (group commit),
    #: ``interval`` fsync every fsync_interval, ``never`` leave it to the OS.
    fsync: FsyncPolicy = "always"
    #: How often the log is fsync'd under ``fsync = "interval"``.
    fsync_interval: Period = 1.0
    #: How often the broker and each worker heartbeat; worker hosts must use the broker's
    #: value.
    heartbeat_interval: Period = 1.0
    #: Heartbeats a worker may miss before it is dead and its jobs go back to their queue.
    heartbeat_liveness: Liveness = 3
    #: Size at which a log segment is closed and the next one started.
    segment_size: SegmentSize = 64 * 2**20
    #: Room kept for the jobs already accepted: once the disk is this full, new jobs are
    #: refused (``DiskFull``) and existing ones still finish. At most half of segment_size.
    disk_reserve: Size = 4 * 2**20
    #: Bytes written since the last compaction before the log is compacted again (and at least
    #: twice the live data).
    compact_min_size: Size = 64 * 2**20
    #: The largest frame a peer may send (``ZMQ_MAXMSGSIZE``; a peer sending more is
    #: disconnected). Below segment_size, at most 64MiB.
    max_message_size: MessageSize = 16 * 2**20
    #: The most peers connected at once to each of client_endpoint and worker_endpoint
    #: (one that left counts until what it sent is read); one more is refused at its
    #: handshake, and logged, until another leaves. Each costs the broker about 30 KiB, up
    #: to 100 read-ahead messages and a file descriptor: the broker raises its open-file
    #: limit to 4 x this + 256 where the hard limit allows.
    max_connections: Connections = 1024
    #: How long a succeeded job and its result are kept, unless the job or its task says
    #: otherwise.
    result_ttl: Duration = 86_400.0
    #: How long failed and cancelled jobs are kept.
    failed_ttl: Duration = 30 * 86_400.0
    #: Tries a job gets when neither the job nor its task sets max_attempts.
    max_attempts: Attempts = 5
    #: Retry requests (corral.Retry) a job may make before it fails.
    max_retries: Retries = 25
    #: Delay before the first retry of a failed try, doubling (with jitter) up to
    #: retry_backoff_max, when the task sets none.
    retry_backoff: Duration = 1.0
    #: The longest delay between two tries of a failing job.
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

    #: The pool's name, unique in the file: ``corral status`` and the process titles show it.
    name: PoolName
    #: The queues its workers take jobs from.
    queues: Annotated[list[Name], msgspec.Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: ["default"]
    )
    #: Worker processes to run (0: the pool is kept, with no process).
    processes: Processes = 1
    #: Modules its workers import: their ``@corral.task`` functions are the tasks it runs.
    plugins: list[ModuleName] = []
    #: Jobs each process runs at once (threads, or tasks on its event loop).
    concurrency: Concurrency = 1
    #: ``threads``: a thread per running job; ``asyncio``: ``async def`` tasks on one event
    #: loop.
    concurrency_mode: ConcurrencyMode = "threads"
    #: Jobs each process may hold, not started, beyond its concurrency (the two together at
    #: most 100000).
    prefetch: Prefetch = 4
    #: Recycle a process once it has run this many jobs (0: never).
    max_jobs_per_process: NonNegativeInt = 0
    #: Recycle a process after its current job once its RSS is above this. Unset: no limit.
    max_memory: PositiveSize | None = None
    #: Recycle a process after its current job once it is this old. Unset: no limit.
    max_age: PositiveDuration | None = None
    #: On a stop or a recycle, how long running jobs may finish before the process is killed
    #: (its jobs go back to their queue, not counted as tries).
    shutdown_timeout: Duration = 30.0
    #: How long a new process may take to import its plugins and register before it is killed.
    startup_timeout: PositiveDuration = 60.0
    #: Import the plugins once in the supervisor and fork the workers from it; false: each
    #: worker imports them itself.
    preload: bool = True
    #: Crashes of the pool's processes within restart_window past which the whole pool backs
    #: off for pool_backoff.
    max_restarts: Restarts = 5
    #: The window in which max_restarts crashes are counted.
    restart_window: PositiveDuration = 60.0
    #: A slot that crashes again is restarted after this, doubling up to restart_backoff_max
    #: (the first restart is at once).
    restart_backoff: Duration = 1.0
    #: The longest wait before a crashed slot is restarted.
    restart_backoff_max: Duration = 30.0
    #: How long a pool past max_restarts waits before it starts again, doubling up to
    #: pool_backoff_max (SIGHUP starts it at once).
    pool_backoff: PositiveDuration = 60.0
    #: The longest wait of a pool that backs off.
    pool_backoff_max: PositiveDuration = 600.0
    #: A share per queue (``{ emails = 10, bulk = 1 }``): how often each queue is looked at
    #: first; a queue left out weighs 1.
    queue_weights: dict[str, Weight] = {}
    #: Hooks modules for this pool's workers, after the top-level ``hooks``
    #: (see :mod:`corral.hooks`).
    hooks: list[HookName] = []
    #: How long one call of a hook (before_job, on_failure, on_retry, after_job) may take:
    #: past it the supervisor kills the worker, which holds the hook's thread, and starts
    #: another. Its jobs not started go back uncounted; a job whose end hook hung keeps its
    #: outcome; a before_job past it ends its try (counted, as a hard timeout).
    hook_timeout: PositiveDuration = 30.0


class ScheduleConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """One ``[[schedules]]`` entry: enqueue ``task`` on a cron expression or every so often."""

    #: The schedule's name, unique in the file; the log records its fires under it. Unset: the
    #: task's name.
    name: NonEmptyStr | None = None
    #: The task each fire enqueues.
    task: Name
    #: A cron expression of 5 fields (6 with seconds first), in timezone. Set exactly one of
    #: cron and every.
    cron: NonEmptyStr | None = None
    #: Fire at this interval instead of on a cron expression.
    every: Period | None = None
    #: The IANA time zone cron is read in, e.g. "Europe/Paris".
    timezone: NonEmptyStr = "UTC"
    #: The payload of each job (any TOML value); ``check-config`` checks it against the task's
    #: type.
    payload: Any = None
    #: The queue each job goes to.
    queue: Name = "default"
    #: The priority of each job (higher starts first).
    priority: Priority = 0
    #: After downtime: ``skip`` the fires missed, or run ``once``.
    catch_up: CatchUp = "skip"
    #: false: the schedule never fires.
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

    #: The lowest level logged.
    level: LogLevel = "info"
    #: ``json``: one JSON object a line; ``console``: for people; ``auto``: console on a
    #: terminal, JSON otherwise.
    format: LogFormat = "auto"
    #: The level of a worker's line per job received and ended; ``off``: none.
    jobs: JobLines = "info"


class ClientConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """The ``[client]`` section: how the CLI and ``Client.from_config`` reach the broker."""

    #: Where the CLI and ``Client.from_config`` reach the broker. Unset: broker.client_endpoint
    #: (a wildcard host as loopback).
    endpoint: NonEmptyStr | None = None
    #: How long a request waits for the broker before it gives up (the CLI exits 3); an
    #: enqueue's client hooks (``before_enqueue``) run within it too.
    timeout: PositiveDuration = 5.0


class SecurityConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """The ``[security]`` section: CURVE key files for tcp endpoints (paths, not keys).

    ``authorized_keys_dir`` holds the public keys of the clients the broker
    admits, ``worker_keys_dir`` those of its workers (kept apart, so a
    client's key cannot register as a worker); SIGHUP re-reads both.
    """

    #: Allow tcp endpoints without CURVE: no encryption, no authentication.
    allow_insecure_tcp: bool = False
    #: On the broker: its secret key file (``corral keys server``), which turns CURVE on for
    #: its tcp endpoints.
    server_secret_key: NonEmptyStr | None = None
    #: The broker's public key file, for whatever connects to it over tcp (CLI, supervisor,
    #: workers).
    server_public_key: NonEmptyStr | None = None
    #: This host's secret key file for connecting over tcp (the CLI, ``Client``, a supervisor;
    #: its workers too unless worker_secret_key is set).
    client_secret_key: NonEmptyStr | None = None
    #: This host's public key file. Not read: the secret key file holds the public key too.
    client_public_key: NonEmptyStr | None = None
    #: The key pair this host's worker processes connect with; unset: client_secret_key.
    worker_secret_key: NonEmptyStr | None = None
    #: On the broker: a directory of the public keys (``<name>.key``) of the clients it admits,
    #: and of the events subscribers over tcp; SIGHUP re-reads it.
    authorized_keys_dir: NonEmptyStr | None = None
    #: On the broker: a directory of the public keys of the workers it admits, apart from
    #: authorized_keys_dir; SIGHUP re-reads it.
    worker_keys_dir: NonEmptyStr | None = None
    #: Admit any client key on a CURVE client or events endpoint (encrypted, not
    #: authenticated).
    allow_any_client_key: bool = False


class MetricsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """The ``[metrics]`` section: where the broker serves Prometheus metrics
    (``listen = "HOST:PORT"``, e.g. "127.0.0.1:9464"; unset: not served)."""

    #: ``"HOST:PORT"`` where the broker serves Prometheus metrics (``/metrics``). Unset: not
    #: served.
    listen: NonEmptyStr | None = None


class DashboardConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """The ``[dashboard]`` section: where ``corral dashboard`` (and ``corral
    run``) serves the web dashboard (``listen = "HOST:PORT"``; unset: ``corral
    run`` serves none, ``corral dashboard`` uses 127.0.0.1:9465), and whether
    it may change anything (``allow_actions``: pause, resume, retry, delete)."""

    #: ``"HOST:PORT"`` of the web dashboard. Unset: ``corral run`` serves none, ``corral
    #: dashboard`` uses 127.0.0.1:9465.
    listen: NonEmptyStr | None = None
    #: Let the dashboard pause and resume queues and retry or delete failed jobs; false:
    #: read-only.
    allow_actions: bool = False
    #: The host names the dashboard answers to (the Host header; against DNS rebinding):
    #: ``"name"``, ``".example.com"`` (that domain and below), or ``"*"`` (any). An address
    #: is always answered. Unset: ``localhost``, names below ``.localhost``, the listen host
    #: when it is a name, and this machine's name when listening on every address.
    allowed_hosts: list[str] | None = None


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
    #: Directories put on ``sys.path`` before plugins are imported.
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
    Raises ValueError, saying what is expected, without a host or without
    a port from 1 to 65535."""
    host, _, port = listen.rpartition(":")
    if not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError('expected "HOST:PORT" with a port from 1 to 65535, like "127.0.0.1:9465"')
    return host.strip("[]"), int(port)


def connect_endpoint(endpoint: str) -> str:
    """Turn a bind address into one a client can connect to: a wildcard host becomes loopback."""
    match = _WILDCARD_HOST.match(endpoint)
    if match is None:
        return endpoint
    loopback = "[::1]" if match.group(1) == "[::]" else "127.0.0.1"
    return f"tcp://{loopback}:{endpoint[match.end() :]}"
