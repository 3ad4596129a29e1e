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

import contextlib
import os
import signal
import time
from typing import TYPE_CHECKING

import structlog

from corral import logs
from corral.supervisor.broker_child import BrokerChild
from corral.supervisor.children import Children, Entry
from corral.supervisor.control import Control
from corral.supervisor.dashboard_child import DashboardChild
from corral.supervisor.monitor import read_status
from corral.supervisor.notify import Notifier
from corral.supervisor.pool import Pool, load_registry
from corral.supervisor.process import Child, signal_name, stop_children
from corral.supervisor.reload import (
    Preparation,
    ReloadCheck,
    ReloadError,
    apply_plan,
    plugin_fingerprint,
)
from corral.supervisor.reloadable import split_reload
from corral.supervisor.report import BrokerLink
from corral.supervisor.title import set_title
from corral.workers.status import EXIT_REFUSED, farewell_wait

if TYPE_CHECKING:
    from corral.config.schema import Config

log = structlog.get_logger()

TICK = 0.25
BROKER_HEALTH_WINDOW = 5.0
#: While the broker first starts, systemd is asked for more time this often
#: (seconds), twice this much each time.
EXTEND_EVERY = 10.0


def crash_cause(child: Child) -> str:
    """What a crashed worker died of, in words: why it could not start, as
    it said, or how it ended."""
    if child.cannot_start:
        return child.cannot_start
    cause = f"a worker {child.describe_exit()}"
    if child.killed_for:
        return f"{cause}: {child.killed_for}"
    return cause if child.ready else f"{cause} before it started"


