"""The side-by-side table of bench/peers/run.py: medians, ratios to the best
peer, and issue 15's targets, from the raw figures alone (no processes, no
Redis, so tests can feed it canned figures).

The figures come in one nested dict, every repetition kept::

    {"reference": {"raw": [run, ...], "fdatasync": [...], "paired": [...],
                   "async100": [...]},
     "corral": {"interval": {"enqueue_one": [run, ...], "enqueue_bulk": [...],
                             "drain": [...], "latency": [...]},
                "always": {...}},
     "peers": {"Huey": {"interval": {...}, "always": {...}}, ...}}

where a run is a dict of named numbers (``rate`` in jobs/s, ``p50_ms``,
``broker_cpu_us_per_job``, ...). A ratio is always "how many times better
corral is": corral / best peer for a rate, best peer / corral for a latency,
so above 1 means corral is ahead.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Run = dict[str, float]
Figures = dict[str, Any]

DURABILITIES = ("interval", "always")
#: corral's fsync policy -> the Redis AOF setting it is matched with.
REDIS_FSYNC = {"interval": "everysec", "always": "always"}
PEER_ORDER = ("RQ SimpleWorker", "RQ Worker (fork)", "Dramatiq", "Huey", "Celery", "arq")


@dataclass(frozen=True)
class Row:
    """One figure of the table: ``scenario`` and ``key`` name it in a run."""

    label: str
    scenario: str
    key: str
    durability: str
    higher_is_better: bool
    digits: int = 0


def rows() -> list[Row]:
    """The figures measured for corral and for every peer, in table order."""
    out: list[Row] = []
    for durability in DURABILITIES:
        pair = f"{durability}/{REDIS_FSYNC[durability]}"
        out += [
            Row(f"one-at-a-time enqueue, jobs/s, {pair}", "enqueue_one", "rate", durability, True),
            Row(f"bulk enqueue, jobs/s, {pair}", "enqueue_bulk", "rate", durability, True),
            Row(
                f"drain, jobs/s from the workers' start, {pair}", "drain", "rate", durability, True
            ),
            Row(f"latency p50, ms, {pair}", "latency", "p50_ms", durability, False, 2),
            Row(f"latency p99, ms, {pair}", "latency", "p99_ms", durability, False, 2),
        ]
    return out


def median_run(runs: list[Run]) -> Run:
    """The median of each key over the repetitions (NaNs left out)."""
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run if k not in keys]
    out: Run = {}
    for key in keys:
        values = [
            float(r[key]) for r in runs if isinstance(r.get(key), int | float) and _finite(r[key])
        ]
        out[key] = statistics.median(values) if values else math.nan
    return out


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def corral_value(figures: Figures, scenario: str, durability: str, key: str) -> float:
    runs = figures.get("corral", {}).get(durability, {}).get(scenario, [])
    return median_run(runs).get(key, math.nan) if runs else math.nan


def peer_values(figures: Figures, row: Row) -> dict[str, float]:
    """Each peer's median for ``row`` (peers without it left out)."""
    out: dict[str, float] = {}
    for peer, by_durability in figures.get("peers", {}).items():
        runs = by_durability.get(row.durability, {}).get(row.scenario, [])
        value = median_run(runs).get(row.key, math.nan) if runs else math.nan
        if _finite(value):
            out[peer] = value
    return out


def partial_peers(figures: Figures, row: Row) -> set[str]:
    """Peers with a drain of ``row`` cut short in some repetition (its rate is
    that of the jobs done by the deadline)."""
    out: set[str] = set()
    for peer, by_durability in figures.get("peers", {}).items():
        runs = by_durability.get(row.durability, {}).get(row.scenario, [])
        if any(run.get("partial") for run in runs):
            out.add(peer)
    return out


def best_peer(values: dict[str, float], higher_is_better: bool) -> tuple[str, float] | None:
    """The best peer's name and value, or None without peers."""
    if not values:
        return None
    pick = max if higher_is_better else min
    name = pick(values, key=lambda peer: values[peer])
    return name, values[name]


def ratio(corral: float, best: float, higher_is_better: bool) -> float:
    """How many times better corral is than ``best`` (NaN when either is missing)."""
    if not (_finite(corral) and _finite(best)) or corral <= 0 or best <= 0:
        return math.nan
    return corral / best if higher_is_better else best / corral


def reference(figures: Figures, name: str, key: str) -> float:
    runs = figures.get("reference", {}).get(name, [])
    return median_run(runs).get(key, math.nan) if runs else math.nan


# ------------------------------------------------------------------ targets


@dataclass(frozen=True)
class Target:
    """One of issue 15's targets: ``value`` against ``goal`` (both ratios or µs)."""

    label: str
    goal: str
    value: float
    met: bool | None  # None: not measured (e.g. no peers)
    shown: str
    scenario: str = ""
    durability: str = ""


