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
from typing import Any

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


Pass = tuple[float, float, float]  # seconds: the whole pass, in fsync, in GC


def timed_pass(core: BrokerCore, inbound: list[tuple[str, list[bytes]]]) -> Pass:
    WATCH.take()
    started = time.perf_counter()
    core.run_pass(inbound)
    return (time.perf_counter() - started, *WATCH.take())


def build(core: BrokerCore, jobs: int) -> float:
    started = time.perf_counter()
    for req, first in enumerate(range(0, jobs, BUILD_BATCH), 1):
        core.run_pass(enqueue_frames(req, first, min(BUILD_BATCH, jobs - first)))
        if req % 40 == 0:
            print(f"  {first + BUILD_BATCH:,} jobs", file=sys.stderr)
    return time.perf_counter() - started


def summary(passes: list[Pass]) -> dict[str, Any]:
    ms = sorted(whole * 1000 for whole, _, _ in passes)
    own = sorted((whole - disk - gc_) * 1000 for whole, disk, gc_ in passes)
    longest = max(passes)
    return {
        "passes": len(ms),
        "max_ms": round(ms[-1], 2),
        "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 2),
        "median_ms": round(statistics.median(ms), 2),
        "longest_in_fsync_ms": round(longest[1] * 1000, 2),
        "longest_in_gc_ms": round(longest[2] * 1000, 2),
        "max_without_fsync_and_gc_ms": round(own[-1], 2),
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
        first = timed_pass(core, enqueue_frames(req + 1, next_id, args.batch))
        next_id += args.batch
        t = time.perf_counter()
        if not compactor.start(core.clock.monotonic()):
            raise SystemExit("the compaction did not start: see the log above")
        start_s = time.perf_counter() - t
        during = [(first[0] + start_s, first[1], first[2])]
        while compactor.running:
            during.append(one_pass())
        compaction_s = time.perf_counter() - started
        if core.stats["compactions"] != 1:
            raise SystemExit("the compaction failed: see the log above")
        install_s = during[-1]
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
            "start_pass_ms": round(during[0][0] * 1000, 2),
            "seal_and_spawn_ms": round(start_s * 1000, 2),
            "switch_pass_ms": round(install_s[0] * 1000, 2),
            "compaction_s": round(compaction_s, 1),
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
    quiet, busy = result["without_compaction"], result["during_compaction"]
    print(f"\n{args.jobs:,} live jobs, {args.batch} enqueues per pass, fsync={args.fsync}\n")
    print(
        "| passes | count | longest, ms | of it in fsync / GC, ms | p99, ms | median, ms "
        "| longest without fsync and GC, ms |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, s in (("without a compaction", quiet), ("during the compaction", busy)):
        print(
            f"| {name} | {s['passes']} | {s['max_ms']} | {s['longest_in_fsync_ms']} / "
            f"{s['longest_in_gc_ms']} | {s['p99_ms']} | {s['median_ms']} | "
            f"{s['max_without_fsync_and_gc_ms']} |"
        )
    print(
        f"\nthe pass that cut the log and started the child: {result['start_pass_ms']} ms "
        f"(seal + spawn {result['seal_and_spawn_ms']} ms); the pass that switched: "
        f"{result['switch_pass_ms']} ms; the compaction took {result['compaction_s']} s; "
        f"log {result['log_bytes_before']:,} -> {result['log_bytes_after']:,} bytes"
    )
    if "sync_compaction_stall_s" in result:
        print(f"the old in-loop compaction stalled the loop {result['sync_compaction_stall_s']} s")


def _cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
