"""A worker's liveness does not rest on its broker connection alone: the
status pipe to the supervisor keeps flowing while the broker is away, so a
broker outage kills no healthy worker (issue item 4).
"""

from __future__ import annotations

import signal
import time

import pytest
from conftest import Env, Proc, wait_for, worker_processes

#: render_config's heartbeat settings: 200 ms x 3.
WINDOW = 0.2 * 3


def pids_of(proc: Proc) -> set[int]:
    """The pids of ``proc``'s worker processes."""
    return {w.pid for w in worker_processes(proc)}


# ------------------------------------------------------ item 4: broker away


@pytest.mark.parametrize("outage", ["stopped", "killed"])
def test_a_broker_outage_kills_no_healthy_worker(env: Env, outage: str) -> None:
    """The broker is stopped (SIGSTOP) or killed for ten liveness
    windows: the supervisor kills no worker, the running handler finishes,
    and once the broker is back the same workers serve."""
    env.write_config(processes=2, prefetch=0)
    broker = env.start("broker")
    env.wait_ready(broker)
    supervisor = env.start("supervisor")
    env.wait_workers(2)
    client = env.client()
    pids = pids_of(supervisor)
    assert len(pids) == 2
    note = env.home / "note"
    job_id = client.enqueue("e2e.nap_then_note", {"seconds": 2.0, "path": str(note)})
    wait_for(lambda: client.job(job_id).status == "running", message="the job to start")
    broker.signal(signal.SIGSTOP if outage == "stopped" else signal.SIGKILL)
    try:
        end = time.monotonic() + 10 * WINDOW
        while time.monotonic() < end:  # not a timing assertion: the outage lasts this long
            assert pids_of(supervisor) == pids, supervisor.output()
            time.sleep(0.1)
        assert note.exists()  # the handler ran to its end while the broker was away
    finally:
        broker.signal(signal.SIGCONT)
    if outage == "killed":
        broker.wait(10)
        broker = env.start("broker", name="broker-again")
    env.wait_ready(broker)
    client = env.client()
    served = {client.result(client.enqueue("e2e.pid"), timeout=30) for _ in range(6)}
    assert served <= pids
    assert pids_of(supervisor) == pids
    assert "supervisor.kill_worker" not in supervisor.output()
    assert client.result(job_id, timeout=30) in pids  # the job ends too (perhaps run again)
