"""Tests for corral.config: the schema, the loader's messages, units, and the example files."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.config import (
    BrokerConfig,
    ClientConfig,
    Config,
    LogConfig,
    PoolConfig,
    ScheduleConfig,
    SecurityConfig,
    format_duration,
    format_size,
    load,
    loads,
    parse_duration,
    parse_size,
)
from corral.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
EXAMPLES = sorted(CONFIG_DIR.glob("*.toml"))


def config_error(text: str) -> str:
    """Load ``text`` expecting a ConfigError, and return its message."""
    with pytest.raises(ConfigError) as info:
        loads(text, source="test.toml")
    return str(info.value)


# --- defaults ---------------------------------------------------------------


def test_defaults() -> None:
    config = Config.default()
    broker = config.broker
    assert broker.state_dir == "var/corral"
    assert broker.client_endpoint == "ipc://var/corral/client.sock"
    assert broker.worker_endpoint == "ipc://var/corral/worker.sock"
    assert broker.control_endpoint == "ipc://var/corral/control.sock"
    assert broker.fsync == "always"
    assert broker.fsync_interval == 1.0
    assert broker.heartbeat_interval == 1.0
    assert broker.heartbeat_liveness == 3
    assert broker.segment_size == 64 * 2**20
    assert broker.disk_reserve == 4 * 2**20
    assert broker.compact_min_size == 64 * 2**20
    assert broker.max_message_size == 16 * 2**20
    assert broker.result_ttl == 86_400.0
    assert broker.failed_ttl == 30 * 86_400.0
    assert broker.max_attempts == 5
    assert (broker.retry_backoff, broker.retry_backoff_max) == (1.0, 600.0)
    assert config.pools == [] and config.schedules == [] and config.python_path == []
    assert config.log == LogConfig(level="info", format="auto")
    assert config.client == ClientConfig(endpoint="ipc://var/corral/client.sock", timeout=5.0)
    assert config.security == SecurityConfig()
    assert loads("") == config


def test_pool_and_schedule_defaults() -> None:
    config = loads('[[pools]]\nname = "p"\n[[schedules]]\ntask = "m.f"\nevery = "5m"\n')
    assert config.pools[0] == PoolConfig(name="p")
    pool = config.pools[0]
    assert pool.queues == ["default"] and pool.processes == 1 and pool.plugins == []
    assert (pool.concurrency, pool.concurrency_mode, pool.prefetch) == (1, "threads", 4)
    assert (pool.max_jobs_per_process, pool.max_memory, pool.max_age) == (0, None, None)
    assert (pool.shutdown_timeout, pool.preload, pool.max_restarts) == (30.0, True, 5)
    restart = (pool.restart_window, pool.restart_backoff, pool.restart_backoff_max)
    assert restart == (60.0, 1.0, 30.0)
    assert pool.queue_weights == {}
    schedule = config.schedules[0]
    assert schedule == ScheduleConfig(task="m.f", every=300.0)
    assert (schedule.name, schedule.cron, schedule.timezone) == ("m.f", None, "UTC")
    assert (schedule.payload, schedule.queue, schedule.priority) == (None, "default", 0)
    assert (schedule.catch_up, schedule.enabled) == ("skip", True)


def test_structs_are_frozen() -> None:
    config = Config.default()
    with pytest.raises(AttributeError):
        config.broker = BrokerConfig()  # type: ignore[misc]


# --- example files ----------------------------------------------------------


def test_examples_exist() -> None:
    names = {path.name for path in EXAMPLES}
    assert {"corral.toml", "broker-host.toml", "worker-host.toml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.name)
def test_example_loads(path: Path) -> None:
    assert isinstance(load(path), Config)


def test_example_single_host() -> None:
    config = load(CONFIG_DIR / "corral.toml")
    assert config.broker.state_dir == "var/corral"
    assert config.broker.fsync == "always"
    assert config.python_path == ["examples"]
    [pool] = config.pools
    assert (pool.name, pool.queues, pool.processes) == ("default", ["default"], 2)
    assert pool.plugins == ["demo_tasks"]
    assert config.client.endpoint == config.broker.client_endpoint
    # the tour's `corral events` (and `corral events | head -5`) needs no edit of it
    assert config.broker.events_endpoint == "ipc://var/corral/events.sock"


def test_example_broker_and_worker_hosts() -> None:
    broker_host = load(CONFIG_DIR / "broker-host.toml")
    assert broker_host.pools == []
    assert broker_host.broker.worker_endpoint.startswith("tcp://0.0.0.0:")  # type: ignore[union-attr]
    assert broker_host.security.server_secret_key.startswith("/etc/corral/keys/")  # type: ignore[union-attr]
    worker_host = load(CONFIG_DIR / "worker-host.toml")
    assert worker_host.pools
    assert worker_host.broker.worker_endpoint.startswith("tcp://")  # type: ignore[union-attr]
    assert worker_host.security.client_secret_key is not None
    assert worker_host.security.server_public_key is not None


def test_systemd_unit() -> None:
    lines = (CONFIG_DIR / "corral.service").read_text().splitlines()
    settings = dict(
        line.split("=", 1) for line in lines if "=" in line and not line.startswith("#")
    )
    assert settings["Type"] == "notify"
    assert settings["ExecStart"] == "/usr/bin/corral run -c /etc/corral/corral.toml"
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    expected = {
        "KillMode": "mixed",
        "NotifyAccess": "main",
        "DynamicUser": "yes",
        "StateDirectory": "corral",
        "RuntimeDirectory": "corral",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "SystemCallFilter": "@system-service",
        "UMask": "0077",
        "Restart": "on-failure",
    }
    assert {key: settings.get(key) for key in expected} == expected
    assert settings["TimeoutStopSec"] and settings["WatchdogSec"]
    system = load(CONFIG_DIR / "system.toml")
    assert system.broker.state_dir == "/var/lib/corral"
    assert system.broker.client_endpoint == "ipc:///run/corral/client.sock"


# --- durations and sizes ----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("1s", 1.0),
        ("1.5s", 1.5),
        ("5m", 300.0),
        ("2h", 7200.0),
        ("1d", 86_400.0),
        ("1h30m", 5400.0),
        (" 2 s ", 2.0),
        ("10", 10.0),
        (3, 3.0),
        (0.5, 0.5),
    ],
)
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["lots", "", "-1s", "5x", "1s later", "inf", "nan", True, -2])
def test_parse_duration_rejects(text: str | float) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512MiB", 512 * 2**20),
        ("1GiB", 2**30),
        ("64KiB", 65_536),
        ("10MB", 10_000_000),
        ("100B", 100),
        ("1.5KiB", 1536),
        ("64mib", 64 * 2**20),
        ("12", 12),
        (4096, 4096),
    ],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "", "5k", "-1B", "12 parsecs", 1.5, -1, False])
def test_parse_size_rejects(text: str | int) -> None:
    with pytest.raises(ValueError, match=r'invalid size .*(expected a size like "512MiB"|>= 0)'):
        parse_size(text)


def test_units_decoded_to_numbers() -> None:
    config = loads(
        '[broker]\nfsync_interval = "250ms"\nsegment_size = "1GiB"\nresult_ttl = 60\n'
        '[[pools]]\nname = "p"\nmax_memory = "512MiB"\nmax_age = "2h"\n'
    )
    assert config.broker.fsync_interval == 0.25
    assert config.broker.segment_size == 2**30
    assert config.broker.result_ttl == 60.0
    assert isinstance(config.broker.result_ttl, float)
    assert config.pools[0].max_memory == 512 * 2**20
    assert config.pools[0].max_age == 7200.0


@given(st.floats(min_value=0, max_value=1e12, allow_nan=False, allow_infinity=False))
def test_duration_round_trip(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(["ms", "s", "m", "h", "d"]))
def test_duration_units_round_trip(count: int, unit: str) -> None:
    seconds = parse_duration(f"{count}{unit}")
    assert parse_duration(format_duration(seconds)) == seconds


@given(st.integers(min_value=0, max_value=2**60))
def test_size_round_trip(size: int) -> None:
    assert parse_size(format_size(size)) == size


# --- error messages name the path -------------------------------------------


def test_bad_size_names_path() -> None:
    message = config_error('[[pools]]\nname = "a"\n[[pools]]\nname = "b"\nmax_memory = "lots"\n')
    assert message == 'test.toml: pools[1].max_memory: expected a size like "512MiB", got "lots"'


def test_bad_duration_names_path() -> None:
    message = config_error('[broker]\nheartbeat_interval = "soon"\n')
    assert message.startswith('test.toml: broker.heartbeat_interval: expected a duration like "1s"')
    assert config_error('[broker]\nheartbeat_interval = "0s"\n').endswith('got "0s"')


def test_unknown_key_top_level() -> None:
    message = config_error('pool = "x"\n')
    assert message.startswith("test.toml: pool: unknown key")
    assert 'did you mean "pools"?' in message
    assert (
        "known keys: broker, client, dashboard, hooks, log, metrics, pools, python_path, "
        "schedules, security" in message
    )


def test_unknown_key_in_broker() -> None:
    message = config_error('[broker]\nfsyncc = "always"\n')
    assert message.startswith("test.toml: broker.fsyncc: unknown key (")
    assert "known keys: client_endpoint, " in message


def test_unknown_key_in_second_pool() -> None:
    message = config_error('[[pools]]\nname = "a"\n[[pools]]\nname = "b"\nprocess = 2\n')
    assert message.startswith("test.toml: pools[1].process: unknown key")
    assert 'did you mean "processes"?' in message


def test_unknown_key_in_schedule_payload_is_allowed() -> None:
    config = loads('[[schedules]]\ntask = "t"\nevery = "1m"\npayload = { anything = [1, 2] }\n')
    assert config.schedules[0].payload == {"anything": [1, 2]}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[[pools]]\nname = "a"\nprocesses = -1\n',
            "pools[0].processes: expected a whole number from 0 to 4,096 (each worker is a Python "
            "process of tens of MiB, and the kernel's pid_max is 32,768 by default), got -1",
        ),
        (
            '[[pools]]\nname = "a"\nprocesses = "two"\n',
            "pools[0].processes: expected a whole number from 0 to 4,096 (each worker is a Python "
            'process of tens of MiB, and the kernel\'s pid_max is 32,768 by default), got "two"',
        ),
        ("[broker]\nstate_dir = 5\n", "broker.state_dir: expected a non-empty string, got 5"),
        ("broker = 5\n", "broker: expected a table, got 5"),
        ('python_path = "x"\n', 'python_path: expected an array of strings, got "x"'),
        (
            '[security]\nallow_insecure_tcp = "yes"\n',
            'security.allow_insecure_tcp: expected true or false, got "yes"',
        ),
        (
            '[pools]\nname = "a"\n',
            "pools: expected an array of tables (write one [[pools]] section per entry)",
        ),
        ("[[pools]]\nprocesses = 1\n", "pools[0].name: required key is missing"),
        (
            '[[pools]]\nname = "a"\nplugins = ["ok", 3]\n',
            'pools[0].plugins[1]: expected a dotted module name like "myapp.tasks", got 3',
        ),
        (
            '[[pools]]\nname = "a"\nqueue_weights = { default = "high" }\n',
            "pools[0].queue_weights.default: expected a whole number from 1 to 1,000,000 "
            "(a queue's share of the worker's picks, against the others'), got \"high\"",
        ),
    ],
)
def test_wrong_type_names_path(text: str, expected: str) -> None:
    assert config_error(text).startswith(f"test.toml: {expected}")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[broker]\nfsync = "sometimes"\n',
            'broker.fsync: expected one of "always", "interval", "never", got "sometimes"',
        ),
        (
            '[[pools]]\nname = "a"\nconcurrency_mode = "gevent"\n',
            'pools[0].concurrency_mode: expected one of "asyncio", "threads", got "gevent"',
        ),
        ('[log]\nformat = "xml"\n', 'log.format: expected one of "auto", "console", "json"'),
        (
            '[[schedules]]\ntask = "t"\nevery = "1m"\ncatch_up = "all"\n',
            'schedules[0].catch_up: expected one of "once", "skip", got "all"',
        ),
    ],
)
def test_literal_violations(text: str, expected: str) -> None:
    assert config_error(text).startswith(f"test.toml: {expected}")


# --- cross-field rules ------------------------------------------------------


@pytest.mark.parametrize(
    "trigger", ["", 'cron = "0 6 * * *"\nevery = "1h"\n'], ids=["neither", "both"]
)
def test_schedule_needs_exactly_one_trigger(trigger: str) -> None:
    message = config_error(f'[[schedules]]\ntask = "t"\n{trigger}')
    assert message.startswith("test.toml: schedules[0]: set exactly one of cron and every")


def test_schedule_cron_and_timezone_checked() -> None:
    message = config_error('[[schedules]]\ntask = "t"\ncron = "0 6 *"\n')
    assert message.startswith("test.toml: schedules[0].cron: expected 5 fields")
    message = config_error('[[schedules]]\ntask = "t"\nevery = "1h"\ntimezone = "Mars/Base"\n')
    assert message.startswith('test.toml: schedules[0].timezone: unknown time zone "Mars/Base"')
    config = loads(
        '[[schedules]]\nname = "n"\ntask = "t"\ncron = "0 0 6 * * mon-fri"\n'
        'timezone = "Europe/Paris"\n'
    )
    assert config.schedules[0].name == "n"


def test_tcp_without_curve_keys_fails() -> None:
    message = config_error('[broker]\nworker_endpoint = "tcp://0.0.0.0:5556"\n')
    assert message == (
        "test.toml: broker.worker_endpoint: tcp endpoints need CURVE keys "
        "(security.server_secret_key to listen, security.server_public_key to connect) "
        "or security.allow_insecure_tcp = true"
    )
    message = config_error('[client]\nendpoint = "tcp://broker:5555"\n')
    assert message.startswith("test.toml: client.endpoint: tcp endpoints need CURVE keys")


def test_tcp_with_insecure_flag_or_keys_passes() -> None:
    tcp = '[broker]\nclient_endpoint = "tcp://*:5555"\nworker_endpoint = "tcp://*:5556"\n'
    insecure = loads(tcp + "[security]\nallow_insecure_tcp = true\n")
    assert insecure.broker.worker_endpoint == "tcp://*:5556"
    keys = (
        '[security]\nserver_secret_key = "s.key_secret"\nserver_public_key = "s.key"\n'
        'authorized_keys_dir = "clients"\nworker_keys_dir = "workers"\n'
    )
    assert loads(tcp + keys).client.endpoint == "tcp://127.0.0.1:5555"


def test_curve_broker_names_whose_keys_it_admits() -> None:
    tcp = '[broker]\nclient_endpoint = "tcp://*:5555"\nworker_endpoint = "tcp://*:5556"\n'
    keys = '[security]\nserver_secret_key = "s.key_secret"\nserver_public_key = "s.key"\n'
    message = config_error(tcp + keys + 'worker_keys_dir = "workers"\n')
    assert message.startswith("test.toml: security.authorized_keys_dir: a CURVE client endpoint")
    assert "allow_any_client_key = true" in message
    message = config_error(tcp + keys + 'authorized_keys_dir = "clients"\n')
    assert message.startswith("test.toml: security.worker_keys_dir: a CURVE worker endpoint")
    message = config_error(tcp + keys + 'authorized_keys_dir = "k"\nworker_keys_dir = "k"\n')
    assert "security.worker_keys_dir: must not be security.authorized_keys_dir" in message
    message = config_error(
        tcp + keys + 'authorized_keys_dir = "c"\nworker_keys_dir = "w"\n'
        "allow_any_client_key = true\n"
    )
    assert "security.allow_any_client_key: cannot be true with" in message
    config = loads(tcp + keys + 'worker_keys_dir = "w"\nallow_any_client_key = true\n')
    assert config.security.allow_any_client_key


def test_payload_and_socket_settings() -> None:
    config = loads('[broker]\nmax_payload = "64KiB"\nsocket_mode = 0o660\nsocket_group = "g"\n')
    assert config.broker.max_payload == 64 * 1024
    assert config.broker.socket_mode == 0o660
    assert loads("").broker.max_payload == 2**20
    assert loads('[broker]\nmax_message_size = "64KiB"\n').broker.max_payload == 64 * 1024
    message = config_error('[broker]\nmax_payload = "32MiB"\n')
    assert message.startswith("test.toml: broker.max_payload: must be at most")
    message = config_error("[broker]\nsocket_mode = 660\n")
    assert "broker.socket_mode: expected a file mode in octal, like 0o660" in message
    message = config_error(
        '[broker]\nmax_payload = "1KiB"\n[[schedules]]\ntask = "t"\nevery = "1m"\n'
        'payload = "' + "x" * 2000 + '"\n'
    )
    assert "schedules[0].payload: is " in message and "over broker.max_payload" in message


def test_derived_tcp_client_needs_public_key() -> None:
    message = config_error(
        '[broker]\nclient_endpoint = "tcp://0.0.0.0:5555"\n'
        '[security]\nserver_secret_key = "s.key_secret"\n'
    )
    assert message.startswith("test.toml: client.endpoint: tcp endpoints need CURVE keys")
    assert "taken from broker.client_endpoint" in message


def test_bad_endpoints() -> None:
    message = config_error('[broker]\nclient_endpoint = "http://x"\n')
    assert message.startswith('test.toml: broker.client_endpoint: expected an endpoint like "ipc')
    message = config_error(f'[broker]\nstate_dir = "{"d" * 120}"\n')
    assert "broker.client_endpoint: ipc socket path is" in message


def test_duplicate_pool_names() -> None:
    message = config_error('[[pools]]\nname = "a"\n[[pools]]\nname = "b"\n[[pools]]\nname = "a"\n')
    assert message.startswith('test.toml: pools[2].name: duplicate pool name "a" (also pools[0])')


def test_queue_weights_must_name_pool_queues() -> None:
    message = config_error('[[pools]]\nname = "a"\nqueue_weights = { other = 2 }\n')
    assert message.startswith('test.toml: pools[0].queue_weights: "other" is not one of')
    config = loads('[[pools]]\nname = "a"\nqueues = ["x", "y"]\nqueue_weights = { x = 3 }\n')
    assert config.pools[0].queue_weights == {"x": 3}


def test_every_problem_reported_on_its_own_line() -> None:
    message = config_error(
        '[[pools]]\nname = "a"\n[[pools]]\nname = "a"\n[[schedules]]\ntask = "t"\n'
    )
    lines = message.splitlines()
    assert len(lines) == 2
    assert all(line.startswith("test.toml: ") for line in lines)


# --- TOML syntax and files --------------------------------------------------


def test_toml_syntax_error_names_line_and_column() -> None:
    message = config_error('[broker]\nfsync = "always"\nstate_dir = \n')
    assert message.startswith("test.toml: line 3, column ")
    assert "invalid TOML" in message


def test_load_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=f"config file {missing} not found"):
        load(missing)


def test_load_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[broker]\nfsync = "sometimes"\n')
    with pytest.raises(ConfigError, match=rf"^{path}: broker\.fsync: expected one of"):
        load(str(path))


# --- derived values ---------------------------------------------------------


def test_derived_endpoints() -> None:
    config = loads('[broker]\nstate_dir = "/tmp/c"\n')
    assert config.broker.client_endpoint == "ipc:///tmp/c/client.sock"
    assert config.broker.worker_endpoint == "ipc:///tmp/c/worker.sock"
    assert config.broker.control_endpoint == "ipc:///tmp/c/control.sock"
    assert config.client.endpoint == "ipc:///tmp/c/client.sock"


def test_explicit_endpoints_kept() -> None:
    config = loads(
        '[broker]\nstate_dir = "/tmp/c"\nclient_endpoint = "ipc:///run/x.sock"\n'
        '[client]\nendpoint = "ipc:///run/y.sock"\n'
    )
    assert config.broker.client_endpoint == "ipc:///run/x.sock"
    assert config.broker.worker_endpoint == "ipc:///tmp/c/worker.sock"
    assert config.client.endpoint == "ipc:///run/y.sock"


def test_structs_round_trip_through_msgspec() -> None:
    config = load(CONFIG_DIR / "worker-host.toml")
    assert msgspec.convert(msgspec.to_builtins(config), Config) == config


def test_the_largest_message_is_bounded_by_the_largest_log_record() -> None:
    from corral.broker.framing import MAX_RECORD
    from corral.config.checks import MAX_LOG_RECORD

    assert MAX_LOG_RECORD == MAX_RECORD


def test_a_message_over_the_largest_log_record_is_refused() -> None:
    text = '[broker]\nsegment_size = "1GiB"\nmax_message_size = "80MiB"\n'
    assert "broker.max_message_size: must be at most 64MiB" in config_error(text)


def test_a_disk_reserve_over_half_a_segment_is_refused() -> None:
    text = '[broker]\nsegment_size = "4MiB"\nmax_message_size = "1MiB"\n'
    assert "broker.disk_reserve: must be at most half" in config_error(text)


@pytest.mark.parametrize("depth", [5_000, 100_000])
def test_a_value_nested_too_deeply_is_named_not_a_recursion_error(depth: int) -> None:
    """tomllib recurses per nesting level: a schedule's payload (any TOML
    value) nested past the stack is an error naming the file, as bad TOML is."""
    nested = "[" * depth + "]" * depth
    message = config_error(f'[[schedules]]\ntask = "t"\nevery = "1m"\npayload = {nested}\n')
    assert message.startswith("test.toml: ") and "nested too deeply" in message
    inline = "{ a = " * depth + "1" + " }" * depth
    message = config_error(f'[[schedules]]\ntask = "t"\nevery = "1m"\npayload = {inline}\n')
    assert "nested too deeply" in message


@pytest.mark.parametrize(
    ("pool", "named"),
    [
        ("concurrency = 200000", "pools[0].concurrency"),
        ("concurrency = 2\nprefetch = 99999", "pools[0].prefetch"),
    ],
)
def test_a_pool_whose_workers_the_broker_would_refuse_is_an_error(pool: str, named: str) -> None:
    """A worker registers with credit concurrency + prefetch, which the
    broker takes up to 100,000: past it every READY was dropped as malformed
    and the pool never ran a job, with check-config's blessing."""
    message = config_error(f'[[pools]]\nname = "a"\n{pool}\n')
    assert message.startswith(f"test.toml: {named}: "), message
    assert "100000" in message.replace(",", ""), message
    loads('[[pools]]\nname = "a"\nconcurrency = 99996\nprefetch = 4\n')  # the most there is


