"""A broker that did not run for a while (stopped, or one long pass) holds
none of that time against a worker or a job (the real core and log, a
fake clock)."""

from __future__ import annotations

from pathlib import Path

import pytest
from inproc import SMALL_LOG, FakeWorker, InProcessBroker, deliveries

from corral.broker import protocol as p


def test_a_stalled_broker_blames_no_worker_and_no_job(tmp_path: Path) -> None:
    """The broker was stopped (SIGSTOP) for a minute while a worker ran its
    job to the end: when it runs again, the silence and the time it could
    not see are not held against the worker or the job; the result, read
    a pass later, ends the job, first try."""
    broker = InProcessBroker(tmp_path, extra=SMALL_LOG)
    worker = FakeWorker(broker, credit=1)
    worker.ready()
    job_id = broker.enqueue(timeout=5.0)
    d = deliveries(broker.to_worker(worker.identity))[-1]
    worker.start(d)
    broker.clock.advance(60.0)  # no pass: the broker is stopped
    broker.run_pass()  # it runs again; the worker's messages are not read yet
    assert broker.core.dispatcher.workers.get(worker.identity) is not None
    worker.finish(d, "ok", 7)
    info = broker.job(job_id)
    assert info is not None and info.status == "succeeded" and info.attempts == 1
    assert [t.error for t in info.tries] == [None]


def vouch(broker: InProcessBroker, worker: FakeWorker, running: list[str]) -> None:
    """Its supervisor's report: the process is alive and runs ``running``."""
    info = p.ProcessInfo(
        "default", 0, 4242, 0, running, 1.0, identity=worker.identity.hex(), vouched=True
    )
    report = p.SupervisorInfo("testhost/1", "testhost", 1, [], [info])
    assert isinstance(broker.request(p.SupervisorReport(broker.next_req(), report)), p.Ack)


@pytest.mark.parametrize("ended", [True, False])
def test_a_try_that_ended_is_not_timed_out_while_its_result_is_held_up(
    tmp_path: Path, ended: bool
) -> None:
    """The handler returned well within its timeout, but the next one holds
    the GIL, so the result cannot leave the worker: while its supervisor
    vouches for it and says the job no longer runs, the broker waits for
    the result. A job the supervisor says still runs times out as ever."""
    broker = InProcessBroker(tmp_path, extra=SMALL_LOG)
    worker = FakeWorker(broker, credit=1)
    worker.ready()
    job_id = broker.enqueue(timeout=1.0)
    d = deliveries(broker.to_worker(worker.identity))[-1]
    worker.start(d)
    for _ in range(8):  # 4 s, reports every half second
        broker.advance(0.5)
        vouch(broker, worker, [] if ended else [job_id])
    worker.finish(d, "ok", 7)
    info = broker.job(job_id)
    assert info is not None
    if ended:
        assert (info.status, info.attempts, [t.error for t in info.tries]) == (
            "succeeded",
            1,
            [None],
        )
    else:
        assert info.tries[0].error is not None and info.tries[0].error.type == "TimeoutError"
