"""Every time corral shows (``corral job``, ``corral jobs``, the
dashboard, ``corral events``) is shown whatever its value: a time past the
platform's time_t (one stored before the broker bounded delays: a
``Retry(delay=1e300)``), NaN or far in the past is written as seconds since
the epoch rather than raising OverflowError from ``time.localtime``."""

from __future__ import annotations

import math
import time

import pytest

from corral.broker import protocol as p
from corral.cliformat import human_job, when_text
from corral.dashboard.app import _when as dashboard_when
from corral.eventstail import line

ODD = [1e300, -1e300, math.inf, -math.inf, math.nan, 2.0**63]


@pytest.mark.parametrize("ts", ODD)
def test_a_time_past_any_clock_is_shown_as_seconds(ts: float) -> None:
    for text in (when_text(ts), dashboard_when(ts)):
        assert "since the epoch" in text, text


def test_a_usual_time_is_shown_as_a_date() -> None:
    now = 1_700_000_000.25
    assert when_text(now) == time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + ".250"
    assert when_text(None) == "-"


def test_corral_job_shows_a_job_whose_times_are_past_any_clock() -> None:
    tried = p.TryInfo(1, "w", "h", 1, 1e300, 1e300, p.ErrorInfo("Retry", "later"))
    info = p.JobInfo(
        "j1", "t.task", "default", "retrying", 1, 5, 0, 1.0, 1e300, 1e300, None, None, [tried]
    )  # fmt: skip
    text = human_job(info)
    assert "next run:    1e+300 seconds since the epoch" in text, text


def test_an_event_at_a_time_past_any_clock_is_shown() -> None:
    for at in (1e300, math.nan, "noon"):
        shown = line({"event": "job.retried", "at": at, "job_id": "j1"})
        assert "job.retried job_id=j1" in shown, shown
