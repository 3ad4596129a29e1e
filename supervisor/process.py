"""One child process: fork it cleanly (no inherited signal handlers, signal
mask or file descriptors), give it a title and its own process group, make
it die with its parent, signal it, read its exit status, kill what it left
behind, and stop children in order (TERM, a grace period, then KILL).

A kill (SIGKILL) goes to the child's whole process group, so a task's own
subprocesses die with its worker; every other signal, a drain's SIGTERM
included, goes to the child alone."""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable

import psutil
import structlog

from corral.supervisor.title import set_title

log = structlog.get_logger()

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies, then
    check the parent did not die before the request took effect."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the child's own parent check still applies
    if os.getppid() != parent_pid:
        os._exit(1)


def reset_signals() -> None:
    """Give every signal its default disposition and unblock them all, so a
    child starts without the handlers (TERM, HUP, TTIN, TTOU, CHLD ...) and
    mask its parent set. SIGPIPE and SIGXFSZ stay ignored, as Python starts
    them, so that a write to a closed pipe raises rather than kills."""
    python_ignores = {signal.SIGPIPE, signal.SIGXFSZ}
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        disposition = signal.SIG_IGN if sig in python_ignores else signal.SIG_DFL
        with contextlib.suppress(OSError, ValueError):  # e.g. glibc's RT signals
            signal.signal(sig, disposition)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    signal.set_wakeup_fd(-1)


def close_inherited_fds(keep: set[int]) -> None:
    """Close every file descriptor but 0, 1, 2, those of ``sys.stdout`` and
    ``sys.stderr`` (where logs go) and ``keep``: the parent's sockets,
    pipes and files are not the child's to hold open. Objects in the child
    that wrapped a closed descriptor must not be used again."""
    stderr = _fileno(sys.stderr)
    kept = {0, 1, 2, stderr, _fileno(sys.stdout), *keep}
    kept.discard(-1)
    low = 0
    for fd in sorted(kept):
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, _max_fd())
    if faulthandler.is_enabled():  # its own descriptor may have been closed
        faulthandler.enable(stderr if stderr >= 0 else 2)


def _fileno(stream: object) -> int:
    try:
        return int(stream.fileno())  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return -1


def _max_fd() -> int:
    try:
        return max(os.sysconf("SC_OPEN_MAX"), 1024)
    except (OSError, ValueError):
        return 65536


