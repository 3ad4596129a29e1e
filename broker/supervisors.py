"""The supervisors the broker has heard from lately, for ``corral status``.

Each supervisor reports every second under its own id (``host/pid``), so a
restarted supervisor is a new entry: an entry not refreshed within
:data:`SUPERVISOR_STALE` seconds is dropped. Any client may send reports,
so the table is bounded twice: at most :data:`MAX_SUPERVISORS` entries and
:data:`MAX_TABLE_BYTES` of reports (msgpack-encoded), and no report over
:data:`MAX_REPORT_BYTES` is kept. A report past a bound is acknowledged
but not kept, counted in ``supervisor_reports_refused``, and a warning
says so, once per flood. Pure: time comes in as ``mono`` (monotonic
seconds).
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
#: The largest report kept, in bytes (msgpack): a supervisor of 1,000
#: worker processes reports about 80 KiB.
MAX_REPORT_BYTES = 256 * 1024
#: The most bytes of reports kept at once, all supervisors together: every
#: status reply carries them all, and a status of 4 MiB costs ~20 ms to
#: encode, which a flood of status requests pays once per pass.
MAX_TABLE_BYTES = 1024 * 1024


class SupervisorTable:
    """supervisor id -> (its last report, when it came, its size), oldest first."""

    def __init__(
        self,
        limit: int = MAX_SUPERVISORS,
        stale: float = SUPERVISOR_STALE,
        *,
        max_bytes: int = MAX_TABLE_BYTES,
        max_report: int = MAX_REPORT_BYTES,
    ) -> None:
        self.limit = limit
        self.stale = stale
        self.max_bytes = max_bytes
        self.max_report = max_report
        self._entries: OrderedDict[str, tuple[p.SupervisorInfo, float, int]] = OrderedDict()
        #: The sizes of the reports kept, summed (bytes).
        self.size = 0
        #: Reports refused since the table was last not full, and when the
        #: last warning said so (at most one per stale window: a table at
        #: its bound has room again each time an entry goes stale).
        self._refused = 0
        self._warned_at = -stale
        #: A warning was given and its "room again" not yet.
        self._announced = False

    def __len__(self) -> int:
        return len(self._entries)

    def report(self, info: p.SupervisorInfo, mono: float) -> bool:
        """Keep ``info`` as its supervisor's latest; False if the table is
        full of others heard from lately (the report is then not kept)."""
        self.expire(mono)
        key = info.supervisor_id
        size = len(msgspec.msgpack.encode(info))
        old = self._entries.get(key)
        kept = self.size - (old[2] if old is not None else 0)
        if (
            (old is None and len(self._entries) >= self.limit)
            or size > self.max_report
            or kept + size > self.max_bytes
        ):
            self._refuse(key, size, mono)
            return False
        self._entries[key] = (info, mono, size)
        self._entries.move_to_end(key)
        self.size = kept + size
        return True

    def _refuse(self, key: str, size: int, mono: float) -> None:
        self._refused += 1
        if self._refused == 1 and mono - self._warned_at >= self.stale:
            self._warned_at = mono
            self._announced = True
            log.warning(
                "broker.supervisors_full",
                supervisor=key[:200],
                report_bytes=size,
                limit=self.limit,
                hint=f"reports are kept from at most {self.limit} supervisors heard from "
                f"within {self.stale:g}s, {self.max_report} bytes each and "
                f"{self.max_bytes} bytes in all: this one is not kept (its workers still "
                "run) until older ones stop; a client sending made-up supervisor "
                "reports does this",
            )

    def expire(self, mono: float) -> None:
        """Forget the supervisors not heard from within the stale window."""
        entries = self._entries
        while entries:
            key, (_, seen, size) = next(iter(entries.items()))
            if mono - seen < self.stale:
                break
            del entries[key]
            self.size -= size
        if self._refused and len(entries) < self.limit and self.size < self.max_bytes:
            if self._announced:
                log.info("broker.supervisors_room", refused=self._refused)
                self._announced = False
            self._refused = 0

    def current(self, mono: float) -> list[p.SupervisorInfo]:
        """The supervisors heard from lately, each with ``reported_ago``."""
        self.expire(mono)
        return [
            msgspec.structs.replace(info, reported_ago=round(mono - seen, 3))
            for info, seen, _ in self._entries.values()
        ]
