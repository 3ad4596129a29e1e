"""The broker's parts driven in-process: the real BrokerCore and log, a
FakeClock, recording links. Delays, deadlines, heartbeats, retries, TTLs,
result waits and schedules are checked by moving the clock, not by sleeping
(steps of the wall clock: tests/test_clock_steps.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from inproc import CLIENT, SMALL_LOG, FakeWorker, InProcessBroker, decoded, deliveries
from structlog.testing import capture_logs

from corral.broker import protocol as p
from corral.broker.clock import FakeClock


@pytest.fixture
def broker(tmp_path: Path) -> InProcessBroker:
    return InProcessBroker(tmp_path)


def test_a_delayed_job_goes_out_when_due_and_not_before(broker: InProcessBroker) -> None:
    worker = FakeWorker(broker)
    assert worker.ready() == []
    job_id = broker.enqueue(delay=30.0)
    assert worker.inbox() == []
    broker.advance(29.9)
    assert deliveries(worker.inbox()) == []
    assert broker.job(job_id).status == "scheduled"  # type: ignore[union-attr]
    broker.advance(0.1)
    (d,) = deliveries(worker.inbox())
    assert (d.job_id, d.attempt) == (job_id, 1)


def test_a_started_job_past_its_timeout_is_retried_and_its_late_result_fenced(
    broker: InProcessBroker,
) -> None:
    worker = FakeWorker(broker)
    worker.ready()
    job_id = broker.enqueue(timeout=10.0, max_attempts=2)
    (d,) = deliveries(worker.inbox())
    worker.start(d)
    broker.advance(9.5)
    assert broker.job(job_id).status == "running"  # type: ignore[union-attr]
    broker.advance(0.5)
    info = broker.job(job_id)
    assert info is not None
    assert info.status == "retrying"
    assert info.tries[-1].error is not None and info.tries[-1].error.type == "TimeoutError"
    assert broker.core.stats["timeouts"] == 1
    worker.finish(d, "ok", 41)  # the old lease's answer
    assert broker.core.stats["late_results"] == 1
    assert broker.job(job_id).status == "retrying"  # type: ignore[union-attr]


def test_a_silent_worker_loses_its_jobs_after_the_liveness_window(
    broker: InProcessBroker,
) -> None:
    silent = FakeWorker(broker, b"silent", credit=2)
    silent.ready()
    silent.go_silent()
    first = broker.enqueue(id="a")
    broker.enqueue(id="b")
    got = deliveries(silent.inbox())
    assert [d.job_id for d in got] == ["a", "b"]
    silent.start(got[0])
    other = FakeWorker(broker, b"other", credit=2)
    other.ready()
    # The window is 3 beats of 1 s, checked on each beat: the worker is
    # still alive 3 s after it was last heard, and dead by the beat after.
    broker.advance(3.0)
    assert broker.core.stats["workers_lost"] == 0
    broker.advance(1.0)
    assert broker.core.stats["workers_lost"] == 1
    redelivered = deliveries(other.inbox())
    assert sorted(d.job_id for d in redelivered) == ["a", "b"]
    # the started job's attempt counted; the buffered one went back uncounted
    attempts = {d.job_id: d.attempt for d in redelivered}
    assert attempts == {first: 2, "b": 1}


def test_an_error_is_retried_after_its_backoff(tmp_path: Path) -> None:
    broker = InProcessBroker(tmp_path, extra='retry_backoff = "8s"\nretry_backoff_max = "8s"')
    worker = FakeWorker(broker)
    worker.ready()
    job_id = broker.enqueue(max_attempts=3)
    (d,) = deliveries(worker.inbox())
    worker.start(d)
    worker.finish(d, "error", error=p.ErrorInfo("ValueError", "boom"))
    info = broker.job(job_id)
    assert info is not None and info.status == "retrying"
    assert info.next_run_at is not None
    wait = info.next_run_at - broker.clock.time()
    assert 4.0 <= wait <= 8.0  # equal jitter: half the backoff, plus up to half
    broker.advance(wait - 0.01)
    assert deliveries(worker.inbox()) == []
    broker.advance(0.01)
    (again,) = deliveries(worker.inbox())
    assert (again.job_id, again.attempt) == (job_id, 2)


def test_a_result_expires_after_its_ttl(broker: InProcessBroker) -> None:
    worker = FakeWorker(broker)
    worker.ready()
    job_id = broker.enqueue(result_ttl=5.0)
    (d,) = deliveries(worker.inbox())
    worker.start(d)
    worker.finish(d, "ok", {"n": 1})
    broker.advance(4.9)
    reply = broker.request(p.GetResult(broker.next_req(), job_id))
    assert isinstance(reply, p.ResultReply) and decoded(reply.result) == {"n": 1}
    broker.advance(0.1)
    assert broker.job(job_id) is None
    gone = broker.request(p.GetResult(broker.next_req(), job_id))
    assert isinstance(gone, p.ErrorReply) and gone.code == "not_found"


def test_a_result_wait_is_answered_when_it_runs_out_or_the_job_ends(
    broker: InProcessBroker,
) -> None:
    job_id = broker.enqueue()
    broker.run_pass(("client", [b"waiter", p.encode(p.GetResult(7, job_id, wait=5.0))]))
    assert broker.clients.sent == [s for s in broker.clients.sent if s[0] != b"waiter"]
    broker.advance(4.9)
    assert not [s for s in broker.clients.sent if s[0] == b"waiter"]
    broker.advance(0.1)
    (answer,) = [b for i, b in broker.clients.sent if i == b"waiter"]
    reply = p.decode(p.client_reply_decoder, answer)
    assert (reply.req, reply.status) == (7, "queued")
    # and a wait for a job that ends is answered in the pass it ends
    worker = FakeWorker(broker)
    (d,) = worker.ready()
    worker.start(d)
    broker.run_pass(("client", [b"w2", p.encode(p.GetResult(8, job_id, wait=60.0))]))
    worker.finish(d, "ok", "done")
    (answer,) = [b for i, b in broker.clients.sent if i == b"w2"]
    reply = p.decode(p.client_reply_decoder, answer)
    assert (reply.status, decoded(reply.result)) == ("succeeded", "done")


SCHEDULE = """
[[schedules]]
name = "tick"
task = "t.tick"
every = "60s"
catch_up = "skip"
"""


def fires(broker: InProcessBroker) -> list[str]:
    return [j.id for j in broker.core.state.jobs.values() if j.task == "t.tick"]


def test_an_interval_schedule_fires_once_per_due_time(tmp_path: Path) -> None:
    clock = FakeClock(wall=1_700_000_010.0)  # 50 s before a multiple of 60
    broker = InProcessBroker(tmp_path, clock=clock, schedules=SCHEDULE)
    broker.run_pass()
    assert fires(broker) == []
    for _ in range(10):  # 10 minutes in 60 s steps: 10 due times
        broker.advance(60.0)
    assert len(fires(broker)) == 10
    assert broker.core.stats["schedules_fired"] == 10


def due_times(broker: InProcessBroker) -> list[float]:
    """The due times (epoch seconds) of the jobs the schedule made, sorted:
    a fire's job id carries its due time in milliseconds."""
    ids = [j for j in fires(broker) if j.startswith("cron-")]
    return sorted(int(j.rsplit("-", 1)[1], 16) / 1000 for j in ids)


