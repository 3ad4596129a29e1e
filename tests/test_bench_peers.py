"""bench/peers (``make bench-peers``): the table, ratios and targets on canned
figures, the driver's loops on an in-process adapter, and that the script
starts. Nothing here needs Redis, the peers' venv or the network."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.append(str(BENCH))  # after everything else: shadows nothing

from peers import driver, report, run  # noqa: E402


def _peer(interval: dict[str, dict[str, float]], always: dict[str, dict[str, float]]) -> Any:
    return {
        "interval": {k: [v] for k, v in interval.items()},
        "always": {k: [v] for k, v in always.items()},
    }


def canned() -> dict[str, Any]:
    """Figures shaped like issue 15's own table (medians of three runs for corral)."""
    corral = {
        "interval": {
            "enqueue_one": [{"rate": 8_000.0}, {"rate": 8_500.0}, {"rate": 9_000.0}],
            "enqueue_bulk": [{"rate": 40_000.0}],
            "drain": [
                {
                    "rate": 15_300.0,
                    "broker_cpu_us_per_job": 36.0,
                    "workers_cpu_us_per_job": 50.0,
                    "rate_after_ready": 18_000.0,
                }
            ],
            "latency": [{"p50_ms": 0.33, "p99_ms": 1.0}],
        },
        "always": {
            "enqueue_one": [{"rate": 3_800.0}],
            "enqueue_bulk": [{"rate": 38_000.0}],
            "drain": [
                {"rate": 13_900.0, "broker_cpu_us_per_job": 19.0, "workers_cpu_us_per_job": 21.0}
            ],
            "latency": [{"p50_ms": 0.59, "p99_ms": 2.0}],
        },
    }
    huey = _peer(
        {
            "enqueue_one": {"rate": 11_200.0},
            "enqueue_bulk": {"rate": 20_000.0},
            "drain": {"rate": 7_400.0},
            "latency": {"p50_ms": 0.50, "p99_ms": 3.0},
        },
        {
            "enqueue_one": {"rate": 4_100.0},
            "enqueue_bulk": {"rate": 9_000.0},
            "drain": {"rate": 4_000.0},
            "latency": {"p50_ms": 1.25, "p99_ms": 4.0},
        },
    )
    dramatiq = _peer(
        {
            "enqueue_one": {"rate": 5_000.0},
            "drain": {"rate": 5_000.0},
            "latency": {"p50_ms": 2.0, "p99_ms": 9.0},
        },
        {"enqueue_one": {"rate": 3_000.0}, "drain": {"rate": 4_300.0}},
    )
    return {
        "reference": {
            "raw": [{"rate": 12_500.0, "p50_us": 73.5, "rate_100": 112_000.0}],
            "paired": [{"ratio": 0.68}],
            "async100": [{"rate": 60_000.0}],
            "fdatasync": [{"rate": 7_900.0}],
        },
        "corral": corral,
        "peers": {"Huey": huey, "Dramatiq": dramatiq},
    }


def by_label(found: list[report.Target]) -> dict[str, report.Target]:
    return {t.label: t for t in found}


def test_ratios_favour_corral_above_one_for_rates_and_latencies() -> None:
    assert report.ratio(15_300, 7_400, higher_is_better=True) == pytest.approx(2.068, abs=1e-3)
    assert report.ratio(0.33, 0.50, higher_is_better=False) == pytest.approx(1.515, abs=1e-3)
    assert math.isnan(report.ratio(math.nan, 1.0, higher_is_better=True))
    assert math.isnan(report.ratio(1.0, 0.0, higher_is_better=True))


def test_best_peer_is_the_fastest_rate_or_the_lowest_latency() -> None:
    figures = canned()
    rates = report.peer_values(figures, report.Row("", "drain", "rate", "always", True))
    assert report.best_peer(rates, higher_is_better=True) == ("Dramatiq", 4_300.0)
    p50 = report.peer_values(figures, report.Row("", "latency", "p50_ms", "always", False))
    assert p50 == {"Huey": 1.25}  # Dramatiq has no latency with always: left out
    assert report.best_peer(p50, higher_is_better=False) == ("Huey", 1.25)
    assert report.best_peer({}, higher_is_better=True) is None


