"""A storm of hostile frames from thousands of reconnecting identities, on
both endpoints of a real broker: it stays up, its memory stays within the
bound its settings give and is given back, and a legitimate client's pings
are all answered meanwhile.

Storm processes each connect DEALERs under fresh random identities, send
fuzzed frames (garbage, deep nesting, unknown ops, wrong versions, forged
supervisor reports, status requests, long polls, READYs with absurd
credit), never read, and reconnect; one refused by the broker (its
connections are capped) goes on with the next identity. The broker's RSS
is sampled with psutil all along. Knobs (soak defaults in brackets):
CORRAL_STORM_FRAMES (10,000 [1,000,000]), CORRAL_STORM_IDENTITIES
(500 [20,000]).

The bound (docs/RELIABILITY.md): each endpoint holds at most
``broker.max_connections`` connections, open or with what they sent still
unread, each at most ``ROUTER_RCVHWM`` messages, so the storm adds at most
2 x max_connections x (:data:`PER_CONNECTION` + ROUTER_RCVHWM x
:data:`PER_MESSAGE`) + :data:`WORKING_SET`.
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
from corral.transport import ROUTER_RCVHWM

from .harness import env_int

KIB = 1024
MIB = 1024 * KIB
#: What a connection costs the broker in libzmq (its engine's buffers and
#: its pipes; 28 KiB measured with idle DEALERs), rounded up.
PER_CONNECTION = 32 * KIB
#: A storm message as libzmq holds it: its bytes, 64 bytes per frame (a
#: tenth of the storm's messages have up to 200 frames), its share of the
#: read buffer; the storm's mix averages about 1.1 KiB.
PER_MESSAGE = int(1.5 * KIB)
#: The broker's own memory a storm may grow besides libzmq's: held replies
#: (at most REPLY_BYTES, 16 MiB, a pass), the shared status, the bounded
#: tables of forged workers and supervisors, the allocator's slack.
WORKING_SET = 64 * MIB


def storm_bound(max_connections: int) -> int:
    """The most the storm may add to the broker's RSS (bytes)."""
    return 2 * max_connections * (PER_CONNECTION + ROUTER_RCVHWM * PER_MESSAGE) + WORKING_SET


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
    env: Env,
    frames: int,
    identities: int,
    report: Callable[[str], None],
    timeout: float,
    max_connections: int,
) -> None:
    env.write_config(processes=0, extra_broker=f"max_connections = {max_connections}")
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
    started = time.monotonic()
    try:
        while any(s.poll() is None for s in storms):
            asked = time.monotonic()
            client.ping()  # raises BrokerUnavailable past the timeout: the test fails
            latencies.append(time.monotonic() - asked)
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.05)
    finally:
        for s in storms:
            s.kill()
            s.wait()
    lasted = time.monotonic() - started

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
    bound = storm_bound(max_connections)
    report(
        f"storm: {frames:,} frames from {identities:,} identities over {lasted:.0f} s, "
        f"max_connections {max_connections}; broker RSS {before / MIB:.0f} MiB before, "
        f"peak {peak / MIB:.0f} MiB (bound {(before + bound) / MIB:.0f}), after "
        f"{after / MIB:.0f} MiB; {len(latencies)} pings answered (timeout {timeout:.0f} s), "
        f"p50 {latencies[len(latencies) // 2] * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms; "
        f"connections refused {stats.get('connections_refused', 0):,}, malformed "
        f"{stats.get('malformed_frames', 0):,}, supervisor reports refused "
        f"{stats.get('supervisor_reports_refused', 0):,}"
    )
    assert peak - before < bound, f"peak RSS {peak / MIB:.0f} MiB over the bound"


def test_storm_of_reconnecting_identities(env: Env, soak_report: Callable[[str], None]) -> None:
    """The fast profile: a small storm against a small cap (64 connections
    per endpoint), so connections are refused and the bound is small."""
    frames = env_int("CORRAL_STORM_FRAMES", 10_000)
    identities = env_int("CORRAL_STORM_IDENTITIES", 500)
    _storm(env, frames, identities, soak_report, timeout=10.0, max_connections=64)


#: The soak storm's client timeout (the default is 5 s): a ping waits its
#: turn behind one message of every connection with messages queued (ZeroMQ
#: fair-queues), up to max_connections per endpoint, on cores the storm's
#: four processes share with the broker.
SOAK_TIMEOUT = 30.0


@pytest.mark.soak
def test_storm_soak(env: Env, soak_report: Callable[[str], None]) -> None:
    """The soak size, against the default cap (1,024 per endpoint)."""
    frames = env_int("CORRAL_STORM_FRAMES", 1_000_000)
    identities = env_int("CORRAL_STORM_IDENTITIES", 20_000)
    _storm(env, frames, identities, soak_report, SOAK_TIMEOUT, max_connections=1024)