@pytest.mark.parametrize("catch_up", ["skip", "once"])
def test_a_restart_fires_each_due_time_once_and_the_downtime_by_its_catch_up(
    tmp_path: Path, catch_up: str
) -> None:
    """A broker killed mid-run and started 5 periods later on the same log:
    no due time fired before the crash fires again; of the 5 missed, "skip"
    fires none and "once" fires the latest, once; the schedule then goes on
    from the grid."""
    schedule = SCHEDULE.replace('"skip"', f'"{catch_up}"')
    clock = FakeClock(wall=1_700_000_010.0)
    first = InProcessBroker(tmp_path, clock=clock, schedules=schedule, extra=SMALL_LOG)
    for _ in range(4):
        first.advance(60.0)
    before = due_times(first)
    assert len(before) == 4
    # Killed half way through a period (30 s after the last due time): the
    # log is all there is (fsync = "always", so every pass's records are on
    # disk); the core is dropped without closing anything.
    down_at = clock.time()
    assert down_at % 60 == 30
    clock.advance(300.0)
    second = InProcessBroker(tmp_path, clock=clock, schedules=schedule, extra=SMALL_LOG)
    caught = due_times(second)[len(before) :]
    assert due_times(second)[: len(before)] == before
    missed = [t for t in range(int(down_at), int(clock.time()) + 1) if t % 60 == 0]
    assert len(missed) == 5
    if catch_up == "skip":
        assert caught == []
        assert second.core.stats["schedules_fired"] == 0
    else:
        assert caught == [missed[-1]]
        assert second.core.stats["schedules_fired"] == 1
    for _ in range(3):
        second.advance(60.0)
    after = due_times(second)
    assert after == sorted(set(after))  # no due time twice
    assert all(t % 60 == 0 for t in after)  # all on the grid
    assert after[-3:] == [missed[-1] + 60 * k for k in (1, 2, 3)]
    assert second.core.stats["schedules_fired"] == len(after) - len(before)


