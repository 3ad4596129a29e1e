"""Every number a config takes has the upper bound the OS or the code can
actually take (file descriptors, processes, 32-bit fields, waits that
overflow), and past it the error names the key, the value, the bound and
why: a huge number never passes `check-config` to fail later."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from msgspec import inspect as mi

from corral.config import loads
from corral.config.schema import Config
from corral.errors import ConfigError

#: Numbers compared with others and nothing more: any value works.
UNBOUNDED = {
    "PoolConfig.max_jobs_per_process",
    "PoolConfig.max_memory",
    "BrokerConfig.compact_min_size",
    "BrokerConfig.max_payload",  # at most max_message_size (a check)
    "BrokerConfig.disk_reserve",  # at most half of segment_size (a check)
    "BrokerConfig.max_message_size",  # at most 64 MiB (a check)
}


def _numbers(struct: mi.StructType, seen: set[str]) -> list[tuple[str, mi.Type]]:
    found = []
    for field in struct.fields:
        kind = field.type
        if isinstance(kind, mi.Metadata):
            kind = kind.type
        if isinstance(kind, mi.UnionType):
            kinds = [t for t in kind.types if not isinstance(t, mi.NoneType)]
            kind = kinds[0] if len(kinds) == 1 else kind
        if isinstance(kind, mi.ListType):
            kind = kind.item_type
        if isinstance(kind, mi.DictType):
            kind = kind.value_type
        if isinstance(kind, mi.Metadata):
            kind = kind.type
        if isinstance(kind, mi.StructType):
            if kind.cls.__name__ not in seen:
                seen.add(kind.cls.__name__)
                found += _numbers(kind, seen)
        elif isinstance(kind, mi.IntType | mi.FloatType):
            found.append((f"{struct.cls.__name__}.{field.name}", kind))
    return found


def test_every_number_in_the_schema_has_an_upper_bound() -> None:
    info = mi.type_info(Config)
    assert isinstance(info, mi.StructType)
    numbers = _numbers(info, set())
    assert len(numbers) > 25
    unbounded = {name for name, kind in numbers if kind.le is None and kind.lt is None}
    assert unbounded == UNBOUNDED


def _config(tmp_path: Path, section: str, line: str) -> str:
    if section == "pools":
        return f'[broker]\nstate_dir = "{tmp_path}"\n[[pools]]\nname = "p"\n{line}\n'
    if section == "schedules":
        return (
            f'[broker]\nstate_dir = "{tmp_path}"\n[[schedules]]\nname = "s"\ntask = "t"\n{line}\n'
        )
    if section == "broker":
        return f'[broker]\nstate_dir = "{tmp_path}"\n{line}\n'
    return f'[broker]\nstate_dir = "{tmp_path}"\n[{section}]\n{line}\n'


@pytest.mark.parametrize(
    ("section", "line", "path", "bound", "why"),
    [
        (
            "broker",
            "heartbeat_liveness = 100000000000000000000",
            "broker.heartbeat_liveness",
            "1000",
            "dead",
        ),
        (
            "broker",
            "max_connections = 10000000000",
            "broker.max_connections",
            "250000",
            "file descriptor",
        ),
        ("pools", "processes = 100000", "pools[0].processes", "4096", "pid_max"),
        ("pools", "concurrency = 1000000", "pools[0].concurrency", "100000", "broker refuses"),
        ("pools", "prefetch = 1000000", "pools[0].prefetch", "100000", "broker refuses"),
        ("pools", "max_restarts = 100000000", "pools[0].max_restarts", "1000000", "memory"),
        (
            "pools",
            "queue_weights = {default = 10000000000}",
            "pools[0].queue_weights.default",
            "1000000",
            "share",
        ),
        ("broker", "max_attempts = 10000000000", "broker.max_attempts", "2147483647", "32 bits"),
        ("broker", "max_retries = 10000000000", "broker.max_retries", "2147483647", "32 bits"),
        ("broker", "heartbeat_interval = 1e20", "broker.heartbeat_interval", "36525d", "overflow"),
        ("broker", 'result_ttl = "100000000d"', "broker.result_ttl", "36525d", "overflow"),
        (
            "pools",
            'shutdown_timeout = "1000000000d"',
            "pools[0].shutdown_timeout",
            "36525d",
            "overflow",
        ),
        ("schedules", "every = 1e300", "schedules[0].every", "36525d", "overflow"),
        ("client", "timeout = 1e30", "client.timeout", "36525d", "overflow"),
        ("broker", 'segment_size = "1TiB"', "broker.segment_size", "4GiB", "preallocated"),
        ("broker", "segment_size = 1000", "broker.segment_size", "4KiB", "header"),
        # 1 passed check-config: the broker then dropped every peer's first message
        ("broker", "max_message_size = 1", "broker.max_message_size", "16KiB", "report"),
        # a period that short made a real daemon spin (a heartbeat every 1e-300 s: the broker
        # and its worker at 60% CPU, 20,000 broker.stalled lines a second, no job ran)
        ("broker", "heartbeat_interval = 1e-300", "broker.heartbeat_interval", "10ms", "busies"),
        ("broker", 'fsync_interval = "0.001ms"', "broker.fsync_interval", "10ms", "busies"),
        ("schedules", "every = 1e-9", "schedules[0].every", "10ms", "busies"),
    ],
)
def test_a_number_past_its_bound_is_named_with_the_bound_and_why(
    tmp_path: Path, section: str, line: str, path: str, bound: str, why: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        loads(_config(tmp_path, section, line))
    text = str(raised.value)
    assert f"{path}:" in text and bound in text.replace(",", "") and why in text, text
    assert "got " in text, text


def test_the_bounds_themselves_are_taken(tmp_path: Path) -> None:
    text = _config(
        tmp_path,
        "pools",
        "processes = 4096\nconcurrency = 50000\nprefetch = 50000\nmax_restarts = 1000000\n"
        'shutdown_timeout = "36525d"',
    )
    config = loads(text)
    assert config.pools[0].processes == 4096
    assert msgspec.structs.asdict(config.pools[0])["shutdown_timeout"] == 36525 * 86400
