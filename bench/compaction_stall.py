"""How long the broker's loop stalls while its log is compacted, at 10^6 live jobs.

The real :class:`~corral.broker.core.BrokerCore` (real log on disk, the
system clock, links that drop what would go to the sockets) is driven in
this process, one pass at a time, as the server's loop drives it:

1. ``--jobs`` live jobs are enqueued, 5,000 per pass;
2. ``--passes`` passes of ``--batch`` enqueues each, with a ``--gap`` between
   them (the loop's poll), give the pass time without a compaction;
3. a compaction is started in a pass (the core's own ``maybe_compact`` would
   wait for the log to be twice the live data; the bench starts it at once,
   right after the pass, where ``maybe_compact`` runs), then passes go on the
   same way until the broker has installed the new base: the seal (a new
   segment), the child's start, each pass's non-blocking poll and the
   switch are inside the timed passes;
4. with ``--sync``, the old way for comparison: ``Log.compact(state.snapshot())``
   in the loop's thread, timed as one stall.

Prints a markdown table, writes ``bench/results/compaction.json``. Not part
of ``make test``: it needs several GB of memory and a few minutes.

Usage: ``python bench/compaction_stall.py [--jobs 1000000] [--sync]``
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

from corral.broker import protocol as p
from corral.broker.core import CLIENT, BrokerCore
from corral.broker.jobspec import JobSpec
from corral.config import loads

RESULTS = Path(__file__).resolve().parent / "results"
BUILD_BATCH = 5_000


class Stopwatch:
    """Time spent in fdatasync/fsync and in the garbage collector, so that a
    long pass can be told apart: waiting for the disk, collecting, or the
    loop's own work."""

    def __init__(self) -> None:
        self.disk = 0.0
        self.gc = 0.0
        self._gc_started = 0.0
        for name in ("fdatasync", "fsync"):
            setattr(os, name, self._timed(getattr(os, name)))
        gc.callbacks.append(self._on_gc)

    def _timed(self, call: Any) -> Any:
        def timed(fd: int) -> None:
            started = time.perf_counter()
            try:
                call(fd)
            finally:
                self.disk += time.perf_counter() - started

        return timed

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.gc += time.perf_counter() - self._gc_started

    def take(self) -> tuple[float, float]:
        """(disk, gc) seconds since the last take."""
        taken = (self.disk, self.gc)
        self.disk = self.gc = 0.0
        return taken


WATCH = Stopwatch()


class Drop:
    """A link that sends nothing (no sockets in this bench)."""

    def send(self, identity: bytes, body: bytes) -> bool:
        return True

    def send_frames(self, identity: bytes, frames: tuple[bytes, ...]) -> bool:
        return True


def config(state: Path, fsync: str) -> Any:
    return loads(
        f"""
[broker]
state_dir = "{state}"
client_endpoint = "ipc://{state}/c.sock"
worker_endpoint = "ipc://{state}/w.sock"
fsync = "{fsync}"
"""
    )


def enqueue_frames(req: int, first: int, count: int) -> list[tuple[str, list[bytes]]]:
    payload = p.encode_value({"n": first})
    specs = [JobSpec(f"job-{first + i:08d}", "bench.noop", payload) for i in range(count)]
    return [(CLIENT, [b"bench", p.encode(p.Enqueue(req, specs))])]


class Pass(NamedTuple):
    """One pass, in seconds: its wall time, and of it the time in fsync and
    in the garbage collector, and the loop thread's CPU time (its own work:
    a pass can also be long because the machine gave it no CPU)."""

    wall: float
    fsync: float
    gc: float
    cpu: float

    def ms(self) -> dict[str, float]:
        return {name: round(value * 1000, 2) for name, value in self._asdict().items()}


def timed_pass(core: BrokerCore, inbound: list[tuple[str, list[bytes]]], then: Any = None) -> Pass:
    """Run one pass (and ``then()`` right after it, inside the timing)."""
    WATCH.take()
    started, cpu = time.perf_counter(), time.thread_time()
    core.run_pass(inbound)
    if then is not None:
        then()
    wall, cpu = time.perf_counter() - started, time.thread_time() - cpu
    return Pass(wall, *WATCH.take(), cpu)


def build(core: BrokerCore, jobs: int) -> float:
    started = time.perf_counter()
    for req, first in enumerate(range(0, jobs, BUILD_BATCH), 1):
        core.run_pass(enqueue_frames(req, first, min(BUILD_BATCH, jobs - first)))
        if req % 40 == 0:
            print(f"  {first + BUILD_BATCH:,} jobs", file=sys.stderr)
    return time.perf_counter() - started