def test_no_durable_reply_leaves_before_the_fsync_that_covers_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With fsync = "always", every reply is sent only after an fdatasync
    that covers every record written so far (group commit): the order of
    real fdatasync calls and link sends is recorded."""
    broker = InProcessBroker(tmp_path, fsync="always")
    events = broker.events
    real = os.fdatasync

    def recording_fdatasync(fd: int) -> None:
        real(fd)
        events.append(("fsync", broker.core.log.written_position))

    monkeypatch.setattr(os, "fdatasync", recording_fdatasync)
    send = broker.clients.send
    log = broker.core.log

    def recording_send(identity: bytes, body: bytes) -> bool:
        covered.append(log.synced_position == log.written_position)
        return send(identity, body)

    # (the pass's dispatch writes its leases after the replies, unsynced)
    covered: list[bool] = []
    monkeypatch.setattr(broker.clients, "send", recording_send)
    worker = FakeWorker(broker)
    worker.ready()
    checked = 0
    for n in range(20):
        events.clear()
        job_id = broker.enqueue(payload=n)
        kinds = [kind for kind, _ in events]
        assert "fsync" in kinds and "send-client" in kinds, events
        assert kinds.index("fsync") < kinds.index("send-client"), events
        # the fsync covered everything written before the reply went out
        assert covered and all(covered), covered
        (d,) = deliveries(worker.inbox())
        worker.start(d)
        worker.finish(d, "ok", n)
        events.clear()
        reply = broker.request(p.Cancel(broker.next_req(), job_id))
        assert isinstance(reply, p.Ack)
        kinds = [kind for kind, _ in events]
        if "fsync" in kinds:
            assert kinds.index("fsync") < kinds.index("send-client"), events
        assert covered and all(covered), covered
        checked += 1
    assert checked == 20


def test_a_refused_send_leases_nothing(broker: InProcessBroker) -> None:
    """ROUTER_MANDATORY: a job whose send failed is not leased, and goes to
    the next worker that can take it."""
    full = FakeWorker(broker, b"full")
    full.ready()
    broker.workers.refuse = True
    job_id = broker.enqueue()
    assert broker.core.state.jobs[job_id].status == "queued"
    broker.workers.refuse = False
    broker.advance(1.0)  # the heartbeat round retries the dispatch
    (d,) = deliveries(full.inbox())
    assert d.job_id == job_id
    assert broker.core.state.jobs[job_id].lease == d.lease  # leased, reserved for "full"


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"delay": 1e300}, "delay"),
        ({"run_at": 1e300}, "run_at"),
        ({"run_at": -1.0}, "run_at"),
        ({"timeout": 1e20}, "timeout"),
        ({"result_ttl": 1e12}, "result_ttl"),
        ({"unique_for": 1e12}, "unique_for"),
        ({"max_attempts": 2**40}, "max_attempts"),
    ],
)
def test_a_time_or_count_out_of_range_is_refused_naming_the_option(
    broker: InProcessBroker, options: dict[str, float], field: str
) -> None:
    spec = p.JobSpec("far", "t.task", **options)  # type: ignore[arg-type]
    reply = broker.request(p.Enqueue(broker.next_req(), [spec]))
    assert isinstance(reply, p.ErrorReply) and reply.code == "invalid"
    assert reply.message.startswith(f"{field}: "), reply.message
    assert "far" not in broker.core.state.jobs
    # as a chain step too
    flow = p.EnqueueFlow(broker.next_req(), "f", "chain", [p.JobSpec("ok", "t"), spec])
    reply = broker.request(flow)
    assert isinstance(reply, p.ErrorReply) and reply.message.startswith(f"{field}: ")
    assert "f" not in broker.core.state.flows


@pytest.mark.parametrize(
    ("flow_id", "ids", "words"),
    [
        ("", ["a", "b"], "flow_id: must be a non-empty"),
        ("f", ["a", "a"], "id: 'a' is used twice"),
        ("a", ["a", "b"], "id: 'a' is used twice"),
        ("existing", ["a", "b"], "flow_id: 'existing' is the id of a job"),
    ],
)
def test_a_flow_whose_ids_clash_is_refused(
    broker: InProcessBroker, flow_id: str, ids: list[str], words: str
) -> None:
    broker.enqueue(id="existing")
    steps = [p.JobSpec(i, "t.task") for i in ids]
    reply = broker.request(p.EnqueueFlow(broker.next_req(), flow_id, "chain", steps))
    assert isinstance(reply, p.ErrorReply) and reply.code == "invalid"
    assert reply.message.startswith(words), reply.message
    assert flow_id not in broker.core.state.flows
    assert not set(ids) & set(broker.core.state.jobs)


def test_a_leased_job_is_queued_until_its_handler_starts(broker: InProcessBroker) -> None:
    """Leased into a worker's prefetch buffer, a job is still queued (and
    reserved by the worker); it runs, and its try counts, from the start."""
    worker = FakeWorker(broker, credit=3)
    worker.ready()
    ids = [broker.enqueue(id=f"j{n}") for n in range(3)]
    got = deliveries(worker.inbox())
    assert [d.job_id for d in got] == ids
    for job_id in ids:
        info = broker.job(job_id)
        assert info is not None
        assert (info.status, info.attempts, info.tries, info.started_at) == ("queued", 0, [], None)
        assert info.reserved_by == "worker-1"
    status = broker.request(p.GetStatus(broker.next_req())).status
    assert status.queues["default"]["queued"] == 3 and status.queues["default"]["running"] == 0
    broker.clock.advance(2.0)
    worker.start(got[0])
    info = broker.job("j0")
    assert info is not None
    assert (info.status, info.attempts, info.reserved_by) == ("running", 1, None)
    assert info.started_at == broker.clock.time()
    assert [t.attempt for t in info.tries] == [1]
    status = broker.request(p.GetStatus(broker.next_req())).status
    assert status.queues["default"]["queued"] == 2 and status.queues["default"]["running"] == 1
    (w,) = status.workers
    assert (w.running, w.reserved) == (["j0"], ["j1", "j2"])
    listed = broker.request(p.ListJobs(broker.next_req(), status="running"))
    assert [j.id for j in listed.jobs] == ["j0"]


def test_a_cancelled_or_purged_reserved_job_is_taken_back_from_the_worker(
    broker: InProcessBroker,
) -> None:
    worker = FakeWorker(broker, credit=3)
    worker.ready()
    broker.enqueue(id="a")
    broker.enqueue(id="b")
    broker.enqueue(id="c", queue="other")
    da, db = deliveries(worker.inbox())
    reply = broker.request(p.Cancel(broker.next_req(), "a"))
    assert isinstance(reply, p.Ack) and reply.count == 1
    assert broker.job("a").status == "cancelled"  # type: ignore[union-attr]
    reply = broker.request(p.Purge(broker.next_req(), "default"))
    assert isinstance(reply, p.Ack) and reply.count == 1
    assert broker.job("b") is None
    told = [m for m in worker.inbox() if isinstance(m, p.CancelJob)]
    assert [(m.job_id, m.lease) for m in told] == [("a", da.lease), ("b", db.lease)]
    # the worker drops them unstarted and hands them back: its credit returns
    worker.send(p.Return([p.Lease("a", da.lease), p.Lease("b", db.lease)]))
    status = broker.request(p.GetStatus(broker.next_req())).status
    assert status.workers[0].credit == 3 and status.workers[0].reserved == []


def withdraws(msgs: list[object]) -> list[p.Withdraw]:
    return [m for m in msgs if isinstance(m, p.Withdraw)]


def test_jobs_spread_over_idle_workers_most_free_slots_first(broker: InProcessBroker) -> None:
    """Two single-slot workers with prefetch: four jobs go two and two, each
    to the worker with the most free execution slots."""
    a, b = FakeWorker(broker, b"a", credit=3), FakeWorker(broker, b"b", credit=3)
    a.ready()
    b.ready()
    for n in range(4):
        broker.enqueue(id=f"j{n}")
    assert [d.job_id for d in deliveries(a.inbox())] == ["j0", "j2"]
    assert [d.job_id for d in deliveries(b.inbox())] == ["j1", "j3"]


def test_a_job_delivered_to_a_free_slot_is_not_withdrawn_for_another_idle_worker(
    broker: InProcessBroker,
) -> None:
    """One job, two idle single-slot workers: it goes to one and stays there.
    It waits behind no running job, so the other, idle, has no claim on it
    (the broker withdrew every job it had just delivered this way, one
    Withdraw and Return per job: a one-at-a-time job's latency 0.7 ms →
    1.0 ms p50 and 1.0 → 7.6 ms p99 on the bench)."""
    a, b = FakeWorker(broker, b"a", credit=3), FakeWorker(broker, b"b", credit=3)
    a.ready()
    b.ready()
    broker.enqueue(id="j0")
    to_a, to_b = a.inbox(), b.inbox()
    assert [d.job_id for d in deliveries(to_a)] == ["j0"]
    assert withdraws(to_a) == [] and to_b == []
    # a second job goes to the other free slot, and nothing is asked back
    broker.enqueue(id="j1")
    to_a, to_b = a.inbox(), b.inbox()
    assert [d.job_id for d in deliveries(to_b)] == ["j1"]
    assert to_a == [] and withdraws(to_b) == []
    # once a worker frees its slot, the next job goes there, nothing taken back
    a.finish(deliveries(broker.to_worker(b"a"))[0])
    broker.enqueue(id="j2")
    to_a, to_b = a.inbox(), b.inbox()
    assert [d.job_id for d in deliveries(to_a)] == ["j2"]
    assert withdraws(to_a) == [] and to_b == []


def test_an_idle_worker_takes_over_a_job_waiting_in_another_buffer(
    broker: InProcessBroker,
) -> None:
    a = FakeWorker(broker, b"a", credit=3)
    a.ready()
    for n in range(3):
        broker.enqueue(id=f"j{n}")
    got = deliveries(a.inbox())
    a.start(got[0])
    b = FakeWorker(broker, b"b", credit=3)
    assert b.ready() == []  # nothing ready: j1 and j2 wait in a's buffer
    (w,) = withdraws(a.inbox())
    assert [le.job_id for le in w.leases] == ["j2"]  # the one that would start last
    a.send(p.Return(w.leases, ref=w.ref))
    assert [d.job_id for d in deliveries(b.inbox())] == ["j2"]
    assert broker.job("j2").reserved_by == "b"  # type: ignore[union-attr]
    assert broker.job("j1").reserved_by == "a"  # type: ignore[union-attr]


def test_a_job_of_higher_priority_waits_only_behind_running_jobs(
    broker: InProcessBroker,
) -> None:
    """Concurrency 1, prefetch 4: eight jobs at priority 0 fill the buffer;
    one at priority 10 makes the broker take the last buffered one back,
    and goes out with its priority, so the worker starts it next."""
    worker = FakeWorker(broker, credit=5)
    worker.ready()
    for n in range(8):
        broker.enqueue(id=f"low{n}")
    got = deliveries(worker.inbox())
    assert [d.job_id for d in got] == [f"low{n}" for n in range(5)]
    worker.start(got[0])
    broker.enqueue(id="high", priority=10)
    (w,) = withdraws(worker.inbox())
    assert [le.job_id for le in w.leases] == ["low4"]
    assert deliveries(worker.send(p.Return(w.leases, ref=w.ref))) == [
        d for d in deliveries(broker.to_worker(b"worker-1")) if d.job_id == "high"
    ]
    info = broker.job("high")
    assert info is not None and info.reserved_by == "worker-1"
    high = [d for d in deliveries(broker.to_worker(b"worker-1")) if d.job_id == "high"]
    assert [d.priority for d in high] == [10]
    # no more withdraws: nothing ready outranks what is buffered
    assert withdraws(worker.inbox()) == []


def test_pause_is_answered_once_no_buffered_job_of_the_queue_can_start(
    broker: InProcessBroker,
) -> None:
    worker = FakeWorker(broker, credit=3)
    worker.ready()
    for n in range(3):
        broker.enqueue(id=f"j{n}")
    got = deliveries(worker.inbox())
    worker.start(got[0])
    before = len(broker.clients.sent)
    broker.run_pass(("client", [b"pauser", p.encode(p.Pause(7, "default"))]))
    assert [i for i, _ in broker.clients.sent[before:]] == []  # not yet answered
    (w,) = withdraws(worker.inbox())
    assert sorted(le.job_id for le in w.leases) == ["j1", "j2"]
    # j1 had been taken by a handler meanwhile: only j2 comes back
    worker.send(p.Report([p.Lease("j1", got[1].lease)], []))
    worker.send(p.Return([le for le in w.leases if le.job_id == "j2"], ref=w.ref))
    (answer,) = [b for i, b in broker.clients.sent[before:] if i == b"pauser"]
    assert isinstance(p.decode(p.client_reply_decoder, answer), p.Ack)
    assert broker.job("j2").status == "queued"  # type: ignore[union-attr]
    assert broker.job("j2").reserved_by is None  # type: ignore[union-attr]
    broker.advance(5.0)
    assert deliveries(worker.inbox()) == []  # paused: it stays


def test_a_pause_whose_worker_never_answers_is_answered_after_the_window(
    broker: InProcessBroker,
) -> None:
    worker = FakeWorker(broker, credit=2)
    worker.ready()
    broker.enqueue(id="j0")
    broker.enqueue(id="j1")
    worker.go_silent()
    broker.run_pass(("client", [b"pauser", p.encode(p.Pause(7, "default"))]))
    broker.advance(2.9, step=0.1)
    assert [i for i, _ in broker.clients.sent if i == b"pauser"] == []
    broker.advance(0.1)  # the liveness window (3 beats of 1 s) has passed
    assert [i for i, _ in broker.clients.sent if i == b"pauser"] == [b"pauser"]


def run_to_end(worker: FakeWorker, kind: str, **kw: object) -> p.Delivery:
    """Start the job last delivered to the worker and end it with ``kind``."""
    d = deliveries(worker.broker.to_worker(worker.identity))[-1]
    worker.start(d)
    worker.finish(d, kind, **kw)  # type: ignore[arg-type]
    return d


def test_a_retry_request_waits_the_backoff_runs_again_with_the_next_run_number(
    tmp_path: Path,
) -> None:
    broker = InProcessBroker(tmp_path, extra='retry_backoff = "8s"\nretry_backoff_max = "8s"')
    worker = FakeWorker(broker)
    worker.ready()
    job_id = broker.enqueue(max_attempts=1)
    first = run_to_end(worker, "retry", error=p.ErrorInfo("Retry", "later"))
    assert first.attempt == 1
    info = broker.job(job_id)
    assert info is not None and (info.status, info.attempts) == ("retrying", 0)
    wait = info.next_run_at - broker.clock.time()  # type: ignore[operator]
    assert 4.0 <= wait <= 8.0  # Retry() with no delay: the task's backoff
    broker.advance(wait)
    second = run_to_end(worker, "ok", result="done")
    assert second.attempt == 2  # ctx.attempt is the run number
    info = broker.job(job_id)
    assert info is not None and (info.status, info.attempts) == ("succeeded", 1)
    assert [t.attempt for t in info.tries] == [1, 2]
    # a Retry request is not a failure: no worker or rate counts it
    status = broker.request(p.GetStatus(broker.next_req())).status
    assert status.workers[0].failed == 0
    assert status.rates["failed_per_minute"] == 0


def test_retry_requests_past_max_retries_fail_the_job(broker: InProcessBroker) -> None:
    worker = FakeWorker(broker)
    worker.ready()
    job_id = broker.enqueue(max_retries=2, max_attempts=1)
    runs = []
    for _ in range(3):
        runs.append(run_to_end(worker, "retry", delay=0.0).attempt)
    assert runs == [1, 2, 3]
    info = broker.job(job_id)
    assert info is not None and info.status == "failed"
    assert info.error is not None and info.error.type == "RetryLimit"
    assert "max_retries (2)" in info.error.message
    assert "last reason" not in info.error.message  # none was given
    assert [t.attempt for t in info.tries] == [1, 2, 3]


def test_a_manual_retry_continues_the_run_numbers_with_a_fresh_budget(
    broker: InProcessBroker,
) -> None:
    worker = FakeWorker(broker)
    worker.ready()
    job_id = broker.enqueue(max_attempts=2)
    run_to_end(worker, "error", error=p.ErrorInfo("E", "one"))
    info = broker.job(job_id)
    broker.advance(info.next_run_at - broker.clock.time())  # type: ignore[operator, union-attr]
    run_to_end(worker, "error", error=p.ErrorInfo("E", "two"))
    info = broker.job(job_id)
    assert info is not None and (info.status, info.attempts) == ("failed", 2)
    status = broker.request(p.GetStatus(broker.next_req())).status
    assert status.workers[0].failed == 2  # each failed try
    reply = broker.request(p.RetryJobs(broker.next_req(), job_id))
    assert isinstance(reply, p.Ack) and reply.count == 1
    info = broker.job(job_id)
    assert info is not None and (info.status, info.attempts) == ("queued", 0)
    third = run_to_end(worker, "ok", result=1)
    assert third.attempt == 3
    info = broker.job(job_id)
    assert info is not None and [t.attempt for t in info.tries] == [1, 2, 3]
    assert (info.status, info.attempts) == ("succeeded", 1)


def test_a_return_under_another_lease_or_from_another_worker_releases_nothing(
    broker: InProcessBroker,
) -> None:
    a, b = FakeWorker(broker, b"a", credit=2), FakeWorker(broker, b"b", credit=2)
    a.ready()
    b.ready()
    broker.enqueue(id="j")
    (d,) = deliveries(a.inbox())
    a.send(p.Return([p.Lease("j", d.lease + 1)]))  # a stale lease
    b.send(p.Return([p.Lease("j", d.lease)]))  # not b's job
    info = broker.job("j")
    assert info is not None and info.reserved_by == "a"
    status = broker.request(p.GetStatus(broker.next_req())).status
    assert {w.worker_id: w.credit for w in status.workers} == {"a": 1, "b": 2}
    a.send(p.Return([p.Lease("j", d.lease)]))  # the real one
    assert broker.job("j").reserved_by == "b"  # type: ignore[union-attr]  # went to b


def test_lease_tokens_never_repeat_across_restarts_whatever_the_wall_clock(
    tmp_path: Path,
) -> None:
    clock = FakeClock(wall=2_000_000_000.0)
    first = InProcessBroker(tmp_path, clock=clock, extra=SMALL_LOG)
    worker = FakeWorker(first)
    worker.ready()
    first.enqueue(id="a")
    (old,) = deliveries(worker.inbox())
    clock.jump(-1_000_000.0)  # the wall clock steps far back before the restart
    second = InProcessBroker(tmp_path, clock=clock, extra=SMALL_LOG)
    second.advance(second.core.dispatcher.reclaim_window)  # its holder never comes back
    again = FakeWorker(second, b"again")
    (new,) = again.ready()
    assert new.job_id == "a" and new.lease >> 32 == (old.lease >> 32) + 1
    zombie = FakeWorker(second, b"worker-1")  # the first worker, still running it
    zombie.ready()
    zombie.start(old)
    zombie.finish(old, "ok", "stale")
    assert second.core.stats["late_results"] == 1
    # a compaction keeps the epoch: the next start is later still
    second.core.log.compact(second.core.state.snapshot())
    third = InProcessBroker(tmp_path, clock=clock, extra=SMALL_LOG)
    third.advance(third.core.dispatcher.reclaim_window)
    (latest,) = FakeWorker(third, b"third").ready()
    assert latest.lease >> 32 == (new.lease >> 32) + 1


def test_a_new_epoch_begins_before_the_lease_counter_wraps(broker: InProcessBroker) -> None:
    worker = FakeWorker(broker, credit=3)
    worker.ready()
    epoch = broker.core.state.epoch
    broker.core.dispatcher.start_leases(epoch)
    broker.core.dispatcher._lease_seq = (epoch << 32) + 2**32 - 2  # two tokens left
    for n in range(3):
        broker.enqueue(id=f"j{n}")
    got = deliveries(worker.inbox())
    assert [d.lease >> 32 for d in got] == [epoch, epoch + 1, epoch + 1]
    assert len({d.lease for d in got}) == 3
    assert broker.core.state.epoch == epoch + 1


def test_a_worker_exit_names_the_worker_by_identity_not_host_and_pid(
    broker: InProcessBroker,
) -> None:
    """Two hosts may share a name, and their workers a pid: the supervisor's
    word drops the registration it names, not the other host's."""
    here, there = FakeWorker(broker, b"here"), FakeWorker(broker, b"there")
    here.ready()
    there.ready()  # both say host "testhost", pid 4242
    broker.enqueue(id="a")
    broker.enqueue(id="b")
    msg = p.WorkerExited(broker.next_req(), "testhost", 4242, "killed", identities=[b"here".hex()])
    reply = broker.request(msg)
    assert isinstance(reply, p.Ack) and reply.count == 1
    status = broker.request(p.GetStatus(broker.next_req())).status
    assert [w.worker_id for w in status.workers] == ["there"]
    assert broker.core.stats["workers_lost"] == 1


