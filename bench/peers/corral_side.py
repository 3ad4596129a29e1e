"""corral's side of the comparison and the run's references.

corral's scenarios are bench/run.py's own functions (``bench_enqueue_one``,
``bench_enqueue_batch``, ``bench_drain``, ``bench_latency``, ``bench_paired``),
called with this run's sizes and the fsync policy under test; nothing of
them is copied here. Added here, because bench/run.py has no such figure:

* the raw pyzmq DEALER/ROUTER round trip over ipc (bench/zmq_echo.py as the
  server) with each call timed (p50), and with 100 messages in flight;
* the rate of ``fdatasync`` after a 128-byte append, on /tmp (where corral's
  state dirs are);
* ``AsyncClient.enqueue`` with 100 in flight against ``corral broker``.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from dataclasses import dataclass

import run as corral_bench
import zmq
from harness import Instance, Settings

from corral.asyncclient import AsyncClient

Figures = dict[str, float]
IN_FLIGHT = 100


@dataclass(frozen=True)
class RefSizes:
    raw: int
    raw_warmup: int
    fdatasync: int
    async_many: int


def corral_sizes(
    enqueue_one: int, bulk: int, batch: int, drain: int, latency: int, latency_warmup: int
) -> corral_bench.Sizes:
    """bench/run.py's Sizes with this run's N (the peers get the same)."""
    return corral_bench.Sizes(
        enqueue_one=enqueue_one,
        enqueue_batch=bulk,
        batch=batch,
        drain=drain,
        latency=latency,
        latency_warmup=latency_warmup,
        paired=enqueue_one,
        paired_block=max(50, min(250, enqueue_one // 10)),
    )


def corral_scenario(scenario: str, fsync: str, sizes: corral_bench.Sizes) -> Figures:
    """One of corral's scenarios, by the name the peers' figures use."""
    if scenario == "enqueue_one":
        return corral_bench.bench_enqueue_one(fsync, sizes)
    if scenario == "enqueue_bulk":
        return corral_bench.bench_enqueue_batch(fsync, sizes)
    if scenario == "drain":
        return corral_bench.bench_drain(fsync, sizes)
    if scenario == "latency":
        return corral_bench.bench_latency(fsync, sizes)
    if scenario == "paired":
        return corral_bench.bench_paired(fsync, sizes)
    raise ValueError(f"unknown corral scenario {scenario!r}")


def raw_round_trips(sizes: RefSizes) -> Figures:
    """DEALER -> bench/zmq_echo.py -> DEALER over ipc: one in flight (each
    round trip timed), then IN_FLIGHT in flight."""
    with Instance(Settings()) as inst:
        ctx = zmq.Context()
        sock = corral_bench.start_echo(inst, ctx)
        body = corral_bench.ECHO_BODY
        try:
            for _ in range(sizes.raw_warmup):
                sock.send(body)
                sock.recv()
            times: list[float] = []
            clock = time.perf_counter
            started = clock()
            for _ in range(sizes.raw):
                t0 = clock()
                sock.send(body)
                sock.recv()
                times.append(clock() - t0)
            one = sizes.raw / (clock() - started)
            many = _in_flight(sock, body, sizes.raw * 5)
        finally:
            sock.close(linger=0)
            ctx.term()
    times.sort()
    return {
        "rate": one,
        "p50_us": corral_bench._pct(times, 0.5) * 1e6,
        "p99_us": corral_bench._pct(times, 0.99) * 1e6,
        "rate_100": many,
    }


def _in_flight(sock: zmq.SyncSocket, body: bytes, n: int) -> float:
    """n echoes with IN_FLIGHT outstanding at any time; messages per second."""
    for _ in range(IN_FLIGHT):  # warm-up round with the window full
        sock.send(body)
    for _ in range(IN_FLIGHT):
        sock.recv()
    started = time.perf_counter()
    for _ in range(IN_FLIGHT):
        sock.send(body)
    for sent in range(IN_FLIGHT, n + IN_FLIGHT):
        sock.recv()
        if sent < n:
            sock.send(body)
    return n / (time.perf_counter() - started)


def fdatasync_rate(n: int) -> Figures:
    """Append 128 bytes and fdatasync, n times, to a file in /tmp."""
    fd, path = tempfile.mkstemp(prefix="cb-fsync-", dir="/tmp")
    record = b"r" * 128
    times: list[float] = []
    try:
        os.write(fd, record)
        os.fdatasync(fd)
        clock = time.perf_counter
        started = clock()
        for _ in range(n):
            t0 = clock()
            os.write(fd, record)
            os.fdatasync(fd)
            times.append(clock() - t0)
        rate = n / (clock() - started)
    finally:
        os.close(fd)
        os.unlink(path)
    times.sort()
    return {"rate": rate, "p50_us": corral_bench._pct(times, 0.5) * 1e6}


def async_enqueue(fsync: str, n: int) -> Figures:
    """AsyncClient.enqueue("demo.noop") with IN_FLIGHT requests outstanding,
    against ``corral broker`` alone (no workers)."""
    with Instance(Settings(fsync=fsync)) as inst:
        inst.start("broker")
        inst.wait_ready()
        elapsed = asyncio.run(enqueue_in_flight(inst.client_endpoint, n))
    return {"rate": n / elapsed}


async def enqueue_in_flight(endpoint: str, n: int) -> float:
    """Seconds for ``n`` ``AsyncClient.enqueue("demo.noop")`` calls with
    IN_FLIGHT outstanding, after a warm-up round of IN_FLIGHT (not timed).
    Also bench/cpu.py's burst."""
    async with AsyncClient(endpoint, timeout=30.0) as client:
        await asyncio.gather(*(client.enqueue("demo.noop") for _ in range(IN_FLIGHT)))
        each, extra = divmod(n, IN_FLIGHT)

        async def lane(count: int) -> None:
            for _ in range(count):
                await client.enqueue("demo.noop")

        started = time.perf_counter()
        await asyncio.gather(*(lane(each + (i < extra)) for i in range(IN_FLIGHT)))
        return time.perf_counter() - started
