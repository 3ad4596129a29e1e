"""CPU time per job, from /proc, for the figures issue 15 judges on a busy machine.

Rates on a shared 2-core VM move by a factor of two from one minute to the
next; CPU time per job moves much less, so each change to the hot path is
judged on it. Three scenarios, each on a fresh scratch instance (see
``harness.py``), each repetition printed as one line:

* ``drain``: N ``demo.noop`` jobs enqueued with no worker, then ``corral
  supervisor`` (2 processes, prefetch 64) drains them: the broker's CPU
  over the drain and the workers' CPU after both registered, per job;
* ``one``: ``Client.enqueue`` one at a time against ``corral broker``
  alone: the client's and the broker's CPU per call;
* ``async``: ``AsyncClient.enqueue`` with 100 in flight against ``corral
  broker`` (fsync always by default): jobs/s, the client's and the
  broker's CPU per job, and the jobs per fdatasync (the broker's
  ``log_fsyncs`` counter).

A fourth, ``core``, runs no process: the broker's core (``BrokerCore``, its
real log in a scratch directory, links that drop what they are given) in
this process drains N jobs for two fake workers of credit 65 that report
each job's start and outcome, ``batch`` jobs per report (1: a report per
job; 16: as a worker batches them). It gives the broker's own CPU per job
(``time.process_time``, this thread only, no sockets): the least a change
to the broker's per-job work moves, and what the load moves least. The
best of the repetitions is the figure to compare.

Usage: ``python bench/cpu.py [--only drain|one|async|core] [--reps N] [--fsync F]
[--rev REV] [--log-jobs info|debug|off]``. ``--log-jobs off``: a drain
with no line per job from the workers. ``--rev`` measures a commit (see
``harness.export_snapshot``); to compare two, run the script for each in
turn, several times.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Instance, Settings, proc_cpu, reexec_in_snapshot

import corral.client

STATUS_POLL = 0.05
DRAIN_TIMEOUT = 600.0


def _own_cpu() -> float:
    """This process's CPU seconds, all threads (libzmq's I/O thread included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _enqueue_all(client: corral.client.Client, n: int, batch: int = 500) -> None:
    jobs = [corral.client.Job("demo.noop") for _ in range(batch)]
    left = n
    while left > 0:
        client.enqueue_many(jobs[: min(batch, left)])
        left -= batch


#: ``[log] jobs`` for the drain (``--log-jobs``).
LOG_JOBS = "info"


def drain(n: int, fsync: str) -> dict[str, float]:
    """Broker and workers' CPU per job over a drain of ``n`` no-ops."""
    settings = Settings(fsync=fsync, processes=2, prefetch=64, log_level="info", log_jobs=LOG_JOBS)
    with Instance(settings) as inst:
        broker = inst.start("broker")
        inst.wait_ready()
        with inst.client() as client:
            _enqueue_all(client, n)
            broker0 = proc_cpu(broker.popen.pid)
            started = time.perf_counter()
            inst.start("supervisor")
            workers0: dict[int, float] | None = None
            done0 = 0
            deadline = started + DRAIN_TIMEOUT
            while True:
                status = client.status()
                done = status.queues.get("default", {}).get("succeeded", 0)
                if workers0 is None and len(status.workers) >= 2:
                    workers0 = {w.pid: proc_cpu(w.pid) for w in status.workers}
                    done0, ready_at = done, time.perf_counter()
                if done >= n:
                    now = time.perf_counter()
                    broker_cpu = proc_cpu(broker.popen.pid) - broker0
                    worker_cpu = sum(proc_cpu(pid) - c for pid, c in (workers0 or {}).items())
                    break
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"drain not done after {DRAIN_TIMEOUT}s")
                time.sleep(STATUS_POLL)
    after = max(1, n - done0)
    return {
        "rate": n / (now - started),
        "rate_after_ready": after / (now - ready_at) if workers0 else float("nan"),
        "broker_us": broker_cpu / n * 1e6,
        "workers_us": worker_cpu / after * 1e6,
    }


def one(n: int, fsync: str) -> dict[str, float]:
    """Client and broker CPU per one-at-a-time ``Client.enqueue``."""
    with Instance(Settings(fsync=fsync)) as inst:
        broker = inst.start("broker")
        inst.wait_ready()
        with inst.client() as client:
            for _ in range(200):
                client.enqueue("demo.noop")
            broker0, client0 = proc_cpu(broker.popen.pid), _own_cpu()
            started = time.perf_counter()
            for _ in range(n):
                client.enqueue("demo.noop")
            elapsed = time.perf_counter() - started
            client_cpu, broker_cpu = _own_cpu() - client0, proc_cpu(broker.popen.pid) - broker0
    return {
        "rate": n / elapsed,
        "client_us": client_cpu / n * 1e6,
        "broker_us": broker_cpu / n * 1e6,
    }


def in_flight(n: int, fsync: str) -> dict[str, float]:
    """``AsyncClient.enqueue`` with IN_FLIGHT outstanding: rate, CPU per job
    on both sides, and jobs per fdatasync."""
    from peers.corral_side import enqueue_in_flight

    async def burst(endpoint: str) -> float:
        return await enqueue_in_flight(endpoint, n)

    with Instance(Settings(fsync=fsync)) as inst:
        broker = inst.start("broker")
        inst.wait_ready()
        with inst.client() as client:
            # warm-up round outside the counts (asyncio's and the broker's first calls)
            asyncio.run(burst(inst.client_endpoint))
            fsyncs0 = client.status().stats["log_fsyncs"]
            broker0, client0 = proc_cpu(broker.popen.pid), _own_cpu()
            elapsed = asyncio.run(burst(inst.client_endpoint))
            client_cpu, broker_cpu = _own_cpu() - client0, proc_cpu(broker.popen.pid) - broker0
            fsyncs = client.status().stats["log_fsyncs"] - fsyncs0
    return {
        "rate": n / elapsed,
        "client_us": client_cpu / n * 1e6,
        "broker_us": broker_cpu / n * 1e6,
        "jobs_per_fsync": n / max(1, fsyncs),
    }


