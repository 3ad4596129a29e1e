"""What a soak run asked for and what actually ran, and a checker over it.

A run is a set of *invocations* and a set of *executions*:

- an invocation is one job a client tried to enqueue, named by a token the
  test chooses (carried in the job's payload). Its outcome is ``ok`` (the
  broker acknowledged it: the call returned the job id), ``fail`` (the
  broker refused it, or it was never sent: it must not run) or ``unknown``
  (no answer, e.g. ``BrokerUnavailable``: it may or may not exist). An
  invocation never completed counts as unknown.
- an execution is one run of a handler, recorded by the handler itself as a
  line ``job_id attempt pid [token]`` appended to a file (one ``write`` per
  line on an ``O_APPEND`` descriptor, so concurrent writers never interleave).

:meth:`History.check` classifies every job: executed once, more than once,
not executed (``pending`` while the run goes on, ``lost`` once it is over or
once the broker calls the job ended or does not know it), plus executions
nobody asked for (``phantom``: an unknown token, a refused invocation, or a
job id other than the one acknowledged for the token). Jobs whose enqueue
got no answer may run or not; the ones that ran are listed in
``unacknowledged_ran`` and classified with the others.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

#: Broker statuses a job does not leave by itself.
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
#: What a test puts in ``statuses`` for a job the broker answered JobNotFound for.
MISSING = "missing"


@dataclass(frozen=True)
class Execution:
    """One run of a handler, as it recorded itself."""

    job_id: str
    attempt: int
    pid: int
    token: str | None = None

    @classmethod
    def parse(cls, line: str) -> Execution:
        parts = line.split()
        if len(parts) not in (3, 4):
            raise ValueError(f"not an execution line: {line!r}")
        return cls(parts[0], int(parts[1]), int(parts[2]), parts[3] if len(parts) == 4 else None)

    def line(self) -> str:
        """The line a handler appends for this execution (with its newline)."""
        tail = f" {self.token}" if self.token is not None else ""
        return f"{self.job_id} {self.attempt} {self.pid}{tail}\n"


def read_executions(path: str | Path) -> list[Execution]:
    """Every execution line of ``path`` (none if the file does not exist).

    A last line without its newline is a write still under way (or torn by
    a kill) and is skipped; any other bad line is an error."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    lines = text.split("\n")
    return [Execution.parse(line) for line in lines[:-1] if line.strip()]


@dataclass
class Invocation:
    """One job a client tried to enqueue."""

    token: str
    outcome: str = "invoked"  # "invoked" (no outcome yet), "ok", "fail" or "unknown"
    job_id: str | None = None
    reason: str = ""
    invoked_at: float = field(default_factory=time.monotonic)
    completed_at: float | None = None


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
    """Invocations and executions of one run. The invocation methods are
    thread-safe (one producer thread each is the usual use)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.invocations: dict[str, Invocation] = {}
        self.executions: list[Execution] = []

    # ------------------------------------------------------------ invocations

    def invoke(self, token: str) -> None:
        with self._lock:
            if token in self.invocations:
                raise ValueError(f"token {token!r} invoked twice")
            self.invocations[token] = Invocation(token)

    def ok(self, token: str, job_id: str) -> None:
        """The broker acknowledged ``token`` as ``job_id``."""
        self._complete(token, "ok", job_id=job_id)

    def fail(self, token: str, reason: str = "") -> None:
        """The enqueue certainly did not happen (refused, or never sent)."""
        self._complete(token, "fail", reason=reason)

    def unknown(self, token: str, reason: str = "") -> None:
        """The enqueue may or may not have happened (no answer)."""
        self._complete(token, "unknown", reason=reason)

    def _complete(
        self, token: str, outcome: str, job_id: str | None = None, reason: str = ""
    ) -> None:
        with self._lock:
            invocation = self.invocations[token]
            if invocation.outcome != "invoked":
                raise ValueError(f"token {token!r} completed twice")
            invocation.outcome = outcome
            invocation.job_id = job_id
            invocation.reason = reason
            invocation.completed_at = time.monotonic()

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

    # ------------------------------------------------------------- executions

    def executed(self, execution: Execution) -> None:
        with self._lock:
            self.executions.append(execution)

    def load_executions(self, path: str | Path) -> int:
        """Replace the executions with those recorded in ``path``; returns how many."""
        executions = read_executions(path)
        with self._lock:
            self.executions = executions
        return len(executions)

    # ---------------------------------------------------------------- checker

    def check(self, *, final: bool, statuses: Mapping[str, str] | None = None) -> Verdict:
        """Classify every job.

        ``final``: the run is over (every acknowledged job had time to run),
        so one that never ran is lost rather than pending. ``statuses``: the
        broker's word on some jobs (``MISSING`` for JobNotFound); an
        acknowledged job that never ran is lost already if the broker says it
        ended or does not know it, and an acknowledged job whose status is not
        "succeeded" is listed in ``not_succeeded``.
        """
        statuses = statuses or {}
        with self._lock:
            invocations = dict(self.invocations)
            executions = list(self.executions)
        acked = {inv.job_id: inv.token for inv in invocations.values() if inv.outcome == "ok"}

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
        )
