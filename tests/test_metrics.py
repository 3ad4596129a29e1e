"""Prometheus metrics of a running daemon (``[metrics] listen``), scraped
over HTTP and read with prometheus-client's own parser."""

from __future__ import annotations

import signal
import socket
import urllib.request
from collections.abc import Callable

import pytest
from conftest import Env, broker_processes, free_port, wait_for, wait_new_broker
from prometheus_client.parser import text_string_to_metric_families

import corral

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def with_metrics(env: Env, listen: str) -> None:
    env.config.write_text(env.config.read_text() + f'\n[metrics]\nlisten = "{listen}"\n')


def eventually(port: int, check: Callable[[Samples], bool], what: str) -> Samples:
    """Scrape until ``check`` holds (the state figures are refreshed each second)."""
    found: list[Samples] = []

    def ok() -> bool:
        found[:] = [scrape(port)]
        return check(found[0])

    wait_for(ok, 30, message=what)
    return found[0]


def test_a_scrape_of_a_running_daemon_shows_queues_jobs_log_workers_and_pools(env: Env) -> None:
    port = free_port()
    with_metrics(env, f"127.0.0.1:{port}")
    daemon = env.start("run")
    env.wait_ready(daemon)
    env.wait_workers(2)
    client = env.client()
    ok = [client.enqueue("e2e.square", i) for i in range(5)]
    for job_id in ok:
        client.result(job_id, timeout=30)
    bad = client.enqueue("e2e.order", {"item": 1}, max_attempts=1)
    with pytest.raises(corral.JobFailed):
        client.result(bad, timeout=30)
    flaky = client.enqueue("e2e.flaky", 2)  # fails once, retried, then succeeds
    assert client.result(flaky, timeout=30) == 2
    # CPU a worker surely spends (a forked worker's own start and eight tiny
    # jobs may take less than the clock tick the CPU figure counts in)
    assert client.result(client.enqueue("e2e.spin", 0.05), timeout=30) == 1
    waiting = client.enqueue("e2e.square", 1, queue="nobody")  # no worker serves it

    host = socket.gethostname()
    samples = eventually(
        port,
        lambda s: (
            value(s, "corral_queue_jobs", queue="nobody", status="queued") == 1
            and (value(s, "corral_queue_latency_seconds", queue="nobody") or 0) > 0
            and value(s, "corral_pool_processes", host=host, pool="default") == 2
            # a worker's RSS is read once a second: 0 until the first reading
            and all(
                (value(s, "corral_worker_rss_bytes", host=host, pool="default", slot=slot) or 0) > 0
                for slot in ("0", "1")
            )
            # read once a second too: the spin shows once a reading follows it
            and sum(
                value(s, "corral_worker_cpu_seconds_total", host=host, pool="default", slot=slot)
                or 0
                for slot in ("0", "1")
            )
            >= 0.04
        ),
        "the queue and pool gauges",
    )
    assert value(samples, "corral_queue_jobs", queue="default", status="succeeded") == 7
    assert value(samples, "corral_queue_jobs", queue="default", status="failed") == 1
    assert value(samples, "corral_jobs_processed_total", task="e2e.square") == 5
    assert value(samples, "corral_jobs_processed_total", task="e2e.flaky") == 1
    assert value(samples, "corral_jobs_failed_total", task="e2e.order") == 1
    assert value(samples, "corral_jobs_retried_total", task="e2e.flaky") == 1
    assert value(samples, "corral_job_duration_seconds_count", task="e2e.square") == 5
    assert value(samples, "corral_job_duration_seconds_count", task="e2e.flaky") == 2
    assert value(samples, "corral_job_wait_seconds_count", task="e2e.square") == 5
    assert (value(samples, "corral_log_fsync_seconds_count") or 0) > 0
    assert (value(samples, "corral_log_bytes") or 0) > 0
    assert value(samples, "corral_workers_connected") == 2
    assert value(samples, "corral_pool_processes", host=host, pool="default") == 2
    assert (value(samples, "corral_pool_rss_bytes", host=host, pool="default") or 0) > 10 * 2**20
    assert value(samples, "corral_pool_restarts_total", host=host, pool="default") == 0
    cpu = 0.0
    for slot in ("0", "1"):
        labels = {"host": host, "pool": "default", "slot": slot}
        assert (value(samples, "corral_worker_rss_bytes", **labels) or 0) > 10 * 2**20
        seconds = value(samples, "corral_worker_cpu_seconds_total", **labels)
        assert seconds is not None and seconds >= 0  # a clock-tick's granularity: maybe 0 yet
        cpu += seconds
    assert cpu >= 0.04, "the workers spun 0.05 s between them"
    assert client.job(waiting).status == "queued"


@pytest.mark.parametrize("command", ["run", "broker"])
@pytest.mark.parametrize("fault", ["in use", "not this host"])
def test_a_metrics_address_that_cannot_be_bound_stops_the_start_with_exit_2(
    env: Env, command: str, fault: str
) -> None:
    """As an events endpoint does: the setting, the address and the fix,
    and nothing left behind (a metrics port that only logged went unseen)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        if fault == "not this host":
            listen = f"203.0.113.9:{free_port()}"  # TEST-NET-3: no host here has it
        with_metrics(env, listen)
        daemon = env.start(command)
        assert daemon.wait(60) == 2, daemon.output()
    line = next(ln for ln in daemon.output().splitlines() if "metrics.listen" in ln)
    assert listen in line and "port" in line and "Traceback" not in daemon.output(), line
    assert not (env.home / "state" / "broker.lock").exists()


def test_a_broker_restarted_while_its_metrics_port_is_taken_serves_on(env: Env) -> None:
    """Past the start, metrics never take the queue down: the supervisor's
    new broker logs the port it cannot have and serves jobs."""
    port = free_port()
    with_metrics(env, f"127.0.0.1:{port}")
    daemon = env.start("run")
    env.wait_ready(daemon)
    client = env.client()
    old = client.ping()
    daemon.signal(signal.SIGSTOP)  # no new broker until the port is taken
    taken = socket.socket()
    try:
        (broker,) = broker_processes(daemon)
        broker.kill()
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # its threads end a moment after its main one: the port is free then
        wait_for(lambda: _bound(taken, port), 30, message="the dead broker's port")
        taken.listen()
        daemon.signal(signal.SIGCONT)
        wait_new_broker(client, old)
        assert client.result(client.enqueue("e2e.square", 3), timeout=30) == 9
        wait_for(lambda: "metrics.cannot_listen" in daemon.output(), 10, message="the error")
    finally:
        daemon.signal(signal.SIGCONT)
        taken.close()


def _bound(sock: socket.socket, port: int) -> bool:
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        return False
    return True


@pytest.mark.parametrize("listen", ["9464", "localhost:99999", "http://x:1", ""])
def test_a_bad_listen_address_is_a_config_error_naming_the_key(env: Env, listen: str) -> None:
    with_metrics(env, listen)
    done = env.run("check-config", "--no-plugins", "-c", str(env.config))
    assert done.returncode == 2
    assert "metrics.listen" in done.stderr
