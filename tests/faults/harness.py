"""Pieces the soak tests share: knobs from the environment, the config,
producers that enqueue continuously into a History, and the final wait."""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from conftest import Env, render_config

import corral

from .history import MISSING, TERMINAL, History

TASK = "soak.record"


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    return float(value) if value else default


def write_config(env: Env, **options: Any) -> None:
    """The soak tasks in a pool, with a heartbeat window (0.5 s x 6) wide
    enough that a busy machine does not make a live worker look dead: the
    duplicate checks count on every redelivery having a kill behind it."""
    options.setdefault("plugins", '["soak_tasks"]')
    options.setdefault("heartbeat", "500ms")
    options.setdefault("liveness", 6)
    env.config.write_text(render_config(env.home, **options))


class Producers:
    """Threads that enqueue ``soak.record`` jobs at about ``rate`` jobs per
    second in all, each thread with its own ``corral.Client``. Every job is
    an invocation of ``history`` (token ``p<thread>-<n>``), acknowledged only
    once ``enqueue`` returned its id; even threads call ``enqueue``, odd ones
    ``enqueue_many`` with 1 to ``max_batch`` jobs."""

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
        self.endpoint = endpoint
        self.history = history
        self.record_path = str(record_path)
        self.seed = seed
        self.rate = rate
        self.max_batch = max_batch
        self.seconds = seconds
        self.timeout = timeout
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(i, threads), name=f"producer-{i}", daemon=True)
            for i in range(threads)
        ]
        self.errors: list[BaseException] = []

    def __enter__(self) -> Producers:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop and join every thread; raise the first unexpected error."""
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 30)
            assert not thread.is_alive(), f"{thread.name} did not stop"
        if self.errors:
            raise self.errors[0]

    def _run(self, index: int, threads: int) -> None:
        rng = random.Random(f"{self.seed}-{index}")
        interval = threads / self.rate
        client = corral.Client(self.endpoint, timeout=self.timeout)
        seq = 0
        next_at = time.monotonic()
        try:
            while not self._stop.is_set():
                size = 1 if index % 2 == 0 else rng.randint(1, self.max_batch)
                tokens = [f"p{index}-{seq + i}" for i in range(size)]
                seq += size
                jobs = [
                    corral.Job(
                        TASK,
                        {
                            "path": self.record_path,
                            "token": t,
                            "seconds": rng.uniform(*self.seconds),
                        },
                    )
                    for t in tokens
                ]
                self._enqueue(client, index, tokens, jobs)
                next_at = max(next_at + size * interval, time.monotonic() - 1.0)
                self._stop.wait(max(0.0, next_at - time.monotonic()))
        finally:
            client.close()

    def _enqueue(
        self, client: corral.Client, index: int, tokens: list[str], jobs: list[corral.Job]
    ) -> None:
        for token in tokens:
            self.history.invoke(token)
        try:
            if index % 2 == 0:
                ids = [client.enqueue(jobs[0].task, jobs[0].payload)]
            else:
                ids = client.enqueue_many(jobs)
        except corral.BrokerUnavailable as exc:
            for token in tokens:
                self.history.unknown(token, str(exc))
        except (corral.DiskFull, corral.BrokerError) as exc:  # refused by the broker
            for token in tokens:
                self.history.fail(token, repr(exc))
        except BaseException as exc:
            for token in tokens:
                self.history.unknown(token, repr(exc))
            self.errors.append(exc)
            self._stop.set()
        else:
            assert len(ids) == len(tokens), (ids, tokens)
            for token, job_id in zip(tokens, ids, strict=True):
                self.history.ok(token, job_id)


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
