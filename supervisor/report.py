"""What the supervisor tells the broker: every second, its pools and
processes (shown by ``corral status``; the answer is also the sign that the
broker's loop is healthy), and each worker that died (``WorkerExited``), so
that the broker hands its jobs out again at once. Best effort: a broker
that does not answer costs a short timeout, never the supervisor's loop.
"""

from __future__ import annotations

import os
import socket
import time
from typing import TYPE_CHECKING, Any

import structlog

from corral.broker.protocol import PoolInfo, ProcessInfo, SupervisorInfo
from corral.errors import CorralError
from corral.supervisor.children import Children
from corral.supervisor.monitor import cpu_seconds, vouched
from corral.supervisor.pool import Pool
from corral.supervisor.process import Child

if TYPE_CHECKING:
    import zmq

    from corral.client import Client
    from corral.config.schema import Config

log = structlog.get_logger()

BROKER_CALL_TIMEOUT = 0.5
REPORT_INTERVAL = 1.0


class BrokerLink:
    """The supervisor's client of the broker, and what it last heard."""

    def __init__(self, config: Config) -> None:
        #: The settings the client is made with (on first use).
        self.config = config
        self.host = socket.gethostname()
        self.supervisor_id = f"{self.host}/{os.getpid()}"
        #: Jobs queued, as the broker last answered a report.
        self.queued: int | None = None
        #: When the broker last answered a report.
        self.answered = time.monotonic()
        #: How the last reload went ("" if there was none), for `corral status`.
        self.reload = ""
        self._client: Client | None = None
        self._context: zmq.Context[Any] | None = None
        self._last_report = 0.0
        self._failures = 0

    def report(self, now: float, pools: list[Pool], children: Children) -> None:
        """Tell the broker what runs here, if a report is due."""
        # Each unanswered report blocks the loop for the call's timeout, so
        # while the broker does not answer, ask less often (up to every 8 s).
        interval = REPORT_INTERVAL * 2 ** min(self._failures, 3)
        if now - self._last_report < interval:
            return
        self._last_report = now
        try:
            self.queued = self._broker().report_supervisor(self.describe(now, pools, children))
        except CorralError as exc:
            self._failures += 1
            log.debug("supervisor.report_failed", error=str(exc), failures=self._failures)
            return
        self._failures = 0
        self.answered = now

    def describe(self, now: float, pools: list[Pool], children: Children) -> SupervisorInfo:
        """The report: pools and processes. A process the supervisor keeps
        alive (a status line, or a job and a busy CPU) is vouched for, so
        the broker does not drop it for a silence the supervisor explains
        (a handler holding the GIL starves its heartbeat)."""
        infos = [
            PoolInfo(
                p.name,
                list(p.config.queues),
                len(p.slots),
                p.restarts.total,
                p.backing_off(now),
                state=p.state(now),
            )
            for p in pools
        ]
        workers = [
            ProcessInfo(
                entry.pool.name,
                entry.index,
                entry.child.pid or 0,
                entry.child.last_rss,
                list(entry.child.jobs),
                round(now - entry.child.started_at, 3),
                entry.child.retiring,
                identity=entry.child.identity,
                vouched=vouched(entry.child, now, children.liveness),
                cpu=round(cpu_seconds(entry.child.pid) or 0.0, 3),
            )
            for entry in children.running()
        ]
        return SupervisorInfo(
            self.supervisor_id, self.host, os.getpid(), infos, workers, reload=self.reload
        )

    def worker_exited(self, child: Child) -> None:
        """Instant redelivery: the broker requeues the dead worker's jobs now
        rather than after the heartbeat window. If the broker does not answer
        quickly, the heartbeat path still applies."""
        # why, as the process was killed for it or said it as it exited:
        # each job charged for the exit has it in its try's error
        why = child.killed_for or child.cannot_start
        try:
            dropped = self._broker().worker_exited(
                self.host,
                child.pid or 0,
                f"{child.describe_exit()}: {why}" if why else child.describe_exit(),
                sorted(child.identities),
                charged=child.charged,
            )
        except CorralError as exc:
            log.warning("supervisor.broker_not_told", pid=child.pid, error=str(exc))
            return
        log.debug("supervisor.broker_told", pid=child.pid, dropped=dropped)

    def close(self) -> None:
        """Close the client and terminate its zmq context (linger 0), which
        ends the context's I/O threads: call it before every fork, since a
        thread alive at fork can leave the child a lock nobody will release.
        The next report or notice opens a new one."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._context is not None:
            self._context.destroy(linger=0)
            self._context = None

    def _broker(self) -> Client:
        import zmq

        from corral.client import Client

        if self._client is None:
            # A context of its own (not the process-wide instance), so that
            # close() ends exactly what this link started.
            self._context = zmq.Context()
            self._client = Client(
                config=self.config, timeout=BROKER_CALL_TIMEOUT, context=self._context
            )
        return self._client
