"""The offline log tools behind ``corral log verify`` and ``corral log repair``.

Both read a log directory with no broker running. :func:`verify` changes
nothing and reports the segments, the records, a torn tail (which the broker
cuts on its next start) and the first corruption. :func:`repair` cuts a torn
tail, or cuts the log at its first corrupt record, moving what it drops into
a ``backup-<UTC time>`` directory beside the segments.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec

from corral.broker.framing import (
    HEADER_SIZE,
    LogCorrupt,
    LogError,
    Scan,
    content_end,
    fsync_dir,
    list_segments,
    plan_segments,
)
from corral.broker.lazylog import get_logger

_log = get_logger(__name__)


class VerifyReport(msgspec.Struct):
    segments: int
    records: int
    ok: bool  # False only for corruption: a torn tail is cut on start
    torn_tail: tuple[str, int] | None = None
    corrupt: tuple[str, int, str] | None = None


class RepairReport(msgspec.Struct):
    action: str  # "none" | "truncated_tail" | "cut"
    records_kept: int
    bytes_dropped: int
    segment: str | None = None
    offset: int | None = None
    backup: str | None = None


# -- checking and cutting ---------------------------------------------------


@dataclass
class _Analysis:
    segments: list[tuple[int, Path]]
    records: int = 0
    torn: tuple[Path, int, int] | None = None  # segment, offset, stop
    corrupt: LogCorrupt | None = None
    corrupt_stop: int = 0


def _analyze(directory: Path) -> _Analysis:
    if not directory.is_dir():
        raise LogError(f"no log directory at {directory}")
    try:
        live, _, _ = plan_segments(directory)
    except LogCorrupt as exc:
        return _Analysis(list_segments(directory), corrupt=exc)
    result = _Analysis(live)
    for i, (_, path) in enumerate(live):
        scan = Scan(path, path.read_bytes())
        for _ in scan:
            pass
        result.records += scan.records
        problem = scan.problem(last=i == len(live) - 1)
        if problem is not None:
            result.corrupt, result.corrupt_stop = problem, scan.stop
            break
        if scan.reason is not None:
            result.torn = (path, scan.pos, scan.stop)
    return result


def verify(directory: str | os.PathLike[str]) -> VerifyReport:
    """Check a log offline without changing anything."""
    a = _analyze(Path(directory))
    report = VerifyReport(segments=len(a.segments), records=a.records, ok=a.corrupt is None)
    if a.torn is not None:
        report.torn_tail = (str(a.torn[0]), a.torn[1])
    if a.corrupt is not None:
        report.corrupt = (str(a.corrupt.segment), a.corrupt.offset, a.corrupt.reason)
    return report


def _truncate_file(path: Path, size: int) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def _new_backup_dir(directory: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    backup = directory / f"backup-{stamp}"
    n = 0
    while backup.exists():
        n += 1
        backup = directory / f"backup-{stamp}-{n}"
    backup.mkdir()
    return backup


def _cut(directory: Path, a: _Analysis) -> RepairReport:
    assert a.corrupt is not None
    seg, offset = a.corrupt.segment, a.corrupt.offset
    backup = _new_backup_dir(directory)
    cut_seq = int(seg.name.split(".")[0])
    dropped = 0
    for seq, path in list_segments(directory):
        if seq < cut_seq or (seq == cut_seq and offset >= HEADER_SIZE):
            continue
        dropped += content_end(path.read_bytes())
        os.replace(path, backup / path.name)
    if offset >= HEADER_SIZE:
        shutil.copy2(seg, backup / seg.name)
        dropped += a.corrupt_stop - offset
        _truncate_file(seg, offset)
    fsync_dir(backup)
    fsync_dir(directory)
    kept = _analyze(directory).records
    _log.warning("log.repaired", segment=str(seg), offset=offset, backup=str(backup))
    return RepairReport("cut", kept, dropped, str(seg), offset, str(backup))


def repair(directory: str | os.PathLike[str]) -> RepairReport:
    """Cut a corrupt log at its first bad record (keeping a backup) or cut a torn tail."""
    path = Path(directory)
    a = _analyze(path)
    if a.corrupt is not None:
        return _cut(path, a)
    if a.torn is not None:
        seg, offset, stop = a.torn
        _truncate_file(seg, offset)
        return RepairReport("truncated_tail", a.records, stop - offset, str(seg), offset)
    return RepairReport("none", a.records, 0)
