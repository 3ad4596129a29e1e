"""The corral plugin of the example: the task corral's workers run.

Put ``jobs_api.tasks`` in a pool's ``plugins`` (and this directory in
``python_path``). The web app imports it too, to enqueue by function.
"""

from __future__ import annotations

import corral


@corral.task(name="api.total", max_attempts=3)
def total(ctx: corral.JobContext, numbers: list[int]) -> int:
    """The sum of a list of integers (a payload of another shape fails the
    job, naming the field, and is not retried)."""
    ctx.log.info("adding", count=len(numbers))
    return sum(numbers)
