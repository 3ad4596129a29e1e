"""corral side by side with RQ, Dramatiq, Huey, Celery and arq (issue 15;
``make bench-peers``).

One run measures, on this machine and with the same N: corral (bench/run.py's
own scenarios, through its harness) and every peer (from their own venv,
``bench/.peers-venv``, against a local redis-server), for two matched
durabilities: corral ``fsync = "interval"`` against Redis ``appendfsync
everysec``, and ``"always"`` against ``always`` (AOF on, no RDB). The task is
a no-op; each peer's takes and returns a small int, corral's is
``demo.noop``, as in ``make bench``. The scenarios: one-at-a-time enqueue;
bulk enqueue (batches of 500 with each one's bulk call); the drain of N jobs
enqueued with no worker running, timed from the start of the worker command
(2 processes) until the peer's own state (corral: ``Client.status``) shows N
done; enqueue-to-result latency p50 and p99 through idle workers. References
from the same run: a raw pyzmq DEALER/ROUTER round trip over ipc (1 and 100
in flight), a 128-byte append + ``fdatasync``, corral's AsyncClient with 100
enqueues in flight, and CPU per job in corral's drain (from /proc).

Prints one table (each figure, each peer, the best peer, corral's ratio to
it, issue 15's target met or not) and the references, and writes every
repetition, the versions, the machine and the noise (other work's CPU use
and the hypervisor's steal during each measurement) to
``bench/results/peers-<timestamp>.json``. Without redis-server (and no way to
install it) or without the peers' venv it says why and measures corral alone.
See docs/PERFORMANCE.md, "Side by side with the peers (issue 15)".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent.parent
# bench/ first (harness, bench/run.py, the peers package), ahead of bench/peers/ itself
sys.path.insert(0, str(BENCH))

from harness import REPO, cpu_mark, machine, others_cores, wait_for_quiet  # noqa: E402

from peers import corral_side, report, services, sessions  # noqa: E402

RESULTS = REPO / "bench" / "results"
SCENARIOS = ("enqueue_one", "enqueue_bulk", "drain", "latency")


@dataclass(frozen=True)
class Sizes:
    """N of every figure (the same for corral and the peers)."""

    enqueue_one: int = 5_000
    warmup: int = 200
    bulk: int = 50_000
    batch: int = 500
    drain: int = 20_000
    latency: int = 2_000
    latency_warmup: int = 200
    raw: int = 20_000
    raw_warmup: int = 1_000
    fdatasync: int = 2_000
    async_many: int = 20_000


QUICK = Sizes(
    enqueue_one=300,
    warmup=30,
    bulk=2_000,
    drain=1_000,
    latency=100,
    latency_warmup=20,
    raw=2_000,
    raw_warmup=100,
    fdatasync=200,
    async_many=2_000,
)


#: --quick is a smoke run: RQ's forking worker drains a few dozen jobs/s on a busy machine.
QUICK_DRAIN_TIMEOUT = 30.0


@dataclass(frozen=True)
class Unit:
    """One measurement: ``kind`` ref, corral or peer; ``name``; fsync policy."""

    kind: str
    name: str
    durability: str

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.name}/{self.durability}"


def plan(peers: list[sessions.Peer], durabilities: list[str]) -> list[Unit]:
    units = [Unit("ref", "raw", "-"), Unit("ref", "fdatasync", "-")]
    if "interval" in durabilities:
        units.append(Unit("ref", "paired", "interval"))
    units.append(Unit("ref", "async100", "always"))
    for d in durabilities:
        units += [Unit("corral", s, d) for s in SCENARIOS]
    for peer in peers:
        units += [Unit("peer", peer.name, d) for d in durabilities]
    return units


class Bench:
    """Runs the units and files their figures in report.py's layout."""

    def __init__(
        self, sizes: Sizes, peers_python: Path | None, redis: Path | None, drain_timeout: float
    ) -> None:
        self.sizes = sizes
        self.drain_timeout = drain_timeout
        self.peers_python = peers_python
        self.redis = redis
        self.corral_sizes = corral_side.corral_sizes(
            sizes.enqueue_one, sizes.bulk, sizes.batch, sizes.drain, sizes.latency,
            sizes.latency_warmup,
        )  # fmt: skip
        self.ref_sizes = corral_side.RefSizes(
            sizes.raw, sizes.raw_warmup, sizes.fdatasync, sizes.async_many
        )
        self.figures: dict[str, Any] = {"reference": {}, "corral": {}, "peers": {}}

    def measure(self, unit: Unit) -> dict[str, dict[str, float]]:
        """{scenario: figures} of one unit."""
        if unit.kind == "ref":
            refs: dict[str, Callable[[], dict[str, float]]] = {
                "raw": lambda: corral_side.raw_round_trips(self.ref_sizes),
                "fdatasync": lambda: corral_side.fdatasync_rate(self.sizes.fdatasync),
                "paired": lambda: corral_side.corral_scenario(
                    "paired", unit.durability, self.corral_sizes
                ),
                "async100": lambda: corral_side.async_enqueue(
                    unit.durability, self.sizes.async_many
                ),
            }
            return {unit.name: refs[unit.name]()}
        if unit.kind == "corral":
            figures = corral_side.corral_scenario(unit.name, unit.durability, self.corral_sizes)
            return {unit.name: figures}
        assert self.peers_python is not None and self.redis is not None
        peer = next(p for p in sessions.PEERS if p.name == unit.name)
        run = sessions.PeerRun(
            peer,
            self.peers_python,
            self.redis,
            report.REDIS_FSYNC[unit.durability],
            self.drain_timeout,
        )
        return run.measure(
            sessions.PeerSizes(
                self.sizes.enqueue_one, self.sizes.warmup, self.sizes.bulk, self.sizes.batch,
                self.sizes.drain, self.sizes.latency, self.sizes.latency_warmup,
            )
        )  # fmt: skip

    def file(
        self, unit: Unit, results: dict[str, dict[str, float]], noise: dict[str, float]
    ) -> None:
        for scenario, figures in results.items():
            run = {**figures, **noise}
            if unit.kind == "ref":
                self.figures["reference"].setdefault(scenario, []).append(run)
            else:
                side = self.figures["corral"] if unit.kind == "corral" else (
                    self.figures["peers"].setdefault(unit.name, {})
                )  # fmt: skip
                side.setdefault(unit.durability, {}).setdefault(scenario, []).append(run)


