"""Profile the broker with cProfile, running it in this process.

Two scenarios, each on a fresh scratch instance (see ``harness.py``):

* ``drain`` (default): N ``demo.noop`` jobs are enqueued (by a client thread,
  not profiled), then ``corral supervisor`` starts 2 worker processes and the
  broker's loop is profiled until all N succeeded;
* ``enqueue``: a client in a subprocess calls ``Client.enqueue`` N times in a
  loop while the broker's loop is profiled.

The loop is the broker's own: ``poll(_poll_timeout())`` then ``run_pass()``,
as ``Broker.run`` does. Prints the top functions by own time and by
cumulative time and writes ``bench/results/broker-SCENARIO-FSYNC.prof``.

Usage: ``python bench/profile_broker.py [--scenario drain|enqueue] [--fsync always]
[--timer wall|cpu]``; ``--timer cpu`` charges only the broker thread's own CPU
time, so time spent preempted by the workers on a small machine drops out.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import REPO, Instance, Proc, Settings, reexec_in_snapshot

from corral import logs
from corral.broker.server import Broker
from corral.client import Client, Job
from corral.config import load

RESULTS = REPO / "bench" / "results"

ENQUEUE_CLIENT = """
import sys, time
from corral.client import Client
n = int(sys.argv[2])
with Client(sys.argv[1], timeout=30) as c:
    c.ping()
    t = time.perf_counter()
    for _ in range(n):
        c.enqueue("demo.noop")
    print(f"{n / (time.perf_counter() - t):.0f}")
"""


def _loop(broker: Broker, until: Callable[[], bool], timeout: float = 600.0) -> None:
    """The broker's loop (as Broker.run, the ZAP handler served) until ``until()`` holds."""
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            raise TimeoutError("the scenario did not finish")
        ready = dict(broker._poller.poll(int(broker.poll_timeout() * 1000)))
        gate = broker._gate  # the ZAP handler: no connection is accepted without it
        if gate is not None:
            gate.serve(any(sock in ready for sock in gate.sockets))
        broker.run_pass()


def _succeeded(broker: Broker) -> int:
    succeeded: int = broker.core.state.counts["default", "demo.noop", "succeeded"]
    return succeeded


def drain(inst: Instance, broker: Broker, n: int, prof: cProfile.Profile) -> str:
    done = threading.Event()
    error: list[BaseException] = []

    def enqueue() -> None:
        try:
            jobs = [Job("demo.noop") for _ in range(500)]
            with Client(inst.client_endpoint, timeout=30) as client:
                for start in range(0, n, 500):
                    client.enqueue_many(jobs[: min(500, n - start)])
        except BaseException as exc:
            error.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=enqueue, daemon=True)
    thread.start()
    _loop(broker, done.is_set)
    thread.join()
    if error:
        raise error[0]
    queued = broker.core.state.counts["default", "demo.noop", "queued"]
    assert queued == n, f"expected {n} queued, have {queued}"
    started = time.perf_counter()
    inst.start("supervisor")
    prof.enable()
    _loop(broker, lambda: _succeeded(broker) >= n)
    prof.disable()
    elapsed = time.perf_counter() - started
    return f"drained {n:,} jobs in {elapsed:.2f}s under cProfile ({n / elapsed:,.0f} jobs/s)"


def enqueue(inst: Instance, broker: Broker, n: int, prof: cProfile.Profile) -> str:
    log_path = inst.root / "client.log"
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(
            [sys.executable, "-c", ENQUEUE_CLIENT, inst.client_endpoint, str(n)],
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,
        )
    inst.procs.append(Proc("client", popen, log_path))
    prof.enable()
    _loop(broker, lambda: popen.poll() is not None)
    prof.disable()
    assert popen.stdout is not None
    rate = popen.stdout.read().decode().strip()
    if popen.returncode != 0:
        raise RuntimeError(f"the client failed:\n{log_path.read_text()}")
    return f"client enqueued {n:,} jobs one at a time at {rate} jobs/s under cProfile"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=("drain", "enqueue"), default="drain")
    parser.add_argument("--fsync", choices=("always", "interval", "never"), default="always")
    parser.add_argument("-n", type=int, help="jobs (default 20,000 drain, 5,000 enqueue)")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument(
        "--timer",
        choices=("wall", "cpu"),
        default="wall",
        help="wall clock (default) or the broker thread's CPU time (time.thread_time)",
    )
    parser.add_argument("--rev", help="profile this git commit instead of the work tree")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so every started process group is stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.rev:
        reexec_in_snapshot(args.rev, __file__, sys.argv[1:] if argv is None else argv)
    n = args.n or (20_000 if args.scenario == "drain" else 5_000)

    settings = Settings(fsync=args.fsync, processes=2, prefetch=64, log_level="warning")
    prof = cProfile.Profile(time.thread_time) if args.timer == "cpu" else cProfile.Profile()
    with Instance(settings) as inst:
        config = load(inst.config_path)
        logs.configure("broker", "warning", "json")
        broker = Broker(config)
        broker.open()
        try:
            scenario = drain if args.scenario == "drain" else enqueue
            summary = scenario(inst, broker, n, prof)
            stats = dict(broker.stats)
        finally:
            broker.close()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"broker-{args.scenario}-{args.fsync}-{args.timer}.prof"
    prof.dump_stats(out)
    print(f"{summary}; fsync={args.fsync}; timer={args.timer}; broker stats {stats}")
    for order in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(prof, stream=text).strip_dirs().sort_stats(order).print_stats(args.top)
        body = text.getvalue()
        print(f"\n=== top {args.top} by {order} ===")
        print(body[body.find("   ncalls") :].rstrip())
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
