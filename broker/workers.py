"""The broker's table of connected workers: credit, leases, liveness. Pure:
no sockets; time comes in as ``now`` (monotonic seconds).

Liveness: a worker silent for the liveness window is dead, unless its
supervisor vouched for it lately (a supervised worker, newly registered,
counts as vouched for until its supervisor's first report is due). A
handler holding the GIL in one long C call starves the worker's socket
thread, so it cannot heartbeat, while its supervisor still sees the
process alive and busy (CPU time growing) and says so in its reports. A
vouch counts until the liveness window plus :data:`VOUCH_GRACE` after
the report that made it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from corral.broker import protocol as p

#: Seconds a supervisor's vouch outlasts the liveness window. A supervisor
#: reports every second (plus up to a tick, plus the call), so the grace
#: bridges the time to its next report even when the window is shorter.
VOUCH_GRACE = 2.0


@dataclass(eq=False)
class WorkerConn:
    """One connected worker, keyed by its socket identity."""

    identity: bytes
    worker_id: str
    queues: list[str]
    capacity: int
    concurrency: int
    tasks: list[str]
    host: str
    pid: int
    last_seen: float
    #: A supervisor watches its process (it said so in its READY).
    supervised: bool = False
    last_sent: float = 0.0
    #: Until when (monotonic) its supervisor's last vouch keeps it alive.
    vouched_until: float = 0.0
    #: The jobs its supervisor last said it runs, and when (monotonic).
    reported_running: frozenset[str] = frozenset()
    reported_at: float = 0.0
    #: job id -> lease token, in delivery order.
    leases: dict[str, int] = field(default_factory=dict)
    #: job ids the worker said it started.
    started: set[str] = field(default_factory=set)
    #: job ids asked back with a Withdraw, not yet answered.
    withdrawing: set[str] = field(default_factory=set)
    #: When it last got jobs (a dispatch counter): the tie-break of fair dispatch.
    given: int = 0
    processed: int = 0
    failed: int = 0
    rotation: int = 0
    #: queue -> weight (from the pool's queue_weights); absent: equal shares.
    weights: dict[str, int] = field(default_factory=dict)
    _current: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_ready(cls, identity: bytes, msg: p.Ready, mono: float) -> WorkerConn:
        """The connection a READY registers."""
        return cls(
            identity=identity,
            worker_id=msg.worker_id,
            queues=list(msg.queues),
            capacity=max(0, msg.credit),
            concurrency=max(1, msg.concurrency),
            tasks=[t.name for t in msg.tasks],
            host=msg.host,
            pid=msg.pid,
            last_seen=mono,
            supervised=msg.supervised,
            weights={q: w for q, w in msg.queue_weights.items() if w > 0},
        )

    def count(self, outcome: str) -> None:
        """A try it ran ended: ``succeeded`` or ``failure``."""
        if outcome == "succeeded":
            self.processed += 1
        else:
            self.failed += 1

    @property
    def credit(self) -> int:
        return self.capacity - len(self.leases)

    def queue_order(self) -> list[str]:
        """The order to look for this worker's next job: the queue whose turn
        it is first (smooth weighted round robin, so each queue gets its
        weight's share and none starves), then the others as fallbacks."""
        n = len(self.queues)
        if n <= 1:
            return self.queues
        if not self.weights:
            start = self.rotation % n
            self.rotation += 1
            return self.queues[start:] + self.queues[:start]
        total = 0
        for queue in self.queues:
            weight = self.weights.get(queue, 1)
            total += weight
            self._current[queue] = self._current.get(queue, 0) + weight
        best = max(self.queues, key=lambda q: self._current[q])
        self._current[best] -= total
        return [best] + [q for q in self.queues if q != best]

    def release(self, job_id: str) -> int | None:
        """Forget a lease; the credit comes back. Returns the lease token."""
        self.started.discard(job_id)
        self.withdrawing.discard(job_id)
        return self.leases.pop(job_id, None)

    def counted_on_loss(self) -> set[str]:
        """The held jobs whose attempt counts if this worker dies: those it
        said it started, and the oldest ``concurrency`` of the rest, which may
        have started unannounced. Later ones were still waiting in its
        buffer and go back uncounted."""
        counted = set(self.started)
        for job_id in list(self.leases)[: self.concurrency]:
            counted.add(job_id)
        return counted


class WorkerTable:
    """Every connected worker, with the liveness rule, and the tasks they
    serve (each name counted once per worker; a name goes with its last
    worker)."""

    def __init__(self, liveness_window: float) -> None:
        self.liveness_window = liveness_window
        self.by_identity: dict[bytes, WorkerConn] = {}
        #: task name -> how many connected workers registered it.
        self.serving: Counter[str] = Counter()
        #: Told ("up", conn) when a worker is added, ("down", conn) when it
        #: goes, at once (the events publisher: worker.up, worker.down).
        self.watchers: list[Callable[[str, WorkerConn], None]] = []

    def __len__(self) -> int:
        return len(self.by_identity)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self.by_identity.values()))

    def get(self, identity: bytes) -> WorkerConn | None:
        return self.by_identity.get(identity)

    def add(self, conn: WorkerConn) -> WorkerConn | None:
        """Register ``conn``; returns the connection it replaces, if any.
        A supervised worker counts as vouched for until its supervisor's
        first report naming it is due (the window plus
        :data:`VOUCH_GRACE`): a handler that holds the GIL from its first
        moment starves the heartbeat before any report could vouch."""
        old = self.remove(conn.identity)
        if conn.supervised:
            first_report = conn.last_seen + self.liveness_window + VOUCH_GRACE
            conn.vouched_until = max(conn.vouched_until, first_report)
        self.by_identity[conn.identity] = conn
        self.serving.update(set(conn.tasks))
        for watcher in self.watchers:
            watcher("up", conn)
        return old

    def update(self, conn: WorkerConn, msg: p.Ready) -> None:
        """``conn`` sent READY again: take what it says now (queues,
        credit, concurrency, tasks, weights) in place; its leases and
        counts stay."""
        fresh = WorkerConn.from_ready(conn.identity, msg, conn.last_seen)
        for task in set(conn.tasks):
            self.serving[task] -= 1
            if not self.serving[task]:
                del self.serving[task]
        conn.queues, conn.tasks = fresh.queues, fresh.tasks
        conn.capacity, conn.concurrency = fresh.capacity, fresh.concurrency
        conn.host, conn.pid = fresh.host, fresh.pid
        if fresh.weights != conn.weights:
            conn.weights, conn._current = fresh.weights, {}
        self.serving.update(set(conn.tasks))

    def remove(self, identity: bytes) -> WorkerConn | None:
        conn = self.by_identity.pop(identity, None)
        if conn is not None:
            for task in set(conn.tasks):
                self.serving[task] -= 1
                if not self.serving[task]:
                    del self.serving[task]
            for watcher in self.watchers:
                watcher("down", conn)
        return conn

    def seen(self, identity: bytes, now: float) -> WorkerConn | None:
        conn = self.by_identity.get(identity)
        if conn is not None:
            conn.last_seen = now
        return conn

    def excuse(self, seconds: float) -> None:
        """The broker itself did not run for ``seconds`` (stopped, or a long
        pass): no worker is blamed for a silence the broker could not hear."""
        for conn in self.by_identity.values():
            conn.last_seen += seconds
            if conn.vouched_until:
                conn.vouched_until += seconds

    def silent(self, now: float) -> list[WorkerConn]:
        """Workers silent for longer than the liveness window, and no
        longer vouched for: dead."""
        limit = now - self.liveness_window
        return [
            c for c in self.by_identity.values() if c.last_seen < limit and c.vouched_until < now
        ]

    def vouch(self, host: str, processes: list[p.ProcessInfo], now: float) -> int:
        """A supervisor on ``host`` reported its ``processes``: keep each one
        it vouches for that is connected here (same identity, host and pid)
        until the liveness window plus :data:`VOUCH_GRACE` from ``now``.
        Returns how many it kept."""
        kept = 0
        for info in processes:
            if not info.vouched or not info.identity:
                continue
            try:
                conn = self.by_identity.get(bytes.fromhex(info.identity))
            except ValueError:  # not hex: no worker of ours
                continue
            if conn is not None and conn.host == host and conn.pid == info.pid:
                conn.vouched_until = now + self.liveness_window + VOUCH_GRACE
                conn.reported_running = frozenset(info.jobs)
                conn.reported_at = now
                kept += 1
        return kept

    def hungry(self) -> list[WorkerConn]:
        return [c for c in self.by_identity.values() if c.credit > 0]
