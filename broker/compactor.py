"""Compaction off the broker's loop: the rewriter, its child process, and the
broker's side of it.

:func:`rewrite` replays a :class:`~corral.broker.compaction.Cut`'s segments
into a fresh :class:`~corral.broker.state.JobState` and writes its
``snapshot()`` as the new base. The broker runs it in a child process,
``python -m corral.broker.compactor ORDER`` (a new interpreter, not a fork
of the broker, whose ZeroMQ threads a fork would not carry), titled
``corral: compactor``, niced, and killed by the kernel if the broker dies.
The child prints one JSON :class:`Outcome` line and exits 0 (done) or 1.

:class:`Compactor` is the broker's side: it seals the log, starts the
child, polls it on each pass without waiting, and installs the new base
once the child is done (the stale segments are removed on a thread). A
compaction that fails (a full disk, a crash, a kill) is abandoned, logged,
and tried again later with exponential backoff; the broker serves on
meanwhile. The offline ``corral log compact`` calls
:func:`rewrite` in-process: the same code.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec

from corral.broker import checkpoint
from corral.broker.compaction import Cut, read_cut, remove_segments, write_base
from corral.broker.deathsig import die_with_parent
from corral.broker.job import Defaults
from corral.broker.lazylog import get_logger
from corral.broker.log import FsyncFailed, Log, LogDiskFull, LogError
from corral.broker.state import CheckpointBatches, JobState

__all__ = ["RETRY_MAX", "RETRY_MIN", "Compactor", "Order", "Outcome", "rewrite"]

#: Seconds before the first retry of a failed compaction; doubled per failure.
RETRY_MIN = 2.0
#: The longest wait between two tries, in seconds.
RETRY_MAX = 300.0
#: The child's niceness: the broker's loop comes first.
NICENESS = 10
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_log = get_logger(__name__)


class Order(msgspec.Struct, frozen=True):
    """What the child is asked to do: rewrite ``cut``, building the state
    with the broker's ``defaults``; ``parent`` is the broker's pid (0: do
    not watch it)."""

    cut: Cut
    defaults: Defaults
    parent: int = 0


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    """How a rewrite ended: ``records`` and ``bytes`` of the new base (the
    bytes include its header), ``jobs`` in it, ``seconds`` it took; or the
    ``error`` (``disk_full``: for want of space)."""

    ok: bool
    records: int = 0
    jobs: int = 0
    bytes: int = 0
    seconds: float = 0.0
    error: str = ""
    disk_full: bool = False


def rewrite(cut: Cut, defaults: Defaults | None = None) -> Outcome:
    """Replay ``cut``'s segments into a fresh job state and write its
    snapshot to ``cut.tmp``, fsync'd. Raises OSError (ENOSPC: a full disk)
    or :class:`~corral.broker.log.LogError` (a corrupt segment); the file is
    then removed."""
    started = time.monotonic()
    state = JobState(defaults)
    for record in read_cut(cut):
        state.apply(record)
    batches = CheckpointBatches()
    records, size = write_base(cut, state.snapshot(), batches.on_frame)
    try:
        checkpoint.write(Path(cut.directory), cut.generation, cut.last, cut.tmp_path, batches.found)
    except OSError as exc:  # a cache: the base is whole without it
        _log.warning("checkpoint.not_written", error=str(exc))
    seconds = round(time.monotonic() - started, 3)
    return Outcome(ok=True, records=records, jobs=len(state.jobs), bytes=size, seconds=seconds)


# -- the child ----------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """The child: ``python -m corral.broker.compactor ORDER_JSON``."""
    args = sys.argv[1:] if argv is None else argv
    try:
        order = msgspec.json.decode(args[0] if args else b"", type=Order)
    except msgspec.DecodeError as exc:
        print(f"corral.broker.compactor: bad order: {exc}", file=sys.stderr)
        return 2
    if order.parent:
        die_with_parent(order.parent)
    _settle()
    try:
        outcome = rewrite(order.cut, order.defaults)
    except OSError as exc:
        full = exc.errno in _DISK_FULL
        outcome = Outcome(ok=False, error=f"writing {order.cut.tmp}: {exc}", disk_full=full)
    except Exception as exc:  # a corrupt segment, or a bug: reported, never a traceback
        outcome = Outcome(ok=False, error=f"{type(exc).__name__}: {exc}")
    sys.stdout.write(msgspec.json.encode(outcome).decode() + "\n")
    sys.stdout.flush()
    return 0 if outcome.ok else 1


def _settle() -> None:
    """Title, lower priority, no cyclic GC (a short-lived process that
    builds millions of objects and frees none of them)."""
    with contextlib.suppress(ImportError):
        import setproctitle

        setproctitle.setproctitle("corral: compactor")
    with contextlib.suppress(OSError):
        os.nice(NICENESS)
    gc.disable()


# -- the broker's side --------------------------------------------------------


class Compactor:
    """Runs one compaction at a time in a child process; see the module
    docstring. Time comes in as ``mono`` (monotonic seconds)."""

    def __init__(self, log: Log, defaults: Defaults | None = None) -> None:
        self.log = log
        self.defaults = defaults or Defaults()
        #: Failures in a row, and when the next try may start.
        self.failures = 0
        self.retry_at = 0.0
        self._cut: Cut | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._started = 0.0

    @property
    def running(self) -> bool:
        return self._cut is not None

    @property
    def child(self) -> subprocess.Popen[bytes] | None:
        """The running child process, if any (read only: for status and tests)."""
        return self._proc

    @property
    def cut(self) -> Cut | None:
        """The cut of the compaction under way, if any."""
        return self._cut

    def may_start(self, mono: float) -> bool:
        """No compaction is under way and no backoff holds the next one."""
        return self._cut is None and mono >= self.retry_at

    def start(self, mono: float) -> bool:
        """Seal the log and start the child. False: it could not start (a
        full disk, no child), logged and backed off."""
        try:
            cut = self.log.seal(mono)
        except FsyncFailed:
            raise
        except LogError as exc:
            self._failed(f"cannot cut the log: {exc}", mono, isinstance(exc, LogDiskFull))
            return False
        order = msgspec.json.encode(Order(cut, self.defaults, os.getpid())).decode()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "corral.broker.compactor", order],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
            )
        except OSError as exc:
            self.log.abandon(cut)
            self._failed(f"cannot start the compaction process: {exc}", mono, False)
            return False
        self._cut, self._started = cut, mono
        _log.info("broker.compaction_started", pid=self._proc.pid, segments=[cut.first, cut.last])
        return True

    def poll(self, mono: float) -> Outcome | None:
        """If the child has ended: install its base (or abandon the cut and
        back off) and return its outcome; None while it runs (or none does).
        Never waits."""
        proc, cut = self._proc, self._cut
        if proc is None or cut is None:
            return None
        code = proc.poll()
        if code is None:
            return None
        outcome = _outcome(proc, code)
        self._proc = self._cut = None
        if not outcome.ok:
            self.log.abandon(cut)
            self._failed(outcome.error, mono, outcome.disk_full)
            return outcome
        try:
            stale = self.log.install(cut)
        except FsyncFailed:
            raise
        except LogError as exc:
            self._failed(str(exc), mono, False)
            return Outcome(ok=False, error=str(exc))
        self.failures, self.retry_at = 0, 0.0
        # Freeing a large file's blocks takes 100 ms or more: not on the loop.
        threading.Thread(
            target=remove_segments,
            args=(stale,),
            kwargs={"gradually": True},
            name="corral-remove-segments",
            daemon=True,
        ).start()
        _log.info(
            "broker.compacted",
            jobs=outcome.jobs,
            records=outcome.records,
            bytes=outcome.bytes,
            stale_segments=len(stale),
            seconds=round(mono - self._started, 3),
        )
        return outcome

    def stop(self) -> None:
        """Kill a running child, reap it and abandon its cut (at shutdown)."""
        proc, cut = self._proc, self._cut
        self._proc = self._cut = None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        if cut is not None:
            self.log.abandon(cut)

    def _failed(self, error: str, mono: float, disk_full: bool) -> None:
        self.failures += 1
        delay = min(RETRY_MAX, RETRY_MIN * 2 ** min(self.failures - 1, 30))
        self.retry_at = mono + delay
        _log.error(
            "broker.compaction_failed",
            error=error,
            disk_full=disk_full,
            failures=self.failures,
            retry_in=delay,
            hint="the broker serves on and tries again later"
            + ("; free disk space" if disk_full else ""),
        )


def _outcome(proc: subprocess.Popen[bytes], code: int) -> Outcome:
    """What an ended child said, or what its exit status says."""
    assert proc.stdout is not None
    with proc.stdout:
        text = proc.stdout.read()
    try:
        return msgspec.json.decode(text.strip().splitlines()[-1], type=Outcome)
    except (msgspec.DecodeError, IndexError):
        pass
    if code < 0:
        return Outcome(ok=False, error=f"the compaction process was killed by signal {-code}")
    return Outcome(ok=False, error=f"the compaction process exited with code {code}")


if __name__ == "__main__":
    sys.exit(main())
