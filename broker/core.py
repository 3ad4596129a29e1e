"""The broker without its sockets: the parts, composed, and one pass.

A pass reads the clock once (a step of the wall clock since the last pass
is logged and moves the waits that are intervals: see
:class:`~corral.broker.clock.StepDetector`), handles every inbound message
(taken apart by one envelope function per side), runs the tick, commits
the log once (group commit: one write, at most one fsync), sends the
pass's replies, maybe compacts, then dispatches (and writes the leases it
gave, unsynced). The parts each own one thing:

- :class:`~corral.broker.dispatch.Dispatcher`: workers, credit, leases,
  lease deadlines, heartbeats, outcomes;
- :class:`~corral.broker.service.ClientService`: client requests;
- :class:`~corral.broker.waiters.Waiters`: result long-polls;
- :class:`~corral.broker.housekeeping.Housekeeper`: schedules, due jobs,
  TTL expiry, compaction (run by a
  :class:`~corral.broker.compactor.Compactor` in a child process);
- :class:`~corral.broker.followups.FollowUps`: the jobs a finished job
  brings about, held while the disk is full.

They change jobs only through the :class:`~corral.broker.journal.Journal`
(log first, then apply). :class:`BrokerCore` takes its clock and its links
to the sockets from outside, so tests drive it in-process with a
:class:`~corral.broker.clock.FakeClock` and recorders, and
:mod:`corral.broker.server` drives it with ZeroMQ.
"""

from __future__ import annotations

import gc
import secrets
import time
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from typing import Any

import structlog

from corral.broker import flows
from corral.broker import protocol as p
from corral.broker.admission import check_replayed_payloads
from corral.broker.clock import Clock, StepDetector, SystemClock
from corral.broker.coldjobs import ColdRef
from corral.broker.compactor import Compactor
from corral.broker.dispatch import Dispatcher, count_malformed
from corral.broker.followups import FollowUps
from corral.broker.housekeeping import Housekeeper
from corral.broker.job import BLOB_HEAD, touched
from corral.broker.journal import ClientLink, Journal, Replies, WorkerLink
from corral.broker.log import Log, LogCorrupt
from corral.broker.logfiles import Files
from corral.broker.records import BrokerStarted
from corral.broker.schedules import Scheduler
from corral.broker.segindex import Indexer
from corral.broker.service import ClientService
from corral.broker.state import Defaults, Job, JobState, chunk_frames, index_frames
from corral.broker.waiters import Waiters

log = structlog.get_logger()

#: Seconds between two readings of the status for the metrics and the events.
STATUS_EVERY = 1.0
#: Jobs created (live or by replay) between two gc.freeze calls (see BrokerCore._freeze).
FREEZE_EVERY = 100_000
#: Cold batches (of up to 512 jobs) warmed per pass after a restart.
WARM_PER_PASS = 8
#: Seconds after a replay before the sealed segments it found without an
#: index are indexed (the first requests come first).
INDEX_AFTER = 0.5
#: Longest poll wait of an idle broker, in seconds.
MAX_POLL_WAIT = 1.0
#: The two sides a message arrives on.
CLIENT, WORKER = "client", "worker"


