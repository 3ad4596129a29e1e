"""Fixtures for tests that run real corral processes.

Every process is started in its own session and killed in teardown; every
wait polls against a deadline. State lives in a short /tmp directory
because ipc:// socket paths are limited to 107 bytes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import forked
import psutil
import pytest
import reaper
import structlog
from hypothesis import HealthCheck, settings

import corral

# Property tests share the machine with real processes (the suite runs
# three tests at a time): no per-example deadline, no "too slow" check; the
# number of examples bounds them.
settings.register_profile("suite", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("suite")

CORRAL = str(Path(sys.executable).with_name("corral"))
PLUGINS = str(Path(__file__).parent / "plugins")

#: This test process's fork server: corral commands start as its forks
#: (``tests/zygote.py``), unless ``CORRAL_TEST_EXEC=1``.
ZYGOTE = forked.Zygote(CORRAL)


def pytest_sessionfinish() -> None:
    ZYGOTE.close()


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 30.0,
    interval: float = 0.02,
    message: str = "condition",
) -> Any:
    """Poll ``predicate`` until it returns something truthy, or fail."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


#: How often a wait polls a ``corral`` command (``env.run``): each poll is a
#: process, so not every 20 ms; what such waits look for (a pool's state in
#: ``corral status``, from the supervisor's reports) changes about once a second.
CLI_POLL = 0.25


def free_port() -> int:
    """A loopback TCP port nothing listens on now (the kernel's pick, let go)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def render_config(
    state: Path,
    *,
    fsync: str = "always",
    heartbeat: str = "200ms",
    liveness: int = 3,
    processes: int = 2,
    concurrency: int = 1,
    prefetch: int = 2,
    extra_broker: str = "",
    extra_pool: str = "",
    plugins: str = '["e2e_tasks"]',
    state_dir: str | None = None,
) -> str:
    return f"""
python_path = ["{PLUGINS}"]

[broker]
state_dir = "{state_dir or f"{state}/state"}"
client_endpoint = "ipc://{state}/c.sock"
worker_endpoint = "ipc://{state}/w.sock"
fsync = "{fsync}"
heartbeat_interval = "{heartbeat}"
heartbeat_liveness = {liveness}
{extra_broker}

[[pools]]
name = "default"
queues = ["default"]
processes = {processes}
plugins = {plugins}
concurrency = {concurrency}
prefetch = {prefetch}
shutdown_timeout = "10s"
{extra_pool}

