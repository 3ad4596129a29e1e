"""The broker at a million jobs: memory per pending job, and restart time.

One run does both scenarios on one instance (``corral broker`` alone, no
workers), because the second needs the log the first wrote:

1. **memory**: N jobs (default 1,000,000) with 100-byte payloads (the
   msgpack of a 98-byte bytes value) are enqueued with ``enqueue_many`` in
   batches of 1,000, and the broker's RSS (``/proc``, via psutil) is read
   before and after. Per job = RSS growth / N; beyond the payload = that
   less the 100 payload bytes.
2. **restart**: once the broker has indexed the log's segments (see
   broker/segindex.py: by chunks every 8 MiB as each is written, a last one
   when it is sealed, and one of the tail once the broker has been idle
   2 s, in a child; the wait is reported as ``index_wait_s``, what
   no chunk covers then as ``unindexed_tail_kib``), it is killed (SIGKILL:
   a crash, no shutdown work), the log's used bytes are summed (each segment up to its last non-zero
   byte), and the broker is started again on it. The restart time runs
   from the ``Popen`` until it answers a ping (polled every 20 ms); replay MB/s = log bytes /
   restart time (interpreter start and imports are inside it). The RSS after
   the restart and the CPU seconds the broker used until it answered (less
   sensitive to a busy machine than the wall time) are read too.
3. **restart with a checkpoint**: the broker is killed again, the log is
   compacted offline (``corral log compact``: the rewrite the broker's own
   compaction runs, which writes the base's restart checkpoint, see
   broker/checkpoint.py), and the broker is started on it and timed the
   same way (the restart's ``_ckpt`` figures; the log bytes are the
   compacted log's).

The broker's processes may write their bytecode (``PYTHONDONTWRITEBYTECODE``
is dropped): a restart of an installed broker finds its modules compiled.

Used by ``bench/run.py`` (``--only scale``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
from harness import Instance, Settings, corral_command

from corral.broker.checkpoint import chunks_of
from corral.broker.framing import content_end
from corral.broker.segindex import CHUNK_IDLE_BYTES
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


def _chunked(log_dir: Path, segment: Path) -> int:
    """Where the chunk indexes of ``segment`` end (0: it has none)."""
    return max((end for _, end, _ in chunks_of(log_dir, int(segment.stem))), default=0)


def _wait_indexed(state_dir: Path, timeout: float = 300.0) -> tuple[int, float, int]:
    """Wait until every sealed segment of the log has its index and the
    chunk indexes of the segment being written cover all but its last
    ``CHUNK_IDLE_BYTES`` (the broker writes one for the tail once it has
    been idle ``CHUNK_IDLE`` seconds); returns (sealed segments, seconds
    waited, bytes of the segment being written that no chunk covers)."""
    log_dir = state_dir / "log"
    started = time.perf_counter()
    while True:
        segments = sorted(log_dir.glob("*.seg"))
        sealed, last = segments[:-1], segments[-1]
        used = content_end(last.read_bytes())
        covered = _chunked(log_dir, last)
        if all(
            seg.with_suffix(".idx").exists() or _chunked(log_dir, seg) == seg.stat().st_size
            for seg in sealed
        ) and (used - covered < CHUNK_IDLE_BYTES):
            return len(sealed), time.perf_counter() - started, max(0, used - covered)
        if time.perf_counter() - started > timeout:
            raise RuntimeError(f"the segments of {log_dir} were not indexed in {timeout} s")
        time.sleep(0.5)  # polling files another process writes


def bench_scale(fsync: str, n: int) -> dict[str, Any]:
    """Both scenarios; see the module docstring."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)  # (see the module docstring)
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
        sealed, index_wait, unindexed = _wait_indexed(Path(inst.root) / "s")
        os.killpg(broker.popen.pid, signal.SIGKILL)
        broker.popen.wait()
        inst.procs.remove(broker)
        size = log_bytes(Path(inst.root) / "s")
        restart_s, restart_cpu, rss_restarted = _restart(inst)
        _kill(inst)
        subprocess.run(
            [*corral_command(), "log", "compact", "-c", str(inst.config_path)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        size_ckpt = log_bytes(Path(inst.root) / "s")
        restart_ckpt_s, restart_ckpt_cpu, rss_ckpt = _restart(inst)
    per_job = (after - before) / n
    return {
        "jobs": n,
        "enqueue_rate": n / enqueue_s,
        "rss_before_mib": before / 2**20,
        "rss_after_mib": after / 2**20,
        "bytes_per_job": per_job,
        "beyond_payload": per_job - PAYLOAD_SIZE,
        "log_mib": size / 2**20,
        "sealed_segments": sealed,
        "index_wait_s": index_wait,
        "unindexed_tail_kib": unindexed / 1024,
        "restart_s": restart_s,
        "replay_mb_s": size / 1e6 / restart_s,
        "rss_after_restart_mib": rss_restarted / 2**20,
        "restart_cpu_s": restart_cpu,
        "log_ckpt_mib": size_ckpt / 2**20,
        "restart_ckpt_s": restart_ckpt_s,
        "replay_ckpt_mb_s": size_ckpt / 1e6 / restart_ckpt_s,
        "restart_ckpt_cpu_s": restart_ckpt_cpu,
        "rss_after_ckpt_restart_mib": rss_ckpt / 2**20,
    }


def _restart(inst: Instance) -> tuple[float, float, int]:
    """Start the broker and wait for its first answer: (seconds from the
    Popen, its CPU seconds by then, its RSS then)."""
    started = time.perf_counter()
    again = inst.start("broker")
    inst.wait_ready(timeout=RESTART_TIMEOUT)  # polls ping every 20 ms
    seconds = time.perf_counter() - started
    times = psutil.Process(again.popen.pid).cpu_times()
    return seconds, times.user + times.system, _rss(again.popen.pid)


def _kill(inst: Instance) -> None:
    """SIGKILL the broker (a crash: no shutdown work)."""
    broker = next(proc for proc in inst.procs if proc.name == "broker")
    os.killpg(broker.popen.pid, signal.SIGKILL)
    broker.popen.wait()
    inst.procs.remove(broker)