def os_threads() -> int:
    """How many threads this process runs, native ones (libzmq's I/O
    threads) included: only the calling thread survives a fork, and a lock
    another one held stays locked in the child."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:  # not Linux: Python's threads are what can be seen
        return threading.active_count()


def group_members(pgid: int) -> list[int]:
    """The pids of the live (not zombie) processes in process group ``pgid``."""
    found = []
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) != pgid:
                continue
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                continue
        except (OSError, psutil.Error):
            continue
        found.append(pid)
    return found


def signal_name(number: int) -> str:
    """``SIGKILL`` for 9; ``signal 37`` for one Python has no name for (a
    real-time signal)."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class Child:
    """A forked child running ``target``; its return value is the exit code.

    With ``status_pipe`` the child gets the write end of a pipe (passed to
    ``target``) and the parent keeps the read end as ``status_fd``. The
    child closes every inherited descriptor but stdio, that write end and
    ``keep_fds``; it leads a process group of its own, whose pgid is its pid."""

    def __init__(
        self,
        name: str,
        title: str,
        target: Callable[[int | None], int],
        *,
        status_pipe: bool = False,
        keep_fds: tuple[int, ...] = (),
    ) -> None:
        self.name = name
        self.title = title
        self.target = target
        self.status_pipe = status_pipe
        self.keep_fds = keep_fds
        self.status_fd: int | None = None
        self.pid: int | None = None
        self.started_at = 0.0
        self.exit_code: int | None = None
        # What the status pipe tells: jobs running (id -> (started, timeout)),
        # the last sign of life, and whether the child is being replaced.
        self.jobs: dict[str, tuple[float, float]] = {}
        #: Hooks running: job id -> (started, timeout, hook).
        self.hooks: dict[str, tuple[float, float, str]] = {}
        #: Why it could not start, as it said before exiting ("" if it did not).
        self.cannot_start = ""
        #: Every socket identity (hex) the worker has connected with.
        self.identities: set[str] = set()
        self.identity = ""  # the one it uses now, as its last status line said
        self.cpu: tuple[float, float] | None = None  # see monitor.cpu_busy
        self.last_beat = 0.0
        #: Whether it has said anything on its status pipe: until then it
        #: is starting (importing its plugins), judged by its startup_timeout.
        self.ready = False
        self.retiring = ""
        self.last_rss = 0
        self.last_rss_check = 0.0
        self.killed_for = ""
        #: The jobs a kill was for (None: the cause is not known, so every
        #: job it had started is charged).
        self.charged: list[str] | None = None

    @property
    def alive(self) -> bool:
        return self.pid is not None and self.exit_code is None

    def start(self) -> int:
        parent = os.getpid()
        read_fd, write_fd = os.pipe() if self.status_pipe else (None, None)
        threads = os_threads()
        if threads > 1:
            log.warning(
                "supervisor.fork_with_threads",
                child=self.name,
                threads=threads,
                python_threads=[t.name for t in threading.enumerate()],
                hint="a thread (or a zmq context) alive at fork may leave the child a held lock",
            )
        log.debug("supervisor.fork", child=self.name, threads=threads)
        sys.stdout.flush()
        sys.stderr.flush()
        # Every signal blocked across the fork: the child has this process's
        # handlers until reset_signals, and one that ran there (a stop's
        # SIGTERM sent at once) was lost in it. Blocked, it waits, and
        # reaches the child once its dispositions are reset.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            pid = os.fork()
        except OSError:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            for fd in (read_fd, write_fd):
                if fd is not None:
                    os.close(fd)
            raise
        if pid == 0:
            self._child_main(parent, write_fd)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        # The child sets its group too; doing it here as well means that a
        # kill sent before the child has run still reaches the whole group.
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)
        if write_fd is not None:
            os.close(write_fd)
            os.set_blocking(read_fd, False)  # type: ignore[arg-type]
        self.status_fd = read_fd
        self.pid = pid
        self.started_at = self.last_beat = time.monotonic()
        self.exit_code = None
        return pid

    def close_status(self) -> None:
        if self.status_fd is not None:
            os.close(self.status_fd)
            self.status_fd = None

    def _child_main(self, parent: int, status_fd: int | None) -> None:
        code = 1
        try:
            reset_signals()
            close_inherited_fds({-1 if status_fd is None else status_fd, *self.keep_fds})
            # Its own process group: a terminal's Ctrl-C reaches only the
            # supervisor, which stops the children in order (workers first).
            os.setpgid(0, 0)
            die_with_parent(parent)
            set_title(self.title)
            code = self.target(status_fd)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the running child. SIGKILL goes to its whole
        process group, so a task's subprocesses die with the worker. Any
        other signal goes to the child alone: a drain's SIGTERM lets the
        worker finish its jobs, and a job's subprocess must not be killed
        while its handler still waits on it (what is left once the worker
        has exited is killed then, see :meth:`reaped`)."""
        if not self.alive or self.pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            if sig == signal.SIGKILL:
                try:
                    os.killpg(self.pid, sig)
                except ProcessLookupError:  # not its own group: the child alone
                    os.kill(self.pid, sig)
            else:
                os.kill(self.pid, sig)

    def reaped(self, status: int) -> None:
        """Record the wait status ``waitpid`` returned for this child, and
        kill what is left in its process group."""
        self.exit_code = os.waitstatus_to_exitcode(status)
        self.close_status()
        self.kill_leftovers()

    def kill_leftovers(self) -> int:
        """SIGKILL the processes left in the exited child's process group
        (a task's subprocesses, which would otherwise live on under PID 1);
        returns how many there were."""
        if self.pid is None:
            return 0
        left = group_members(self.pid)
        if not left:
            return 0
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        log.warning(
            "supervisor.group_killed",
            child=self.name,
            pgid=self.pid,
            processes=len(left),
            pids=left[:20],
        )
        return len(left)

    def rss(self) -> int | None:
        """Resident memory in bytes, or None if the process is gone."""
        if not self.alive or self.pid is None:
            return None
        try:
            return psutil.Process(self.pid).memory_info().rss
        except psutil.Error:
            return None

    def describe_exit(self) -> str:
        code = self.exit_code
        if code is None:
            return "running"
        if code < 0:
            return f"killed by {signal_name(-code)}"
        return f"exited with code {code}"


def stop_children(children: list[Child], timeout: float, pause: Callable[[float], None]) -> None:
    """SIGTERM each child, wait up to ``timeout`` (seconds) for them to exit
    (``pause`` sleeps between looks, waking early for a signal), then SIGKILL
    the process group of each one left. The TERM goes to each child alone,
    so it can finish its jobs; whatever a child leaves in its group is
    killed once it is reaped."""
    for child in children:
        child.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(c.alive for c in children) and time.monotonic() < deadline:
        reap_quietly(children)
        pause(0.1)
    for child in children:
        if child.alive:
            log.warning("supervisor.kill", child=child.name, pid=child.pid)
            child.signal(signal.SIGKILL)
    reap_quietly(children, block=True)


def reap_quietly(children: list[Child], block: bool = False) -> None:
    """Collect the exit status of those ``children`` that have exited."""
    for child in children:
        if not child.alive or child.pid is None:
            continue
        try:
            pid, status = os.waitpid(child.pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            child.exit_code = -1
            child.kill_leftovers()
            continue
        if pid:
            child.reaped(status)
