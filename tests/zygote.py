"""A fork server for the tests: ``python tests/zygote.py``.

It imports corral's command line once; each corral command a test runs is
then a fork of it, with its own argv, environment, directory and standard
files, that runs ``corral.cli.main`` and ends through the interpreter's
normal exit (threads joined, atexit, flushes), as ``corral`` itself does.
A command costs a fork instead of an interpreter start and corral's
imports: about 0.3 s of CPU each, hundreds of times in the suite.

Protocol, one JSON object per line: a request on stdin, ``{"argv",
"cwd", "env", "stdin", "stdout", "stderr", "session"}`` (paths; ``stderr``
null: the same file as stdout; ``session``: call ``setsid``), is answered
by ``{"pid": N}`` on stdout, or ``{"error": "..."}``; each child that
ends is reported as ``{"exit": N, "code": C}`` (C as ``Popen.returncode``:
the negated signal number if a signal ended it).
"""

from __future__ import annotations

import gc
import json
import os
import selectors
import signal
import sys


def preload() -> None:
    """What ``corral run``, ``corral broker`` and the client commands
    import, imported once (structlog without rich, as the CLI does)."""
    import corral.cli

    corral.cli._import_structlog_without_rich()
    import setproctitle

    import corral.broker.server
    import corral.clicommands
    import corral.client
    import corral.supervisor.supervisor
    import corral.workers.runtime

    # Its set-up finds argv and environ where the interpreter left them; a
    # child that replaced its environ first could no longer retitle itself.
    setproctitle.getproctitle()


def serve() -> None:
    """Answer requests until stdin closes. Returns in a forked child only,
    with its request applied: the caller runs the command."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    selector = selectors.DefaultSelector()
    selector.register(0, selectors.EVENT_READ, "request")
    selector.register(wake_r, selectors.EVENT_READ, "child")
    pending = b""
    while True:
        for key, _ in selector.select():
            if key.data == "child":
                os.read(wake_r, 4096)
                reap()
                continue
            chunk = os.read(0, 65536)
            if not chunk:
                return_to_exit()
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                request = json.loads(line)
                gc.freeze()  # see main()
                try:
                    pid = os.fork()
                except OSError as exc:
                    answer({"error": str(exc)})
                    continue
                if pid == 0:
                    gc.enable()
                    selector.close()
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    os.close(wake_r)
                    os.close(wake_w)
                    become(request)
                    return
                answer({"pid": pid})
        reap()


def reap() -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        answer({"exit": pid, "code": os.waitstatus_to_exitcode(status)})


def answer(message: dict[str, object]) -> None:
    data = (json.dumps(message) + "\n").encode()
    while data:
        data = data[os.write(1, data) :]


def return_to_exit() -> None:
    os._exit(0)  # the tests are done: the children are theirs to kill


def become(request: dict[str, object]) -> None:
    """In the child: take the request's standard files, directory,
    environment and argv."""
    if request.get("session"):
        os.setsid()
    stdin = os.open(str(request.get("stdin") or os.devnull), os.O_RDONLY)
    stdout = os.open(str(request["stdout"]), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    stderr = stdout
    if request.get("stderr"):
        stderr = os.open(str(request["stderr"]), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    for fd, target in ((stdin, 0), (stdout, 1), (stderr, 2)):
        os.dup2(fd, target)
    for fd in {stdin, stdout, stderr}:
        os.close(fd)
    os.chdir(str(request["cwd"]))
    environ = request["env"]
    assert isinstance(environ, dict)
    os.environ.clear()
    os.environ.update(environ)
    argv = request["argv"]
    assert isinstance(argv, list)
    sys.argv = [str(arg) for arg in argv]
    import setproctitle

    setproctitle.setproctitle(" ".join([sys.executable, *sys.argv]))  # as ps shows `corral`


def main() -> None:
    # What the server imports is frozen before each fork (gc.freeze), and
    # the collector is off here meanwhile, as the gc module's documentation
    # advises for a process that forks without exec: a command's cyclic
    # collections then walk only what the command made, as in a fresh
    # ``corral``, not every object it inherited (each object walked is a
    # write to a shared page, so a copy-on-write fault: 120 ms of CPU for
    # ``corral --version`` instead of 50). The command collects as usual.
    gc.disable()
    preload()
    serve()  # returns in a child only
    from corral.cli import main as corral_main

    sys.exit(corral_main(sys.argv[1:]))


if __name__ == "__main__":
    main()
