"""The supervisor (circus's arbiter): forks the broker (in ``corral run``)
and every pool's workers, reaps them, and restarts what exits.

Reconcile, don't script: each tick compares the children that should run
with those that do and fixes the difference. The parts each own one thing:

- :class:`~corral.supervisor.pool.Pool`: one pool's slots and workers,
  spawn, replace, retire, scale, and its
  :class:`~corral.supervisor.restarts.RestartLimit` (backoff, flapping);
- :class:`~corral.supervisor.children.Children`: every forked worker by
  pid, its status pipe and its limits;
- :class:`~corral.supervisor.broker_child.BrokerChild`: the broker of
  ``corral run``;
- :class:`~corral.supervisor.report.BrokerLink`: reports and
  ``WorkerExited`` to the broker;
- :class:`~corral.supervisor.control.Control`: signals as requests (stop,
  reload, scale) and the wake-up pipe;
- :func:`~corral.supervisor.reload.reload_pools`: which pools a reload
  keeps, rolls or drains;
- :class:`~corral.supervisor.notify.Notifier`: systemd's sd_notify.

:class:`Supervisor` composes them and runs the loop.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import structlog

from corral import logs
from corral.supervisor.broker_child import BrokerChild
from corral.supervisor.children import Children, Entry
from corral.supervisor.control import Control
from corral.supervisor.notify import Notifier
from corral.supervisor.pool import Pool, load_registry
from corral.supervisor.process import Child, set_title, stop_children
from corral.supervisor.reload import plugin_fingerprint, reload_pools
from corral.supervisor.report import BrokerLink

if TYPE_CHECKING:
    from corral.config.schema import Config

log = structlog.get_logger()

TICK = 0.25
BROKER_HEALTH_WINDOW = 5.0


class Supervisor:
    """Runs ``corral run`` (with the broker) or ``corral supervisor`` (without)."""

    def __init__(
        self, config: Config, *, with_broker: bool, config_path: str | None = None
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.with_broker = with_broker
        self.link = BrokerLink(config)  # closed before each fork: no zmq threads in a child
        self.broker = BrokerChild(self.link.close) if with_broker else None
        self.pools: list[Pool] = []
        bc = config.broker
        liveness = bc.heartbeat_interval * bc.heartbeat_liveness
        self.children = Children(config, liveness, before_fork=self.link.close)
        self.control = Control(self._kill_all)
        self.notifier = Notifier()

    # ---------------------------------------------------------------- run

    def run(self) -> int:
        logs.configure("supervisor", self.config.log.level, self.config.log.format)
        set_title("corral: supervisor")
        self.control.install()
        if self.broker is not None and not self.broker.start(self.config):
            return 1
        for pool in self.config.pools:
            registry = load_registry(self.config, pool)
            fingerprint = plugin_fingerprint(self.config, pool)
            self.pools.append(Pool(pool, registry, fingerprint, self.children))
        self._reconcile(time.monotonic())
        self.notifier.ready(self._status_line())
        log.info("supervisor.started", pools=[p.name for p in self.config.pools])
        while not self.control.stopping:
            self._tick()
        self.notifier.stopping()
        return self._shutdown()

    def _tick(self) -> None:
        """One pass: reap, act on requests, reconcile, report, sleep, watch."""
        self._reap()
        if self.control.take_reload():
            self._reload()
        delta = self.control.take_scale()
        if delta:
            for pool in self.pools:
                pool.scale(delta)
        now = time.monotonic()
        self._reconcile(now)
        self.link.report(now, self.pools, self.children)
        self.notifier.status(self._status_line())
        self.notifier.watchdog(now, self._healthy(now))
        # Status pipes are read on the tick, not on every line: a busy pool
        # must not keep the supervisor busy too.
        self.control.wait(TICK)
        self.children.watch(time.monotonic())

    def _healthy(self, now: float) -> bool:
        """The loop runs (we are here) and, in ``corral run``, our broker's
        loop answered a report recently. A remote broker's outage does not
        make a worker host unhealthy: its workers reconnect on their own."""
        if self.broker is None:
            return True
        return self.broker.alive and now - self.link.answered < BROKER_HEALTH_WINDOW

    def _status_line(self) -> str:
        line = "workers: " + (", ".join(pool.summary() for pool in self.pools) or "none")
        queued = self.link.queued
        return line if queued is None else f"{line}; queued: {queued}"

    # ---------------------------------------------------------- reconcile

    def _reconcile(self, now: float) -> None:
        if self.broker is not None and not self.broker.restart_if_gone(self.config):
            self.control.request_stop()
            return
        for pool in self.pools:
            pool.fill(now)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.broker is not None and self.broker.owns(pid):
                self.broker.reaped(status)
                continue
            entry = self.children.pop(pid)
            if entry is not None:
                entry.child.reaped(status)
                self._worker_reaped(entry)

    def _worker_reaped(self, entry: Entry) -> None:
        pool, index, child = entry.pool, entry.index, entry.child
        if pool.retired(child):
            if child.exit_code != 0:
                self.link.worker_exited(child)
            return
        if not pool.holds(index, child):
            return
        now = time.monotonic()
        pool.vacate(index)
        if self.control.stopping:
            return
        clean = child.exit_code == 0
        log_fn = log.info if clean else log.warning
        log_fn(
            "supervisor.worker_exited",
            pool=pool.name,
            index=index,
            pid=child.pid,
            how=child.describe_exit(),
        )
        if clean:
            return
        self.link.worker_exited(child)
        if not child.killed_for:  # else killed for a limit: replace at once
            pool.crashed(now)

    # ------------------------------------------------------------- reload

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
        self.config = self.children.config = self.link.config = new
        self.pools = reload_pools(self.pools, new, self.children)
        log.info("supervisor.reloaded", pools=[p.name for p in self.pools])
        self.notifier.ready(self._status_line())

    # ----------------------------------------------------------- shutdown

    def _kill_all(self, sig: int) -> None:
        for child in self.children.alive():
            child.signal(sig)
        if self.broker is not None:
            self.broker.signal(sig)

    def _shutdown(self) -> int:
        """Drain: workers finish their jobs (up to shutdown_timeout), then
        the broker stops with its log synced."""
        workers = self.children.alive()
        log.info("supervisor.stopping", workers=len(workers))
        timeout = max((p.config.shutdown_timeout for p in self.pools), default=0.0) + 5.0
        stop_children(workers, timeout, self.control.wait)
        broker: Child | None = self.broker.child if self.broker is not None else None
        if broker is not None and broker.alive:
            stop_children([broker], 30.0, self.control.wait)
        log.info("supervisor.stopped")
        return 0