def test_a_job_goes_only_to_a_worker_that_registered_its_task(broker: InProcessBroker) -> None:
    a = FakeWorker(broker, b"a", credit=2, tasks=(p.TaskInfo("t.a"),))
    a.ready()
    broker.enqueue("t.b", id="b1")  # first in the queue, but a does not know t.b
    broker.enqueue("t.a", id="a1")
    assert [d.job_id for d in deliveries(a.inbox())] == ["a1"]
    info = broker.job("b1")
    assert info is not None and (info.status, info.attempts, info.reserved_by) == (
        "queued",
        0,
        None,
    )
    status = broker.request(p.GetStatus(broker.next_req())).status
    assert [(u.queue, u.task, u.count, u.since) for u in status.unroutable] == [
        ("default", "t.b", 1, broker.clock.time())
    ]
    broker.advance(60.0)  # it waits as long as it takes, uncounted
    assert broker.job("b1").attempts == 0  # type: ignore[union-attr]
    b = FakeWorker(broker, b"b", tasks=(p.TaskInfo("t.b"),))
    assert [d.job_id for d in b.ready()] == ["b1"]
    status = broker.request(p.GetStatus(broker.next_req())).status
    assert status.unroutable == []


def test_a_lease_ended_by_timeout_or_silence_tells_its_holder(broker: InProcessBroker) -> None:
    worker = FakeWorker(broker, credit=2)
    worker.ready()
    job_id = broker.enqueue(timeout=5.0, max_attempts=3)
    (d,) = deliveries(worker.inbox())
    worker.start(d)
    broker.advance(5.0)
    told = [m for m in worker.inbox() if isinstance(m, p.CancelJob)]
    assert [(m.job_id, m.lease) for m in told] == [(job_id, d.lease)]
    # silence: every lease it held is cancelled there too
    other = FakeWorker(broker, b"other", credit=2)
    other.ready()
    broker.enqueue(id="held")
    (h,) = deliveries(other.inbox())
    other.go_silent()
    broker.advance(4.0)
    told = [m for m in other.inbox() if isinstance(m, p.CancelJob)]
    assert (h.job_id, h.lease) in [(m.job_id, m.lease) for m in told]


