"""What a reload (SIGHUP) can apply, and what waits for a restart.

A reload applies what the supervisor itself owns: the pools (its workers
are forked from it with the new settings and code), and the ``hooks`` and
``python_path`` their code is loaded with. Every other key is read once, at
the start, by a process that a reload does not restart: the broker reads
``[broker]``, ``[security]``, ``[metrics]``, ``[[schedules]]`` and ``[log]``;
the supervisor binds the dashboard's port and reports to the broker with
``[client]``; the workers connect with the broker's endpoints and keys. A
reload that changes one of those keys keeps the running value and names the
key, "restart to apply" (as PostgreSQL does for its ``postmaster``
settings): so a broker that the supervisor restarts after a crash comes
back as it ran (its own log, endpoints and keys), and new workers connect
where the broker listens, not where it would listen after a restart.
"""

from __future__ import annotations

from typing import Any

import msgspec

from corral.config.schema import Config

#: The top-level keys a reload applies.
RELOADABLE = ("pools", "hooks", "python_path")


def split_reload(running: Config, new: Config) -> tuple[Config, list[str]]:
    """The config a reload to ``new`` puts in force (``new``'s pools, hooks
    and python_path; ``running``'s other keys), and the dotted paths of the
    keys that differ and wait for a restart (``broker.state_dir``,
    ``schedules``), in schema order."""
    kept = msgspec.structs.replace(running, **{name: getattr(new, name) for name in RELOADABLE})
    return kept, restart_keys(running, new)


def restart_keys(running: Config, new: Config) -> list[str]:
    """The keys outside :data:`RELOADABLE` whose values differ: a section's
    changed fields one by one (``metrics.listen``), a list as a whole."""
    changed: list[str] = []
    for name in running.__struct_fields__:
        if name in RELOADABLE:
            continue
        old, now = getattr(running, name), getattr(new, name)
        if old == now:
            continue
        if isinstance(old, msgspec.Struct):
            changed.extend(f"{name}.{key}" for key in _differing(old, now))
        else:
            changed.append(name)
    return changed


def _differing(old: Any, new: Any) -> list[str]:
    return [key for key in old.__struct_fields__ if getattr(old, key) != getattr(new, key)]