def _row_ratio(figures: Figures, scenario: str, durability: str, key: str, higher: bool) -> float:
    row = Row("", scenario, key, durability, higher)
    best = best_peer(peer_values(figures, row), higher)
    if best is None:
        return math.nan
    return ratio(corral_value(figures, scenario, durability, key), best[1], higher)


def _check(value: float, ok: Callable[[float], bool]) -> bool | None:
    return ok(value) if _finite(value) else None


def _x(value: float) -> str:
    return f"{value:.2f}x" if _finite(value) else "n/a"


def targets(figures: Figures) -> list[Target]:
    """Issue 15's targets, each with its measured ratio and verdict."""
    out: list[Target] = []
    for d in DURABILITIES:
        r = _row_ratio(figures, "enqueue_one", d, "rate", True)
        out.append(
            Target(
                f"one-at-a-time enqueue, {d}: vs the best peer",
                "≥ 1.2x the best peer",
                r,
                _check(r, lambda v: v >= 1.2),
                _x(r),
                "enqueue_one",
                d,
            )
        )
    one = corral_value(figures, "enqueue_one", "interval", "rate")
    raw = reference(figures, "raw", "rate")
    r = one / raw if _finite(one) and _finite(raw) and raw > 0 else math.nan
    out.append(
        Target(
            "one-at-a-time enqueue, interval: vs the raw pyzmq round trip",
            "≥ 0.85x raw (1 in flight)",
            r,
            _check(r, lambda v: v >= 0.85),
            f"{_x(r)} ({one:,.0f} vs {raw:,.0f}/s)" if _finite(r) else "n/a",
            "enqueue_one",
            "interval",
        )
    )
    paired = reference(figures, "paired", "ratio")
    if _finite(paired):
        out.append(
            Target(
                "the same in alternating blocks (bench/run.py's paired figure)",
                "≥ 0.85x raw",
                paired,
                _check(paired, lambda v: v >= 0.85),
                _x(paired),
            )
        )
    many = reference(figures, "async100", "rate")
    raw100 = reference(figures, "raw", "rate_100")
    r = many / raw100 if _finite(many) and _finite(raw100) and raw100 > 0 else math.nan
    out.append(
        Target(
            "AsyncClient enqueue, 100 in flight, always: vs raw pyzmq with 100 in flight",
            "≥ 0.5x raw (100 in flight)",
            r,
            _check(r, lambda v: v >= 0.5),
            f"{_x(r)} ({many:,.0f} vs {raw100:,.0f}/s)" if _finite(r) else "n/a",
        )
    )
    for d in DURABILITIES:
        r = _row_ratio(figures, "drain", d, "rate", True)
        out.append(
            Target(
                f"drain, 2 processes, {d}: vs the best peer",
                "≥ 3x the best peer",
                r,
                _check(r, lambda v: v >= 3.0),
                _x(r),
                "drain",
                d,
            )
        )
    p50 = corral_value(figures, "latency", "interval", "p50_ms")
    raw_p50_ms = reference(figures, "raw", "p50_us") / 1000
    r = p50 / raw_p50_ms if _finite(p50) and _finite(raw_p50_ms) and raw_p50_ms > 0 else math.nan
    out.append(
        Target(
            "latency p50, interval: vs the raw round trip's p50",
            "≤ 3x raw p50",
            r,
            _check(r, lambda v: v <= 3.0),
            f"{_x(r)} ({p50:.3f} vs {raw_p50_ms:.3f} ms)" if _finite(r) else "n/a",
            "latency",
            "interval",
        )
    )
    always = corral_value(figures, "latency", "always", "p50_ms")
    r = always / p50 if _finite(always) and _finite(p50) and p50 > 0 else math.nan
    out.append(
        Target(
            "latency p50, always: vs corral's own p50 with interval",
            "≤ 2x corral interval",
            r,
            _check(r, lambda v: v <= 2.0),
            f"{_x(r)} ({always:.3f} vs {p50:.3f} ms)" if _finite(r) else "n/a",
            "latency",
            "always",
        )
    )
    for d in DURABILITIES:
        for who, key in (("broker", "broker_cpu_us_per_job"), ("worker", "workers_cpu_us_per_job")):
            us = corral_value(figures, "drain", d, key)
            out.append(
                Target(
                    f"CPU per no-op job during the drain, {d}: {who}",
                    "≤ 20 µs",
                    us,
                    _check(us, lambda v: v <= 20.0),
                    f"{us:.1f} µs" if _finite(us) else "n/a",
                )
            )
    return out


# -------------------------------------------------------------------- table


def _num(value: float, digits: int) -> str:
    return f"{value:,.{digits}f}" if _finite(value) else "n/a"


def _verdict(met: bool | None) -> str:
    return {True: "met", False: "**not met**", None: "n/a"}[met]


