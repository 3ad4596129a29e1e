"""The systemd unit for this install: the template shipped as
``corral/config/corral.service`` with its paths made true (``corral
systemd-unit``). The template assumes ``/usr/bin/corral``, but pip puts
corral in a virtualenv or ``/usr/local/bin``; a unit naming a path that
does not exist fails at start with a bare ``203/EXEC``."""

from __future__ import annotations

import shutil
import sys
from importlib import resources
from pathlib import Path

#: The template's executable, replaced by the real one.
TEMPLATE_EXECUTABLE = "/usr/bin/corral"
#: The template's config, replaced by the one given.
TEMPLATE_CONFIG = "/etc/corral/corral.toml"


def executable() -> str:
    """The absolute path of the corral command running now (else the one on
    PATH; else this interpreter running the CLI module)."""
    argv0 = Path(sys.argv[0])
    if argv0.name == "corral" and argv0.exists():
        return str(argv0.resolve())
    found = shutil.which("corral")
    if found:
        return str(Path(found).resolve())
    return f"{Path(sys.executable).resolve()} -m corral.cli"


def readme() -> Path | None:
    """The README of the source tree this corral runs from, if it has one."""
    here = Path(__file__).resolve().parent.parent
    candidate = here / "README.md"
    return candidate if candidate.is_file() else None


def socket_group(config: Path) -> str | None:
    """The ``broker.socket_group`` of the config at ``config``, if it can be
    read (one that cannot is the unit's ``ExecStartPre`` check's to say)."""
    from corral.config import load
    from corral.errors import ConfigError

    try:
        return load(config).broker.socket_group or None
    except (ConfigError, OSError):
        return None


def render_unit(config: Path, command: str | None = None) -> tuple[str, list[str]]:
    """The unit text for ``config`` (an absolute path) and ``command`` (the
    corral executable; default :func:`executable`), and warnings about
    paths the unit's sandbox hides (``ProtectHome``, ``PrivateTmp``). A
    config with ``socket_group`` makes the service a member of that group
    (``SupplementaryGroups=``: under ``DynamicUser`` nothing else can, and
    the broker must be one to give its sockets to it)."""
    template = resources.files("corral.config").joinpath("corral.service").read_text()
    command = command or executable()
    unit = template.replace(f"{TEMPLATE_EXECUTABLE} ", f"{command} ").replace(
        TEMPLATE_CONFIG, str(config)
    )
    doc = readme()
    if doc is not None:
        unit = unit.replace("[Unit]\n", f"[Unit]\nDocumentation=file://{doc}\n", 1)
    group = socket_group(config)
    if group:  # the broker must be a member to give its sockets to it
        unit = unit.replace("[Service]\n", f"[Service]\nSupplementaryGroups={group}\n", 1)
    warnings = []
    for path, what in ((command.split()[0], "the corral executable"), (str(config), "the config")):
        if path.startswith(("/home/", "/root/", "/run/user/")):
            warnings.append(
                f"{what} is at {path}, which the unit's ProtectHome=yes hides from the service: "
                "install corral under /opt or /usr/local (and the config under /etc/corral)"
            )
        elif path.startswith(("/tmp/", "/var/tmp/")):
            warnings.append(
                f"{what} is at {path}, which the unit's PrivateTmp=yes hides from the service"
            )
    return unit, warnings
