"""Pieces the fault tests share: the two profiles and their knobs, the
config, the producer process, faults recorded as they are injected, and the
final wait."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import Env, render_config

import corral

from .history import MISSING, TERMINAL, History

TASK = "soak.record"
#: The tests directory: on the producer's path, so it imports ``faults.*``.
TESTS = str(Path(__file__).resolve().parent.parent)


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    return float(value) if value else default


@dataclass(frozen=True)
class Profile:
    """How big a fault test runs: ``fast`` (inside ``make test``, fixed small
    counts) or ``full`` (``make soak``, counts from CORRAL_SOAK_* knobs)."""

    name: str

    @property
    def full(self) -> bool:
        return self.name == "full"

    def count(self, knob: str, fast: int, full: int) -> int:
        """``fast`` in the fast profile; else the knob, ``full`` by default."""
        return env_int(knob, full) if self.full else fast

    def seconds(self, knob: str, fast: float, full: float) -> float:
        return env_float(knob, full) if self.full else fast


FAST, FULL = Profile("fast"), Profile("full")
#: ``@pytest.mark.parametrize("profile", PROFILES)``: the same test in both
#: profiles, the full one marked ``soak``.
PROFILES = [pytest.param(FAST, id="fast"), pytest.param(FULL, id="full", marks=pytest.mark.soak)]


def inject(history: History, what: str, pid: int, sig: int = signal.SIGKILL) -> bool:
    """Record the fault ``what`` ("broker", "worker", "stop") on ``pid`` in
    ``history``, then send ``sig``; False (and nothing recorded) if the
    process was gone already."""
    fault = history.fault(what, pid)
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        history.faults.remove(fault)
        return False
    return True


def percentile(values: list[float], fraction: float) -> float:
    """The ``fraction`` (0..1) percentile of ``values``, nearest rank; NaN if none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


def write_config(env: Env, **options: Any) -> None:
    """The soak tasks in a pool, with a heartbeat window (0.5 s x 6) wide
    enough that a busy machine does not make a live worker look dead: the
    duplicate checks count on every redelivery having a kill behind it."""
    options.setdefault("plugins", '["soak_tasks"]')
    options.setdefault("heartbeat", "500ms")
    options.setdefault("liveness", 6)
    env.config.write_text(render_config(env.home, **options))


class Producers:
    """A producer process (``faults.producer``) that enqueues ``soak.record``
    jobs at about ``rate`` jobs per second, on ``threads`` threads, until
    stopped. It writes its invocations to a file, read into ``history`` when
    it stops; the handlers write their runs to ``record_path``. ``seconds``
    bounds how long each job's handler sleeps; ``timeout`` is the client's."""

    def __init__(
        self,
        endpoint: str,
        history: History,
        record_path: Path,
        *,
        seed: int,
        threads: int = 2,
        rate: float = 40.0,
        max_batch: int = 4,
        seconds: tuple[float, float] = (0.0, 0.05),
        timeout: float = 2.0,
    ) -> None:
        self.history = history
        self.timeout = timeout
        self.path = record_path.with_name(record_path.name + ".invocations")
        self.log_path = record_path.with_name(record_path.name + ".producer.log")
        self.args = [
            sys.executable, "-m", "faults.producer",
            "--endpoint", endpoint,
            "--history", str(self.path),
            "--record", str(record_path),
            "--seed", str(seed),
            "--threads", str(threads),
            "--rate", str(rate),
            "--max-batch", str(max_batch),
            "--seconds", str(seconds[0]), str(seconds[1]),
            "--timeout", str(timeout),
        ]  # fmt: skip
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Producers:
        environ = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, *sys.path]))
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self.args, env=environ, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.stop()
        else:
            self.kill()

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def stop(self) -> None:
        """SIGTERM the producer, wait for its last outcomes, load them into
        the history; fail, with its output, if it did not exit 0."""
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(self.timeout + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            raise AssertionError("the producer did not stop on SIGTERM") from None
        finally:
            self.history.load_invocations(self.path)
        assert code == 0, f"the producer exited {code}:\n{self.log_path.read_text()[-5000:]}"

    def kill(self) -> None:
        """SIGKILL the producer (teardown after a failure)."""
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait(10)
            self._proc = None


def list_statuses(client: corral.Client, queue: str = "default") -> dict[str, str]:
    """Every job of ``queue`` the broker knows, id -> status."""
    out: dict[str, str] = {}
    cursor = None
    while True:
        page = client.jobs(queue, None, 2000, cursor=cursor)
        out.update((job.id, job.status) for job in page)
        if page.cursor is None:
            return out
        cursor = page.cursor


def final_statuses(env: Env, job_ids: Iterable[str], timeout: float) -> dict[str, str]:
    """Wait until none of ``job_ids`` is queued, scheduled, running or
    retrying; return their statuses (``MISSING`` for the ones the broker
    does not know). Fails after ``timeout`` naming how many are not done."""
    wanted = set(job_ids)
    client = env.client(timeout=10.0)
    deadline = time.monotonic() + timeout
    statuses: dict[str, str] = {}
    while True:
        try:
            known = list_statuses(client)
        except corral.BrokerUnavailable:
            known = None
        if known is not None:
            statuses = {job_id: known.get(job_id, MISSING) for job_id in wanted}
            busy = [j for j, s in statuses.items() if s != MISSING and s not in TERMINAL]
            if not busy:
                break
        if time.monotonic() > deadline:
            counts: dict[str, int] = {}
            for status in statuses.values():
                counts[status] = counts.get(status, 0) + 1
            raise AssertionError(
                f"timed out after {timeout}s waiting for {len(wanted)} acknowledged jobs "
                f"to end; their statuses: {counts}"
            )
        time.sleep(0.5)
    for job_id in [j for j, s in statuses.items() if s == MISSING]:
        with contextlib.suppress(corral.JobNotFound):  # not listed: a direct look-up
            statuses[job_id] = client.job(job_id).status
    return statuses
