"""Registrations that replace another, in-process (the real BrokerCore and
log, a FakeClock): a READY repeated on the same connection, a worker that
comes back on a new connection, and a broker restart, after which the
workers that held jobs offer them back (``Ready.holding``) and the broker
re-attaches them instead of handing them to someone else. The jobs of a
holder that never comes back go back to their queue after the reclaim
window. Real processes: tests/faults/test_broker_restart.py."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from inproc import SMALL_LOG, FakeWorker, InProcessBroker, deliveries

from corral.broker import protocol as p
from corral.broker.clock import FakeClock
from corral.broker.log import Log
from corral.broker.records import Leased, LeasedMany, Returned


@pytest.fixture
def broker(tmp_path: Path) -> InProcessBroker:
    return InProcessBroker(tmp_path, extra=SMALL_LOG)


def info(broker: InProcessBroker, job_id: str) -> p.JobInfo:
    job = broker.job(job_id)
    assert job is not None, job_id
    return job


def registered(msgs: list[Any]) -> list[p.Registered]:
    return [m for m in msgs if isinstance(m, p.Registered)]


def held(d: p.Delivery, running: bool = False) -> p.Holding:
    return p.Holding(d.job_id, d.lease, running)


def returned_records(broker: InProcessBroker) -> list[Returned]:
    """The Returned records in the log, read as a restart would (the log is
    synced first)."""
    broker.core.log.sync()
    fresh = Log(broker.state_dir / "log")
    try:
        return [r for r in fresh.replay() if isinstance(r, Returned)]
    finally:
        fresh.close()


def test_a_second_ready_keeps_the_leases_and_counts_no_attempt(broker: InProcessBroker) -> None:
    worker = FakeWorker(broker, b"w", credit=3)
    worker.ready()
    for n in range(3):
        broker.enqueue(id=f"j{n}")
    got = deliveries(worker.inbox())
    assert [d.job_id for d in got] == ["j0", "j1", "j2"]
    worker.start(got[0])
    worker.credit = 4  # the second READY may say something new: it is taken in place
    again = worker.ready()
    assert again == []  # nothing was taken back, so nothing comes again
    other = FakeWorker(broker, b"other", credit=3)
    assert other.ready() == []  # none of w's jobs is free for another worker
    assert broker.core.stats["workers_lost"] == 0
    assert broker.core.stats["redelivered"] == 0
    assert returned_records(broker) == []
    assert info(broker, "j0").status == "running"
    assert [info(broker, f"j{n}").reserved_by for n in (1, 2)] == ["w", "w"]
    status = broker.request(p.GetStatus(broker.next_req())).status
    assert {w.worker_id: w.credit for w in status.workers} == {"w": 1, "other": 3}
    for d in got:
        worker.finish(d, "ok", d.job_id)
    for n in range(3):
        job = info(broker, f"j{n}")
        assert (job.status, job.attempts, len(job.tries)) == ("succeeded", 1, 1)
    assert broker.core.stats["late_results"] == 0


def test_ready_twice_then_silence_charges_each_job_once(broker: InProcessBroker) -> None:
    """The second READY changed nothing that the worker's later death
    would count twice."""
    worker = FakeWorker(broker, b"w", credit=1)
    worker.ready()
    broker.enqueue(id="j", max_attempts=2)
    (d,) = deliveries(worker.inbox())
    worker.start(d)
    worker.ready()
    worker.ready()
    assert info(broker, "j").attempts == 1
    worker.go_silent()
    broker.advance(4.0)
    job = info(broker, "j")
    assert job.status == "queued" and job.attempts == 1  # one WorkerLost, not three


def test_a_worker_back_on_a_new_connection_keeps_the_jobs_it_offers(
    broker: InProcessBroker,
) -> None:
    """The same worker (same worker_id, host and pid) reconnected with a new
    identity: what it offers moves to the new connection; what it does not
    offer never reached it and goes back uncounted."""
    first = FakeWorker(broker, b"first", credit=3)
    first.ready()
    for n in range(3):
        broker.enqueue(id=f"j{n}")
    got = deliveries(first.inbox())
    first.start(got[0])
    first.go_silent()
    second = FakeWorker(broker, b"second", credit=3)
    answer = second.send(
        p.Ready(
            "first",
            ["default"],
            3,
            1,
            [],
            "testhost",
            4242,
            holding=[held(got[0], True), held(got[1])],
        )
    )
    assert registered(answer) == [p.Registered([])]
    status = broker.request(p.GetStatus(broker.next_req())).status
    assert [w.worker_id for w in status.workers] == ["first"]  # one registration
    # j2 was in flight to the old connection: back in its queue, uncounted,
    # and out to the new one (the only worker)
    (again,) = deliveries(answer)
    assert again.job_id == "j2" and info(broker, "j2").attempts == 0
    for d in (got[0], got[1], again):
        if d is not got[0]:
            second.start(d)
        second.finish(d, "ok", d.job_id)
    for n in range(3):
        job = info(broker, f"j{n}")
        assert (job.status, job.attempts) == ("succeeded", 1)
    assert broker.core.stats["late_results"] == 0


def test_a_registration_offering_jobs_it_does_not_hold_is_refused_them(
    broker: InProcessBroker,
) -> None:
    a, b = FakeWorker(broker, b"a"), FakeWorker(broker, b"b")
    a.ready()
    broker.enqueue(id="j")
    (d,) = deliveries(a.inbox())
    b.ready()
    answer = b.send(p.Ready("b", ["default"], 1, 1, [], "testhost", 4242, holding=[held(d, True)]))
    assert registered(answer) == [p.Registered([p.Lease("j", d.lease)])]
    assert info(broker, "j").reserved_by == "a"


def restart_with_held_jobs(
    tmp_path: Path, clock: FakeClock
) -> tuple[InProcessBroker, list[p.Delivery]]:
    """A broker whose worker ``w`` holds j0 running and j1 and j2 in its
    buffer is killed, and started again."""
    first = InProcessBroker(tmp_path, clock=clock, extra=SMALL_LOG)
    worker = FakeWorker(first, b"w", credit=3)
    worker.ready()
    for n in range(3):
        first.enqueue(id=f"j{n}")
    got = deliveries(worker.inbox())
    worker.start(got[0])
    first.core.log.sync()
    first.crash()
    return InProcessBroker(tmp_path, clock=clock, extra=SMALL_LOG), got


def test_after_a_restart_the_holder_reclaims_its_running_and_buffered_jobs(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    second, got = restart_with_held_jobs(tmp_path, clock)
    other = FakeWorker(second, b"other", credit=5)
    assert other.ready() == []  # the held jobs wait for their holder
    second.advance(2.0)
    assert deliveries(other.inbox()) == []
    assert info(second, "j0").status == "running"
    # the holder comes back: its heartbeat is answered with Reregister
    holder = FakeWorker(second, b"w", credit=3)
    assert isinstance(holder.send(p.WorkerHeartbeat())[0], p.Reregister)
    answer = holder.send(
        p.Ready(
            "w",
            ["default"],
            3,
            1,
            [],
            "testhost",
            4242,
            holding=[held(got[0], True), held(got[1]), held(got[2])],
        )
    )
    assert registered(answer) == [p.Registered([])]
    assert deliveries(answer) == []
    second.advance(30.0)  # long past the window: nothing moves
    assert deliveries(other.inbox()) == []
    for d in got[1:]:
        holder.start(d)
    for d in got:
        holder.finish(d, "ok", d.job_id)
    for n in range(3):
        job = info(second, f"j{n}")
        assert (job.status, job.attempts, len(job.tries)) == ("succeeded", 1, 1), job
    assert second.core.stats["late_results"] == 0
    assert second.core.stats["redelivered"] == 0


def test_a_reclaimed_job_whose_start_the_log_missed_is_running(tmp_path: Path) -> None:
    clock = FakeClock()
    second, got = restart_with_held_jobs(tmp_path, clock)
    holder = FakeWorker(second, b"w", credit=3)
    holder.ready(holding=[held(got[0], True), held(got[1], True), held(got[2])])
    assert [info(second, f"j{n}").status for n in range(3)] == ["running", "running", "queued"]
    assert info(second, "j1").attempts == 1


def test_an_outcome_sent_before_the_holder_registers_again_counts(tmp_path: Path) -> None:
    """The worker's reports waiting in its socket reach the new broker
    before its READY: an outcome under the lease the log holds the job
    under ends the job, as it would have before the restart."""
    clock = FakeClock()
    second, got = restart_with_held_jobs(tmp_path, clock)
    holder = FakeWorker(second, b"w", credit=3)
    holder.finish(got[0], "ok", "done")
    assert info(second, "j0").status == "succeeded"
    holder.ready(holding=[held(got[1]), held(got[2])])
    second.advance(30.0)
    assert [info(second, f"j{n}").reserved_by for n in (1, 2)] == ["w", "w"]


def test_jobs_whose_holder_never_comes_back_go_out_after_the_window(tmp_path: Path) -> None:
    clock = FakeClock()
    second, got = restart_with_held_jobs(tmp_path, clock)
    window = second.core.dispatcher.reclaim_window
    assert window >= 3.0  # at least the liveness window
    other = FakeWorker(second, b"other", credit=5)
    other.ready()
    second.advance(window - 0.5)
    assert deliveries(other.inbox()) == []
    second.advance(1.0)
    again = deliveries(other.inbox())
    assert sorted(d.job_id for d in again) == ["j0", "j1", "j2"]
    assert [info(second, f"j{n}").attempts for n in range(3)] == [0, 0, 0]  # not counted
    # the holder back too late: its offer is refused, its late result fenced
    holder = FakeWorker(second, b"w", credit=3)
    answer = holder.send(
        p.Ready("w", ["default"], 3, 1, [], "testhost", 4242, holding=[held(got[0], True)])
    )
    assert registered(answer) == [p.Registered([p.Lease("j0", got[0].lease)])]
    holder.finish(got[0], "ok", "late")
    assert second.core.stats["late_results"] == 1


def test_a_second_crash_inside_the_window_keeps_the_jobs_held(tmp_path: Path) -> None:
    clock = FakeClock()
    second, got = restart_with_held_jobs(tmp_path, clock)
    second.advance(2.0)
    second.crash()
    third = InProcessBroker(tmp_path, clock=clock, extra=SMALL_LOG)
    other = FakeWorker(third, b"other", credit=5)
    assert other.ready() == []
    holder = FakeWorker(third, b"w", credit=3)
    holder.ready(holding=[held(got[0], True), held(got[1]), held(got[2])])
    third.advance(30.0)
    assert deliveries(other.inbox()) == []
    assert [info(third, f"j{n}").reserved_by for n in (1, 2)] == ["w", "w"]


def test_only_the_holder_reclaims_and_only_under_its_lease(tmp_path: Path) -> None:
    clock = FakeClock()
    second, got = restart_with_held_jobs(tmp_path, clock)
    thief = FakeWorker(second, b"thief", credit=3)
    answer = thief.send(
        p.Ready("thief", ["default"], 3, 1, [], "testhost", 4242, holding=[held(got[0], True)])
    )
    assert registered(answer) == [p.Registered([p.Lease("j0", got[0].lease)])]
    holder = FakeWorker(second, b"w", credit=3)
    stale = p.Holding("j1", got[1].lease + 1, False)
    answer = holder.send(
        p.Ready("w", ["default"], 3, 1, [], "testhost", 4242, holding=[held(got[0], True), stale])
    )
    assert registered(answer) == [p.Registered([p.Lease("j1", got[1].lease + 1)])]
    assert info(second, "j0").status == "running"


def test_another_process_under_the_same_worker_id_replaces_the_gone_one(
    broker: InProcessBroker,
) -> None:
    """A worker named by hand and restarted (same id and host, another
    pid): the old process is gone, its jobs go back as for a lost worker
    (the started one charged), and the new process cannot claim them."""
    old = FakeWorker(broker, b"old", credit=2)
    old.ready(worker_id="named")
    broker.enqueue(id="j0", max_attempts=3)
    broker.enqueue(id="j1", max_attempts=3)
    got = deliveries(old.inbox())
    old.start(got[0])
    old.go_silent()
    new = FakeWorker(broker, b"new", credit=2)
    answer = new.send(
        p.Ready("named", ["default"], 2, 1, [], "testhost", 4343, holding=[held(got[1])])
    )
    assert registered(answer) == [p.Registered([p.Lease("j1", got[1].lease)])]
    again = deliveries(answer)
    assert sorted(d.job_id for d in again) == ["j0", "j1"]
    assert info(broker, "j0").attempts == 1  # the try the old process began counts
    assert info(broker, "j1").attempts == 0
    status = broker.request(p.GetStatus(broker.next_req())).status
    assert [(w.worker_id, w.pid) for w in status.workers] == [("named", 4343)]


def test_the_reclaim_window_outlasts_a_worker_reconnect_backoff(broker: InProcessBroker) -> None:
    from corral.broker.rejoin import RECLAIM_GRACE
    from corral.workers.runtime import RECONNECT_MAX

    assert RECLAIM_GRACE >= RECONNECT_MAX * 1.2  # the jitter is +-20%
    liveness = 3.0  # 1 s x 3 in the in-process config
    assert broker.core.dispatcher.reclaim_window == liveness + RECLAIM_GRACE


def test_a_buffered_job_of_a_queue_paused_during_the_window_is_not_reclaimed(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    second, got = restart_with_held_jobs(tmp_path, clock)
    second.request(p.Pause(second.next_req(), "default"))
    holder = FakeWorker(second, b"w", credit=3)
    answer = holder.send(
        p.Ready(
            "w",
            ["default"],
            3,
            1,
            [],
            "testhost",
            4242,
            holding=[held(got[0], True), held(got[1]), held(got[2])],
        )
    )
    refused = [p.Lease(d.job_id, d.lease) for d in got[1:]]
    assert registered(answer) == [p.Registered(refused)]
    assert info(second, "j0").status == "running"  # it runs already: it stays
    assert [info(second, f"j{n}").reserved_by for n in (1, 2)] == [None, None]
    assert deliveries(answer) == []


def test_a_resent_outcome_ends_a_held_job_and_a_stale_one_is_no_late_result(
    tmp_path: Path,
) -> None:
    """The outcome the old broker lost comes again from the worker (resent)
    and ends the job; one the broker had taken already is ignored without
    counting as a late result."""
    clock = FakeClock()
    second, got = restart_with_held_jobs(tmp_path, clock)
    holder = FakeWorker(second, b"w", credit=3)
    done = p.Outcome(got[0].job_id, got[0].lease, "ok", p.encode_value("r"))
    holder.send(p.Report([], [done], resent=True))
    assert info(second, "j0").status == "succeeded"
    holder.send(p.Report([], [done], resent=True))  # again: already taken
    assert second.core.stats["resent_ignored"] == 1
    assert second.core.stats["late_results"] == 0


def test_sent_reports_are_kept_until_the_broker_had_time_and_resent_marked() -> None:
    from corral.workers import reports

    kept = reports.SentReports(keep_for=6.0)
    first = p.encode(p.Report([], [p.Outcome("a", 1, "ok")]))
    second = p.encode(p.Report([p.Lease("b", 2)], []))
    kept.sent(first, at=10.0)
    kept.sent(second, at=12.0)
    kept.prune(heard_at=15.0)  # heard from within keep_for of both: both kept
    assert len(kept) == 2
    again = [p.decode(p.worker_report_decoder, body) for body in kept.again(at=20.0)]
    assert [(r.resent, [o.job_id for o in r.done]) for r in again] == [(True, ["a"]), (True, [])]
    kept.prune(heard_at=25.0)  # re-stamped at 20.0: still kept
    assert len(kept) == 2
    kept.prune(heard_at=26.5)
    assert len(kept) == 0
    big = p.encode(p.Report([], [p.Outcome("c", 3, "ok", p.encode_value("x" * 2**20))]))
    for n in range(12):
        kept.sent(big, at=30.0 + n)
    assert len(kept) * len(big) <= reports.KEEP_BYTES  # bounded: the oldest went


def test_sent_reports_go_again_once_to_each_new_broker() -> None:
    """A burst of Reregister from one broker resends once; a broker that
    restarted soon after (which may have lost the resend with its unsynced
    log) gets them again at once; unasked, at most once per interval."""
    from corral.workers import reports

    kept = reports.SentReports(keep_for=6.0)

    def resends(at: float, broker_id: str) -> bool:
        due = kept.due(at, broker_id, every=1.0)
        if due:
            kept.resent(at, broker_id)
        return due

    assert resends(10.0, "b2")
    assert not resends(10.1, "b2")  # the same broker's burst
    assert resends(10.4, "b3")  # b2 died 0.4 s after the resend
    assert not resends(10.5, "")  # a new connection, unasked: too soon
    assert resends(11.5, "")
    assert not resends(11.6, "b3")  # b3 had them
    assert resends(12.6, "b3")  # b3 asks again a while later


def test_a_resend_the_socket_did_not_take_whole_goes_again_at_once() -> None:
    """Not marked resent (the socket refused part of it: no broker
    connected), the kept reports go with the next registration, even the
    same broker's a moment later."""
    from corral.workers import reports

    kept = reports.SentReports(keep_for=6.0)
    assert kept.due(10.0, "b2", every=1.0)  # ... and the socket refused one
    assert kept.due(10.1, "b2", every=1.0)
    kept.resent(10.1, "b2")
    assert not kept.due(10.2, "b2", every=1.0)


