"""A reload of the pools: whether a pool's settings or plugin code changed,
how to make the next import read the code afresh, and the new set of pools
(unchanged ones kept, changed or new ones rolled, removed ones drained)."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from corral.supervisor.pool import Forker, Pool, load_registry
from corral.workers.registry import add_python_path

if TYPE_CHECKING:
    from corral.config.schema import Config, PoolConfig

log = structlog.get_logger()


def reload_pools(pools: list[Pool], config: Config, forker: Forker) -> list[Pool]:
    """The pools of ``config``, from the running ``pools``: a pool whose
    settings and code are unchanged is kept as it runs; the others are
    rolled, and pools no longer configured are drained."""
    old = {pool.name: pool for pool in pools}
    new = []
    for pool_config in config.pools:
        current = old.pop(pool_config.name, None)
        fingerprint = plugin_fingerprint(config, pool_config)
        if current is not None and not current.differs(pool_config, fingerprint):
            new.append(current)
            continue
        new.append(roll(current, config, pool_config, fingerprint, forker))
    for gone in old.values():
        log.info("supervisor.pool_removed", pool=gone.name)
        gone.retire_all("pool removed")
    return new


def roll(
    current: Pool | None, config: Config, pool: PoolConfig, fingerprint: str, forker: Forker
) -> Pool:
    """A pool with new settings or code: start its new workers, then
    drain the old ones (they finish their jobs, hand back the rest)."""
    plugins = list(pool.plugins) + (list(current.config.plugins) if current else [])
    forget_modules(plugins)
    successor = Pool(pool, load_registry(config, pool), fingerprint, forker)
    for index in range(pool.processes):
        successor.spawn(index)
    if current is not None:
        log.info("supervisor.pool_restart", pool=pool.name, reason="config or code changed")
        current.retire_all("reload")
    else:
        log.info("supervisor.pool_added", pool=pool.name)
    return successor


def plugin_fingerprint(config: Config, pool: PoolConfig) -> str:
    """A hash of the source files of a pool's plugin modules (a package
    counts all its .py files), so a reload can tell changed code."""
    add_python_path(config.python_path)
    digest = hashlib.sha256()
    for name in sorted(pool.plugins):
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
    """Drop modules (and their submodules) from sys.modules, so the next
    import, in the supervisor or in a freshly forked worker, reads the code
    on disk again."""
    for name in names:
        prefix = name + "."
        for loaded in [m for m in sys.modules if m == name or m.startswith(prefix)]:
            del sys.modules[loaded]
    importlib.invalidate_caches()
