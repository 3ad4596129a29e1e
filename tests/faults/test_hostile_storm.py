"""A storm of hostile frames from thousands of reconnecting identities, on
both endpoints of a real broker: it stays up, its memory stays bounded and
is given back, and a legitimate client's pings are all answered meanwhile.

Storm processes each connect DEALERs under fresh random identities, send
fuzzed frames (garbage, deep nesting, unknown ops, wrong versions, forged
supervisor reports, status requests, long polls, READYs with absurd
credit), never read, and reconnect. The broker's RSS is sampled with
psutil all along. Knobs (soak defaults in brackets):
CORRAL_STORM_FRAMES (10,000 [1,000,000]), CORRAL_STORM_IDENTITIES
(500 [20,000]).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable

import psutil
import pytest
from conftest import Env, wait_for

from corral.broker.supervisors import MAX_SUPERVISORS

from .harness import env_int

MIB = 1024 * 1024

#: One storm process: argv = endpoint, identities, frames per identity, seed, side.
STORM = r"""
import random, sys, time
import msgspec, zmq
endpoint, side = sys.argv[1], sys.argv[5]
identities, per, seed = (int(a) for a in sys.argv[2:5])
rng = random.Random(seed)
enc = msgspec.msgpack.encode

def frame():
    k = rng.randrange(10)
    if k == 0:
        return [rng.randbytes(rng.randrange(1, 300))]
    if k == 1:
        return [b"\x91" * rng.randrange(1, 5000) + b"\xc0"]
    if k == 2:
        op = rng.choice(["ping", "no-such-op"])
        return [enc([op, rng.randrange(2**31), rng.choice([3, 99])])]
    if k == 3:
        wait = rng.choice([3600.0, float("nan")])
        return [enc(["getresult", rng.randrange(2**31), "job-1", wait, 3])]
    if k == 4:
        return [enc(["getstatus", 1, 3])]
    if k == 5:
        info = {"supervisor_id": f"forged/{rng.randrange(2**40)}", "host": "h", "pid": 1,
                "pools": [], "workers": [{"pool": "p", "index": i, "pid": i, "rss": 1, "jobs": [],
                "uptime": 1.0} for i in range(rng.randrange(50))]}
        return [enc(["supervisorreport", 1, info, 3])]
    if k == 6:
        credit = rng.choice([1, 10**5, 2**62])
        task = [f"t{rng.randrange(2**20)}"]
        worker = f"w{rng.randrange(2**30)}"
        return [enc(["ready", worker, ["default"], credit, 1, [task], "h", 1, 3])]
    if k == 7:
        return [enc(["report", [["job-1", rng.randrange(2**40)]], [], 3])]
    if k == 8:
        return [b"x"] * rng.randrange(3, 200)  # too many frames
    return [enc(["heartbeat" if side == "w" else "getjob", 1, "job-1", 3])]

import resource
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
ctx = zmq.Context()
ctx.max_sockets = max(1024, min(hard - 100, 60_000))
for i in range(identities):
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, rng.randbytes(8))
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.connect(endpoint)
    try:
        for _ in range(per):
            sock.send_multipart(frame(), zmq.NOBLOCK)
    except zmq.Again:  # refused by the broker (its connections are capped): next
        sock.close(linger=0)
        continue
    sock.close(linger=0 if i % 10 == 0 else 2000)  # one in ten drops what it has not sent
ctx.term()
"""


def _storm(
    env: Env, frames: int, identities: int, report: Callable[[str], None], timeout: float = 10.0
) -> None:
    env.write_config(processes=0)
    broker = env.start("broker")
    env.wait_ready(broker)
    proc = psutil.Process(broker.pid)
    # a generous timeout: the storm's processes share the cores with the broker
    client = env.client(timeout=timeout)
    job_id = client.enqueue("e2e.square", 4)
    before = proc.memory_info().rss
    per = max(1, frames // identities)
    storms = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                STORM,
                f"ipc://{env.home}/{side}.sock",
                str(identities // 4),
                str(per),
                str(seed),
                side,
            ]
        )
        for seed, side in enumerate(["c", "c", "c", "w"])
    ]
    peak, latencies = before, []
    try:
        while any(s.poll() is None for s in storms):
            started = time.monotonic()
            client.ping()  # raises BrokerUnavailable past the timeout: the test fails
            latencies.append(time.monotonic() - started)
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.05)
    finally:
        for s in storms:
            s.kill()
            s.wait()

    # what the storm left queued is read; then the memory goes back
    seen: dict[str, float] = {}

    def settled() -> bool:
        nonlocal peak
        rss = proc.memory_info().rss
        peak = max(peak, rss)
        stats = client.status().stats
        seen.update(rss=rss / MIB, trims=stats.get("heap_trims", 0), fds=proc.num_fds())
        return rss < before + 64 * MIB and stats.get("heap_trims", 0) > 0

    try:
        wait_for(settled, 60, interval=0.5, message="the broker's memory to come back")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {before / MIB:.0f} MiB before, then {seen}") from None
    after = proc.memory_info().rss
    status = client.status()
    assert broker.alive()
    assert client.ping()
    assert client.job(job_id).status == "queued"
    assert len(status.supervisors) <= MAX_SUPERVISORS
    assert status.stats.get("handler_errors", 0) == 0
    latencies.sort()
    stats = status.stats
    report(
        f"storm: {frames:,} frames from {identities:,} identities; broker RSS "
        f"{before / MIB:.0f} MiB before, peak {peak / MIB:.0f} MiB, after {after / MIB:.0f} MiB; "
        f"{len(latencies)} pings answered, p50 {latencies[len(latencies) // 2] * 1000:.0f} ms, "
        f"max {latencies[-1] * 1000:.0f} ms; malformed {stats.get('malformed_frames', 0):,}, "
        f"supervisor reports refused {stats.get('supervisor_reports_refused', 0):,}"
    )
    assert peak < before + 512 * MIB, f"peak RSS {peak / MIB:.0f} MiB"


def test_storm_of_reconnecting_identities(env: Env, soak_report: Callable[[str], None]) -> None:
    frames = env_int("CORRAL_STORM_FRAMES", 10_000)
    identities = env_int("CORRAL_STORM_IDENTITIES", 500)
    _storm(env, frames, identities, soak_report)


#: The soak storm's client timeout: a ping waits its turn behind one message
#: of every peer with messages queued (ZeroMQ fair-queues), and thousands are.
SOAK_TIMEOUT = 60.0


@pytest.mark.soak
def test_storm_soak(env: Env, soak_report: Callable[[str], None]) -> None:
    frames = env_int("CORRAL_STORM_FRAMES", 1_000_000)
    identities = env_int("CORRAL_STORM_IDENTITIES", 20_000)
    _storm(env, frames, identities, soak_report, SOAK_TIMEOUT)
