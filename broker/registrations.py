"""The tasks' options as workers register them, in a table of bounded size.

A worker's READY lists its tasks with their options (queue, attempts,
timeout, backoff, TTL). The broker logs each new or changed one
(``TaskRegistered``), so a job enqueued without a queue goes to its task's
queue across restarts, before any worker registers again. Any worker may
send names the broker never saw, so the table is bounded: past
:data:`MAX_TASKS` names, registering a new one forgets the one registered
least recently that no connected worker serves (``TaskForgotten``, so a
replay forgets it too), and a warning says so. A worker that comes back
registers its tasks again. Time plays no part; the order of registrations
is the order the broker saw them (not logged: each forget is).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container, Sequence

import structlog

from corral.broker import protocol as p
from corral.broker.journal import Journal
from corral.broker.records import TaskForgotten, TaskOptions, TaskRegistered

log = structlog.get_logger()

#: The most task names the broker keeps options for.
MAX_TASKS = 10_000
#: The most tasks one worker may register (the rest it lists are ignored).
MAX_TASKS_PER_WORKER = MAX_TASKS
#: Forgets logged at most once per this many, in one warning each.
_LOG_EVERY = 1_000
_OPTION_FIELDS = TaskOptions.__struct_fields__


class RegisteredTasks:
    """Records registrations and forgets (through ``journal``), keeping the
    job state's ``tasks`` table within :data:`MAX_TASKS` names."""

    def __init__(self, journal: Journal, limit: int = MAX_TASKS) -> None:
        self.journal = journal
        self.table = journal.state.tasks
        self.limit = limit
        #: Task names, least recently registered first (an ordered set);
        #: filled from the table the first time it is used, so the tasks
        #: replayed from the log come first.
        self._recent: OrderedDict[str, None] | None = None
        self._forgotten = 0
        self._refused = 0

    def register(self, worker: str, tasks: Sequence[p.TaskInfo], serving: Container[str]) -> None:
        """Worker ``worker`` registered ``tasks``: log each new or changed
        one. ``serving`` holds the names connected workers serve (this
        worker's included): those are never forgotten to make room."""
        recent = self._order()
        full = False
        for task in tasks:
            # TaskInfo is a name, TaskOptions' fields, and the task's limits
            # (which dispatch keeps per connected worker: see broker/limits.py)
            options = TaskOptions(**{name: getattr(task, name) for name in _OPTION_FIELDS})
            if task.name in self.table:
                recent.move_to_end(task.name)
                if self.table[task.name] == options:
                    continue
            elif full or not self._make_room(recent, serving):
                full = True
                self._refused += 1
                if self._refused % _LOG_EVERY == 1:
                    log.warning(
                        "broker.tasks_full",
                        worker=worker,
                        task=task.name,
                        refused=self._refused,
                        limit=self.limit,
                        hint=f"connected workers serve {self.limit} task names, the most the "
                        "broker keeps options for: the options (queue, attempts, timeout) of "
                        "a task registered beyond them are not kept; serve fewer task names",
                    )
                continue
            self.journal.record(TaskRegistered(task.name, options))
            recent[task.name] = None

    def _order(self) -> OrderedDict[str, None]:
        """The names by registration, in step with the table."""
        if self._recent is None or len(self._recent) != len(self.table):
            # first use, or the table changed apart from here (a test)
            old = self._recent or OrderedDict()
            self._recent = OrderedDict((n, None) for n in old if n in self.table)
            self._recent.update(dict.fromkeys(self.table))
        return self._recent

    @staticmethod
    def _victim(recent: OrderedDict[str, None], serving: Container[str]) -> str | None:
        """The least recently registered name no connected worker serves,
        taken out of ``recent``; a served one met on the way counts as
        registered now (so each is passed over once per round)."""
        for _ in range(len(recent)):
            name, _ = recent.popitem(last=False)
            if name not in serving:
                return name
            recent[name] = None
        return None

    def _make_room(self, recent: OrderedDict[str, None], serving: Container[str]) -> bool:
        """Forget tasks until a new name fits; False if every one kept is
        served by a connected worker (the new one is then not recorded)."""
        while len(self.table) >= self.limit:
            victim = self._victim(recent, serving)
            if victim is None:
                return False
            self.journal.record(TaskForgotten(victim))
            self._forgotten += 1
            if self._forgotten % _LOG_EVERY == 1:
                log.warning(
                    "broker.tasks_forgotten",
                    task=victim,
                    forgotten=self._forgotten,
                    limit=self.limit,
                    hint=f"workers registered more than {self.limit} task names: the "
                    "options of those no connected worker serves, least recently "
                    "registered first, are forgotten (their workers register them again "
                    "when they connect); a worker that makes up task names does this",
                )
        return True
