"""Bad input never takes the broker down: malformed frames, a full disk,
an unreachable broker."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import zmq
from conftest import Env, wait_for

import corral

GARBAGE = [
    [b""],
    [b"\x00\x01\x02 not msgpack"],
    [msgspec.msgpack.encode("just a string")],
    [msgspec.msgpack.encode(["enqueue", "not-an-int", [], 1])],
    [msgspec.msgpack.encode(["ping", 1, 99])],  # a future protocol version
    [msgspec.msgpack.encode(["no-such-op", 1, 1])],
    [b"\x91" * 100_000 + b"\xc0"],  # 100,000 nested arrays
    [b"a", b"b", b"c", b"d"],  # too many frames
    [msgspec.msgpack.encode(["report", [["x", "not-a-lease"]], [], 1])],
    [msgspec.msgpack.encode(["ready", "w", ["q"], "lots", 1, [], "h", 1, 1])],
]


def _spray(endpoint: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(endpoint)
    for frames in GARBAGE:
        sock.send_multipart(frames)
    time.sleep(0.2)  # let the frames leave before the socket closes
    sock.close()
    ctx.term()


def test_malformed_frames_leave_the_broker_serving(env: Env) -> None:
    daemon = env.start("run")
    env.wait_ready(daemon)
    client = env.client()
    # `corral run` restarts a broker that died: the same broker must answer
    # after the garbage as before it, not a successor.
    broker_id = client.ping()
    assert client.status().broker_id == broker_id
    _spray(env.endpoint)
    _spray(f"ipc://{env.home}/w.sock")
    wait_for(
        lambda: client.status().stats.get("malformed_frames", 0) >= 2 * len(GARBAGE),
        message="the broker to count the malformed frames",
    )
    assert client.result(client.enqueue("e2e.square", 12), timeout=30) == 144
    # The same broker, at every look for a second (five heartbeats): also a
    # crash that comes a few passes later shows.
    until = time.monotonic() + 1.0
    while time.monotonic() < until:
        assert client.ping() == broker_id
        time.sleep(0.02)
    status = client.status()
    assert status.broker_id == broker_id
    assert status.stats["malformed_frames"] == 2 * len(GARBAGE)  # each one, once
    assert daemon.alive()
    out = daemon.output()
    assert "broker.malformed_frame" in out
    assert "supervisor.broker_exited" not in out


def test_bad_version_gets_a_clear_error_reply(env: Env) -> None:
    broker = env.start("broker")
    env.wait_ready(broker)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(env.endpoint)
    try:
        sock.send(msgspec.msgpack.encode(["ping", 7, 99]))
        assert sock.poll(10_000)
        reply = msgspec.msgpack.decode(sock.recv())
        assert reply[0] == "errorreply"
        assert reply[2] == "version"
        assert "99" in reply[3]
    finally:
        sock.close(0)
        ctx.term()


def test_unreachable_broker_raises_within_the_timeout(env: Env) -> None:
    client = corral.Client(env.endpoint, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(corral.BrokerUnavailable, match="no answer from the broker"):
        client.enqueue("e2e.square", 1)
    assert time.monotonic() - started < 10  # generous: it must not hang
    client.close()


@pytest.fixture
def small_disk(env: Env) -> Iterator[Path]:
    """A real 2 MiB filesystem (tmpfs) for the broker's state."""
    mount = env.home / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        env.close()
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_refuses_new_jobs_and_loses_none(env: Env, small_disk: Path) -> None:
    env.write_config(
        state_dir=f"{small_disk}/state",
        extra_broker='segment_size = "256KiB"\ndisk_reserve = "64KiB"\n'
        'max_message_size = "128KiB"\n'
        'compact_min_size = "64MiB"',
    )
    broker = env.start("broker")
    env.wait_ready(broker)
    client = env.client()
    accepted: list[str] = []
    payload = "x" * 4000
    with pytest.raises(corral.DiskFull, match="disk is full"):
        for _ in range(2000):
            accepted.append(client.enqueue("e2e.noop", payload))
    assert len(accepted) > 10
    assert broker.alive()
    assert client.ping()  # still serving
    assert client.job(accepted[0]).status == "queued"
    broker.signal(signal.SIGKILL)
    broker.wait(10)
    broker = env.start("broker", name="broker-again")
    env.wait_ready(broker)
    client = env.client()
    for job_id in accepted:
        assert client.job(job_id).status == "queued"
    assert client.status().queues["default"]["queued"] == len(accepted)