def test_the_broker_names_itself_when_it_asks_a_worker_to_register(tmp_path: Path) -> None:
    broker = InProcessBroker(tmp_path, extra=SMALL_LOG)
    (ask,) = FakeWorker(broker, b"w").send(p.WorkerHeartbeat())
    assert isinstance(ask, p.Reregister) and ask.broker_id == broker.core.broker_id


def test_a_resent_report_from_an_unknown_worker_asks_for_no_registration(
    tmp_path: Path,
) -> None:
    """A resend comes with a READY already: asking for another would make
    the worker resend again, and again."""
    clock = FakeClock()
    second, got = restart_with_held_jobs(tmp_path, clock)
    holder = FakeWorker(second, b"w", credit=3)
    done = p.Outcome(got[0].job_id, got[0].lease, "ok", p.encode_value("r"))
    assert holder.send(p.Report([], [done], resent=True)) == []
    assert isinstance(holder.send(p.Report([], [])).pop(), p.Reregister)


class KilledAtSend:
    """A worker link that copies the broker's state dir the instant a
    Deliver leaves (what a kill -9 right after that send leaves on disk:
    whatever was written, synced or not) into ``copies``."""

    def __init__(self, state_dir: Path, copies: Path) -> None:
        self.state_dir = state_dir
        self.copies = copies
        self.sent: list[tuple[bytes, bytes]] = []

    def send(self, identity: bytes, body: bytes) -> bool:
        if isinstance(p.decode(p.worker_command_decoder, body), p.Deliver):
            copy = self.copies / f"at-send-{len(self.sent)}"
            shutil.copytree(self.state_dir, copy, ignore=shutil.ignore_patterns("*.sock"))
        self.sent.append((identity, body))
        return True


