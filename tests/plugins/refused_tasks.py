"""A plugin whose workers send a READY the broker cannot decode (a task
timeout of NaN, past @corral.task's own checks): a worker of an
incompatible build, as the broker sees it. For tests/test_refused.py."""

from __future__ import annotations

import msgspec

import corral
from corral.workers import runtime


@corral.task(name="refused.noop")
def noop(ctx: corral.JobContext) -> None:
    return None


def _bad_infos(registry: object) -> list[object]:
    infos = _good_infos(registry)  # type: ignore[arg-type]
    return [msgspec.structs.replace(infos[0], timeout=float("nan")), *infos[1:]]


_good_infos = runtime.task_infos
runtime.task_infos = _bad_infos  # type: ignore[assignment]