def summary(passes: list[Pass]) -> dict[str, Any]:
    walls = sorted(p.wall * 1000 for p in passes)
    return {
        "passes": len(passes),
        "max_ms": round(walls[-1], 2),
        "p99_ms": round(walls[min(len(walls) - 1, int(len(walls) * 0.99))], 2),
        "median_ms": round(statistics.median(walls), 2),
        "max_cpu_ms": round(max(p.cpu for p in passes) * 1000, 2),
        "longest": max(passes).ms(),
        "longest_apart_from_gc": max(passes, key=lambda p: p.wall - p.gc).ms(),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="cb-compact-", dir="/tmp") as root:
        core = BrokerCore(config(Path(root), args.fsync))
        core.replay()
        core.attach(Drop(), Drop())
        print(f"building {args.jobs:,} live jobs ...", file=sys.stderr)
        build_s = build(core, args.jobs)
        log_bytes = core.log.stats()["used_bytes"]
        next_id = args.jobs
        req = 10**6

        def one_pass() -> Pass:
            nonlocal next_id, req
            req += 1
            seconds = timed_pass(core, enqueue_frames(req, next_id, args.batch))
            next_id += args.batch
            time.sleep(args.gap)
            return seconds

        print("passes without a compaction ...", file=sys.stderr)
        baseline = [one_pass() for _ in range(args.passes)]

        print("compacting ...", file=sys.stderr)
        compactor = core.compactor
        started = time.perf_counter()

        def start() -> None:
            if not compactor.start(core.clock.monotonic()):
                raise SystemExit("the compaction did not start: see the log above")

        req += 1
        during = [timed_pass(core, enqueue_frames(req, next_id, args.batch), then=start)]
        next_id += args.batch
        while compactor.running:
            during.append(one_pass())
        compaction_s = time.perf_counter() - started
        if core.stats["compactions"] != 1:
            raise SystemExit("the compaction failed: see the log above")
        result: dict[str, Any] = {
            "jobs": args.jobs,
            "fsync": args.fsync,
            "batch_per_pass": args.batch,
            "gap_s": args.gap,
            "build_s": round(build_s, 1),
            "log_bytes_before": log_bytes,
            "log_bytes_after": core.log.stats()["used_bytes"],
            "without_compaction": summary(baseline),
            "during_compaction": summary(during),
            "cut_pass": during[0].ms(),
            "switch_pass": during[-1].ms(),
            "compaction_s": round(compaction_s, 1),
            "load_average": os.getloadavg(),
        }
        if args.sync:
            print("the old way: compaction in the loop's thread ...", file=sys.stderr)
            t = time.perf_counter()
            core.log.compact(core.state.snapshot())
            result["sync_compaction_stall_s"] = round(time.perf_counter() - t, 2)
        core.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=10, help="enqueues per pass")
    parser.add_argument("--gap", type=float, default=0.002, help="seconds between passes")
    parser.add_argument("--passes", type=int, default=500, help="passes without compaction")
    parser.add_argument("--fsync", default="always")
    parser.add_argument("--sync", action="store_true", help="also time the old in-loop way")
    args = parser.parse_args()
    result = run(args)
    result["machine"] = {"python": platform.python_version(), "cpus": len(_cpus())}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "compaction.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{args.jobs:,} live jobs, {args.batch} enqueues per pass, fsync={args.fsync}\n")
    print("| passes | count | longest, ms | p99, ms | median, ms | most CPU in one, ms |")
    print("|---|---|---|---|---|---|")
    for name in ("without_compaction", "during_compaction"):
        s = result[name]
        print(
            f"| {name.replace('_', ' ')} | {s['passes']} | {s['max_ms']} | {s['p99_ms']} "
            f"| {s['median_ms']} | {s['max_cpu_ms']} |"
        )
    print("\n| pass | wall, ms | in fsync, ms | in GC, ms | CPU, ms |")
    print("|---|---|---|---|---|")
    quiet, busy = result["without_compaction"], result["during_compaction"]
    rows = [
        ("longest without compaction", quiet["longest"]),
        ("longest without compaction, GC apart", quiet["longest_apart_from_gc"]),
        ("longest during compaction", busy["longest"]),
        ("longest during compaction, GC apart", busy["longest_apart_from_gc"]),
        ("the cut (seal, child started)", result["cut_pass"]),
        ("the switch", result["switch_pass"]),
    ]
    for name, row in rows:
        print(f"| {name} | {row['wall']} | {row['fsync']} | {row['gc']} | {row['cpu']} |")
    print(
        f"\nthe compaction took {result['compaction_s']} s; log "
        f"{result['log_bytes_before']:,} -> {result['log_bytes_after']:,} bytes; "
        f"load average {result['load_average']}"
    )
    if "sync_compaction_stall_s" in result:
        print(f"the old in-loop compaction stalled the loop {result['sync_compaction_stall_s']} s")


def _cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
