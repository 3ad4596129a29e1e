"""A task's declared queue and options: jobs enqueued by name without a
queue go to the queue @corral.task declared; enqueued by the function, they
take its name and queue; the broker logs what workers registered, so it
holds across a restart before any worker registers again."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from conftest import PLUGINS, Env
from inproc import SMALL_LOG, FakeWorker, InProcessBroker

from corral.broker import protocol as p
from corral.broker.clock import FakeClock

MAIL = p.TaskInfo("t.mail", max_attempts=7, result_ttl=100.0, queue="emails")


def test_registered_queue_and_defaults_hold_across_a_restart(tmp_path: Path) -> None:
    clock = FakeClock()
    extra = f'{SMALL_LOG}\nresult_ttl = "10s"'
    broker = InProcessBroker(tmp_path, clock=clock, extra=extra)
    logged: list[object] = []
    record = broker.core.journal.record

    def spy(rec: object) -> None:
        logged.append(rec)
        record(rec)  # type: ignore[arg-type]

    broker.core.journal.record = spy  # type: ignore[method-assign]
    worker = FakeWorker(broker, queues=("emails",), tasks=(MAIL,))
    worker.ready()
    worker.ready()  # registered again, the same: logged once
    assert [type(r).__name__ for r in logged].count("TaskRegistered") == 1
    job_id = broker.enqueue("t.mail")  # no queue given: the task's
    info = broker.job(job_id)
    assert info is not None and (info.queue, info.max_attempts) == ("emails", 7)
    (d,) = next(m for m in worker.inbox() if isinstance(m, p.Deliver)).jobs
    worker.start(d)
    worker.finish(d, "ok", "sent")
    # a restart, and no worker has registered since
    broker = InProcessBroker(tmp_path, clock=clock, extra=extra)
    info = broker.job(job_id)
    assert info is not None and info.max_attempts == 7  # not the broker's default 5
    assert broker.job(broker.enqueue("t.mail")).queue == "emails"  # type: ignore[union-attr]
    broker.advance(20.0)  # past the broker's 10 s, inside the task's 100 s
    assert broker.job(job_id) is not None
    broker.advance(90.0)
    assert broker.job(job_id) is None


def test_the_readme_example_runs_on_its_own_queue(env: Env) -> None:
    # A pool that serves only "emails"; the task declares queue="emails".
    env.write_config(processes=0)
    broker = env.start("broker")
    env.wait_ready(broker)
    env.start("worker", "--queue", "emails", "--plugin", "e2e_tasks")
    env.wait_workers(1)
    client = env.client()
    by_name = client.enqueue("e2e.email", "a@b")
    assert client.result(by_name, timeout=30) == "sent to a@b from emails"
    sys.path.insert(0, str(PLUGINS))
    try:
        tasks = importlib.import_module("e2e_tasks")
    finally:
        sys.path.remove(str(PLUGINS))
    by_function = client.enqueue(tasks.email, "c@d")
    assert client.result(by_function, timeout=30) == "sent to c@d from emails"
    info = client.job(by_function)
    assert (info.task, info.queue, info.max_attempts) == ("e2e.email", "emails", 7)


def test_a_reload_that_changes_a_task_never_changes_a_job_under_way(tmp_path: Path) -> None:
    broker = InProcessBroker(tmp_path, extra=SMALL_LOG)
    old = FakeWorker(broker, b"old", tasks=(p.TaskInfo("t.x", max_attempts=5),))
    old.ready()
    under_way = broker.enqueue("t.x")
    old.go_silent()
    # the rolled pool registers the task with other options
    new = FakeWorker(broker, b"new", tasks=(p.TaskInfo("t.x", max_attempts=1),))
    new.ready()
    later = broker.enqueue("t.x")
    assert broker.job(under_way).max_attempts == 5  # type: ignore[union-attr]
    assert broker.job(later).max_attempts == 1  # type: ignore[union-attr]
    # and it holds across a restart
    broker = InProcessBroker(tmp_path, extra=SMALL_LOG)
    assert broker.job(under_way).max_attempts == 5  # type: ignore[union-attr]
