"""Rules that span several fields, checked once a config has decoded into structs.

Each check returns ``(key path, message)`` pairs; the loader prefixes the file name.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
import zoneinfo
from collections.abc import Iterator

import msgspec

from .endpoints import TCP_ENDPOINT, endpoint_problem
from .schema import MAX_WORKER_CREDIT, Config, PoolConfig, ScheduleConfig, connect_endpoint
from .units import format_duration, format_size

#: The largest record the broker's log takes (corral.broker.framing.MAX_RECORD;
#: tests/test_config.py checks the two agree, the config does not import the broker).
MAX_LOG_RECORD = 64 * 2**20

Problem = tuple[str, str]

_CRON_FIELD = re.compile(r"^[0-9A-Za-z*/,?#-]+$")


def check(config: Config) -> list[Problem]:
    """Return every cross-field problem in ``config``, in file order."""
    return [
        *_check_broker(config),
        *_check_endpoints(config),
        *_check_keys(config),
        *_check_pools(config.pools),
        *_check_schedules(config.schedules),
        *_check_schedule_payloads(config),
        *_check_metrics(config),
        *_check_allowed_hosts(config.dashboard.allowed_hosts),
        *_check_events(config),
        *_check_distinct_endpoints(config),
    ]


#: Matched whole (fullmatch): ``$`` would take a trailing newline, ``\d`` any script's digits.
_LISTEN = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})")


def _check_events(config: Config) -> Iterator[Problem]:
    """The events endpoint: ipc, or tcp with CURVE (or insecure tcp allowed
    outright), its subscribers admitted by the clients' keys."""
    endpoint = config.broker.events_endpoint
    if endpoint is None:
        return
    path = "broker.events_endpoint"
    problems = list(_check_endpoint(path, endpoint))
    yield from problems
    if problems or not _is_tcp(endpoint):
        return
    security = config.security
    broker_keys = security.server_secret_key or security.server_public_key
    if not (broker_keys or security.allow_insecure_tcp):
        yield (
            path,
            "a tcp events endpoint needs CURVE keys (security.server_secret_key to publish, "
            "security.server_public_key to subscribe) or security.allow_insecure_tcp = true",
        )
    elif security.server_secret_key and not (
        security.authorized_keys_dir or security.allow_any_client_key
    ):
        yield (
            "security.authorized_keys_dir",
            "a CURVE events endpoint needs the directory of the client keys that may "
            "subscribe (one <name>.key each); set security.allow_any_client_key = true "
            "to admit any client key instead",
        )


#: Hosts that mean every address of this host in a tcp bind.
_WILDCARDS = ("*", "0.0.0.0", "[::]", "")


def _address(endpoint: str) -> tuple[str, str, str] | None:
    """What an endpoint binds: ("ipc", normalised path, ""), ("tcp", host,
    port); None for one that is not bound (inproc) or not well formed."""
    scheme, _, rest = endpoint.partition("://")
    if scheme == "ipc" and rest:
        return ("ipc", posixpath.normpath(rest), "")
    match = TCP_ENDPOINT.fullmatch(endpoint)
    if scheme == "tcp" and match:
        return ("tcp", match.group(1), match.group(2))
    return None


def _same_address(one: tuple[str, str, str], other: tuple[str, str, str]) -> bool:
    """Whether two bound addresses clash: one ipc path, or one tcp port on
    one host (or on every host: a wildcard). A port the system picks (*)
    never clashes."""
    if one[0] != other[0] or one[2] != other[2] or one[2] == "*":
        return False
    hosts = (one[1], other[1])
    return hosts[0] == hosts[1] or (one[0] == "tcp" and any(h in _WILDCARDS for h in hosts))


def _check_distinct_endpoints(config: Config) -> Iterator[Problem]:
    """The broker's endpoints bind distinct addresses: a second ipc bind
    takes the first one's socket file over in silence (an events endpoint
    at the client endpoint's path left the broker unreachable), a second
    tcp bind on a port fails at the start."""
    seen: list[tuple[str, tuple[str, str, str]]] = []
    for name in ("client_endpoint", "worker_endpoint", "events_endpoint"):
        endpoint = getattr(config.broker, name)
        address = _address(endpoint) if endpoint else None
        if address is None:
            continue
        for other, taken in seen:
            if _same_address(address, taken):
                yield (
                    f"broker.{name}",
                    f'"{endpoint}" binds the same address as broker.{other}: '
                    "give each endpoint its own socket path or port",
                )
                break
        seen.append((name, address))


def _check_metrics(config: Config) -> Iterator[Problem]:
    for path, listen in (
        ("metrics.listen", config.metrics.listen),
        ("dashboard.listen", config.dashboard.listen),
    ):
        if listen is None:
            continue
        match = _LISTEN.fullmatch(listen)
        if match is None or not 0 < int(match.group(2)) < 65536:
            yield (path, f'{listen!r}: expected "HOST:PORT" like "127.0.0.1:9464" or "[::1]:9464"')


