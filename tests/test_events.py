"""Job, worker and pool events on the broker's PUB endpoint
(``[broker] events_endpoint``), read by a real SUB socket and by
``corral events``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq
import zmq.auth
from conftest import CORRAL, Env, free_port, wait_for, worker_processes
from zmq.utils.monitor import recv_monitor_message

import corral
from corral.broker import protocol as p
from corral.config import loads
from corral.errors import ConfigError


def events_config(env: Env, **pool: str) -> str:
    endpoint = f"ipc://{env.home}/events.sock"
    env.write_config(
        extra_broker=f'events_endpoint = "{endpoint}"',
        extra_pool="\n".join(f"{k} = {v}" for k, v in pool.items()),
    )
    return endpoint


class Subscriber:
    """A SUB socket on the events endpoint, collecting what it reads."""

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(endpoint)
        self.seen: list[dict[str, Any]] = []

    def read(self) -> list[dict[str, Any]]:
        while self.sock.poll(50):
            topic, body = self.sock.recv_multipart()
            event = msgspec.msgpack.decode(body)
            assert event["event"] == topic.decode()
            self.seen.append(event)
        return self.seen

    def named(self, name: str, **fields: Any) -> list[dict[str, Any]]:
        return [
            e
            for e in self.read()
            if e["event"] == name and all(e.get(k) == v for k, v in fields.items())
        ]

    def close(self) -> None:
        self.sock.close(linger=0)


def subscribed(sub: Subscriber, client: corral.Client) -> None:
    """Enqueue probes until the subscription is live (ZeroMQ's slow joiner)."""

    def probe() -> bool:
        client.enqueue("e2e.noop", None, queue="probe")
        return bool(sub.named("job.enqueued", queue="probe"))

    wait_for(probe, 30, interval=0.1, message="the subscription")


def test_job_worker_and_pool_events_reach_a_subscriber(env: Env) -> None:
    endpoint = events_config(env)
    sub = Subscriber(endpoint)  # connected before the broker binds: sees its first events
    daemon = env.start("run")
    try:
        env.wait_ready(daemon)
        env.wait_workers(2)
        client = env.client()
        subscribed(sub, client)  # the workers' ups may have gone before it was live
        ok = client.enqueue("e2e.square", 3)
        assert client.result(ok, timeout=30) == 9
        bad = client.enqueue("e2e.order", {"item": 1}, max_attempts=1)
        with pytest.raises(corral.JobFailed):
            client.result(bad, timeout=30)
        flaky = client.enqueue("e2e.flaky", 2)
        assert client.result(flaky, timeout=30) == 2
        later = client.enqueue("e2e.square", 1, delay=3600)
        assert client.cancel(later)
        wait_for(lambda: sub.named("job.succeeded", job_id=flaky), 10, message="flaky's end")
        (enqueued,) = sub.named("job.enqueued", job_id=ok)
        assert enqueued["task"] == "e2e.square" and enqueued["queue"] == "default"
        (started,) = sub.named("job.started", job_id=ok)
        assert started["attempt"] == 1 and started["worker"]
        (succeeded,) = sub.named("job.succeeded", job_id=ok)
        assert succeeded["seconds"] >= 0 and succeeded["at"] >= started["at"]
        (failed,) = sub.named("job.failed", job_id=bad)
        assert failed["error"].startswith("ValidationError")
        assert len(sub.named("job.retried", job_id=flaky)) == 1
        assert sub.named("job.cancelled", job_id=later)
        # a worker killed: down, then its replacement up
        victim = worker_processes(daemon)[0]
        victim.kill()
        wait_for(
            lambda: sub.named("worker.down", pid=victim.pid),
            30,
            message=f"worker.down of {victim.pid}",
        )
        (down,) = sub.named("worker.down", pid=victim.pid)

        def replacement() -> list[dict[str, Any]]:
            return [e for e in sub.named("worker.up") if e["at"] >= down["at"]]

        (up,) = wait_for(replacement, 30, message="the replacement up")
        assert up["pid"] != victim.pid and up["queues"] == ["default"]
    finally:
        sub.close()


def test_a_pool_that_starts_or_stops_backing_off_is_an_event() -> None:
    from corral.broker.events import Events
    from corral.broker.protocol import PoolInfo, StatusInfo, SupervisorInfo

    context = zmq.Context.instance()
    pub = context.socket(zmq.PUB)
    pub.bind("inproc://events-test")
    sub = Subscriber("inproc://events-test")
    events = Events(pub)
    try:

        def status(failed: bool) -> StatusInfo:
            pool = PoolInfo("p", ["default"], 1, 3, failed)
            return StatusInfo({}, [], {}, supervisors=[SupervisorInfo("s", "h", 1, [pool], [])])

        events.refresh(status(False), 1.0)  # learns the state: no event
        wait_for(lambda: events.publish("probe", 0.0) or sub.named("probe"), 10)
        events.refresh(status(True), 2.0)
        events.refresh(status(True), 3.0)  # no change: no event
        events.refresh(status(False), 4.0)
        wait_for(lambda: sub.named("pool.recovered"), 10, message="pool.recovered")
        assert [(e["event"], e["at"]) for e in sub.read() if e["event"].startswith("pool.")] == [
            ("pool.backing_off", 2.0),
            ("pool.recovered", 4.0),
        ]
    finally:
        sub.close()
        events.close()


def test_events_are_dropped_not_queued_when_no_one_reads(env: Env) -> None:
    endpoint = events_config(env)
    broker = env.start("broker")
    env.wait_ready(broker)
    client = env.client()
    stalled = zmq.Context.instance().socket(zmq.SUB)  # subscribes, never reads
    stalled.setsockopt(zmq.SUBSCRIBE, b"")
    stalled.setsockopt(zmq.RCVHWM, 10)
    stalled.connect(endpoint)
    try:
        for _ in range(30):  # 30,000 job.enqueued events
            client.enqueue_many([corral.Job("e2e.noop", None) for _ in range(1000)])
        assert client.ping()
        stats = client.status().stats
        assert stats["jobs"] == 30_000
    finally:
        stalled.close(linger=0)


def test_corral_events_prints_events_as_json_lines(env: Env) -> None:
    events_config(env)
    broker = env.start("broker")
    env.wait_ready(broker)
    client = env.client()
    tail = subprocess.Popen(
        [CORRAL, "events", "--json", "--filter", "job.enq", "--count", "1", "-c", str(env.config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while tail.poll() is None:  # probes until its subscription is live
            assert time.monotonic() < deadline, "corral events printed nothing"
            client.enqueue("e2e.square", 2, queue="tail")
            time.sleep(0.1)
        out, err = tail.communicate(timeout=10)
    finally:
        tail.kill()
    assert tail.returncode == 0, err
    event = json.loads(out.strip())
    assert event["event"] == "job.enqueued" and event["queue"] == "tail"


def test_events_without_an_endpoint_is_a_usage_error(env: Env) -> None:
    done = env.run("events", "-c", str(env.config))
    assert done.returncode == 2 and "events_endpoint" in done.stderr


def test_a_worker_that_comes_and_goes_within_a_second_is_an_up_and_a_down(env: Env) -> None:
    """Worker events come from the worker table as it changes, not from a
    status read once a second: a registration that lasts a millisecond is
    still an up and a down."""
    events_config(env)
    broker = env.start("broker")
    env.wait_ready(broker)
    sub = Subscriber(f"ipc://{env.home}/events.sock")
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    try:
        subscribed(sub, env.client())
        dealer.connect(f"ipc://{env.home}/w.sock")
        dealer.send(p.encode(p.Ready("flash", ["default"], 1, 1, [], "flash-host", os.getpid())))
        dealer.send(p.encode(p.Bye()))
        wait_for(lambda: sub.named("worker.down", worker="flash"), 30, message="worker.down")
        (up,) = sub.named("worker.up", worker="flash")
        (down,) = sub.named("worker.down", worker="flash")
        assert up["host"] == down["host"] == "flash-host" and up["queues"] == ["default"]
        assert up["at"] <= down["at"]
    finally:
        dealer.close(linger=0)
        sub.close()


def curve_subscriber(
    endpoint: str, server_public: Path, secret_file: Path
) -> tuple[zmq.Socket[Any], zmq.Socket[Any]]:
    """A CURVE SUB on ``endpoint`` with the key pair in ``secret_file``,
    and a monitor of its handshakes."""
    sock = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.curve_serverkey, _ = zmq.auth.load_certificate(server_public)
    sock.curve_publickey, sock.curve_secretkey = zmq.auth.load_certificate(secret_file)
    monitor = sock.get_monitor_socket(
        zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    )
    sock.connect(endpoint)
    return sock, monitor


def handshake(monitor: zmq.Socket[Any], wanted: int) -> None:
    """Wait until ``monitor`` reports the handshake event ``wanted``."""
    deadline = time.monotonic() + 30
    while (left := deadline - time.monotonic()) > 0:
        if monitor.poll(left * 1000) and recv_monitor_message(monitor)["event"] == wanted:
            return
    raise AssertionError(f"timed out after 30s waiting for handshake event {wanted}")


def test_events_over_tcp_take_only_authorized_client_keys(env: Env) -> None:
    """A tcp events endpoint is a CURVE server: `corral events` subscribes
    with the host's client key; a key not in authorized_keys_dir is refused
    at the handshake, and a key removed from it (SIGHUP) loses its
    subscription and cannot make it again."""
    keys = env.home / "keys"
    for name in ("server", "client", "stranger"):
        assert env.run("keys", name, "--directory", str(keys)).returncode == 0
    (keys / "clients").mkdir(mode=0o700)
    (keys / "clients" / "client.key").write_bytes((keys / "client.key").read_bytes())
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    env.write_config(extra_broker=f'events_endpoint = "{endpoint}"')
    with env.config.open("a") as config:
        config.write(
            f'[security]\nserver_secret_key = "{keys}/server.key_secret"\n'
            f'server_public_key = "{keys}/server.key"\n'
            f'client_secret_key = "{keys}/client.key_secret"\n'
            f'authorized_keys_dir = "{keys}/clients"\n'
        )
    assert env.run("check-config", "--no-plugins", "-c", str(env.config)).returncode == 0
    broker = env.start("broker")
    env.wait_ready(broker)
    client = env.client()
    tail = subprocess.Popen(
        [CORRAL, "events", "--json", "--count", "1", "-c", str(env.config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    admitted, admitted_monitor = curve_subscriber(
        endpoint, keys / "server.key", keys / "client.key_secret"
    )
    stranger, stranger_monitor = curve_subscriber(
        endpoint, keys / "server.key", keys / "stranger.key_secret"
    )
    try:
        deadline = time.monotonic() + 30
        while tail.poll() is None:  # probes until its subscription is live
            assert time.monotonic() < deadline, "corral events printed nothing over tcp"
            client.enqueue("e2e.noop", None, queue="tcp")
            time.sleep(0.1)
        out, err = tail.communicate(timeout=10)
        assert tail.returncode == 0, err
        assert json.loads(out)["event"] == "job.enqueued"
        handshake(admitted_monitor, zmq.EVENT_HANDSHAKE_SUCCEEDED)
        handshake(stranger_monitor, zmq.EVENT_HANDSHAKE_FAILED_AUTH)

        (keys / "clients" / "client.key").unlink()  # revoked: dropped, and refused again
        broker.signal(signal.SIGHUP)
        wait_for(lambda: "events.subscribers_dropped" in broker.output(), 30, message="the drop")
        handshake(admitted_monitor, zmq.EVENT_HANDSHAKE_FAILED_AUTH)
    finally:
        tail.kill()
        for sock, monitor in ((admitted, admitted_monitor), (stranger, stranger_monitor)):
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)


@pytest.mark.parametrize(
    ("security", "named"),
    [
        ("", "broker.events_endpoint"),
        ('server_secret_key = "s.key_secret"', "security.authorized_keys_dir"),
    ],
)
def test_a_tcp_events_endpoint_needs_curve_and_client_keys(security: str, named: str) -> None:
    text = f'[broker]\nevents_endpoint = "tcp://127.0.0.1:5557"\n[security]\n{security}\n'
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        loads(text)


def test_a_subscriber_config_names_a_tcp_events_endpoint_with_the_brokers_public_key() -> None:
    text = (
        '[broker]\nevents_endpoint = "tcp://broker.internal:5557"\n'
        '[security]\nserver_public_key = "server.key"\nclient_secret_key = "c.key_secret"\n'
    )
    assert loads(text).broker.events_endpoint == "tcp://broker.internal:5557"
