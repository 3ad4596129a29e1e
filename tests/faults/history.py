"""What a fault run asked for, what actually ran, what was broken when, and
a checker over it.

A run is a set of *invocations*, a set of *executions* and a list of *faults*:

- an invocation is one job a client tried to enqueue, named by a token the
  test chooses (carried in the job's payload). The producer records
  ``invoke`` before the enqueue call and one outcome after it: ``ok`` (the
  broker acknowledged it: the call returned the job id), ``fail`` (the
  broker refused it, or it was never sent: it must not run) or ``unknown``
  (no answer, e.g. ``BrokerUnavailable``: it may or may not exist). An
  invocation never completed counts as unknown.
- an execution is one run of a handler, recorded by the handler itself: a
  ``start`` line before it does anything else and a ``done`` line when it
  returns (none if it was killed or stopped first).
- a fault is a process the test SIGKILLed (or SIGSTOPped), with the moment.

Producer and handlers run in other processes, so they append their lines to
files (:class:`HistoryFile`; one ``write`` per line on an ``O_APPEND``
descriptor, so concurrent writers never interleave), which the test loads
(:meth:`History.load_invocations`, :meth:`History.load_executions`). Times
are ``time.monotonic()`` seconds: Linux's CLOCK_MONOTONIC, one clock for
every process of the host. The lines::

    invoke TOKEN T                          producer, before the enqueue call
    ok TOKEN JOB_ID T                       acknowledged as JOB_ID
    fail TOKEN T [REASON...]                refused
    unknown TOKEN T [REASON...]             no answer
    start RUN JOB_ID ATTEMPT PID TOKEN T    a handler began (RUN: unique per run)
    done RUN T                              that handler returned
    JOB_ID ATTEMPT PID [TOKEN]              an older start line, without times

:meth:`History.check` classifies every job: executed once, more than once,
not executed (``pending`` while the run goes on, ``lost`` once it is over or
once the broker calls the job ended or does not know it), plus executions
nobody asked for (``phantom``: an unknown token, a refused invocation, or a
job id other than the one acknowledged for the token). Jobs whose enqueue
got no answer may run or not; the ones that ran are listed in
``unacknowledged_ran`` and classified with the others. With faults recorded,
:meth:`Verdict.kill_windows` counts per fault the jobs in flight at that
moment and the re-runs it caused, and :meth:`Verdict.unexplained_reruns`
names the re-runs no fault explains.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

#: Broker statuses a job does not leave by itself.
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
#: What a test puts in ``statuses`` for a job the broker answered JobNotFound for.
MISSING = "missing"
#: Seconds a result may take from its handler's return to the broker's log
#: (the worker's report, one broker pass): a run done this little before a
#: broker kill may be run again, and counts as in flight at the kill.
SETTLE = 0.5


def append_line(path: str | Path, line: str) -> None:
    """Append ``line`` (one line, newline added) to ``path`` in one ``write``."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def _lines(path: str | Path) -> list[str]:
    """The complete lines of ``path`` (none if it does not exist): a last line
    without its newline is a write still under way, or torn by a kill."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    return [line for line in text.split("\n")[:-1] if line.strip()]


@dataclass(frozen=True)
class Execution:
    """One run of a handler, as it recorded itself (times: monotonic seconds)."""

    job_id: str
    attempt: int
    pid: int
    token: str | None = None
    run: str | None = None
    started_at: float | None = None
    done_at: float | None = None

    @classmethod
    def parse(cls, line: str) -> Execution:
        """A ``start`` line or an older ``JOB_ID ATTEMPT PID [TOKEN]`` line."""
        parts = line.split()
        try:
            if parts[0] == "start" and len(parts) == 7:
                _, run, job_id, attempt, pid, name, at = parts
                return cls(job_id, int(attempt), int(pid), name, run, float(at))
            if len(parts) in (3, 4):
                token = parts[3] if len(parts) == 4 else None
                return cls(parts[0], int(parts[1]), int(parts[2]), token)
        except ValueError:
            pass
        raise ValueError(f"not an execution line: {line!r}")

    def line(self) -> str:
        """The line a handler appends for this execution (with its newline)."""
        if self.run is not None and self.started_at is not None:
            return (
                f"start {self.run} {self.job_id} {self.attempt} {self.pid} "
                f"{self.token} {self.started_at!r}\n"
            )
        tail = f" {self.token}" if self.token is not None else ""
        return f"{self.job_id} {self.attempt} {self.pid}{tail}\n"

    def in_flight_at(self, at: float, settle: float = 0.0) -> bool:
        """Started before ``at`` and not done more than ``settle`` s before it."""
        if self.started_at is None or self.started_at > at:
            return False
        return self.done_at is None or self.done_at + settle > at


def read_executions(path: str | Path) -> list[Execution]:
    """Every execution of ``path``, in the order they started, with the time
    they were done where a ``done`` line says so. Any bad line but a torn
    last one is an error."""
    runs: list[Execution] = []
    by_run: dict[str, int] = {}
    for line in _lines(path):
        if line.startswith("done "):
            parts = line.split()
            if len(parts) != 3 or parts[1] not in by_run:
                raise ValueError(f"not a done line of a started run: {line!r}")
            index = by_run[parts[1]]
            runs[index] = replace(runs[index], done_at=float(parts[2]))
            continue
        execution = Execution.parse(line)
        if execution.run is not None:
            by_run[execution.run] = len(runs)
        runs.append(execution)
    return runs


@dataclass
class Invocation:
    """One job a client tried to enqueue."""

    token: str
    outcome: str = "invoked"  # "invoked" (no outcome yet), "ok", "fail" or "unknown"
    job_id: str | None = None
    reason: str = ""
    invoked_at: float = field(default_factory=time.monotonic)
    completed_at: float | None = None


@dataclass(frozen=True)
class Fault:
    """A process the test broke: ``what`` is "broker", "worker" or "stop"
    (SIGSTOP); ``at`` is the monotonic time just before the signal."""

    what: str
    pid: int
    at: float


@dataclass(frozen=True)
class KillWindow:
    """One fault and what came of it: the jobs in flight at that moment, and
    the re-runs it caused (runs of a job that had run before, started after
    this fault and before the next)."""

    fault: Fault
    in_flight: frozenset[str]
    reruns: tuple[Execution, ...]

    @property
    def duplicates(self) -> int:
        return len(self.reruns)


@dataclass
class Verdict:
    """The classification of every job of a history."""

    #: Acknowledged job ids.
    acknowledged: list[str]
    #: Jobs (acknowledged or not) that ran exactly once.
    once: list[str]
    #: Jobs (acknowledged or not) that ran more than once, with their executions.
    more_than_once: dict[str, list[Execution]]
    #: Acknowledged jobs that never ran although the run is over.
    lost: list[str]
    #: Acknowledged jobs that have not run yet (the run goes on).
    pending: list[str]
    #: Jobs whose enqueue got no answer and that ran anyway (allowed).
    unacknowledged_ran: list[str]
    #: Executions nobody asked for.
    phantom: list[Execution]
    #: Acknowledged jobs whose final broker status is not "succeeded".
    not_succeeded: dict[str, str]
    #: Every job's executions, in file order.
    executions: dict[str, list[Execution]]
    #: The faults of the run, in time order.
    faults: list[Fault] = field(default_factory=list)
    #: See :data:`SETTLE`.
    settle: float = SETTLE

    @property
    def valid(self) -> bool:
        """No acknowledged job lost and nothing ran that nobody asked for."""
        return not self.lost and not self.phantom

    @property
    def extra_executions(self) -> int:
        """Executions beyond the first, over all jobs."""
        return sum(len(runs) - 1 for runs in self.more_than_once.values())

    def unexplained_duplicates(self, killed_pids: Iterable[int]) -> dict[str, list[Execution]]:
        """Jobs that ran more than once without a kill to explain it.

        A job may run again only after a run of it was cut short by killing
        its process, so all its runs but one must be on ``killed_pids``;
        the jobs where two or more runs are on other processes are returned."""
        killed = set(killed_pids)
        return {
            job_id: runs
            for job_id, runs in self.more_than_once.items()
            if sum(1 for run in runs if run.pid not in killed) > 1
        }

    def _explains(self, fault: Fault, before: Execution, rerun: Execution) -> bool:
        """``fault`` can make ``rerun`` of a job whose run ``before`` was in
        flight then: a broker kill any run (a result on its way may be lost:
        :data:`SETTLE`), a worker kill or stop only the runs of that process."""
        assert rerun.started_at is not None
        if not fault.at < rerun.started_at:
            return False
        if fault.what == "broker":
            return before.in_flight_at(fault.at, self.settle)
        return before.pid == fault.pid and before.in_flight_at(fault.at)

    def unexplained_reruns(self) -> list[Execution]:
        """Runs of a job after its first that no fault explains: no earlier
        run of the job was in flight at a fault before this run started
        (a job run from a prefetch buffer and again elsewhere, say).
        Needs start times; a run without one is never explained."""
        out = []
        for runs in self.more_than_once.values():
            ordered = sorted(runs, key=lambda r: r.started_at or 0.0)
            for n, rerun in enumerate(ordered[1:], 1):
                if rerun.started_at is None or not any(
                    self._explains(fault, before, rerun)
                    for fault in self.faults
                    for before in ordered[:n]
                ):
                    out.append(rerun)
        return out

    def kill_windows(self) -> list[KillWindow]:
        """Per fault, in time order: the jobs in flight at that moment and
        the re-runs that started after it and before the next fault."""
        reruns: list[Execution] = []
        for runs in self.more_than_once.values():
            ordered = sorted(runs, key=lambda r: r.started_at or 0.0)
            reruns.extend(ordered[1:])
        windows = []
        for n, fault in enumerate(self.faults):
            end = self.faults[n + 1].at if n + 1 < len(self.faults) else float("inf")
            settle = self.settle if fault.what == "broker" else 0.0
            in_flight = frozenset(
                job_id
                for job_id, runs in self.executions.items()
                if any(
                    r.in_flight_at(fault.at, settle)
                    and (fault.what == "broker" or r.pid == fault.pid)
                    for r in runs
                )
            )
            caused = tuple(r for r in reruns if fault.at < (r.started_at or 0.0) <= end)
            windows.append(KillWindow(fault, in_flight, caused))
        return windows

    def story(self, job_id: str) -> str:
        """A job's runs and the faults around them, times relative to the
        first run's start, for assertion messages."""
        runs = sorted(self.executions.get(job_id, []), key=lambda r: r.started_at or 0.0)
        zero = runs[0].started_at or 0.0 if runs else 0.0
        first = (runs[0].started_at or 0.0) - 5.0 if runs else 0.0
        last = max((r.done_at or r.started_at or 0.0 for r in runs), default=0.0) + 1.0
        events = [
            f"run pid={r.pid} attempt={r.attempt} "
            f"{_rel(r.started_at, zero)}..{_rel(r.done_at, zero)}"
            for r in runs
        ]
        events += [
            f"{f.what} {f.pid} at {_rel(f.at, zero)}" for f in self.faults if first < f.at < last
        ]
        return f"{job_id}: " + "; ".join(events)

    def summary(self) -> str:
        return (
            f"acknowledged={len(self.acknowledged)} once={len(self.once)} "
            f"more_than_once={len(self.more_than_once)} "
            f"extra_executions={self.extra_executions} lost={len(self.lost)} "
            f"pending={len(self.pending)} unacknowledged_ran={len(self.unacknowledged_ran)} "
            f"phantom={len(self.phantom)} not_succeeded={len(self.not_succeeded)}"
        )

    def describe(self, limit: int = 5) -> str:
        """The summary and a few examples of each problem, for assertion messages."""
        out = [self.summary()]
        for name, ids in (("lost", self.lost), ("pending", self.pending)):
            if ids:
                out.append(f"{name}: {ids[:limit]}")
        if self.not_succeeded:
            out.append(f"not succeeded: {dict(list(self.not_succeeded.items())[:limit])}")
        if self.phantom:
            out.append(f"phantom: {self.phantom[:limit]}")
        for job_id, runs in list(self.more_than_once.items())[:limit]:
            out.append(f"ran {len(runs)} times: {job_id} {[(r.attempt, r.pid) for r in runs]}")
        return "\n".join(out)