#: A dashboard.allowed_hosts entry: a name, ".domain" / "*.domain", "*", or an address.
_HOST_ENTRY = re.compile(
    r"\*|(\*?\.)?[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*\.?",
    re.IGNORECASE | re.ASCII,
)


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False
    return True


def _check_allowed_hosts(entries: list[str] | None) -> Iterator[Problem]:
    for index, entry in enumerate(entries or []):
        if not (_HOST_ENTRY.fullmatch(entry) or _is_address(entry)) or len(entry) > 253:
            yield (
                f"dashboard.allowed_hosts[{index}]",
                f'{entry!r}: expected a host name without a port ("dash.example.com"), a '
                'domain and the names below it (".example.com"), an address, or "*" (any name)',
            )


def _check_broker(config: Config) -> Iterator[Problem]:
    """Bounds between broker fields."""
    broker = config.broker
    if broker.retry_backoff_max < broker.retry_backoff:
        yield (
            "broker.retry_backoff_max",
            f"must be at least broker.retry_backoff ({format_duration(broker.retry_backoff)})",
        )
    if broker.max_message_size >= broker.segment_size:
        yield (
            "broker.max_message_size",
            f"must be smaller than broker.segment_size ({format_size(broker.segment_size)}), "
            "so that every record fits in a segment",
        )
    if broker.max_message_size > MAX_LOG_RECORD:
        yield (
            "broker.max_message_size",
            f"must be at most {format_size(MAX_LOG_RECORD)}, the largest record the log "
            "takes (one enqueue of one job is one record)",
        )
    if broker.max_payload is not None and broker.max_payload > broker.max_message_size:
        yield (
            "broker.max_payload",
            f"must be at most broker.max_message_size ({format_size(broker.max_message_size)}): "
            "a payload travels in one message",
        )
    # a segment keeps its header and room for records beside its reserve
    if broker.disk_reserve > broker.segment_size // 2:
        yield (
            "broker.disk_reserve",
            f"must be at most half of broker.segment_size ({format_size(broker.segment_size)}): "
            "it is the part of each segment kept for existing jobs once the disk is full; "
            "lower disk_reserve or raise segment_size",
        )


def _check_endpoints(config: Config) -> Iterator[Problem]:
    """Endpoint syntax, and no tcp endpoint without CURVE keys unless explicitly allowed."""
    security = config.security
    broker = config.broker
    broker_keys = bool(security.server_secret_key or security.server_public_key)
    for name in ("client_endpoint", "worker_endpoint", "control_endpoint"):
        endpoint: str = getattr(broker, name)
        problems = list(_check_endpoint(f"broker.{name}", endpoint))
        yield from problems
        if not problems and _is_tcp(endpoint) and not (broker_keys or security.allow_insecure_tcp):
            yield (
                f"broker.{name}",
                "tcp endpoints need CURVE keys (security.server_secret_key to listen, "
                "security.server_public_key to connect) or security.allow_insecure_tcp = true",
            )
    endpoint = config.client.endpoint or ""
    # A client endpoint taken from broker.client_endpoint was checked there already,
    # unless only the broker's secret key is set: a client also needs the public one.
    if endpoint == connect_endpoint(broker.client_endpoint or ""):
        if not (broker_keys and _is_tcp(endpoint)):
            return
        origin = " (taken from broker.client_endpoint)"
    else:
        origin = ""
        problems = list(_check_endpoint("client.endpoint", endpoint, connect=True))
        yield from problems
        if problems:
            return
    if _is_tcp(endpoint) and not (security.server_public_key or security.allow_insecure_tcp):
        yield (
            "client.endpoint",
            f"tcp endpoints need CURVE keys{origin}: set security.server_public_key to the "
            "broker's public key file, or security.allow_insecure_tcp = true",
        )


def _check_keys(config: Config) -> Iterator[Problem]:
    """A broker with CURVE on a tcp endpoint names whose keys it admits:
    clients from authorized_keys_dir (or, said outright, any client key),
    workers from worker_keys_dir, a directory apart."""
    security = config.security
    broker = config.broker
    if not security.server_secret_key:
        return
    if _is_tcp(broker.client_endpoint or ""):
        if security.authorized_keys_dir and security.allow_any_client_key:
            yield (
                "security.allow_any_client_key",
                "cannot be true with security.authorized_keys_dir set: remove one of the two",
            )
        elif not (security.authorized_keys_dir or security.allow_any_client_key):
            yield (
                "security.authorized_keys_dir",
                "a CURVE client endpoint needs the directory of the client keys it admits "
                "(one <name>.key each); set security.allow_any_client_key = true to admit "
                "any client key instead",
            )
    if _is_tcp(broker.worker_endpoint or ""):
        if not security.worker_keys_dir:
            yield (
                "security.worker_keys_dir",
                "a CURVE worker endpoint needs the directory of the worker keys it admits "
                "(one <name>.key each), apart from the clients' authorized_keys_dir",
            )
        elif security.worker_keys_dir == security.authorized_keys_dir:
            yield (
                "security.worker_keys_dir",
                "must not be security.authorized_keys_dir: a client's key could then "
                "register as a worker; give the workers' keys their own directory",
            )


