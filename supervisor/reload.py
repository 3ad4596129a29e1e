"""What a reload needs to know: whether a pool's plugin code changed, and
how to make the next import read it afresh."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from corral.workers.registry import add_python_path


def plugin_fingerprint(config: Any, pool: Any) -> str:
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
