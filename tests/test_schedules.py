"""Tests for corral.broker.schedules: cron and interval schedules, pure.

Times are epoch seconds built from aware datetimes; DST cases use Europe/Berlin
in 2025 (spring forward on 30 March 02:00 CET -> 03:00 CEST, fall back on
26 October 03:00 CEST -> 02:00 CET).
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, date, datetime
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.broker.schedules import Schedule, ScheduleError, Scheduler, job_id_for
from corral.config.schema import ScheduleConfig

BERLIN = ZoneInfo("Europe/Berlin")
NOW = datetime(2025, 1, 15, 12, 0, 7, tzinfo=UTC).timestamp()


def utc(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()  # type: ignore[misc]


def local(ts: float, tz: ZoneInfo = BERLIN) -> datetime:
    return datetime.fromtimestamp(ts, tz)


def sched(
    name: str = "s",
    *,
    cron: str | None = None,
    every: float | None = None,
    timezone: str = "UTC",
    catch_up: str = "skip",
) -> Schedule:
    return Schedule(
        name=name,
        task="t.task",
        payload=msgspec.msgpack.encode(None),
        queue="default",
        priority=0,
        catch_up=catch_up,
        cron=cron,
        every=every,
        timezone=timezone,
    )


def dues_between(s: Schedule, start: float, end: float) -> list[float]:
    """Every due time in (start, end], by forward iteration."""
    out = []
    t = s.next_after(start)
    while t <= end:
        out.append(t)
        t = s.next_after(t)
    return out


# ------------------------------------------------------------ cron next_after


def test_cron_every_five_minutes_utc() -> None:
    s = sched(cron="*/5 * * * *")
    assert s.next_after(utc(2025, 1, 1, 10, 2, 30)) == utc(2025, 1, 1, 10, 5)
    # strictly after: a due time itself gives the following one
    assert s.next_after(utc(2025, 1, 1, 10, 5)) == utc(2025, 1, 1, 10, 10)
    assert s.next_after(utc(2025, 1, 1, 10, 4, 59) + 0.999) == utc(2025, 1, 1, 10, 5)
    assert s.next_after(utc(2025, 1, 1, 23, 58)) == utc(2025, 1, 2, 0, 0)


def test_cron_daily_utc() -> None:
    s = sched(cron="0 6 * * *")
    assert s.next_after(utc(2025, 1, 1, 5, 59, 59)) == utc(2025, 1, 1, 6)
    assert s.next_after(utc(2025, 1, 1, 6)) == utc(2025, 1, 2, 6)
    assert s.next_after(utc(2025, 1, 1, 6) + 0.5) == utc(2025, 1, 2, 6)


def test_cron_named_timezone_winter_and_summer() -> None:
    s = sched(cron="0 6 * * *", timezone="Europe/Berlin")
    # 06:00 in Berlin is 05:00 UTC in winter (CET) and 04:00 UTC in summer (CEST)
    assert s.next_after(utc(2025, 1, 10)) == utc(2025, 1, 10, 5)
    assert s.next_after(utc(2025, 7, 10)) == utc(2025, 7, 10, 4)
    five = sched(cron="*/5 * * * *", timezone="Europe/Berlin")
    assert five.next_after(utc(2025, 7, 10, 4, 1)) == utc(2025, 7, 10, 4, 5)


def test_cron_macros() -> None:
    assert sched(cron="@daily").next_after(utc(2025, 1, 1, 3)) == utc(2025, 1, 2)
    assert sched(cron="@hourly").next_after(utc(2025, 1, 1, 3, 1)) == utc(2025, 1, 1, 4)


def fires_on(s: Schedule, day: date) -> list[float]:
    start = datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() - 2 * 86400
    return [t for t in dues_between(s, start, start + 5 * 86400) if local(t).date() == day]


def test_spring_forward_daily_fires_once() -> None:
    s = sched(cron="30 2 * * *", timezone="Europe/Berlin")
    fires = fires_on(s, date(2025, 3, 30))
    # 02:30 does not exist that day; cronsim runs it at the first minute after the gap
    assert len(fires) == 1
    assert local(fires[0]).hour == 3 and local(fires[0]).minute == 0
    # the days around are ordinary
    assert [local(t).strftime("%H:%M") for t in fires_on(s, date(2025, 3, 29))] == ["02:30"]
    assert [local(t).strftime("%H:%M") for t in fires_on(s, date(2025, 3, 31))] == ["02:30"]


def test_fall_back_daily_fires_once() -> None:
    s = sched(cron="30 2 * * *", timezone="Europe/Berlin")
    fires = fires_on(s, date(2025, 10, 26))
    # 02:30 happens twice that day; it runs only the first time (CEST, 00:30 UTC)
    assert fires == [utc(2025, 10, 26, 0, 30)]
    # from inside the repeated hour, the next due time is still strictly after: tomorrow
    assert s.next_after(utc(2025, 10, 26, 1, 10)) == utc(2025, 10, 27, 1, 30)
    assert s.next_after(utc(2025, 10, 26, 0, 30)) == utc(2025, 10, 27, 1, 30)


@pytest.mark.parametrize("day", [date(2025, 3, 30), date(2025, 10, 26)])
def test_dst_day_through_scheduler_fires_once(day: date) -> None:
    s = sched(cron="30 2 * * *", timezone="Europe/Berlin")
    scheduler = Scheduler([s])
    start = datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() - 3 * 3600
    scheduler.restore({}, start)
    fired = []
    for minute in range(1, 28 * 60):
        fired += [due for _, due in scheduler.due(start + minute * 60)]
    assert [t for t in fired if local(t).date() == day] == fires_on(s, day)
    assert len(fires_on(s, day)) == 1


def test_hourly_wildcard_hour_runs_every_real_hour_through_fall_back() -> None:
    # "0 * * * *" has a wildcard hour: it runs every real hour, 25 times on fall-back day
    s = sched(cron="0 * * * *", timezone="Europe/Berlin")
    assert len(fires_on(s, date(2025, 10, 26))) == 25
    assert len(fires_on(s, date(2025, 3, 30))) == 23


BERLIN_2025 = (utc(2024, 12, 1), utc(2026, 2, 1))


@settings(max_examples=150, deadline=None)
@given(
    expr=st.sampled_from(["30 2 * * *", "*/5 * * * *", "0 6 * * *", "15 1-3 * * *", "0 0 1 * *"]),
    t=st.floats(*BERLIN_2025),
)
def test_cron_next_and_last_agree(expr: str, t: float) -> None:
    s = sched(cron=expr, timezone="Europe/Berlin")
    nxt = s.next_after(t)
    assert nxt > t
    last = s.last_at_or_before(t)
    assert last is not None and last <= t
    # nothing between the latest due time at or before t and the next one after t
    assert s.next_after(last) == nxt
    assert s.last_at_or_before(nxt) == nxt


# ------------------------------------------------------------ every


def test_every_aligned_to_epoch_multiples() -> None:
    s = sched(every=300)
    assert s.next_after(1000.0) == 1200.0
    assert s.next_after(1199.999) == 1200.0
    assert s.next_after(1200.0) == 1500.0
    assert s.last_at_or_before(1200.0) == 1200.0
    assert s.last_at_or_before(1199.0) == 900.0
    # a restart at any moment agrees on the due times
    assert dues_between(s, 1000.0, 2200.0) == [1200.0, 1500.0, 1800.0, 2100.0]
    assert dues_between(s, 1377.0, 2200.0) == [1500.0, 1800.0, 2100.0]


@settings(max_examples=200, deadline=None)
@given(
    every=st.one_of(st.floats(0.001, 1e6), st.sampled_from([0.1, 0.3, 1.0, 7.0, 60.0, 86400.0])),
    t=st.floats(0, 4e9),
)
def test_every_next_after_is_first_multiple_strictly_after(every: float, t: float) -> None:
    s = sched(every=every)
    nxt = s.next_after(t)
    assert nxt > t
    k = round(nxt / every)
    assert nxt == k * every
    assert (k - 1) * every <= t
    last = s.last_at_or_before(t)
    assert last is not None and last <= t and s.next_after(last) == nxt


# ------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("cron", "words"),
    [
        ("61 * * * *", "minute"),
        ("* * *", "5 fields"),
        ("0 0 * * * *", "5 fields"),
        ("0 0 30 2 *", "day-of-month"),
        ("@sometimes", "macro"),
        ("a b c d e", "bad cron"),
    ],
)
def test_bad_cron_names_the_schedule(cron: str, words: str) -> None:
    with pytest.raises(ScheduleError) as info:
        sched("nightly-report", cron=cron)
    message = str(info.value)
    assert "nightly-report" in message
    assert words.lower() in message.lower()
    assert repr(cron) in message


@pytest.mark.parametrize("tz", ["Mars/Olympus", "../etc/passwd", "", "Europe/"])
def test_bad_timezone_names_the_schedule(tz: str) -> None:
    with pytest.raises(ScheduleError, match=r"nightly-report.*timezone"):
        sched("nightly-report", cron="0 6 * * *", timezone=tz)
    with pytest.raises(ScheduleError, match=r"nightly-report"):
        sched("nightly-report", every=60, timezone=tz)


def test_cron_or_every_exactly_one() -> None:
    with pytest.raises(ScheduleError, match=r"'x'.*exactly one"):
        sched("x")
    with pytest.raises(ScheduleError, match=r"'x'.*exactly one"):
        sched("x", cron="* * * * *", every=5)
    with pytest.raises(ScheduleError, match=r"'x'.*every"):
        sched("x", every=0.0001)


def test_from_config() -> None:
    cfg = ScheduleConfig(
        task="reports.daily",
        cron="0 6 * * *",
        timezone="Europe/Berlin",
        payload={"kind": "daily", "n": [1, 2]},
        queue="reports",
        priority=3,
        catch_up="once",
    )
    s = Schedule.from_config(cfg)
    assert s.name == "reports.daily"  # defaults to the task
    assert (s.task, s.queue, s.priority, s.catch_up) == ("reports.daily", "reports", 3, "once")
    assert (s.cron, s.every, s.timezone) == ("0 6 * * *", None, "Europe/Berlin")
    assert msgspec.msgpack.decode(s.payload) == {"kind": "daily", "n": [1, 2]}
    with pytest.raises(ScheduleError, match=r"'bad'"):
        Schedule.from_config(ScheduleConfig(name="bad", task="t", cron="0 25 * * *"))


def test_from_configs_skips_disabled_and_refuses_duplicate_names() -> None:
    cfgs = [
        ScheduleConfig(task="a", every=60),
        ScheduleConfig(task="b", every=60, enabled=False),
        # a disabled entry is not validated either
        ScheduleConfig(task="c", cron="not a cron", enabled=False),
        ScheduleConfig(name="a2", task="a", cron="* * * * *"),
    ]
    scheduler = Scheduler.from_configs(cfgs)
    assert [s.name for s in scheduler.schedules()] == ["a", "a2"]
    with pytest.raises(ScheduleError, match=r"'a'"):
        Scheduler.from_configs([ScheduleConfig(task="a", every=60)] * 2)


# ------------------------------------------------------------ job ids


def test_job_id_for() -> None:
    due = utc(2025, 1, 1, 6)
    assert job_id_for("reports.daily", due) == job_id_for("reports.daily", due)
    ids = {
        job_id_for(name, d)
        for name in ("a", "b", "reports.daily", "x" * 500)
        for d in (due, due + 0.001, due + 60, 0.0, 1e12)
    }
    assert len(ids) == 20
    assert all(len(i) <= 64 for i in ids)
    assert len(job_id_for("y" * 10_000, 4e12)) <= 64


# ------------------------------------------------------------ Scheduler.due


def test_due_fires_once_in_due_order_and_wakeup() -> None:
    a = sched("a", every=60)
    b = sched("b", cron="*/2 * * * *")
    scheduler = Scheduler([a, b])
    start = utc(2025, 1, 1, 10, 0, 30)
    assert scheduler.next_wakeup() is None
    assert scheduler.restore({}, start) == []
    assert scheduler.next_wakeup() == utc(2025, 1, 1, 10, 1)
    assert scheduler.due(start + 10) == []
    assert scheduler.due(utc(2025, 1, 1, 10, 1)) == [(a, utc(2025, 1, 1, 10, 1))]
    assert scheduler.due(utc(2025, 1, 1, 10, 1)) == []
    assert scheduler.next_wakeup() == utc(2025, 1, 1, 10, 2)
    assert scheduler.due(utc(2025, 1, 1, 10, 2, 5)) == [
        (a, utc(2025, 1, 1, 10, 2)),
        (b, utc(2025, 1, 1, 10, 2)),
    ]
    assert scheduler.next_due("b") == utc(2025, 1, 1, 10, 4)
    assert scheduler.next_wakeup() == utc(2025, 1, 1, 10, 3)


def test_due_without_restore_plans_fresh() -> None:
    scheduler = Scheduler([sched(every=10)])
    assert scheduler.due(1005.0) == []
    assert scheduler.next_wakeup() == 1010.0


def test_no_burst_after_long_gap() -> None:
    a = sched("a", every=60)
    b = sched("b", cron="*/5 * * * *")
    scheduler = Scheduler([a, b])
    start = utc(2025, 1, 1, 10)
    scheduler.restore({}, start)
    later = start + 3600 + 17
    assert scheduler.due(later) == [(a, utc(2025, 1, 1, 11)), (b, utc(2025, 1, 1, 11))]
    assert scheduler.due(later + 1) == []
    assert scheduler.next_due("a") == utc(2025, 1, 1, 11, 1)
    assert scheduler.next_due("b") == utc(2025, 1, 1, 11, 5)


SCHEDULES = [
    sched("e7", every=7.0),
    sched("e60", every=60.0),
    sched("c5", cron="*/5 * * * *", timezone="Europe/Berlin"),
    sched("c-daily", cron="30 2 * * *", timezone="Europe/Berlin"),
]


@settings(max_examples=60, deadline=None)
@given(
    start=st.floats(utc(2025, 10, 25, 20), utc(2025, 10, 26, 2)),
    steps=st.lists(st.floats(0.0, 6.999), min_size=1, max_size=400),
)
def test_due_small_gaps_fire_every_due_time_once(start: float, steps: list[float]) -> None:
    scheduler = Scheduler(SCHEDULES)
    scheduler.restore({}, start)
    fired: list[tuple[str, float]] = []
    now = start
    for step in steps:
        prev = now
        now += step
        batch = scheduler.due(now)
        assert [d for _, d in batch] == sorted(d for _, d in batch)
        for s, d in batch:
            assert prev < d <= now
            fired.append((s.name, d))
        wake = scheduler.next_wakeup()
        assert wake is not None and wake > now
    assert not [k for k, n in Counter(fired).items() if n > 1]
    # gaps shorter than every schedule's spacing: nothing skipped
    expected = sorted((d, s.name) for s in SCHEDULES for d in dues_between(s, start, now))
    assert sorted((d, name) for name, d in fired) == expected


@settings(max_examples=60, deadline=None)
@given(
    start=st.floats(utc(2025, 3, 29, 20), utc(2025, 3, 30, 2)),
    steps=st.lists(st.floats(0.0, 5000.0), min_size=1, max_size=60),
)
def test_due_any_gaps_never_fire_twice(start: float, steps: list[float]) -> None:
    scheduler = Scheduler(SCHEDULES)
    scheduler.restore({}, start)
    fired: list[tuple[str, float]] = []
    now = start
    for step in steps:
        prev = now
        now += step
        batch = scheduler.due(now)
        names = [s.name for s, _ in batch]
        assert len(names) == len(set(names))  # no bursts: at most one fire per schedule
        for s, d in batch:
            assert prev < d <= now
            # the latest due time passed, not an earlier one
            assert s.next_after(d) > now
            fired.append((s.name, d))
    assert len(fired) == len(set(fired))


# ------------------------------------------------------------ restore


def test_restore_after_downtime_skip_and_once() -> None:
    skip = sched("skip", every=60, catch_up="skip")
    once = sched("once", cron="*/5 * * * *", catch_up="once")
    daily = sched("daily", cron="0 6 * * *", timezone="Europe/Berlin", catch_up="once")
    scheduler = Scheduler([skip, once, daily])
    last = {
        "skip": utc(2025, 1, 1, 10, 0),
        "once": utc(2025, 1, 1, 10, 0),
        "daily": utc(2024, 12, 29, 5),
    }
    now = utc(2025, 1, 1, 10, 23, 10)  # down for 23 minutes, several due times missed
    owed = scheduler.restore(last, now)
    assert owed == [(daily, utc(2025, 1, 1, 5)), (once, utc(2025, 1, 1, 10, 20))]
    assert scheduler.next_due("skip") == utc(2025, 1, 1, 10, 24)
    assert scheduler.next_due("once") == utc(2025, 1, 1, 10, 25)
    assert scheduler.next_due("daily") == utc(2025, 1, 2, 5)
    assert scheduler.due(now) == []
    assert scheduler.due(utc(2025, 1, 1, 10, 25)) == [
        (skip, utc(2025, 1, 1, 10, 25)),
        (once, utc(2025, 1, 1, 10, 25)),
    ]


def test_restore_never_fired_starts_fresh() -> None:
    s = sched("s", every=60, catch_up="once")
    scheduler = Scheduler([s])
    assert scheduler.restore({"other": 0.0}, 1_000_030.0) == []
    assert scheduler.next_wakeup() == 1_000_080.0


@pytest.mark.parametrize("catch_up", ["skip", "once"])
def test_restore_when_last_fired_is_latest_due_owes_nothing(catch_up: str) -> None:
    s = sched("s", cron="*/5 * * * *", catch_up=catch_up)
    scheduler = Scheduler([s])
    now = utc(2025, 1, 1, 10, 4, 59)
    assert scheduler.restore({"s": utc(2025, 1, 1, 10, 0)}, now) == []
    assert scheduler.next_wakeup() == utc(2025, 1, 1, 10, 5)
    # exactly at the due time it last fired for: not again
    assert scheduler.restore({"s": utc(2025, 1, 1, 10, 0)}, utc(2025, 1, 1, 10)) == []
    assert scheduler.next_wakeup() == utc(2025, 1, 1, 10, 5)


def test_restore_with_last_fired_in_the_future_never_refires() -> None:
    # the clock went back across a restart: nothing up to last_fired is planned again
    s = sched("s", every=60, catch_up="once")
    scheduler = Scheduler([s])
    assert scheduler.restore({"s": 6000.0}, 5000.0) == []
    assert scheduler.next_wakeup() == 6060.0


# ------------------------------------------------------------ restarts


RESTART_SCHEDULES = [
    ("e13", {"every": 13.0}),
    ("e90", {"every": 90.0}),
    ("c1", {"cron": "* * * * *"}),
    ("c-daily", {"cron": "30 2 * * *", "timezone": "Europe/Berlin"}),
    ("c-hourly", {"cron": "7 * * * *", "timezone": "Europe/Berlin"}),
]


@settings(max_examples=60, deadline=None)
@given(
    catch_up=st.sampled_from(["skip", "once"]),
    start=st.floats(utc(2025, 10, 25, 22), utc(2025, 10, 26, 1)),
    events=st.lists(
        st.tuples(st.floats(0.0, 400.0), st.booleans(), st.booleans()),
        min_size=1,
        max_size=80,
    ),
)
def test_restart_never_fires_a_pair_twice(
    catch_up: str, start: float, events: list[tuple[float, bool, bool]]
) -> None:
    """Run, log fires, crash (sometimes losing the last batch's log entries), restore, go on."""
    schedules = [
        sched(name, catch_up=catch_up, **kw)  # type: ignore[arg-type]
        for name, kw in RESTART_SCHEDULES
    ]
    log: dict[str, float] = {}
    fired: list[tuple[str, float]] = []
    scheduler = Scheduler(schedules)
    scheduler.restore(log, start)
    now = start
    for step, restart, long_down in events:
        now += step * (40 if long_down else 1)
        if restart:
            scheduler = Scheduler(schedules)
            owed = scheduler.restore(dict(log), now)
            if catch_up == "skip":
                assert owed == []
            batch = owed + scheduler.due(now)
        else:
            batch = scheduler.due(now)
        for s, d in batch:
            assert d <= now
            assert d > log.get(s.name, float("-inf"))
            fired.append((s.name, d))
            log[s.name] = d
    assert len(fired) == len(set(fired))
    assert len({job_id_for(n, d) for n, d in fired}) == len(fired)


def test_once_restart_fires_latest_missed_then_continues() -> None:
    s = sched("s", every=60, catch_up="once")
    log: dict[str, Any] = {}
    scheduler = Scheduler([s])
    scheduler.restore(log, 0.5)
    for now in (60.0, 120.5):
        for sch, d in scheduler.due(now):
            log[sch.name] = d
    assert log == {"s": 120.0}
    scheduler = Scheduler([s])
    assert scheduler.restore(dict(log), 1000.0) == [(s, 960.0)]
    assert scheduler.due(1000.0) == []
    assert scheduler.due(1020.0) == [(s, 1020.0)]


# ------------------------------------------------------------ wall-clock steps


def test_a_step_moves_every_schedules_with_the_wall_clock_and_leaves_cron() -> None:
    """An every schedule runs on the wall clock less the steps (its own
    clock): after a step its next fire is as far away as before. A cron
    schedule names wall times and stays."""
    every = sched("every", every=60)
    cron = sched("cron", cron="*/5 * * * *")
    scheduler = Scheduler([every, cron])
    start = utc(2025, 1, 1, 10, 0, 30)
    scheduler.restore({}, start)
    scheduler.set_skew(-3600.0)  # the wall clock went back an hour at start
    now = start - 3600.0
    assert scheduler.next_due("every") == utc(2025, 1, 1, 10, 1)  # its own clock
    assert scheduler.next_wakeup() == utc(2025, 1, 1, 10, 1) - 3600.0
    assert scheduler.due(now + 29.9) == []
    assert scheduler.due(now + 30.0) == [(every, utc(2025, 1, 1, 10, 1))]
    assert scheduler.next_due("cron") == utc(2025, 1, 1, 10, 5)  # an hour away now
    scheduler.set_skew(0.0)  # and forward again: nothing due at once
    assert scheduler.due(start + 30.0) == []
    assert scheduler.due(start + 90.0) == [(every, utc(2025, 1, 1, 10, 2))]


def test_restore_with_a_skew_counts_from_the_schedules_own_clock() -> None:
    """The log's fires of an every schedule are on its own clock, and the
    log keeps the skew: a restart after a step owes nothing and goes on."""
    once = sched("once", every=60, catch_up="once")
    scheduler = Scheduler([once])
    last = utc(2025, 1, 1, 10, 5)
    wall = last + 3600.0 + 20.0  # stepped forward an hour, 20 s after the fire
    assert scheduler.restore({"once": last}, wall, skew=3600.0) == []
    assert scheduler.next_wakeup() == last + 60.0 + 3600.0
    # without the skew the hour would look like downtime
    assert scheduler.restore({"once": last}, wall) == [(once, last + 3600.0)]


def test_latest_fire_is_what_every_schedules_prove_the_wall_clock_reached() -> None:
    scheduler = Scheduler([sched("a", every=60), sched("b", every=7), sched("c", cron="* * * * *")])
    assert scheduler.latest_fire({}, 0.0) is None
    assert scheduler.latest_fire({"c": 5000.0}, 0.0) is None  # cron: a wall time, not proof
    assert scheduler.latest_fire({"a": 600.0, "b": 700.0, "c": 9000.0}, -100.0) == 600.0


@settings(max_examples=60, deadline=None)
@given(
    every=st.sampled_from([2.0, 7.0, 60.0]),
    events=st.lists(
        # quarter seconds: sums are exact, so a due time is never a rounding away
        st.tuples(
            st.integers(0, 20).map(lambda n: n / 4),
            st.sampled_from([0.0, 0.0, -3600.0, 3600.0, -0.75, 41.25]),
        ),
        min_size=1,
        max_size=80,
    ),
)
def test_steps_never_change_an_every_schedules_rhythm(
    every: float, events: list[tuple[float, float]]
) -> None:
    """Whatever the steps, an every schedule fires as it would with no step
    at all (on elapsed time: the wall clock less the steps)."""
    s = sched("s", every=every)
    stepped, steady = Scheduler([s]), Scheduler([s])
    start = utc(2025, 1, 1, 10)
    stepped.restore({}, start)
    steady.restore({}, start)
    elapsed, skew = start, 0.0
    fired: list[float] = []
    for passed, step in events:
        elapsed += passed
        if step:
            skew += step
            stepped.set_skew(skew)
        batch = stepped.due(elapsed + skew)
        assert batch == steady.due(elapsed)
        fired.extend(due_at for _, due_at in batch)
    assert fired == sorted(set(fired))
