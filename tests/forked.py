"""The tests' side of the fork server (``tests/zygote.py``): corral
commands run as forks of one process that imported corral once.

``CORRAL_TEST_EXEC=1`` turns it off: every command is then a fresh
``corral`` process, as a user runs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

ZYGOTE = Path(__file__).with_name("zygote.py")


#: Variables read only when a process starts (by the dynamic linker, libc's
#: allocator or the interpreter): a fork cannot take them from its request.
STARTUP_PREFIXES = ("PYTHON", "LD_", "MALLOC_", "GLIBC_TUNABLES")


def enabled() -> bool:
    return os.environ.get("CORRAL_TEST_EXEC", "") in ("", "0")


def startup_variables(environ: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    return {k: v for k, v in environ.items() if k.startswith(STARTUP_PREFIXES)}


class Forked:
    """A command forked by the zygote: the part of ``subprocess.Popen``
    the tests use (``pid``, ``returncode``, ``poll``, ``wait``)."""

    def __init__(self, server: Zygote, pid: int) -> None:
        self._server = server
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._server.exit_code(self.pid, 0.0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = self._server.exit_code(self.pid, timeout)
            if self.returncode is None:
                raise subprocess.TimeoutExpired(f"forked pid {self.pid}", timeout or 0.0)
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


class Zygote:
    """One fork server, started on first use; one per test process."""

    def __init__(self, corral: str) -> None:
        self._corral = corral
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()  # one request at a time
        self._changed = threading.Condition()
        self._answers: list[dict[str, object]] = []
        self._exits: dict[int, int] = {}
        self._gone = False
        #: The start-up variables the server was started with (see :meth:`can_run`).
        self._environ = dict(os.environ)  # the server's, whenever it starts
        self._startup = startup_variables(self._environ)

    def can_run(self, env: dict[str, str] | None = None) -> bool:
        """Whether a fork can run a command in ``env`` (None: this
        process's environment): not when a variable read at start-up
        (``PYTHONPATH``, ``LD_PRELOAD``, ...) differs from the server's."""
        return enabled() and startup_variables(os.environ if env is None else env) == (
            self._startup
        )

    def spawn(
        self,
        args: list[str],
        *,
        cwd: Path,
        stdout: Path,
        stderr: Path | None = None,
        stdin: Path | None = None,
        env: dict[str, str] | None = None,
        session: bool = False,
    ) -> Forked:
        """Fork ``corral *args``; its output goes to ``stdout`` (appended),
        and ``stderr`` (the same file when None)."""
        request = {
            "argv": [self._corral, *args],
            "cwd": str(cwd),
            "env": dict(os.environ if env is None else env),
            "stdin": str(stdin) if stdin else None,
            "stdout": str(stdout),
            "stderr": str(stderr) if stderr else None,
            "session": session,
        }
        with self._lock:
            proc = self._started()
            assert proc.stdin is not None
            proc.stdin.write((json.dumps(request) + "\n").encode())
            proc.stdin.flush()
            with self._changed:
                self._changed.wait_for(lambda: self._answers or self._gone, 30)
                if not self._answers:
                    raise RuntimeError("the test fork server did not answer")
                answer = self._answers.pop(0)
        if "error" in answer:
            raise OSError(f"the test fork server could not fork: {answer['error']}")
        pid = answer["pid"]
        assert isinstance(pid, int)
        return Forked(self, pid)

    def exit_code(self, pid: int, timeout: float | None) -> int | None:
        """``pid``'s exit code, waiting up to ``timeout`` seconds (None:
        for ever); None if it is still running."""
        with self._changed:
            self._changed.wait_for(lambda: pid in self._exits or self._gone, timeout)
            if pid in self._exits:
                return self._exits[pid]
        if self._gone:  # the server died: its children were reparented
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 0)
                return None
            return -signal.SIGKILL
        return None

    def close(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(OSError):
                assert self._proc.stdin is not None
                self._proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(10)
            self._proc = None

    def _started(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            self._proc = subprocess.Popen(
                [sys.executable, str(ZYGOTE)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=None,
                start_new_session=True,
                cwd=ZYGOTE.parent,
                env=self._environ,
            )
            threading.Thread(target=self._read, args=(self._proc,), daemon=True).start()
        return self._proc

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            message = json.loads(line)
            with self._changed:
                if "exit" in message:
                    self._exits[int(message["exit"])] = int(message["code"])
                else:  # a pid used again: its old exit is not the new child's
                    self._exits.pop(int(message.get("pid", -1)), None)
                    self._answers.append(message)
                self._changed.notify_all()
        with self._changed:
            self._gone = True
            self._changed.notify_all()


def run(
    server: Zygote,
    args: list[str],
    *,
    cwd: Path,
    scratch: Path,
    timeout: float,
    stdin: str | None,
    env: dict[str, str] | None,
) -> subprocess.CompletedProcess[str]:
    """``subprocess.run(capture_output=True, text=True)`` of ``corral
    *args``, as a fork; ``scratch`` is a directory for its files."""
    scratch.mkdir(parents=True, exist_ok=True)
    stem = scratch / f"run-{os.getpid()}-{threading.get_ident()}-{os.urandom(4).hex()}"
    paths = [stem.with_suffix(suffix) for suffix in (".in", ".out", ".err")]
    try:
        if stdin is not None:
            paths[0].write_text(stdin)
        child = server.spawn(
            args,
            cwd=cwd,
            stdin=paths[0] if stdin is not None else None,
            stdout=paths[1],
            stderr=paths[2],
            env=env,
        )
        try:
            code = child.wait(timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(10)
            raise subprocess.TimeoutExpired(["corral", *args], timeout) from None
        out, err = (paths[i].read_text(errors="replace") for i in (1, 2))
        return subprocess.CompletedProcess(["corral", *args], code, out, err)
    finally:
        for path in paths:
            path.unlink(missing_ok=True)
