"""The supervisor: forks the broker (in ``corral run``) and every pool's
workers, reaps them, and restarts what exits, with backoff for a child that
keeps crashing and a restart-intensity limit that marks a pool failed.

Reconcile, don't script: each tick compares the children that should run
with those that do and fixes the difference. Signal handlers only set
flags; the loop does the work.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import structlog

from corral import logs
from corral.supervisor.monitor import judge, read_status
from corral.supervisor.notify import Notifier
from corral.supervisor.process import Child, set_title
from corral.supervisor.reload import forget_modules, plugin_fingerprint
from corral.supervisor.roles import pool_registry, run_broker, run_worker
from corral.workers.registry import Registry
from corral.workers.status import StatusReader

log = structlog.get_logger()

TICK = 0.25
BROKER_CALL_TIMEOUT = 0.5
REPORT_INTERVAL = 1.0
BROKER_HEALTH_WINDOW = 5.0
BROKER_START_TIMEOUT = 120.0


@dataclass
class PoolState:
    """One pool's worker slots and restart history."""

    config: Any
    registry: Registry | None
    slots: list[Child | None] = field(default_factory=list)
    #: Workers being replaced: their successor runs, they drain and leave.
    retiring: list[Child] = field(default_factory=list)
    restarts: deque[float] = field(default_factory=deque)
    backoff: float = 0.0
    next_start: float = 0.0
    failed: bool = False
    total_restarts: int = 0
    fingerprint: str = ""


