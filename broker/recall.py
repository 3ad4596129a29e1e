"""The starts an earlier broker made, for the rate windows of a new one.

A rate (``@corral.task(rate=, key_rate=)``) counts the starts of the last
period; the live broker keeps them in memory (:mod:`corral.broker.limits`).
After a restart the log still says when each try started (``Started``,
kept through compaction in the jobs' tries), so the first time a task
declares a rate the new broker reads them back from the job state: a
restart lets no burst through. A job that a worker held unstarted when the
broker stopped counts as started at the restart (its delivery counted in
the old broker's window). What the state no longer holds cannot count: a
job deleted, or one whose result expired (``result_ttl``), within the
period. Pure: wall times in, wall times out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from corral.broker.job import Job, touched
from corral.broker.tasklimits import Rate, TaskLimits

#: Recalled starts: per task, and per (task, limit key), on the monotonic
#: clock, oldest first.
Windows = tuple[dict[str, list[float]], dict[tuple[str, str], list[float]]]


def recall(
    jobs: Iterable[Job], limits: Mapping[str, TaskLimits], since: float, now: float, mono: float
) -> Windows:
    """The starts before ``since`` (when this broker started, epoch
    seconds) of the jobs of each task in ``limits`` that its rates' windows
    still hold at ``now``: the newest N of a rate of N per period, per task
    (``rate``) and per key (``key_rate``), each at ``mono - (now - t)`` on
    the monotonic clock (``now`` and ``mono`` being this moment). A task
    whose windows all began after ``since`` costs nothing."""
    horizons = {}
    for name, lim in limits.items():
        rates = [rate for rate in (lim.rate, lim.key_rate) if rate is not None]
        if rates and now - max(period for _, period in rates) < since:
            horizons[name] = now - max(period for _, period in rates)
    if not horizons:
        return {}, {}
    per_task, per_key = started_before(jobs, horizons, since)
    tasks = {}
    for task, times in per_task.items():
        rate = limits[task].rate
        if rate is not None and (recent := _newest(times, rate, now, mono)):
            tasks[task] = recent
    keys = {}
    for (task, key), times in per_key.items():
        rate = limits[task].key_rate
        if rate is not None and (recent := _newest(times, rate, now, mono)):
            keys[task, key] = recent
    return tasks, keys


def _newest(times: list[float], rate: Rate, now: float, mono: float) -> list[float]:
    """The newest ``count`` of ``times`` (epoch seconds) within ``rate``'s
    period before ``now``, oldest first, on the monotonic clock."""
    count, period = rate
    recent = sorted(t for t in times if t > now - period)[-count:]
    return [mono - (now - t) for t in recent]


def started_before(
    jobs: Iterable[Job], horizons: Mapping[str, float], since: float
) -> tuple[dict[str, list[float]], dict[tuple[str, str], list[float]]]:
    """The start times (epoch seconds) of the jobs of each task in
    ``horizons`` that fall in ``[horizon, since)``, per task and per (task,
    limit key), unsorted; a job held unstarted counts as started at
    ``since``."""
    per_task: dict[str, list[float]] = {}
    per_key: dict[tuple[str, str], list[float]] = {}
    for job in touched(jobs):  # a pristine job never started
        horizon = horizons.get(job.task)
        if horizon is None:
            continue
        times = [t.started_at for t in job.tries if horizon <= t.started_at < since]
        if job.reserved:  # held unstarted at the restart: delivered before it
            times.append(since)
        if not times:
            continue
        per_task.setdefault(job.task, []).extend(times)
        key = job.limit_key
        if key is not None:
            per_key.setdefault((job.task, key), []).extend(times)
    return per_task, per_key
