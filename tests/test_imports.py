"""``import corral`` stays cheap and acyclic: the facade imports lazily, the
broker's pure modules load no zmq and no asyncio, and every module imports
first in a fresh process."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

import corral

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter; fail the test with its stderr."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done


def loads_no_zmq_nor_asyncio(*modules: str) -> None:
    run_python(
        f"""
        import sys
        import {", ".join(modules)}
        loaded = sorted({{"zmq", "asyncio"}} & set(sys.modules))
        assert not loaded, "importing {" and ".join(modules)} loaded " + str(loaded)
        """
    )


def test_import_corral_loads_neither_zmq_nor_asyncio() -> None:
    loads_no_zmq_nor_asyncio("corral")


def test_the_job_state_loads_neither_zmq_nor_asyncio() -> None:
    loads_no_zmq_nor_asyncio("corral.broker.state")


def test_the_log_loads_neither_zmq_nor_asyncio() -> None:
    loads_no_zmq_nor_asyncio("corral.broker.state", "corral.broker.log")


def test_corral_commands_load_structlog_without_rich_and_rich_still_works() -> None:
    """structlog's optional rich import cost a third of every daemon's and
    command's start-up; the CLI hides rich from it, and only from it."""
    run_python(
        """
        import sys
        from corral.cli import _import_structlog_without_rich
        _import_structlog_without_rich()
        import structlog
        import corral.supervisor.supervisor  # everything a daemon loads
        assert "rich" not in sys.modules, sorted(m for m in sys.modules if "rich" in m)
        assert structlog.dev.rich is None
        from rich.table import Table  # the CLI's tables still import it
        assert Table
        """
    )


def test_the_blocking_client_loads_no_asyncio_and_still_names_the_async_one() -> None:
    """A web app's ``corral.Client`` paid for asyncio (a third of the
    client's import) because AsyncClient lived in the same module."""
    run_python(
        """
        import sys
        import corral.client
        assert "asyncio" not in sys.modules
        from corral.client import AsyncClient
        import corral
        assert corral.AsyncClient is AsyncClient and AsyncClient.__module__ == "corral.asyncclient"
        """
    )


def test_a_client_command_loads_neither_structlog_nor_asyncio() -> None:
    """A client's command (enqueue, status, ...) logs nothing: importing
    structlog, and the asyncio it imports, was a third of its start-up CPU.
    The daemons' commands still get structlog without rich."""
    run_python(
        """
        import sys
        from corral.cli import main
        code = main(["status", "--endpoint", "ipc:///nonexistent/corral.sock", "--timeout", "0.05"])
        assert code == 3, code
        loaded = sorted({"structlog", "asyncio"} & set(sys.modules))
        assert not loaded, loaded
        """
    )


def test_the_broker_command_loads_no_psutil_before_it_serves(tmp_path: Path) -> None:
    """``corral broker`` named itself through the supervisor's process
    module, which imports psutil (a tenth of the broker's imports), though
    the broker never uses it: a restart's time to its first answer
    includes every import."""
    config = tmp_path / "corral.toml"
    config.write_text(f'[broker]\nstate_dir = "{tmp_path / "s"}"\n')
    run_python(
        f"""
        import sys
        from corral import cli
        from corral.supervisor import roles

        def run_broker(config):
            import corral.broker.server  # what the real one imports before it serves
            loaded = sorted({{"psutil"}} & set(sys.modules))
            assert not loaded, loaded
            return 0

        roles.run_broker = run_broker
        assert cli.main(["broker", "-c", {str(config)!r}]) == 0
        """
    )


def test_a_plugin_module_needs_only_the_registry() -> None:
    """``@corral.task`` imports the task registry, not the client."""
    run_python(
        """
        import sys
        import corral

        @corral.task(queue="emails", max_attempts=5, timeout=30)
        def send(ctx: corral.JobContext, to: str) -> str:
            return to

        assert send.__corral_task__.name == "__main__.send"
        assert send.__corral_task__.queue == "emails"
        assert "corral.client" not in sys.modules and "zmq" not in sys.modules
        """
    )


def test_every_public_name_resolves_to_its_home() -> None:
    assert sorted(corral.__all__) == sorted(corral._HOMES)
    for name in corral.__all__:
        value = getattr(corral, name)
        home = importlib.import_module(corral._HOMES[name])
        assert value is getattr(home, name)
        assert name in dir(corral)
    assert corral.Client.__name__ == "Client"
    assert issubclass(corral.JobFailed, corral.CorralError)
    assert isinstance(corral.__version__, str)
    with pytest.raises(AttributeError, match="no attribute 'Clinet'"):
        _ = corral.Clinet


def test_star_import_gives_the_public_names() -> None:
    names: dict[str, object] = {}
    exec("from corral import *", names)
    assert set(corral.__all__) <= set(names)


def all_modules() -> list[str]:
    """Every module of the distribution: the packages pyproject.toml lists
    and the modules in each (the folders are mapped onto ``corral.*``)."""
    with (ROOT / "pyproject.toml").open("rb") as file:
        packages = tomllib.load(file)["tool"]["setuptools"]["packages"]
    modules = []
    for package in packages:
        modules.append(package)
        path = importlib.import_module(package).__path__
        modules += [f"{package}.{info.name}" for info in pkgutil.iter_modules(path)]
    return modules


#: Forks a child per module, each importing that module first, all at once. The third-party
#: libraries are imported once, before the forks: they cannot import corral, so
#: only corral's own modules run in each child, and the test stays quick.
IMPORT_EACH_FIRST = """
import os, sys, traceback
import msgspec, psutil, structlog, zmq
children = {}
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            __import__(name)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    children[pid] = name
failed = sorted(name for pid, name in children.items() if os.waitpid(pid, 0)[1] != 0)
if failed:
    sys.exit("could not be imported first: " + ", ".join(failed))
"""


def test_every_module_imports_first_in_a_fresh_process() -> None:
    """An import cycle shows up as a module that fails when it is the first
    of the package imported; each gets a process of its own."""
    modules = all_modules()
    assert "corral.broker.state" in modules and "corral.client" in modules
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_EACH_FIRST, *modules],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
