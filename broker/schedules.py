"""Cron and interval schedules, pure: no sockets, no files, no clocks.

A :class:`Schedule` is one enabled ``[[schedules]]`` entry, validated; its
:meth:`Schedule.next_after` says when it is due next. The :class:`Scheduler`
keeps every schedule's next due time on a heap: the broker calls
:meth:`Scheduler.restore` once after replaying its log (with each schedule's
last fired due time, as the log recorded it), then :meth:`Scheduler.due` from
its loop, sleeping at most until :meth:`Scheduler.next_wakeup`. Time always
comes in as ``now`` (epoch seconds).

A fire is a job whose id is :func:`job_id_for` the schedule's name and the
due time, so a fire repeated after a crash (fired, not yet logged as fired)
is the same job id, which the broker deduplicates.

Cron expressions are evaluated by ``cronsim`` (by the healthchecks.io author),
chosen over ``croniter`` because it is small, typed, has no dependencies,
and its DST handling is documented and Debian-cron-like: it iterates in an
aware timezone, so ``*/5 * * * *`` runs every five real minutes through a DST
change, while an expression with a fixed minute and hour (``30 2 * * *``)
runs once a day: on a spring-forward day a local time that does not exist
runs at the first minute after the gap (03:00), and on a fall-back day a local
time that happens twice runs only the first time. Expressions have the five
classic fields (cronsim's optional seconds field is refused, because its DST
handling differs), plus the macros ``@hourly``, ``@daily`` (``@midnight``),
``@weekly``, ``@monthly`` and ``@yearly`` (``@annually``).

``every`` schedules are aligned to multiples of ``every`` seconds since the
epoch, so every broker (and every restart) agrees on the due times; the
timezone does not affect them.

Steps of the wall clock: an ``every`` schedule keeps its interval. It runs on
its own clock, the wall clock less the sum of the steps the broker has seen
(``skew``, kept in the log): its due times, the ``due_at`` of its fires and
its job ids are on that clock, so after a step back it is not silent until
the wall clock catches up, after a step forward it fires neither at once nor
a burst, and a due time never repeats. A ``cron`` schedule names wall times
and follows the wall clock: after a step forward the latest due time passed
fires once (as after a long pass); after a step back no due time fires
twice, so it waits until the wall clock passes its last fire (cronie does
the same for fixed-time entries after a step back of less than 3 hours;
systemd's ``OnCalendar`` timers run the repeated times again).
"""

from __future__ import annotations

import hashlib
import heapq
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from cronsim import CronSim, CronSimError

from corral.config.schema import ScheduleConfig

__all__ = [
    "Schedule",
    "ScheduleError",
    "Scheduler",
    "job_id_for",
]

CATCH_UP_POLICIES = ("skip", "once")
#: Due times are rounded to milliseconds in job ids, so intervals must be at least that long.
MIN_EVERY = 0.001
#: Guard against a cron iterator that keeps yielding times at or before the start.
_MAX_STEPS = 1000

MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


class ScheduleError(ValueError):
    """A schedule that cannot run: a bad cron expression, timezone or interval.

    The message names the schedule and what is wrong with it.
    """


def job_id_for(name: str, due_at: float) -> str:
    """The id of the job that fires schedule ``name`` for ``due_at``.

    Deterministic (the same name and due time always give the same id), distinct
    for due times at least a millisecond apart, and at most 64 characters:
    ``"cron-" + sha1(name)[:16] + "-" + milliseconds in hex``.
    """
    digest = hashlib.sha1(name.encode("utf-8")).hexdigest()[:16]
    millis = round(due_at * 1000)
    sign = "-" if millis < 0 else ""
    return f"cron-{digest}-{sign}{abs(millis):x}"


