"""`corral top`'s frame fits the terminal: at 80 columns no row wraps
(long names are cut with an ellipsis, the less important columns go), and a
wide terminal or a pipe shows every column. Rendered with rich's own
Console at a fixed width, from a status as the broker sends it."""

from __future__ import annotations

import io

import pytest
from rich.cells import cell_len
from rich.console import Console

from corral.broker import protocol as p
from corral.top import Rates, render

HOST = "worker-host-{}.eu-west-1.compute.example.internal"


def busy_status() -> p.StatusInfo:
    """Long host and queue names, big counts, a job per worker with progress."""
    workers = [
        p.WorkerInfo(
            worker_id=f"{HOST.format(i)}/default#{i}/{12345 + i}",
            host=HOST.format(i),
            pid=12345 + i,
            queues=["default", "emails"],
            concurrency=4,
            credit=1,
            running=[f"01a22ca0013eb22be35d97fdb58637d{i}", "01a22ca0013eb22be35d97fdb58637ff"],
            tasks=["shop.place_order"],
            last_seen_ago=0.1,
            processed=1_234_567,
            failed=12,
        )
        for i in range(3)
    ]
    supervisor = p.SupervisorInfo(
        supervisor_id="s",
        host=HOST.format(0),
        pid=1,
        pools=[
            p.PoolInfo(
                name="default",
                queues=["default", "emails", "emails-bulk"],
                processes=4,
                restarts=3,
                failed=True,
                state="backing off until 12:00:00",
            )
        ],
        workers=[
            p.ProcessInfo(pool="default", index=i, pid=12345 + i, rss=123_456_789, jobs=[],
                          uptime=1.0, cpu=1234.5)
            for i in range(3)
        ],
    )  # fmt: skip
    queues = {
        "default": {"queued": 1_234_567, "scheduled": 12, "running": 4, "retrying": 1,
                    "failed": 99_999, "succeeded": 10},
        "emails-bulk-for-the-spring-campaign-of-the-year": {"queued": 1},
    }  # fmt: skip
    return p.StatusInfo(
        queues=queues,
        workers=workers,
        stats={},
        supervisors=[supervisor],
        paused=["default"],
        latency={"default": 3725.0},
    )


def shown(width: int) -> list[str]:
    status = busy_status()
    progress = {w.running[0]: (0.5, "half way through the nightly batch") for w in status.workers}
    out = io.StringIO()
    console = Console(file=out, width=width, highlight=False, markup=False, emoji=False)
    console.print(render(status, progress, Rates(), width))
    return out.getvalue().splitlines()


def test_at_80_columns_no_line_is_longer_and_no_row_wraps() -> None:
    lines = shown(80)
    assert max(cell_len(line) for line in lines) <= 80
    for i in range(3):  # one line per worker, with what matters
        (row,) = [line for line in lines if f"default#{i}/{12345 + i}" in line]
        assert "50%" in row and "1.2M" in row, row
    (queue,) = [line for line in lines if "default" in line and "1.0h" in line]
    assert "1.2M" in queue and "paused" in queue, queue
    (long_queue,) = [line for line in lines if "emails-bulk" in line]
    assert "…" in long_queue
    (pool,) = [line for line in lines if "backing off" in line]
    assert " 4 " in pool and " 3 " in pool, pool
    # title, blank, header, rule, rows, blank: no line holds the rest of a cell
    assert len(lines) == sum((4 + rows + 1) for rows in (2, 3, 1)), "\n".join(lines)


def test_a_pipe_shows_every_column_in_full() -> None:
    text = "\n".join(shown(200))
    for column in ("sched", "retry", "fail/s", "paused", "restarts", "rss MiB", "cpu s"):
        assert column in text
    assert "emails-bulk-for-the-spring-campaign-of-the-year" in text
    assert f"{HOST.format(1)}/default#1/12346" in text
    assert "01a22ca0013eb22be35d97fdb58637d1 (+1)" in text
    assert "50% half way through the nightly batch" in text


@pytest.mark.parametrize("width", [100, 120, 160])
def test_between_the_two_names_are_cut_before_a_column_goes(width: int) -> None:
    lines = shown(width)
    assert max(cell_len(line) for line in lines) <= width
    assert len(lines) == sum((4 + rows + 1) for rows in (2, 3, 1)), "\n".join(lines)
    if width >= 120:
        text = "\n".join(lines)
        for column in ("fail/s", "paused", "restarts", "rss MiB", "cpu s"):
            assert column in text, text
