"""Durations and sizes as people write them in config files and on the command line."""

from __future__ import annotations

import json
import math
import re
from fractions import Fraction

_DURATION_UNITS: dict[str, int] = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_NUMBER_TEXT = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_NUMBER = re.compile(rf"\s*{_NUMBER_TEXT}\s*", re.ASCII)
_DURATION_PART = re.compile(rf"\s*({_NUMBER_TEXT})\s*(ms|s|m|h|d)", re.ASCII)
_DURATION_HINT = 'expected a duration like "250ms", "1.5s", "5m", "2h", "1d" or a number of seconds'

_SIZE_UNITS: dict[str, int] = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", re.ASCII)
_SIZE_HINT = 'expected a size like "512MiB", "1GiB", "64KiB", "10MB", "100B" or a number of bytes'

# Largest first, so formatting picks the shortest exact spelling.
_FORMAT_DURATION_UNITS = (("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1))
_FORMAT_SIZE_UNITS = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


def parse_duration(value: str | int | float) -> float:
    """Return ``value`` in seconds: ``"250ms"``, ``"1.5s"``, ``"1h30m"``, or a number of seconds.

    Raises ValueError, naming the value and the accepted forms, for anything else.
    """
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {_quote(value)}: {_DURATION_HINT}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _parse_duration_text(value)
    else:
        raise ValueError(f"invalid duration {_quote(value)}: {_DURATION_HINT}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"invalid duration {_quote(value)}: must be a finite number >= 0")
    return seconds


def _parse_duration_text(text: str) -> float:
    """Parse a duration string made of one or more ``<number><unit>`` parts, or a bare number."""
    if _NUMBER.fullmatch(text):
        return float(text)
    position, seconds = 0, 0.0
    stripped = text.rstrip()
    while position < len(stripped):
        match = _DURATION_PART.match(stripped, position)
        if match is None:
            raise ValueError(f"invalid duration {_quote(text)}: {_DURATION_HINT}")
        number, unit = match.groups()
        scale = _DURATION_UNITS[unit]
        # Dividing by 1000 (rather than multiplying by 0.001) keeps "250ms" exactly 0.25.
        seconds += float(number) / 1000 if scale == 1 else float(number) * (scale // 1000)
        position = match.end()
    if position == 0:
        raise ValueError(f"invalid duration {_quote(text)}: {_DURATION_HINT}")
    return seconds


def parse_size(value: str | int) -> int:
    """Return ``value`` in bytes: ``"512MiB"``, ``"10MB"``, ``"100B"``, or a bare number of bytes.

    Binary units (KiB, MiB, GiB, TiB) are powers of 1024, decimal ones (KB, MB, GB, TB)
    powers of 1000; units are case-insensitive. Raises ValueError for anything else.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"invalid size {_quote(value)}: {_SIZE_HINT}")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.fullmatch(value)
        unit = match.group(2).lower() if match else ""
        if match is None or (unit and unit not in _SIZE_UNITS):
            raise ValueError(f"invalid size {_quote(value)}: {_SIZE_HINT}")
        size = round(Fraction(match.group(1)) * _SIZE_UNITS[unit or "b"])
    if size < 0:
        raise ValueError(f"invalid size {_quote(value)}: must be >= 0 bytes")
    return size


def format_duration(seconds: float) -> str:
    """Spell ``seconds`` as a config file would; ``parse_duration`` gives it back exactly."""
    if seconds.is_integer() and 0 < seconds <= 2**53:
        whole = int(seconds)
        for unit, scale in _FORMAT_DURATION_UNITS:
            if whole % scale == 0:
                return f"{whole // scale}{unit}"
    millis = seconds * 1000
    if not seconds.is_integer() and millis.is_integer() and float(int(millis)) / 1000 == seconds:
        return f"{int(millis)}ms"
    return f"{seconds!r}s"


def format_size(size: int) -> str:
    """Spell ``size`` with the largest binary unit that divides it exactly, e.g. ``"64MiB"``."""
    for unit, scale in _FORMAT_SIZE_UNITS:
        if size and size % scale == 0:
            return f"{size // scale}{unit}"
    return f"{size}B"


def _quote(value: object) -> str:
    """Show a value as it would appear in TOML: strings in double quotes."""
    return json.dumps(value) if isinstance(value, str) else repr(value)
