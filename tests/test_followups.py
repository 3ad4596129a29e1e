"""Follow-ups are made exactly once: a chain's next step, a chord's
callback, on_success and on_failure jobs, whatever expires first and
however often the broker restarts (the real core and log, a fake clock)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from inproc import SMALL_LOG, FakeWorker, InProcessBroker, deliveries

from corral.broker import protocol as p
from corral.broker.clock import FakeClock
from corral.broker.core import CLIENT

KINDS = ["chain", "chord", "on_success", "on_failure"]
#: (the parent's TTL, the follow-up's TTL), seconds: the follow-up expires
#: before its parent, with it (it ends 1 s later), after it.
ORDERS = [(100.0, 10.0), (100.0, 99.0), (10.0, 100.0)]


def start(tmp_path: Path, clock: FakeClock, parent_ttl: float) -> InProcessBroker:
    # a failed job is kept failed_ttl: the parent of on_failure uses it
    extra = f'{SMALL_LOG}\nfailed_ttl = "{parent_ttl}s"'
    return InProcessBroker(tmp_path, clock=clock, extra=extra)


def enqueue(broker: InProcessBroker, kind: str, parent_ttl: float, follow_ttl: float) -> None:
    follow = p.JobSpec("x", "t.x", result_ttl=follow_ttl)
    if kind == "chain":
        parent = p.JobSpec("p", "t.p", result_ttl=parent_ttl)
        reply = broker.request(p.EnqueueFlow(broker.next_req(), "f", "chain", [parent, follow]))
    elif kind == "chord":
        parent = p.JobSpec("p", "t.p", result_ttl=parent_ttl)
        msg = p.EnqueueFlow(broker.next_req(), "f", "group", [parent], callback=follow)
        reply = broker.request(msg)
    elif kind == "on_success":
        parent = p.JobSpec("p", "t.p", result_ttl=parent_ttl, on_success=follow)
        reply = broker.request(p.Enqueue(broker.next_req(), [parent]))
    else:
        parent = p.JobSpec("p", "t.p", max_attempts=1, on_failure=follow)
        reply = broker.request(p.Enqueue(broker.next_req(), [parent]))
    assert isinstance(reply, p.EnqueueOk), reply


def run_next(broker: InProcessBroker, worker: FakeWorker, kind: str = "ok") -> str:
    d = deliveries(broker.to_worker(worker.identity))[-1]
    worker.start(d)
    worker.finish(d, kind, "r" if kind == "ok" else None)
    return d.job_id


@pytest.mark.parametrize(("parent_ttl", "follow_ttl"), ORDERS)
@pytest.mark.parametrize("kind", KINDS)
def test_a_follow_up_is_made_once_whatever_expires_first_and_the_restarts(
    tmp_path: Path, kind: str, parent_ttl: float, follow_ttl: float
) -> None:
    clock = FakeClock()
    broker = start(tmp_path, clock, parent_ttl)
    worker = FakeWorker(broker)
    worker.ready()
    enqueue(broker, kind, parent_ttl, follow_ttl)
    assert run_next(broker, worker, "fail" if kind == "on_failure" else "ok") == "p"
    broker.advance(1.0)
    assert run_next(broker, worker) == "x"
    runs = [d.job_id for d in deliveries(broker.to_worker(worker.identity))]
    assert runs == ["p", "x"]
    # restart every 5 s until both are long gone: the follow-up never comes back
    for _ in range(int(max(parent_ttl, follow_ttl) / 5) + 3):
        broker.advance(5.0)
        broker = start(tmp_path, clock, parent_ttl)
        worker = FakeWorker(broker)
        assert worker.ready() == [], f"{kind}: the follow-up was made again"
        x = broker.core.state.jobs.get("x")
        assert x is None or x.status == "succeeded"
    assert "p" not in broker.core.state.jobs and "x" not in broker.core.state.jobs


@pytest.mark.parametrize("kind", KINDS)
def test_a_follow_up_cut_off_by_a_crash_is_made_on_replay_once(tmp_path: Path, kind: str) -> None:
    """The broker stopped after the parent's end reached the log and before
    its FollowedUp record did: the replay makes it, and only then."""
    clock = FakeClock()
    broker = start(tmp_path, clock, 100.0)
    worker = FakeWorker(broker)
    worker.ready()
    enqueue(broker, kind, 100.0, 100.0)
    core = broker.core
    real = core.journal.record

    def drop_followups(record: object) -> None:  # the crash: it never got written
        if type(record).__name__ != "FollowedUp":
            real(record)  # type: ignore[arg-type]

    core.journal.record = drop_followups  # type: ignore[method-assign]
    run_next(broker, worker, "fail" if kind == "on_failure" else "ok")
    assert "x" not in core.state.jobs
    broker = start(tmp_path, clock, 100.0)
    assert "x" in broker.core.state.jobs  # made on replay
    worker = FakeWorker(broker)
    assert [d.job_id for d in worker.ready()] == ["x"]
    run_next(broker, worker)
    broker.advance(200.0)  # both expire
    broker = start(tmp_path, clock, 100.0)
    assert FakeWorker(broker).ready() == []


def test_every_option_takes_effect_inside_flows_and_callbacks(tmp_path: Path) -> None:
    """A group member with delay=30 waits 30 s; a chain's next step keeps
    its queue, priority, attempts, retries, timeout, TTL and callbacks."""
    broker = InProcessBroker(tmp_path, extra=SMALL_LOG)
    delayed = p.JobSpec("late", "t.x", delay=30.0)
    msg = p.EnqueueFlow(broker.next_req(), "g", "group", [p.JobSpec("now", "t.x"), delayed])
    assert isinstance(broker.request(msg), p.EnqueueOk)
    assert broker.job("late").status == "scheduled"  # type: ignore[union-attr]
    assert broker.job("late").next_run_at == broker.clock.time() + 30.0  # type: ignore[union-attr]
    step = p.JobSpec(
        "s1",
        "t.x",
        queue="q2",
        priority=7,
        max_attempts=4,
        max_retries=1,
        timeout=9.0,
        result_ttl=11.0,
        on_success=p.JobSpec("cb", "t.cb", queue="q3"),
    )
    msg = p.EnqueueFlow(broker.next_req(), "c", "chain", [p.JobSpec("s0", "t.x"), step])
    assert isinstance(broker.request(msg), p.EnqueueOk)
    worker = FakeWorker(broker, queues=("default", "q2", "q3"), credit=1)
    worker.ready()
    assert run_next(broker, worker) == "now"
    assert run_next(broker, worker) == "s0"
    info = broker.job("s1")
    assert info is not None
    assert (info.queue, info.priority, info.max_attempts, info.timeout) == ("q2", 7, 4, 9.0)
    d = deliveries(broker.to_worker(worker.identity))[-1]
    assert (d.job_id, d.timeout, d.max_attempts, d.priority) == ("s1", 9.0, 4, 7)
    worker.start(d)
    worker.finish(d, "retry", delay=0.0)  # one retry allowed
    d = deliveries(broker.to_worker(worker.identity))[-1]
    worker.start(d)
    worker.finish(d, "retry", delay=0.0)  # the second is past max_retries
    info = broker.job("s1")
    assert info is not None and info.status == "failed" and info.error.type == "RetryLimit"  # type: ignore[union-attr]
    assert broker.job("cb") is None  # on_success: not for a failure


def finish_all(broker: InProcessBroker, worker: FakeWorker, results: dict[str, object]) -> None:
    """Run every job delivered to ``worker`` to success, with ``results``."""
    seen: set[int] = set()
    while True:
        todo = [d for d in deliveries(broker.to_worker(worker.identity)) if d.lease not in seen]
        if not todo:
            return
        for d in todo:
            seen.add(d.lease)
            worker.start(d)
            worker.finish(d, "ok", results.get(d.job_id, d.job_id))


def flow_reply(broker: InProcessBroker, flow_id: str, wait: float = 0.0) -> object:
    return broker.request(p.GetResult(broker.next_req(), flow_id, wait=wait))


def test_a_chain_finishes_when_its_first_step_expired_at_once(tmp_path: Path) -> None:
    broker = InProcessBroker(tmp_path, extra=SMALL_LOG)
    worker = FakeWorker(broker, credit=4)
    worker.ready()
    steps = [p.JobSpec("fetch", "t", result_ttl=0.0), p.JobSpec("store", "t", result_ttl=3600.0)]
    broker.request(p.EnqueueFlow(broker.next_req(), "c", "chain", steps))
    finish_all(broker, worker, {"fetch": 20, "store": "stored"})
    assert broker.job("fetch") is None  # its result expired at once
    reply = flow_reply(broker, "c")
    assert isinstance(reply, p.ResultReply) and reply.status == "succeeded"
    assert msgspec_decode(reply.result) == "stored"
    info = broker.request(p.GetFlow(broker.next_req(), "c"))
    assert info.flow.statuses == {"fetch": "succeeded", "store": "succeeded"}


def test_a_chord_whose_members_expire_at_once_still_calls_back(tmp_path: Path) -> None:
    broker = InProcessBroker(tmp_path, extra=SMALL_LOG)
    worker = FakeWorker(broker, credit=4)
    worker.ready()
    members = [p.JobSpec(f"m{n}", "t", result_ttl=0.0) for n in range(3)]
    msg = p.EnqueueFlow(broker.next_req(), "g", "group", members, callback=p.JobSpec("cb", "t"))
    broker.request(msg)
    finish_all(broker, worker, {"m0": 1, "m1": 2, "m2": 3, "cb": "called"})
    assert broker.job("m0") is None and broker.job("cb") is not None
    (cb,) = [d for d in deliveries(broker.to_worker(worker.identity)) if d.job_id == "cb"]
    assert msgspec_decode(cb.prev_result) == [1, 2, 3]  # the results it receives
    reply = flow_reply(broker, "g")
    assert isinstance(reply, p.ResultReply) and msgspec_decode(reply.result) == [1, 2, 3]


def test_a_finished_flow_is_forgotten_with_its_last_job_also_after_restarts(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    broker = InProcessBroker(tmp_path, clock=clock, extra=SMALL_LOG)
    worker = FakeWorker(broker, credit=4)
    worker.ready()
    steps = [p.JobSpec("a", "t", result_ttl=10.0), p.JobSpec("b", "t", result_ttl=30.0)]
    broker.request(p.EnqueueFlow(broker.next_req(), "c", "chain", steps))
    finish_all(broker, worker, {})
    broker.core.log.compact(broker.core.state.snapshot())  # the ends go through compaction
    broker = InProcessBroker(tmp_path, clock=clock, extra=SMALL_LOG)
    broker.advance(20.0)  # a expired; the chain still answers
    reply = flow_reply(broker, "c")
    assert isinstance(reply, p.ResultReply) and reply.status == "succeeded"
    broker.advance(15.0)  # b expired too: the chain is forgotten
    gone = broker.request(p.GetFlow(broker.next_req(), "c"))
    assert isinstance(gone, p.ErrorReply) and gone.code == "not_found"
    assert "c" not in broker.core.state.flows and not broker.core.state.flowbook.ends
    broker = InProcessBroker(tmp_path, clock=clock, extra=SMALL_LOG)
    assert "c" not in broker.core.state.flows


def test_state_levels_off_under_a_steady_stream_of_chains(tmp_path: Path) -> None:
    broker = InProcessBroker(tmp_path, extra=SMALL_LOG)
    worker = FakeWorker(broker, credit=8)
    worker.ready()
    sizes = []
    for round_ in range(30):
        for n in range(5):
            steps = [
                p.JobSpec(f"r{round_}-{n}-{i}", "t", p.encode_value("x" * 1000), result_ttl=5.0)
                for i in range(2)
            ]
            broker.request(p.EnqueueFlow(broker.next_req(), f"c{round_}-{n}", "chain", steps))
        finish_all(broker, worker, {})
        broker.advance(2.0)
        state = broker.core.state
        sizes.append((len(state.flows), len(state.jobs), len(state.flowbook.ends)))
    # chains live 5 s and a round takes 2 s: at most 3 rounds' worth are kept
    assert max(s[0] for s in sizes[10:]) <= 15 and max(s[1] for s in sizes[10:]) <= 30
    assert sizes[-1] == sizes[-2]  # level


def msgspec_decode(raw: object) -> object:
    import msgspec

    return msgspec.msgpack.decode(raw)  # type: ignore[call-overload]


def test_a_flow_whose_job_has_a_held_unique_key_is_refused_naming_it(tmp_path: Path) -> None:
    broker = InProcessBroker(tmp_path, extra=SMALL_LOG)
    broker.enqueue(id="a", unique_key="k")
    member = p.JobSpec("m", "t", unique_key="k")
    reply = broker.request(p.EnqueueFlow(broker.next_req(), "g", "group", [member]))
    assert isinstance(reply, p.ErrorReply) and reply.code == "invalid"
    assert reply.message.startswith("unique_key: 'k' of job 'm' is held by job 'a'")
    assert "g" not in broker.core.state.flows and "m" not in broker.core.state.jobs
    twice = [p.JobSpec("x", "t", unique_key="j"), p.JobSpec("y", "t", unique_key="j")]
    reply = broker.request(p.EnqueueFlow(broker.next_req(), "c", "chain", twice))
    assert isinstance(reply, p.ErrorReply) and "held by job 'x'" in reply.message
    # a plain enqueue with the key still returns the holder, as before
    assert broker.enqueue(id="b", unique_key="k") == "a"


@pytest.mark.parametrize(("flow_ttl", "job_ttl"), [(50.0, 10.0), (5.0, 100.0)])
def test_a_flow_with_its_own_result_ttl_is_kept_that_long_once_finished(
    tmp_path: Path, flow_ttl: float, job_ttl: float
) -> None:
    """Longer than its jobs: it still answers after they expired. Shorter:
    it is forgotten while its jobs are still there."""
    clock = FakeClock()
    broker = InProcessBroker(tmp_path, clock=clock, extra=SMALL_LOG)
    worker = FakeWorker(broker, credit=4)
    worker.ready()
    steps = [p.JobSpec("a", "t", result_ttl=job_ttl), p.JobSpec("b", "t", result_ttl=job_ttl)]
    msg = p.EnqueueFlow(broker.next_req(), "c", "chain", steps, result_ttl=flow_ttl)
    assert isinstance(broker.request(msg), p.EnqueueOk)
    finish_all(broker, worker, {"b": "done"})
    broker.advance(min(flow_ttl, job_ttl) + 1.0)
    reply = flow_reply(broker, "c")
    if flow_ttl > job_ttl:  # its jobs expired; it answers
        assert broker.job("b") is None
        assert isinstance(reply, p.ResultReply) and msgspec_decode(reply.result) == "done"
    else:  # it expired; its jobs are still there
        assert isinstance(reply, p.ErrorReply) and reply.code == "not_found"
        assert broker.job("b") is not None
    # a restart on the way does not keep it for good
    broker = InProcessBroker(tmp_path, clock=clock, extra=SMALL_LOG)
    broker.advance(max(flow_ttl, job_ttl) + 1.0)
    assert "c" not in broker.core.state.flows


def test_a_flow_result_ttl_out_of_range_is_refused(tmp_path: Path) -> None:
    broker = InProcessBroker(tmp_path, extra=SMALL_LOG)
    msg = p.EnqueueFlow(broker.next_req(), "c", "chain", [p.JobSpec("a", "t")], result_ttl=-1.0)
    reply = broker.request(msg)
    assert isinstance(reply, p.ErrorReply) and reply.message.startswith("result_ttl: ")


def test_a_later_chain_step_holds_its_unique_key_from_the_chain_s_start(tmp_path: Path) -> None:
    """Step b is made only when a succeeds, but its key is its from the
    chain's creation: an enqueue with the key meanwhile gets b's id (the
    holder), never a second holder; b's result can be waited on before b
    exists. Once b ended, the key is free again."""
    clock = FakeClock()
    broker = InProcessBroker(tmp_path, clock=clock, extra=SMALL_LOG)
    worker = FakeWorker(broker, credit=4)
    worker.ready()
    steps = [p.JobSpec("a", "t"), p.JobSpec("b", "t", unique_key="k")]
    assert isinstance(
        broker.request(p.EnqueueFlow(broker.next_req(), "c", "chain", steps)), p.EnqueueOk
    )
    assert broker.enqueue(id="other", unique_key="k") == "b"
    assert "other" not in broker.core.state.jobs
    missing = broker.request(p.GetJob(broker.next_req(), "b"))
    assert isinstance(missing, p.ErrorReply) and missing.code == "not_found"
    assert "step 1 of chain 'c'" in missing.message and "not been created yet" in missing.message
    # a client waiting on b is answered when b ends, not with "no job"
    broker.run_pass((CLIENT, [b"waiter", p.encode(p.GetResult(77, "b", wait=60.0))]))
    assert not [r for r in replies_to(broker, b"waiter") if r.req == 77]
    finish_all(broker, worker, {"b": "done"})
    answer = [r for r in replies_to(broker, b"waiter") if r.req == 77]
    assert len(answer) == 1 and isinstance(answer[0], p.ResultReply)
    assert msgspec_decode(answer[0].result) == "done"
    # b ended: a new job may take the key
    assert broker.enqueue(id="later", unique_key="k") == "later"
    # a restart keeps the reservation of a chain not yet at its step
    steps = [p.JobSpec("a2", "t"), p.JobSpec("b2", "t", unique_key="k2")]
    broker.request(p.EnqueueFlow(broker.next_req(), "c2", "chain", steps))
    broker = InProcessBroker(tmp_path, clock=clock, extra=SMALL_LOG)
    assert broker.enqueue(id="other2", unique_key="k2") == "b2"


def test_a_chain_that_stops_before_a_step_frees_its_key(tmp_path: Path) -> None:
    broker = InProcessBroker(tmp_path, extra=SMALL_LOG)
    worker = FakeWorker(broker, credit=4)
    worker.ready()
    steps = [p.JobSpec("a", "t", max_attempts=1), p.JobSpec("b", "t", unique_key="k")]
    broker.request(p.EnqueueFlow(broker.next_req(), "c", "chain", steps))
    broker.run_pass((CLIENT, [b"waiter", p.encode(p.GetResult(78, "b", wait=60.0))]))
    d = deliveries(broker.to_worker(worker.identity))[-1]
    worker.start(d)
    worker.finish(d, "fail")
    answer = [r for r in replies_to(broker, b"waiter") if r.req == 78]
    assert len(answer) == 1 and isinstance(answer[0], p.ErrorReply)
    assert "never created" in answer[0].message
    assert broker.enqueue(id="other", unique_key="k") == "other"


def test_a_callback_whose_key_is_held_when_due_is_not_made_twice(tmp_path: Path) -> None:
    """An on_success callback is an enqueue at the time its parent ends:
    with its key held by another job, the holder stands in for it, as for
    any enqueue; across a restart too."""
    clock = FakeClock()
    broker = InProcessBroker(tmp_path, clock=clock, extra=SMALL_LOG)
    worker = FakeWorker(broker, credit=1)
    worker.ready()
    notify = p.JobSpec("cb", "t.notify", unique_key="notify-42")
    broker.request(p.Enqueue(broker.next_req(), [p.JobSpec("p", "t.p", on_success=notify)]))
    assert broker.enqueue("t.notify", id="holder", unique_key="notify-42", delay=100.0) == "holder"
    run_next(broker, worker)
    assert "cb" not in broker.core.state.jobs
    assert broker.core.state.holder_of("notify-42", clock.time()) == "holder"
    broker = InProcessBroker(tmp_path, clock=clock, extra=SMALL_LOG)
    assert "cb" not in broker.core.state.jobs
    # the holder ends and frees the key: a restart still does not make it
    worker = FakeWorker(broker, credit=1)
    worker.ready()
    broker.advance(101.0)
    assert run_next(broker, worker) == "holder"
    for _ in range(2):
        broker = InProcessBroker(tmp_path, clock=clock, extra=SMALL_LOG)
        assert "cb" not in broker.core.state.jobs


def test_a_flow_timer_waits_for_a_member_retried_by_hand(tmp_path: Path) -> None:
    """A chain with its own result_ttl failed, then a step was retried by
    hand: it runs again, and the chain is kept result_ttl from its new end,
    not from its first."""
    clock = FakeClock()
    broker = InProcessBroker(tmp_path, clock=clock, extra=SMALL_LOG)
    worker = FakeWorker(broker, credit=4)
    worker.ready()
    steps = [p.JobSpec("a", "t", max_attempts=1, result_ttl=1000.0), p.JobSpec("b", "t")]
    msg = p.EnqueueFlow(broker.next_req(), "c", "chain", steps, result_ttl=50.0)
    broker.request(msg)
    d = deliveries(broker.to_worker(worker.identity))[-1]
    worker.start(d)
    worker.finish(d, "fail")
    reply = flow_reply(broker, "c")
    assert isinstance(reply, p.ResultReply) and reply.status == "failed"
    broker.advance(30.0)
    assert isinstance(broker.request(p.RetryJobs(broker.next_req(), job_id="a")), p.Ack)
    broker.advance(30.0)  # past the first end's timer: the chain is running
    assert "c" in broker.core.state.flows
    finish_all(broker, worker, {"b": "done"})
    broker.advance(40.0)
    reply = flow_reply(broker, "c")
    assert isinstance(reply, p.ResultReply) and reply.status == "succeeded"
    broker.advance(15.0)
    assert "c" not in broker.core.state.flows


def replies_to(broker: InProcessBroker, identity: bytes) -> list[Any]:
    return [p.decode(p.client_reply_decoder, b) for i, b in broker.clients.sent if i == identity]


def test_a_flow_or_job_never_takes_an_id_another_has(tmp_path: Path) -> None:
    """A flow's job with an existing job's id, a step with another step's
    callback's id, a job with a flow's id or a pending step's id: each is
    refused naming the id, rather than a flow that hangs or answers with
    another job's result."""
    broker = InProcessBroker(tmp_path, extra=SMALL_LOG)
    broker.enqueue(id="X")

    def flow(kind: str, steps: list[p.JobSpec], flow_id: str = "f") -> object:
        return broker.request(p.EnqueueFlow(broker.next_req(), flow_id, kind, steps))

    for kind in ("chain", "group"):
        reply = flow(kind, [p.JobSpec("X", "t"), p.JobSpec("Y", "t")])
        assert (
            isinstance(reply, p.ErrorReply) and "'X' is the id of an existing job" in reply.message
        )
    nested = [p.JobSpec("a", "t", on_success=p.JobSpec("Z", "t")), p.JobSpec("Z", "t")]
    reply = flow("chain", nested)
    assert isinstance(reply, p.ErrorReply) and "'Z' is used twice" in reply.message
    assert isinstance(
        flow("chain", [p.JobSpec("s", "t"), p.JobSpec("later", "t")], "c"), p.EnqueueOk
    )
    reply = flow("chain", [p.JobSpec("s2", "t"), p.JobSpec("later", "t")], "c2")
    assert isinstance(reply, p.ErrorReply) and "step 1 of chain 'c'" in reply.message
    for taken in ("c", "later"):
        spec = p.JobSpec(taken, "t")
        reply = broker.request(p.Enqueue(broker.next_req(), [spec]))
        assert isinstance(reply, p.ErrorReply) and f"id: {taken!r} is" in reply.message
    assert broker.enqueue(id="X") == "X"  # a resend of a plain job is still answered
    assert isinstance(
        flow("chain", [p.JobSpec("s", "t"), p.JobSpec("later", "t")], "c"), p.EnqueueOk
    )