def test_a_job_the_broker_makes_is_delivered_only_once_its_creation_is_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With fsync = "always", a job made in the broker (a schedule's fire, a
    follow-up) goes to a worker only after the fdatasync that covers its
    creation: a power loss in between would make it again and run it twice.
    At each delivery, the log as it would be after a power loss then (cut at
    what was synced) is replayed: it must hold the job."""
    clock = FakeClock(wall=1_700_000_010.0)
    broker = InProcessBroker(tmp_path / "live", clock=clock, schedules=SCHEDULE)
    log = broker.core.log
    send = broker.workers.send
    at_delivery: list[tuple[str, bool]] = []

    def survives_power_loss(job_id: str) -> bool:
        synced = log.synced_position
        assert synced is not None
        segment, offset = synced
        copy = tmp_path / f"after-loss-{len(at_delivery)}"
        shutil.copytree(tmp_path / "live" / "log", copy / "log")
        os.truncate(copy / "log" / segment.name, offset)
        again = InProcessBroker(copy, clock=FakeClock(wall=clock.time()), schedules=SCHEDULE)
        try:
            return job_id in again.core.state.jobs
        finally:
            again.core.log.close()

    def recording_send(identity: bytes, body: bytes) -> bool:
        msg = p.decode(p.worker_command_decoder, body)
        for d in deliveries([msg]):
            at_delivery.append((d.task, survives_power_loss(d.job_id)))
        return send(identity, body)

    monkeypatch.setattr(broker.workers, "send", recording_send)
    worker = FakeWorker(broker)
    worker.ready()
    broker.advance(60.0)  # the schedule fires once
    (fire,) = deliveries(worker.inbox())
    worker.start(fire)
    follow = p.JobSpec("after-tick", "t.after")
    parent = broker.enqueue("t.parent", on_success=follow)
    (d,) = deliveries(worker.finish(fire, "ok", 1))  # the tick's end: the parent goes
    assert d.job_id == parent
    worker.start(d)
    (after,) = deliveries(worker.finish(d, "ok", 2))  # its follow-up is made and goes
    assert after.job_id == "after-tick"
    assert [task for task, _ in at_delivery] == ["t.tick", "t.parent", "t.after"], at_delivery
    assert all(durable for _, durable in at_delivery), at_delivery


def test_a_status_is_made_at_most_once_a_pass_and_shows_what_earlier_replies_told(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flood of status requests among changes of the job state (a status
    with a thousand supervisors takes milliseconds to make) costs one status
    a pass; a request read in a later pass than a reply sees what it told."""
    broker = InProcessBroker(tmp_path)
    service = broker.core.service
    made: list[int] = []
    real = service.status

    def counting(mono: float, now: float) -> p.StatusInfo:
        made.append(1)
        return real(mono, now)

    monkeypatch.setattr(service, "status", counting)
    frames = []
    for n in range(10):  # one pass: status, enqueue, status, enqueue ...
        frames.append((CLIENT, [b"c%d" % n, p.encode(p.GetStatus(100 + n))]))
        spec = p.JobSpec(f"j{n}", "t.task")
        frames.append((CLIENT, [b"c%d" % n, p.encode(p.Enqueue(200 + n, [spec]))]))
    broker.run_pass(*frames)
    assert len(made) == 1
    status = broker.request(p.GetStatus(broker.next_req()))  # a later pass
    assert isinstance(status, p.StatusReply)
    assert status.status.stats["jobs"] == 10
    assert len(made) == 2


