"""Power loss at the broker level (issue 12, fault 4).

An in-process broker (the real BrokerCore and log, a FakeClock) runs over
:class:`CrashFiles`, a test-only :class:`~corral.broker.logfiles.Files`
that makes every change on the real files and also keeps what was not yet
synced: each file's content as of its last fsync and the writes,
truncations and extensions since; each directory's entries as of its last
fsync and the creations, renames, links and removals since (SQLite's
``test6.c`` plays crashes the same way). At a simulated power loss every
unsynced write is dropped, kept or garbled (a prefix kept, the rest
random), every unsynced truncation or extension kept or dropped, and every
directory change not fsync'd kept or lost, each independently (unsynced
writes reach the disk in any order); the files are then rewritten as that
disk would hold them and the broker starts again on them.

Hypothesis drives the workload (acknowledged enqueues, batches, a worker
running jobs, jobs with follow-ups, time passing so that a schedule fires)
and where the power fails. After every restart:

- no job whose enqueue was acknowledged is missing;
- the log holds each schedule fire (name, due time) at most once, and the
  broker never fires a due time again that it had fired durably;
- every job, follow-ups included, is created at most once in the log.

The fast profile runs in ``make test``; the ``soak`` one (more examples,
CORRAL_SOAK_POWER_EXAMPLES) under ``make soak``.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from inproc import SMALL_LOG, FakeWorker, InProcessBroker, deliveries

from corral.broker import framing
from corral.broker import protocol as p
from corral.broker.clock import FakeClock
from corral.broker.logfiles import Files
from corral.broker.logsurvey import job_ids
from corral.broker.records import Record, ScheduleFired

from .harness import env_int

# -- the layer ------------------------------------------------------------------------------


@dataclass
class Inode:
    """A file's content as of its last fsync, and its changes since."""

    durable: bytearray
    ops: list[tuple[Any, ...]] = field(default_factory=list)


def _apply(content: bytearray, op: tuple[Any, ...]) -> None:
    kind = op[0]
    if kind == "write":
        _, offset, data = op
        if len(content) < offset:
            content.extend(bytes(offset - len(content)))
        content[offset : offset + len(data)] = data
    elif kind == "truncate":
        del content[op[1] :]
        content.extend(bytes(op[1] - len(content)))
    elif kind == "extend" and len(content) < op[1]:
        content.extend(bytes(op[1] - len(content)))


class CrashFiles(Files):
    """The real file operations, recording what is not yet durable; see
    the module docstring. Files it has not seen change (made before it, or
    by the compaction child, which syncs them) count as durable."""

    def __init__(self) -> None:
        self.inodes: list[Inode] = []
        self.names: dict[Path, int] = {}  # what the files are now
        self.durable_names: dict[Path, int] = {}  # what a directory fsync made durable
        self.dir_ops: dict[Path, list[tuple[Any, ...]]] = {}
        self.fds: dict[int, int] = {}
        self.counts: Counter[str] = Counter()

    def _new(self, content: bytes) -> int:
        self.inodes.append(Inode(bytearray(content)))
        return len(self.inodes) - 1

    def _known(self, path: Path) -> int | None:
        """The inode of ``path``, adopting (as durable) a file made outside."""
        if path not in self.names and path.exists():
            self.names[path] = self.durable_names[path] = self._new(path.read_bytes())
        return self.names.get(path)

    def _dir_op(self, op: tuple[Any, ...], path: Path) -> None:
        self.dir_ops.setdefault(path.parent, []).append(op)

    def open(self, path: Path, flags: int, mode: int = 0o644) -> int:
        ino = self._known(path)
        fd = os.open(path, flags, mode)
        if ino is None:
            ino = self.names[path] = self._new(b"")
            self._dir_op(("create", path, ino), path)
        if flags & os.O_TRUNC:
            self.inodes[ino].ops.append(("truncate", 0))
        self.fds[fd] = ino
        return fd

    def close(self, fd: int) -> None:
        os.close(fd)
        self.fds.pop(fd, None)

    def pwrite(self, fd: int, data: memoryview | bytes, offset: int) -> int:
        n = os.pwrite(fd, data, offset)
        self.inodes[self.fds[fd]].ops.append(("write", offset, bytes(data[:n])))
        return n

    def ftruncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)
        self.inodes[self.fds[fd]].ops.append(("truncate", size))

    def fallocate(self, fd: int, size: int) -> None:
        super().fallocate(fd, size)
        self.inodes[self.fds[fd]].ops.append(("extend", size))

    def fsync(self, fd: int) -> None:
        os.fsync(fd)
        inode = self.inodes[self.fds[fd]]
        for op in inode.ops:
            _apply(inode.durable, op)
        inode.ops.clear()
        self.counts["fsyncs"] += 1

    fdatasync = fsync

    def rename(self, src: Path, dst: Path) -> None:
        self._known(src)
        self._known(dst)
        os.rename(src, dst)
        self.names[dst] = self.names.pop(src)
        self._dir_op(("rename", src, dst), dst)

    def link(self, src: Path, dst: Path) -> None:
        self._known(src)
        os.link(src, dst)
        self.names[dst] = self.names[src]
        self._dir_op(("link", src, dst), dst)

    def unlink(self, path: Path) -> None:
        if self._known(path) is None:
            return
        path.unlink(missing_ok=True)
        del self.names[path]
        self._dir_op(("unlink", path), path)

    def fsync_dir(self, directory: Path) -> None:
        super().fsync_dir(directory)
        for op in self.dir_ops.pop(directory, []):
            _apply_dir(self.durable_names, op)

    # -- the power loss

    def crash(self, rng: random.Random) -> Counter[str]:
        """Rewrite the files as the disk would hold them after a power loss
        now; returns what happened to the unsynced changes."""
        fate: Counter[str] = Counter()
        entries = dict(self.durable_names)
        for ops in self.dir_ops.values():
            for op in ops:
                if rng.random() < 0.5:
                    _apply_dir(entries, op)
                    fate["dir_kept"] += 1
                else:
                    fate["dir_lost"] += 1
        contents: dict[int, bytes] = {}
        for ino in set(entries.values()):
            inode = self.inodes[ino]
            content = bytearray(inode.durable)
            for op in inode.ops:
                choice = rng.choice(
                    ("drop", "keep", "garble") if op[0] == "write" else ("drop", "keep")
                )
                fate[f"{op[0]}_{choice}"] += 1
                if choice == "keep":
                    _apply(content, op)
                elif choice == "garble":
                    _, offset, data = op
                    kept = rng.randrange(len(data) + 1)
                    _apply(
                        content, ("write", offset, data[:kept] + rng.randbytes(len(data) - kept))
                    )
            contents[ino] = bytes(content)
        for path in set(self.names) | set(self.durable_names):
            path.unlink(missing_ok=True)
        for path, ino in entries.items():
            path.write_bytes(contents[ino])
        return fate


