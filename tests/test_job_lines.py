"""The worker's lines per job (corral.logs.job_line) go through one bound
logger per structlog configuration: built once, and built again whenever
the configuration changes (corral's own set-up again, structlog's defaults
between tests, ``capture_logs``). In process, no daemon."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import structlog
from structlog.testing import capture_logs

from corral import logs


@pytest.fixture(autouse=True)
def _as_it_was(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``configure`` sets the jobs' level and binds role and pid: undone."""
    monkeypatch.setattr(logs, "_job_level", logs._job_level)
    yield
    structlog.contextvars.clear_contextvars()


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_the_job_logger_is_built_once_per_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr("sys.stderr", first)
    logs.configure("worker", fmt="json")
    logs.job_line("job.received", job_id="j1", task="t.a", attempt=1)
    assert logs._job_logger() is logs._job_logger()
    # configured again (another stream, jobs at debug under an info log): the new set-up rules
    monkeypatch.setattr("sys.stderr", second)
    logs.configure("worker", fmt="json", jobs="debug")
    logs.job_line("job.received", job_id="j2", task="t.a", attempt=1)
    logs.configure("worker", fmt="json")
    logs.job_line("job.succeeded", job_id="j3", task="t.a", attempt=1, seconds=0.5)
    logs.job_line("job.failed", failed=True, job_id="j4", task="t.a", attempt=2)
    assert [(x["event"], x["job_id"], x["level"]) for x in _lines(first)] == [
        ("job.received", "j1", "info")
    ]
    assert [(x["event"], x["job_id"], x["level"]) for x in _lines(second)] == [
        ("job.succeeded", "j3", "info"),
        ("job.failed", "j4", "warning"),
    ]
    assert all(x["role"] == "worker" and "timestamp" in x for x in _lines(second))


def test_lines_follow_structlog_reset_and_capture_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stderr", io.StringIO())
    logs.configure("worker", fmt="json")
    logs.job_line("job.received", job_id="j1", task="t.a", attempt=1)
    structlog.reset_defaults()
    with capture_logs() as captured:
        logs.job_line("job.received", job_id="j2", task="t.a", attempt=1)
    assert [(x["event"], x["job_id"]) for x in captured] == [("job.received", "j2")]
    logs.configure("worker", fmt="json", jobs="off")
    with capture_logs() as captured:
        logs.job_line("job.received", job_id="j3", task="t.a", attempt=1)
    assert captured == []


class _Opaque:
    def __repr__(self) -> str:
        return "<opaque>"


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("plain", "plain"),
        ("naïve ✓", "naïve ✓"),
        (_Opaque(), "<opaque>"),
        ({1: "one"}, {"1": "one"}),
        ({(1, 2): "pair"}, {"(1, 2)": "pair"}),
        # what msgspec refuses whole still makes a line, as json.dumps shows it
        ("\ud800 lone", "\ud800 lone"),
        (2**70, 2**70),
        ({("a",): "\ud800"}, None),
    ],
)
def test_every_value_makes_one_valid_json_line(
    monkeypatch: pytest.MonkeyPatch, value: object, shown: object
) -> None:
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    logs.configure("worker", fmt="json")
    structlog.get_logger().info("odd.value", value=value, job_id="j1")
    (line,) = _lines(stream)
    assert line["event"] == "odd.value" and line["job_id"] == "j1" and line["role"] == "worker"
    if shown is None:  # neither encoder renders it: its repr() stands in
        assert line["value"] == repr(value)
    else:
        assert line["value"] == shown


def test_each_line_is_stamped_in_utc_iso_8601_with_microseconds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The stamp as structlog's ISO TimeStamper writes it (always with the
    fraction), right across whole seconds, though the text up to the
    seconds is made once a second."""
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    logs.configure("worker", fmt="json")
    readings = iter([1_764_547_199.999999, 1_764_547_200.0, 1_764_547_200.25, 1_764_547_261.5])
    monkeypatch.setattr(logs.time, "time", lambda: next(readings))
    for n in range(4):
        logs.job_line("job.received", job_id=f"j{n}", task="t.a", attempt=1)
    assert [x["timestamp"] for x in _lines(stream)] == [
        "2025-11-30T23:59:59.999999Z",
        "2025-12-01T00:00:00.000000Z",
        "2025-12-01T00:00:00.250000Z",
        "2025-12-01T00:01:01.500000Z",
    ]
    monkeypatch.undo()
    before = datetime.now(UTC)
    stamped = logs.iso_timestamp(None, "info", {})["timestamp"]
    after = datetime.now(UTC)
    assert before <= datetime.fromisoformat(stamped) <= after