[log]
level = "info"
format = "json"
"""


class Proc:
    """One corral command running in its own session."""

    def __init__(
        self, home: Path, args: list[str], name: str, preexec: Callable[[], None] | None = None
    ) -> None:
        self.name = name
        self.log_path = home / f"{name}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in kill()
        self.popen: subprocess.Popen[bytes] | forked.Forked
        if preexec is None and ZYGOTE.can_run():
            self.popen = ZYGOTE.spawn(args, cwd=home, stdout=self.log_path, session=True)
        else:
            self.popen = subprocess.Popen(
                [CORRAL, *args],
                cwd=home,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=preexec,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout)

    def descendants(self) -> list[psutil.Process]:
        """Its child processes, recursively; [] once it is gone. A child that
        exits during the scan can make psutil fail: the scan is retried, so
        that a passing race never reads as "no children"."""
        for _ in range(20):
            try:
                return psutil.Process(self.pid).children(recursive=True)
            except psutil.NoSuchProcess as exc:
                if exc.pid == self.pid:
                    return []
            except psutil.Error:
                pass
        return []

    def kill(self) -> None:
        procs = self.descendants()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)
        self._log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


class Env:
    """A corral installation in a temporary directory: one config, any
    number of corral processes, and clients."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.config = home / "corral.toml"
        self.procs: list[Proc] = []
        self.clients: list[corral.Client] = []
        self.write_config()

    def write_config(self, **options: Any) -> None:
        self.config.write_text(render_config(self.home, **options))

    @property
    def endpoint(self) -> str:
        return f"ipc://{self.home}/c.sock"

    def start(
        self,
        command: str,
        *extra: str,
        name: str | None = None,
        preexec: Callable[[], None] | None = None,
    ) -> Proc:
        proc = Proc(
            self.home,
            [command, "-c", str(self.config), *extra],
            name or f"{command}-{len(self.procs)}",
            preexec,
        )
        self.procs.append(proc)
        return proc

    def run(
        self,
        *args: str,
        timeout: float = 60.0,
        stdin: str | None = None,
        cwd: Path | None = None,
        environ: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a CLI command to completion (in the home directory unless
        ``cwd``; ``environ`` adds to the environment; ``stdin`` is its input)."""
        environment = {**os.environ, **environ} if environ else None
        if ZYGOTE.can_run(environment) and "_ARGCOMPLETE" not in (environment or {}):
            return forked.run(
                ZYGOTE,
                list(args),
                cwd=cwd or self.home,
                scratch=Path(tempfile.gettempdir()),
                timeout=timeout,
                stdin=stdin,
                env=environment,
            )
        return subprocess.run(
            [CORRAL, *args],
            cwd=cwd or self.home,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=stdin,
            env={**os.environ, **environ} if environ else None,
        )

    def client(self, timeout: float = 10.0) -> corral.Client:
        client = corral.Client(self.endpoint, timeout=timeout)
        self.clients.append(client)
        return client

    def wait_ready(self, proc: Proc, timeout: float = 30.0) -> None:
        client = corral.Client(self.endpoint, timeout=0.5)

        def ping() -> bool:
            assert proc.alive(), f"process exited early:\n{proc.output()}"
            try:
                client.ping()
            except corral.BrokerUnavailable:
                return False
            return True

        try:
            wait_for(ping, timeout, message="the broker to answer")
        finally:
            client.close()

    def wait_workers(self, n: int, timeout: float = 30.0) -> None:
        client = self.client()
        wait_for(
            lambda: len(client.status().workers) >= n, timeout, message=f"{n} workers to register"
        )

    def close(self) -> None:
        for client in self.clients:
            client.close()
        for proc in self.procs:
            proc.kill()


def titled(proc: Proc, title: str) -> list[psutil.Process]:
    """The descendants of ``proc`` whose process title starts with ``title``
    (one that exits during the look is left out)."""
    found = []
    for child in proc.descendants():
        try:
            if " ".join(child.cmdline()).startswith(title):
                found.append(child)
        except psutil.Error:
            continue
    return found


def worker_processes(proc: Proc) -> list[psutil.Process]:
    """The worker children of a supervisor, found by their process titles."""
    return titled(proc, "corral: worker")


def broker_processes(proc: Proc) -> list[psutil.Process]:
    """The broker child of ``corral run`` (none while it is restarted)."""
    return titled(proc, "corral: broker")


#: A short retry backoff, for tests that are not about the backoff.
FAST_RETRY = 'retry_backoff = "50ms"\nretry_backoff_max = "50ms"'


def wait_new_broker(client: corral.Client, old: str, timeout: float = 60.0) -> None:
    """Wait until a broker other than ``old`` (a broker id, from
    ``client.ping()``) answers ``client``."""

    def new_broker() -> bool:
        try:
            return client.ping() != old
        except corral.BrokerUnavailable:
            return False

    wait_for(new_broker, timeout, message="a new broker")


def kill_broker(env: Env, daemon: Proc) -> None:
    """SIGKILL the broker child of ``corral run`` and wait for the
    supervisor's new one to answer (its broker id differs)."""
    client = corral.Client(env.endpoint, timeout=1)
    try:
        old = client.ping()
        (broker,) = broker_processes(daemon)
        broker.kill()
        wait_new_broker(client, old)
    finally:
        client.close()


@pytest.fixture(autouse=True)
def _structlog_as_it_was() -> Iterator[None]:
    """Each test starts with structlog's defaults: a command run in process
    (``corral log ...`` configures logging to warnings on stderr) must not
    hide the info events a later test in the same worker captures."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


#: Lines of each process's log a failed test's report shows.
FAILURE_LOG_LINES = 80


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A test that used ``env`` and failed reports the last lines of each
    corral process's log: a failure seen once in CI carries its evidence."""
    outcome = yield
    report = outcome.get_result()
    environment = getattr(item, "funcargs", {}).get("env")
    if not report.failed or not isinstance(environment, Env):
        return
    for proc in environment.procs:
        with contextlib.suppress(OSError):
            tail = proc.output().splitlines()[-FAILURE_LOG_LINES:]
            report.sections.append((f"corral log: {proc.name}", "\n".join(tail)))


@pytest.fixture
def env() -> Iterator[Env]:
    home = Path(tempfile.mkdtemp(prefix="cr", dir="/tmp"))
    environment = Env(home)
    try:
        yield environment
    finally:
        environment.close()
        shutil.rmtree(home, ignore_errors=True)


def wait_until(
    fetch: Callable[[], Any],
    check: Callable[[Any], Any],
    timeout: float = 30.0,
    interval: float = 0.02,
    message: str = "condition",
) -> Any:
    """Poll ``fetch()`` until ``check`` holds for its value; return that value,
    or fail showing the last value fetched."""
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if check(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {message}; last value: {value!r}"
            )
        time.sleep(interval)


def json_events(text: str) -> list[dict[str, Any]]:
    """The JSON log lines of a process's output, failing on any line that is not one."""
    import json

    events = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            raise AssertionError(f"line {number} of the output is not a JSON object: {line!r}")
        events.append(event)
    return events


def log_events(text: str) -> list[dict[str, Any]]:
    """The JSON log lines of a process's output, passing over any other line
    (a traceback, a child's print): match on fields, never on a line's bytes
    (spacing and order are the renderer's)."""
    import json

    events = []
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    events.append(event)
    return events


# -- small real filesystems, for full-disk tests ---------------------------------------


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """Mounts small real filesystems: ``tmpfs(size="4m", at=None)`` mounts a
    tmpfs of that size (under ``tmp_path`` unless ``at`` names a directory)
    and returns its path; each is unmounted in teardown. Skips the test
    where mounting is not allowed (it needs root)."""
    mounts: list[Path] = []

    def mount(size: str = "4m", at: Path | None = None) -> Path:
        point = at or tmp_path / f"fs{len(mounts)}"
        point.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.strip()}")
        mounts.append(point)
        return point

    try:
        yield mount
    finally:
        for point in reversed(mounts):
            subprocess.run(["umount", "-l", str(point)], check=False, capture_output=True)


def fill_disk(fs: Path, leave: int) -> Path:
    """Take all but about ``leave`` bytes of the filesystem ``fs`` with a
    file (grown if it exists); returns it: unlink it to give the space back."""
    filler = fs / "filler"
    stat = os.statvfs(fs)
    free = stat.f_bavail * stat.f_frsize
    with open(filler, "ab") as file:
        size = os.fstat(file.fileno()).st_size + max(0, free - leave)
        os.posix_fallocate(file.fileno(), 0, size)
    return filler


def free_bytes(fs: Path) -> int:
    stat = os.statvfs(fs)
    return stat.f_bavail * stat.f_frsize


def pytest_configure(config: pytest.Config) -> None:
    reaper.install()
