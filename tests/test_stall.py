"""A broker that did not run for a while (stopped, or one long pass) holds
none of that time against a worker or a job (the real core and log, a
fake clock)."""

from __future__ import annotations

from pathlib import Path

from inproc import SMALL_LOG, FakeWorker, InProcessBroker, deliveries


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