def _check_endpoint(path: str, endpoint: str, *, connect: bool = False) -> Iterator[Problem]:
    """One endpoint's syntax (see :func:`endpoint_problem`); ``connect``: a
    client connects to it, so no wildcard."""
    problem = endpoint_problem(endpoint, connect=connect)
    if problem is not None:
        yield path, problem


def _is_tcp(endpoint: str) -> bool:
    """Whether ``endpoint`` goes over the network."""
    return endpoint.startswith("tcp://")


def _check_pools(pools: list[PoolConfig]) -> Iterator[Problem]:
    """Unique pool names, queue weights only for served queues, sane restart backoff."""
    seen: dict[str, int] = {}
    for index, pool in enumerate(pools):
        path = f"pools[{index}]"
        if pool.name in seen:
            yield (
                f"{path}.name",
                f'duplicate pool name "{pool.name}" (also pools[{seen[pool.name]}]): '
                "give each pool its own name",
            )
        seen.setdefault(pool.name, index)
        for queue in sorted(set(pool.queues)):
            if pool.queues.count(queue) > 1:
                yield f"{path}.queues", f'queue "{queue}" is listed more than once'
        for queue in pool.queue_weights:
            if queue not in pool.queues:
                yield (
                    f"{path}.queue_weights",
                    f'"{queue}" is not one of this pool\'s queues ({", ".join(pool.queues)}): '
                    "add it to queues or remove its weight",
                )
        credit = pool.concurrency + pool.prefetch
        if credit > MAX_WORKER_CREDIT:  # the broker drops a READY over it: the pool would never run
            key = "concurrency" if pool.concurrency > MAX_WORKER_CREDIT else "prefetch"
            yield (
                f"{path}.{key}",
                f"concurrency + prefetch is {credit}: a worker may hold at most "
                f"{MAX_WORKER_CREDIT} jobs (the broker refuses more); run more processes instead",
            )
        if pool.restart_backoff_max < pool.restart_backoff:
            yield (
                f"{path}.restart_backoff_max",
                f"must be at least restart_backoff ({format_duration(pool.restart_backoff)})",
            )


def _check_schedules(schedules: list[ScheduleConfig]) -> Iterator[Problem]:
    """Exactly one trigger per schedule, a plausible cron line, a known time zone, unique names."""
    seen: dict[str | None, int] = {}
    for index, schedule in enumerate(schedules):
        path = f"schedules[{index}]"
        if (schedule.cron is None) == (schedule.every is None):
            yield path, 'set exactly one of cron and every (e.g. every = "5m")'
        if schedule.cron is not None:
            yield from _check_cron(f"{path}.cron", schedule.cron)
        if not _known_timezone(schedule.timezone):
            yield (
                f"{path}.timezone",
                f'unknown time zone "{schedule.timezone}": use an IANA name like "UTC" '
                'or "Europe/Paris"',
            )
        if schedule.name in seen:
            yield (
                f"{path}.name",
                f'duplicate schedule name "{schedule.name}" (also schedules[{seen[schedule.name]}]'
                "; an unnamed schedule takes its task's name): set a distinct name",
            )
        seen.setdefault(schedule.name, index)


def _check_schedule_payloads(config: Config) -> Iterator[Problem]:
    """A schedule's payload fits in broker.max_payload, as an enqueued one must."""
    limit = config.broker.max_payload
    if limit is None:
        return
    for index, schedule in enumerate(config.schedules):
        size = len(msgspec.msgpack.encode(schedule.payload))
        if size > limit:
            yield (
                f"schedules[{index}].payload",
                f"is {format_size(size)} as msgpack, over broker.max_payload "
                f"({format_size(limit)}): make it smaller or raise max_payload",
            )


def _check_cron(path: str, cron: str) -> Iterator[Problem]:
    """A light syntax check: 5 or 6 fields of cron characters; a cron library checks the rest."""
    fields = cron.split()
    if len(fields) not in (5, 6):
        yield (
            path,
            f'expected 5 fields "minute hour day-of-month month day-of-week" (or 6, with '
            f'seconds first), got {len(fields)} in "{cron}"',
        )
    for field in fields:
        if not _CRON_FIELD.match(field):
            yield path, f'"{field}" is not a cron field in "{cron}"'
            break


def _known_timezone(name: str) -> bool:
    """Whether ``name`` is a time zone the system's tz database knows."""
    if name == "UTC":
        return True
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return False
    return True
