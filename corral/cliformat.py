"""What the ``corral`` command prints: one JSON line with ``--json``, else
readable text (a job, the status tables, a page of jobs, a chain or group,
a log check). Tables are drawn with rich; text keeps real UTF-8 (a task or
queue named in any script shows as written)."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from corral.broker.protocol import STATUSES

if TYPE_CHECKING:
    from rich.console import RenderableType
    from rich.table import Table

    from corral.broker.logtools import Damage, RepairReport, VerifyReport

#: Columns a table gets when stdout is not a terminal (a pipe, a file): wide
#: enough that a row of ids and names is not wrapped.
PIPE_WIDTH = 200


def plain(value: Any) -> Any:
    """``value`` as JSON-able builtins (a Struct as its dict, bytes as base64);
    raises TypeError for a map JSON cannot key (see :func:`jsonable`)."""
    return msgspec.to_builtins(value)


def jsonable(value: Any) -> Any:
    """A decoded msgpack value (a job's result) as one JSON can hold: bytes
    as base64 (as msgspec writes them), a map's key that is not a string as
    its compact JSON text (``3`` -> ``"3"``, ``None`` -> ``"null"``, an array
    ``(1, "a")`` -> ``'[1,"a"]'``), tuples as lists; anything else as it is.
    msgpack keys maps by any value and holds bytes: ``corral result`` printed
    a traceback for those."""
    if isinstance(value, dict):
        return {_key_text(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(item) for item in value]
    if isinstance(value, bytes | bytearray | memoryview):
        return msgspec.to_builtins(bytes(value))
    return value


def _key_text(key: Any) -> str:
    if isinstance(key, str):
        return key
    return msgspec.json.encode(jsonable(key)).decode()


def emit(args: argparse.Namespace, value: Any, human: Callable[[Any], Any] | None = None) -> None:
    """Print ``value``: one JSON line with ``--json`` (or without ``human``),
    else what ``human`` makes of it (a str, or a rich renderable)."""
    if args.json or human is None:
        try:
            line = msgspec.json.encode(plain(value))
        except TypeError:  # a result keyed by what JSON cannot key
            line = msgspec.json.encode(plain(jsonable(value)))
        sys.stdout.write(line.decode() + "\n")
        return
    shown = human(value)
    if isinstance(shown, str):
        sys.stdout.write(shown + "\n")
    else:
        console().print(shown)


def console() -> Any:
    """A rich console on stdout: colours only on a terminal, no markup or
    highlighting read into names, and :data:`PIPE_WIDTH` columns on a pipe."""
    from rich.console import Console

    tty = sys.stdout.isatty()
    return Console(
        highlight=False,
        markup=False,
        emoji=False,
        width=None if tty else PIPE_WIDTH,
        soft_wrap=False,
    )


def as_text(shown: Any) -> str:
    """What :func:`emit` prints for ``shown`` (a str or a rich renderable)
    on a pipe, as a str."""
    if isinstance(shown, str):
        return shown
    import io

    from rich.console import Console

    out = io.StringIO()
    Console(file=out, width=PIPE_WIDTH, highlight=False, markup=False, emoji=False).print(shown)
    return out.getvalue()


#: What :func:`escaped` escapes: control characters (C0, DEL, C1) and the
#: line and paragraph separators.
_CONTROL = re.compile("[\\x00-\\x1f\\x7f-\\x9f\\u2028\\u2029]")


def escaped(text: str) -> str:
    """``text`` (a user's: a job's error, a progress note) with each control
    character shown as ``repr`` spells it (``\\n``, ``\\x1b``, ``\\u2028``),
    for a terminal: a newline in it made what read as another line of ours,
    an escape sequence (ESC [2J) drove the operator's terminal."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def result_text(value: Any) -> str:
    """A job's result as one line of JSON, non-ASCII kept as it is (what
    JSON has no form for as :func:`jsonable` makes it; NaN as ``NaN``)."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except TypeError:  # bytes, a map keyed by an array or nil
        return json.dumps(jsonable(value), ensure_ascii=False)


def table(
    *columns: str, right: tuple[str, ...] = (), title: str | None = None, edge: bool = False
) -> Table:
    """A rich table of ``columns`` (those in ``right`` right-justified),
    titled ``title``, with blank lines at its top and bottom when ``edge``."""
    from rich import box
    from rich.table import Table

    made = Table(
        title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=edge
    )
    for name in columns:
        made.add_column(name, justify="right" if name in right else "left", overflow="fold")
    return made


def age_text(seconds: float | None) -> str:
    """A span for a person: "12.5s", "3.2m", "1.5h"; "-" for None."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def when_text(ts: Any, *, clock_only: bool = False, millis: bool = True) -> str:
    """A time (seconds since the epoch) as local time, ``"-"`` for None;
    one no clock of this platform can show (past time_t, NaN: a job stored
    before the broker bounded its times) as its seconds since the epoch."""
    if ts is None:
        return "-"
    try:
        shown = time.strftime("%H:%M:%S" if clock_only else "%Y-%m-%d %H:%M:%S", time.localtime(ts))
        return shown + (f".{int(ts % 1 * 1000):03d}" if millis else "")
    except (OverflowError, ValueError, OSError, TypeError):
        seconds = f"{ts:g}" if isinstance(ts, int | float) else repr(ts)[:40]
        return f"{seconds} seconds since the epoch"


_when = when_text


def human_job(info: Any) -> str:
    lines = [
        f"id:          {info.id}",
        f"task:        {info.task}",
        f"queue:       {info.queue}",
        f"status:      {info.status}" + (f" ({info.reason})" if info.reason else ""),
        f"attempts:    {info.attempts}/{info.max_attempts}",
        f"created:     {_when(info.created_at)}",
        f"next run:    {_when(info.next_run_at)}",
        f"started:     {_when(info.started_at)}",
    ]
    if info.limit_key:
        lines.append(f"limit key:   {info.limit_key}")
    if info.waiting_for:
        lines.append(f"waiting for: {info.waiting_for}")
    if info.expires_at is not None and info.status in ("queued", "scheduled", "retrying"):
        lines.append(f"expires:     {_when(info.expires_at)} (not started by then: cancelled)")
    if info.headers:
        shown = ", ".join(f"{key}={value}" for key, value in sorted(info.headers.items()))
        lines.append(f"headers:     {shown}")
    if info.reserved_by:
        lines.append(f"reserved by: {info.reserved_by} (in its prefetch buffer, not started)")
    if info.progress is not None:
        note = f" {escaped(info.progress_note)}" if info.progress_note else ""
        lines.append(f"progress:    {info.progress:.0%}{note}")
    if info.error is not None:
        lines.append(f"error:       {escaped(f'{info.error.type}: {info.error.message}')}")
        if info.error.traceback:
            lines.append("traceback:")
            tb = info.error.traceback.rstrip().split("\n")
            lines.extend(f"  {escaped(line)}" for line in tb)
    for t in info.tries:
        outcome = escaped(f"{t.error.type}: {t.error.message}") if t.error else "ok"
        if t.ended_at is None:
            outcome = "running"
        lines.append(
            f"  try {t.attempt}: {t.worker} pid {t.pid} on {t.host}, "
            f"{_when(t.started_at)} -> {_when(t.ended_at)}: {outcome}"
        )
    return "\n".join(lines)


def _notes(status: Any) -> list[str]:
    """The status lines under the table: paused queues, clock steps, rates, tasks."""
    lines = []
    if status.paused:
        lines.append(f"paused: {', '.join(status.paused)}")
    steps = status.stats.get("clock_steps", 0)
    if steps:
        lines.append(
            f"wall clock: stepped {steps} time(s) since the broker started (broker.clock_stepped "
            "in its log); retries, delays and every-schedules kept their intervals"
        )
    if status.rates:
        lines.append(
            f"last minute: {status.rates.get('processed_per_minute', 0):.0f} processed, "
            f"{status.rates.get('failed_per_minute', 0):.0f} failed"
        )
    if status.registered_tasks:
        lines.append(f"tasks: {', '.join(status.registered_tasks)}")
    return lines


def human_status(status: Any) -> RenderableType:
    """The queue table, the notes, each supervisor's pools and processes,
    and the connected workers grouped by pool."""
    from rich.console import Group

    queues = table("queue", *STATUSES, right=STATUSES)
    for queue, counts in status.queues.items():
        queues.add_row(queue, *(str(counts.get(s, 0)) for s in STATUSES))
    lines = [] if status.queues else ["(no jobs)"]
    lines.extend(_notes(status))
    parts: list[Any] = [queues]
    limits = _limits_table(status.limits)
    if limits is not None:
        parts.append(limits)
    for u in status.unroutable:
        hint = (
            f"no connected worker listens to queue {u.queue!r}: add it to a pool's queues"
            if u.task in status.registered_tasks
            else "no connected worker registered the task: add its module to the plugins "
            "of a pool that serves the queue"
        )
        lines.append(
            f"unroutable: {u.count} job(s) of task {u.task!r} on queue {u.queue!r}, waiting "
            f"since {_when(u.since)}: {hint}"
        )
    for sup in status.supervisors:
        lines.extend(_supervisor_lines(sup))
    lines.append("")
    lines.append(f"workers: {len(status.workers)}")
    parts.append("\n".join(lines))
    for pool, workers in _by_pool(status.workers).items():
        pool_table = table(
            f"pool {pool}",
            "queues",
            "running",
            "reserved",
            "credit",
            "processed",
            "failed",
            right=("running", "reserved", "credit", "processed", "failed"),
        )
        for w in workers:
            pool_table.add_row(
                w.worker_id,
                ",".join(w.queues),
                str(len(w.running)),
                str(len(w.reserved)),
                str(w.credit),
                str(w.processed),
                str(w.failed),
            )
        parts.append(pool_table)
    return Group(*parts)


def _limits_table(limits: list[Any]) -> Any:
    """The limited tasks: their limits, jobs leased (running) against them,
    starts in the rate window, jobs held back, keys; None if there are none."""
    if not limits:
        return None
    out = table(
        "limited task",
        "concurrency",
        "rate",
        "per key",
        "running",
        "in window",
        "waiting",
        "keys",
        right=("running", "in window", "waiting", "keys"),
    )
    for lim in limits:
        per_key = " ".join(
            part
            for part in (
                str(lim.key_concurrency) if lim.key_concurrency is not None else "",
                lim.key_rate or "",
            )
            if part
        )
        out.add_row(
            lim.task,
            "-" if lim.concurrency is None else str(lim.concurrency),
            lim.rate or "-",
            per_key or "-",
            str(lim.running),
            str(lim.window_starts) if lim.rate else "-",
            str(lim.waiting),
            f"{lim.keys} ({lim.keys_waiting} waiting)" if lim.keys else "-",
        )
    return out


def _supervisor_lines(sup: Any) -> list[str]:
    """A supervisor, each pool, and under it the pool's processes."""
    lines = ["", f"supervisor {sup.supervisor_id} (pid {sup.pid} on {sup.host})"]
    if sup.reload:
        lines.append(f"  last reload {sup.reload}")
    for pool in sup.pools:
        lines.append(
            f"  pool {pool.name}: {pool.processes} processes, queues={','.join(pool.queues)}"
            f", restarts={pool.restarts}, {pool.state}"
        )
        for w in sup.workers:
            if w.pool != pool.name:
                continue
            jobs = ",".join(w.jobs) or "-"
            extra = f" retiring ({w.retiring})" if w.retiring else ""
            lines.append(
                f"    {w.pool}#{w.index} pid {w.pid} rss {w.rss / 2**20:.1f}MiB "
                f"up {w.uptime:.0f}s job {jobs}{extra}"
            )
    pools = {pool.name for pool in sup.pools}
    for w in sup.workers:  # a draining worker of a pool a reload removed
        if w.pool not in pools:
            lines.append(
                f"    {w.pool}#{w.index} pid {w.pid} (pool removed) job {','.join(w.jobs) or '-'}"
            )
    return lines


def _by_pool(workers: list[Any]) -> dict[str, list[Any]]:
    """Connected workers by the pool their name gives (``host/pool#i/pid``,
    as a supervisor names them; a worker named otherwise is under "-")."""
    pools: dict[str, list[Any]] = {}
    for w in workers:
        parts = w.worker_id.split("/")
        pool = parts[1].rsplit("#", 1)[0] if len(parts) == 3 and "#" in parts[1] else "-"
        pools.setdefault(pool, []).append(w)
    return dict(sorted(pools.items()))


def human_jobs(page: Any) -> RenderableType:
    """A page of jobs as a table: id, status, attempts, priority, queue,
    task, when created, and the last error."""
    from rich.console import Group

    jobs = table(
        "id",
        "status",
        "attempts",
        "priority",
        "queue",
        "task",
        "created",
        "error",
        right=("attempts", "priority"),
    )
    for info in page:
        error = escaped(f"{info.error.type}: {info.error.message}") if info.error else ""
        jobs.add_row(
            info.id,
            info.status,
            f"{info.attempts}/{info.max_attempts}",
            str(info.priority),
            info.queue,
            info.task,
            _when(info.created_at),
            error[:80],
        )
    if not page.cursor:
        return jobs
    return Group(jobs, f"(more: --cursor {page.cursor})")


def human_flow(info: Any) -> str:
    lines = [f"{info.kind} {info.id}: {info.status}"]
    if info.failed_step is not None:
        where = "step" if info.kind == "chain" else "member"
        lines.append(f"stopped at {where} {info.failed_step}")
    for index, job_id in enumerate(info.jobs):
        lines.append(f"  {index}: {job_id} {info.statuses.get(job_id, 'not created')}")
    if info.callback:
        status = info.statuses.get(info.callback)
        shown = f"{info.callback} {status}" if status else "not created"
        lines.append(f"  callback: {shown}")
    return "\n".join(lines)


def _damage_lines(spans: list[Damage], repaired: bool) -> list[str]:
    lines = []
    for d in spans:
        where = f"  {Path(d.segment).name} offset {d.offset}"
        size = f"{d.length} bytes, " if d.length else ""
        held = ", ".join(f"{h.type} {h.id}" if h.id else h.type for h in d.held)
        lines.append(f"{where}: {size}{d.reason}" + (f"; held {held}" if held else ""))
        if repaired and d.side_file:
            lines.append(f"    saved in {d.side_file}")
    return lines


#: Job ids a human report names before it counts the rest.
SHOWN_IDS = 10


def _some(ids: list[str], all_in: str) -> str:
    """``ids`` for a person: all of a few, else the first :data:`SHOWN_IDS`
    and a count (a damaged batch loses hundreds); ``all_in`` says where
    every one is listed."""
    if not ids:
        return "none told"
    if len(ids) <= SHOWN_IDS:
        return ", ".join(ids)
    shown = ", ".join(ids[:SHOWN_IDS])
    return f"{len(ids)} jobs: {shown} and {len(ids) - SHOWN_IDS} more ({all_in} lists them all)"


def _job_lines(lost: list[str], changed: list[str], spans: list[Damage], all_in: str) -> list[str]:
    if all(d.kind in ("torn_tail", "header") for d in spans):
        return []
    return [
        "lost jobs (acknowledged, not in the repaired log): " + _some(lost, all_in),
        "jobs that lost a later change (they may run again or show an older status): "
        + _some(changed, all_in),
    ]


def describe_verify(directory: Path, report: VerifyReport) -> str:
    text = f"{directory}: {report.segments} segments, {report.records} records"
    if report.corrupt:
        spans = [d for d in report.damaged if d.kind != "torn_tail"]
        lines = [
            f"{text}; CORRUPT: {len(spans)} damaged span(s); `corral log repair` keeps"
            " every valid record"
        ]
        lines += _damage_lines(report.damaged, repaired=False)
        lines += _job_lines(
            report.lost_jobs, report.changed_jobs, report.damaged, "`corral log verify --json`"
        )
        return "\n".join(lines)
    if report.torn_tail:
        seg, offset = report.torn_tail
        return f"{text}; torn tail at {seg} offset {offset} (truncated on next start)"
    return f"{text}; ok"


def describe_repair(directory: Path, report: RepairReport) -> str:
    if report.action == "none":
        return f"{directory}: nothing to repair; {report.records_kept} records, ok"
    if report.action == "truncated_tail":
        head = f"{directory}: cut a torn tail (never synced, so never acknowledged)"
    else:
        head = f"{directory}: repaired"
    lines = [
        f"{head}; {report.records_kept} records kept, {report.bytes_dropped} bytes moved aside",
        *_damage_lines(report.damaged, repaired=True),
        *_job_lines(report.lost_jobs, report.changed_jobs, report.damaged, "repair.json"),
        f"the original segments, the damaged bytes and repair.json are in {report.backup}",
    ]
    return "\n".join(lines)
