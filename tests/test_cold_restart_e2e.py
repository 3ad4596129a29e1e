"""Real brokers on a backlog a restart left cold (the restart checkpoint of
``corral log compact``): SIGKILLed while workers take the cold jobs, every
job runs once; a cold batch that reads back wrong stops the broker."""

from __future__ import annotations

import collections
import os
import signal
from pathlib import Path

from conftest import Env, json_events, kill_broker, wait_for, wait_until

import corral

SMALL_LOG = 'segment_size = "1MiB"\ndisk_reserve = "16KiB"\nmax_message_size = "512KiB"'
JOBS = 2000


def marks(path: Path) -> collections.Counter[str]:
    """Runs per job id, as e2e.mark wrote them."""
    if not path.exists():
        return collections.Counter()
    return collections.Counter(line.split()[0] for line in path.read_text().splitlines())


def test_cold_jobs_run_once_across_a_broker_killed_while_they_warm(env: Env) -> None:
    env.write_config(extra_broker=SMALL_LOG, processes=2, prefetch=4)
    out = env.home / "marks"
    broker = env.start("broker")
    env.wait_ready(broker)
    client = env.client()
    ids: list[str] = []
    for _ in range(JOBS // 500):
        ids += client.enqueue_many([corral.Job("e2e.mark", str(out)) for _ in range(500)])
    broker.signal(signal.SIGTERM)
    assert broker.wait(30) == 0
    done = env.run("log", "compact", "-c", str(env.config))
    assert done.returncode == 0, done.stderr
    assert list((env.home / "state" / "log").glob("*.ckpt"))

    daemon = env.start("run")
    env.wait_ready(daemon)
    wait_for(lambda: sum(marks(out).values()) >= 200, 60, message="some cold jobs to run")
    kill_broker(env, daemon)  # while workers hold, run and report cold jobs
    wait_until(
        lambda: client.status().queues.get("default", {}).get("succeeded", 0),
        lambda n: n == JOBS,
        90,
        message="every job to succeed",
    )
    replays = [e for e in json_events(daemon.output()) if e.get("event") == "broker.replayed"]
    assert len(replays) == 2 and all(e["cold_jobs"] > 0 for e in replays), replays
    runs = marks(out)
    assert set(runs) == set(ids)
    assert [job_id for job_id, n in runs.items() if n != 1] == []


def test_a_cold_batch_that_reads_back_wrong_stops_the_broker_with_70(env: Env) -> None:
    """Two cold batches' frames swapped in the base (each still a valid
    frame, the base's size and mtime kept: the checkpoint looks current):
    the broker starts, and the first batch it reads back is not what the
    checkpoint says. It exits 70 (``broker.log_corrupt``), the checkpoint
    gone; started again it replays the base in full and has every job."""
    from corral.broker import checkpoint
    from corral.broker.framing import read_header

    env.write_config(extra_broker=SMALL_LOG)
    broker = env.start("broker")
    env.wait_ready(broker)
    client = env.client()
    ids: list[str] = []
    for _ in range(4):
        ids += client.enqueue_many([corral.Job("e2e.noop") for _ in range(500)])
    broker.signal(signal.SIGTERM)
    assert broker.wait(30) == 0
    assert env.run("log", "compact", "-c", str(env.config)).returncode == 0
    log_dir = env.home / "state" / "log"
    (ckpt,) = log_dir.glob("*.ckpt")
    base = ckpt.with_suffix(".seg")
    header = read_header(base)
    loaded = checkpoint.load(log_dir, header.generation, header.seq, base)
    assert loaded is not None
    a, b = loaded.batches[0], loaded.batches[1]
    assert a.length == b.length and a.offset + a.length == b.offset
    st = base.stat()
    with open(base, "r+b") as f:
        f.seek(a.offset)
        both = f.read(a.length + b.length)
        f.seek(a.offset)
        f.write(both[a.length :] + both[: a.length])
    os.utime(base, ns=(st.st_atime_ns, st.st_mtime_ns))

    broker = env.start("broker")
    assert broker.wait(60) == 70, broker.output()
    assert [e for e in json_events(broker.output()) if e.get("event") == "broker.log_corrupt"]
    assert not list(log_dir.glob("*.ckpt"))
    broker = env.start("broker")
    env.wait_ready(broker)
    assert client.status().queues["default"]["queued"] == len(ids)
    assert all(client.job(job_id).status == "queued" for job_id in ids[::97])