def _load_timezone(name: str, tz_name: str) -> tzinfo:
    if tz_name == "UTC":
        return UTC
    try:
        return ZoneInfo(tz_name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ScheduleError(
            f"schedule {name!r}: unknown timezone {tz_name!r} "
            '(expected an IANA name like "Europe/Berlin" or "UTC")'
        ) from None


def _normalize_cron(name: str, expr: str) -> str:
    text = " ".join(expr.split())
    if text.startswith("@"):
        macro = MACROS.get(text.lower())
        if macro is None:
            raise ScheduleError(
                f"schedule {name!r}: bad cron expression {expr!r}: unknown macro "
                f"(expected one of {', '.join(MACROS)})"
            )
        return macro
    fields = len(text.split())
    if fields != 5:
        raise ScheduleError(
            f"schedule {name!r}: bad cron expression {expr!r}: expected 5 fields "
            f"(minute hour day-of-month month day-of-week), got {fields}"
        )
    return text


@dataclass(frozen=True)
class Schedule:
    """One enabled schedule, validated: construction raises :class:`ScheduleError`."""

    name: str
    task: str
    payload: bytes
    queue: str
    priority: int
    catch_up: str
    cron: str | None
    every: float | None
    timezone: str
    _tz: tzinfo = field(init=False, repr=False, compare=False)
    _expr: str | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.name:
            raise ScheduleError("a schedule needs a non-empty name")
        if self.catch_up not in CATCH_UP_POLICIES:
            raise ScheduleError(
                f"schedule {self.name!r}: catch_up must be one of "
                f"{', '.join(CATCH_UP_POLICIES)}, got {self.catch_up!r}"
            )
        if (self.cron is None) == (self.every is None):
            raise ScheduleError(f"schedule {self.name!r}: set exactly one of cron and every")
        object.__setattr__(self, "_tz", _load_timezone(self.name, self.timezone))
        expr: str | None = None
        if self.cron is not None:
            expr = _normalize_cron(self.name, self.cron)
            try:
                CronSim(expr, datetime(2000, 1, 1, tzinfo=self._tz))
            except (CronSimError, ValueError) as exc:
                raise ScheduleError(
                    f"schedule {self.name!r}: bad cron expression {self.cron!r}: {exc}"
                ) from None
        elif self.every is not None:
            if not (math.isfinite(self.every) and self.every >= MIN_EVERY):
                raise ScheduleError(
                    f"schedule {self.name!r}: every must be a finite number of seconds "
                    f">= {MIN_EVERY}, got {self.every!r}"
                )
            object.__setattr__(self, "every", float(self.every))
        object.__setattr__(self, "_expr", expr)

    @classmethod
    def from_config(cls, cfg: ScheduleConfig) -> Schedule:
        """Build a schedule from its config entry (which must be enabled)."""
        name = cfg.name or cfg.task
        return cls(
            name=name,
            task=cfg.task,
            payload=msgspec.msgpack.encode(cfg.payload),
            queue=cfg.queue,
            priority=cfg.priority,
            catch_up=cfg.catch_up,
            cron=cfg.cron,
            every=cfg.every,
            timezone=cfg.timezone,
        )

    def next_after(self, t: float) -> float:
        """The first due time strictly after epoch ``t``; ``math.inf`` if there is none."""
        if self.every is not None:
            every = self.every
            k = math.floor(t / every) + 1
            # Float division can be off by one either way: settle on the first k*every > t.
            while k * every <= t:
                k += 1
            while (k - 1) * every > t:
                k -= 1
            return k * every
        assert self._expr is not None
        start = datetime.fromtimestamp(math.floor(t), tz=self._tz)
        it = CronSim(self._expr, start)
        try:
            for _ in range(_MAX_STEPS):
                due = next(it).timestamp()
                # Iteration runs on local wall time for fixed-time expressions, so from inside
                # the repeated hour of a fall-back day it can yield the first pass's time (< t).
                if due > t:
                    return due
        except StopIteration:
            pass
        return math.inf

    def last_at_or_before(self, t: float) -> float | None:
        """The latest due time at or before epoch ``t``; None if there is none."""
        if self.every is not None:
            k = math.floor(t / self.every)
            while k * self.every > t:
                k -= 1
            while (k + 1) * self.every <= t:
                k += 1
            return k * self.every
        assert self._expr is not None
        # cronsim iterates in reverse; confirm against forward iteration (the definition of
        # a due time) by stepping forward from just before the candidate.
        anchor = datetime.fromtimestamp(math.floor(t) + 1, tz=self._tz)
        it = CronSim(self._expr, anchor, reverse=True)
        try:
            for _ in range(_MAX_STEPS):
                candidate = next(it).timestamp()
                due = self.next_after(candidate - 1.0)
                if due <= t:
                    while (later := self.next_after(due)) <= t:
                        due = later
                    return due
        except StopIteration:
            pass
        return None


class Scheduler:
    """Every schedule's next due time, on a heap; decides which fires are due."""

    def __init__(self, schedules: list[Schedule]) -> None:
        self._schedules: list[Schedule] = list(schedules)
        self._by_name: dict[str, int] = {}
        for index, schedule in enumerate(self._schedules):
            if schedule.name in self._by_name:
                raise ScheduleError(
                    f"schedule {schedule.name!r}: two schedules have this name "
                    "(give one a distinct name)"
                )
            self._by_name[schedule.name] = index
        #: (next due time on the wall clock, index into _schedules); one
        #: entry per planned schedule.
        self._heap: list[tuple[float, int]] = []
        #: index -> its next due time, on its own clock.
        self._next: dict[int, float] = {}
        self._planned = False
        #: Seconds the wall clock has stepped, in sum: an ``every`` schedule's
        #: own clock is the wall clock less this.
        self._skew = 0.0

    @classmethod
    def from_configs(cls, cfgs: Iterable[ScheduleConfig]) -> Scheduler:
        """A scheduler for the enabled entries of ``cfgs`` (disabled ones are not loaded)."""
        return cls([Schedule.from_config(cfg) for cfg in cfgs if cfg.enabled])

    def schedules(self) -> list[Schedule]:
        """The loaded schedules, in config order."""
        return list(self._schedules)

    def next_due(self, name: str) -> float | None:
        """The planned next due time of schedule ``name`` on its own clock (the
        wall clock for cron, see the module docstring for every); None if
        unknown or unplanned."""
        index = self._by_name.get(name)
        return None if index is None else self._next.get(index)

    def next_run_at(self, name: str) -> float | None:
        """When schedule ``name`` runs next, on the wall clock (epoch
        seconds); None if unknown or unplanned."""
        index = self._by_name.get(name)
        due = None if index is None else self._next.get(index)
        return None if due is None or index is None else due + self._offset(self._schedules[index])

    def _offset(self, schedule: Schedule) -> float:
        """Wall clock minus the schedule's own clock, in seconds."""
        return self._skew if schedule.every is not None else 0.0

    def set_skew(self, skew: float) -> None:
        """The wall clock stepped: ``skew`` is the sum of its steps, in seconds.
        ``every`` schedules keep their planned due times on their own clock,
        so on the wall clock they move with the step; cron schedules stay."""
        self._skew = skew
        self._heap = [
            (due_at + self._offset(self._schedules[index]), index)
            for index, due_at in self._next.items()
        ]
        heapq.heapify(self._heap)

    def latest_fire(self, last_fired: dict[str, float], skew: float) -> float | None:
        """The latest wall time (at ``skew``) that the logged fires of the
        ``every`` schedules prove the wall clock had reached; None if none
        fired. A fire is made only once its due time has come, so a wall
        clock now behind this went back while no broker ran."""
        times = [
            last_fired[s.name] + skew
            for s in self._schedules
            if s.every is not None and s.name in last_fired
        ]
        return max(times) if times else None

    def next_wakeup(self) -> float | None:
        """The earliest next due time of any schedule; None if nothing is planned."""
        return self._heap[0][0] if self._heap else None

    def restore(
        self, last_fired: dict[str, float], now: float, skew: float = 0.0
    ) -> list[tuple[Schedule, float]]:
        """After replay: plan every schedule and return the fires owed now, in due order.

        ``last_fired`` maps a schedule's name to the due time it last fired for (from
        the log), ``skew`` is the sum of the wall-clock steps the log holds, and
        ``now`` is wall-clock time. A schedule with no entry starts fresh: its first
        due time is the first after ``now`` and nothing is owed. Otherwise, for due
        times missed in ``(last_fired, now]`` (on the schedule's own clock):
        ``catch_up = "skip"`` owes none, ``"once"`` owes one fire, for the most
        recent of them. Nothing at or before ``last_fired`` is ever planned again.
        """
        owed: list[tuple[Schedule, float, int]] = []
        self._skew = skew
        self._heap = []
        self._next = {}
        for index, schedule in enumerate(self._schedules):
            own_now = now - self._offset(schedule)
            last = last_fired.get(schedule.name)
            if last is None:
                self._plan(index, schedule.next_after(own_now))
                continue
            if schedule.catch_up == "once" and schedule.next_after(last) <= own_now:
                missed = schedule.last_at_or_before(own_now)
                if missed is not None and missed > last:
                    owed.append((schedule, missed, index))
            self._plan(index, schedule.next_after(max(last, own_now)))
        self._planned = True
        owed.sort(key=lambda item: (item[1] + self._offset(item[0]), item[2]))
        return [(schedule, due_at) for schedule, due_at, _ in owed]

    def due(self, now: float) -> list[tuple[Schedule, float]]:
        """The (schedule, due_at) pairs due at or before wall-clock ``now``, each
        once, in due order; ``due_at`` is on the schedule's own clock.

        Each schedule fired is advanced past ``now``; if several of its due times
        passed since the last call, only the latest fires (no bursts). Before any
        :meth:`restore`, the first call plans every schedule fresh from ``now``.
        """
        if not self._planned:
            self.restore({}, now, self._skew)
            return []
        fired: list[tuple[float, int, float]] = []
        while self._heap and self._heap[0][0] <= now:
            _, index = heapq.heappop(self._heap)
            schedule = self._schedules[index]
            own_now = now - self._offset(schedule)
            due_at = self._next[index]
            following = schedule.next_after(due_at)
            if following <= own_now:
                latest = schedule.last_at_or_before(own_now)
                if latest is not None and latest > due_at:
                    due_at = latest
                following = schedule.next_after(max(due_at, own_now))
            fired.append((due_at + self._offset(schedule), index, due_at))
            self._plan(index, following)
        fired.sort()
        return [(self._schedules[index], due_at) for _, index, due_at in fired]

    def _plan(self, index: int, due_at: float) -> None:
        """Plan schedule ``index`` for ``due_at``, on its own clock."""
        if math.isinf(due_at):
            self._next.pop(index, None)
            return
        self._next[index] = due_at
        heapq.heappush(self._heap, (due_at + self._offset(self._schedules[index]), index))
