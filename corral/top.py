"""``corral top``: a live view of the queues, workers and pools in the
terminal (rich), refreshed from ``corral status`` every ``--interval``
seconds.

- queues: depth per status, the age of the oldest ready job (latency), and
  succeeded and failed per second since the last refresh;
- workers: the job each runs, its progress, the process's RSS, CPU time and
  its pool's restarts (from its supervisor's report, matched by pid);
- pools: processes, restarts and state (ok, backing off, scaled to 0).

Each table fits the terminal's width, one line a row (:mod:`corral.fit`):
names are cut with an ellipsis (a worker id keeps its end, the pid), then
the less important columns go (queues: fail/s, retry, sched, and paused
joins the queue's name; workers: restarts, cpu s, rss MiB, failed,
progress). A pipe gets every column, :data:`~corral.cliformat.PIPE_WIDTH`
wide. ``--once`` prints one frame and exits (scripts, tests).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from corral.cliformat import PIPE_WIDTH, age_text
from corral.fit import Column, fitted_table

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


def frame(client: Client, rates: Rates, width: int = PIPE_WIDTH) -> RenderableType:
    """One frame of the view, ``width`` columns wide, from one status
    request (and one job request per running job, up to
    :data:`MAX_PROGRESS_LOOKUPS`)."""
    from corral.errors import JobNotFound

    status = client.status()
    progress: dict[str, tuple[float, str]] = {}
    for w in status.workers:
        if not w.running or len(progress) >= MAX_PROGRESS_LOOKUPS:
            continue
        try:
            info = client.job(w.running[0])
        except JobNotFound:
            continue
        if info.progress is not None:
            progress[w.running[0]] = (info.progress, info.progress_note)
    return render(status, progress, rates, width)


def render(
    status: Any,
    progress: dict[str, tuple[float, str]],
    rates: Rates,
    width: int = PIPE_WIDTH,
) -> RenderableType:
    """The frame for ``status``: ``progress`` gives a running job's
    (fraction done, note) by job id. Each table fits ``width`` columns,
    one line a row (see :mod:`corral.fit`)."""
    from rich.console import Group

    per_second = rates.update(time.monotonic(), status.queues)
    return Group(
        _queues(status, per_second, width),
        _workers(status, progress, width),
        _pools(status, width),
    )


def count_text(n: int) -> str:
    """A count for a glance: exact below 100,000, then "123k", "1.2M"."""
    if n < 100_000:
        return str(n)
    if n < 1_000_000:
        return f"{n / 1000:.0f}k"
    return f"{n / 1_000_000:.1f}M"


def rate_text(per_second: float) -> str:
    return f"{per_second:.1f}" if per_second < 1000 else f"{per_second / 1000:.1f}k"


def _queues(status: Any, per_second: dict[str, tuple[float, float]], width: int) -> Any:
    names = sorted(set(status.queues) | set(status.paused))
    counts = [status.queues.get(queue, {}) for queue in names]

    def number(header: str, cells: list[str], drop: int = 0) -> Column:
        return Column(header, cells, right=True, drop=drop)

    def of(key: str) -> list[str]:
        return [count_text(c.get(key, 0)) for c in counts]

    rates = [per_second.get(queue, (0.0, 0.0)) for queue in names]
    columns = [
        Column("queue", names or ["(no jobs)"], text=True, least=10),
        number("queued", of("queued")),
        number("sched", of("scheduled"), drop=4),
        number("run", of("running")),
        number("retry", of("retrying"), drop=3),
        number("failed", of("failed")),
        number("oldest", [age_text(status.latency.get(queue)) for queue in names]),
        number("ok/s", [rate_text(ok) for ok, _ in rates]),
        number("fail/s", [rate_text(failed) for _, failed in rates], drop=1),
        Column(
            "paused", ["paused" if q in status.paused else "" for q in names], drop=5, fold=True
        ),
    ]
    if not names:
        for column in columns[1:]:
            column.cells = [""]
    return fitted_table("queues", columns, width)


def _workers(status: Any, progress: dict[str, tuple[float, str]], width: int) -> Any:
    processes = {
        (sup.host, w.pid): (w, pool_restarts(sup, w.pool))
        for sup in status.supervisors
        for w in sup.workers
    }
    rows = []
    for w in status.workers:
        job, shown = "-", ""
        if w.running:
            job = w.running[0] + (f" (+{len(w.running) - 1})" if len(w.running) > 1 else "")
            if w.running[0] in progress:
                done, note = progress[w.running[0]]
                shown = f"{done:.0%} {note}".strip()
        proc, restarts = processes.get((w.host, w.pid), (None, None))
        rows.append(
            (
                w.worker_id,
                job,
                shown,
                "-" if proc is None else f"{proc.rss / 2**20:.1f}",
                "-" if proc is None else f"{proc.cpu:.1f}",
                "-" if restarts is None else str(restarts),
                count_text(w.processed),
                count_text(w.failed),
            )
        )
    cells = [list(column) for column in zip(*rows, strict=True)] if rows else [[]] * 8
    columns = [
        Column("worker", cells[0], text=True, least=16, cut="start"),  # its pid: the end
        Column("job", cells[1], text=True, least=10),
        Column("progress", cells[2], text=True, least=8, drop=5),
        Column("rss MiB", cells[3], right=True, drop=3),
        Column("cpu s", cells[4], right=True, drop=2),
        Column("restarts", cells[5], right=True, drop=1),  # the pools table has them too
        Column("done", cells[6], right=True),
        Column("failed", cells[7], right=True, drop=4),
    ]
    return fitted_table("workers", columns, width)


def pool_restarts(sup: Any, pool: str) -> int | None:
    return next((p.restarts for p in sup.pools if p.name == pool), None)


def _pools(status: Any, width: int) -> Any:
    pools = [(sup.host, pool) for sup in status.supervisors for pool in sup.pools]
    columns = [
        Column("host", [host for host, _ in pools], text=True, least=10),
        Column("pool", [pool.name for _, pool in pools], text=True, least=8),
        Column("queues", [",".join(pool.queues) for _, pool in pools], text=True, least=8),
        Column("procs", [str(pool.processes) for _, pool in pools], right=True),
        Column("restarts", [str(pool.restarts) for _, pool in pools], right=True),
        Column("state", [pool.state for _, pool in pools], text=True, least=12),
    ]
    return fitted_table("pools", columns, width)


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
        console.print(frame(client, rates, console.width))
        return
    with Live(frame(client, rates, console.width), console=console, refresh_per_second=4) as live:
        while True:
            time.sleep(interval)
            live.update(frame(client, rates, console.width))  # the terminal may have been resized
