"""Hostile input on both endpoints never takes the broker down: malformed
frames (fixed and fuzzed by hypothesis), wrong versions, unknown ops, deep
nesting, too many frames, absurd credit; and a full disk or an unreachable
broker is a clear error. NaN and infinities: test_hostile_floats.py; floods
of reconnecting identities and memory: test_hostile_storm.py."""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import zmq
from conftest import Env, wait_for
from hypothesis import given, settings
from hypothesis import strategies as st
from inproc import FakeWorker, InProcessBroker
from structlog.testing import capture_logs

import corral
from corral.broker import protocol as p
from corral.broker.core import CLIENT, WORKER

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


# -- fuzzing both endpoints (hypothesis), in process ----------------------------

#: Examples per fuzz test: a few hundred in `make test`, many more in `make soak`.
FAST_EXAMPLES = 100
SOAK_EXAMPLES = 20_000

_TAGS = {
    CLIENT: [t.__name__.lower() for t in p.ClientRequest.__args__],  # type: ignore[attr-defined]
    WORKER: [t.__name__.lower() for t in p.WorkerReport.__args__],  # type: ignore[attr-defined]
}

_leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
_values = st.recursive(
    _leaves,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=30,
)


def _bodies(side: str) -> st.SearchStrategy[bytes]:
    """Frames a hostile peer might send on ``side``: random bytes, random
    msgpack, and arrays that start like a real message (a known tag, a
    request number, then anything, with the protocol version or not)."""
    shaped = st.builds(
        lambda tag, rest, v: msgspec.msgpack.encode([tag, *rest, *v]),
        st.sampled_from(_TAGS[side]),
        st.lists(_values, max_size=9),
        st.sampled_from([[], [p.PROTOCOL_VERSION], [p.PROTOCOL_VERSION + 1], [-1]]),
    )
    return st.binary(max_size=200) | _values.map(msgspec.msgpack.encode) | shaped


def _messages(side: str) -> st.SearchStrategy[list[bytes]]:
    """One message's frames: usually [identity, body], sometimes too few or too many."""
    identity = st.binary(min_size=1, max_size=8)
    two = st.tuples(identity, _bodies(side)).map(list)
    other = st.lists(st.binary(max_size=50), max_size=6).filter(lambda f: len(f) != 2)
    return st.one_of(two, two, two, other)


def _fuzz(side: str, examples: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="fz", dir="/tmp"))
    broker = InProcessBroker(tmp, fsync="never")
    job_id = broker.enqueue(id="job-1")
    ran = [0]

    @settings(max_examples=examples, deadline=None, database=None)
    @given(st.lists(_messages(side), min_size=1, max_size=20))
    def check(batch: list[list[bytes]]) -> None:
        broker.run_pass(*[(side, frames) for frames in batch])
        broker.clock.advance(0.3)
        ran[0] += 1
        # no message ever raised inside a handler: each was refused or served
        assert broker.core.stats["handler_errors"] == 0
        assert isinstance(broker.request(p.Ping(1), identity=b"legit"), p.Pong)

    try:
        with capture_logs():
            check()
        assert broker.job(job_id) is not None
    finally:
        broker.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"fuzzed {side}: {ran[0]} examples")


@pytest.mark.parametrize("side", [CLIENT, WORKER])
def test_fuzzed_frames_are_refused_or_served(side: str) -> None:
    _fuzz(side, FAST_EXAMPLES)


@pytest.mark.soak
@pytest.mark.parametrize("side", [CLIENT, WORKER])
def test_fuzzed_frames_soak(side: str) -> None:
    _fuzz(side, SOAK_EXAMPLES)


# -- absurd credit, forged supervisors, parked waits: in process -------------------


def test_absurd_credit_is_refused_naming_the_field(tmp_path: Path) -> None:
    broker = InProcessBroker(tmp_path)
    try:
        with capture_logs() as logs:
            for credit, concurrency in ((2**62, 1), (-1, 1), (1, 2**40)):
                ready = p.Ready("w", ["default"], credit, concurrency, [], "h", 1)
                broker.run_pass((WORKER, [b"greedy", p.encode(ready)]))
        assert len(broker.core.dispatcher.workers) == 0
        reasons = [e["reason"] for e in logs if e["event"] == "broker.malformed_frame"]
        assert len(reasons) == 3
        assert "Ready.credit" in reasons[0] and "Ready.concurrency" in reasons[2]
    finally:
        broker.close()