@pytest.mark.parametrize("fsync", ["always", "interval"])
def test_no_delivery_leaves_before_its_lease_is_in_the_log_file(tmp_path: Path, fsync: str) -> None:
    """A broker killed the instant a delivery went out (before anything else
    of its pass) knows the jobs it sent: a worker that started them at once
    has its offer kept, and no job goes to another worker. (Found by
    tests/faults/test_broker_kill.py under load: a job started just after
    a kill ran again, first attempt again, on the next broker.)"""
    state, copies = tmp_path / "state", tmp_path / "copies"
    state.mkdir()
    copies.mkdir()
    clock = FakeClock()
    first = InProcessBroker(state, clock=clock, fsync=fsync, extra=SMALL_LOG)
    link = KilledAtSend(state, copies)
    first.core.attach(first.clients, link)
    worker = FakeWorker(first, b"w", credit=2)
    worker.ready()
    first.enqueue(id="j0")
    first.enqueue(id="j1")
    got = [
        d
        for identity, body in link.sent
        for d in deliveries([p.decode(p.worker_command_decoder, body)])
        if identity == b"w"
    ]
    assert {d.job_id for d in got} == {"j0", "j1"}
    snapshots = sorted(copies.iterdir())
    assert snapshots
    first.close()
    for snapshot in snapshots:
        second = InProcessBroker(snapshot, clock=clock, fsync=fsync, extra=SMALL_LOG)
        try:
            sent = {
                d.job_id for d in got if second.job(d.job_id) is not None
            }  # the jobs this copy knows were enqueued
            holder = FakeWorker(second, b"w", credit=2)
            offered = [held(d, True) for d in got if d.job_id in sent]
            answer = holder.send(
                p.Ready("w", ["default"], 2, 1, [], "testhost", 4242, holding=offered)
            )
            assert registered(answer) == [p.Registered([])], snapshot.name
            other = FakeWorker(second, b"other", credit=5)
            assert other.ready() == [], snapshot.name
            for job_id in sent:
                assert info(second, job_id).status == "running", (snapshot.name, job_id)
        finally:
            second.close()


