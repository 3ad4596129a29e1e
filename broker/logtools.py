"""The offline log tools behind ``corral log verify`` and ``corral log repair``.

Both read a log directory with no broker running (the CLI holds the state
directory's lock around them) and build on a :func:`~corral.broker.logsurvey.survey`,
which finds every valid record and every damaged span. :func:`verify`
changes nothing and reports the damage, the torn tail (which the broker
cuts on its next start) and the jobs a repair would lose.

:func:`repair` keeps every valid record. It first makes a
``repair-<UTC time>`` directory in the log directory holding the original
of each segment it will change (a hard link, else a copy), each damaged
span's bytes in a side file ``<segment>.seg.<start>-<end>.damaged``, and
``repair.json`` (the report), and fsyncs them and the directory. Only then
does it rewrite each changed segment (tmp file, fsync, rename, fsync the
directory): its header rebuilt if damaged, its valid frames back to back,
in the current format. A missing segment is recreated empty, a segment of
another log is replaced by an empty one. Rewritten segments get their own
CRC seed, so a record's frame is re-checksummed whenever it moves. Sync
marks are not kept (their offsets would lie): a rewritten segment ends in
one new mark, as it is fsync'd whole.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path

import msgspec

from corral.broker import framing
from corral.broker.framing import LogError, pack_header, reseed_frames
from corral.broker.lazylog import get_logger
from corral.broker.logsurvey import SegmentPlan, Span, Survey, survey

_log = get_logger(__name__)


class Held(msgspec.Struct):
    """A record read from damaged bytes without its checksum (a best guess)."""

    type: str
    id: str | None = None


class Damage(msgspec.Struct):
    """A stretch of a segment with no valid record: ``length`` bytes from
    ``offset``. ``kind``: damaged, torn_tail, header, missing_segment,
    foreign_segment. ``side_file`` holds its bytes once repaired."""

    segment: str
    offset: int
    length: int
    reason: str
    kind: str
    held: list[Held] = []
    side_file: str | None = None


class VerifyReport(msgspec.Struct):
    segments: int
    records: int  # valid records
    ok: bool  # False only for damage: a torn tail is cut on start
    torn_tail: tuple[str, int] | None = None
    corrupt: tuple[str, int, str] | None = None  # the first damage
    damaged: list[Damage] = []
    lost_jobs: list[str] = []  # acknowledged jobs a repair would lose
    changed_jobs: list[str] = []  # jobs a later change of which is damaged


class RepairReport(msgspec.Struct):
    action: str  # "none" | "truncated_tail" | "repaired"
    records_kept: int
    bytes_dropped: int  # moved into side files
    segment: str | None = None  # where the first damage was
    offset: int | None = None
    backup: str | None = None  # the repair directory
    damaged: list[Damage] = []
    lost_jobs: list[str] = []
    changed_jobs: list[str] = []


# -- reports -----------------------------------------------------------------------


def _held(span: Span) -> list[Held]:
    out = []
    for record in span.held:
        job_id = getattr(record, "id", None)
        out.append(Held(type(record).__name__, job_id if isinstance(job_id, str) else None))
    return out


def _damage(span: Span, side_file: Path | None = None) -> Damage:
    return Damage(
        segment=str(span.path),
        offset=span.start,
        length=span.end - span.start,
        reason=span.reason,
        kind=span.kind,
        held=_held(span),
        side_file=None if side_file is None else str(side_file),
    )


def verify(directory: str | os.PathLike[str]) -> VerifyReport:
    """Check a log offline without changing anything. Raises
    :class:`~corral.broker.framing.LogError` when there is no log to check."""
    found = survey(Path(directory))
    spans = found.spans
    report = VerifyReport(
        segments=sum(plan.exists for plan in found.segments),
        records=found.records,
        ok=all(span.kind == "torn_tail" for span in spans),
        damaged=[_damage(span) for span in spans],
        lost_jobs=found.lost_jobs,
        changed_jobs=found.changed_jobs,
    )
    for span in spans:
        if span.kind == "torn_tail":
            report.torn_tail = (str(span.path), span.start)
        elif report.corrupt is None:
            report.corrupt = (str(span.path), span.start, span.reason)
    return report


# -- repairing ---------------------------------------------------------------------------


def _side_name(span: Span) -> str:
    return f"{span.path.name}.{span.start}-{span.end}.damaged"


def _write_synced(
    path: Path, data: bytes, mode: int = 0o600, owner: tuple[int, int] | None = None
) -> None:
    """Write a new file and fsync it. ``owner`` (uid, gid) is applied when
    running as root, so a repair run as root leaves segments the broker's
    user can open."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # whatever the umask
        if owner is not None and os.geteuid() == 0:
            os.fchown(fd, *owner)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _keep_original(path: Path, backup: Path) -> Path:
    """Put the segment as it is now into ``backup``: a hard link (the rewrite
    renames a new file over it, so the link keeps the old one), else a copy."""
    kept = backup / path.name
    try:
        os.link(path, kept)
    except OSError:
        shutil.copyfile(path, kept)
    _fsync_file(kept)
    return kept


