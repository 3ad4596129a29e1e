"""corral's settings: the TOML schema as frozen msgspec Structs, and the loader.

``load(path)`` and ``loads(text)`` return a validated ``Config`` or raise
``corral.errors.ConfigError`` naming the file and the bad key's path. Durations
are float seconds and sizes int bytes in the decoded structs.
"""

from .loader import load, loads
from .schema import (
    BrokerConfig,
    ClientConfig,
    Config,
    DashboardConfig,
    LogConfig,
    MetricsConfig,
    PoolConfig,
    ScheduleConfig,
    SecurityConfig,
    connect_endpoint,
    split_listen,
)
from .units import format_duration, format_size, parse_duration, parse_size

__all__ = [
    "BrokerConfig",
    "ClientConfig",
    "Config",
    "DashboardConfig",
    "LogConfig",
    "MetricsConfig",
    "PoolConfig",
    "ScheduleConfig",
    "SecurityConfig",
    "connect_endpoint",
    "format_duration",
    "format_size",
    "load",
    "loads",
    "parse_duration",
    "parse_size",
    "split_listen",
]