def test_the_status_replies_of_a_pass_share_one_status(tmp_path: Path) -> None:
    """Many status requests in a pass, from clients that may never read:
    every reply carries the same status buffer, sent without a copy, so
    what they hold (in the pass and in the socket's queues) is one status,
    not one per reply. Joined, a reply's frames read as a StatusReply."""
    broker = InProcessBroker(tmp_path)
    for n in range(3):
        broker.enqueue(id=f"j{n}")
    requests = [(CLIENT, [b"c%d" % n, p.encode(p.GetStatus(100 + n))]) for n in range(50)]
    broker.run_pass(*requests)
    sent = broker.clients.frames[-50:]
    assert [identity for identity, _ in sent] == [b"c%d" % n for n in range(50)]
    shared = sent[0][1][1]
    assert all(frames[1] is shared for _, frames in sent)
    replies = [p.decode(p.client_reply_decoder, b"".join(frames)) for _, frames in sent]
    assert [r.req for r in replies] == list(range(100, 150))
    assert all(isinstance(r, p.StatusReply) and r.status.stats["jobs"] == 3 for r in replies)
    assert replies[0].status == p.decode(p.client_reply_decoder, b"".join(sent[0][1])).status


@pytest.mark.parametrize("req", [0, 1, 127, 128, 65_535, 2**31, 2**63 - 1])
def test_status_reply_frames_join_to_the_encoded_reply(tmp_path: Path, req: int) -> None:
    broker = InProcessBroker(tmp_path)
    status = broker.request(p.GetStatus(broker.next_req())).status
    frames = p.status_reply_frames(req, p.encode_struct(status))
    assert b"".join(frames) == p.encode(p.StatusReply(req, status))


