"""``corral check-config``'s plugin check, run in a child process of its own
(``python -m corral.workers.plugincheck CONFIG``), so that a plugin that
crashes, exits or blocks at import, or leaves state behind, cannot take the
check down or fool it with modules an earlier import left loaded.

What it checks, as a worker would see it:

- each pool's plugins import (a broken one is named by file and line);
- each hooks module (top-level and per pool) imports, and its function
  (``corral_hooks``, or the one named) gives hooks: it is called here, in
  this throwaway process, as each worker calls it after its fork (a
  function that raises would stop every worker of a reloaded pool from
  starting; run by the supervisor for a reload, this process has the
  workers' environment);
- each schedule's task is registered by some pool that serves the
  schedule's queue (else every fire would wait, unroutable, for ever);
- each schedule's payload is what that task's handler takes (else every
  fire would fail with a ValidationError).

It prints one JSON object on stdout: ``{"problems": ["path: text", ...]}``
and exits 0 (it exits non-zero only when it could not run at all).
"""

from __future__ import annotations

import sys
from typing import Any

import msgspec

#: Exit code when the config itself cannot be read (the parent reports it).
EXIT_NO_CONFIG = 2


def check(config: Any) -> list[str]:
    """Problems with the plugins and schedules of ``config`` (a loaded
    :class:`~corral.config.Config`), each ``"path: what is wrong"``."""
    from corral.workers.registry import PluginError, Registry, add_python_path, load_plugins

    add_python_path(config.python_path)
    problems = _check_hooks("hooks", config.hooks)
    for index, pool in enumerate(config.pools):
        problems += _check_hooks(f"pools[{index}].hooks (pool {pool.name!r})", pool.hooks)
    registries: list[tuple[Any, Registry]] = []
    for index, pool in enumerate(config.pools):
        try:
            registries.append((pool, load_plugins(pool.plugins)))
        except PluginError as exc:
            problems.append(f"pools[{index}].plugins (pool {pool.name!r}): {exc}")
    if len(registries) < len(config.pools):
        return problems  # the schedules' tasks may be in the pool that failed
    for index, schedule in enumerate(config.schedules):
        problems.extend(_check_schedule(index, schedule, registries))
    return problems


def _check_hooks(where: str, specs: list[str]) -> list[str]:
    from corral.hooks import HookError, load_hooks

    problems = []
    for spec in specs:
        try:
            load_hooks([spec])
        except HookError as exc:
            problems.append(f"{where}: {exc}")
    return problems


def _check_schedule(index: int, schedule: Any, registries: list[tuple[Any, Any]]) -> list[str]:
    from corral.workers.registry import PayloadInvalid

    serving = [(pool, reg) for pool, reg in registries if schedule.queue in pool.queues]
    found = [reg.get(schedule.task) for _, reg in serving if reg.get(schedule.task) is not None]
    where = f"schedules[{index}] ({schedule.name!r})"
    if not found:
        elsewhere = [pool.name for pool, reg in registries if reg.get(schedule.task) is not None]
        hint = (
            f"pool(s) {', '.join(elsewhere)} register it but do not serve queue "
            f"{schedule.queue!r}: set the schedule's queue, or add the queue to a pool"
            if elsewhere
            else "add the module that defines it to a pool's plugins (a typo in the name?)"
        )
        return [
            f"{where}.task: no pool that serves queue {schedule.queue!r} registers task "
            f"{schedule.task!r}; {hint}"
        ]
    definition = found[0]
    try:
        definition.decode_payload(msgspec.msgpack.encode(schedule.payload))
    except PayloadInvalid as exc:
        return [f"{where}.payload: task {schedule.task!r} would refuse it on every run: {exc}"]
    return []


def main(argv: list[str]) -> int:
    from corral.config import load
    from corral.errors import ConfigError

    try:
        config = load(argv[0])
    except (ConfigError, OSError, IndexError) as exc:
        print(f"cannot read the config: {exc}", file=sys.stderr)
        return EXIT_NO_CONFIG
    sys.stdout.write(msgspec.json.encode({"problems": check(config)}).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