class BrokerCore:
    """All job state and the parts that change it; see the module docstring."""

    def __init__(
        self,
        config: Any,
        *,
        clock: Clock | None = None,
        log: Log | None = None,
        files: Files | None = None,
    ) -> None:
        """``clock``, ``log`` and the log's ``files`` (its file operations:
        tests give a layer that plays power losses) default to the real ones."""
        bc = config.broker
        self.config = config
        self.clock: Clock = clock or SystemClock()
        self.state_dir = Path(bc.state_dir)
        self.broker_id = secrets.token_hex(6)
        #: When the last pass began (monotonic seconds; 0.0: none yet), and
        #: the gap between passes past which the broker was stalled: its
        #: loop waits at most a heartbeat interval between passes.
        self._last_pass = 0.0
        #: The creation number at the last gc.freeze (see _freeze).
        self._frozen_at = 0
        #: When the replay ended (monotonic seconds).
        self._replayed_at = 0.0
        #: ``state.next_seq`` at the last commit: jobs made since are not on disk.
        self._made_until = 0
        self._stall_after = 1.5 * bc.heartbeat_interval
        self._heartbeat = bc.heartbeat_interval
        self._steps = StepDetector()
        defaults = Defaults(
            max_attempts=bc.max_attempts,
            result_ttl=bc.result_ttl,
            failed_ttl=bc.failed_ttl,
            retry_backoff=bc.retry_backoff,
            retry_backoff_max=bc.retry_backoff_max,
            max_retries=bc.max_retries,
        )
        self.state = JobState(defaults)
        self.log = log or Log(
            self.state_dir / "log",
            fsync=bc.fsync,
            fsync_interval=bc.fsync_interval,
            segment_size=bc.segment_size,
            reserve=bc.disk_reserve,
            files=files,
        )
        self.journal = Journal(self.state, self.log)
        self.stats = self.journal.stats
        self.replies = Replies()
        self.waiters = Waiters(self.state, self.replies, self.stats)
        self.dispatcher = Dispatcher(
            self.journal,
            heartbeat_interval=bc.heartbeat_interval,
            liveness_window=bc.heartbeat_interval * bc.heartbeat_liveness,
            broker_id=self.broker_id,
            on_ended=self.ended,
            max_message_size=bc.max_message_size,
        )
        self.service = ClientService(
            self.journal,
            self.replies,
            self.dispatcher,
            self.waiters,
            broker_id=self.broker_id,
            state_dir=self.state_dir,
            on_ended=self.ended,
            max_payload=bc.max_payload,
        )
        self.service.max_message_size = bc.max_message_size
        self.compactor = Compactor(self.log, defaults)
        #: Indexes the sealed segments (see broker/segindex.py).
        self.indexer = Indexer()
        #: Sealed segments a replay found without a valid index: (path, bytes).
        self._unindexed: list[tuple[Path, int]] = []
        #: How far the replay found the segment being written chunk-indexed.
        self._chunked = 0
        self.housekeeper = Housekeeper(
            self.journal,
            Scheduler.from_configs(config.schedules),
            self.dispatcher,
            self.compactor,
            compact_min_size=bc.compact_min_size,
        )
        self.service.schedules = self.housekeeper.schedule_infos
        self.followups = FollowUps(self.journal, self.dispatcher, self._followed_up)
        self.client_link: ClientLink = _NoClients()
        #: Prometheus metrics (``[metrics] listen``), or None when not served.
        self.metrics: Any = None
        #: The events publisher (``[broker] events_endpoint``; see attach_events).
        self.events: Any = None
        self._status_due = 0.0
        listen = getattr(getattr(config, "metrics", None), "listen", None)
        if listen:
            from corral.broker.metrics import Metrics  # prometheus-client only when asked

            self.metrics = Metrics()
            self.journal.observers.append(self.metrics.observe)
            self.housekeeper.on_compacted = self.metrics.compaction.observe

    # ------------------------------------------------------------ start-up

    def replay(self) -> None:
        """Rebuild the state from the log, then log what recovery decides:
        jobs that workers held (running or reserved) wait for their holders
        to reclaim them for the reclaim window, then go back to their queue
        (an interrupted try not counted); follow-ups owed by finished jobs
        are created (or held, if the disk is full). Raises ConfigError for an
        unfinished job whose payload is over ``broker.max_payload``."""
        replay_began = time.monotonic()
        count = 0
        # A replay makes a million long-lived objects at once: a cyclic
        # collection meanwhile would only walk them again and again. After
        # it they are frozen (moved out of the collector's generations), so
        # the loop's later full collections never walk them either; they
        # are freed by reference counting like any object.
        gc.disable()
        try:
            for record in self.log.replay(self._cold_frames):
                self.state.apply(record)
                count += 1
        finally:
            gc.enable()
        self.state.replayed()
        written = self.log.written_position
        if written is not None:  # (a torn tail cut below the chunks' end: from the cut)
            self.indexer.resume(written[0], min(self._chunked, written[1]))
        self._freeze()
        # The jobs something happened to: what each start-up check reads (a
        # million pristine jobs are passed over once, here, not per check;
        # cold ones are pristine).
        lived = touched(self.state.jobs.warm_values())
        max_payload = self.config.broker.max_payload
        if max_payload is not None:  # only the cold batches that may hold a payload over it
            self.state.jobs.warm_over(max_payload + BLOB_HEAD.size)
        check_replayed_payloads(
            _WarmJobs(self.state),
            self.config.broker.max_payload,
            self.state.largest_blob,
            lived=lived,
        )
        # Jobs workers held when the broker stopped wait for their holders to
        # offer them back (see broker/rejoin.py), then go back to their queue.
        recovered = self.state.held_jobs(lived)
        self.dispatcher.hold_recovered(recovered, self.clock.monotonic())
        now = self.clock.time()
        self._steps.observe(now, self.clock.monotonic())
        back = self.housekeeper.stepped_while_down(now)
        if back is not None:
            self.clock_stepped(back, now, while_down=True)
        owed = self.followups.catch_up(now, lived)
        # a finished flow whose last job went without it (the broker stopped
        # in between) is forgotten by the first tick
        self.state.flowbook.touched.update(self.state.flows)
        for flow in list(self.state.flows.values()):  # a flow's own result_ttl runs
            if flows.finished(self.state, flow):  # from its last member's end
                ended = self.state.flowbook.finished_at(flow.id)
                self.housekeeper.flow_finished(flow, ended or self.clock.time())
        # A new epoch for this start's lease tokens, on disk before any lease.
        epoch = self.state.epoch + 1
        started = self.clock.time()
        self.journal.record(BrokerStarted(epoch, started))
        self.dispatcher.limits.since = started  # earlier starts are an earlier broker's
        self.log.sync(self.clock.monotonic())
        self._made_until = self.state.next_seq
        self.dispatcher.start_leases(epoch)
        cold = self.state.jobs.cold
        self._replayed_at = time.monotonic()
        log.info(
            "broker.replayed",
            records=count,
            jobs=len(self.state.jobs),
            cold_jobs=cold.count if cold is not None else 0,
            held_for_reclaim=len(recovered),
            followups_created=owed,
            seconds=round(time.monotonic() - replay_began, 3),
        )

    def _cold_frames(
        self, segment: Path, generation: int, seq: int, size: int, sealed: bool
    ) -> dict[int, ColdRef] | None:
        """The log's question at a replay (see Log.replay and
        checkpoint_frames); a sealed segment without a valid whole index is
        indexed after the start (its chunks, if any, serve meanwhile); the
        segment being written goes on being indexed by chunks from where
        its valid ones end."""
        if sealed:
            frames = index_frames(self.state, segment, generation, seq, size)
            if frames is not None:
                return frames
            # its chunks serve now; after the start a whole index is merged
            # from them (or, where they do not cover it, scanned)
            self._unindexed.append((segment, size))
            return chunk_frames(self.state, segment, generation, seq)[0]
        frames, self._chunked = chunk_frames(self.state, segment, generation, seq)
        return frames

    def warm_cold(self) -> None:
        """Warm a few cold batches (see broker/coldjobs.py): called each pass
        while any are cold, so the rest of a restart's work is done in
        slices of a few milliseconds."""
        cold = self.state.jobs.cold
        self.state.jobs.warm_some(WARM_PER_PASS)
        if self.state.jobs.cold is None:
            self._freeze()
            log.info(
                "broker.cold_jobs_warmed",
                batches=cold.warmed if cold is not None else 0,
                seconds=round(time.monotonic() - self._replayed_at, 3),
            )

    def attach_events(self, events: Any) -> None:
        """Publish job, worker and pool events through ``events`` (a
        :class:`~corral.broker.events.Events`) from now on: job events as
        records are applied, worker events as the worker table changes."""
        self.events = events
        events.count_into(self.stats)
        self.journal.observers.append(events.observe)
        self.dispatcher.workers.watchers.append(
            lambda change, conn: events.worker_changed(change, conn, self.clock.time())
        )

    def attach(self, client_link: ClientLink, worker_link: WorkerLink) -> None:
        """Connect the parts to the sockets, and fire what the schedules owe
        for the downtime."""
        self.client_link = client_link
        self.dispatcher.link = worker_link
        self.housekeeper.catch_up(self.clock.time())

    # ---------------------------------------------------------------- pass

    def run_pass(self, inbound: Iterable[tuple[str, list[bytes]]] = ()) -> None:
        """One pass over ``inbound`` (side, frames) messages; see the module
        docstring. ``inbound`` may be lazy: the server reads its sockets as
        the pass consumes it."""
        clock = self.clock
        now, mono = clock.time(), clock.monotonic()
        self.service.pass_number += 1
        step = self._steps.observe(now, mono)
        if step is not None:
            self.clock_stepped(step, now)
        if self._last_pass and mono - self._last_pass > self._stall_after:
            # beyond the wait a pass may take anyway (a heartbeat interval)
            self.dispatcher.stalled(mono - self._last_pass - self._heartbeat)
        self._last_pass = mono
        self.log.recheck_space(mono)
        for side, frames in inbound:
            self.on_frames(side, frames, now, mono)
        self.tick(now, mono)
        # Group commit: one fsync covers every reply of the pass. A pass with
        # no reply that tells of the state (leases, worker outcomes; pongs and
        # refusals of unreadable requests, a storm's) promises nothing, so its records
        # are synced within fsync_interval instead of at once; unless it made
        # jobs (a schedule's fire, a follow-up): those may be dispatched just
        # below, and one run before its creation is on disk would be made and
        # run again after a power loss.
        made = self.state.next_seq != self._made_until
        self._made_until = self.state.next_seq
        durable = self.replies.durable or made or bool(self.dispatcher.farewells)
        if self.metrics is None:
            self.log.commit(mono, durable=durable)
        else:
            began = time.perf_counter()
            if self.log.commit(mono, durable=durable):
                self.metrics.fsync.observe(time.perf_counter() - began)
        self.replies.flush(self.client_link)
        self.dispatcher.bid_farewells()
        if self.state.jobs.cold is None:  # a compaction replaces the base cold jobs are in
            self.housekeeper.maybe_compact(mono)
        # (the dispatch writes its leases to the log file before it sends)
        self.dispatcher.dispatch(now, mono)
        if self.state.jobs.cold is not None:
            self.warm_cold()
        written = self.log.written_position
        if (
            self.log.sealed
            or self._unindexed
            or self.indexer.busy
            or (written is not None and self.indexer.due(*written))
        ):
            self._index_sealed(mono)
        if self.state.next_seq - self._frozen_at >= FREEZE_EVERY:
            self._freeze()

    def _index_sealed(self, mono: float) -> None:
        """Index the segments sealed since the last pass, and those the
        replay found without an index (after the first answers: not on a
        restart's way), order a chunk index of the segment being written
        if it grew enough (see Indexer.grow), and tend the indexing child."""
        sealed = [(path, size) for _, path, size in self.log.sealed]
        self.log.sealed.clear()
        if self._replayed_at and time.monotonic() - self._replayed_at > INDEX_AFTER:
            sealed += self._unindexed
            self._unindexed = []
        for path, size in sealed:
            self.indexer.want(path, size)
        written = self.log.written_position
        if written is not None:
            self.indexer.grow(*written, mono)
        self.indexer.poll()

    def _freeze(self) -> None:
        """Move every object alive now out of the cyclic collector's
        generations (``gc.freeze``): its full collections then walk only
        what was made since, not a million jobs (a full collection over a
        million jobs stalls the loop for a few hundred ms). Jobs hold no
        reference cycles, so reference counting still frees them; a cycle
        frozen alive and dropped later is never collected, the price."""
        gc.freeze()
        self._frozen_at = self.state.next_seq
        self.stats["gc_freezes"] += 1

    def clock_stepped(self, delta: float, now: float, *, while_down: bool = False) -> None:
        """The wall clock stepped by ``delta`` seconds (negative: backward):
        logged, counted (``clock_steps``) and recorded, so that retries,
        delays and ``every`` schedules keep their intervals, live and after
        a restart. ``while_down``: found at start, from fires the log holds
        for a time still to come (``delta`` is then the least it can be)."""
        self.stats["clock_steps"] += 1
        log.warning(
            "broker.clock_stepped",
            seconds=round(delta, 3),
            direction="forward" if delta > 0 else "backward",
            while_down=while_down,
            hint="retries, delays and every-schedules keep their intervals; "
            "run_at and cron follow the wall clock",
        )
        self.housekeeper.clock_stepped(delta, now)

    def on_frames(self, side: str, frames: list[bytes], now: float, mono: float) -> None:
        """The envelope of both sides: [identity, body]. A frame that cannot
        be read is counted and answered (a client with an ErrorReply, a
        worker with a Refused, within a budget); a bug handling
        one message is logged and never stops the broker (a client is told,
        with code ``internal``, rather than left to its timeout; a worker
        with a Refused, as what it said of its jobs may be lost: it exits,
        and its jobs are charged and handed out again)."""
        if len(frames) != 2:
            reason = f"expected 2 frames, got {len(frames)}"
            self._malformed(side, reason, None)
            if side == WORKER and frames:
                self.dispatcher.refuse(frames[0], None, reason, now, mono)
            return
        identity, body = frames
        decoder = p.client_request_decoder if side == CLIENT else p.worker_report_decoder
        try:
            msg = p.decode(decoder, body)
        except p.ProtocolError as exc:
            self._malformed(side, str(exc), identity, exc.req)
            if side == WORKER:
                self.dispatcher.refuse(identity, body, str(exc), now, mono)
            return
        part = self.service if side == CLIENT else self.dispatcher
        try:
            part.on_message(identity, msg, now, mono)
        except LogCorrupt:
            raise  # the log under the broker is damaged (a cold batch): it stops
        except Exception as exc:
            self.stats["handler_errors"] += 1
            op = type(msg).__name__
            log.exception("broker.handler_error", side=side, op=op)
            req = getattr(msg, "req", None)
            if side == WORKER:  # what it said of its jobs is lost: told, the worker exits
                why = f"the broker failed handling it ({type(exc).__name__}: {str(exc)[:200]})"
                self.dispatcher.refuse(
                    identity, body, f"{why}, a bug logged as broker.handler_error", now, mono
                )
            elif isinstance(req, int):
                self.replies.add(
                    identity,
                    p.ErrorReply(
                        req,
                        "internal",
                        f"the broker failed handling this {op} request "
                        f"({type(exc).__name__}: {str(exc)[:200]}), a bug logged as "
                        "broker.handler_error; it may be partly done: look before retrying",
                    ),
                )

    def _malformed(self, side: str, reason: str, identity: bytes | None, req: int = 0) -> None:
        count_malformed(self.stats, side, reason)
        if side == CLIENT and identity is not None:
            code = "version" if "version" in reason else "invalid"
            reply = p.ErrorReply(req, code, f"bad request: {reason}")
            self.replies.add(identity, reply, durable=False)  # it tells nothing of the state

    def tick(self, now: float, mono: float) -> None:
        """What is due: schedules and delayed jobs (and what waited for disk
        space), lease deadlines, result waits, TTLs, and the heartbeat round."""
        self.housekeeper.fire_due(now)
        self.followups.retry(now)
        self.dispatcher.expire_deadlines(now, mono)
        self.waiters.expire(mono)
        self.housekeeper.expire(now, keep=self.followups.owes)
        self.service.supervisors.expire(mono)
        self.dispatcher.heartbeat(now, mono)
        if (self.metrics is not None or self.events is not None) and mono >= self._status_due:
            self._status_due = mono + STATUS_EVERY
            status = self.service.status(mono, now)
            if self.metrics is not None:
                self.metrics.refresh(status, status.latency)
            if self.events is not None:
                self.events.refresh(status, now)

    def ended(self, job: Job, now: float) -> None:
        """A job reached a terminal status: answer its waiters, and create
        what it brings about (chain step, chord callback, callbacks), now or
        once the disk has room."""
        self.waiters.job_ended(job)
        self.followups.job_ended(job, now)

    def _followed_up(self, job: Job, now: float) -> None:
        """``job``'s follow-ups were made: answer its flow's waiters if the
        flow ended with it, and start the flow's TTL."""
        if job.flow is not None:
            self.waiters.flow_ended(job.flow)
            flow = self.state.flows.get(job.flow)
            if flow is not None and flows.finished(self.state, flow):
                # from its last member's end, as a replay would count it
                ended = self.state.flowbook.finished_at(flow.id)
                self.housekeeper.flow_finished(flow, ended or now)

    def key_revoked(self, side: str, identity: bytes) -> None:
        """The broker refused a message from ``identity`` on ``side``: its
        CURVE key was removed since it connected. A worker's registration
        goes at once and its jobs back to their queue (its supervisor may
        still vouch for the process, and it would otherwise hold them)."""
        conn = self.dispatcher.workers.get(identity) if side == WORKER else None
        if conn is not None:
            self.dispatcher.lose(conn, self.clock.time(), self.clock.monotonic(), "key revoked")

    def close(self) -> None:
        """Stop a compaction under way, then sync and close the log."""
        self.compactor.stop()
        if self.state.jobs.cold is not None:
            self.state.jobs.cold.close()
        self.indexer.stop()
        self.log.close()

    def poll_timeout(self) -> float:
        """Seconds the loop may wait for input before the next pass is due."""
        if self.replies or self.dispatcher.wants_pass or self.state.jobs.cold is not None:
            return 0.0
        now, mono = self.clock.time(), self.clock.monotonic()
        wake = min(self.dispatcher.next_wakeup(), mono + MAX_POLL_WAIT)
        due = self.housekeeper.next_wakeup()
        if due is not None:
            wake = min(wake, mono + (due - now))
        deadline = self.waiters.next_deadline()
        if deadline is not None:
            wake = min(wake, deadline)
        sync_in = self.log.next_sync_due(mono)
        if sync_in is not None:
            wake = min(wake, mono + sync_in)
        return max(0.0, wake - mono)


class _WarmJobs(Collection[Job]):
    """The jobs of ``state`` that are not cold (counted with the cold ones)."""

    def __init__(self, state: JobState) -> None:
        self._jobs = state.jobs

    def __iter__(self) -> Iterator[Job]:
        return iter(self._jobs.warm_values())

    def __len__(self) -> int:
        return len(self._jobs)

    def __contains__(self, job: object) -> bool:
        return any(held is job for held in self)


class _NoClients:
    """The client link before the broker has bound its socket."""

    def send(self, identity: bytes, body: bytes) -> bool:
        return False

    def send_frames(self, identity: bytes, frames: tuple[bytes, ...]) -> bool:
        return False
