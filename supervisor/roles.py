"""What each kind of process runs: the broker and a pool's worker. Used in a
forked child by the supervisor and in the foreground by the CLI."""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING, Any

import structlog

from corral import logs

if TYPE_CHECKING:
    from corral.workers.registry import Registry
    from corral.workers.runtime import WorkerOptions

log = structlog.get_logger()


def run_broker(config: Any, ready_fd: int | None = None, *, first_start: bool = True) -> int:
    """Run the broker until SIGTERM/SIGINT. Writes one byte to ``ready_fd``
    once the log is replayed and the endpoints (and ``[metrics] listen``)
    are bound. Returns 2 (logged as ``broker.cannot_start``) when it cannot
    start: at its ``first_start`` that includes a metrics address it
    cannot bind; a broker started again by its supervisor serves on without
    metrics instead (``metrics.cannot_listen``): past the start, metrics
    never take the queue down."""
    from corral.broker.log import LogError
    from corral.broker.schedules import ScheduleError
    from corral.broker.server import Broker
    from corral.errors import CorralError

    logs.configure("broker", config.log.level, config.log.format)
    os.umask(0o077)  # its log, lock and sockets are the owner's (see corral.broker.access)
    try:
        broker = Broker(config)
        broker.open()
    except (LogError, CorralError, ScheduleError) as exc:
        log.error("broker.cannot_start", error=str(exc))
        return 2
    try:
        server = _serve_metrics(broker.core.metrics, config.metrics.listen, first_start)
    except CorralError as exc:
        log.error("broker.cannot_start", error=str(exc))
        broker.close()  # its lock and socket files go, as for any start that fails
        return 2
    broker.install_signal_handlers()
    if ready_fd is not None:
        os.write(ready_fd, b"1")
        os.close(ready_fd)
    try:
        broker.run()
    finally:
        if server is not None:
            server.shutdown()
    return 0


def _serve_metrics(metrics: Any, listen: str | None, required: bool) -> Any:
    """Serve the broker's Prometheus metrics on ``listen``. An address that
    cannot be bound raises ConfigError naming ``metrics.listen`` and the fix
    when ``required``; else it is logged (``metrics.cannot_listen``) and the
    broker goes on without metrics."""
    if metrics is None or listen is None:
        return None
    from corral.broker.metrics import serve
    from corral.errors import ConfigError

    try:
        server = serve(metrics, listen)
    except OSError as exc:
        error = listen_error("metrics.listen", listen, exc)
        if required:
            raise ConfigError(error) from None
        log.error("metrics.cannot_listen", listen=listen, error=error)
        return None
    log.info("metrics.listening", listen=listen)
    return server


def listen_error(setting: str, listen: str, exc: OSError) -> str:
    """What to say of an HTTP address (``HOST:PORT``) that cannot be bound."""
    reason = (exc.strerror or str(exc)).split(" (while attempting")[0]
    return (
        f"{setting}: cannot listen on {listen}: {reason}; use an address of this host "
        "(127.0.0.1 for this host only) and a port no other process listens on, or leave "
        f"{setting} unset"
    )


def pool_registry(config: Any, pool: Any) -> Registry:
    from corral.workers.registry import add_python_path, load_plugins

    add_python_path(config.python_path)
    return load_plugins(pool.plugins)


def worker_options(
    config: Any, pool: Any, index: int, status_fd: int | None = None
) -> WorkerOptions:
    from corral.workers.runtime import WorkerOptions

    return WorkerOptions(
        endpoint=config.broker.worker_endpoint,
        queues=list(pool.queues),
        concurrency=pool.concurrency,
        concurrency_mode=pool.concurrency_mode,
        queue_weights=dict(pool.queue_weights),
        prefetch=pool.prefetch,
        heartbeat_interval=config.broker.heartbeat_interval,
        heartbeat_liveness=config.broker.heartbeat_liveness,
        shutdown_timeout=pool.shutdown_timeout,
        max_jobs=pool.max_jobs_per_process,
        max_message_size=config.broker.max_message_size,
        name=f"{socket.gethostname()}/{pool.name}#{index}/{os.getpid()}",
        status_fd=status_fd,
        hook_timeout=pool.hook_timeout,
    )


def run_worker(
    config: Any,
    pool: Any,
    index: int,
    registry: Registry | None = None,
    status_fd: int | None = None,
) -> int:
    """Run one worker of ``pool`` until it is told to stop or recycles.
    Returns 2 when it cannot start: its plugins (not preloaded) or its
    hooks cannot be loaded, or a key file cannot be used. It logs why
    (``worker.cannot_start``) and tells its supervisor on the status pipe,
    which backs the pool off as for any crash, naming the error."""
    from corral.errors import CorralError
    from corral.workers.runtime import Worker
    from corral.workers.status import StatusWriter

    logs.configure("worker", config.log.level, config.log.format, config.log.jobs)
    structlog.contextvars.bind_contextvars(pool=pool.name, index=index)
    try:
        registry, hooks = _load_worker(config, pool, registry)
    except CorralError as exc:
        log.error("worker.cannot_start", error=str(exc))
        StatusWriter(status_fd).cannot_start(str(exc))
        return 2
    options = worker_options(config, pool, index, status_fd)
    worker = Worker(options, registry, config, hooks=hooks)
    worker.install_signal_handlers()
    log.info(
        "worker.started",
        queues=list(pool.queues),
        tasks=registry.names(),
        concurrency=pool.concurrency,
    )
    return worker.run()


def _load_worker(config: Any, pool: Any, registry: Registry | None) -> tuple[Registry, list[Any]]:
    """A worker's tasks (imported here unless preloaded) and hooks (made
    here, after the fork: a hook may start threads and open connections).
    Raises ConfigError (a key file), PluginError, HookError."""
    from corral.hooks import load_hooks
    from corral.transport import check_worker_keys
    from corral.workers.registry import add_python_path

    check_worker_keys(config)
    if registry is None:
        registry = pool_registry(config, pool)
    add_python_path(config.python_path)
    return registry, load_hooks([*config.hooks, *pool.hooks])