def _apply_dir(entries: dict[Path, int], op: tuple[Any, ...]) -> None:
    kind = op[0]
    if kind == "create":
        entries[op[1]] = op[2]
    elif kind == "rename" and op[1] in entries:
        entries[op[2]] = entries.pop(op[1])
    elif kind == "link" and op[1] in entries:
        entries[op[2]] = entries[op[1]]
    elif kind == "unlink":
        entries.pop(op[1], None)


# -- the broker over it ---------------------------------------------------------------------

SCHEDULE = """
[[schedules]]
name = "tick"
task = "t.tick"
every = "10s"
catch_up = "skip"
"""


def log_records(state_dir: Path) -> list[Record]:
    """Every record in the log's files now, as a replay reads them."""
    live, _, _ = framing.plan_segments(state_dir / "log")
    found: list[Record] = []
    for _, path, header in live:
        found.extend(framing.Scan(path, path.read_bytes(), header.seed))
    return found


class Run:
    """One broker life after another over the same state dir, each over a
    fresh CrashFiles; the acknowledged jobs and the checks across them."""

    def __init__(self, state_dir: Path, fsync: str = "always") -> None:
        self.state_dir = state_dir
        self.fsync = fsync
        self.clock = FakeClock()
        self.acked: set[str] = set()
        self.fired: set[float] = set()  # due times fired durably, seen after restarts
        self.crashes = 0
        self.compactions = 0
        self.fate: Counter[str] = Counter()
        self.n = 0
        self._start()

    def _start(self) -> None:
        self.files = CrashFiles()
        self.broker = InProcessBroker(
            self.state_dir,
            clock=self.clock,
            fsync=self.fsync,
            extra=SMALL_LOG,
            schedules=SCHEDULE,
            files=self.files,
        )
        self.worker = FakeWorker(self.broker, credit=2)
        self.held = deliveries(self.worker.ready())

    def step(self, action: str, arg: int) -> None:
        b = self.broker
        self.n += 1
        if action == "enqueue":
            self.acked.add(b.enqueue(payload=arg, id=f"e{self.n}"))
        elif action == "batch":
            specs = [
                p.JobSpec(f"b{self.n}-{i}", "t.task", p.encode_value(i)) for i in range(arg % 4 + 1)
            ]
            reply = b.request(p.Enqueue(b.next_req(), specs))
            assert isinstance(reply, p.EnqueueOk)
            self.acked.update(reply.ids)
        elif action == "followup":
            follow = p.JobSpec(f"x{self.n}", "t.x")
            spec = p.JobSpec(f"p{self.n}", "t.p", on_success=follow)
            reply = b.request(p.Enqueue(b.next_req(), [spec]))
            assert isinstance(reply, p.EnqueueOk)
            self.acked.add(f"p{self.n}")
        elif action == "run":
            self.held += deliveries(self.worker.inbox())
            for _ in range(min(arg % 3 + 1, len(self.held))):
                d = self.held.pop(0)
                self.held += deliveries(self.worker.start(d))
                self.held += deliveries(self.worker.finish(d, "ok", arg))
        elif action == "wait":
            b.advance(float(arg % 15 + 1), step=1.0)
        elif action == "compact":
            self.compact(arg)

    def compact(self, arg: int) -> None:
        """A compaction by the broker's own Compactor (its child process);
        one time in three left running, so the next step may be the crash."""
        b = self.broker
        compactor = b.core.compactor
        if not compactor.may_start(self.clock.monotonic()):
            return
        assert compactor.start(self.clock.monotonic())
        self.compactions += 1
        if arg % 3 == 0:
            return

        def finished() -> bool:
            b.run_pass()
            return not compactor.running

        wait_for(finished, 60, interval=0.01, message="the compaction to end")

    def crash(self, seed: int) -> None:
        """Power loss now, then a restart; check what survived."""
        self.broker.crash()
        self.fate += self.files.crash(random.Random(seed))
        self.crashes += 1
        self._start()
        self.check()

    def check(self) -> None:
        state = self.broker.core.state
        missing = sorted(i for i in self.acked if i not in state.jobs)
        assert missing == [], f"acknowledged jobs lost: {missing}"
        records = log_records(self.state_dir)
        fires = Counter((r.name, r.due_at) for r in records if isinstance(r, ScheduleFired))
        assert [f for f, n in fires.items() if n > 1] == [], "a schedule fired twice"
        due_now = {due for _, due in fires}
        if not self.compactions:  # a compaction keeps only a schedule's last fire
            assert self.fired <= due_now, "a fire seen after a restart went missing"
        created = Counter(i for r in records for i in job_ids(r)[0])
        assert [i for i, n in created.items() if n > 1] == [], "a job was created twice"
        follow_ups = Counter(
            j.id
            for r in records
            if type(r).__name__ == "FollowedUp"
            for j in r.created  # type: ignore[attr-defined]
        )
        assert all(n == 1 for n in follow_ups.values())
        self.fired |= due_now

    def close(self) -> None:
        self.broker.crash()


