"""tcp endpoints on IPv6 addresses (``tcp://[::1]:5555``): libzmq's sockets
are IPv4-only unless ZMQ_IPV6 is set, so these never bound, nor connected.
The broker, its workers, a client and an events subscriber, all real."""

from __future__ import annotations

import socket
import subprocess

import pytest
from conftest import CORRAL, Env, wait_for

import corral


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


pytestmark = pytest.mark.skipif(
    not _ipv6_loopback(), reason="this machine has no IPv6 loopback (::1) to bind"
)


def free_port6() -> int:
    with socket.socket(socket.AF_INET6) as sock:
        sock.bind(("::1", 0))
        return int(sock.getsockname()[1])


def test_jobs_and_events_go_over_ipv6_tcp_endpoints(env: Env) -> None:
    client_ep, worker_ep, events_ep = (f"tcp://[::1]:{free_port6()}" for _ in range(3))
    text = env.config.read_text()
    text = text.replace(f'"ipc://{env.home}/c.sock"', f'"{client_ep}"')
    text = text.replace(f'"ipc://{env.home}/w.sock"', f'"{worker_ep}"')
    text = text.replace("[broker]\n", f'[broker]\nevents_endpoint = "{events_ep}"\n')
    env.config.write_text(text + "\n[security]\nallow_insecure_tcp = true\n")
    assert env.run("check-config", "--no-plugins", "-c", str(env.config)).returncode == 0
    daemon = env.start("run")
    client = corral.Client.from_config(str(env.config))
    env.clients.append(client)

    def answers() -> bool:
        assert daemon.alive(), daemon.output()
        try:
            client.ping()
        except corral.BrokerUnavailable:
            return False
        return True

    wait_for(answers, 30, message="the broker on [::1]")
    tail = subprocess.Popen(
        [
            CORRAL,
            "events",
            "-c",
            str(env.config),
            "--json",
            "--count",
            "1",
            "--filter",
            "job.succeeded",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # the workers connect over [::1] too; the subscriber may join late
        wait_for(
            lambda: (
                client.result(client.enqueue("e2e.square", 3), timeout=30) == 9
                and tail.poll() is not None
            ),
            60,
            interval=0.2,
            message="a job done and its event read",
        )
        out, err = tail.communicate(timeout=10)
        assert tail.returncode == 0, err
        assert '"event":"job.succeeded"' in out.replace(" ", ""), out
    finally:
        tail.kill()
        tail.wait(10)
