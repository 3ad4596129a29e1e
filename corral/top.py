"""``corral top``: a live view of the queues, workers and pools in the
terminal (rich), refreshed from ``corral status`` every ``--interval``
seconds.

- queues: depth per status, the age of the oldest ready job (latency), and
  succeeded and failed per second since the last refresh;
- workers: the job each runs, its progress, the process's RSS, CPU time and
  its pool's restarts (from its supervisor's report, matched by pid);
- pools: processes, restarts and state (ok, backing off, scaled to 0).

``--once`` prints one frame and exits (scripts, tests).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from corral.cliformat import PIPE_WIDTH, age_text, table

if TYPE_CHECKING:
    from rich.console import RenderableType

    from corral.client import Client

#: Running jobs whose progress one frame asks for (one request each).
MAX_PROGRESS_LOOKUPS = 20


class Rates:
    """Succeeded and failed per second per queue, from the counts of two
    frames in a row."""

    def __init__(self) -> None:
        self._last: tuple[float, dict[str, tuple[int, int]]] | None = None

    def update(
        self, at: float, queues: dict[str, dict[str, int]]
    ) -> dict[str, tuple[float, float]]:
        now = {q: (c.get("succeeded", 0), c.get("failed", 0)) for q, c in queues.items()}
        last, self._last = self._last, (at, now)
        if last is None or at <= last[0]:
            return {}
        span = at - last[0]
        rates = {}
        for queue, (ok, failed) in now.items():
            ok0, failed0 = last[1].get(queue, (0, 0))
            rates[queue] = (max(0, ok - ok0) / span, max(0, failed - failed0) / span)
        return rates


def frame(client: Client, rates: Rates) -> RenderableType:
    """One frame of the view, from one status request (and one job request
    per running job, up to :data:`MAX_PROGRESS_LOOKUPS`)."""
    from rich.console import Group

    status = client.status()
    per_second = rates.update(time.monotonic(), status.queues)
    return Group(
        _queues(status, per_second),
        _workers(client, status),
        _pools(status),
    )


def _table(title: str, *columns: str, right: tuple[str, ...] = ()) -> Any:
    return table(*columns, right=right, title=title, edge=True)


def _queues(status: Any, per_second: dict[str, tuple[float, float]]) -> Any:
    numbers = ("queued", "scheduled", "running", "retrying", "failed", "oldest", "ok/s", "fail/s")
    table = _table("queues", "queue", *numbers, "paused", right=numbers)
    names = sorted(set(status.queues) | set(status.paused))
    for queue in names:
        counts = status.queues.get(queue, {})
        age = status.latency.get(queue)
        ok, failed = per_second.get(queue, (0.0, 0.0))
        table.add_row(
            queue,
            *(str(counts.get(s, 0)) for s in ("queued", "scheduled", "running", "retrying")),
            str(counts.get("failed", 0)),
            age_text(age),
            f"{ok:.1f}",
            f"{failed:.1f}",
            "paused" if queue in status.paused else "",
        )
    if not names:
        table.add_row("(no jobs)", *[""] * (len(numbers) + 1))
    return table


def _workers(client: Client, status: Any) -> Any:
    from corral.errors import JobNotFound

    processes = {
        (sup.host, w.pid): (w, pool_restarts(sup, w.pool))
        for sup in status.supervisors
        for w in sup.workers
    }
    numbers = ("rss MiB", "cpu s", "restarts", "done", "failed")
    table = _table("workers", "worker", "job", "progress", *numbers, right=numbers)
    lookups = 0
    for w in status.workers:
        job, progress = "-", ""
        if w.running:
            job = w.running[0] + (f" (+{len(w.running) - 1})" if len(w.running) > 1 else "")
            if lookups < MAX_PROGRESS_LOOKUPS:
                lookups += 1
                try:
                    info = client.job(w.running[0])
                except JobNotFound:
                    info = None
                if info is not None and info.progress is not None:
                    progress = f"{info.progress:.0%} {info.progress_note}".strip()
        proc, restarts = processes.get((w.host, w.pid), (None, None))
        table.add_row(
            w.worker_id,
            job,
            progress,
            "-" if proc is None else f"{proc.rss / 2**20:.1f}",
            "-" if proc is None else f"{proc.cpu:.1f}",
            "-" if restarts is None else str(restarts),
            str(w.processed),
            str(w.failed),
        )
    return table


def pool_restarts(sup: Any, pool: str) -> int | None:
    return next((p.restarts for p in sup.pools if p.name == pool), None)


def _pools(status: Any) -> Any:
    table = _table(
        "pools", "host", "pool", "queues", "processes", "restarts", "state",
        right=("processes", "restarts"),
    )  # fmt: skip
    for sup in status.supervisors:
        for pool in sup.pools:
            table.add_row(
                sup.host,
                pool.name,
                ",".join(pool.queues),
                str(pool.processes),
                str(pool.restarts),
                pool.state,
            )
    return table


def run(client: Client, interval: float, once: bool) -> None:
    """Show the view until Ctrl-C, refreshed every ``interval`` seconds
    (``once``, or stdout not a terminal: one frame, printed)."""
    import sys

    from rich.console import Console
    from rich.live import Live

    rates = Rates()
    tty = sys.stdout.isatty()
    console = Console(width=None if tty else PIPE_WIDTH, highlight=False, markup=False, emoji=False)
    if once or not tty:  # a pipe gets one frame
        console.print(frame(client, rates))
        return
    with Live(frame(client, rates), console=console, refresh_per_second=4) as live:
        while True:
            time.sleep(interval)
            live.update(frame(client, rates))