class History:
    """Invocations, executions and faults of one run. The methods that
    record are thread-safe (one producer thread each is the usual use)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.invocations: dict[str, Invocation] = {}
        self.executions: list[Execution] = []
        self.faults: list[Fault] = []

    # ------------------------------------------------------------ invocations

    def invoke(self, token: str, at: float | None = None) -> None:
        with self._lock:
            if token in self.invocations:
                raise ValueError(f"token {token!r} invoked twice")
            self.invocations[token] = Invocation(token)
            if at is not None:
                self.invocations[token].invoked_at = at

    def ok(self, token: str, job_id: str, at: float | None = None) -> None:
        """The broker acknowledged ``token`` as ``job_id``."""
        self._complete(token, "ok", job_id=job_id, at=at)

    def fail(self, token: str, reason: str = "", at: float | None = None) -> None:
        """The enqueue certainly did not happen (refused, or never sent)."""
        self._complete(token, "fail", reason=reason, at=at)

    def unknown(self, token: str, reason: str = "", at: float | None = None) -> None:
        """The enqueue may or may not have happened (no answer)."""
        self._complete(token, "unknown", reason=reason, at=at)

    def _complete(
        self,
        token: str,
        outcome: str,
        job_id: str | None = None,
        reason: str = "",
        at: float | None = None,
    ) -> None:
        with self._lock:
            invocation = self.invocations[token]
            if invocation.outcome != "invoked":
                raise ValueError(f"token {token!r} completed twice")
            invocation.outcome = outcome
            invocation.job_id = job_id
            invocation.reason = reason
            invocation.completed_at = time.monotonic() if at is None else at

    def load_invocations(self, path: str | Path) -> int:
        """Add the invocations a producer process wrote to ``path`` (see
        :class:`HistoryFile`); returns how many lines were read."""
        lines = _lines(path)
        for line in lines:
            op, token, *rest = line.split(maxsplit=3)
            if op == "invoke":
                self.invoke(token, at=float(rest[0]))
            elif op == "ok":
                self.ok(token, rest[0], at=float(rest[1]))
            elif op in ("fail", "unknown"):
                self._complete(token, op, reason=" ".join(rest[1:]), at=float(rest[0]))
            else:
                raise ValueError(f"not an invocation line: {line!r}")
        return len(lines)

    def acknowledged(self) -> dict[str, str]:
        """job id -> token of every acknowledged invocation."""
        with self._lock:
            return {
                inv.job_id: inv.token
                for inv in self.invocations.values()
                if inv.outcome == "ok" and inv.job_id is not None
            }

    def counts(self) -> dict[str, int]:
        """How many invocations have each outcome."""
        with self._lock:
            out = dict.fromkeys(("invoked", "ok", "fail", "unknown"), 0)
            for inv in self.invocations.values():
                out[inv.outcome] += 1
            return out

    # ------------------------------------------------------ executions, faults

    def executed(self, execution: Execution) -> None:
        with self._lock:
            self.executions.append(execution)

    def load_executions(self, path: str | Path) -> int:
        """Replace the executions with those recorded in ``path``; returns how many."""
        executions = read_executions(path)
        with self._lock:
            self.executions = executions
        return len(executions)

    def fault(self, what: str, pid: int, at: float | None = None) -> Fault:
        """Record that ``pid`` is about to be killed (``what``: "broker",
        "worker") or stopped ("stop"); call it just before the signal."""
        fault = Fault(what, pid, time.monotonic() if at is None else at)
        with self._lock:
            self.faults.append(fault)
        return fault

    # ---------------------------------------------------------------- checker

    def check(
        self, *, final: bool, statuses: Mapping[str, str] | None = None, settle: float = SETTLE
    ) -> Verdict:
        """Classify every job.

        ``final``: the run is over (every acknowledged job had time to run),
        so one that never ran is lost rather than pending. ``statuses``: the
        broker's word on some jobs (``MISSING`` for JobNotFound); an
        acknowledged job that never ran is lost already if the broker says it
        ended or does not know it, and an acknowledged job whose status is not
        "succeeded" is listed in ``not_succeeded``. ``settle``: see
        :data:`SETTLE`.
        """
        statuses = statuses or {}
        with self._lock:
            invocations = dict(self.invocations)
            executions = list(self.executions)
            faults = sorted(self.faults, key=lambda f: f.at)
        acked = {
            inv.job_id: inv.token
            for inv in invocations.values()
            if inv.outcome == "ok" and inv.job_id is not None
        }

        runs: dict[str, list[Execution]] = {}
        phantom: list[Execution] = []
        unacked_ran: set[str] = set()
        for run in executions:
            invocation = invocations.get(run.token) if run.token is not None else None
            if run.token is None:
                # An old-style line without a token: judged by its job id alone.
                if run.job_id not in acked:
                    phantom.append(run)
                    continue
            elif invocation is None or invocation.outcome == "fail":
                phantom.append(run)
                continue
            elif invocation.outcome == "ok":
                if invocation.job_id != run.job_id:
                    phantom.append(run)
                    continue
            else:  # "unknown" or never completed: it may exist
                unacked_ran.add(run.job_id)
            runs.setdefault(run.job_id, []).append(run)

        lost: list[str] = []
        pending: list[str] = []
        for job_id in acked:
            if job_id in runs:
                continue
            status = statuses.get(job_id)
            if final or status == MISSING or status in TERMINAL:
                lost.append(job_id)
            else:
                pending.append(job_id)

        return Verdict(
            acknowledged=list(acked),
            once=[job_id for job_id, r in runs.items() if len(r) == 1],
            more_than_once={job_id: r for job_id, r in runs.items() if len(r) > 1},
            lost=lost,
            pending=pending,
            unacknowledged_ran=sorted(unacked_ran),
            phantom=phantom,
            not_succeeded={
                job_id: statuses[job_id]
                for job_id in acked
                if job_id in statuses and statuses[job_id] != "succeeded"
            },
            executions=runs,
            faults=faults,
            settle=settle,
        )


class HistoryFile:
    """The producer's side of a history kept in a file: ``invoke`` before an
    enqueue call, then ``ok``/``fail``/``unknown`` after it, one line each.
    Safe to share between threads and processes (one ``write`` per line)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def invoke(self, token: str) -> None:
        append_line(self.path, f"invoke {token} {time.monotonic()!r}")

    def ok(self, token: str, job_id: str) -> None:
        append_line(self.path, f"ok {token} {job_id} {time.monotonic()!r}")

    def fail(self, token: str, reason: str = "") -> None:
        append_line(self.path, f"fail {token} {time.monotonic()!r} {_one_line(reason)}")

    def unknown(self, token: str, reason: str = "") -> None:
        append_line(self.path, f"unknown {token} {time.monotonic()!r} {_one_line(reason)}")


def _rel(at: float | None, zero: float) -> str:
    return "-" if at is None else f"{at - zero:+.3f}"


def _one_line(text: str) -> str:
    return " ".join(text.split())[:200]
