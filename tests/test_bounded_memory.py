"""The broker's memory follows its live jobs and clients, not its history.

Each test drives many jobs, flows or clients through the in-process broker
(the real core and log, a FakeClock, nothing sleeps) until they are over,
and checks that every table and heap that held them is back to its size
before: a try's lease deadline, the job -> holder table, result waiters,
flows and what they keep (ends, pending members, unique keys, callback ids,
follow-ups), finished jobs' expiry entries, supervisors, registered tasks,
connected workers, per-queue counters and the outcome rates. The soak test
``tests/faults/test_long_run_memory.py`` checks the same on a real daemon by
its RSS.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from inproc import SMALL_LOG, FakeWorker, InProcessBroker, deliveries
from structlog.testing import capture_logs

from corral.broker import protocol as p
from corral.broker.clock import FakeClock
from corral.broker.core import CLIENT
from corral.broker.protocol import TERMINAL
from corral.broker.records import Removed
from corral.broker.registrations import MAX_TASKS
from corral.broker.state import MAX_TRIES
from corral.broker.supervisors import MAX_SUPERVISORS, SUPERVISOR_STALE

#: Short backoffs: retried jobs come back within a pass or two of fake time.
FAST = SMALL_LOG + '\nretry_backoff = "100ms"\nretry_backoff_max = "200ms"'

Decide = Callable[[p.Delivery], "str | None"]


def sizes(b: InProcessBroker) -> dict[str, int]:
    """The size of every structure that holds something per job or client."""
    core = b.core
    state = core.state
    book = state.flowbook
    dispatcher = core.dispatcher
    housekeeper = core.housekeeper
    return {
        "jobs": len(state.jobs),
        "lease deadlines": dispatcher.deadlines.heap_size,
        "lease deadlines (live)": len(dispatcher.deadlines),
        "holders": len(dispatcher.holders),
        "ended unheard": len(dispatcher._ended_unheard),
        "waiters": len(core.waiters),
        "waiter deadlines": core.waiters.deadlines.heap_size,
        "waited ids": len(core.waiters._by_id),
        "flows": len(state.flows),
        "flow members made later": len(book.later),
        "flow ends": len(book.ends),
        "flow tallies": len(book._tally),
        "flows touched": len(book.touched),
        "followed": len(state.followed),
        "awaited callback ids": len(state.awaited),
        "unique key holders": len(state.unique.holders),
        "unique keys reserved": len(state.unique.reserved),
        "expiry entries": state.expiry.heap_size,
        "flow timers": len(housekeeper._flow_timers),
        "flow due": len(housekeeper._flow_due),
        "supervisors": len(core.service.supervisors),
        "tasks": len(state.tasks),
        "workers": len(dispatcher.workers),
        "reserved per queue": len(state.reserved),
        "rate buckets": len(dispatcher.rates._buckets),
    }


def broker(tmp_path: Path, ttl: str = "10s", clock: FakeClock | None = None) -> InProcessBroker:
    """An in-process broker whose finished jobs live ``ttl`` (short TTLs:
    what ends is forgotten within seconds of fake time)."""
    extra = f'{FAST}\nresult_ttl = "{ttl}"\nfailed_ttl = "{ttl}"'
    return InProcessBroker(tmp_path / "state", clock=clock, fsync="never", extra=extra)


def spec(job_id: str, task: str = "t.task", **options: Any) -> p.JobSpec:
    return p.JobSpec(job_id, task, p.encode_value(None), **options)


def callbacks(name: str) -> dict[str, p.JobSpec]:
    """An on_success and an on_failure callback, with an on_success of its own."""
    return {
        "on_success": spec(f"ok-{name}-s", on_success=spec(f"ok-{name}-ss", unique_key=name)),
        "on_failure": spec(f"ok-{name}-f"),
    }


def enqueue(b: InProcessBroker, specs: list[p.JobSpec]) -> None:
    reply = b.request(p.Enqueue(b.next_req(), specs))
    assert isinstance(reply, p.EnqueueOk), reply


def enqueue_flow(
    b: InProcessBroker, flow_id: str, kind: str, jobs: list[p.JobSpec], **kw: Any
) -> None:
    reply = b.request(p.EnqueueFlow(b.next_req(), flow_id, kind, jobs, **kw))
    assert isinstance(reply, p.EnqueueOk), reply


def active(b: InProcessBroker) -> list[str]:
    return [j.id for j in b.core.state.jobs.values() if j.status not in TERMINAL]


def outcome(d: p.Delivery, kind: str) -> p.Outcome:
    delay = 0.1 if kind == "retry" else None
    return p.Outcome(d.job_id, d.lease, kind, p.encode_value(d.attempt), delay=delay)


def work(b: InProcessBroker, w: FakeWorker, decide: Decide, pending: list[p.Delivery]) -> None:
    """Start every job ``w`` gets and end it as ``decide`` says (None:
    leave it running), letting time pass while nothing comes, until no job
    of its queues is queued, scheduled or retrying (running ones may be left)."""
    idle = 0
    while True:
        if not pending:
            waiting = [
                j
                for j in b.core.state.jobs.values()
                if j.status in ("queued", "scheduled", "retrying") and j.queue in w.queues
            ]
            if not waiting or idle > 200:
                assert not waiting, f"{len(waiting)} jobs never came to the worker"
                return
            idle += 1
            b.advance(0.5)
            pending = deliveries(w.inbox())
            continue
        idle = 0
        started = [p.Lease(d.job_id, d.lease) for d in pending]
        done = [outcome(d, kind) for d in pending if (kind := decide(d)) is not None]
        pending = deliveries(w.send(p.Report(started, done)))


def by_prefix(d: p.Delivery) -> str | None:
    """``ok-*`` succeed; ``err-*`` raise (retried, then failed); ``fail-*``
    fail at once; ``retry-*`` ask for a retry until max_retries fails them;
    ``twice-*`` ask for one retry and then succeed; ``hang-*`` never end."""
    kind = d.job_id.split("-")[0]
    if kind == "twice":
        return "retry" if d.attempt == 1 else "ok"
    return {"ok": "ok", "err": "error", "fail": "fail", "retry": "retry"}.get(kind)


def forget_everything(b: InProcessBroker, ttl: float = 10.0) -> None:
    """Let every TTL (``ttl`` seconds) run out, and the housekeeper forget
    what ended."""
    b.advance(ttl + 20.0, step=5.0)


#: What a try holds while it runs.
TRY_TABLES = ("lease deadlines", "lease deadlines (live)", "holders", "ended unheard")
WAITER_TABLES = ("waiters", "waiter deadlines", "waited ids")


def assert_back(
    b: InProcessBroker, baseline: dict[str, int], names: tuple[str, ...] | None = None
) -> None:
    """Every structure (or those ``names``) is back to its ``baseline``
    size; the outcome rates keep at most their minute of one-second buckets."""
    now = sizes(b)
    assert now["rate buckets"] <= 61
    keys = names or tuple(k for k in baseline if k != "rate buckets")
    assert {k: (baseline[k], now[k]) for k in keys if baseline[k] != now[k]} == {}


# ------------------------------------------------------------ lease deadlines


def test_lease_deadlines_and_holders_of_ended_tries_are_dropped_at_once(tmp_path: Path) -> None:
    """20,000 finished jobs left 20,000 deadline entries, each kept until its
    timeout passed. Some jobs hold unique keys and have callbacks (made or
    not): those go too."""
    b = broker(tmp_path)
    w = FakeWorker(b, credit=500)
    w.ready()
    baseline = sizes(b)
    kinds = ("ok", "err", "fail", "retry", "twice")
    specs = [
        spec(
            f"{kinds[n % 5]}-{n}",
            timeout=3600.0,
            max_retries=2,
            max_attempts=2,
            unique_key=f"key-{n}" if n % 3 == 0 else None,
            **(callbacks(str(n)) if n % 4 == 0 else {}),
        )
        for n in range(2000)
    ]
    enqueue(b, specs)
    work(b, w, by_prefix, deliveries(w.inbox()))
    assert not active(b) and len(b.core.state.jobs) > 2000
    # every try ended long before its hour-long timeout: nothing is kept for it
    assert_back(b, baseline, TRY_TABLES)
    forget_everything(b)
    assert_back(b, baseline)


def test_tries_cut_short_leave_no_deadline_or_holder(tmp_path: Path) -> None:
    """Cancelled while running, handed back, taken back from a worker that
    died: every way a try ends without an outcome releases what it held."""
    b = broker(tmp_path)
    baseline = sizes(b)
    first = FakeWorker(b, b"worker-1", credit=300)
    first.ready()
    enqueue(b, [spec(f"ok-{n}", timeout=3600.0) for n in range(300)])
    got = deliveries(first.inbox())
    assert len(got) == 300
    first.send(p.Report([p.Lease(d.job_id, d.lease) for d in got[:200]], []))
    for d in got[:100]:  # cancelled while running
        assert isinstance(b.request(p.Cancel(b.next_req(), d.job_id)), p.Ack)
    # the rest of the started ones go with their worker, the others are handed back
    first.send(p.Return([p.Lease(d.job_id, d.lease) for d in got[200:]]))
    first.go_silent()
    second = FakeWorker(b, b"worker-2", credit=300)
    pending = second.ready()
    b.advance(5.0)
    assert len(b.core.dispatcher.workers) == 1
    work(b, second, by_prefix, pending + deliveries(second.inbox()))
    assert not active(b)
    assert_back(b, baseline, TRY_TABLES)
    second.send(p.Bye())
    forget_everything(b)
    assert_back(b, baseline)


def test_tries_that_time_out_release_their_holder_and_deadline(tmp_path: Path) -> None:
    b = broker(tmp_path)
    baseline = sizes(b)
    w = FakeWorker(b, credit=200)
    w.ready()
    enqueue(b, [spec(f"hang-{n}", timeout=5.0, max_attempts=1) for n in range(200)])
    got = deliveries(w.inbox())
    work(b, w, by_prefix, got)
    b.advance(10.0)
    assert {j.status for j in b.core.state.jobs.values()} == {"failed"}
    assert b.core.stats["timeouts"] == 200
    assert_back(b, baseline, TRY_TABLES)
    # the handlers return at last: their results are fenced
    w.send(p.Report([], [outcome(d, "ok") for d in got[:100]]))
    assert b.core.stats["late_results"] == 100
    assert_back(b, baseline, TRY_TABLES)
    w.send(p.Bye())
    forget_everything(b)
    assert_back(b, baseline)


# -------------------------------------------------------------------- waiters


def wait_on(b: InProcessBroker, job_id: str, wait: float, identity: bytes = b"waiter") -> None:
    """Park a GetResult (its reply comes later)."""
    b.run_pass((CLIENT, [identity, p.encode(p.GetResult(b.next_req(), job_id, wait))]))


def test_waiters_answered_by_the_end_leave_nothing_behind(tmp_path: Path) -> None:
    b = broker(tmp_path)
    w = FakeWorker(b, credit=500)
    w.ready()
    baseline = sizes(b)
    enqueue(b, [spec(f"x-{n}", timeout=3600.0) for n in range(500)])
    got = deliveries(w.inbox())
    for d in got:
        for i in range(3):
            wait_on(b, d.job_id, 3600.0, f"client-{i}".encode())
    assert len(b.core.waiters) == 1500
    answered = len(b.clients.sent)
    w.send(p.Report([p.Lease(d.job_id, d.lease) for d in got], [outcome(d, "ok") for d in got]))
    assert len(b.clients.sent) - answered == 1500
    assert_back(b, baseline, WAITER_TABLES)


def test_waiters_that_run_out_leave_nothing_behind(tmp_path: Path) -> None:
    """Many waiters on one job, running out one by one, in an order that is
    not the order they came in."""
    b = broker(tmp_path)
    baseline = sizes(b)
    enqueue(b, [spec("never-runs")])
    n = 3000
    for i in range(n):
        wait_on(b, "never-runs", 1.0 + (i * 7919) % n / 100, f"client-{i}".encode())
    assert len(b.core.waiters) == n
    before = len(b.clients.sent)
    b.advance(40.0, step=0.25)
    replies = [p.decode(p.client_reply_decoder, body) for _, body in b.clients.sent[before:]]
    assert len(replies) == n and {r.status for r in replies} == {"queued"}
    assert_back(b, baseline, WAITER_TABLES)


# ---------------------------------------------------------------------- flows


def test_flows_are_forgotten_however_they_end(tmp_path: Path) -> None:
    """Chains and groups that succeed, fail, are cancelled, have members
    deleted, purged or expired, with callbacks, chords, unique keys and
    their own result_ttl: once over and past their TTLs, nothing of them
    is left."""
    b = broker(tmp_path, "1h")
    baseline = sizes(b)
    w = FakeWorker(b, credit=1000)
    w.ready()
    for n in range(40):
        enqueue_flow(
            b,
            f"chain-ok{n}",
            "chain",
            [
                spec(f"ok-c{n}a", unique_key=f"k{n}a"),
                spec(f"ok-c{n}b", unique_key=f"k{n}b", **callbacks(f"c{n}")),
            ],
        )
        enqueue_flow(
            b,
            f"chain-fail{n}",
            "chain",
            [spec(f"fail-f{n}a", **callbacks(f"f{n}")), spec(f"ok-f{n}b", unique_key=f"kf{n}")],
        )
        enqueue_flow(b, f"chain-cancel{n}", "chain", [spec(f"hang-x{n}a"), spec(f"ok-x{n}b")])
        enqueue_flow(
            b,
            f"chord-ok{n}",
            "group",
            [spec(f"ok-g{n}a"), spec(f"twice-g{n}b")],
            callback=spec(f"ok-g{n}cb", unique_key=f"kg{n}"),
        )
        enqueue_flow(
            b,
            f"chord-fail{n}",
            "group",
            [spec(f"ok-h{n}a"), spec(f"err-h{n}b")],
            callback=spec(f"ok-h{n}cb"),
        )
        enqueue_flow(
            b,
            f"purged{n}",
            "group",
            [spec(f"ok-u{n}a"), spec(f"ok-u{n}b", queue="side")],
            callback=spec(f"ok-u{n}cb"),
        )
        enqueue_flow(
            b, f"purged-chain{n}", "chain", [spec(f"ok-v{n}a", queue="side"), spec(f"ok-v{n}b")]
        )
        enqueue_flow(
            b, f"own-ttl{n}", "chain", [spec(f"ok-t{n}a"), spec(f"ok-t{n}b")], result_ttl=3.0
        )
        enqueue_flow(
            b,
            f"deleted{n}",
            "group",
            [spec(f"ok-d{n}a"), spec(f"ok-d{n}b")],
        )
    work(b, w, by_prefix, deliveries(w.inbox()))
    for n in range(40):
        assert isinstance(b.request(p.Cancel(b.next_req(), f"chain-cancel{n}")), p.Ack)
    reply = b.request(p.Purge(b.next_req(), "side"))
    assert isinstance(reply, p.Ack) and reply.count == 80
    b.advance(1.0)  # a purged chain's only job was its first step: it ended with it
    assert not any(f.startswith("purged-chain") for f in b.core.state.flows)
    work(b, w, by_prefix, deliveries(w.inbox()))
    assert not active(b)
    for n in range(40):
        for job_id in (f"ok-d{n}a", f"ok-d{n}b"):
            assert isinstance(b.request(p.Delete(b.next_req(), job_id)), p.Ack)
    statuses = {
        fid: b.request(p.GetFlow(b.next_req(), fid)).flow.status
        for fid in (
            "chain-ok0",
            "chain-fail0",
            "chain-cancel0",
            "chord-ok0",
            "chord-fail0",
            "purged0",
        )
    }
    assert statuses == {
        "chain-ok0": "succeeded",
        "chain-fail0": "failed",
        "chain-cancel0": "cancelled",
        "chord-ok0": "succeeded",
        "chord-fail0": "failed",
        "purged0": "cancelled",
    }
    b.advance(5.0)
    flows = b.core.state.flows
    assert not any(f.startswith(("deleted", "own-ttl")) for f in flows)  # their jobs live on
    assert "ok-t0b" in b.core.state.jobs
    w.send(p.Bye())
    forget_everything(b, 3600.0)
    assert_back(b, baseline)


def test_a_restart_forgets_a_finished_flow_that_lost_its_last_job(tmp_path: Path) -> None:
    """Whatever left a finished flow without jobs and not forgotten (here: a
    compaction between the last job's removal and the flow's, then a
    crash), a restart forgets it."""
    b = broker(tmp_path)
    w = FakeWorker(b, credit=10)
    w.ready()
    enqueue_flow(b, "g", "group", [spec("ok-1"), spec("ok-2")])
    work(b, w, by_prefix, deliveries(w.inbox()))
    for job_id in ("ok-1", "ok-2"):  # removed as the housekeeper would, by hand
        b.core.journal.record(Removed(job_id))
    b.core.state.flowbook.touched.clear()
    b.core.log.commit(b.clock.monotonic(), durable=True)
    b.core.log.compact(b.core.state.snapshot())  # the flow, without its jobs
    b.core.log.close()
    again = broker(tmp_path, clock=b.clock)
    assert "g" in again.core.state.flows
    again.advance(1.0)
    assert "g" not in again.core.state.flows
    assert sizes(again)["flow ends"] == 0


# ---------------------------------------------------------------- supervisors


def report(b: InProcessBroker, supervisor_id: str, pid: int) -> p.Ack:
    info = p.SupervisorInfo(supervisor_id, "host", pid, [], [])
    reply = b.request(p.SupervisorReport(b.next_req(), info))
    assert isinstance(reply, p.Ack), reply
    return reply


def test_supervisors_not_heard_from_are_forgotten(tmp_path: Path) -> None:
    """Each restart of a supervisor reports under a new id (host/pid)."""
    b = broker(tmp_path)
    baseline = sizes(b)
    for pid in range(1000, 1300):
        report(b, f"host/{pid}", pid)
        b.clock.advance(0.1)
    assert 0 < sizes(b)["supervisors"] <= 300
    b.advance(SUPERVISOR_STALE + 1.0, step=1.0)
    assert_back(b, baseline)


def test_a_flood_of_supervisor_reports_is_capped_and_said(tmp_path: Path) -> None:
    b = broker(tmp_path)
    report(b, "host/1", 1)  # a real one, reporting every second
    with capture_logs() as logs:
        for pid in range(2, MAX_SUPERVISORS + 502):
            report(b, f"flood/{pid}", pid)  # still acknowledged
            if pid % 1000 == 0:
                report(b, "host/1", 1)
    assert sizes(b)["supervisors"] == MAX_SUPERVISORS
    assert b.core.stats["supervisor_reports_refused"] >= 500
    full = [e for e in logs if e["event"] == "broker.supervisors_full"]
    assert full and full[0]["log_level"] == "warning"
    assert str(MAX_SUPERVISORS) in full[0]["hint"]
    assert len(full) < 10  # one line per flood, not per report
    shown = b.request(p.GetStatus(b.next_req())).status.supervisors
    assert "host/1" in {s.supervisor_id for s in shown}
    b.advance(SUPERVISOR_STALE + 1.0, step=1.0)
    assert sizes(b)["supervisors"] == 0
    report(b, "host/1", 1)  # room again
    assert sizes(b)["supervisors"] == 1


# ----------------------------------------------------------------------- tasks


def test_workers_registering_new_task_names_cannot_grow_the_task_table(tmp_path: Path) -> None:
    b = broker(tmp_path)
    real = FakeWorker(b, b"real", tasks=(p.TaskInfo("app.send", max_attempts=3),))
    real.ready()
    chunk = 2500
    with capture_logs() as logs:
        for n in range(2 * MAX_TASKS // chunk + 2):
            tasks = tuple(p.TaskInfo(f"flood.t{n}.{i}", timeout=1.0) for i in range(chunk))
            flooder = FakeWorker(b, f"flood-{n}".encode(), tasks=tasks)
            flooder.ready()
            flooder.send(p.Bye())
    table = b.core.state.tasks
    assert len(table) <= MAX_TASKS
    assert table["app.send"].max_attempts == 3  # a connected worker's tasks stay
    assert [e for e in logs if e["event"] == "broker.tasks_forgotten"]
    # the log says the same after a restart
    b.core.log.close()
    again = broker(tmp_path, clock=b.clock)
    assert again.core.state.tasks == table


def test_a_worker_registering_too_many_tasks_is_cut_to_the_limit(tmp_path: Path) -> None:
    b = broker(tmp_path)
    tasks = tuple(p.TaskInfo(f"many.t{i}") for i in range(MAX_TASKS + 10))
    worker = FakeWorker(b, tasks=tasks)
    with capture_logs() as logs:
        worker.ready()
    (conn,) = b.core.dispatcher.workers
    assert len(conn.tasks) == MAX_TASKS
    assert len(b.core.state.tasks) == MAX_TASKS
    (line,) = [e for e in logs if e["event"] == "broker.too_many_tasks"]
    assert line["tasks"] == MAX_TASKS + 10 and line["kept"] == MAX_TASKS


# ----------------------------------------------------------------------- tries


def test_endless_retry_requests_end_at_max_retries(tmp_path: Path) -> None:
    b = broker(tmp_path, "1d")
    w = FakeWorker(b, credit=10)
    w.ready()
    enqueue(b, [spec("retry-1"), spec("retry-2", max_retries=3)])
    work(b, w, by_prefix, deliveries(w.inbox()))
    jobs = b.core.state.jobs
    assert jobs["retry-1"].status == jobs["retry-2"].status == "failed"
    assert len(jobs["retry-1"].tries) == 26  # the [broker] max_retries default, 25
    assert len(jobs["retry-2"].tries) == 4
    assert jobs["retry-1"].error is not None and jobs["retry-1"].error.type == "RetryLimit"


def test_a_job_keeps_its_first_and_latest_tries_only(tmp_path: Path) -> None:
    """Runs no limit counts (interrupted by shutdowns), or a high
    max_retries: the job keeps a bounded try history."""
    b = broker(tmp_path, "1d")
    w = FakeWorker(b, credit=10)
    w.ready()
    enqueue(b, [spec("stop-1"), spec("poll-1", max_retries=10**6)])
    runs = MAX_TRIES + 50

    def decide(d: p.Delivery) -> str | None:
        if d.attempt < runs:
            return "interrupted" if d.job_id.startswith("stop") else "retry"
        return "ok"

    work(b, w, decide, deliveries(w.inbox()))
    for job_id in ("stop-1", "poll-1"):
        job = b.core.state.jobs[job_id]
        assert job.status == "succeeded" and job.runs == runs
        assert len(job.tries) == MAX_TRIES
        assert [t.attempt for t in job.tries] == [1, *range(runs - MAX_TRIES + 2, runs + 1)]
        info = b.job(job_id)
        assert info is not None and info.started_at == job.tries[0].started_at


# ---------------------------------------------------- workers, queues, expiry


def test_workers_that_come_and_go_leave_nothing_behind(tmp_path: Path) -> None:
    """Workers registering once and going silent, or saying goodbye, on
    queues of their own (one-off queues)."""
    b = broker(tmp_path)
    baseline = sizes(b)
    for n in range(300):
        queue = f"once-{n}"
        enqueue(b, [spec(f"ok-q{n}a", queue=queue), spec(f"ok-q{n}b", queue=queue)])
        w = FakeWorker(b, f"w-{n}".encode(), queues=(queue,), credit=2)
        got = w.ready()
        assert len(got) == 2
        w.start(got[0])
        w.finish(got[0])
        if n % 2:
            w.go_silent()
        else:
            w.send(p.Bye())
            b.live.remove(w)
    b.advance(5.0)
    assert sizes(b)["workers"] == 0
    mop = FakeWorker(b, b"mop", queues=tuple(f"once-{n}" for n in range(300)), credit=300)
    pending = mop.ready()
    work(b, mop, by_prefix, pending)
    mop.send(p.Bye())
    forget_everything(b)
    assert_back(b, baseline)


def test_deleted_jobs_leave_no_expiry_entry(tmp_path: Path) -> None:
    b = broker(tmp_path, "30d")
    baseline = sizes(b)
    w = FakeWorker(b, credit=1000)
    w.ready()
    enqueue(b, [spec(f"ok-{n}") for n in range(1000)])
    work(b, w, by_prefix, deliveries(w.inbox()))
    for n in range(1000):
        assert isinstance(b.request(p.Delete(b.next_req(), f"ok-{n}")), p.Ack)
    w.send(p.Bye())
    assert_back(b, baseline)


def test_a_job_whose_ttl_grew_after_it_ended_is_still_forgotten(tmp_path: Path) -> None:
    """A job enqueued before its task was registered takes its TTL from the
    registration: one that comes after the job ended still lets it go."""
    b = broker(tmp_path)
    w = FakeWorker(b, credit=10)
    w.ready()
    enqueue(b, [spec("ok-1", task="late.task")])
    work(b, w, by_prefix, deliveries(w.inbox()))
    late = FakeWorker(b, b"late", tasks=(p.TaskInfo("late.task", result_ttl=60.0),))
    late.ready()
    b.advance(30.0, step=5.0)
    assert "ok-1" in b.core.state.jobs  # kept for the task's 60 s now
    b.advance(40.0, step=5.0)
    assert "ok-1" not in b.core.state.jobs
    assert sizes(b)["expiry entries"] == 0


def test_outcome_rates_keep_one_minute(tmp_path: Path) -> None:
    b = broker(tmp_path)
    w = FakeWorker(b, credit=1)
    w.ready()
    for n in range(200):
        enqueue(b, [spec(f"ok-{n}")])
        work(b, w, by_prefix, deliveries(w.inbox()))
        b.advance(1.0)
    assert sizes(b)["rate buckets"] <= 61


def test_a_flood_of_registrations_cannot_flood_the_log(tmp_path: Path) -> None:
    """Any process that can reach the worker endpoint can send READY and
    Bye as fast as it likes: the broker's lines about workers coming and
    going are kept to a budget (a burst, then a rate), and the first line
    after a quiet spell says how many were left out."""
    from corral.broker.logbudget import BURST

    b = broker(tmp_path)
    with capture_logs() as logs:
        for n in range(5 * BURST):
            flooder = FakeWorker(b, f"flood-{n}".encode())
            flooder.ready()
            flooder.send(p.Bye())
    lines = [e for e in logs if e["event"] in ("broker.worker_ready", "broker.worker_gone")]
    assert BURST <= len(lines) <= BURST + 10
    assert len(b.core.dispatcher.workers) == 0  # every one was still served
    b.advance(60.0, step=1.0)
    with capture_logs() as logs:
        FakeWorker(b, b"after").ready()
    (line,) = [e for e in logs if e["event"] == "broker.worker_ready"]
    assert line["suppressed"] >= 8 * BURST  # ready and gone lines left out
    assert b.core.stats["log_lines_suppressed"] >= 8 * BURST
