"""One pool (circus's Watcher): the worker slots it should fill and the
children that fill them, the workers it is retiring, and its restart limit.

A pool forks through a :class:`Forker` it is given (the supervisor's
:class:`~corral.supervisor.children.Children`), so it never needs to know
how the children are found again by pid or watched.
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING, Protocol

import structlog

from corral.hooks import find_factory
from corral.supervisor.process import Child
from corral.supervisor.restarts import RestartLimit
from corral.supervisor.roles import pool_registry
from corral.workers.registry import Registry

if TYPE_CHECKING:
    from corral.config.schema import Config, PoolConfig

log = structlog.get_logger()


class Forker(Protocol):
    """Forks a worker for slot ``index`` of ``pool`` and keeps track of it."""

    def fork(self, pool: Pool, index: int) -> Child: ...


def load_registry(config: Config, pool: PoolConfig) -> Registry | None:
    """The pool's tasks, imported once here so that workers share them
    copy-on-write; None if the pool imports them in each worker instead.
    Its hooks modules are imported here too (their functions are found,
    and called in each worker after its fork), so that one that cannot load
    stops a start as a plugin does. Raises PluginError, HookError."""
    if not pool.preload:
        return None
    registry = pool_registry(config, pool)
    for spec in [*config.hooks, *pool.hooks]:
        find_factory(spec)
    return registry


class Pool:
    """A pool's desired workers (its slots) against the ones running."""

    def __init__(
        self,
        config: PoolConfig,
        registry: Registry | None,
        fingerprint: str,
        forker: Forker,
    ) -> None:
        self.config = config
        self.registry = registry
        #: A hash of the plugin code, so that a reload can tell it changed.
        self.fingerprint = fingerprint
        self.forker = forker
        self.slots: list[Child | None] = [None] * config.processes
        #: Workers being replaced: their successor runs, they drain and leave.
        self.retiring: list[Child] = []
        self.restarts = RestartLimit(config)

    @property
    def name(self) -> str:
        return self.config.name

    def backing_off(self, now: float) -> bool:
        """Whether it crashed too often and waits before starting workers."""
        return self.restarts.backing_off(now)

    def differs(self, config: PoolConfig, fingerprint: str) -> bool:
        """Whether ``config`` and ``fingerprint`` call for new workers."""
        return self.config != config or self.fingerprint != fingerprint

    def state(self, now: float) -> str:
        """``ok``, ``backing off until <time>``, or ``scaled to 0`` (by
        SIGTTOU, below a configured count)."""
        if not self.slots and self.config.processes:
            return "scaled to 0"
        return self.restarts.state(now)

    def summary(self, now: float) -> str:
        """``name alive/slots``, and its state unless ok."""
        alive = sum(1 for c in self.slots if c is not None and c.alive)
        state = self.state(now)
        return f"{self.name} {alive}/{len(self.slots)}" + ("" if state == "ok" else f" {state}")

    # ------------------------------------------------------------ start

    def fill(self, now: float) -> None:
        """Start a worker in each empty slot that may start now (see
        RestartLimit). A fork that fails counts as a crash of its slot."""
        for index, child in enumerate(self.slots):
            if child is None and self.restarts.may_start(index, now):
                try:
                    self.spawn(index)
                except OSError as exc:
                    log.error("supervisor.fork_failed", pool=self.name, index=index, error=str(exc))
                    self.restarts.crashed(index, now, cause=f"a fork failed: {exc}")

    def spawn(self, index: int) -> None:
        self.slots[index] = self.forker.fork(self, index)

    def holds(self, index: int, child: Child) -> bool:
        """Whether ``child`` still occupies slot ``index`` (slots can shrink)."""
        return index < len(self.slots) and self.slots[index] is child

    # ------------------------------------------------------------- exit

    def retired(self, child: Child) -> bool:
        """If ``child`` was retiring, forget it (it has exited) and say so."""
        if child not in self.retiring:
            return False
        self.retiring.remove(child)
        log.info(
            "supervisor.worker_retired",
            pool=self.name,
            pid=child.pid,
            reason=child.retiring,
            how=child.describe_exit(),
        )
        return True

    def vacate(self, index: int) -> None:
        """Slot ``index`` is empty: its worker exited."""
        self.slots[index] = None

    def crashed(self, index: int, now: float, *, job_caused: bool, cause: str = "") -> None:
        """Slot ``index``'s worker crashed (of ``cause``, in words): the slot
        is filled again after its backoff (at once if the death was charged
        to its jobs)."""
        self.restarts.crashed(index, now, job_caused=job_caused, cause=cause)

    def config_fault(self, index: int, now: float, cause: str) -> None:
        """Slot ``index``'s worker exited on a configuration fault (see
        :meth:`RestartLimit.config_fault`): the pool backs off at once."""
        self.restarts.config_fault(index, now, cause=cause)

    # ---------------------------------------------------------- replace

    def replace(self, index: int, child: Child, reason: str, *, drain: bool) -> None:
        """Start the successor first, so capacity never dips; then the old
        worker finishes its current job and leaves (SIGTERM drains it)."""
        try:
            self.spawn(index)
        except OSError as exc:  # the old one goes on; the limit is judged again later
            log.error("supervisor.fork_failed", pool=self.name, index=index, error=str(exc))
            self.slots[index] = child
            return
        child.retiring = reason
        self.retiring.append(child)
        if drain:
            child.signal(signal.SIGTERM)
        successor = self.slots[index]
        log.info(
            "supervisor.recycle",
            pool=self.name,
            old_pid=child.pid,
            new_pid=successor.pid if successor else None,
            reason=reason,
        )

    def retire_all(self, reason: str) -> None:
        """Empty every slot; their workers drain and leave."""
        for index, child in enumerate(self.slots):
            self.slots[index] = None
            if child is not None and child.alive:
                self._retire(child, reason)

    def scale(self, delta: int) -> None:
        """Add ``delta`` slots, or drain the workers of the last ``-delta``."""
        if delta > 0:
            self.slots.extend([None] * delta)
        for _ in range(min(-delta, len(self.slots))):
            child = self.slots.pop()
            if child is not None and child.alive:
                self._retire(child, "scaled down")
        log.info("supervisor.scaled", pool=self.name, processes=len(self.slots))
        if not self.slots and self.config.processes:
            log.warning(
                "supervisor.scaled_to_zero",
                pool=self.name,
                hint="it runs no job now; SIGTTIN adds a worker, SIGHUP restores "
                f"the configured {self.config.processes}",
            )

    def restore(self) -> None:
        """Back to the configured number of processes (an operator's reload)."""
        if len(self.slots) != self.config.processes:
            self.scale(self.config.processes - len(self.slots))

    def _retire(self, child: Child, reason: str) -> None:
        child.retiring = reason
        self.retiring.append(child)
        child.signal(signal.SIGTERM)