def _new_repair_dir(directory: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    backup, n = directory / f"repair-{stamp}", 0
    while backup.exists():
        n += 1
        backup = directory / f"repair-{stamp}-{n}"
    framing.make_dirs(backup, 0o700)
    return backup


def _save_damage(found: Survey, backup: Path) -> list[Damage]:
    """Write each span's bytes (and each changed segment's original) into
    ``backup``, every file fsync'd; return the report's view of them."""
    damage = []
    for plan in found.segments:
        if not plan.rewrite:
            continue
        original = _keep_original(plan.path, backup) if plan.exists else None
        data = plan.path.read_bytes() if plan.exists else b""
        for span in plan.spans:
            side: Path | None = None
            if span.kind == "foreign_segment":
                side = original
            elif span.end > span.start:
                side = backup / _side_name(span)
                _write_synced(side, data[span.start : span.end])
            damage.append(_damage(span, side))
    return damage


def _rewrite(plan: SegmentPlan, generation: int) -> None:
    """Replace the segment with its header and valid frames, atomically."""
    data = plan.path.read_bytes() if plan.exists else b""
    body = bytearray()
    for start, end in plan.kept:
        body += data[start:end]
    header = pack_header(plan.header.flags, plan.seq, generation)
    seed = framing.segment_seed(framing.FORMAT_VERSION, generation, plan.seq)
    if seed != plan.seed:
        reseed_frames(body, seed)
    body += framing.pack_mark(len(header) + len(body), seed)  # all of it is fsync'd below
    like = os.stat(plan.path if plan.exists else plan.path.parent)
    mode = like.st_mode & 0o777 if plan.exists else 0o644
    tmp = plan.path.with_suffix(".tmp")
    try:
        _write_synced(tmp, header + body, mode, (like.st_uid, like.st_gid))
        os.replace(tmp, plan.path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    framing.fsync_dir(plan.path.parent)


def _first_damage(found: Survey) -> tuple[str | None, int | None]:
    spans = found.spans
    return (str(spans[0].path), spans[0].start) if spans else (None, None)


def repair(directory: str | os.PathLike[str]) -> RepairReport:
    """Move a log's damaged bytes aside and keep every valid record; see the
    module docstring. Raises :class:`~corral.broker.framing.LogError` when
    there is no log, it was written by another corral, or the repaired log
    does not verify (the originals are then in the repair directory)."""
    path = Path(directory)
    found = survey(path)
    spans = found.spans
    if not spans:
        return RepairReport("none", found.records, 0)
    backup = _new_repair_dir(path)
    segment, offset = _first_damage(found)
    report = RepairReport(
        action="truncated_tail" if all(s.kind == "torn_tail" for s in spans) else "repaired",
        records_kept=found.records,
        bytes_dropped=sum(s.end - s.start for s in spans if s.kind != "header"),
        segment=segment,
        offset=offset,
        backup=str(backup),
        damaged=_save_damage(found, backup),
        lost_jobs=found.lost_jobs,
        changed_jobs=found.changed_jobs,
    )
    _write_synced(backup / "repair.json", msgspec.json.encode(report))
    framing.fsync_dir(backup)
    for plan in found.segments:
        if plan.rewrite:
            _rewrite(plan, found.generation)
    # the history after the damage changed: no index or checkpoint is trusted
    for index in [*path.glob("*.idx"), *path.glob("*.ckpt")]:
        index.unlink(missing_ok=True)
    _log.info(
        "log.repaired",
        directory=str(path),
        backup=str(backup),
        spans=len(spans),
        lost_jobs=len(found.lost_jobs),
    )
    after = verify(path)
    if not after.ok or after.torn_tail is not None or after.records != found.records:
        raise LogError(
            f"the repaired log in {path} still does not verify ({after.corrupt}); the"
            f" originals are in {backup}"
        )
    return report
