"""A reload of the pools: the check that the new config and its plugins
load (in a fresh interpreter, so a broken plugin never reaches the
supervisor), whether a pool's settings or plugin code changed, how to make
the next import read the code afresh, and the new set of pools (unchanged
ones kept, changed or new ones rolled, removed ones drained).

A reload is all or nothing: every new pool's tasks are loaded before any
worker is started or retired, so a reload that fails changes nothing."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from corral.supervisor.pool import Forker, Pool, load_registry
from corral.supervisor.process import signal_name
from corral.workers.registry import add_python_path

if TYPE_CHECKING:
    from corral.config.schema import Config, PoolConfig

log = structlog.get_logger()


#: How long the check of a new config (and the import of its plugins) may
#: take, in seconds, before the reload is given up as failed.
RELOAD_CHECK_TIMEOUT = 120.0


class ReloadCheck:
    """``corral check-config`` on the config file, in a fresh interpreter:
    the config decodes and every pool's plugins import. The supervisor
    reaps it (its pid is ours to wait for) and reads the verdict on its
    tick, so a slow import never stalls the loop."""

    def __init__(self, path: str, timeout: float = RELOAD_CHECK_TIMEOUT) -> None:
        self._output = tempfile.TemporaryFile()  # noqa: SIM115 (kept until close())
        code = "import sys; from corral.cli import main; sys.exit(main(sys.argv[1:]))"
        self._proc = subprocess.Popen(
            [sys.executable, "-c", code, "check-config", "-c", path],
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=subprocess.STDOUT,
        )
        self.pid = self._proc.pid
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout
        #: The exit code once reaped (negative: killed by that signal).
        self.code: int | None = None
        self._timed_out = False

    def reaped(self, status: int) -> None:
        self.code = os.waitstatus_to_exitcode(status)
        self._proc.returncode = self.code  # reaped by the supervisor, not by Popen

    def overdue(self, now: float) -> bool:
        """Past its deadline and still running: kill it (it is reaped later)."""
        if self.code is None and now > self.deadline:
            self._timed_out = True
            os.kill(self.pid, signal.SIGKILL)
            return True
        return False

    def stop(self) -> None:
        """The supervisor stops: end the check now."""
        if self.code is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
        self.close()

    def error(self) -> str:
        """Why the check failed, from its output ("" if it passed)."""
        if self.code == 0:
            return ""
        if self.code is not None and self.code < 0:
            if self._timed_out:
                return f"the check of the config took over {self.timeout:g}s and was stopped"
            return (
                f"the check of the config was killed by {signal_name(-self.code)} "
                "(a plugin that crashes the interpreter at import?); run `corral check-config`"
            )
        self._output.seek(0)
        lines = self._output.read().decode(errors="replace").strip().splitlines()
        text = " ".join(line.strip() for line in lines[-5:])
        return text.removeprefix("corral: ") or (
            f"the check of the config exited with code {self.code} and said nothing: a "
            "plugin may end the process as it is imported (os._exit, sys.exit); run "
            "`corral check-config` to see"
        )

    def close(self) -> None:
        self._output.close()


class ReloadError(Exception):
    """A reload that failed. ``pools`` is None if nothing was changed, else
    the pools now running (some were reloaded, those named were not)."""

    def __init__(self, message: str, pools: list[Pool] | None = None) -> None:
        super().__init__(message)
        self.pools = pools


Plan = list[tuple["Pool | None", Pool]]


def reload_pools(pools: list[Pool], config: Config, forker: Forker) -> list[Pool]:
    """The pools of ``config``, from the running ``pools``: a pool whose
    settings and code are unchanged is kept as it runs; the others are
    rolled, and pools no longer configured are drained. Every new pool's
    tasks load first; if any fails (ReloadError), nothing was changed."""
    return apply_plan(pools, plan_reload(pools, config, forker))


def plan_reload(pools: list[Pool], config: Config, forker: Forker) -> Plan:
    """(current pool or None, its successor) for each pool of ``config``:
    the same pool if unchanged, else a new one with its tasks loaded (a
    preloaded pool imports its plugins here: the slow part, which forks
    nothing and may run off the loop's thread). Raises ReloadError."""
    old = {pool.name: pool for pool in pools}
    plan: Plan = []
    for pool_config in config.pools:
        current = old.pop(pool_config.name, None)
        fingerprint = plugin_fingerprint(config, pool_config)
        if current is not None and not current.differs(pool_config, fingerprint):
            plan.append((current, current))
            continue
        plugins = code_modules(config, pool_config) + (
            list(current.config.plugins) if current else []
        )
        forget_modules(plugins)
        try:
            registry = load_registry(config, pool_config)
        except (Exception, SystemExit) as exc:
            raise ReloadError(f"pool {pool_config.name!r}: {exc}") from exc
        plan.append((current, Pool(pool_config, registry, fingerprint, forker)))
    return plan


class Preparation:
    """:func:`plan_reload` on a thread of its own, so that a slow import of
    a preloaded pool's plugins never stalls the supervisor's loop (it goes
    on reaping, enforcing limits and petting the watchdog, but forks
    nothing until the plan is ready: a fork must not copy a half-done
    import). ``plan`` or ``error`` once :attr:`done`."""

    def __init__(
        self,
        pools: list[Pool],
        config: Config,
        forker: Forker,
        timeout: float = RELOAD_CHECK_TIMEOUT,
    ) -> None:
        self.config = config
        self.plan: Plan | None = None
        self.error = ""
        self.timeout = timeout
        self._deadline = time.monotonic() + timeout
        self._thread = threading.Thread(
            target=self._run, args=(pools, config, forker), name="corral-reload", daemon=True
        )
        self._thread.start()

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def overdue(self, now: float) -> bool:
        """Still importing past its deadline (an import that hangs)."""
        return not self.done and now > self._deadline

    def _run(self, pools: list[Pool], config: Config, forker: Forker) -> None:
        try:
            self.plan = plan_reload(pools, config, forker)
        except ReloadError as exc:
            self.error = str(exc)
        except BaseException as exc:  # a plugin's own bug must not end the thread silently
            self.error = f"{type(exc).__name__}: {exc}"


def apply_plan(pools: list[Pool], plan: Plan) -> list[Pool]:
    """Roll the changed pools of ``plan`` and drain the ``pools`` it no
    longer has; the new list of pools. Raises ReloadError (with the pools
    now running) if a fork failed."""
    planned = {successor.name for _, successor in plan}
    new = []
    failed = []
    for current, successor in plan:
        if successor is current or roll(current, successor):
            new.append(successor)
        else:  # a fork failed: this pool stays as it runs
            failed.append(successor.name)
            if current is not None:
                new.append(current)
    for gone in [pool for pool in pools if pool.name not in planned]:
        log.info("supervisor.pool_removed", pool=gone.name)
        gone.retire_all("pool removed")
    if failed:
        raise ReloadError(
            f"a fork failed for pool(s) {', '.join(failed)}: they keep their old workers; "
            "the other pools were reloaded",
            new,
        )
    return new


def roll(current: Pool | None, successor: Pool) -> bool:
    """A pool with new settings or code: start its new workers, then
    drain the old ones (they finish their jobs, hand back the rest).
    False if a fork failed: the new workers started so far drain and the
    old ones stay."""
    for index in range(len(successor.slots)):
        try:
            successor.spawn(index)
        except OSError as exc:
            log.error("supervisor.fork_failed", pool=successor.name, index=index, error=str(exc))
            successor.retire_all("a fork of its pool failed")
            return False
    if current is not None:
        log.info("supervisor.pool_restart", pool=successor.name, reason="config or code changed")
        current.retire_all("reload")
    else:
        log.info("supervisor.pool_added", pool=successor.name)
    return True


def code_modules(config: Config, pool: PoolConfig) -> list[str]:
    """The modules of a pool's code: its plugins, then its workers' hooks
    modules (the top-level ``hooks``, then the pool's)."""
    hooks = [spec.partition(":")[0] for spec in [*config.hooks, *pool.hooks]]
    return list(dict.fromkeys([*pool.plugins, *hooks]))


def plugin_fingerprint(config: Config, pool: PoolConfig) -> str:
    """A hash of the source files of a pool's plugin and hooks modules (a
    package counts all its .py files) and of its hooks entries, so a reload
    can tell changed code."""
    add_python_path(config.python_path)
    digest = hashlib.sha256()
    digest.update(repr([*config.hooks, *pool.hooks]).encode())
    for name in sorted(code_modules(config, pool)):
        for path in _module_files(name):
            digest.update(str(path).encode())
            try:
                digest.update(path.read_bytes())
            except OSError:
                digest.update(b"<unreadable>")
    return digest.hexdigest()


def _module_files(name: str) -> list[Path]:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    if spec.submodule_search_locations:
        files: list[Path] = []
        for location in spec.submodule_search_locations:
            files.extend(sorted(Path(location).rglob("*.py")))
        return files
    return [Path(spec.origin)] if spec.origin and spec.origin != "built-in" else []


def forget_modules(names: list[str]) -> None:
    """Drop modules (and their submodules) from sys.modules, and their
    cached bytecode, so the next import, in the supervisor or in a freshly
    forked worker, reads the code on disk again.

    The bytecode goes too because CPython's timestamp .pyc records the
    source's mtime in whole seconds and its size: an edit within the same
    second that keeps the size would otherwise load the old code."""
    for name in names:
        for path in _module_files(name):
            with contextlib.suppress(OSError, ValueError, NotImplementedError):
                os.unlink(importlib.util.cache_from_source(str(path)))
        prefix = name + "."
        for loaded in [m for m in sys.modules if m == name or m.startswith(prefix)]:
            del sys.modules[loaded]
    importlib.invalidate_caches()
