"""The worker: a DEALER socket thread and handler threads.

The socket thread owns the socket: it registers (READY with queues and
credit), receives deliveries, reports starts and outcomes in batches, and
heartbeats every interval whether or not a handler is busy. Handlers run on
their own threads, so a CPU-bound pure-Python handler cannot stop the
heartbeat (the interpreter switches threads every few milliseconds). When
the broker goes silent the worker reconnects with exponential backoff and
registers again.

Registering again (the broker restarted and asks for it, or the worker
reconnected) never drops what the worker holds: its READY offers back the
running and buffered jobs with their leases, and no buffered job starts
until the broker's :class:`~corral.broker.protocol.Registered` answer says
which of them are no longer this worker's (those are dropped, or see
ctx.cancelled). Outcomes waiting to go out are sent before the READY.

The status line to the supervisor (the worker's sign of life) is written on
the loop's own timer, connected or not: waiting out the backoff is a state
of the loop, never a sleep, so a broker that is away costs no worker its
life. A handler that holds the GIL in one long C call starves this thread
altogether; the supervisor tells that from death by the CPU time the
process burns (see :mod:`corral.supervisor.monitor`), and the job is
announced on the status pipe before its handler starts, so the hard timeout
still knows it.

A worker that can no longer tell the broker what became of its jobs ends
at once (:meth:`Worker.die`): an error escaping one of its own threads (the
socket thread, a handler thread: a bug, a report it cannot encode) exits
:data:`EXIT_BROKEN`, a message the broker refused after the READY exits
:data:`EXIT_REPORT_REFUSED`. Living on, it would hold its jobs' leases
for ever, vouched for by its supervisor and its own heartbeats, while no
outcome of theirs ever arrived. Its last status lines name the jobs whose
fates the broker may not know and why, so its supervisor has the broker
charge each a try that says so, and restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
import os
import random
import secrets
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import structlog
import zmq

from corral.broker import protocol as p
from corral.hooks import Hooks, HookSet
from corral.logs import JobLines
from corral.transport import connect_dealer
from corral.workers.buffer import Held
from corral.workers.execute import MAX_NOTE_CHARS, Execution, SoftTimer, clean_text
from corral.workers.registry import Registry
from corral.workers.reports import (
    Pacing,
    SentReports,
    Unencodable,
    encode_outbox,
    interrupted,
    report_jobs,
)
from corral.workers.status import (
    EXIT_BROKEN,
    EXIT_REFUSED,
    EXIT_REPORT_REFUSED,
    HookClock,
    StatusWriter,
    farewell_wait,
)

__all__ = [
    "EXIT_BROKEN",
    "EXIT_REFUSED",
    "EXIT_REPORT_REFUSED",
    "Worker",
    "WorkerOptions",
    "task_infos",
]

log = structlog.get_logger()

RECONNECT_MIN = 0.1
RECONNECT_MAX = 5.0


@dataclass
class WorkerOptions:
    """How one worker process behaves."""

    endpoint: str
    queues: list[str]
    concurrency: int = 1
    prefetch: int = 4
    heartbeat_interval: float = 1.0
    heartbeat_liveness: int = 3
    shutdown_timeout: float = 30.0
    max_jobs: int = 0
    name: str = ""
    concurrency_mode: str = "threads"
    queue_weights: dict[str, int] = field(default_factory=dict)
    #: The broker's max_message_size, in bytes: reports are cut to fit.
    max_message_size: int = 16 * 2**20
    #: Write end of the status pipe to the supervisor (workers.status).
    status_fd: int | None = None
    #: Seconds one hook call may take before the supervisor kills the
    #: worker (told on the status pipe; nothing bounds it without one).
    hook_timeout: float = 30.0


class Worker:
    """One worker process's runtime; :meth:`run` blocks until it stops.
    ``hooks`` (``corral.Hooks``) run around every job, after the built-in
    per-job log lines, and are closed as the worker stops."""

    def __init__(
        self,
        options: WorkerOptions,
        registry: Registry,
        config: Any = None,
        *,
        context: zmq.Context[Any] | None = None,
        hooks: Sequence[Hooks] = (),
    ) -> None:
        self.options = options
        self.registry = registry
        self.config = config
        self._status = StatusWriter(options.status_fd)
        self._hook_clock = HookClock(self._status, options.hook_timeout)
        watch = self._hook_clock if options.status_fd is not None else None
        self.hooks = HookSet([JobLines(), *hooks], watch=watch, builtin=1)
        self.worker_id = options.name or f"{socket.gethostname()}:{os.getpid()}"
        self._ctx = context or zmq.Context()
        self._own_ctx = context is None
        self._sock: zmq.Socket[Any] | None = None
        self._held = Held()
        self._buffer = self._held.buffer
        self._running = self._held.running
        self._outbox: deque[tuple[str, Any]] = deque()
        #: When the socket thread sends the outbox (starts and outcomes of
        #: several jobs in one report, none delayed past REPORT_DELAY).
        self._pacing = Pacing(self._wake, self._outbox)
        self._identity = b""
        #: Encoded reports the socket could not take (EAGAIN): sent first,
        #: in order, on the next flush; never dropped.
        self._unsent: deque[bytes] = deque()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._stop_deadline: float | None = None
        #: Leaving: until when the worker waits for the broker's Farewell
        #: (None: it has not said Bye), and whether it came.
        self._bye_deadline: float | None = None
        self._farewell = False
        #: The drain ran past shutdown_timeout: the jobs still running were
        #: reported interrupted.
        self._abandoned = False
        self._done_count = 0
        self._last_heard = 0.0
        self._last_sent = 0.0
        #: When a heartbeat was last tried, sent or not (a socket with no
        #: broker behind it takes nothing: the next try is an interval later).
        self._last_try = 0.0
        self._last_beat = 0.0
        self._backoff = RECONNECT_MIN
        #: While disconnected (the broker went silent): when to connect again.
        self._retry_at: float | None = None
        #: When a READY offering jobs back went out, until its answer.
        self._offered_at: float | None = None
        #: Reports sent lately, sent again as the worker registers again.
        self._sent_reports = SentReports(
            2 * options.heartbeat_interval * options.heartbeat_liveness
        )
        self._timeouts: dict[str, float | None] = {}
        self._status_version = 0
        self._status_sent = -1
        self._soft = SoftTimer()
        self.processed = 0
        #: Why the broker refused this worker's READY ("" if it did not).
        self.refused = ""
        #: The exit code a hook asked for (sys.exit, Ctrl-C), if one did.
        self._hook_exit_code: int | None = None
        #: Held by the thread that ends the process (see :meth:`die`).
        self._dying = threading.Lock()

    # ---------------------------------------------------------- lifecycle

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT drain (a second SIGINT stops at once)."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        if self._stopping and signum == signal.SIGINT:
            os._exit(1)
        self.request_stop()

    def request_stop(self) -> None:
        """Stop taking jobs, finish the running ones, then leave."""
        self._stopping = True
        self._wake()

    def run(self) -> int:
        """Run until stopped; returns the process exit code. The socket loop
        runs on its own thread; the main thread runs the first handler slot,
        so that a soft timeout (SIGALRM) can interrupt its handler."""
        signal.signal(signal.SIGALRM, self._soft.on_alarm)
        socket_thread = self._thread(self._socket_main, "corral-socket")
        threads = self.options.concurrency if self.options.concurrency_mode == "threads" else 1
        for i in range(1, threads):
            self._threads.append(self._thread(self._executor, f"corral-handler-{i}"))
        if self.options.concurrency_mode == "asyncio":
            self._guarded(lambda: asyncio.run(self._async_executor()), "asyncio")
        else:
            self._guarded(lambda: self._executor(main=True), "corral-handler-0")
        socket_thread.join()
        if self.refused:
            return EXIT_REFUSED
        return self._hook_exit_code or 0

    def _thread(self, target: Callable[[], None], name: str) -> threading.Thread:
        thread = threading.Thread(  # the copied context carries role and pid
            target=contextvars.copy_context().run,
            args=(self._guarded, target, name),
            name=name,
            daemon=True,
        )
        thread.start()
        return thread

    def _guarded(self, target: Callable[[], None], name: str) -> None:
        """Run one of the worker's own threads: an error escaping it ends
        the process (:meth:`die`), since without that thread the worker
        would hold its jobs for ever, alive to every eye."""
        try:
            target()
        except BaseException as exc:
            lost = exc.jobs if isinstance(exc, Unencodable) else ()
            self.die(
                f"the worker's {name} thread failed: {type(exc).__name__}: {exc}"[:1000],
                EXIT_BROKEN,
                exc,
                lost,
            )

    def die(
        self,
        reason: str,
        code: int,
        error: BaseException | None = None,
        lost: Iterable[str] = (),
    ) -> NoReturn:
        """End the process now with ``code``, for ``reason``: the worker can
        no longer tell the broker what became of its jobs. Its last status
        lines name the jobs whose fates the broker may not know (those
        running, ``lost`` and those of the reports sent lately or not yet
        sent: the broker charges a try only to those still leased to this
        worker) and ``reason``; its supervisor has the broker charge each
        of them a try naming it (``WorkerLost``), and restarts the worker.
        No Bye: that would hand its jobs back uncharged."""
        self._dying.acquire()  # a second thread failing waits for the exit
        charged = self._fates_unknown(lost)
        log.error(
            "worker.fatal",
            reason=reason,
            exit_code=code,
            charged=sorted(charged)[:20],
            charged_count=len(charged),
            hint="the worker cannot tell the broker what became of these jobs: it exits "
            "at once; its supervisor restarts it and the broker charges each a try "
            "(WorkerLost, naming this reason), so each runs again or ends failed",
            **({"exc_info": error} if error is not None else {}),
        )
        with self._status.lock:  # held to the exit: no snapshot comes after
            self._status.last_words(charged, reason)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    def _fates_unknown(self, lost: Iterable[str]) -> dict[str, float | None]:
        """The jobs :meth:`die` names (id -> timeout): running, ``lost``, and
        any a recent or unsent report carries, but none waiting unstarted
        in the buffer (those go back uncharged)."""
        held = self._held.holding()
        ids = set(lost) | self._sent_reports.jobs()
        ids.update(job_id for body in list(self._unsent) for job_id in report_jobs(body))
        ids.update(item.job_id for kind, item in list(self._outbox) if kind != "return")
        ids.difference_update(h.job_id for h in held if not h.running)
        ids.update(h.job_id for h in held if h.running)
        ids.update(self._timeouts)
        return {job_id: self._timeouts.get(job_id) for job_id in ids}

    def _socket_main(self) -> None:
        self._connect()
        while True:
            self._loop_once()  # an error here ends the process (_guarded)
            if self._stopping and self._drained() and self._farewell_heard():
                break
        self._shutdown()
        if self._running:  # abandoned handlers (shutdown_timeout): leave without them
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

    def _drained(self) -> bool:
        if self._bye_deadline is not None:
            # drained already, waiting for the Farewell: no job is left to
            # run out of shutdown_timeout (the wait may outlast it)
            return True
        if self._stop_deadline is None:
            self._begin_drain()
        assert self._stop_deadline is not None
        if time.monotonic() > self._stop_deadline:
            if not self._abandoned:  # (once: the loop asks again while it waits to leave)
                self._abandoned = True
                log.warning("worker.shutdown_timeout", running=list(self._running))
                self._abandon_running()
            return True
        # Held, not running: a job a handler has taken from the buffer but
        # not yet begun (it looked before the drain began) is neither in
        # the buffer nor running, and its outcome must go before the Bye.
        return not self._held.holding() and not self._outbox and not self._unsent

    def _farewell_heard(self) -> bool:
        """Drained: say Bye (the first call), then wait for the broker's
        Farewell, which it sends once everything said before the Bye (the
        last outcomes) is in its log. Without it the worker's last outcomes
        could die with a broker killed as the worker leaves, and their jobs
        run again (this process, which keeps them to resend, gone). A broker
        that goes silent meanwhile is connected to afresh; the new
        registration resends the recent reports and says Bye again
        (:meth:`_register`). True once the Farewell came or the wait (see
        :meth:`_farewell_wait`) is over, or at once when the worker keeps
        no recent report (:class:`SentReports`) and has none unsent."""
        now = time.monotonic()
        if self._bye_deadline is None:
            self._bye_deadline = now + self._farewell_wait()
            self._flush_outbox()  # what it says of its jobs goes before the Bye
            if self._sock is not None and not self._unsent:
                self._send(p.Bye())
            # No report kept and none unsent: nothing the Farewell would
            # confirm (a lost Return or Bye costs a delay, not a run), so
            # an idle worker leaves a gone broker at once.
            return not self._unsent and not len(self._sent_reports)
        if self._farewell:
            return True
        if now >= self._bye_deadline:
            log.warning(
                "worker.no_farewell",
                waited=round(self._farewell_wait(), 3),
                hint="the broker did not confirm it has this worker's last reports: if it "
                "lost them (it was killed), their jobs run again",
            )
            return True
        return False

    def _farewell_wait(self) -> float:
        """How long a leaving worker waits for the Farewell (seconds): three
        liveness windows, at least 10 s (a broker restarted meanwhile must
        be noticed, and connected to)."""
        return farewell_wait(self.options.heartbeat_interval, self.options.heartbeat_liveness)

    def _abandon_running(self) -> None:
        """The drain ran out of time: report each job still running as
        interrupted: it goes back to its queue with its try recorded and
        not counted (a shutdown is not the job's failure)."""
        why = (
            f"worker {self.worker_id} stopped after shutdown_timeout "
            f"({self.options.shutdown_timeout:g}s) before the job finished"
        )
        for job_id, ctx in list(self._running.items()):
            self._outbox.append(("done", interrupted(job_id, ctx.lease, why)))

    def _begin_drain(self) -> None:
        self._stop_deadline = time.monotonic() + self.options.shutdown_timeout
        self._send(p.Drain())
        self._return_unstarted()

    def _return_unstarted(self) -> None:
        leases = [p.Lease(d.job_id, d.lease) for d in self._buffer.clear()]
        if leases:
            self._send(p.Return(leases), keep=True)
        self._buffer.stop(self.options.concurrency)

    def _shutdown(self) -> None:
        self._flush_outbox()
        if self._sock is not None:
            self._sock.close(linger=500)
        os.close(self._wake_fd)
        if self._own_ctx:
            self._ctx.term()
        self.hooks.close()
        log.info("worker.stopped", processed=self.processed)

    # -------------------------------------------------------------- socket

    def _connect(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
        identity = secrets.token_bytes(8)
        self._identity = identity
        self._last_beat = 0.0  # tell the supervisor the new identity at once
        self._sock = connect_dealer(
            self._ctx, self.options.endpoint, self.config, identity=identity, worker=True
        )
        self._retry_at = None
        self._watch(self._sock)
        self._last_heard = time.monotonic()
        # The DEALER sends only once connected (IMMEDIATE): wait for that, so
        # READY is not dropped; a broker still down is retried by the loop.
        # (At most a heartbeat interval: the status line is never late by more.)
        self._sock.poll(int(self.options.heartbeat_interval * 1000), zmq.POLLOUT)
        self._register()

    def _watch(self, sock: zmq.Socket[Any] | None) -> None:
        """Poll the wake-up fd, and ``sock`` if connected."""
        self._poller = zmq.Poller()
        if sock is not None:
            self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self._wake_fd, zmq.POLLIN)

    def _register(self, broker_id: str = "") -> None:
        """Send READY, offering back every job held (the outcomes waiting
        to go out go first, so the broker never takes an ended job for one
        this worker dropped). With jobs offered, the buffer stays paused
        until the broker's Registered answer. ``broker_id``: the broker that
        asked (Reregister), "" when unasked; the recent reports go again
        first when :meth:`SentReports.due` says so.

        Every job the broker leased here is in the READY's offer or ended
        by a report sent before it, however the handler threads move
        meanwhile: the jobs held are taken *before* the outbox is sent, and
        a handler puts a job's outcome in the outbox before it lets go of
        the job (:meth:`_end`), so a job missing from the offer has its
        outcome in what is sent next (one that ends after it is offered
        is both: the broker refuses it back, or takes the outcome later).
        If the socket does not take all that (not connected), no READY
        goes: a READY ahead of an outcome would have the broker requeue
        the job as one this worker no longer has. The broker asks again
        (Reregister) once what is left reaches it."""
        holding = self._held.holding()
        self._flush_outbox()
        now = time.monotonic()
        if self._sent_reports.due(now, broker_id, self.options.heartbeat_interval):
            again = self._sent_reports.again(now)
            resent = all(self._send_bytes(body, keep=False) for body in again)
            if resent:
                self._sent_reports.resent(now, broker_id)
        else:
            resent = True
        if self._unsent or not resent:
            log.info("worker.register_deferred", unsent=len(self._unsent))
            return
        capacity = 0 if self._stopping else self.options.concurrency + self.options.prefetch
        self._send(
            p.Ready(
                self.worker_id,
                list(self.options.queues),
                capacity,
                self.options.concurrency,
                task_infos(self.registry),
                socket.gethostname(),
                os.getpid(),
                queue_weights=dict(self.options.queue_weights),
                holding=holding,
                supervised=self.options.status_fd is not None,
            )
        )
        if self._bye_deadline is not None:  # leaving: its Farewell is still owed
            self._send(p.Bye())
        if holding:
            self._offered_at = time.monotonic()
        else:
            self._offered_at = None
            self._buffer.resume()

    def _registered(self, msg: p.Registered) -> None:
        """The broker's answer to the jobs offered back: the refused ones
        are not ours (dropped from the buffer, or their handler sees
        ctx.cancelled); the buffer starts again."""
        for lease in msg.refused:
            self._held.cancel(lease.job_id, lease.lease)
        self._offered_at = None
        self._buffer.resume()
        log.info("worker.registered", refused=len(msg.refused))

    def _unanswered(self, now: float) -> None:
        """A connected broker that has not answered the jobs offered back
        within the liveness window (one that predates the answer): drop the
        buffered ones, which it hands out again, and start taking jobs."""
        window = self.options.heartbeat_interval * self.options.heartbeat_liveness
        if self._offered_at is None or now - self._offered_at <= window:
            return
        dropped = len(self._buffer.clear())
        self._offered_at = None
        self._buffer.resume()
        log.warning("worker.offer_unanswered", dropped_unstarted=dropped)

    def _loop_once(self) -> None:
        interval = self.options.heartbeat_interval
        self._pacing.deciding()
        wake = self._wake_at(interval)
        self._pacing.sleeping(wake)
        wait = max(0.0, wake - time.monotonic())
        events = dict(self._poller.poll(math.ceil(wait * 1000)))
        if self._wake_fd in events:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._wake_fd)
        if self._sock is not None and self._sock in events:
            self._receive()
            self._sent_reports.prune(self._last_heard)
        now = time.monotonic()
        if self._unsent or self._stopping or self._pacing.flush_due(now):
            self._flush_outbox()
        self._report_running(now, interval)  # the sign of life, connected or not
        if self._retry_at is not None:  # disconnected: connect when the backoff is over
            if self._stopping or now >= self._retry_at:
                self._connect()
            return
        if now - max(self._last_sent, self._last_try) >= interval:
            self._last_try = now
            self._send(p.WorkerHeartbeat())
        if self._broker_silent(now):
            self._reconnect(now)
        else:
            self._unanswered(now)

    def _wake_at(self, interval: float) -> float:
        """When the poll's wait ends (monotonic): at the next status line, the
        outbox's report (see :class:`Pacing`), and the next heartbeat and the
        end of the liveness window (connected) or the next connect. Each is
        in the future once handled: a heartbeat the socket could not take
        is tried again an interval later, and silence shorter than the
        window is no reason to wake (both once woke the loop at once, over
        and over, while the broker was away)."""
        wake = self._last_beat + interval
        due = self._pacing.due
        if due is not None:
            wake = min(wake, due)
        if self._bye_deadline is not None:
            wake = min(wake, self._bye_deadline)
        if self._retry_at is not None:
            wake = min(wake, self._retry_at)
        else:
            window = interval * self.options.heartbeat_liveness
            heartbeat = max(self._last_sent, self._last_try) + interval
            wake = min(wake, heartbeat, self._last_heard + window)
        return wake

    def _broker_silent(self, now: float) -> bool:
        """Nothing from the broker for the liveness window. Frames already
        waiting on the socket are not silence: this thread may have been
        starved (a handler holding the GIL) while the broker kept talking."""
        window = self.options.heartbeat_interval * self.options.heartbeat_liveness
        if now - self._last_heard <= window:
            return False
        self._receive()
        return time.monotonic() - self._last_heard > window

    def _report_running(self, now: float, interval: float) -> None:
        """A snapshot of the running jobs for the supervisor: when the set
        changed (at most every 50 ms) and at least every heartbeat."""
        changed = self._status_version != self._status_sent
        if now - self._last_beat >= interval or (changed and now - self._last_beat >= 0.05):
            self._last_beat = now
            self._status_sent = self._status_version
            with self._status.lock:
                self._status.running(
                    dict(self._timeouts), self._identity, dict(self._hook_clock.running)
                )

    def _receive(self) -> None:
        assert self._sock is not None
        while True:
            try:
                frame = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._last_heard = time.monotonic()
            self._backoff = RECONNECT_MIN
            msg = _command(frame)
            if msg is not None:
                self._handle(msg)

    def _handle(self, msg: Any) -> None:
        """One command from the broker."""
        match msg:
            case p.Deliver() if self._stopping:  # sent before our Drain arrived
                self._send(p.Return([p.Lease(d.job_id, d.lease) for d in msg.jobs]), keep=True)
            case p.Deliver():
                self._fit_to(msg.max_message_size)
                for delivery in msg.jobs:
                    self._buffer.put(delivery)
                # their starts will be reported within the pacing's delay:
                # wake for that now, so that a handler beginning one need
                # not wake this thread (a quick job's outcome wakes it once)
                self._pacing.expect(time.monotonic())
            case p.CancelJob():
                self._cancel(msg)
            case p.Withdraw():
                self._withdraw(msg)
            case p.Farewell():
                self._farewell = True
            case p.Reregister():
                # The broker does not know us (it restarted, or declared us
                # gone): offer back what we hold, and start nothing more
                # until it says which jobs are still ours.
                self._buffer.pause()
                log.info("worker.reregister", held=len(self._held.holding()))
                self._register(msg.broker_id)
            case p.Registered():
                self._registered(msg)
            case p.BrokerHeartbeat():
                pass
            case p.Refused():
                self._refused(msg)

    def _refused(self, msg: p.Refused) -> None:
        """The broker could not decode a message of ours. A refused READY
        means it never takes this worker: say why (log and status pipe)
        and stop, to exit with :data:`EXIT_REFUSED`. Any other (a report,
        a return; "" if it could not tell) lost what it said of this
        worker's jobs, which stay leased to it while it lives: the worker
        ends at once (:meth:`die`, :data:`EXIT_REPORT_REFUSED`)."""
        if msg.refused_op != "ready":
            what = f"{msg.refused_op} message" if msg.refused_op else "message"
            self.die(f"the broker refused this worker's {what}: {msg.reason}", EXIT_REPORT_REFUSED)
        if self.refused:
            return
        self.refused = f"the broker refused this worker's READY: {msg.reason}"
        log.error(
            "worker.refused",
            reason=msg.reason,
            exit_code=EXIT_REFUSED,
            hint="the broker can never register this worker: check the task options "
            "(@corral.task) and the pool's settings named above, and that worker "
            "and broker run the same corral version; the worker exits",
        )
        with self._status.lock:
            self._status.cannot_start(self.refused)
        self.request_stop()

    def _fit_to(self, limit: int) -> None:
        """The broker takes messages of at most ``limit`` bytes (0: it did
        not say): the reports and results of the jobs it delivers are cut
        to that, whatever this host's config says (a report over it would
        be dropped with the connection, its jobs' fates unheard)."""
        if limit <= 0 or limit == self.options.max_message_size:
            return
        log.info(
            "worker.message_limit",
            broker=limit,
            configured=self.options.max_message_size,
            hint="the broker's broker.max_message_size differs from this host's config: "
            "reports and results are fitted to the broker's",
        )
        self.options.max_message_size = limit

    def _cancel(self, msg: p.CancelJob) -> None:
        """A buffered job is dropped unstarted and handed back (its credit
        returns); a running one's handler sees ctx.cancelled."""
        where = self._held.cancel(msg.job_id, msg.lease)
        if where == "buffered":
            self._send(p.Return([p.Lease(msg.job_id, msg.lease)]), keep=True)
        if where != "pending":
            log.info("worker.job_cancelled", job_id=msg.job_id, started=where == "running")

    def _withdraw(self, msg: p.Withdraw) -> None:
        """Hand back those of ``msg``'s jobs that have not started; always
        answer, so the broker knows none of the others will start here."""
        back = [lease for lease in msg.leases if self._buffer.withdraw(lease.job_id, lease.lease)]
        self._send(p.Return(back, ref=msg.ref), keep=True)

    def _execution(self, delivery: p.Delivery) -> Execution:
        return Execution(
            delivery, self.registry, self.worker_id, self.options.max_message_size, self.hooks
        )

    def _claim(self, execution: Execution) -> bool:
        """Begin a job taken from the buffer, unless it was cancelled in
        between: then it is handed back, never begun."""
        d = execution.d
        if self._held.claim(d, execution.ctx):
            return True
        self._outbox.append(("return", p.Lease(d.job_id, d.lease)))
        self._pacing.urgent()
        return False

    def _reconnect(self, now: float) -> None:
        """The broker went silent: start no buffered job (the broker may
        have handed them out again) and drop the socket; the loop connects
        afresh once the backoff is over (at once when stopping) and
        registers, offering back the jobs held."""
        delay = self._backoff * random.uniform(0.8, 1.2)
        log.warning("worker.broker_silent", reconnect_in=round(delay, 3))
        self._backoff = min(RECONNECT_MAX, self._backoff * 2)
        self._buffer.pause()
        self._offered_at = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        self._watch(None)
        self._retry_at = now + delay

    def _send(self, msg: p.Msg, keep: bool = False) -> None:
        """Send ``msg`` now. One the socket cannot take (not connected, or
        its queue full) is dropped, or with ``keep`` (reports, returns) sent
        again first on the next flush."""
        self._send_bytes(p.encode(msg), keep)

    def _send_bytes(self, body: bytes, keep: bool) -> bool:
        if self._sock is not None:
            try:
                self._sock.send(body, zmq.NOBLOCK)
            except zmq.Again:
                pass
            else:
                self._last_sent = time.monotonic()
                return True
        if keep:
            self._unsent.append(body)
        return False

    def _resend(self) -> bool:
        """Send what could not go before, in order; False if some is left."""
        while self._unsent:
            body = self._unsent.popleft()
            if not self._send_bytes(body, keep=False):
                self._unsent.appendleft(body)
                return False
        return True

    def _flush_outbox(self) -> None:
        flowing = bool(self._outbox) and self._buffer.has_next
        self._pacing.taken(time.monotonic(), flowing)  # (what stays goes on the next pass)
        if not self._resend() or not self._outbox:
            return
        recycle = self.options.max_jobs and self._done_count >= self.options.max_jobs
        if recycle and not self._stopping:
            # Drain goes before the last report, so the credit that report
            # gives back is not used for a job this worker will not run.
            log.info("worker.recycle", reason="max_jobs", jobs=self._done_count)
            self._status.retiring("max_jobs")
            self.request_stop()
            self._begin_drain()
        reports, returns = encode_outbox(self._outbox, self.options.max_message_size)
        now = time.monotonic()
        for body in reports:
            self._send_bytes(body, keep=True)
            self._sent_reports.sent(body, now)
        if returns:
            self._send(p.Return(returns), keep=True)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.eventfd_write(self._wake_fd, 1)

    # ----------------------------------------------------------- handlers

    def _executor(self, main: bool = False) -> None:
        loop: asyncio.AbstractEventLoop | None = None
        while True:
            delivery = self._next_delivery()
            if delivery is None:
                break
            execution = self._execution(delivery)
            if execution.definition is not None and execution.definition.is_async:
                loop = loop or asyncio.new_event_loop()
            soft = execution.definition.soft_timeout if main and execution.definition else None
            if not self._claim(execution):
                continue
            self._begin(execution)
            outcome = self._soft.run(execution, loop, soft)
            self._end(execution, outcome)
        if loop is not None:
            loop.close()

    def _next_delivery(self) -> p.Delivery | None:
        """The next job to run, or None when told to stop. A job taken after
        the drain began goes back to the broker unstarted."""
        while True:
            delivery = self._buffer.take()
            if delivery is None:
                return None
            if not self._stopping:
                return delivery
            # (handed back before it leaves the held ones, as in _end)
            self._outbox.append(("return", p.Lease(delivery.job_id, delivery.lease)))
            self._buffer.settle(delivery.job_id)
            self._pacing.urgent()

    def _begin(self, execution: Execution) -> None:
        d = execution.d

        def progress(fraction: float, note: str) -> None:
            # the note is the handler's text: valid UTF-8 or no report encodes
            note = clean_text(note, MAX_NOTE_CHARS)
            self._outbox.append(("progress", p.Progress(d.job_id, d.lease, fraction, note)))
            self._pacing.soon(time.monotonic())

        execution.ctx._on_progress = progress
        with self._status.lock:  # the supervisor knows before the handler runs
            self._timeouts[d.job_id] = d.timeout
            self._status.started(d.job_id, d.timeout)
        self._outbox.append(("started", p.Lease(d.job_id, d.lease)))
        # The broker shows it running once it knows: within REPORT_DELAY,
        # most often with the job's outcome in the same report.
        self._pacing.soon(time.monotonic())
        self._status_version += 1
        structlog.contextvars.bind_contextvars(job_id=d.job_id, task=d.task, attempt=d.attempt)

    def _end(self, execution: Execution, outcome: p.Outcome) -> None:
        d = execution.d
        if outcome.kind == "ok":
            self.processed += 1
        self._done_count += 1  # (counted before the socket thread can send it: max_jobs)
        # The outcome is in the outbox before the job leaves the held ones:
        # a READY built in between offers the job or sends its outcome
        # first (see _register), never neither.
        self._outbox.append(("done", outcome))
        self._held.end(d.job_id)
        with self._status.lock:  # the supervisor knows it ended, even if the next
            self._timeouts.pop(d.job_id, None)  # handler holds the GIL from its start
            self._status.ended(d.job_id)
        self._status_version += 1
        max_jobs = self.options.max_jobs
        if self._buffer.has_next and not self._stopping and self._done_count != max_jobs:
            self._pacing.soon(time.monotonic())  # the next job's start and end join it
        else:  # nothing more to run here soon: its credit goes back at once
            self._pacing.urgent()
        execution.finish()  # the end hooks, once the outcome is on its way
        if execution.exit is not None:
            self.hook_exit(execution.exit)
        structlog.contextvars.unbind_contextvars("job_id", "task", "attempt")

    def hook_exit(self, exc: BaseException) -> None:
        """A hook raised ``exc`` (sys.exit, KeyboardInterrupt) to stop the
        process: the worker drains and exits with its code (SystemExit's
        int, 130 for KeyboardInterrupt, else 1)."""
        if isinstance(exc, SystemExit):
            code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        else:
            code = 130 if isinstance(exc, KeyboardInterrupt) else 1
        if self._hook_exit_code is None:
            self._hook_exit_code = code
        log.error(
            "worker.hook_exit",
            error=f"{type(exc).__name__}: {exc}"[:500],
            exit_code=code,
            hint="a hook asked the process to stop: the worker finishes its "
            "running jobs and exits (its supervisor restarts it)",
        )
        self.request_stop()

    async def _async_executor(self) -> None:
        """concurrency_mode = "asyncio": one event loop runs up to
        ``concurrency`` jobs at once; plain functions run on threads."""
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(self.options.concurrency)
        running: set[asyncio.Task[None]] = set()

        def finished(task: asyncio.Task[None]) -> None:
            running.discard(task)
            slots.release()

        while True:
            await slots.acquire()
            delivery = await loop.run_in_executor(None, self._next_delivery)
            if delivery is None:
                break
            task = asyncio.create_task(self._run_one_async(delivery))
            running.add(task)
            task.add_done_callback(finished)
        if running:
            await asyncio.gather(*running, return_exceptions=True)

    async def _run_one_async(self, delivery: p.Delivery) -> None:
        try:
            execution = self._execution(delivery)
            if self._claim(execution):
                self._begin(execution)
                self._end(execution, await execution.run_async())
        except BaseException as exc:  # its task's error would be seen by no one
            self.die(
                f"the worker's asyncio job task failed: {type(exc).__name__}: {exc}"[:1000],
                EXIT_BROKEN,
                exc,
            )


def _command(frame: bytes) -> Any:
    """The broker's command in ``frame``, or None (logged) if it cannot be
    read; a Refused is read whatever protocol version sent it."""
    try:
        return p.decode(p.worker_command_decoder, frame)
    except p.ProtocolError as exc:
        refused = p.refusal(frame)
        if refused is None:
            log.warning("worker.malformed_frame", reason=str(exc)[:200])
        return refused


def task_infos(registry: Registry) -> list[p.TaskInfo]:
    """The registered tasks and their options, as READY tells the broker."""
    return [
        p.TaskInfo(
            name=t.name,
            max_attempts=t.max_attempts,
            timeout=t.timeout,
            retry_backoff=t.retry_backoff,
            retry_backoff_max=t.retry_backoff_max,
            result_ttl=t.result_ttl,
            max_retries=t.max_retries,
            queue=t.queue,
            concurrency=t.concurrency,
            rate=t.rate,
            key_concurrency=t.key_concurrency,
            key_rate=t.key_rate,
        )
        for t in registry
    ]
