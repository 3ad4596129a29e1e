"""corral's throughput and latency benchmark (``make bench``).

Measures, each on a fresh scratch instance (see ``harness.py``):

* ``raw``: the reference, a raw pyzmq DEALER/ROUTER round trip over ipc
  (a Python ROUTER echo server in a subprocess; one small message, wait for
  the reply, repeated);
* ``enqueue_one``: ``Client.enqueue`` in a loop against ``corral broker``
  (no workers), for fsync = always, interval and never;
* ``paired``: raw echo and ``Client.enqueue`` (fsync=interval) in alternating
  blocks in one run, so their ratio is not skewed by load that comes and goes;
* ``enqueue_batch``: ``Client.enqueue_many`` with batches of 500;
* ``drain``: enqueue N ``demo.noop`` jobs with no worker running, then start
  ``corral supervisor`` with one pool of 2 worker processes and time from
  that start until ``Client.status()`` (polled every 50 ms) shows all N
  succeeded;
* ``latency``: sequential ``enqueue`` + ``result(wait)`` round trips of
  ``demo.noop`` against ``corral run`` with 2 idle workers, p50 and p99.

Throughput figures also report CPU time per job of the processes involved
(from /proc), which is steadier than rates on a shared machine.

Each figure is taken ``--reps`` times (default 3; the repetitions are
interleaved so that background load spreads over all figures) and the median
is reported. Before each measurement the script waits (up to ``--quiet-wait``
seconds) for the CPUs to be ``--quiet-idle`` idle, and it records how much CPU
other work and the hypervisor took meanwhile. Prints markdown tables and
writes everything, with facts about the machine, to
``bench/results/latest.json``. ``--rev REV`` measures a git commit (exported
read-only to /tmp) instead of the work tree. See docs/PERFORMANCE.md.

Usage: ``python bench/run.py [--quick] [--only NAME ...] [--reps N] [--rev REV]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    READY_TIMEOUT,
    REPO,
    Instance,
    Proc,
    Settings,
    cpu_mark,
    machine,
    others_cores,
    proc_cpu,
    reexec_in_snapshot,
    wait_for_quiet,
)
from scale import bench_scale

import corral
from corral.client import Client, Job

RESULTS = REPO / "bench" / "results"
NAMES = ("raw", "enqueue_one", "paired", "enqueue_batch", "drain", "latency", "scale")
POLICIES: dict[str, tuple[str, ...]] = {
    "raw": ("-",),
    "paired": ("interval",),
    "enqueue_one": ("always", "interval", "never"),
    "enqueue_batch": ("always", "never"),
    "drain": ("always", "never"),
    "latency": ("always", "never"),
    "scale": ("interval",),
}
STATUS_POLL = 0.05
DRAIN_TIMEOUT = 600.0
WORKERS = 2
PREFETCH = 64


@dataclass(frozen=True)
class Sizes:
    """How much work each figure does."""

    enqueue_one: int = 5_000
    enqueue_batch: int = 50_000
    batch: int = 500
    drain: int = 20_000
    latency: int = 2_000
    latency_warmup: int = 200
    raw: int = 20_000
    raw_warmup: int = 1_000
    paired: int = 5_000
    paired_block: int = 250
    #: Jobs of the scale figure (memory per pending job, restart time).
    scale: int = 1_000_000


QUICK = Sizes(
    enqueue_one=500,
    enqueue_batch=5_000,
    batch=500,
    drain=2_000,
    latency=200,
    latency_warmup=20,
    raw=2_000,
    raw_warmup=100,
    paired=500,
    paired_block=100,
    scale=50_000,
)

Measure = dict[str, float]


def _pct(sorted_values: list[float], q: float) -> float:
    """The q-quantile (0..1) of already sorted values, nearest rank."""
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


# ------------------------------------------------------------- the figures


ECHO_BODY = b"x" * 100  # about the size of a one-job Enqueue


def start_echo(inst: Instance, ctx: zmq.SyncContext) -> zmq.SyncSocket:
    """Start bench/zmq_echo.py in ``inst`` and return a DEALER that got one echo back."""
    endpoint = f"ipc://{inst.root}/echo.sock"
    log_path = inst.root / "echo.log"
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(
            [sys.executable, str(REPO / "bench" / "zmq_echo.py"), endpoint],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    inst.procs.append(Proc("echo", popen, log_path))
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    deadline = time.monotonic() + READY_TIMEOUT
    while True:  # ready once the first echo comes back
        sock.send(ECHO_BODY)
        if sock.poll(200, zmq.POLLIN):
            sock.recv()
            return sock
        if time.monotonic() > deadline or popen.poll() is not None:
            sock.close(linger=0)
            raise RuntimeError("the echo server did not answer")


def bench_raw(sizes: Sizes) -> Measure:
    """DEALER -> Python ROUTER echo -> DEALER over ipc, one message in flight."""
    with Instance(Settings()) as inst:
        ctx = zmq.Context()
        sock = start_echo(inst, ctx)
        body = ECHO_BODY
        try:
            for _ in range(sizes.raw_warmup):
                sock.send(body)
                sock.recv()
            echo_pid = inst.procs[-1].popen.pid
            server_cpu = proc_cpu(echo_pid)
            client_cpu = time.process_time()
            started = time.perf_counter()
            for _ in range(sizes.raw):
                sock.send(body)
                sock.recv()
            plain = sizes.raw / (time.perf_counter() - started)
            client_cpu = time.process_time() - client_cpu
            server_cpu = proc_cpu(echo_pid) - server_cpu
            # The same, waiting the way corral.Client does (poll, then recv).
            started = time.perf_counter()
            for _ in range(sizes.raw):
                sock.send(body, zmq.NOBLOCK)
                sock.poll(5000, zmq.POLLIN)
                sock.recv()
            polled = sizes.raw / (time.perf_counter() - started)
        finally:
            sock.close(linger=0)
            ctx.term()
    return {
        "rate": plain,
        "rate_with_poll": polled,
        "client_cpu_us": client_cpu / sizes.raw * 1e6,
        "server_cpu_us": server_cpu / sizes.raw * 1e6,
    }


def bench_enqueue_one(fsync: str, sizes: Sizes) -> Measure:
    """Client.enqueue in a loop against a broker with no workers."""
    n = sizes.enqueue_one
    with Instance(Settings(fsync=fsync)) as inst:
        broker = inst.start("broker")
        inst.wait_ready()
        with inst.client() as client:
            for _ in range(min(200, n // 10)):  # warm up the socket and heaps
                client.enqueue("demo.noop")
            times: list[float] = []
            broker_cpu = proc_cpu(broker.popen.pid)
            client_cpu = time.process_time()
            started = time.perf_counter()
            for _ in range(n):
                t0 = time.perf_counter()
                client.enqueue("demo.noop")
                times.append(time.perf_counter() - t0)
            elapsed = time.perf_counter() - started
            client_cpu = time.process_time() - client_cpu
            broker_cpu = proc_cpu(broker.popen.pid) - broker_cpu
    times.sort()
    return {
        "rate": n / elapsed,
        "p50_us": _pct(times, 0.5) * 1e6,
        "p99_us": _pct(times, 0.99) * 1e6,
        "client_cpu_us": client_cpu / n * 1e6,
        "broker_cpu_us": broker_cpu / n * 1e6,
    }


def bench_paired(fsync: str, sizes: Sizes) -> Measure:
    """Raw echo round trips and Client.enqueue round trips in alternating
    blocks, so that both see the same background load; their ratio is the
    one-at-a-time enqueue target."""
    with Instance(Settings(fsync=fsync)) as inst:
        ctx = zmq.Context()
        sock = start_echo(inst, ctx)
        inst.start("broker")
        inst.wait_ready()
        raw_s = corral_s = 0.0
        block = sizes.paired_block
        try:
            with inst.client() as client:
                for _ in range(200):
                    client.enqueue("demo.noop")
                    sock.send(ECHO_BODY)
                    sock.recv()
                for _ in range(sizes.paired // block):
                    t0 = time.perf_counter()
                    for _ in range(block):
                        sock.send(ECHO_BODY)
                        sock.recv()
                    t1 = time.perf_counter()
                    for _ in range(block):
                        client.enqueue("demo.noop")
                    t2 = time.perf_counter()
                    raw_s += t1 - t0
                    corral_s += t2 - t1
        finally:
            sock.close(linger=0)
            ctx.term()
    n = sizes.paired // block * block
    return {"raw_rate": n / raw_s, "enqueue_rate": n / corral_s, "ratio": raw_s / corral_s}


def bench_enqueue_batch(fsync: str, sizes: Sizes) -> Measure:
    """Client.enqueue_many in batches against a broker with no workers."""
    batch = [Job("demo.noop") for _ in range(sizes.batch)]
    with Instance(Settings(fsync=fsync)) as inst:
        inst.start("broker")
        inst.wait_ready()
        with inst.client() as client:
            client.enqueue_many(batch)  # warm up
            rounds = sizes.enqueue_batch // sizes.batch
            started = time.perf_counter()
            for _ in range(rounds):
                client.enqueue_many(batch)
            elapsed = time.perf_counter() - started
    return {"rate": rounds * sizes.batch / elapsed, "batch_ms": elapsed / rounds * 1e3}


def _enqueue_all(client: Client, n: int, batch: int) -> None:
    jobs = [Job("demo.noop") for _ in range(batch)]
    left = n
    while left > 0:
        client.enqueue_many(jobs[: min(batch, left)])
        left -= batch


def bench_drain(fsync: str, sizes: Sizes) -> Measure:
    """Enqueue N no-ops with no workers, start 2 workers, time until all succeeded."""
    n = sizes.drain
    with Instance(Settings(fsync=fsync, processes=WORKERS, prefetch=PREFETCH)) as inst:
        broker = inst.start("broker")
        inst.wait_ready()
        with inst.client() as client:
            _enqueue_all(client, n, sizes.batch)
            queued = client.status().queues.get("default", {}).get("queued", 0)
            if queued != n:
                raise RuntimeError(f"expected {n} queued jobs, the broker has {queued}")
            broker_cpu0 = proc_cpu(broker.popen.pid)
            started = time.perf_counter()
            supervisor = inst.start("supervisor")
            ready_at: float | None = None
            done_at_ready = 0
            worker_cpu0: dict[int, float] = {}
            deadline = started + DRAIN_TIMEOUT
            next_poll = started
            while True:
                status = client.status()
                now = time.perf_counter()
                counts = status.queues.get("default", {})
                succeeded = counts.get("succeeded", 0)
                if ready_at is None and len(status.workers) >= WORKERS:
                    ready_at, done_at_ready = now, succeeded
                    worker_cpu0 = {w.pid: proc_cpu(w.pid) for w in status.workers}
                if succeeded >= n:
                    broker_cpu = proc_cpu(broker.popen.pid) - broker_cpu0
                    worker_cpu = sum(proc_cpu(pid) - cpu for pid, cpu in worker_cpu0.items())
                    # its own CPU, not its children's: from spawn, imports included
                    supervisor_cpu = proc_cpu(supervisor.popen.pid)
                    break
                if counts.get("failed", 0):
                    raise RuntimeError(f"jobs failed during the drain: {counts}")
                if now > deadline:
                    raise TimeoutError(f"drain not done after {DRAIN_TIMEOUT}s: {counts}")
                next_poll += STATUS_POLL
                time.sleep(max(0.0, next_poll - time.perf_counter()))
            elapsed = now - started
    ready_at = ready_at if ready_at is not None else now
    after = now - ready_at
    return {
        "rate": n / elapsed,
        "seconds": elapsed,
        "startup_s": ready_at - started,
        "rate_after_ready": (n - done_at_ready) / after if after > 0 else float("nan"),
        # CPU per job: the broker over the whole drain, the workers after registering
        "broker_cpu_us_per_job": broker_cpu / n * 1e6,
        "workers_cpu_us_per_job": worker_cpu / max(1, n - done_at_ready) * 1e6,
        "supervisor_cpu_ms": supervisor_cpu * 1e3,
    }


def bench_latency(fsync: str, sizes: Sizes) -> Measure:
    """Sequential enqueue + result(wait) round trips through 2 idle workers."""
    with Instance(Settings(fsync=fsync, processes=WORKERS, prefetch=PREFETCH)) as inst:
        inst.start("run")
        inst.wait_ready(workers=WORKERS)
        times: list[float] = []
        with inst.client() as client:
            for i in range(sizes.latency_warmup + sizes.latency):
                t0 = time.perf_counter()
                job_id = client.enqueue("demo.noop")
                client.result(job_id, timeout=10.0)
                if i >= sizes.latency_warmup:
                    times.append(time.perf_counter() - t0)
    times.sort()
    return {
        "p50_ms": _pct(times, 0.5) * 1e3,
        "p99_ms": _pct(times, 0.99) * 1e3,
        "mean_ms": statistics.fmean(times) * 1e3,
        "max_ms": times[-1] * 1e3,
    }


def run_one(name: str, fsync: str, sizes: Sizes) -> Measure:
    if name == "raw":
        return bench_raw(sizes)
    if name == "scale":
        return bench_scale(fsync, sizes.scale)
    figures: dict[str, Callable[[str, Sizes], Measure]] = {
        "enqueue_one": bench_enqueue_one,
        "paired": bench_paired,
        "enqueue_batch": bench_enqueue_batch,
        "drain": bench_drain,
        "latency": bench_latency,
    }
    return figures[name](fsync, sizes)


# ---------------------------------------------------------------- reporting


def _median(runs: list[Measure]) -> Measure:
    keys = runs[0].keys()
    return {k: statistics.median(run[k] for run in runs) for k in keys}


def _fmt(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def _cell(results: dict[str, Any], name: str, fsync: str, key: str, digits: int = 0) -> str:
    entry = results.get(f"{name}/{fsync}")
    if entry is None:
        return "n/a"
    values = [run[key] for run in entry["runs"]]
    median = entry["median"][key]
    if len(values) == 1:
        return _fmt(median, digits)
    return f"{_fmt(median, digits)} ({_fmt(min(values), digits)}..{_fmt(max(values), digits)})"


ROWS: list[tuple[str, str, str, int]] = [
    ("one-at-a-time enqueue, jobs/s", "enqueue_one", "rate", 0),
    ("one-at-a-time enqueue, p50 µs", "enqueue_one", "p50_us", 0),
    ("one-at-a-time enqueue, p99 µs", "enqueue_one", "p99_us", 0),
    ("one-at-a-time enqueue, client CPU µs per call", "enqueue_one", "client_cpu_us", 0),
    ("one-at-a-time enqueue, broker CPU µs per call", "enqueue_one", "broker_cpu_us", 0),
    ("one-at-a-time enqueue, paired with raw echo, jobs/s", "paired", "enqueue_rate", 0),
    ("raw echo, paired with enqueue, msgs/s", "paired", "raw_rate", 0),
    ("enqueue / raw round-trip rate, paired", "paired", "ratio", 2),
    ("batched enqueue (500/batch), jobs/s", "enqueue_batch", "rate", 0),
    ("drain, jobs/s (from worker start)", "drain", "rate", 0),
    ("drain, seconds (from worker start)", "drain", "seconds", 2),
    ("drain, worker start-up s (spawn → 2 registered)", "drain", "startup_s", 2),
    ("drain, jobs/s after both workers registered", "drain", "rate_after_ready", 0),
    ("drain, broker CPU µs per job", "drain", "broker_cpu_us_per_job", 1),
    (
        "drain, workers' CPU µs per job (both, after registering)",
        "drain",
        "workers_cpu_us_per_job",
        1,
    ),
    (
        "drain, supervisor process CPU ms (from spawn, imports included)",
        "drain",
        "supervisor_cpu_ms",
        0,
    ),
    ("enqueue→result latency p50, ms", "latency", "p50_ms", 3),
    ("enqueue→result latency p99, ms", "latency", "p99_ms", 3),
    ("enqueue→result latency mean, ms", "latency", "mean_ms", 3),
    ("scale: broker RSS per pending job, bytes", "scale", "bytes_per_job", 0),
    ("scale: of which beyond the 100-byte payload, bytes", "scale", "beyond_payload", 0),
    ("scale: enqueue_many (1,000/batch), jobs/s", "scale", "enqueue_rate", 0),
    ("scale: log size, MiB", "scale", "log_mib", 1),
    ("scale: restart (SIGKILL, start, first answer), s", "scale", "restart_s", 2),
    ("scale: replay, MB of log per second of restart", "scale", "replay_mb_s", 0),
    ("scale: broker RSS after the restart, MiB", "scale", "rss_after_restart_mib", 0),
    ("scale: restart, broker CPU seconds to the first answer", "scale", "restart_cpu_s", 2),
    ("scale: restart with a checkpoint, s", "scale", "restart_ckpt_s", 2),
    ("scale: replay with a checkpoint, MB/s", "scale", "replay_ckpt_mb_s", 0),
    ("scale: restart with a checkpoint, broker CPU s", "scale", "restart_ckpt_cpu_s", 2),
    ("scale: RSS at the first answer, checkpoint, MiB", "scale", "rss_after_ckpt_restart_mib", 0),
]


def table(results: dict[str, Any], sizes: Sizes) -> str:
    lines = []
    if "raw/-" in results:
        lines += [
            "| Reference (no broker) | median (min..max) |",
            "|---|---|",
            "| raw pyzmq DEALER/ROUTER round trip, ipc, msgs/s | "
            f"{_cell(results, 'raw', '-', 'rate')} |",
            "| same, waiting with poll() then recv() like corral.Client, msgs/s | "
            f"{_cell(results, 'raw', '-', 'rate_with_poll')} |",
            "| raw round trip, client process CPU µs (incl. libzmq I/O thread) | "
            f"{_cell(results, 'raw', '-', 'client_cpu_us')} |",
            "| raw round trip, echo server process CPU µs (incl. libzmq I/O thread) | "
            f"{_cell(results, 'raw', '-', 'server_cpu_us')} |",
            "",
        ]
    lines += [
        "| Measurement | fsync=always | fsync=interval | fsync=never |",
        "|---|---|---|---|",
    ]
    for label, name, key, digits in ROWS:
        if not any(k.startswith(f"{name}/") for k in results):
            continue
        cells = [_cell(results, name, f, key, digits) for f in ("always", "interval", "never")]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    lines.append("")
    lines.append(
        f"N: enqueue_one {sizes.enqueue_one:,}, enqueue_batch {sizes.enqueue_batch:,} "
        f"(batches of {sizes.batch}), drain {sizes.drain:,} with {WORKERS} worker processes "
        f"(concurrency 1, prefetch {PREFETCH}), latency {sizes.latency:,} round trips, "
        f"raw {sizes.raw:,} round trips, scale {sizes.scale:,} pending jobs. "
        "Cells: median (min..max) of the repetitions."
    )
    return "\n".join(lines)


def _get(results: dict[str, Any], name: str, fsync: str, key: str) -> float | None:
    entry = results.get(f"{name}/{fsync}")
    return None if entry is None else float(entry["median"][key])


def targets(results: dict[str, Any], sizes: Sizes) -> list[dict[str, Any]]:
    """The targets from docs/PERFORMANCE.md and whether the medians meet them."""
    out: list[dict[str, Any]] = []

    def add(label: str, target: str, value: float | None, met: bool | None, shown: str) -> None:
        out.append({"target": label, "goal": target, "value": value, "met": met, "shown": shown})

    for fsync in ("always", "never"):
        rate = _get(results, "drain", fsync, "rate")
        if rate is not None:
            add(
                f"drain of {sizes.drain:,} no-op jobs, {WORKERS} workers, fsync={fsync}",
                ">= 10,000 jobs/s",
                rate,
                rate >= 10_000,
                f"{rate:,.0f} jobs/s ({rate / 10_000:.2f}x of target)",
            )
    paired = _get(results, "paired", "interval", "ratio")
    if paired is not None:
        paired_one = _get(results, "paired", "interval", "enqueue_rate") or 0.0
        paired_raw = _get(results, "paired", "interval", "raw_rate") or 0.0
        add(
            "one-at-a-time enqueue, fsync=interval (paired blocks)",
            ">= 0.8 x raw pyzmq round trip",
            paired,
            paired >= 0.8,
            f"{paired_one:,.0f}/s vs raw {paired_raw:,.0f}/s = {paired:.2f}x",
        )
    one = _get(results, "enqueue_one", "interval", "rate")
    raw = _get(results, "raw", "-", "rate")
    if one is not None and raw is not None:
        ratio = one / raw
        add(
            "one-at-a-time enqueue, fsync=interval (separate runs)",
            ">= 0.8 x raw pyzmq round trip",
            ratio,
            ratio >= 0.8,
            f"{one:,.0f}/s vs raw {raw:,.0f}/s = {ratio:.2f}x",
        )
    batch = _get(results, "enqueue_batch", "always", "rate")
    if batch is not None:
        add(
            "batched enqueue, fsync=always",
            ">= 40,000 jobs/s",
            batch,
            batch >= 40_000,
            f"{batch:,.0f} jobs/s ({batch / 40_000:.2f}x of target)",
        )
    beyond = _get(results, "scale", "interval", "beyond_payload")
    if beyond is not None:
        add(
            f"broker RSS per pending job beyond its payload, {sizes.scale:,} jobs",
            "<= 300 bytes",
            beyond,
            beyond <= 300,
            f"{beyond:,.0f} bytes",
        )
    restarts = (  # (the figures' infix, the row's name)
        ("", f"restart on the log of {sizes.scale:,} pending jobs"),
        ("_ckpt", f"the same, after a compaction wrote its checkpoint ({sizes.scale:,} jobs)"),
    )
    for infix, name in restarts:
        replay = _get(results, "scale", "interval", f"replay{infix}_mb_s")
        if replay is not None:
            restart = _get(results, "scale", "interval", f"restart{infix}_s") or 0.0
            add(
                name,
                ">= 200 MB/s of log replayed",
                replay,
                replay >= 200,
                f"{replay:,.0f} MB/s ({restart:.2f} s)",
            )
    for fsync in ("always", "never"):
        p50 = _get(results, "latency", fsync, "p50_ms")
        if p50 is not None:
            add(
                f"idle enqueue-to-result latency p50, fsync={fsync}",
                "< 1 ms",
                p50,
                p50 < 1.0,
                f"{p50:.3f} ms",
            )
    return out


def targets_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| Target | Goal | Measured (median) | Met? |", "|---|---|---|---|"]
    for row in rows:
        met = "yes" if row["met"] else "**no**"
        lines.append(f"| {row['target']} | {row['goal']} | {row['shown']} | {met} |")
    return "\n".join(lines)


# --------------------------------------------------------------------- main


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by None (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small N, one repetition")
    parser.add_argument(
        "--only", action="append", choices=NAMES, help="run only this figure (repeatable)"
    )
    parser.add_argument("--reps", type=int, help="repetitions per figure (default 3, quick 1)")
    parser.add_argument(
        "--quiet-idle",
        type=float,
        default=0.8,
        help="before each measurement wait for the CPUs to be this idle (0 to skip)",
    )
    parser.add_argument(
        "--quiet-wait", type=float, default=60.0, help="but wait at most this many seconds"
    )
    parser.add_argument(
        "--rev",
        help="measure this git commit (exported read-only with git archive to /tmp) "
        "instead of the work tree, which others may be editing",
    )
    parser.add_argument(
        "--out", type=Path, default=RESULTS / "latest.json", help="where the JSON goes"
    )
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so every started process group is stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.rev:
        reexec_in_snapshot(args.rev, __file__, sys.argv[1:] if argv is None else argv)
    sizes = QUICK if args.quick else Sizes()
    reps = args.reps or (1 if args.quick else 3)
    names = args.only or list(NAMES)
    plan = [(name, fsync) for name in NAMES if name in names for fsync in POLICIES[name]]

    info = machine()
    print(
        f"machine: {info['nproc']} CPUs ({info['cpu_model']}), Python {info['python']}, "
        f"pyzmq {info['pyzmq']} / libzmq {info['libzmq']}, /tmp on {info['tmp_filesystem']}, "
        f"load {info['loadavg_start']}",
        file=sys.stderr,
    )
    runs: dict[str, list[Measure]] = {f"{n}/{f}": [] for n, f in plan}
    loads: dict[str, list[float]] = {key: [] for key in runs}
    idles: dict[str, list[float]] = {key: [] for key in runs}
    others: dict[str, list[float]] = {key: [] for key in runs}
    steals: dict[str, list[float]] = {key: [] for key in runs}
    started = time.time()
    for rep in range(reps):
        for name, fsync in plan:
            key = f"{name}/{fsync}"
            idle = 1.0
            if args.quiet_idle > 0:
                idle = wait_for_quiet(args.quiet_idle, args.quiet_wait)
            idles[key].append(round(idle, 2))
            t0 = time.perf_counter()
            mark = cpu_mark()
            measure = run_one(name, fsync, sizes)
            busy, stolen = others_cores(mark)
            others[key].append(round(busy, 2))
            steals[key].append(round(stolen, 3))
            runs[key].append(measure)
            loads[key].append(round(os.getloadavg()[0], 2))
            shown = ", ".join(f"{k}={v:,.3f}" for k, v in measure.items())
            print(
                f"[{rep + 1}/{reps}] {key}: {shown} ({time.perf_counter() - t0:.1f}s, "
                f"idle before {idle:.0%}, meanwhile other work used {busy:.2f} CPUs "
                f"and the hypervisor stole {stolen:.2f})",
                file=sys.stderr,
            )
    results = {
        key: {
            "runs": values,
            "median": _median(values),
            "idle_before": idles[key],
            "others_cpus_during": others[key],
            "steal_cpus_during": steals[key],
            "loadavg_1m_after": loads[key],
        }
        for key, values in runs.items()
    }
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    target_rows = targets(results, sizes)
    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "quick": args.quick,
        "only": args.only,
        "reps": reps,
        "sizes": asdict(sizes),
        "settings": {
            "workers": WORKERS,
            "prefetch": PREFETCH,
            "concurrency": 1,
            "max_jobs_per_process": 0,
            "status_poll_s": STATUS_POLL,
            "log": "info, json, to a file",
            "quiet_idle": args.quiet_idle,
            "quiet_wait_s": args.quiet_wait,
        },
        "rev": args.rev,
        "corral_imported_from": str(Path(corral.__file__).parent),
        "machine": info,
        "results": results,
        "targets": target_rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(_finite(report), indent=2, allow_nan=False) + "\n")
    print(table(results, sizes))
    if target_rows:
        print()
        print(targets_table(target_rows))
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
