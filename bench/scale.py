"""The broker at a million jobs: memory per pending job, and restart time.

One run does both scenarios on one instance (``corral broker`` alone, no
workers), because the second needs the log the first wrote:

1. **memory**: N jobs (default 1,000,000) with 100-byte payloads (the
   msgpack of a 98-byte bytes value) are enqueued with ``enqueue_many`` in
   batches of 1,000, and the broker's RSS (``/proc``, via psutil) is read
   before and after. Per job = RSS growth / N; beyond the payload = that
   less the 100 payload bytes.
2. **restart**: the broker is killed (SIGKILL: a crash, no shutdown work),
   the log's used bytes are summed (each segment up to its last non-zero
   byte), and the broker is started again on it. The restart time runs
   from the ``Popen`` until it answers a ping (polled every 20 ms); replay MB/s = log bytes /
   restart time (interpreter start and imports are inside it). The RSS after
   the restart is read too.

Used by ``bench/run.py`` (``--only scale``).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import psutil
from harness import Instance, Settings

from corral.broker.framing import content_end
from corral.client import Client, Job

#: msgpack of a 98-byte bytes value: 2 bytes of header, 100 in all.
PAYLOAD = bytes(98)
PAYLOAD_SIZE = 100
BATCH = 1_000
RESTART_TIMEOUT = 300.0


def log_bytes(state_dir: Path) -> int:
    """Bytes the log's segments hold (each up to its last non-zero byte)."""
    total = 0
    for seg in sorted((state_dir / "log").glob("*.seg")):
        total += content_end(seg.read_bytes())
    return total


def _rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def _enqueue(client: Client, n: int) -> None:
    left = n
    while left > 0:
        size = min(BATCH, left)
        client.enqueue_many([Job("demo.noop", PAYLOAD) for _ in range(size)])
        left -= size


def bench_scale(fsync: str, n: int) -> dict[str, Any]:
    """Both scenarios; see the module docstring."""
    with Instance(Settings(fsync=fsync)) as inst:
        broker = inst.start("broker")
        inst.wait_ready()
        with inst.client(timeout=60.0) as client:
            _enqueue(client, BATCH)  # warm up: sockets, heaps, the first template
            time.sleep(0.5)  # let the allocator settle before the baseline reading
            before = _rss(broker.popen.pid)
            started = time.perf_counter()
            _enqueue(client, n)
            enqueue_s = time.perf_counter() - started
            queued = client.status().queues.get("default", {}).get("queued", 0)
        if queued != n + BATCH:
            raise RuntimeError(f"expected {n + BATCH} queued jobs, the broker has {queued}")
        after = _rss(broker.popen.pid)
        os.killpg(broker.popen.pid, signal.SIGKILL)
        broker.popen.wait()
        inst.procs.remove(broker)
        size = log_bytes(Path(inst.root) / "s")
        started = time.perf_counter()
        again = inst.start("broker")
        inst.wait_ready(timeout=RESTART_TIMEOUT)  # polls ping every 20 ms
        restart_s = time.perf_counter() - started
        rss_restarted = _rss(again.popen.pid)
    per_job = (after - before) / n
    return {
        "jobs": n,
        "enqueue_rate": n / enqueue_s,
        "rss_before_mib": before / 2**20,
        "rss_after_mib": after / 2**20,
        "bytes_per_job": per_job,
        "beyond_payload": per_job - PAYLOAD_SIZE,
        "log_mib": size / 2**20,
        "restart_s": restart_s,
        "replay_mb_s": size / 1e6 / restart_s,
        "rss_after_restart_mib": rss_restarted / 2**20,
    }
