"""Soak: the broker's memory levels off over a million jobs of every kind.

A real ``corral run`` daemon (two worker processes) runs jobs created,
run and forgotten as fast as it goes, with short TTLs (1 s for results,
2 s for failures): plain jobs (in batches, with priorities and an
hour-long timeout), delayed and scheduled ones, a cron-like schedule, unique
keys (fresh and repeated), errors retried, ``corral.Retry`` requests,
failures, callbacks on success and failure, progress notes, chains,
groups and chords (one with its own result_ttl), jobs cancelled, jobs
deleted after their result was read, result waits, and one-off queues
paused, resumed and purged. The backlog is held under
:data:`BACKLOG` jobs, so the live state stays about the same size all run
long: what grows with the history is a leak.

The broker's RSS (psutil) is read every ``jobs / readings`` jobs and shown.
It must level off: after the first quarter of the run, no reading may be
more than half as much again (plus 32 MiB) above the highest of the first
quarter. A leak of even 100 bytes a job is 100 MB over a million.

Knobs: CORRAL_SOAK_LONG_JOBS (1,000,000), CORRAL_SOAK_LONG_READINGS (20).
About 10 minutes with the defaults on 2 cores.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterator

import pytest
from conftest import Env, broker_processes, render_config, wait_for

import corral

from .harness import env_int

J = corral.Job
MIB = 1024 * 1024
#: Jobs enqueued per round (plus the round's flows, cancels and one-off queues).
ROUND = 5_000
#: Bulk jobs go in batches of this many.
BATCH = 500
#: Most jobs queued, scheduled or retrying before the next round is enqueued.
BACKLOG = 15_000

SCHEDULES = """
[[schedules]]
name = "tick"
task = "e2e.noop"
every = "1s"
"""


class Mix:
    """The jobs of each round: the bulk and the features, with ids counted."""

    def __init__(self) -> None:
        self.seq = itertools.count()
        self.created = 0

    def bulk(self, n: int) -> Iterator[corral.Job]:
        """``n`` jobs, mostly plain, one in ten of each special kind."""
        for _ in range(n):
            i = next(self.seq)
            kind = i % 20
            options = {"priority": i % 10, "timeout": 3600.0, "result_ttl": 1.0}
            if kind == 1:
                options["delay"] = 0.5
            elif kind == 2:
                options["run_at"] = time.time() + 1.0
            elif kind == 3:
                options["unique_key"] = f"fresh-{i}"
            elif kind == 4:
                options["unique_key"] = f"repeated-{i // 40}"  # some enqueues get the holder's id
                options["unique_for"] = 0.5
            elif kind == 5:
                options["on_success"] = J("e2e.square", 3, result_ttl=1.0)
            self.created += 1
            if kind == 6:
                yield J("e2e.flaky", 2, on_failure=J("e2e.noop"), **options)
            elif kind == 7:
                yield J("e2e.release", 1, **options)
            elif kind == 8:
                yield J("e2e.give_up", "no", on_failure=J("e2e.noop", result_ttl=1.0), **options)
            elif kind == 9:
                yield J("soak.progress", i, **options)
            else:
                yield J("e2e.noop", i, **options)


def rss_mib(broker: object) -> float:
    return broker.memory_info().rss / MIB  # type: ignore[attr-defined]


def backlog(client: corral.Client) -> int:
    queues = client.status().queues.values()
    return sum(c.get(s, 0) for c in queues for s in ("queued", "scheduled", "retrying"))


def one_round(client: corral.Client, mix: Mix, n: int) -> None:
    """One round: the bulk, then every other feature a few times."""
    ids = []
    bulk = list(mix.bulk(ROUND))
    for start in range(0, len(bulk), BATCH):
        ids += client.enqueue_many(bulk[start : start + BATCH])
    for k in range(5):  # flows
        client.enqueue_chain([J("e2e.square", k), J("e2e.sum_prev", 1), J("e2e.sum_prev", 2)])
        client.enqueue_chain([J("e2e.noop", k), J("e2e.noop", k)], result_ttl=1.0)
        client.enqueue_group(
            [J("e2e.square", k), J("e2e.square", k + 1)], callback=J("e2e.sum_prev", 0)
        )
        client.enqueue_group([J("e2e.noop", k), J("e2e.give_up", "x")], callback=J("e2e.noop"))
        mix.created += 11
    for k in range(10):  # cancelled before they run
        client.cancel(client.enqueue("e2e.noop", k, delay=60))
        mix.created += 1
    queue = f"once-{n}"  # a one-off queue no worker serves
    client.enqueue_many([J("e2e.noop", k, queue=queue) for k in range(5)])
    client.pause(queue)
    client.resume(queue)
    assert client.purge(queue) == 5
    mix.created += 5
    kept = client.enqueue_many([J("e2e.noop", k, result_ttl=60.0) for k in range(5)])
    mix.created += 5
    for job_id in [*kept, ids[0], ids[-1]]:  # result waits, then deletes
        with contextlib.suppress(corral.JobFailed, corral.JobNotFound):
            client.result(job_id, timeout=120)
        with contextlib.suppress(corral.JobNotFound):  # a 1 s result may be gone
            client.delete(job_id)


@pytest.mark.soak
def test_broker_memory_levels_off_over_a_million_jobs(
    env: Env, soak_report: Callable[[str], None]
) -> None:
    total = env_int("CORRAL_SOAK_LONG_JOBS", 1_000_000)
    readings = env_int("CORRAL_SOAK_LONG_READINGS", 20)
    broker_options = (
        'result_ttl = "1s"\nfailed_ttl = "2s"\nretry_backoff = "50ms"\nretry_backoff_max = "100ms"'
    )
    config = render_config(
        env.home,
        fsync="interval",
        heartbeat="500ms",
        liveness=6,
        processes=2,
        concurrency=2,
        prefetch=64,
        plugins='["e2e_tasks", "soak_tasks"]',
        extra_broker=broker_options,
    )
    env.config.write_text(config + SCHEDULES)
    daemon = env.start("run")
    env.wait_ready(daemon, timeout=60)
    env.wait_workers(2)
    (broker,) = broker_processes(daemon)
    client = env.client(timeout=30.0)
    mix = Mix()
    every = max(1, total // readings)
    rss: list[tuple[int, float]] = [(0, rss_mib(broker))]
    started = time.monotonic()
    n = 0
    while mix.created < total:
        wait_for(lambda: backlog(client) < BACKLOG, 300, interval=0.2, message="the backlog")
        one_round(client, mix, n)
        n += 1
        if mix.created >= len(rss) * every:
            rss.append((mix.created, rss_mib(broker)))

    def drained() -> bool:
        status = client.status()
        return not backlog(client) and status.stats.get("jobs", 0) < 1_000

    wait_for(drained, 300, interval=0.5, message="the last jobs to end and be forgotten")
    rss.append((mix.created, rss_mib(broker)))
    took = time.monotonic() - started
    stats = client.status().stats
    soak_report(
        f"{mix.created} jobs in {took:.0f}s ({mix.created / took:.0f}/s); broker RSS, MiB, "
        "by jobs created: " + ", ".join(f"{jobs // 1000}k={mib:.0f}" for jobs, mib in rss)
    )
    soak_report(
        "counters: "
        + ", ".join(
            f"{k}={stats.get(k, 0)}"
            for k in ("enqueued", "jobs_succeeded", "jobs_failed", "jobs_cancelled", "flows")
        )
    )
    assert stats.get("handler_errors", 0) == 0
    quarter = max(2, len(rss) // 4)
    early = max(mib for _, mib in rss[1:quarter])
    bound = early * 1.5 + 32
    late = [(jobs, mib) for jobs, mib in rss[quarter:] if mib > bound]
    assert not late, (
        f"the broker's RSS grew past {bound:.0f} MiB (the first quarter's highest, "
        f"{early:.0f} MiB, and half as much again plus 32): {late}"
    )