def test_a_job_with_empty_headers_is_enqueued(tmp_path: Path) -> None:
    """An empty headers map is no headers (it broke the enqueue: the shared
    template of plain jobs was keyed by the unhashable map)."""
    broker = InProcessBroker(tmp_path)
    assert broker.enqueue(id="a", headers={}) == "a"
    assert broker.enqueue(id="b") == "b"
    assert broker.enqueue(id="c", headers={"k": "v"}) == "c"
    assert [broker.job(j).status for j in "abc"] == ["queued"] * 3  # type: ignore[union-attr]


def test_a_request_the_broker_fails_on_is_answered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in handling one request is logged and counted, the broker goes
    on, and the client gets an error naming it instead of a timeout."""
    broker = InProcessBroker(tmp_path)

    def broken(*args: object) -> None:
        raise KeyError("boom")

    monkeypatch.setitem(broker.core.service._handlers, p.Ping, broken)
    reply = broker.request(p.Ping(broker.next_req()))
    assert isinstance(reply, p.ErrorReply) and reply.code == "internal"
    assert "Ping" in reply.message and "KeyError" in reply.message
    assert broker.core.stats["handler_errors"] == 1
    monkeypatch.undo()
    assert isinstance(broker.request(p.Ping(broker.next_req())), p.Pong)


def test_the_replay_logs_how_long_it_took(tmp_path: Path) -> None:
    """``broker.replayed`` gave the monotonic clock less the wall clock (a
    variable reused for the BrokerStarted time): about minus 1.8e9 s."""
    with capture_logs() as logs:
        InProcessBroker(tmp_path / "s")
    replayed = [e for e in logs if e["event"] == "broker.replayed"]
    assert len(replayed) == 1
    assert 0 <= replayed[0]["seconds"] < 60, replayed[0]