class Supervisor:
    """Runs ``corral run`` (with the broker) or ``corral supervisor`` (without)."""

    def __init__(self, config: Any, *, with_broker: bool, config_path: str | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self._reload_requested = False
        self._scale_requests = 0
        self.with_broker = with_broker
        self.broker: Child | None = None
        self.pools: list[PoolState] = []
        self._stop_requested = 0
        self._by_pid: dict[int, tuple[PoolState, int, Child]] = {}
        self._readers: dict[int, StatusReader] = {}
        bc = config.broker
        self._liveness = bc.heartbeat_interval * bc.heartbeat_liveness
        self.notifier = Notifier()
        self._client: Any = None
        self._host = socket.gethostname()
        self._id = f"{self._host}/{os.getpid()}"
        self._last_report = 0.0
        self._queued: int | None = None
        self._report_failures = 0
        self._broker_answered = time.monotonic()

    # ---------------------------------------------------------------- run

    def run(self) -> int:
        logs.configure("supervisor", self.config.log.level, self.config.log.format)
        set_title("corral: supervisor")
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        for sig in (
            signal.SIGTERM,
            signal.SIGINT,
            signal.SIGCHLD,
            signal.SIGHUP,
            signal.SIGTTIN,
            signal.SIGTTOU,
        ):
            signal.signal(sig, self._on_signal)
        if self.with_broker and not self._start_broker():
            return 1
        for pool in self.config.pools:
            registry = pool_registry(self.config, pool) if pool.preload else None
            self.pools.append(
                PoolState(
                    pool,
                    registry,
                    [None] * pool.processes,
                    fingerprint=plugin_fingerprint(self.config, pool),
                )
            )
        self._reconcile(time.monotonic())
        self.notifier.ready(self._status_line())
        log.info("supervisor.started", pools=[p.name for p in self.config.pools])
        while not self._stop_requested:
            self._reap()
            if self._reload_requested:
                self._reload_requested = False
                self._reload()
            if self._scale_requests:
                self._scale(self._scale_requests)
                self._scale_requests = 0
            now = time.monotonic()
            self._reconcile(now)
            self._report(now)
            self.notifier.status(self._status_line())
            self.notifier.watchdog(now, self._healthy(now))
            self._wait(wake_r, TICK)
            self._monitor(time.monotonic())
        self.notifier.stopping()
        return self._shutdown(wake_r)

    def _healthy(self, now: float) -> bool:
        """The loop runs (we are here) and, in ``corral run``, our broker's
        loop answered a report recently. A remote broker's outage does not
        make a worker host unhealthy: its workers reconnect on their own."""
        if not self.with_broker:
            return True
        alive = self.broker is not None and self.broker.alive
        return alive and now - self._broker_answered < BROKER_HEALTH_WINDOW

    def _report(self, now: float) -> None:
        """Tell the broker what runs here (for `corral status`); its answer
        is also the sign that the broker loop is healthy."""
        # Each unanswered report blocks this loop for the call's timeout, so
        # while the broker does not answer, ask less often (up to every 8 s).
        interval = REPORT_INTERVAL * 2 ** min(self._report_failures, 3)
        if now - self._last_report < interval:
            return
        self._last_report = now
        from corral.errors import CorralError

        try:
            self._queued = self._broker_client().report_supervisor(self._describe(now))
        except CorralError as exc:
            self._report_failures += 1
            log.debug("supervisor.report_failed", error=str(exc), failures=self._report_failures)
            return
        self._report_failures = 0
        self._broker_answered = now

    def _describe(self, now: float) -> Any:
        from corral.broker.protocol import PoolInfo, ProcessInfo, SupervisorInfo

        pools = [
            PoolInfo(p.config.name, list(p.config.queues), len(p.slots), p.total_restarts, p.failed)
            for p in self.pools
        ]
        workers = [
            ProcessInfo(
                pool.config.name,
                index,
                child.pid or 0,
                child.last_rss,
                list(child.jobs),
                round(now - child.started_at, 3),
                child.retiring,
            )
            for pool, index, child in self._by_pid.values()
            if child.alive
        ]
        return SupervisorInfo(self._id, self._host, os.getpid(), pools, workers)

    def _broker_client(self) -> Any:
        from corral.client import Client

        if self._client is None:
            self._client = Client(config=self.config, timeout=BROKER_CALL_TIMEOUT)
        return self._client

    def _status_line(self) -> str:
        parts = []
        for pool in self.pools:
            alive = sum(1 for c in pool.slots if c is not None and c.alive)
            state = " FAILED" if pool.failed else ""
            parts.append(f"{pool.config.name} {alive}/{len(pool.slots)}{state}")
        line = "workers: " + (", ".join(parts) or "none")
        return line if self._queued is None else f"{line}; queued: {self._queued}"

    def _on_signal(self, signum: int, frame: object) -> None:
        if signum == signal.SIGHUP:
            self._reload_requested = True
        elif signum == signal.SIGTTIN:
            self._scale_requests += 1
        elif signum == signal.SIGTTOU:
            self._scale_requests -= 1
        if signum in (signal.SIGTERM, signal.SIGINT):
            self._stop_requested += 1
            if self._stop_requested > 1 and signum == signal.SIGINT:
                self._kill_all(signal.SIGKILL)
                os._exit(1)

    # ------------------------------------------------------------- broker

    def _start_broker(self) -> bool:
        ready_r, ready_w = os.pipe()
        config = self.config

        def target(_: int | None) -> int:
            os.close(ready_r)
            return run_broker(config, ready_w)

        self.broker = Child("broker", "corral: broker", target)
        self.broker.start()
        os.close(ready_w)
        ready = _wait_readable(ready_r, BROKER_START_TIMEOUT)
        data = os.read(ready_r, 1) if ready else b""
        os.close(ready_r)
        if data != b"1":
            log.error(
                "supervisor.broker_failed_to_start",
                hint="see the broker's error above; nothing else was started",
            )
            self.broker.signal(signal.SIGKILL)
            os.waitpid(self.broker.pid or 0, 0)
            return False
        log.info("supervisor.broker_ready", pid=self.broker.pid)
        return True

    # ---------------------------------------------------------- reconcile

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.broker is not None and pid == self.broker.pid:
                self.broker.reaped(status)
                log.error("supervisor.broker_exited", how=self.broker.describe_exit())
                continue
            entry = self._by_pid.pop(pid, None)
            if entry is None:
                continue
            pool, index, child = entry
            child.reaped(status)
            self._readers.pop(pid, None)
            if child in pool.retiring:
                pool.retiring.remove(child)
                log.info(
                    "supervisor.worker_retired",
                    pool=pool.config.name,
                    pid=pid,
                    reason=child.retiring,
                    how=child.describe_exit(),
                )
                if child.exit_code != 0:
                    self._tell_broker(child)
            elif _holds(pool, index, child):
                self._on_worker_exit(pool, index, child)

    def _on_worker_exit(self, pool: PoolState, index: int, child: Child) -> None:
        now = time.monotonic()
        pool.slots[index] = None
        if self._stop_requested:
            return
        clean = child.exit_code == 0
        log_fn = log.info if clean else log.warning
        log_fn(
            "supervisor.worker_exited",
            pool=pool.config.name,
            index=index,
            pid=child.pid,
            how=child.describe_exit(),
        )
        if not clean:
            self._tell_broker(child)
        if clean or child.killed_for:
            return  # recycled, or killed for a limit: replace at once
        pool.restarts.append(now)
        pool.total_restarts += 1
        window = pool.config.restart_window
        while pool.restarts and pool.restarts[0] < now - window:
            pool.restarts.popleft()
        if len(pool.restarts) > pool.config.max_restarts:
            pool.failed = True
            log.error(
                "supervisor.pool_failed",
                pool=pool.config.name,
                restarts=len(pool.restarts),
                window=window,
                hint="fix the cause, then reload or restart corral",
            )
            return
        # The first crash in the window restarts at once; crashing again
        # backs off exponentially: restart_backoff, x2, x4 ... up to the max.
        crashes = len(pool.restarts)
        pool.backoff = 0.0
        if crashes > 1:
            base, cap = pool.config.restart_backoff, pool.config.restart_backoff_max
            pool.backoff = min(cap, base * 2.0 ** min(crashes - 2, 30))
        pool.next_start = now + pool.backoff
        if pool.backoff:
            log.warning(
                "supervisor.backoff", pool=pool.config.name, crashes=crashes, seconds=pool.backoff
            )

    def _tell_broker(self, child: Child) -> None:
        """Instant redelivery: the broker requeues the dead worker's jobs now
        rather than after the heartbeat window. Best effort: if the broker
        does not answer quickly, the heartbeat path still applies."""
        from corral.errors import CorralError

        try:
            dropped = self._broker_client().worker_exited(
                self._host, child.pid or 0, child.describe_exit()
            )
        except CorralError as exc:
            log.warning("supervisor.broker_not_told", pid=child.pid, error=str(exc))
            return
        log.debug("supervisor.broker_told", pid=child.pid, dropped=dropped)

    def _reconcile(self, now: float) -> None:
        if self.broker is not None and not self.broker.alive:
            self.broker = None
            if not self._start_broker():
                self._stop_requested = 1
                return
        for pool in self.pools:
            if pool.failed or now < pool.next_start:
                continue
            for index, child in enumerate(pool.slots):
                if child is None:
                    self._start_worker(pool, index)

    def _start_worker(self, pool: PoolState, index: int) -> None:
        config, registry, pool_config = self.config, pool.registry, pool.config

        def target(status_fd: int | None) -> int:
            return run_worker(config, pool_config, index, registry, status_fd)

        child = Child(
            f"{pool_config.name}#{index}",
            f"corral: worker {pool_config.name}#{index}",
            target,
            status_pipe=True,
        )
        pid = child.start()
        pool.slots[index] = child
        self._by_pid[pid] = (pool, index, child)
        self._readers[pid] = StatusReader()

    # ------------------------------------------------------- reload, scale

    def _reload(self) -> None:
        """SIGHUP: read the config again and restart, rolling, only the
        pools whose settings or plugin code changed. A bad config changes
        nothing."""
        from corral.config import load
        from corral.errors import ConfigError

        if self.config_path is None:
            log.warning("supervisor.reload_skipped", reason="started without a config file")
            return
        self.notifier.reloading()
        try:
            new = load(self.config_path)
        except ConfigError as exc:
            log.error("supervisor.reload_failed", error=str(exc), hint="the running config stays")
            self.notifier.ready(self._status_line())
            return
        if new.broker != self.config.broker:
            log.warning(
                "supervisor.reload_broker_unchanged",
                hint="broker settings take effect on a restart of corral",
            )
        old = {pool.config.name: pool for pool in self.pools}
        self.config = new
        pools = []
        for pool_config in new.pools:
            current = old.pop(pool_config.name, None)
            fingerprint = plugin_fingerprint(new, pool_config)
            if current is not None and not self._changed(current, pool_config, fingerprint):
                pools.append(current)
                continue
            pools.append(self._roll(current, pool_config, fingerprint))
        for gone in old.values():
            log.info("supervisor.pool_removed", pool=gone.config.name)
            self._retire_all(gone, "pool removed")
        self.pools = pools
        log.info("supervisor.reloaded", pools=[p.config.name for p in pools])
        self.notifier.ready(self._status_line())

    @staticmethod
    def _changed(pool: PoolState, config: Any, fingerprint: str) -> bool:
        return pool.config != config or pool.fingerprint != fingerprint

    def _roll(self, current: PoolState | None, config: Any, fingerprint: str) -> PoolState:
        """A pool with new settings or code: start its new workers, then
        drain the old ones (they finish their jobs, hand back the rest)."""
        plugins = list(config.plugins) + (list(current.config.plugins) if current else [])
        forget_modules(plugins)
        registry = pool_registry(self.config, config) if config.preload else None
        state = PoolState(config, registry, [None] * config.processes, fingerprint=fingerprint)
        for index in range(config.processes):
            self._start_worker(state, index)
        if current is not None:
            log.info("supervisor.pool_restart", pool=config.name, reason="config or code changed")
            self._retire_all(current, "reload")
        else:
            log.info("supervisor.pool_added", pool=config.name)
        return state

    def _retire_all(self, pool: PoolState, reason: str) -> None:
        for index, child in enumerate(pool.slots):
            pool.slots[index] = None
            if child is not None and child.alive:
                child.retiring = reason
                pool.retiring.append(child)
                child.signal(signal.SIGTERM)

    def _scale(self, delta: int) -> None:
        """SIGTTIN adds a worker to each pool, SIGTTOU removes one."""
        for pool in self.pools:
            if delta > 0:
                pool.slots.extend([None] * delta)
            for _ in range(min(-delta, len(pool.slots))):
                child = pool.slots.pop()
                if child is not None and child.alive:
                    child.retiring = "scaled down"
                    pool.retiring.append(child)
                    child.signal(signal.SIGTERM)
            log.info("supervisor.scaled", pool=pool.config.name, processes=len(pool.slots))

    # ------------------------------------------------------------ monitor

    def _wait(self, wake_r: int, timeout: float) -> None:
        """Sleep until a signal or the tick. Status pipes are read on the
        tick, not on every line: a busy pool must not keep us busy too."""
        select.select([wake_r], [], [], timeout)  # retried on EINTR (PEP 475)
        _drain(wake_r)

    def _all_workers(self) -> list[Child]:
        return [c for _, _, c in self._by_pid.values() if c.alive]

    def _monitor(self, now: float) -> None:
        """Read the status pipes and enforce each pool's limits."""
        for pid, (pool, index, child) in list(self._by_pid.items()):
            if not child.alive:
                continue
            retiring = read_status(child, self._readers[pid], now)
            if retiring and not child.retiring and _holds(pool, index, child):
                self._replace(pool, index, child, retiring, drain=False)
                continue
            verdict = judge(child, pool.config, now, self._liveness)
            if verdict is None:
                continue
            if verdict.action == "kill":
                log.warning(
                    "supervisor.kill_worker",
                    pool=pool.config.name,
                    pid=child.pid,
                    reason=verdict.reason,
                )
                child.killed_for = verdict.reason
                child.signal(signal.SIGKILL)
            elif _holds(pool, index, child):
                self._replace(pool, index, child, verdict.reason, drain=True)

    def _replace(
        self, pool: PoolState, index: int, child: Child, reason: str, *, drain: bool
    ) -> None:
        """Start the successor first, so capacity never dips; then the old
        worker finishes its current job and leaves (SIGTERM drains it)."""
        child.retiring = reason
        pool.retiring.append(child)
        self._start_worker(pool, index)
        if drain:
            child.signal(signal.SIGTERM)
        successor = pool.slots[index]
        log.info(
            "supervisor.recycle",
            pool=pool.config.name,
            old_pid=child.pid,
            new_pid=successor.pid if successor else None,
            reason=reason,
        )

    # ----------------------------------------------------------- shutdown

    def _workers(self) -> list[Child]:
        return self._all_workers()

    def _kill_all(self, sig: int) -> None:
        for child in self._workers():
            child.signal(sig)
        if self.broker is not None:
            self.broker.signal(sig)

    def _shutdown(self, wake_r: int) -> int:
        """Drain: workers finish their jobs (up to shutdown_timeout), then
        the broker stops with its log synced."""
        log.info("supervisor.stopping", workers=len(self._workers()))
        timeout = max((p.config.shutdown_timeout for p in self.pools), default=0.0) + 5.0
        self._stop_children(self._workers(), timeout, wake_r)
        if self.broker is not None and self.broker.alive:
            self._stop_children([self.broker], 30.0, wake_r)
        log.info("supervisor.stopped")
        return 0

    def _stop_children(self, children: list[Child], timeout: float, wake_r: int) -> None:
        for child in children:
            child.signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while any(c.alive for c in children) and time.monotonic() < deadline:
            self._reap_quietly(children)
            select.select([wake_r], [], [], 0.1)
            _drain(wake_r)
        for child in children:
            if child.alive:
                log.warning("supervisor.kill", child=child.name, pid=child.pid)
                child.signal(signal.SIGKILL)
        self._reap_quietly(children, block=True)

    def _reap_quietly(self, children: list[Child], block: bool = False) -> None:
        for child in children:
            if not child.alive or child.pid is None:
                continue
            try:
                pid, status = os.waitpid(child.pid, 0 if block else os.WNOHANG)
            except ChildProcessError:
                child.exit_code = -1
                continue
            if pid:
                child.reaped(status)


def _holds(pool: PoolState, index: int, child: Child) -> bool:
    """Whether ``child`` still occupies slot ``index`` (slots can shrink)."""
    return index < len(pool.slots) and pool.slots[index] is child


def _wait_readable(fd: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            readable, _, _ = select.select([fd], [], [], left)
        except InterruptedError:
            continue
        return bool(readable)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except (BlockingIOError, InterruptedError):
        pass