def test_a_retry_that_would_make_a_second_holder_is_refused(tmp_path: Path) -> None:
    """The chain failed before step b, whose key another job took since:
    retrying the failed step would make b a second holder; refused, naming
    the holder. Once the holder ended, the retry goes through."""
    broker = InProcessBroker(tmp_path, extra=SMALL_LOG)
    worker = FakeWorker(broker, credit=2)
    worker.ready()
    steps = [p.JobSpec("a", "t", max_attempts=1), p.JobSpec("b", "t", unique_key="k")]
    broker.request(p.EnqueueFlow(broker.next_req(), "c", "chain", steps))
    d = deliveries(broker.to_worker(worker.identity))[-1]
    worker.start(d)
    worker.finish(d, "fail")
    assert broker.enqueue(id="other", unique_key="k", delay=50.0) == "other"
    reply = broker.request(p.RetryJobs(broker.next_req(), job_id="a"))
    assert isinstance(reply, p.ErrorReply)
    assert "job other holds the unique_key 'k' that step 1 of chain 'c' needs" in reply.message
    assert isinstance(broker.request(p.Cancel(broker.next_req(), "other")), p.Ack)
    assert isinstance(broker.request(p.RetryJobs(broker.next_req(), job_id="a")), p.Ack)


def test_a_wait_on_a_step_not_made_yet_runs_out_as_for_any_job(tmp_path: Path) -> None:
    """Not "no such job": the wait runs out with the step not ended, so the
    client polls on (or says it timed out); no wait at all says the same."""
    broker = InProcessBroker(tmp_path, extra=SMALL_LOG)
    steps = [p.JobSpec("a", "t"), p.JobSpec("b", "t")]
    broker.request(p.EnqueueFlow(broker.next_req(), "c", "chain", steps))
    now = broker.request(p.GetResult(broker.next_req(), "b", wait=0.0))
    assert isinstance(now, p.ResultReply) and now.status == "queued"
    broker.run_pass((CLIENT, [b"waiter", p.encode(p.GetResult(90, "b", wait=5.0))]))
    broker.advance(6.0)
    answer = [r for r in replies_to(broker, b"waiter") if r.req == 90]
    assert len(answer) == 1 and isinstance(answer[0], p.ResultReply)
    assert answer[0].status == "queued"