def _clock() -> str:
    """The local wall-clock time, for what an operator reads."""
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


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
        #: The dashboard as a child, when [dashboard] listen is set (bound in run()).
        self.dashboard: DashboardChild | None = None
        self.pools: list[Pool] = []
        bc = config.broker
        liveness = bc.heartbeat_interval * bc.heartbeat_liveness
        self.children = Children(config, liveness, before_fork=self.link.close)
        self.control = Control(self._kill_all)
        self.notifier = Notifier()
        #: The check of a reload under way, if any.
        self._check: ReloadCheck | None = None
        #: A SIGHUP came while a reload was checked or prepared: start over
        #: once that step ends.
        self._recheck = False
        #: A reload whose pools' plugins are being imported, off the loop.
        self._preparing: Preparation | None = None
        #: The keys that reload changed and only a restart applies.
        self._restart_keys: list[str] = []
        #: Whether READY=1 went out (once the broker first came up).
        self._announced = False
        self._extended = -EXTEND_EVERY
        self._exit_code = 0

    # ---------------------------------------------------------------- run

    def run(self) -> int:
        """Run until stopped; returns the exit code (2, as for any config
        problem, when the broker of ``corral run`` refused its config).
        Raises ConfigError (before anything starts) for a key file it
        cannot use (its workers', or the client key its reports use), or a
        ``dashboard.listen`` address it cannot bind."""
        from corral.transport import check_client_keys, check_worker_keys

        check_client_keys(self.config)
        if self.config.pools:
            check_worker_keys(self.config)
        if self.with_broker and self.config.dashboard.listen:
            self.dashboard = DashboardChild.open(self.config, self.link.close)
        logs.configure("supervisor", self.config.log.level, self.config.log.format)
        set_title("corral: supervisor")
        self.control.install()
        if self.broker is not None:
            self.broker.start(self.config, time.monotonic())
        for pool in self.config.pools:
            registry = load_registry(self.config, pool)
            fingerprint = plugin_fingerprint(self.config, pool)
            self.pools.append(Pool(pool, registry, fingerprint, self.children))
        self._reconcile(time.monotonic())
        while not self.control.stopping:
            self._tick()
        self.notifier.stopping()
        code = self._shutdown()
        return self._exit_code or code

    def _tick(self) -> None:
        """One pass; an error in it is logged and the loop goes on: the
        supervisor never takes the service down for its own fault."""
        try:
            self._pass()
        except Exception:
            log.exception("supervisor.tick_failed", hint="the supervisor goes on; please report")
            self.control.wait(TICK)

    def _pass(self) -> None:
        """Reap, act on requests, reconcile, report, sleep, watch."""
        self._reap()
        while self.control.stray:
            log.warning(
                "supervisor.signal_ignored",
                signal=signal_name(self.control.stray.pop(0)),
                hint="TERM/INT stop, HUP reloads, TTIN/TTOU scale; others are ignored",
            )
        if self.control.take_reload():
            self._reload()
        self._finish_reload(time.monotonic())
        self._apply_prepared()
        delta = self.control.take_scale()
        if delta:
            for pool in self.pools:
                pool.scale(delta)
        now = time.monotonic()
        self._reconcile(now)
        if self.dashboard is not None:
            self.dashboard.poll(now, may_fork=self._preparing is None)
        self.link.report(now, self.pools, self.children)
        self.notifier.status(self._status_line())
        self.notifier.watchdog(now, self._healthy(now))
        # Status pipes are read on the tick, not on every line: a busy pool
        # must not keep the supervisor busy too. A watchdog shorter than two
        # ticks shortens the tick: it is petted at half its interval.
        tick = TICK
        if self.notifier.watchdog_interval is not None:
            tick = min(tick, self.notifier.watchdog_interval / 2)
        self.control.wait(tick, self.broker.fds() if self.broker is not None else ())
        self.children.watch(time.monotonic())

    def _healthy(self, now: float) -> bool:
        """The loop runs (we are here) and, in ``corral run``, our broker's
        loop answered a report recently, or it is being started (a long
        replay, or a restart after its backoff: this loop sees to it). A
        remote broker's outage does not make a worker host unhealthy: its
        workers reconnect on their own."""
        if self.broker is None or not self.broker.up:
            return True
        return now - self.link.answered < BROKER_HEALTH_WINDOW

    def _status_line(self) -> str:
        now = time.monotonic()
        line = "workers: " + (", ".join(pool.summary(now) for pool in self.pools) or "none")
        queued = self.link.queued
        return line if queued is None else f"{line}; queued: {queued}"

    # ---------------------------------------------------------- reconcile

    def _reconcile(self, now: float) -> None:
        """Fill the pools' empty slots; in ``corral run``, once the broker
        has been up (its first start decides whether corral runs at all).
        READY=1 goes to systemd then; until then EXTEND_TIMEOUT_USEC."""
        forks = self._preparing is None  # none while a reload imports on a thread
        self.children.may_fork = forks
        if self.broker is not None:
            event = self.broker.poll(self.config, now, may_fork=forks)
            if event == "failed":
                self._exit_code = self.broker.start_failure()
                self.control.request_stop()
                return
            if event == "up":
                self.link.answered = now
            if not self.broker.was_up:
                if now - self._extended >= EXTEND_EVERY:
                    self._extended = now
                    self.notifier.extend(EXTEND_EVERY * 2)
                return
        if not forks:
            return
        for pool in self.pools:
            pool.fill(now)
        if not self._announced:
            self._announced = True
            self.notifier.ready(self._status_line())
            log.info("supervisor.started", pools=[p.name for p in self.config.pools])

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self._check is not None and pid == self._check.pid:
                self._check.reaped(status)
                continue
            if self.broker is not None and self.broker.owns(pid):
                self.broker.reaped(status)
                continue
            if self.dashboard is not None and self.dashboard.owns(pid):
                self.dashboard.reaped(status, time.monotonic())
                continue
            entry = self.children.pop(pid)
            if entry is not None:
                # its last words first: the jobs it had started when it died
                read_status(entry.child, entry.reader, time.monotonic())
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
        why = {"error": child.cannot_start} if child.cannot_start else {}
        log_fn = log.info if clean else log.error if why else log.warning
        log_fn(
            "supervisor.worker_exited",
            pool=pool.name,
            index=index,
            pid=child.pid,
            how=child.describe_exit(),
            **why,
        )
        if clean:
            return
        # A process that died running jobs is charged to them (each counts
        # an attempt), not to the pool: a poison job ends failed, the pool
        # stays up. A kill for a job's hard timeout charges that job only.
        job_caused = bool(child.jobs) or child.charged is not None
        if not child.killed_for and child.jobs:
            child.charged = sorted(child.jobs)
        self.link.worker_exited(child)
        if child.exit_code == EXIT_REFUSED and child.cannot_start:
            # the broker refused its READY: every restart would be refused too
            pool.config_fault(index, now, crash_cause(child))
            return
        pool.crashed(index, now, job_caused=job_caused, cause=crash_cause(child))

    # ------------------------------------------------------------- reload

    def _reload(self) -> None:
        """SIGHUP: check the config file and its plugins in a fresh
        interpreter (:class:`ReloadCheck`); :meth:`_finish_reload` applies
        it once the check passed. Pools that gave up restarting try again
        at once. The broker of ``corral run`` gets the SIGHUP too: it
        re-reads its key directories."""
        if self.broker is not None and self.broker.up:
            self.broker.signal(signal.SIGHUP)
        if self.config_path is None:
            log.warning("supervisor.reload_skipped", reason="started without a config file")
            return
        for pool in self.pools:  # what signals changed goes back to the config
            pool.restarts.reset()
            pool.restore()
        if self._check is not None or self._preparing is not None:  # files may have changed
            self._recheck = True
            log.info("supervisor.reload_again", hint="the check under way is redone when it ends")
            return
        self.notifier.reloading()
        try:
            self._check = ReloadCheck(self.config_path)
        except OSError as exc:
            self._reload_failed(f"the config check could not start: {exc}")
            return
        log.info("supervisor.reload_checking", pid=self._check.pid)

    def _finish_reload(self, now: float) -> None:
        """Apply a reload whose check has ended: restart, rolling, only the
        pools whose settings or plugin code changed. A check or a load that
        fails changes nothing; the error is logged and shown by `corral
        status`."""
        from corral.config import load
        from corral.errors import ConfigError

        check = self._check
        if check is None or (check.code is None and not check.overdue(now)):
            return
        if check.code is None:
            return  # killed for its deadline: reaped on a later tick
        self._check = None
        error = check.error()
        check.close()
        if self._redo_if_asked():
            return
        if error:
            self._reload_failed(error)
            return
        assert self.config_path is not None
        try:
            new = load(self.config_path)
        except ConfigError as exc:
            self._reload_failed(str(exc))
            return
        # what only a restart applies keeps its running value (see reloadable)
        new, self._restart_keys = split_reload(self.config, new)
        self._preparing = Preparation(self.pools, new, self.children)
        log.info("supervisor.reload_importing", hint="the pools' plugins load off the loop")

    def _apply_prepared(self) -> None:
        """Roll the pools once a reload's plan is ready (its imports done)."""
        prepared = self._preparing
        if prepared is None:
            return
        if not prepared.done:
            if prepared.overdue(time.monotonic()):
                self._preparing = None  # its thread is left to end on its own
                self._reload_failed(
                    f"importing the pools' plugins took over {prepared.timeout:g}s; "
                    "the reload was given up and nothing changed"
                )
            return
        self._preparing = None
        if self._redo_if_asked():
            return
        if prepared.plan is None:
            self._reload_failed(prepared.error)
            return
        new = prepared.config
        old = self.config
        self.config = self.children.config = self.link.config = new  # the forks use it
        try:
            pools = apply_plan(self.pools, prepared.plan)
        except ReloadError as exc:
            if exc.pools is not None:  # partly applied: the new config runs
                self.pools = exc.pools
            else:
                self.config = self.children.config = self.link.config = old
            self._reload_failed(str(exc))
            return
        self.pools = pools
        self.link.reload = f"ok at {_clock()}"
        if self._restart_keys:
            log.warning(
                "supervisor.reload_needs_restart",
                keys=self._restart_keys,
                hint="these keys are read only at the start: the running values stay "
                "(a broker restarted after a crash keeps them too); restart corral to "
                "apply them (systemctl restart corral)",
            )
            self.link.reload += "; restart to apply: " + ", ".join(self._restart_keys)
        log.info("supervisor.reloaded", pools=[p.name for p in self.pools])
        self.notifier.ready(self._status_line())

    def _redo_if_asked(self) -> bool:
        """A SIGHUP came while this reload was under way: drop what it found
        and start over on the files as they are now. Whether it did."""
        if not self._recheck:
            return False
        self._recheck = False
        self._reload()
        return True

    def _reload_failed(self, error: str) -> None:
        log.error("supervisor.reload_failed", error=error, hint="the running config stays")
        self.link.reload = f"failed at {_clock()}: {error}"
        self.notifier.ready(self._status_line())

    # ----------------------------------------------------------- shutdown

    def _kill_all(self, sig: int) -> None:
        for child in self.children.alive():
            child.signal(sig)
        if self.broker is not None:
            self.broker.signal(sig)

    def _shutdown(self) -> int:
        """Drain: workers finish their jobs (up to shutdown_timeout) and
        wait for their Farewells (see :func:`farewell_wait`), then the
        broker stops with its log synced."""
        if self._check is not None:  # a reload's check is not needed any more
            self._check.stop()
        if self.dashboard is not None:
            self.dashboard.stop(self.control.wait)
        workers = self.children.alive()
        log.info("supervisor.stopping", workers=len(workers))
        # a worker drains (shutdown_timeout), then waits for its Farewell
        bc = self.config.broker
        farewell = farewell_wait(bc.heartbeat_interval, bc.heartbeat_liveness)
        drain = max((p.config.shutdown_timeout for p in self.pools), default=0.0)
        timeout = drain + farewell + 5.0
        stop_children(workers, timeout, self._stopping_pause)
        broker: Child | None = self.broker.child if self.broker is not None else None
        if broker is not None and broker.alive:
            stop_children([broker], 30.0, self.control.wait)
        log.info("supervisor.stopped")
        return 0

    def _stopping_pause(self, seconds: float) -> None:
        """The wait while the workers leave (``seconds``): in ``corral run``,
        a broker that dies meanwhile is started again (after its backoff),
        so that the leaving workers' last outcomes reach a broker and their
        Farewells come; with none, they were lost with the broker killed as
        the stop began, and their jobs ran again, their runs unrecorded."""
        self.control.wait(seconds, self.broker.fds() if self.broker is not None else ())
        if self.broker is None:
            return
        child = self.broker.child
        if child is not None and child.alive and child.pid is not None:
            with contextlib.suppress(ChildProcessError):
                pid, status = os.waitpid(child.pid, os.WNOHANG)
                if pid:
                    self.broker.reaped(status)
        self.broker.poll(self.config, time.monotonic())