def test_greedy_worker_that_never_heartbeats_gives_its_jobs_back(tmp_path: Path) -> None:
    """The most credit a worker may claim, and then silence: its jobs go back
    after the liveness window, charged at most its concurrency, and an
    honest worker runs them all."""
    broker = InProcessBroker(tmp_path)
    try:
        ids = [broker.enqueue(id=f"job-{i}") for i in range(50)]
        greedy = FakeWorker(broker, b"greedy", credit=p.MAX_CREDIT)
        assert len(greedy.ready()) == 50
        greedy.go_silent()
        broker.advance(4.0)  # past heartbeat_interval * liveness (3 s)
        assert len(broker.core.dispatcher.workers) == 0
        honest = FakeWorker(broker, b"honest", credit=100)
        got = honest.ready() + honest.inbox()
        assert sorted(d.job_id for d in got) == sorted(ids)
        for d in got:
            honest.finish(d, "ok", 1)
        infos = [broker.job(i) for i in ids]
        assert all(i is not None and i.status == "succeeded" for i in infos)
        assert sum(i.attempts > 1 for i in infos if i is not None) <= 1  # its concurrency
    finally:
        broker.close()


def test_forged_supervisor_reports_are_bounded(tmp_path: Path) -> None:
    """Many forged supervisors, and big ones: the table keeps at most its
    count and its bytes, and says so."""
    broker = InProcessBroker(tmp_path)
    table = broker.core.service.supervisors
    try:
        workers = [p.ProcessInfo("p", i, i, 1, ["j" * 60] * 20, 1.0) for i in range(2000)]
        big = p.SupervisorInfo("big/1", "h", 1, [], workers)  # over MAX_REPORT_BYTES
        with capture_logs() as logs:
            broker.request(p.SupervisorReport(1, big))
            for i in range(3000):
                info = p.SupervisorInfo(f"forged/{i}", "h", i, [], workers[:100])
                broker.run_pass((CLIENT, [b"forger", p.encode(p.SupervisorReport(1, info))]))
        assert len(table) <= table.limit
        assert table.size <= table.max_bytes
        assert "big/1" not in {s.supervisor_id for s in table.current(0.0)}
        assert broker.core.stats["supervisor_reports_refused"] >= 1000
        assert [e for e in logs if e["event"] == "broker.supervisors_full"]
        assert isinstance(broker.request(p.GetStatus(2)), p.StatusReply)
    finally:
        broker.close()


def test_parked_waits_are_bounded_per_peer_and_in_all(tmp_path: Path) -> None:
    broker = InProcessBroker(tmp_path)
    waiters = broker.core.waiters
    waiters.per_peer, waiters.limit = 5, 8
    try:
        job_id = broker.enqueue(id="job-1")
        for req in range(20):
            broker.run_pass((CLIENT, [b"flooder", p.encode(p.GetResult(req, job_id, 3600.0))]))
        assert len(waiters) == 5  # its share; the older ones were answered now
        for req in range(20):
            identity = f"peer-{req}".encode()
            broker.run_pass((CLIENT, [identity, p.encode(p.GetResult(req, job_id, 3600.0))]))
        assert len(waiters) == 8
        assert broker.core.stats["waits_cut_short"] == 15 + 17
        # every request of the flooder got exactly one answer, "queued": its
        # last five too, cut short (due first) when the others filled the table
        answered = [b for i, b in broker.clients.sent if i == b"flooder"]
        assert len(answered) == 20
        assert all(p.decode(p.client_reply_decoder, body).status == "queued" for body in answered)
    finally:
        broker.close()


def test_oversized_frames_and_frame_counts(env: Env) -> None:
    """A frame over ``max_message_size`` costs its sender the connection
    (libzmq), and a message of thousands of frames is one malformed
    message; the broker serves on."""
    env.write_config(processes=0, extra_broker='max_message_size = "64KiB"')
    broker = env.start("broker")
    env.wait_ready(broker)
    client = env.client()
    ctx = zmq.Context()
    try:
        for endpoint in (env.endpoint, f"ipc://{env.home}/w.sock"):
            big = ctx.socket(zmq.DEALER)
            big.connect(endpoint)
            big.send(b"\x00" * (1024 * 1024))  # over the cap: dropped with the connection
            many = ctx.socket(zmq.DEALER)
            many.connect(endpoint)
            many.send_multipart([b"x" * 100] * 10_000)
            for sock in (big, many):
                sock.close(linger=2000)
        wait_for(
            lambda: client.status().stats.get("malformed_frames", 0) >= 2,
            message="the many-frame messages to be counted",
        )
        assert client.status().stats["malformed_frames"] == 2  # one each, not 10,000
        assert broker.alive()
        assert client.ping()
    finally:
        ctx.term()