class _Dropped:
    """A link that takes every message and keeps the workers' last ones."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, bytes]] = []

    def send(self, identity: bytes, body: bytes) -> bool:
        self.sent.append((identity, body))
        return True

    def send_frames(self, identity: bytes, frames: tuple[bytes, ...]) -> bool:
        return True


def core(n: int, fsync: str) -> dict[str, float]:
    """The broker core's own CPU per job over a drain of ``n`` jobs, in
    process, with a report per job and with reports of 16 (see the module
    docstring)."""
    return {f"broker_us_batch{b}": _core_drain(n, fsync, b) for b in (1, 16)}


def _core_drain(n: int, fsync: str, batch: int) -> float:
    import tempfile

    from corral.broker import protocol as p
    from corral.broker.core import CLIENT, WORKER, BrokerCore
    from corral.broker.jobspec import JobSpec
    from corral.config import loads

    with tempfile.TemporaryDirectory(prefix="cb-core-") as root:
        config = loads(
            f'[broker]\nstate_dir = "{root}"\nclient_endpoint = "ipc://{root}/c.sock"\n'
            f'worker_endpoint = "ipc://{root}/w.sock"\nfsync = "{fsync}"\n'
            '[log]\nlevel = "warning"\n'
        )
        broker = BrokerCore(config)
        broker.replay()
        workers = _Dropped()
        broker.attach(_Dropped(), workers)
        specs = [JobSpec(f"j{i}", "demo.noop", p.encode_value(None)) for i in range(n)]
        for req, at in enumerate(range(0, n, 500), 1):
            broker.run_pass([(CLIENT, [b"c", p.encode(p.Enqueue(req, specs[at : at + 500]))])])
        idents = [b"w0", b"w1"]
        for ident in idents:
            ready = p.Ready(ident.decode(), ["default"], 65, 1, [], "bench", 1)
            broker.run_pass([(WORKER, [ident, p.encode(ready)])])
        done, cpu = 0, 0.0
        while done < n:
            inbound = []
            for ident, jobs in _delivered(workers, p).items():
                for at in range(0, len(jobs), batch):
                    inbound.append((WORKER, [ident, _report(jobs[at : at + batch], p)]))
                    done += len(jobs[at : at + batch])
            if not inbound:
                raise RuntimeError(f"nothing delivered after {done} of {n} jobs")
            started = time.process_time()
            broker.run_pass(inbound)
            cpu += time.process_time() - started
        broker.close()
    return cpu / n * 1e6


def _delivered(workers: _Dropped, p: Any) -> dict[bytes, list[Any]]:
    """The jobs each fake worker was sent since the last call."""
    held: dict[bytes, list[Any]] = {}
    for ident, body in workers.sent:
        msg = p.decode(p.worker_command_decoder, body)
        if isinstance(msg, p.Deliver):
            held.setdefault(ident, []).extend(msg.jobs)
    workers.sent.clear()
    return held


def _report(jobs: list[Any], p: Any) -> bytes:
    """A report of ``jobs``' starts and (no-op) outcomes."""
    from corral.broker.jobspec import NIL

    now = time.time()
    starts = [p.Lease(d.job_id, d.lease) for d in jobs]
    ends = [p.Outcome(d.job_id, d.lease, "ok", NIL, None, None, now, now) for d in jobs]
    return bytes(p.encode(p.Report(starts, ends)))


SCENARIOS = {
    "drain": (drain, 20_000),
    "one": (one, 5_000),
    "async": (in_flight, 20_000),
    "core": (core, 20_000),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", choices=sorted(SCENARIOS))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--fsync", choices=("always", "interval", "never"))
    parser.add_argument("-n", type=int, help="jobs per repetition (default per scenario)")
    parser.add_argument("--rev", help="measure this git commit instead of the work tree")
    parser.add_argument(
        "--log-jobs",
        choices=("info", "debug", "off"),
        default="info",
        help="[log] jobs for the drain: the workers' lines per job (default info: written)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args(argv)
    if args.rev:
        reexec_in_snapshot(args.rev, __file__, sys.argv[1:] if argv is None else argv)
    global LOG_JOBS
    LOG_JOBS = args.log_jobs
    label = args.rev or "work tree"
    if args.log_jobs != "info":
        label += f" (log jobs {args.log_jobs})"
    runs: dict[str, list[dict[str, float]]] = {}
    for _ in range(args.reps):
        for name in args.only or ["drain", "one", "async"]:
            fn, default_n = SCENARIOS[name]
            fsync = args.fsync or ("interval" if name == "one" else "always")
            figures = fn(args.n or default_n, fsync)
            runs.setdefault(name, []).append(figures)
            shown = " ".join(f"{k}={v:,.1f}" for k, v in figures.items())
            if args.json:
                print(json.dumps({"rev": label, "scenario": name, "fsync": fsync, **figures}))
            else:
                print(f"{label} {name} fsync={fsync}: {shown}", flush=True)
    if not args.json:
        for name, reps in runs.items():
            medians = " ".join(
                f"{k}={statistics.median(r[k] for r in reps):,.1f}"
                f" ({min(r[k] for r in reps):,.1f}..{max(r[k] for r in reps):,.1f})"
                for k in reps[0]
            )
            print(f"{label} {name} median (min..max) of {len(reps)}: {medians}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
