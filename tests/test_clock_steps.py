"""Steps of the wall clock (an NTP step, an operator setting the date, a
VM resumed): the broker notices them, and a wait that was asked for as an
interval keeps its length across one, either way: an ``every`` schedule's
rhythm, a retry's backoff, a job's ``delay``. What names a wall time stays
on the wall clock: a job's explicit ``run_at``, ``cron`` schedules. Driven
in-process (the real core and log, a FakeClock): ``clock.jump`` steps the
wall clock alone, ``advance`` lets time pass on both clocks."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path
from typing import Any

import pytest
import structlog
from inproc import SMALL_LOG, FakeWorker, InProcessBroker, deliveries

from corral.broker import protocol as p
from corral.broker.clock import FakeClock, StepDetector
from corral.broker.log import Log
from corral.broker.records import ClockStepped
from corral.cliformat import as_text, human_status

HOUR = 3600.0
STEPS = [pytest.param(-HOUR, id="back"), pytest.param(HOUR, id="forward")]

EVERY_2S = """
[[schedules]]
name = "tick"
task = "t.tick"
every = "2s"
catch_up = "{catch_up}"
"""


def every_2s(catch_up: str = "skip") -> str:
    return EVERY_2S.format(catch_up=catch_up)


def fire_ids(broker: InProcessBroker) -> set[str]:
    return {j.id for j in broker.core.state.jobs.values() if j.task == "t.tick"}


def run(broker: InProcessBroker, seconds: float, fired: list[float], step: float = 0.25) -> None:
    """Let ``seconds`` pass, a pass every ``step``; append to ``fired`` the
    monotonic time of every fire (a new job of the schedule)."""
    seen = fire_ids(broker)
    for _ in range(round(seconds / step)):
        broker.advance(step, step)
        new = fire_ids(broker) - seen
        fired.extend([broker.clock.mono] * len(new))
        seen |= new


def gaps(times: list[float]) -> list[float]:
    return [round(b - a, 6) for a, b in itertools.pairwise(times)]


def status_stats(broker: InProcessBroker) -> dict[str, int]:
    reply = broker.request(p.GetStatus(broker.next_req()))
    assert isinstance(reply, p.StatusReply)
    return reply.status.stats


def logged_steps(broker: InProcessBroker) -> list[ClockStepped]:
    """The ClockStepped records on disk, read from a copy of the log."""
    copy = broker.state_dir / f"copy-{len(list(broker.state_dir.glob('copy-*')))}"
    shutil.copytree(broker.state_dir / "log", copy)
    log = Log(copy, segment_size=2**20, reserve=2**14)
    try:
        return [r for r in log.replay() if isinstance(r, ClockStepped)]
    finally:
        log.close()


# ------------------------------------------------------------ detection


@pytest.mark.parametrize("step", STEPS)
def test_a_step_is_logged_with_its_size_and_direction_and_counted(
    tmp_path: Path, step: float
) -> None:
    broker = InProcessBroker(tmp_path, extra=SMALL_LOG)
    broker.advance(2.0)
    with structlog.testing.capture_logs() as logs:
        broker.clock.jump(step)
        broker.advance(0.5)
        broker.advance(2.0)  # once: the passes after it see no new step
    events = [e for e in logs if e["event"] == "broker.clock_stepped"]
    assert len(events) == 1, events
    (event,) = events
    assert event["seconds"] == pytest.approx(step)
    assert event["direction"] == ("forward" if step > 0 else "backward")
    assert event["log_level"] == "warning"
    assert status_stats(broker)["clock_steps"] == 1
    status = broker.request(p.GetStatus(broker.next_req())).status
    assert "wall clock: stepped 1 time(s)" in as_text(human_status(status))
    (record,) = logged_steps(broker)
    assert record.delta == pytest.approx(step)
    assert record.at == pytest.approx(broker.clock.time() - 2.0)


def test_time_passing_and_small_corrections_are_not_steps(tmp_path: Path) -> None:
    """Both clocks moving together (time passing, however long between two
    passes: a stopped broker), and a correction under the tolerance (1 s),
    are not steps."""
    broker = InProcessBroker(tmp_path, extra=SMALL_LOG)
    with structlog.testing.capture_logs() as logs:
        broker.advance(5.0)
        broker.clock.advance(HOUR)  # stopped for an hour: no pass meanwhile
        broker.advance(0.5)
        for correction in (0.4, -0.9, 0.9):
            broker.clock.jump(correction)
            broker.advance(0.5)
    assert not [e for e in logs if e["event"] == "broker.clock_stepped"]
    assert status_stats(broker).get("clock_steps", 0) == 0
    assert "wall clock" not in as_text(
        human_status(broker.request(p.GetStatus(broker.next_req())).status)
    )
    assert logged_steps(broker) == []


def test_the_tolerance_is_a_second_plus_500_ppm_of_the_time_between_readings() -> None:
    detector = StepDetector()
    wall, mono = 1_700_000_000.0, 1_000.0
    assert detector.observe(wall, mono) is None  # the first reading
    readings = [
        (1.0, 0.99, None),  # a second passed, the offset moved under 1 s
        (1.0, 1.1, 1.1),
        (1.0, -1.1, -1.1),
        (HOUR, 2.7, None),  # an hour between readings: up to 1.8 s of slewing
        (HOUR, 2.9, 2.9),
    ]
    for elapsed, drift, step in readings:
        wall, mono = wall + elapsed + drift, mono + elapsed
        got = detector.observe(wall, mono)
        assert got == (None if step is None else pytest.approx(step)), (elapsed, drift)


def test_steps_after_one_another_are_each_counted(tmp_path: Path) -> None:
    broker = InProcessBroker(tmp_path, extra=SMALL_LOG)
    for step in (HOUR, -2 * HOUR, 30.0):
        broker.clock.jump(step)
        broker.advance(1.0)
    assert [r.delta for r in logged_steps(broker)] == [HOUR, -2 * HOUR, 30.0]
    assert status_stats(broker)["clock_steps"] == 3
    assert broker.core.state.wall_steps == pytest.approx(-HOUR + 30.0)


# ------------------------------------------------------------ every schedules


@pytest.mark.parametrize("step", STEPS)
def test_an_every_schedule_keeps_its_interval_across_a_step(tmp_path: Path, step: float) -> None:
    """An ``every = "2s"`` schedule fires every 2 s by the monotonic clock
    through a step of an hour either way: back, it is not silent for the
    hour; forward, it fires neither at once nor a burst."""
    broker = InProcessBroker(tmp_path, schedules=every_2s(), extra=SMALL_LOG)
    fired: list[float] = []
    run(broker, 6.0, fired)
    assert len(fired) == 3
    broker.clock.jump(step)
    run(broker, 8.0, fired)
    assert len(fired) == 7
    assert gaps(fired) == [2.0] * 6
    # a job per fire: no fire fell on an id an earlier one had
    assert len(fire_ids(broker)) == 7 == broker.core.stats["schedules_fired"]


def test_an_every_schedule_keeps_its_interval_across_a_step_off_its_grid(tmp_path: Path) -> None:
    broker = InProcessBroker(tmp_path, schedules=every_2s(), extra=SMALL_LOG)
    fired: list[float] = []
    run(broker, 4.0, fired)
    broker.clock.jump(-HOUR - 0.75)
    run(broker, 4.0, fired)
    broker.clock.jump(1.5 * HOUR + 0.5)
    run(broker, 4.0, fired)
    assert gaps(fired) == [2.0] * (len(fired) - 1) and len(fired) == 6


@pytest.mark.parametrize("compacted", [False, True])
@pytest.mark.parametrize("catch_up", ["skip", "once"])
@pytest.mark.parametrize("step", STEPS)
def test_a_restart_after_a_step_keeps_the_every_schedule(
    tmp_path: Path, step: float, catch_up: str, compacted: bool
) -> None:
    """The step is in the log (also in a compacted one): a broker started
    after it goes on with the schedule's rhythm: no hour of silence after a
    step back, no catch-up fire after a step forward (nothing was missed),
    no due time twice."""
    clock = FakeClock()
    schedules = every_2s(catch_up)
    first = InProcessBroker(tmp_path, clock=clock, schedules=schedules, extra=SMALL_LOG)
    fired: list[float] = []
    run(first, 4.0, fired)
    clock.jump(step)
    run(first, 3.0, fired)  # fires at 6 s; killed at 7 s
    if compacted:
        first.core.log.compact(first.core.state.snapshot())
    clock.advance(0.5)
    second = InProcessBroker(tmp_path, clock=clock, schedules=schedules, extra=SMALL_LOG)
    assert fire_ids(second) == fire_ids(first)  # the restart owes nothing
    run(second, 4.5, fired)
    assert gaps(fired) == [2.0] * 5 and len(fired) == 6
    assert len(fire_ids(second)) == 6


def test_a_step_back_while_the_broker_was_down_does_not_silence_an_every_schedule(
    tmp_path: Path,
) -> None:
    """A fire the log holds for a time still to come proves the wall clock
    went back while no broker ran: the restart takes it as a step (of at
    least that much), so the schedule fires within its interval."""
    clock = FakeClock()
    first = InProcessBroker(tmp_path, clock=clock, schedules=every_2s(), extra=SMALL_LOG)
    fired: list[float] = []
    run(first, 6.0, fired)
    clock.advance(1.0)
    clock.jump(-HOUR)
    with structlog.testing.capture_logs() as logs:
        second = InProcessBroker(tmp_path, clock=clock, schedules=every_2s(), extra=SMALL_LOG)
    (event,) = [e for e in logs if e["event"] == "broker.clock_stepped"]
    assert event["direction"] == "backward" and event["seconds"] < -HOUR + 2
    run(second, 4.0, fired)
    assert len(fired) == 5
    assert gaps(fired)[-2:] == [3.0, 2.0]  # the second down was time passing
    assert status_stats(second)["clock_steps"] == 1


def test_a_cron_schedule_follows_the_wall_clock(tmp_path: Path) -> None:
    """Cron names wall times: after a step back no due time fires twice
    (the schedule waits until the wall clock passes its last fire); after a
    step forward the latest due time passed fires once, no burst."""
    cron = '\n[[schedules]]\nname = "minutely"\ntask = "t.tick"\ncron = "* * * * *"\n'
    clock = FakeClock(wall=1_700_000_010.0)  # 50 s before a minute
    broker = InProcessBroker(tmp_path, clock=clock, schedules=cron, extra=SMALL_LOG)
    for _ in range(3):
        broker.advance(60.0, step=5.0)
    assert len(fire_ids(broker)) == 3
    clock.jump(-600.0)
    for _ in range(10):  # back where it was: every due time seen has fired
        broker.advance(60.0, step=5.0)
    assert len(fire_ids(broker)) == 3
    broker.advance(60.0, step=5.0)  # the next due time fires, once
    assert len(fire_ids(broker)) == 4
    clock.jump(HOUR)
    broker.advance(0.0)
    assert len(fire_ids(broker)) == 5
    assert broker.core.stats["schedules_fired"] == 5


# ------------------------------------------------------------ retries and delays


def retrying_job(broker: InProcessBroker, **outcome: Any) -> tuple[FakeWorker, str]:
    worker = FakeWorker(broker)
    worker.ready()
    job_id = broker.enqueue(max_attempts=3)
    (d,) = deliveries(worker.inbox())
    worker.start(d)
    worker.finish(d, **outcome)
    info = broker.job(job_id)
    assert info is not None and info.status == "retrying"
    return worker, job_id


def runs_after(broker: InProcessBroker, worker: FakeWorker, job_id: str, limit: float) -> float:
    """Seconds (monotonic, in passes of 0.1 s) until ``job_id`` is delivered
    again, up to ``limit``."""
    start = broker.clock.mono
    while broker.clock.mono - start < limit:
        broker.advance(0.1, step=0.1)
        if [d for d in deliveries(worker.inbox()) if d.job_id == job_id]:
            return round(broker.clock.mono - start, 6)
    raise AssertionError(f"{job_id} not delivered within {limit} s")


@pytest.mark.parametrize("step", STEPS)
def test_a_retry_delay_keeps_its_length_across_a_step(tmp_path: Path, step: float) -> None:
    broker = InProcessBroker(tmp_path, extra=SMALL_LOG)
    worker, job_id = retrying_job(broker, kind="retry", delay=2.0)
    before = broker.job(job_id)
    broker.advance(0.5)
    broker.clock.jump(step)
    broker.advance(0.5)
    after = broker.job(job_id)
    assert before is not None and after is not None
    assert after.next_run_at == pytest.approx(before.next_run_at + step)  # type: ignore[operator]
    assert runs_after(broker, worker, job_id, 5.0) == pytest.approx(1.0, abs=0.15)


@pytest.mark.parametrize("step", STEPS)
def test_an_error_backoff_keeps_its_length_across_a_step(tmp_path: Path, step: float) -> None:
    broker = InProcessBroker(
        tmp_path, extra=SMALL_LOG + '\nretry_backoff = "2s"\nretry_backoff_max = "2s"'
    )
    worker, job_id = retrying_job(broker, kind="error", error=p.ErrorInfo("ValueError", "boom"))
    info = broker.job(job_id)
    assert info is not None and info.next_run_at is not None
    wait = info.next_run_at - broker.clock.time()
    assert 1.0 <= wait <= 2.0
    broker.clock.jump(step)
    assert runs_after(broker, worker, job_id, 5.0) == pytest.approx(wait, abs=0.15)


@pytest.mark.parametrize("compacted", [False, True])
@pytest.mark.parametrize("step", STEPS)
def test_a_retry_keeps_its_length_across_a_step_and_a_restart(
    tmp_path: Path, step: float, compacted: bool
) -> None:
    """The step is logged (ClockStepped), so a replay moves the retry's
    run_at as the live broker did, also from a compacted log."""
    clock = FakeClock()
    first = InProcessBroker(tmp_path, clock=clock, extra=SMALL_LOG)
    _, job_id = retrying_job(first, kind="retry", delay=4.0)
    live = first.job(job_id)
    clock.jump(step)
    first.advance(1.0)
    if compacted:
        first.core.log.compact(first.core.state.snapshot())
    clock.advance(0.5)
    second = InProcessBroker(tmp_path, clock=clock, extra=SMALL_LOG)
    info = second.job(job_id)
    assert live is not None and info is not None and info.status == "retrying"
    assert info.next_run_at == pytest.approx(live.next_run_at + step)  # type: ignore[operator]
    assert second.core.state.wall_steps == pytest.approx(step)
    worker = FakeWorker(second)
    worker.ready()
    assert runs_after(second, worker, job_id, 5.0) == pytest.approx(2.5, abs=0.15)


def test_a_job_due_before_a_step_back_stays_due_after_a_restart(tmp_path: Path) -> None:
    """A job whose run_at had come is queued; a step back does not make it
    wait again, live or after a restart (promotion is not logged: the
    ClockStepped record says what was due by the clock before the step)."""
    clock = FakeClock()
    first = InProcessBroker(tmp_path, clock=clock, extra=SMALL_LOG)
    job_id = first.enqueue(run_at=clock.time() + 5.0)
    first.advance(6.0)
    assert first.job(job_id).status == "queued"  # type: ignore[union-attr]
    clock.jump(-HOUR)
    first.advance(0.5)
    assert first.job(job_id).status == "queued"  # type: ignore[union-attr]
    second = InProcessBroker(tmp_path, clock=clock, extra=SMALL_LOG)
    assert second.job(job_id).status == "queued"  # type: ignore[union-attr]
    worker = FakeWorker(second)
    assert [d.job_id for d in worker.ready()] == [job_id]


@pytest.mark.parametrize("step", STEPS)
def test_a_delay_keeps_its_length_and_a_run_at_its_wall_time(tmp_path: Path, step: float) -> None:
    """``delay=100`` means 100 s from the enqueue, whatever the wall clock
    does; ``run_at`` names a wall time, which a step brings nearer or
    farther."""
    broker = InProcessBroker(tmp_path, extra=SMALL_LOG)
    worker = FakeWorker(broker, credit=2)
    worker.ready()
    start = broker.clock.mono
    broker.enqueue(id="delayed", delay=100.0)
    broker.enqueue(id="at", run_at=broker.clock.time() + 100.0)
    broker.advance(10.0)
    broker.clock.jump(step)
    broker.advance(0.5)
    got: dict[str, float] = {}
    for _ in range(round(HOUR * 1.1 / 10)):
        broker.advance(10.0, step=10.0)
        for d in deliveries(worker.inbox()):
            got[d.job_id] = broker.clock.mono - start
        if len(got) == 2:
            break
    assert got["delayed"] == pytest.approx(100.5, abs=10.0)
    # run_at: due at once after a step forward; an hour later after a step back
    assert got["at"] == pytest.approx(10.5 if step > 0 else 100.5 + HOUR, abs=10.0)


@pytest.mark.parametrize("compacted", [False, True])
def test_a_step_back_while_the_broker_was_down_does_not_hold_a_retry_back(
    tmp_path: Path, compacted: bool
) -> None:
    """With no ``every`` schedule to tell it, the log's own times (the last
    start, the last try's end) prove the wall clock went back while no
    broker ran: the restart takes it as a step, so a retry's backoff keeps
    its length rather than waiting out the hour too (also from a compacted
    log, and a log compacted after earlier steps)."""
    clock = FakeClock()
    first = InProcessBroker(tmp_path, clock=clock, extra=SMALL_LOG)
    clock.jump(-HOUR)  # an earlier step, logged: the log's times are not all of one clock
    first.advance(0.5)
    _, job_id = retrying_job(first, kind="retry", delay=4.0)
    first.advance(1.0)
    if compacted:
        first.core.log.compact(first.core.state.snapshot())
    first.crash()
    clock.advance(0.5)
    clock.jump(-HOUR)
    with structlog.testing.capture_logs() as logs:
        second = InProcessBroker(tmp_path, clock=clock, extra=SMALL_LOG)
    (event,) = [e for e in logs if e["event"] == "broker.clock_stepped"]
    assert event["direction"] == "backward" and event["while_down"]
    assert -HOUR < event["seconds"] < -HOUR + 2
    worker = FakeWorker(second)
    worker.ready()
    # The time the broker was down is not known: the backoff is counted again
    # from the last time the log proves (the try's end), so at most its length.
    assert runs_after(second, worker, job_id, 10.0) == pytest.approx(4.0, abs=0.15)


def test_a_restart_with_no_step_finds_none(tmp_path: Path) -> None:
    """Time that passed while the broker was down (the clock forward, by
    any amount) is no step: nothing is moved."""
    clock = FakeClock()
    first = InProcessBroker(tmp_path, clock=clock, extra=SMALL_LOG)
    clock.jump(-HOUR)
    first.advance(0.5)
    retrying_job(first, kind="retry", delay=4.0)
    first.core.log.compact(first.core.state.snapshot())
    first.crash()
    clock.advance(HOUR)
    with structlog.testing.capture_logs() as logs:
        second = InProcessBroker(tmp_path, clock=clock, extra=SMALL_LOG)
    assert not [e for e in logs if e["event"] == "broker.clock_stepped"]
    assert second.core.state.wall_steps == pytest.approx(-HOUR)
