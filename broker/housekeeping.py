"""Housekeeping: what the broker does because time passed.

Fires due schedules (the job first, then the fire's record), moves
scheduled and retrying jobs whose time came to their queue, forgets
finished jobs past their TTL, keeps intervals across steps of the wall
clock, and compacts the log when what was written since the last
compaction has grown past twice the live data (in a child process:
:mod:`corral.broker.compactor`). Time comes in as ``now`` (epoch seconds)
and ``mono`` (monotonic seconds): a test drives them with a fake clock.

A schedule's fire is a new job, so like an enqueue it is refused while the
log is full (its reserve is kept for records about jobs that exist): the
fire is held, logged, and made on the first pass after space returns. A
schedule keeps one held fire, its latest (as :meth:`Scheduler.due` fires
only the latest of due times that passed together); one it replaces is
logged as superseded.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

import msgspec
import structlog

from corral.broker import flows
from corral.broker import protocol as p
from corral.broker.clock import STEP_TOLERANCE
from corral.broker.compactor import Compactor
from corral.broker.dispatch import Dispatcher
from corral.broker.jobspec import JobSpec
from corral.broker.journal import Journal
from corral.broker.records import ClockStepped, FlowCreated, FlowRemoved, Removed, ScheduleFired
from corral.broker.schedules import Schedule, Scheduler, job_id_for
from corral.broker.state import TERMINAL

log = structlog.get_logger()


class Housekeeper:
    """Schedules, due jobs, TTL expiry and compaction."""

    def __init__(
        self,
        journal: Journal,
        scheduler: Scheduler,
        dispatcher: Dispatcher,
        compactor: Compactor,
        *,
        compact_min_size: int,
    ) -> None:
        self.journal = journal
        self.state = journal.state
        self.stats = journal.stats
        self.scheduler = scheduler
        self.dispatcher = dispatcher
        self.compactor = compactor
        self.compact_min_size = compact_min_size
        #: Told the seconds each compaction took, start to install (metrics).
        self.on_compacted: Callable[[float], None] | None = None
        self._compact_started = 0.0
        #: schedule name -> (schedule, due time, caught up): fires held while
        #: the log is full, in the order they were held.
        self._held: dict[str, tuple[Schedule, float, bool]] = {}
        #: Jobs past their TTL kept while their follow-ups wait.
        self._kept: set[str] = set()
        #: (when, flow id): finished flows with their own result_ttl.
        self._flow_timers: list[tuple[float, str]] = []
        #: flow id -> when it is forgotten, set by its latest end (an entry
        #: in the heap that does not match is stale: the flow ended again).
        self._flow_due: dict[str, float] = {}

    def catch_up(self, now: float) -> int:
        """After replay: fire what the schedules owe for the downtime (by
        each schedule's catch-up policy). Returns how many fired."""
        owed = self.scheduler.restore(self.state.last_fired, now, self.state.wall_steps)
        for schedule, due_at in owed:
            self.fire(schedule, due_at, now, caught_up=True)
        return len(owed)

    def clock_stepped(self, delta: float, now: float) -> None:
        """The wall clock stepped by ``delta`` seconds: log it (the jobs that
        wait an interval move with it, live and on replay), and keep the
        ``every`` schedules' rhythm."""
        self.journal.record(ClockStepped(delta, now))
        self.scheduler.set_skew(self.state.wall_steps)
        self.dispatcher.poke()

    def stepped_while_down(self, now: float) -> float | None:
        """After replay: how far (seconds, negative) the wall clock must have
        gone back while no broker ran, at least: the ``every`` schedules' last
        fires, or the latest time the broker's own records hold (see
        ``JobState.latest_at``), are later than ``now``. None if nothing
        shows a step."""
        fired = self.scheduler.latest_fire(self.state.last_fired, self.state.wall_steps)
        seen = max(fired or 0.0, self.state.latest_at) or None
        if seen is None or now >= seen - STEP_TOLERANCE:
            return None
        return now - seen

    def fire_due(self, now: float) -> None:
        """Fire the held fires if the log has room again, then the schedules
        due by ``now``; queue the jobs due by ``now``."""
        if self._held and not self.journal.log.full:
            held = sorted(self._held.values(), key=lambda h: h[1])
            self._held.clear()
            for schedule, due_at, caught_up in held:
                log.info("broker.schedule_fire_resumed", schedule=schedule.name, due_at=due_at)
                self.fire(schedule, due_at, now, caught_up)
        for schedule, due_at in self.scheduler.due(now):
            self.fire(schedule, due_at, now)
        if self.state.promote_due(now):
            self.dispatcher.poke()

    def expire(self, now: float, keep: Callable[[str], bool] = lambda job_id: False) -> None:
        """Forget the finished jobs past their TTL (a Removed record each, so
        a replay never revives one), but not while ``keep(job_id)`` (its
        follow-ups wait to be made): such a job goes once it is kept no more."""
        for job_id in self.state.expired(now):
            if keep(job_id):
                self._kept.add(job_id)
            else:
                self.journal.record(Removed(job_id))
        for job_id in [k for k in self._kept if not keep(k)]:
            self._kept.discard(job_id)
            job = self.state.jobs.get(job_id)
            if job is None or job.status not in TERMINAL:
                continue  # retried by hand since: its next end sets its TTL
            if self.state.expiry.expires_at(job) <= now:
                self.journal.record(Removed(job_id))
        self._forget_flows()
        while self._flow_timers and self._flow_timers[0][0] <= now:
            when, flow_id = heapq.heappop(self._flow_timers)
            if self._flow_due.get(flow_id) != when:
                continue  # it ended again since: a later entry holds
            del self._flow_due[flow_id]
            flow = self.state.flows.get(flow_id)
            # a member retried by hand reopened it: its next end sets a timer
            if flow is not None and flows.finished(self.state, flow):
                self.journal.record(FlowRemoved(flow_id))

    def flow_finished(self, flow: FlowCreated, now: float) -> None:
        """``flow`` just finished (or was found finished on replay): one with
        its own ``result_ttl`` is forgotten that long after ``now`` (after
        its latest end, if a member retried by hand reopened it)."""
        if flow.result_ttl is not None:
            due = now + flow.result_ttl
            self._flow_due[flow.id] = due
            heapq.heappush(self._flow_timers, (due, flow.id))

    def _forget_flows(self) -> None:
        """Forget the finished flows that lost their last job (FlowRemoved):
        a flow without its own result_ttl lives as long as the longest TTL
        of its jobs."""
        book = self.state.flowbook
        while book.touched:
            flow = self.state.flows.get(book.touched.pop())
            if flow is None or flow.result_ttl is not None or not flows.finished(self.state, flow):
                continue
            ids = [s.id for s in flow.steps] + ([flow.callback.id] if flow.callback else [])
            if not any(i in self.state.jobs for i in ids):
                self.journal.record(FlowRemoved(flow.id))

    def next_wakeup(self) -> float | None:
        """The epoch time the next job, schedule or flow expiry, or a job's
        ``expires`` deadline (the dispatcher's tick cancels it), is due, if any."""
        flow_due = self._flow_timers[0][0] if self._flow_timers else None
        times = (
            self.state.next_wakeup(),
            self.scheduler.next_wakeup(),
            flow_due,
            self.state.expiring.next_due(),
        )
        due = [t for t in times if t is not None]
        return min(due) if due else None

    def fire(self, schedule: Schedule, due_at: float, now: float, caught_up: bool = False) -> None:
        """A schedule's due time came: its job, then the record of the fire.
        The job id derives from (schedule, due time), so a fire repeated
        after a crash between the two records is deduplicated. While the log
        is full the fire is held instead (see the module docstring)."""
        if self.journal.log.full:
            self._hold(schedule, due_at, caught_up)
            return
        spec = JobSpec(
            job_id_for(schedule.name, due_at),
            schedule.task,
            msgspec.Raw(schedule.payload),
            queue=schedule.queue,
            priority=schedule.priority,
        )
        record = self.state.decide_create(spec, now)
        if record is not None:
            self.journal.record(record)
            self.stats["schedules_fired"] += 1
        self.journal.record(ScheduleFired(schedule.name, due_at))
        self.dispatcher.poke()
        event = "broker.schedule_caught_up" if caught_up else "broker.schedule_fired"
        log.info(event, schedule=schedule.name, due_at=due_at, job_id=spec.id)

    def _hold(self, schedule: Schedule, due_at: float, caught_up: bool) -> None:
        """Keep a fire refused for want of disk space, to make it later."""
        earlier = self._held.get(schedule.name)
        if earlier is not None and earlier[1] >= due_at:
            return
        self._held[schedule.name] = (schedule, due_at, caught_up)
        self.stats["schedule_fires_held_disk_full"] += 1
        log.warning(
            "broker.schedule_fire_held",
            schedule=schedule.name,
            due_at=due_at,
            reason="the disk is full: new jobs are refused",
            hint="it fires once space returns; free space or raise broker.disk_reserve",
        )
        if earlier is not None:
            log.warning(
                "broker.schedule_fire_superseded",
                schedule=schedule.name,
                due_at=earlier[1],
                by_due_at=due_at,
            )

    def schedule_infos(self) -> list[p.ScheduleInfo]:
        """Each schedule, with when it runs next (wall clock) and the due
        time it last fired for."""
        scheduler = self.scheduler
        infos = []
        for schedule in scheduler.schedules():
            due = scheduler.next_run_at(schedule.name)
            infos.append(
                p.ScheduleInfo(
                    schedule.name,
                    schedule.task,
                    schedule.queue,
                    schedule.cron,
                    schedule.every,
                    schedule.timezone,
                    due,
                    self.state.last_fired.get(schedule.name),
                )
            )
        return infos

    def maybe_compact(self, mono: float) -> bool:
        """Each pass: finish a compaction whose child is done, or start one
        when the bytes written since the last compaction exceed
        ``max(compact_min_size, 2 x live bytes)`` and no backoff holds it.
        Never waits for the child. Returns True when one was installed."""
        outcome = self.compactor.poll(mono)
        if outcome is not None:
            self.stats["compactions" if outcome.ok else "compactions_failed"] += 1
            if outcome.ok and self.on_compacted is not None:
                self.on_compacted(mono - self._compact_started)
            return outcome.ok
        if not self.compactor.may_start(mono):
            return False
        threshold = max(self.compact_min_size, 2 * self.state.live_bytes)
        if self.journal.log.bytes_since_compaction > threshold:
            self._compact_started = mono
            self.compactor.start(mono)
            if not self.compactor.running:
                self.stats["compactions_failed"] += 1
        return False