ACTIONS = ["enqueue", "enqueue", "batch", "followup", "run", "run", "run", "wait"]
#: Acknowledged enqueues, then a pile of writes no reply waited for (not
#: synced), then power losses: a later write may reach the disk when an
#: earlier one does not (the log took that for corruption before sync marks).
UNSYNCED_PILE = [
    *[("enqueue", i) for i in range(6)],
    *[("run", 2)] * 4,
    ("crash", 1),
    *[("followup", 0), ("run", 2), ("run", 2), ("wait", 3)],
    ("crash", 2),
]


def workload(actions: list[str], max_size: int) -> st.SearchStrategy[list[tuple[str, int]]]:
    step = st.tuples(st.sampled_from(actions), st.integers(0, 1000))
    crash = st.tuples(st.just("crash"), st.integers(0, 2**32))
    return st.lists(st.one_of(step, step, crash), min_size=4, max_size=max_size)


def power_loss_run(tmp: Path, steps: list[tuple[str, int]]) -> Run:
    run = Run(tmp)
    try:
        for action, arg in steps:
            if action == "crash":
                run.crash(arg)
            else:
                run.step(action, arg)
        run.crash(len(steps))
    finally:
        run.close()
    return run


def campaign(
    tmp_path_factory: pytest.TempPathFactory,
    report: Callable[[str], None],
    steps: st.SearchStrategy[list[tuple[str, int]]],
    examples: int,
) -> None:
    """Hypothesis runs ``examples`` workloads; the totals are reported."""
    totals: Counter[str] = Counter()

    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(steps=steps)
    @example(steps=UNSYNCED_PILE)
    def one(steps: list[tuple[str, int]]) -> None:
        run = power_loss_run(tmp_path_factory.mktemp("power"), steps)
        totals.update(run.fate)
        totals.update(
            runs=1, crashes=run.crashes, acknowledged=len(run.acked), compactions=run.compactions
        )

    one()
    changes = ", ".join(f"{k}={v}" for k, v in sorted(totals.items()) if "_" in k)
    report(
        f"runs={totals['runs']} power_losses={totals['crashes']}"
        f" acknowledged={totals['acknowledged']} compactions={totals['compactions']}"
        f" lost=0 fired_twice=0 created_twice=0; unsynced changes at the losses: {changes}"
    )


def test_power_loss_loses_no_acknowledged_job_and_repeats_nothing(
    tmp_path_factory: pytest.TempPathFactory, soak_report: Callable[[str], None]
) -> None:
    campaign(tmp_path_factory, soak_report, workload(ACTIONS, 40), 25)


def test_power_loss_around_compactions(
    tmp_path_factory: pytest.TempPathFactory, soak_report: Callable[[str], None]
) -> None:
    """Compactions by the broker's child process, power lost while one
    runs, after its rename, or while its stale segments go (their removal
    is never fsync'd, so they may come back: a start removes them)."""
    actions = ["enqueue", "batch", "run", "compact", "compact", "compact"]
    campaign(tmp_path_factory, soak_report, workload(actions, 12), 5)


@pytest.mark.soak
def test_power_loss_soak(
    tmp_path_factory: pytest.TempPathFactory, soak_report: Callable[[str], None]
) -> None:
    examples = env_int("CORRAL_SOAK_POWER_EXAMPLES", 150)
    actions = [*ACTIONS, "compact"]
    campaign(tmp_path_factory, soak_report, workload(actions, 60), examples)