def test_medians_skip_missing_and_nan_values() -> None:
    runs = [{"rate": 1.0, "p50": math.nan}, {"rate": 3.0}, {"rate": 2.0, "p50": 5.0}]
    assert report.median_run(runs) == {"rate": 2.0, "p50": 5.0}
    assert math.isnan(report.median_run([{"x": math.nan}])["x"])


def test_targets_on_the_issues_own_figures() -> None:
    found = by_label(report.targets(canned()))
    one = found["one-at-a-time enqueue, interval: vs the best peer"]
    assert one.value == pytest.approx(8_500 / 11_200)
    assert one.met is False
    raw = found["one-at-a-time enqueue, interval: vs the raw pyzmq round trip"]
    assert raw.value == pytest.approx(8_500 / 12_500) and raw.met is False
    drain_always = found["drain, 2 processes, always: vs the best peer"]
    assert drain_always.value == pytest.approx(13_900 / 4_300) and drain_always.met is True
    assert found["drain, 2 processes, interval: vs the best peer"].met is False
    many = found["AsyncClient enqueue, 100 in flight, always: vs raw pyzmq with 100 in flight"]
    assert many.value == pytest.approx(60_000 / 112_000) and many.met is True
    p50 = found["latency p50, interval: vs the raw round trip's p50"]
    assert p50.value == pytest.approx(0.33 / 0.0735) and p50.met is False
    always = found["latency p50, always: vs corral's own p50 with interval"]
    assert always.value == pytest.approx(0.59 / 0.33) and always.met is True
    assert found["CPU per no-op job during the drain, always: broker"].met is True
    assert found["CPU per no-op job during the drain, always: worker"].met is False


def test_targets_without_peers_are_not_measured_rather_than_failed() -> None:
    figures = canned()
    figures["peers"] = {}
    found = by_label(report.targets(figures))
    assert found["one-at-a-time enqueue, always: vs the best peer"].met is None
    assert found["drain, 2 processes, interval: vs the best peer"].met is None
    assert found["latency p50, always: vs corral's own p50 with interval"].met is True


def test_the_table_has_every_peer_the_best_one_and_the_verdicts() -> None:
    text = report.table(canned())
    lines = text.splitlines()
    assert lines[0] == "| figure | corral | Dramatiq | Huey | best peer | ratio | target |"
    drain = next(
        line for line in lines if line.startswith("| drain, jobs/s from the workers' start, always")
    )
    assert "| 13,900 | 4,300 | 4,000 | Dramatiq 4,300 | 3.23x |" in drain
    assert "≥ 3x the best peer: met" in drain
    one = next(
        line for line in lines if line.startswith("| one-at-a-time enqueue, jobs/s, interval")
    )
    assert "**not met** (0.76x)" in one and "≥ 0.85x raw (1 in flight): **not met**" in one
    latency = next(line for line in lines if line.startswith("| latency p50, ms, interval"))
    assert "Huey 0.50 | 1.52x |" in latency
    assert any(
        line.startswith("| CPU per no-op job during the drain, always: worker") for line in lines
    )
    # every line has the same number of cells
    assert len({line.count("|") for line in lines}) == 1


def test_rows_nothing_measured_are_left_out() -> None:
    figures = canned()
    del figures["corral"]["always"]
    figures["peers"] = {"Huey": {"interval": figures["peers"]["Huey"]["interval"]}}
    text = report.table(figures)
    assert "always/always" not in text
    assert "interval/everysec" in text
    assert "always: broker" not in text  # its target had nothing to judge


class SyncAdapter:
    def __init__(self) -> None:
        self.queued: list[int] = []
        self.finished = 0

    def enqueue(self, x: int) -> None:
        self.queued.append(x)

    def enqueue_bulk(self, xs: list[int]) -> None:
        self.queued += xs

    def call(self, x: int, timeout: float) -> int:
        return x

    def done(self) -> int:
        self.finished = min(len(self.queued), self.finished + 40)  # a worker at work
        return self.finished

    def flush(self) -> None:
        self.queued.clear()
        self.finished = 0


