"""What the ``corral`` command prints: one JSON line with ``--json``, else
readable text (a job, the status tables, a page of jobs, a chain or group,
a log check)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from corral.broker.state import STATUSES

if TYPE_CHECKING:
    from corral.broker.logtools import Damage, RepairReport, VerifyReport


def plain(value: Any) -> Any:
    return msgspec.to_builtins(value)


def emit(args: argparse.Namespace, value: Any, human: Callable[[Any], str] | None = None) -> None:
    if args.json or human is None:
        sys.stdout.write(msgspec.json.encode(plain(value)).decode() + "\n")
    else:
        sys.stdout.write(human(value) + "\n")


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) + f".{int(ts % 1 * 1000):03d}"


def human_job(info: Any) -> str:
    lines = [
        f"id:          {info.id}",
        f"task:        {info.task}",
        f"queue:       {info.queue}",
        f"status:      {info.status}",
        f"attempts:    {info.attempts}/{info.max_attempts}",
        f"created:     {_when(info.created_at)}",
        f"next run:    {_when(info.next_run_at)}",
        f"started:     {_when(info.started_at)}",
    ]
    if info.reserved_by:
        lines.append(f"reserved by: {info.reserved_by} (in its prefetch buffer, not started)")
    if info.error is not None:
        lines.append(f"error:       {info.error.type}: {info.error.message}")
    for t in info.tries:
        outcome = f"{t.error.type}: {t.error.message}" if t.error else "ok"
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


def human_status(status: Any) -> str:
    lines = ["queue".ljust(20) + "".join(s.rjust(11) for s in STATUSES)]
    for queue, counts in status.queues.items():
        lines.append(queue.ljust(20) + "".join(str(counts.get(s, 0)).rjust(11) for s in STATUSES))
    if not status.queues:
        lines.append("(no jobs)")
    lines.extend(_notes(status))
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
        lines.append("")
        lines.append(f"supervisor {sup.supervisor_id} (pid {sup.pid} on {sup.host})")
        if sup.reload:
            lines.append(f"  last reload {sup.reload}")
        for pool in sup.pools:
            state = pool.state
            lines.append(
                f"  pool {pool.name}: {pool.processes} processes, queues={','.join(pool.queues)}"
                f", restarts={pool.restarts}, {state}"
            )
        for w in sup.workers:
            jobs = ",".join(w.jobs) or "-"
            extra = f" retiring ({w.retiring})" if w.retiring else ""
            lines.append(
                f"    {w.pool}#{w.index} pid {w.pid} rss {w.rss / 2**20:.1f}MiB "
                f"up {w.uptime:.0f}s job {jobs}{extra}"
            )
    lines.append("")
    lines.append(f"workers: {len(status.workers)}")
    for w in status.workers:
        lines.append(
            f"  {w.worker_id}  queues={','.join(w.queues)} running={len(w.running)} "
            f"reserved={len(w.reserved)} credit={w.credit} processed={w.processed} "
            f"failed={w.failed}"
        )
    return "\n".join(lines)


def human_jobs(page: Any) -> str:
    lines = [f"{'id':32}  {'status':10} {'attempts':>8}  {'queue':12} task"]
    for info in page:
        lines.append(
            f"{info.id:32}  {info.status:10} {info.attempts:>8}  {info.queue:12} {info.task}"
        )
    if page.cursor:
        lines.append(f"(more: --cursor {page.cursor})")
    return "\n".join(lines)


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


def _job_lines(lost: list[str], changed: list[str], spans: list[Damage]) -> list[str]:
    if all(d.kind in ("torn_tail", "header") for d in spans):
        return []
    return [
        "lost jobs (acknowledged, not in the repaired log): " + (", ".join(lost) or "none told"),
        "jobs that lost a later change (they may run again or show an older status): "
        + (", ".join(changed) or "none told"),
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
        lines += _job_lines(report.lost_jobs, report.changed_jobs, report.damaged)
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
        *_job_lines(report.lost_jobs, report.changed_jobs, report.damaged),
        f"the original segments, the damaged bytes and repair.json are in {report.backup}",
    ]
    return "\n".join(lines)