def test_the_configs_credit_bound_is_the_brokers() -> None:
    from corral.broker.protocol import MAX_CREDIT
    from corral.config.schema import MAX_WORKER_CREDIT

    assert MAX_WORKER_CREDIT == MAX_CREDIT


@pytest.mark.parametrize(
    ("entry", "named"),
    [
        (f'task = "{"t" * 201}"\nevery = "1m"', "schedules[0].task"),
        (f'task = "t"\nevery = "1m"\nqueue = "{"q" * 201}"', "schedules[0].queue"),
        ('task = "t"\nevery = "1m"\npriority = 2147483648', "schedules[0].priority"),
    ],
)
def test_a_schedule_whose_job_the_broker_would_refuse_is_an_error(entry: str, named: str) -> None:
    """The broker makes each fire's job as an enqueue is made, and a job it
    refuses (a task or queue name over 200 characters, a priority past 32
    bits) ended the broker at the first fire, and at every start after it."""
    message = config_error(f"[[schedules]]\n{entry}\n")
    assert message.startswith(f"test.toml: {named}: "), message


def test_a_pool_queue_no_job_could_be_in_is_an_error() -> None:
    message = config_error(f'[[pools]]\nname = "a"\nqueues = ["{"q" * 201}"]\n')
    assert message.startswith("test.toml: pools[0].queues[0]: "), message
