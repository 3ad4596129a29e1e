"""The supervisors the broker has heard from lately, for ``corral status``.

Each supervisor reports every second under its own id (``host/pid``), so a
restarted supervisor is a new entry: an entry not refreshed within
:data:`SUPERVISOR_STALE` seconds is dropped. Any client may send reports,
so the table also holds at most :data:`MAX_SUPERVISORS` entries: a report
from a new id past that is acknowledged but not kept, counted in
``supervisor_reports_refused``, and a warning says so, once per flood.
Pure: time comes in as ``mono`` (monotonic seconds).
"""

from __future__ import annotations

from collections import OrderedDict

import msgspec
import structlog

from corral.broker import protocol as p

log = structlog.get_logger()

#: A supervisor not heard from for this long (seconds) is forgotten.
SUPERVISOR_STALE = 15.0
#: The most supervisors the broker keeps at once.
MAX_SUPERVISORS = 1_000


class SupervisorTable:
    """supervisor id -> (its last report, when it came), oldest first."""

    def __init__(self, limit: int = MAX_SUPERVISORS, stale: float = SUPERVISOR_STALE) -> None:
        self.limit = limit
        self.stale = stale
        self._entries: OrderedDict[str, tuple[p.SupervisorInfo, float]] = OrderedDict()
        #: Reports refused since the table was last not full.
        self._refused = 0

    def __len__(self) -> int:
        return len(self._entries)

    def report(self, info: p.SupervisorInfo, mono: float) -> bool:
        """Keep ``info`` as its supervisor's latest; False if the table is
        full of others heard from lately (the report is then not kept)."""
        self.expire(mono)
        key = info.supervisor_id
        if key not in self._entries and len(self._entries) >= self.limit:
            self._refused += 1
            if self._refused == 1:
                log.warning(
                    "broker.supervisors_full",
                    supervisor=key[:200],
                    limit=self.limit,
                    hint=f"more than {self.limit} supervisors reported within "
                    f"{self.stale:g}s: reports from new ones are not kept (their workers "
                    "still run) until older ones stop; a client sending made-up "
                    "supervisor reports does this",
                )
            return False
        self._entries[key] = (info, mono)
        self._entries.move_to_end(key)
        return True

    def expire(self, mono: float) -> None:
        """Forget the supervisors not heard from within the stale window."""
        entries = self._entries
        while entries:
            key, (_, seen) = next(iter(entries.items()))
            if mono - seen < self.stale:
                break
            del entries[key]
        if self._refused and len(entries) < self.limit:
            log.info("broker.supervisors_room", refused=self._refused)
            self._refused = 0

    def current(self, mono: float) -> list[p.SupervisorInfo]:
        """The supervisors heard from lately, each with ``reported_ago``."""
        self.expire(mono)
        return [
            msgspec.structs.replace(info, reported_ago=round(mono - seen, 3))
            for info, seen in self._entries.values()
        ]