def _peer_versions(python: Path) -> dict[str, str]:
    try:
        freeze = subprocess.run(
            [str(python), "-m", "pip", "freeze"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    pairs = (line.split("==", 1) for line in freeze.splitlines() if "==" in line)
    return {name: version for name, version in pairs}


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by None (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _peers_or_reason(args: argparse.Namespace) -> tuple[Path | None, Path | None, str | None]:
    if args.no_peers:
        return None, None, "--no-peers"
    redis = services.ensure_redis()
    if isinstance(redis, str):
        return None, None, redis
    python = services.ensure_venv()
    if isinstance(python, str):
        return None, None, f"the peers' venv could not be made: {python}"
    return python, redis, None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small N, one repetition (~2 min)")
    parser.add_argument("--reps", type=int, help="repetitions of every figure (default 3, quick 1)")
    parser.add_argument(
        "--peer",
        action="append",
        choices=[p.name for p in sessions.PEERS],
        help="measure only this peer (repeatable)",
    )
    parser.add_argument("--no-peers", action="store_true", help="measure corral alone")
    parser.add_argument(
        "--durability",
        action="append",
        choices=report.DURABILITIES,
        help="only this fsync policy (repeatable; default both)",
    )
    parser.add_argument(
        "--quiet-idle",
        type=float,
        default=0.0,
        help="before each measurement wait for the CPUs to be this idle (default 0: no wait)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        help="a peer's drain still running after this many s is cut short and its rate "
        f"so far reported, flagged partial (default {sessions.DRAIN_TIMEOUT:.0f}, quick "
        f"{QUICK_DRAIN_TIMEOUT:.0f})",
    )
    parser.add_argument("--quiet-wait", type=float, default=30.0, help="but at most this long (s)")
    parser.add_argument(
        "--out", type=Path, help="the JSON file (default bench/results/peers-<time>.json)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so every started process group is stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sizes = QUICK if args.quick else Sizes()
    reps = args.reps or (1 if args.quick else 3)
    durabilities = list(args.durability or report.DURABILITIES)
    python, redis, skipped = _peers_or_reason(args)
    if skipped:
        print(f"SKIPPING THE PEERS: {skipped}\nmeasuring corral alone.", file=sys.stderr)
    peers = [] if skipped else [p for p in sessions.PEERS if not args.peer or p.name in args.peer]
    units = plan(peers, durabilities)
    drain_timeout = args.drain_timeout or (
        QUICK_DRAIN_TIMEOUT if args.quick else sessions.DRAIN_TIMEOUT
    )
    bench = Bench(sizes, python, redis, drain_timeout)
    info = machine()
    print(f"machine: {info['nproc']} CPUs, load {info['loadavg_start']}; {len(units)} "
          f"measurements x {reps}", file=sys.stderr)  # fmt: skip
    started = time.time()
    errors: list[dict[str, str]] = []
    for rep in range(reps):
        # every other repetition backwards: load that comes and goes spreads over both sides
        for unit in units if rep % 2 == 0 else units[::-1]:
            idle = wait_for_quiet(args.quiet_idle, args.quiet_wait) if args.quiet_idle > 0 else 1.0
            t0, mark = time.perf_counter(), cpu_mark()
            try:
                results = bench.measure(unit)
            except Exception as exc:  # one peer failing does not lose the others
                print(f"[{rep + 1}/{reps}] {unit.key} FAILED: {exc}", file=sys.stderr)
                errors.append({"unit": unit.key, "rep": str(rep + 1), "error": str(exc)})
                continue
            busy, stolen = others_cores(mark)
            noise = {
                "others_cpus_during": round(busy, 2),
                "steal_cpus_during": round(stolen, 3),
                "idle_before": round(idle, 2),
                "unit_seconds": round(time.perf_counter() - t0, 1),
                "loadavg_1m_after": round(os.getloadavg()[0], 2),
            }
            bench.file(unit, results, noise)
            shown = "; ".join(
                f"{s}: " + ", ".join(f"{k}={v:,.2f}" for k, v in list(f.items())[:3])
                for s, f in results.items()
            )
            print(f"[{rep + 1}/{reps}] {unit.key}: {shown} ({noise['unit_seconds']}s, other work "
                  f"{busy:.2f} CPUs, steal {stolen:.2f})", file=sys.stderr)  # fmt: skip
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    text = report.table(bench.figures)
    refs = report.references_table(bench.figures)
    noise_text = report.noise_table(bench.figures)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
    out = args.out or RESULTS / f"peers-{stamp}.json"
    result = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "reps": reps,
        "quick": args.quick,
        "sizes": asdict(sizes),
        "drain_timeout_s": drain_timeout,
        "peers_skipped": skipped,
        "peers": {
            p.name: {"module": p.module, "workers": p.workers, "latency_env": p.latency_env}
            for p in peers
        },
        "redis": {
            "version": services.redis_version(redis) if redis else None,
            "config": "appendonly yes, appendfsync everysec|always, save '', loopback TCP",
        },
        "peer_versions": _peer_versions(python) if python else {},
        "machine": info,
        "figures": bench.figures,
        "targets": [asdict(t) for t in report.targets(bench.figures)],
        "errors": errors,
        "table": text,
        "references": refs,
        "noise": noise_text,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_finite(result), indent=2, allow_nan=False) + "\n")
    print(text)
    print()
    print(refs)
    print()
    print(noise_text)
    print(f"\nwrote {out}", file=sys.stderr)
    for line in failures(errors):
        print(line, file=sys.stderr)
    return exit_code(errors)


def failures(errors: list[dict[str, str]]) -> list[str]:
    """The measurements that failed, a line each (their figures are the
    medians of the repetitions that did not)."""
    return [f"failed: {e['unit']} (repetition {e['rep']}): {e['error'][:300]}" for e in errors]


def exit_code(errors: list[dict[str, str]]) -> int:
    """1 if a measurement of corral or of a reference failed (the verdict
    lacks what it is judged on), else 0: a peer failing a repetition (a
    Celery result that timed out) is listed, not a failed run."""
    return 1 if any(not e["unit"].startswith("peer/") for e in errors) else 0


if __name__ == "__main__":
    sys.exit(main())
