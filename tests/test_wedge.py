"""A worker whose reports cannot go out never wedges its jobs.

The broker refusing a report (a worker of another build), the worker failing
to encode one, or any other error escaping one of the worker's own threads
(the socket thread, a handler thread) leaves a process that looks alive to
its supervisor and the broker while its jobs' outcomes are lost. Such a
worker exits at once with a code of its own, naming why; its supervisor
restarts it, and the broker charges each job whose fate was lost a try
that says why: the job runs again, or ends failed after its attempts,
never stuck running. Real daemons; the faults come from the
``wedge_tasks`` plugin (see there)."""

from __future__ import annotations

import json

import msgspec
import pytest
from conftest import Env, Proc, render_config

import corral
from corral.broker import protocol as p
from corral.broker.jobspec import NIL
from corral.workers.reports import report_jobs
from corral.workers.status import EXIT_BROKEN, EXIT_REPORT_REFUSED

CASES = [
    ("wedge.refused", "threads", EXIT_REPORT_REFUSED, "the broker refused this worker's report"),
    ("wedge.unencodable", "threads", EXIT_BROKEN, "cannot be encoded"),
    ("wedge.handler_dies", "threads", EXIT_BROKEN, "bookkeeping failed"),
    ("wedge.handler_dies", "asyncio", EXIT_BROKEN, "bookkeeping failed"),
]


def _events(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.mark.parametrize(
    ("task", "mode", "code", "why"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES]
)
def test_a_worker_whose_report_cannot_go_out_exits_and_the_job_is_charged(
    env: Env, task: str, mode: str, code: int, why: str
) -> None:
    env.write_config(
        processes=1,
        concurrency=2,
        plugins='["e2e_tasks", "wedge_tasks"]',
        extra_pool=f'concurrency_mode = "{mode}"',
    )
    daemon = env.start("run")
    env.wait_ready(daemon)
    client = env.client()
    # its first try's report is lost: the worker exits, the job runs again
    once = client.enqueue(task, 1, max_attempts=3)
    assert client.result(once, timeout=30) == "done"
    info = client.job(once)
    assert info.status == "succeeded" and info.attempts == 2, info
    first = info.tries[0].error
    assert first is not None and first.type == "WorkerLost", info.tries
    assert f"code {code}" in first.message and why in first.message, first.message
    # every try's report is lost: the job ends failed after its attempts
    always = client.enqueue(task, 99, max_attempts=2)
    with pytest.raises(corral.JobFailed):
        client.result(always, timeout=30)
    info = client.job(always)
    assert info.status == "failed" and info.attempts == 2, info
    assert all(t.error is not None and why in t.error.message for t in info.tries), info.tries
    # the pool is up: the next job runs
    assert client.result(client.enqueue("e2e.square", 4), timeout=30) == 16
    events = _events(daemon.output())
    fatal = [e for e in events if e.get("event") == "worker.fatal"]
    assert fatal and all(e["exit_code"] == code for e in fatal), fatal
    assert all(why in str(e["reason"]) for e in fatal), fatal
    exits = [e for e in events if e.get("event") == "supervisor.worker_exited"]
    assert len(exits) == 3 and all(f"code {code}" in str(e["how"]) for e in exits), exits


def test_a_refused_report_still_names_its_jobs() -> None:
    """The broker refused it (a field it does not take, another protocol
    version), so it may not decode in full: its jobs are read shallowly."""
    late = p.Outcome("j-2", 1, "retry", NIL, None, float("nan"), 1.0, 2.0)
    report = p.Report([p.Lease("j-1", 1)], [late], progress=[p.Progress("j-3", 1, 0.5)])
    body = p.encode(msgspec.structs.replace(report, v=p.PROTOCOL_VERSION + 1))
    assert report_jobs(body) == {"j-1", "j-2"}
    assert report_jobs(p.encode(p.Return([p.Lease("j-4", 1)]))) == set()
    assert report_jobs(b"\xc1") == set()


def test_a_worker_configured_for_larger_messages_than_its_broker_fits_its_reports_to_the_broker(
    env: Env,
) -> None:
    """A worker host whose config gives a larger broker.max_message_size
    than the broker's: a result over the broker's limit went in a report
    the broker's socket dropped (ZMQ_MAXMSGSIZE: the connection cut, the
    worker reconnected on its own), and the job stayed leased to a live
    worker for ever. Each delivery carries the broker's limit now: the job
    fails as ResultTooLarge naming it, and a result under it comes back."""
    home = env.home
    (home / "workers.toml").write_text(render_config(home, processes=1))
    env.write_config(processes=0, extra_broker='max_message_size = "1MiB"')
    broker = env.start("broker")
    env.wait_ready(broker)
    workers = Proc(home, ["supervisor", "-c", str(home / "workers.toml")], "workers")
    env.procs.append(workers)
    client = env.client()
    big = client.enqueue("e2e.big_result", 2)
    with pytest.raises(corral.JobFailed, match="ResultTooLarge"):
        client.result(big, timeout=30)
    info = client.job(big)
    assert info.error is not None and str(2**20 - 2**16) in info.error.message, info.error
    assert len(client.result(client.enqueue("e2e.big_result", 0), timeout=30)) == 0
    assert client.result(client.enqueue("e2e.square", 5), timeout=30) == 25