def _targets_for(found: list[Target], scenario: str, durability: str) -> str:
    matched = [t for t in found if t.scenario == scenario and t.durability == durability]
    return "; ".join(f"{t.goal}: {_verdict(t.met)} ({t.shown})" for t in matched)


def peers_in(figures: Figures) -> list[str]:
    """The peers measured, in the usual order (others after)."""
    names = list(figures.get("peers", {}))
    return [p for p in PEER_ORDER if p in names] + [p for p in names if p not in PEER_ORDER]


def table(figures: Figures) -> str:
    """The one markdown table: every figure for corral and each peer, the best
    peer, corral's ratio to it, and the issue's target where it has one."""
    peers = peers_in(figures)
    found = targets(figures)
    head = ["figure", "corral", *peers, "best peer", "ratio", "target"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    footnote = False
    for row in rows():
        mine = corral_value(figures, row.scenario, row.durability, row.key)
        values = peer_values(figures, row)
        if not values and not _finite(mine):
            continue  # not measured in this run (e.g. --durability)
        best = best_peer(values, row.higher_is_better)
        cells = [row.label, _num(mine, row.digits)]
        cut = partial_peers(figures, row)
        cells += [_num(values.get(p, math.nan), row.digits) + ("*" * (p in cut)) for p in peers]
        footnote = footnote or bool(cut)
        if best is None:
            cells += ["n/a", "n/a"]
        else:
            r = ratio(mine, best[1], row.higher_is_better)
            cells += [f"{best[0]} {_num(best[1], row.digits)}", _x(r)]
        # p99 has no target of its own (the latency targets are on p50's row)
        cells.append(
            "" if row.key == "p99_ms" else _targets_for(found, row.scenario, row.durability)
        )
        lines.append("| " + " | ".join(cells) + " |")
    blank = [""] * len(peers)
    for other in found:
        if other.scenario or other.met is None:
            continue  # shown on its figure's row above, or not measured
        goal = f"{other.goal}: {_verdict(other.met)}"
        lines.append("| " + " | ".join([other.label, other.shown, *blank, "", "", goal]) + " |")
    if footnote:
        lines += ["", "\\* drain cut short by --drain-timeout: the rate of the jobs done by then."]
    return "\n".join(lines)


def references_table(figures: Figures) -> str:
    """The reference figures of the run (no broker, no peer)."""
    items = [
        ("raw pyzmq DEALER/ROUTER round trip, ipc, 1 in flight, msgs/s", "raw", "rate", 0),
        ("raw round trip p50, µs", "raw", "p50_us", 1),
        ("raw round trip, 100 in flight, msgs/s", "raw", "rate_100", 0),
        ("fdatasync of a 128-byte append, per second", "fdatasync", "rate", 0),
        ("fdatasync of a 128-byte append, p50 µs", "fdatasync", "p50_us", 0),
        ("corral enqueue / raw round trip, alternating blocks (interval)", "paired", "ratio", 2),
        ("corral AsyncClient enqueue, 100 in flight, always, jobs/s", "async100", "rate", 0),
    ]
    lines = ["| reference | median |", "|---|---|"]
    for label, name, key, digits in items:
        lines.append(f"| {label} | {_num(reference(figures, name, key), digits)} |")
    for d in DURABILITIES:
        for label, key, digits in (
            ("corral drain, broker CPU µs per job", "broker_cpu_us_per_job", 1),
            ("corral drain, workers' CPU µs per job", "workers_cpu_us_per_job", 1),
            ("corral drain, jobs/s after both workers registered", "rate_after_ready", 0),
        ):
            value = corral_value(figures, "drain", d, key)
            lines.append(f"| {label}, {d} | {_num(value, digits)} |")
    return "\n".join(lines)


def noise_table(figures: Figures) -> str:
    """How busy the machine was while each side was measured: CPUs used by
    other work and stolen by the hypervisor (medians over the repetitions; a
    peer's four scenarios are one measurement, corral's are four)."""
    lines = [
        "| measured | durability | other work, CPUs | hypervisor steal, CPUs |",
        "|---|---|---|---|",
    ]

    def add(name: str, durability: str, runs: list[Run]) -> None:
        if not runs:
            return
        m = median_run(runs)
        others, steal = m.get("others_cpus_during", math.nan), m.get("steal_cpus_during", math.nan)
        lines.append(f"| {name} | {durability} | {_num(others, 2)} | {_num(steal, 2)} |")

    for name, runs in figures.get("reference", {}).items():
        add(f"reference: {name}", "", runs)
    for d in DURABILITIES:
        for scenario, runs in figures.get("corral", {}).get(d, {}).items():
            add(f"corral {scenario}", d, runs)
    for peer in peers_in(figures):
        for d in DURABILITIES:
            runs = figures["peers"][peer].get(d, {}).get("enqueue_one", [])
            add(peer, d, runs)
    return "\n".join(lines)