class AsyncAdapter(SyncAdapter):
    async def enqueue(self, x: int) -> None:  # type: ignore[override]
        await asyncio.sleep(0)
        super().enqueue(x)

    async def call(self, x: int, timeout: float) -> int:  # type: ignore[override]
        return x


@pytest.mark.parametrize("adapter_type", [SyncAdapter, AsyncAdapter])
def test_the_driver_runs_each_command_on_sync_and_async_adapters(adapter_type: type) -> None:
    adapter = adapter_type()
    d = driver.Driver(adapter)

    async def session() -> dict[str, dict[str, float]]:
        out = {"one": await d.handle({"op": "enqueue_one", "n": 50, "warmup": 5})}
        out["bulk"] = await d.handle({"op": "enqueue_bulk", "n": 100, "batch": 20})
        await d.handle({"op": "flush"})
        out["fill"] = await d.handle({"op": "fill", "n": 90, "batch": 40})
        out["wait"] = await d.handle({"op": "wait_done", "n": 90, "timeout": 30, "poll": 0.001})
        out["latency"] = await d.handle({"op": "latency", "n": 30, "warmup": 3})
        return out

    out = asyncio.run(session())
    assert out["one"]["rate"] > 0 and out["one"]["p50_us"] <= out["one"]["p99_us"]
    assert out["bulk"]["rate"] > 0
    assert out["fill"]["done"] <= 90
    assert len(adapter.queued) == 90
    assert out["wait"]["done"] >= 90 and out["wait"]["done_at"] >= out["wait"]["first_at"]
    assert out["latency"]["p50_ms"] <= out["latency"]["max_ms"]


def test_the_driver_names_an_unknown_command() -> None:
    with pytest.raises(ValueError, match="unknown op 'nope'"):
        asyncio.run(driver.Driver(SyncAdapter()).handle({"op": "nope"}))


def test_run_py_help_works_without_redis_or_the_peers_venv() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / "peers" / "run.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    for option in ("--quick", "--reps", "--peer", "--no-peers", "--durability"):
        assert option in done.stdout


def test_a_drain_cut_short_is_marked() -> None:
    figures = canned()
    figures["peers"]["Huey"]["always"]["drain"] = [{"rate": 4_000.0, "partial": 1.0, "done": 9.0}]
    text = report.table(figures)
    drain = next(line for line in text.splitlines() if "start, always" in line)
    assert "| 4,000* |" in drain
    assert text.endswith("the rate of the jobs done by then.")


def test_the_noise_table_shows_each_measurement() -> None:
    figures = canned()
    figures["corral"]["interval"]["drain"][0]["others_cpus_during"] = 1.5
    figures["peers"]["Huey"]["interval"]["enqueue_one"][0].update(
        others_cpus_during=0.2, steal_cpus_during=0.05
    )
    text = report.noise_table(figures)
    assert "| corral drain | interval | 1.50 | n/a |" in text
    assert "| Huey | interval | 0.20 | 0.05 |" in text


def test_a_peer_failing_a_repetition_is_listed_and_fails_nothing() -> None:
    """A run whose Celery repetition timed out still ends 0, the failure
    listed; one that lost a figure of corral or a reference ends 1."""
    peer = {"unit": "peer/Celery/interval", "rep": "2", "error": "TimeoutError: timed out"}
    mine = {"unit": "corral/drain/always", "rep": "1", "error": "no answer"}
    ref = {"unit": "ref/raw/-", "rep": "3", "error": "boom"}
    assert run.exit_code([]) == 0
    assert run.exit_code([peer]) == 0
    assert run.exit_code([peer, mine]) == 1
    assert run.exit_code([ref]) == 1
    assert run.failures([peer]) == [
        "failed: peer/Celery/interval (repetition 2): TimeoutError: timed out"
    ]
