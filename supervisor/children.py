"""Every worker process the supervisor forked and has not reaped yet, found
by pid: its pool and slot, and the reader of its status pipe.

A worker stays here until it is reaped, even once its pool has been
replaced or removed by a reload, so that a draining worker is still
watched and its exit still reaches the pool it belonged to.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from corral.supervisor.monitor import judge, read_status
from corral.supervisor.pool import Pool
from corral.supervisor.process import Child
from corral.supervisor.roles import run_worker
from corral.workers import runtime  # noqa: F401  (loaded once here: forked workers inherit it)
from corral.workers.status import StatusReader

if TYPE_CHECKING:
    from corral.config.schema import Config

log = structlog.get_logger()


@dataclass
class Entry:
    """A forked worker and where it belongs."""

    pool: Pool
    index: int
    child: Child
    reader: StatusReader = field(default_factory=StatusReader)


class Children:
    """The supervisor's worker processes: forks them (a :class:`Forker` for
    the pools), finds them by pid, and watches their status and limits.
    ``before_fork`` is called before each fork (to close what must not be
    inherited, such as a zmq context)."""

    def __init__(
        self,
        config: Config,
        liveness: float,
        before_fork: Callable[[], None] = lambda: None,
    ) -> None:
        #: The settings workers are forked with; a reload replaces them.
        self.config = config
        #: How long a worker may go without a sign of life.
        self.liveness = liveness
        self.before_fork = before_fork
        #: False while forks must wait (a reload imports plugins on a
        #: thread): a recycle is then judged again on a later tick.
        self.may_fork = True
        self._by_pid: dict[int, Entry] = {}

    def fork(self, pool: Pool, index: int) -> Child:
        config, registry, pool_config = self.config, pool.registry, pool.config

        def target(status_fd: int | None) -> int:
            return run_worker(config, pool_config, index, registry, status_fd)

        child = Child(
            f"{pool_config.name}#{index}",
            f"corral: worker {pool_config.name}#{index}",
            target,
            status_pipe=True,
        )
        self.before_fork()
        pid = child.start()
        self._by_pid[pid] = Entry(pool, index, child)
        return child

    def pop(self, pid: int) -> Entry | None:
        """Forget the worker ``pid`` (it was reaped); None if not ours."""
        return self._by_pid.pop(pid, None)

    def running(self) -> list[Entry]:
        return [entry for entry in self._by_pid.values() if entry.child.alive]

    def alive(self) -> list[Child]:
        return [entry.child for entry in self.running()]

    def watch(self, now: float) -> None:
        """Read the status pipes and enforce each pool's limits."""
        for entry in list(self._by_pid.values()):
            pool, index, child = entry.pool, entry.index, entry.child
            if not child.alive or child.killed_for:  # killed: it is reaped soon
                continue
            retiring = read_status(child, entry.reader, now)
            if retiring and not child.retiring and pool.holds(index, child):
                if self.may_fork:  # else it leaves on its own; its slot refills later
                    pool.replace(index, child, retiring, drain=False)
                continue
            verdict = judge(child, pool.config, now, self.liveness)
            if verdict is None:
                continue
            if verdict.action == "kill":
                if verdict.hook:
                    log.error(
                        "hook.timeout",
                        hook=verdict.hook,
                        job_id=verdict.hook_job,
                        pool=pool.name,
                        pid=child.pid,
                        timeout=verdict.hook_timeout,
                        hint="the worker is killed and replaced, its jobs not started go "
                        "back uncounted; give the hook's network calls a timeout",
                    )
                log.warning(
                    "supervisor.kill_worker",
                    pool=pool.name,
                    pid=child.pid,
                    reason=verdict.reason,
                )
                child.killed_for = verdict.reason
                child.charged = verdict.charged()
                child.signal(signal.SIGKILL)  # its process group: a task's subprocesses too
            elif pool.holds(index, child) and self.may_fork:
                pool.replace(index, child, verdict.reason, drain=True)
