"""How the ``corral`` command reads what people type: durations and times
the way the config writes them, payloads from an argument, stdin or a file,
and numbers in the range the broker takes.

Each ``*_arg`` function is an argparse ``type=``: it returns the value or
raises ``argparse.ArgumentTypeError`` with a one-line reason, which argparse
prints with the option's name (exit code 2).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from corral.config.units import parse_duration

#: The range of a job's priority (the broker keeps it as an int32).
PRIORITY_MIN, PRIORITY_MAX = -(2**31), 2**31 - 1
#: The most a payload argument, file or stdin may hold (bytes); the broker's
#: own limit (``max_message_size``) is checked when the job is sent.
MAX_PAYLOAD_TEXT = 64 * 2**20


def duration_arg(text: str) -> float:
    """Seconds, from ``"250ms"``, ``"1.5s"``, ``"5m"``, ``"1h30m"``, ``"2d"``
    or a plain number of seconds (the config's duration syntax)."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_duration_arg(text: str) -> float:
    """A duration (see :func:`duration_arg`) above 0: for a wait or a
    refresh period, where 0 would mean no wait at all or a busy loop."""
    seconds = duration_arg(text)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: must be above 0")
    return seconds


def moment_arg(text: str) -> float:
    """Epoch seconds, from an ISO 8601 time (``2030-01-01T09:00:00Z``,
    ``2030-01-01 09:00+02:00``; a time without a zone is UTC) or plain
    epoch seconds."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = _iso_seconds(text)
    if not math.isfinite(seconds) or seconds < 0:
        raise argparse.ArgumentTypeError(f"invalid time {text!r}: must be after 1970")
    return seconds


def expires_arg(text: str) -> float | datetime:
    """An ``expires``: seconds from a duration (``"30s"``, ``"5m"``, or a
    plain number of seconds: the config's syntax), or an ISO 8601 time as
    ``--run-at`` reads it (a time without a zone is UTC), as an aware
    datetime. Epoch seconds are not taken here: a plain number is a
    duration."""
    try:
        return parse_duration(text)
    except ValueError:
        pass
    try:
        return datetime.fromtimestamp(_iso_seconds(text), UTC)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"invalid expiry {text!r}: expected a duration like 30s, 5m or 2h, or an "
            "ISO 8601 time like 2030-01-01T09:00:00Z"
        ) from None


def _iso_seconds(text: str) -> float:
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid time {text!r}: expected ISO 8601 like 2030-01-01T09:00:00Z "
            "or epoch seconds like 1893488400"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


#: The largest count the broker takes (attempts, retries, a page: 32 bits).
COUNT_MAX = 2**32 - 1


def _whole(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid number {text!r}: expected {least} to {COUNT_MAX}"
        ) from None
    if not least <= value <= COUNT_MAX:
        raise argparse.ArgumentTypeError(f"{text} is out of range: expected {least} to {COUNT_MAX}")
    return value


def count_arg(text: str) -> int:
    """A whole number from 1 to :data:`COUNT_MAX` (a page size, a count)."""
    return _whole(text, 1)


def retries_arg(text: str) -> int:
    """A whole number from 0 to :data:`COUNT_MAX` (``--max-retries``)."""
    return _whole(text, 0)


def priority_arg(text: str) -> int:
    """A priority: a whole number from -2**31 to 2**31 - 1 (higher runs first)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid priority {text!r}: expected a whole number"
        ) from None
    if not PRIORITY_MIN <= value <= PRIORITY_MAX:
        raise argparse.ArgumentTypeError(
            f"priority {text} is out of range: expected {PRIORITY_MIN} to {PRIORITY_MAX}"
        )
    return value


class HeaderAction(argparse.Action):
    """``--header KEY=VALUE``, repeatable: the job's headers, as a dict
    (None when not given); a later KEY wins."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        key, sep, value = str(values).partition("=")
        if not sep or not key:
            raise argparse.ArgumentError(self, f"expected KEY=VALUE, got {values!r}")
        headers = dict(getattr(namespace, self.dest, None) or {})
        headers[key] = value
        setattr(namespace, self.dest, headers)


def read_text(source: str, what: str) -> str:
    """The text of an argument: ``-`` reads stdin, ``@FILE`` reads FILE
    (UTF-8), anything else is the text itself. Raises ValueError naming
    ``what`` and the source when it cannot be read or is over
    :data:`MAX_PAYLOAD_TEXT` bytes."""
    if source == "-":
        data = sys.stdin.buffer.read(MAX_PAYLOAD_TEXT + 1)
        origin = "stdin"
    elif source.startswith("@"):
        path = Path(source[1:])
        origin = str(path)
        try:
            with path.open("rb") as handle:
                data = handle.read(MAX_PAYLOAD_TEXT + 1)
        except OSError as exc:
            raise ValueError(f"{what}: cannot read {origin}: {exc.strerror or exc}") from None
    else:
        return source
    if len(data) > MAX_PAYLOAD_TEXT:
        raise ValueError(f"{what}: {origin} holds more than {MAX_PAYLOAD_TEXT} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{what}: {origin} is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None


def json_arg(source: str, what: str) -> Any:
    """The JSON value of an argument (``-``: stdin, ``@FILE``: a file; see
    :func:`read_text`). Raises ValueError naming ``what``, with the
    position of a syntax error."""
    text = read_text(source, what)
    if source == "-":
        what = f"{what} (stdin)"
    elif source.startswith("@"):
        what = f"{what} ({source[1:]})"
    return json_text(text, what)


def json_text(text: str, what: str) -> Any:
    """The JSON value of ``text``; ValueError naming ``what`` for bad JSON
    (with the position) or JSON nested too deeply to read."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise ValueError(f"{what}: JSON nested too deeply to read") from None