def test_a_lease_is_in_the_log_file_once_its_delivery_went_out(tmp_path: Path) -> None:
    """A broker killed right after a dispatch knows the jobs it sent: the
    worker's offer of them is kept, not refused."""
    clock = FakeClock()
    first = InProcessBroker(tmp_path, clock=clock, extra=SMALL_LOG)
    worker = FakeWorker(first, b"w", credit=2)
    worker.ready()
    first.enqueue(id="j")
    (d,) = deliveries(worker.inbox())
    first.crash()  # no pass after the dispatch
    second = InProcessBroker(tmp_path, clock=clock, extra=SMALL_LOG)
    holder = FakeWorker(second, b"w", credit=2)
    answer = holder.send(
        p.Ready("w", ["default"], 2, 1, [], "testhost", 4242, holding=[held(d, True)])
    )
    assert registered(answer) == [p.Registered([])]
    assert info(second, "j").status == "running"


def test_a_delivery_of_several_jobs_is_one_lease_record_that_a_restart_replays(
    tmp_path: Path,
) -> None:
    """Jobs sent to a worker in one delivery are leased by one LeasedMany:
    replayed after a kill, each is held by its holder under its own lease,
    reclaimed by it, and run once; a job its holder does not offer back
    goes back uncounted and runs elsewhere once."""
    clock = FakeClock()
    first = InProcessBroker(tmp_path, clock=clock, extra=SMALL_LOG)
    for n in range(4):
        first.enqueue(id=f"j{n}")
    worker = FakeWorker(first, b"w", credit=5)
    got = worker.ready()
    assert [d.job_id for d in got] == ["j0", "j1", "j2", "j3"]
    assert [d.lease for d in got] == list(range(got[0].lease, got[0].lease + 4))
    worker.start(got[0])
    first.core.log.sync()
    first.crash()
    replayed = Log(tmp_path / "log")
    try:
        records = list(replayed.replay())
    finally:
        replayed.close()
    (batch,) = [r for r in records if isinstance(r, LeasedMany)]
    assert (batch.ids, batch.first_lease) == (["j0", "j1", "j2", "j3"], got[0].lease)
    assert not any(isinstance(r, Leased) for r in records)
    second = InProcessBroker(tmp_path, clock=clock, extra=SMALL_LOG)
    assert [info(second, f"j{n}").reserved_by for n in (1, 2, 3)] == ["w", "w", "w"]
    holder = FakeWorker(second, b"w", credit=3)  # room for what it holds only
    answer = holder.send(
        p.Ready(
            "w",
            ["default"],
            3,
            1,
            [],
            "testhost",
            4242,
            holding=[held(got[0], True), held(got[1]), held(got[2])],
        )
    )
    assert registered(answer) == [p.Registered([])]
    assert info(second, "j3").status == "queued" and info(second, "j3").reserved_by is None
    other = FakeWorker(second, b"other", credit=5)
    (again,) = other.ready()  # j3, which its holder no longer has, goes out once
    assert again.job_id == "j3" and again.attempt == 1
    for d in got[1:3]:
        holder.start(d)
    for d in got[:3]:
        holder.finish(d, "ok", d.job_id)
    other.start(again)
    other.finish(again, "ok", "j3")
    for n in range(4):
        job = info(second, f"j{n}")
        assert (job.status, job.attempts, len(job.tries)) == ("succeeded", 1, 1), job
    assert second.core.stats["late_results"] == 0
