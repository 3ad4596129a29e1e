"""The ``corral`` commands that show progress on a terminal (rich, on
stderr, so stdout stays what a script reads): ``enqueue --from-file``
(jobs enqueued, and the rate) and ``--wait`` for a result (the running
job's ``ctx.progress``). On a pipe they print no bar, only the outcome.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.cliargs import json_text
from corral.errors import CorralError, JobNotFound, ResultTimeout

if TYPE_CHECKING:
    from rich.progress import Progress

    from corral.client import Client, Job

#: Jobs per ``enqueue_many`` request of ``--from-file`` (each batch is
#: durable at once: all of it or none).
FILE_BATCH = 500
#: How long one result poll of ``--wait`` lasts before the progress is read
#: again (seconds).
PROGRESS_POLL = 0.5


def _bar(*columns: Any) -> AbstractContextManager[Progress | None]:
    """A rich progress display on stderr, or a context that gives None when
    stderr is not a terminal."""
    if not sys.stderr.isatty():
        return nullcontext(None)
    from rich.console import Console
    from rich.progress import Progress

    return Progress(*columns, console=Console(stderr=True), transient=True)


def read_jobs(path: Path, parse: Any) -> Iterator[tuple[int, Job]]:
    """``(line number, Job)`` for each non-blank line of a JSON-lines file,
    each line a job as ``parse(fields, text)`` reads it. Raises ValueError
    naming the file and line of the first bad one, OSError if unreadable."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            fields = json_text(line, f"{path}:{number}")
            try:
                job = parse(fields, f"{path}:{number}")
            except CorralError as exc:  # the CLI's UsageError: not a job
                raise ValueError(str(exc)) from None
            yield number, job


def enqueue_file(client: Client, path: Path, parse: Any) -> list[str]:
    """Enqueue every job of the JSON-lines file ``path`` in batches of
    :data:`FILE_BATCH`, showing the count and rate; returns the ids in
    order. A bad line stops before its batch is sent (ValueError naming the
    line): the batches before it are enqueued, and the error says how many."""
    from rich.progress import MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn

    total = _count_lines(path)
    ids: list[str] = []
    batch: list[Job] = []
    with _bar(
        SpinnerColumn(),
        TextColumn("enqueued"),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:,.0f} jobs/s"),
        TimeElapsedColumn(),
    ) as bar:
        task = bar.add_task("enqueue", total=total, rate=0.0) if bar else None
        started = time.monotonic()
        try:
            for _, job in read_jobs(path, parse):
                batch.append(job)
                if len(batch) == FILE_BATCH:
                    ids += client.enqueue_many(batch)
                    batch = []
                    _advance(bar, task, len(ids), started)
            ids += client.enqueue_many(batch)
            _advance(bar, task, len(ids), started)
        except ValueError as exc:
            raise ValueError(f"{exc} ({len(ids)} jobs before it were enqueued)") from None
    return ids


def _advance(bar: Progress | None, task: Any, done: int, started: float) -> None:
    if bar is not None:
        rate = done / max(time.monotonic() - started, 1e-9)
        bar.update(task, completed=done, rate=rate)


def _count_lines(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(1 for line in handle if line.strip())


def wait_result(client: Client, job_id: str, timeout: float | None) -> Any:
    """``client.result(job_id, timeout)``, showing the job's progress
    (``ctx.progress`` and its note) while it runs, on a terminal. Raises as
    ``Client.result`` does (ResultTimeout once ``timeout`` seconds pass)."""
    if not sys.stderr.isatty():
        return client.result(job_id, timeout=timeout)
    from rich.progress import BarColumn, TaskProgressColumn, TextColumn

    deadline = None if timeout is None else time.monotonic() + timeout
    with _bar(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn()) as bar:
        assert bar is not None
        task = bar.add_task(job_id, total=1.0)
        while True:
            left = PROGRESS_POLL if deadline is None else deadline - time.monotonic()
            try:
                return client.result(job_id, timeout=max(0.0, min(PROGRESS_POLL, left)))
            except ResultTimeout:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
            try:
                info = client.job(job_id)
            except JobNotFound:  # a chain or group: no progress of its own
                continue
            note = f"{info.status} {info.progress_note}".strip()
            bar.update(task, completed=info.progress or 0.0, description=f"{job_id[:12]} {note}")