def test_a_flow_s_own_result_ttl_counts_from_its_end_across_restarts(tmp_path: Path) -> None:
    clock = FakeClock()
    broker = InProcessBroker(tmp_path, clock=clock, extra=SMALL_LOG)
    worker = FakeWorker(broker, credit=2)
    worker.ready()
    steps = [p.JobSpec("a", "t", result_ttl=1000.0)]
    broker.request(p.EnqueueFlow(broker.next_req(), "c", "chain", steps, result_ttl=10.0))
    finish_all(broker, worker, {})
    broker.advance(6.0)
    broker = InProcessBroker(tmp_path, clock=clock, extra=SMALL_LOG)  # a restart
    broker.advance(5.0)  # 11 s after its end, not 5 s after the restart
    assert "c" not in broker.core.state.flows


def test_a_big_chord_reads_its_members_a_bounded_number_of_times(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each member's end is O(1) for its flow, not a scan of every member:
    a chord of n members costs O(n) reads of members in all, not O(n**2)."""
    from corral.broker import flows

    reads = []
    real = flows.members_of

    def counting(state: object, flow: p.FlowInfo) -> object:
        reads.append(len(flow.steps))  # type: ignore[attr-defined]
        return real(state, flow)  # type: ignore[arg-type]

    monkeypatch.setattr(flows, "members_of", counting)
    broker = InProcessBroker(tmp_path, extra=SMALL_LOG)
    worker = FakeWorker(broker, credit=500)
    worker.ready()
    n = 400
    members = [p.JobSpec(f"m{i}", "t", result_ttl=0.0) for i in range(n)]
    msg = p.EnqueueFlow(broker.next_req(), "g", "group", members, callback=p.JobSpec("cb", "t"))
    broker.request(msg)
    finish_all(broker, worker, {})
    assert "cb" in broker.core.state.jobs or "g" in broker.core.state.followed
    assert sum(reads) <= 10 * n, f"{sum(reads)} member reads for {n} members"


def test_a_callback_s_id_is_taken_until_its_owner_is_forgotten(tmp_path: Path) -> None:
    """A callback yet to be made (a plain job's, a chain step's, nested)
    owns its id: another job, or another job's callback, cannot take it,
    so the callback is never silently lost or replaced."""
    broker = InProcessBroker(tmp_path, extra=SMALL_LOG)
    cb = p.JobSpec("cb", "t", on_failure=p.JobSpec("cb-deep", "t"))
    broker.request(p.Enqueue(broker.next_req(), [p.JobSpec("parent", "t", on_success=cb)]))
    steps = [p.JobSpec("s0", "t"), p.JobSpec("s1", "t", on_success=p.JobSpec("s1-cb", "t"))]
    broker.request(p.EnqueueFlow(broker.next_req(), "c", "chain", steps))
    for taken, owner in [("cb", "parent"), ("cb-deep", "parent"), ("s1-cb", "c"), ("s1", "")]:
        for spec in (
            p.JobSpec(taken, "t"),
            p.JobSpec(f"other-{taken}", "t", on_success=p.JobSpec(taken, "t")),
        ):
            reply = broker.request(p.Enqueue(broker.next_req(), [spec]))
            assert isinstance(reply, p.ErrorReply), (taken, reply)
            assert f"id: {taken!r} is taken by" in reply.message and owner in reply.message
    itself = p.JobSpec("w", "t", on_success=p.JobSpec("w", "t"))
    reply = broker.request(p.Enqueue(broker.next_req(), [itself]))
    assert isinstance(reply, p.ErrorReply) and "'w' is used twice" in reply.message
    # a resend of the first enqueue is still answered with its id
    assert broker.enqueue(id="parent") == "parent"


def test_ids_taken_by_flows_and_callbacks_hold_in_every_order(tmp_path: Path) -> None:
    """A flow's id may not be a pending step's; a callback's own callback
    stays reserved for it after the root job is forgotten; one enqueue may
    not use an id twice across its jobs and callbacks."""
    clock = FakeClock()
    broker = InProcessBroker(tmp_path, clock=clock, extra=SMALL_LOG)
    worker = FakeWorker(broker, credit=4)
    worker.ready()
    steps = [p.JobSpec("s0", "t"), p.JobSpec("s1", "t")]
    broker.request(p.EnqueueFlow(broker.next_req(), "c", "chain", steps))
    reply = broker.request(p.EnqueueFlow(broker.next_req(), "s1", "group", [p.JobSpec("g", "t")]))
    assert isinstance(reply, p.ErrorReply) and reply.message.startswith("flow_id: 's1' is taken")
    inner = p.JobSpec("B", "t", on_success=p.JobSpec("C", "t"), delay=1000.0)
    root = p.JobSpec("A", "t", on_success=inner, result_ttl=1.0)
    broker.request(p.Enqueue(broker.next_req(), [root]))
    finish_all(broker, worker, {})  # s0, s1 and A; B waits 1000 s
    broker.advance(5.0)  # A expired; B is there, C not made yet
    assert "A" not in broker.core.state.jobs and "B" in broker.core.state.jobs
    reply = broker.request(p.Enqueue(broker.next_req(), [p.JobSpec("C", "t")]))
    assert isinstance(reply, p.ErrorReply) and "callback of 'B'" in reply.message
    batch = [p.JobSpec("x", "t", on_success=p.JobSpec("y", "t")), p.JobSpec("y", "t")]
    reply = broker.request(p.Enqueue(broker.next_req(), batch))
    assert isinstance(reply, p.ErrorReply) and "'y' is used twice in one enqueue" in reply.message


def test_a_retried_chain_takes_its_later_keys_back(tmp_path: Path) -> None:
    """Chain c stopped before s1 (key k); another chain took k and was
    forgotten; c's failed step is retried: s1 holds k again at once."""
    clock = FakeClock()
    broker = InProcessBroker(tmp_path, clock=clock, extra=SMALL_LOG)
    worker = FakeWorker(broker, credit=4)
    worker.ready()
    steps = [p.JobSpec("s0", "t", max_attempts=1), p.JobSpec("s1", "t", unique_key="k")]
    broker.request(p.EnqueueFlow(broker.next_req(), "c", "chain", steps))
    d = deliveries(broker.to_worker(worker.identity))[-1]
    worker.start(d)
    worker.finish(d, "fail")
    other = [
        p.JobSpec("t0", "t", result_ttl=1.0),
        p.JobSpec("t1", "t", unique_key="k", result_ttl=1.0),
    ]
    broker.request(p.EnqueueFlow(broker.next_req(), "c2", "chain", other))
    finish_all(broker, worker, {})
    broker.advance(5.0)
    assert "c2" not in broker.core.state.flows
    assert isinstance(broker.request(p.RetryJobs(broker.next_req(), job_id="s0")), p.Ack)
    assert broker.enqueue(id="plain", unique_key="k") == "s1"
    broker = InProcessBroker(tmp_path, clock=clock, extra=SMALL_LOG)  # and after a replay
    assert broker.enqueue(id="plain2", unique_key="k") == "s1"
