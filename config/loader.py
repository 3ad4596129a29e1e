"""Read a TOML config file into a ``Config``, with errors that name the file and the key's path.

Loading runs in three steps: TOML to plain data, durations and sizes to numbers (guided
by the schema's ``unit`` markers), then ``msgspec.convert`` and the cross-field checks.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import re
import tomllib
from typing import Any, cast

import msgspec
import msgspec.inspect as mi

from corral.errors import ConfigError

from .checks import Problem, check
from .schema import DURATION, Config
from .units import format_duration, format_size, parse_duration, parse_size

KeyPath = tuple[str | int, ...]

_MSGSPEC_ERROR = re.compile(r"^(?P<message>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_PATH_PART = re.compile(r"\.([^.\[]+)|\[(\d+|\.\.\.)\]")
_TOML_POSITION = re.compile(r"^(?P<message>.*) \(at line (?P<line>\d+), column (?P<column>\d+)\)$")
_END_OF_DOCUMENT = " (at end of document)"
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate the config file at ``path``; raise ConfigError naming what is wrong."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        raise ConfigError(f"config file {source} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {source} is a directory, not a file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {source}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text (bad byte at offset {exc.start})") from None
    return loads(text, source=source)


def loads(text: str, source: str = "<string>") -> Config:
    """Validate TOML ``text`` as a config; ``source`` names it in ConfigError messages."""
    raw = _parse_toml(text, source)
    schema = _schema()
    problems: list[Problem] = []
    data = _convert_units(schema, raw, (), problems)
    if problems:
        raise _config_error(source, problems)
    try:
        config = msgspec.convert(data, Config)
    except msgspec.ValidationError as exc:
        raise _config_error(source, [_explain(str(exc), schema, raw)]) from None
    problems = check(config)
    if problems:
        raise _config_error(source, problems)
    return config


def _parse_toml(text: str, source: str) -> dict[str, Any]:
    """Parse TOML, turning a syntax error into one that names the file, line and column."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        detail = str(exc)
    except RecursionError:  # tomllib recurses per level of an array or inline table
        raise ConfigError(
            f"{source}: a value nested too deeply to read (arrays or inline tables"
            " inside each other, hundreds deep)"
        ) from None
    if detail.endswith(_END_OF_DOCUMENT):
        lines = text.split("\n")
        where = f"line {len(lines)}, column {len(lines[-1]) + 1} (end of file)"
        detail = detail.removesuffix(_END_OF_DOCUMENT)
    elif match := _TOML_POSITION.match(detail):
        where = f"line {match['line']}, column {match['column']}"
        detail = match["message"]
    else:
        raise ConfigError(f"{source}: invalid TOML: {detail}")
    raise ConfigError(f"{source}: {where}: invalid TOML: {detail}")


def _config_error(source: str, problems: list[Problem]) -> ConfigError:
    """One ConfigError listing every problem, one ``file: key: message`` line each."""
    return ConfigError("\n".join(f"{source}: {path}: {message}" for path, message in problems))


@functools.cache
def _schema() -> mi.StructType:
    """The schema of ``Config`` as msgspec sees it; computed on first use."""
    return cast(mi.StructType, mi.type_info(Config))


def _convert_units(kind: mi.Type, value: Any, path: KeyPath, problems: list[Problem]) -> Any:
    """Return ``value`` with every duration and size parsed to a number, noting bad ones."""
    match kind:
        case mi.Metadata(extra={"unit": unit}):
            parse = parse_duration if unit == DURATION else parse_size
            try:
                return parse(value)
            except ValueError:
                problems.append((_format_path(path), _expected(kind, value, bounds=False)))
                return value
        case mi.UnionType(types=members) if value is not None:
            units = [member for member in members if _unit_of(member)]
            return _convert_units(units[0], value, path, problems) if units else value
        case mi.StructType(fields=fields) if isinstance(value, dict):
            converted = dict(value)
            for field in fields:
                if field.encode_name in value:
                    key = field.encode_name
                    converted[key] = _convert_units(field.type, value[key], (*path, key), problems)
            return converted
        case mi.ListType(item_type=item) if isinstance(value, list):
            return [
                _convert_units(item, element, (*path, index), problems)
                for index, element in enumerate(value)
            ]
    return value


def _explain(error: str, schema: mi.StructType, raw: dict[str, Any]) -> Problem:
    """Turn a msgspec validation message into a key path and a sentence about that key."""
    match = _MSGSPEC_ERROR.match(error)
    message, path_text = (match["message"], match["path"] or "") if match else (error, "")
    path, kind, value = _resolve(schema, raw, _split_path(path_text))
    if field := _backquoted(message, "Object contains unknown field"):
        table = _strip(kind)
        known = [f.encode_name for f in table.fields] if isinstance(table, mi.StructType) else []
        return _format_path((*path, field)), _unknown_key(field, known)
    if field := _backquoted(message, "Object missing required field"):
        return _format_path((*path, field)), "required key is missing"
    if message.startswith(("Expected", "Invalid enum value")):
        return _format_path(path), _expected(kind, value, bounds=True, key=path[-1:])
    return _format_path(path), message[:1].lower() + message[1:]


def _split_path(text: str) -> list[str | int]:
    """Split msgspec's ``.pools[1].max_memory`` into ``["pools", 1, "max_memory"]``."""
    parts: list[str | int] = []
    for key, index in _PATH_PART.findall(text):
        parts.append(key if key else (int(index) if index.isdigit() else index))
    return parts


def _resolve(schema: mi.Type, raw: Any, parts: list[str | int]) -> tuple[KeyPath, mi.Type, Any]:
    """Follow ``parts`` through the schema and the raw data at once, naming hidden dict keys."""
    kind, value = schema, raw
    path: KeyPath = ()
    for part in parts:
        kind = _strip(kind)
        if isinstance(kind, mi.StructType):
            field = next((f for f in kind.fields if f.encode_name == part), None)
            kind = field.type if field else mi.AnyType()
        elif isinstance(kind, mi.ListType):
            kind = kind.item_type
        elif isinstance(kind, mi.DictType):
            kind = kind.value_type
            if part == "...":  # msgspec does not say which key; find the value that fails
                bad = _bad_key(kind, value)
                if bad is None:
                    return path, kind, value
                part = bad
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError):
            value = None
        path = (*path, part)
    return path, kind, value


def _strip(kind: mi.Type) -> mi.Type:
    """The type under any metadata, and the non-None member of an optional."""
    if isinstance(kind, mi.Metadata):
        return _strip(kind.type)
    if isinstance(kind, mi.UnionType):
        members = [m for m in kind.types if not isinstance(m, mi.NoneType)]
        return _strip(members[0]) if len(members) == 1 else kind
    return kind


def _bad_key(kind: mi.Type, table: Any) -> str | None:
    """The first key of ``table`` whose value does not fit ``kind``, if one can be found."""
    if isinstance(table, dict):
        for key, value in table.items():
            if not _fits(kind, value):
                return str(key)
    return None


def _fits(kind: mi.Type, value: Any) -> bool:
    """Whether a scalar ``value`` would pass as ``kind`` (enough to find a bad dict value)."""
    kind = _strip(kind)
    if isinstance(kind, mi.IntType):
        if isinstance(value, bool) or not isinstance(value, int):
            return False
        return not (
            (kind.ge is not None and value < kind.ge)
            or (kind.gt is not None and value <= kind.gt)
            or (kind.le is not None and value > kind.le)
            or (kind.lt is not None and value >= kind.lt)
        )
    if isinstance(kind, mi.StrType):
        return isinstance(value, str)
    return True


def _backquoted(message: str, prefix: str) -> str | None:
    """The name in backquotes after ``prefix`` in a msgspec message, if the message has it."""
    if not message.startswith(prefix):
        return None
    start = message.find("`")
    end = message.find("`", start + 1)
    return message[start + 1 : end] if 0 <= start < end else None


def _unknown_key(key: str, known: list[str]) -> str:
    """Say a key is unknown, suggest the closest known one, and list them all."""
    close = difflib.get_close_matches(key, known, n=1)
    hint = f'did you mean "{close[0]}"? ' if close else ""
    return f"unknown key ({hint}known keys: {', '.join(sorted(known))})"


def _expected(kind: mi.Type, value: Any, *, bounds: bool, key: KeyPath = ()) -> str:
    """``expected <what the schema wants>, got <the value>``."""
    return f"expected {_describe(kind, bounds=bounds, key=key)}, got {_show(value)}"


def _describe(kind: mi.Type, *, bounds: bool = True, key: KeyPath = ()) -> str:
    """Say in words what values ``kind`` accepts, the way a TOML author would write them."""
    match kind:
        case mi.Metadata():
            return _describe_metadata(kind, bounds=bounds, key=key)
        case mi.UnionType(types=members):
            shown = [m for m in members if not isinstance(m, mi.NoneType)]
            return " or ".join(_describe(m, bounds=bounds, key=key) for m in shown)
        case mi.ListType():
            return _describe_list(kind, key=key)
        case mi.StructType() | mi.DictType():
            return "a table"
    return _describe_scalar(kind, bounds=bounds)


def _describe_metadata(kind: mi.Metadata, *, bounds: bool, key: KeyPath) -> str:
    """A duration or size field, a field with its own description, or the type underneath."""
    match kind:
        case mi.Metadata(extra={"unit": unit}, type=inner):
            return _describe_unit(unit, inner, kind.extra or {}, bounds=bounds)
        case mi.Metadata(extra_json_schema={"description": str(description)}):
            return description
    return _describe(kind.type, bounds=bounds, key=key)


def _describe_unit(unit: str, inner: Any, extra: dict[str, Any], *, bounds: bool) -> str:
    """A duration or size field, with its bounds (and why)."""
    sample = 'a duration like "1s"' if unit == DURATION else 'a size like "512MiB"'
    if not bounds:
        return sample
    show = format_duration if unit == DURATION else format_size
    low, high = getattr(inner, "ge", None), getattr(inner, "le", None)
    parts = []
    if getattr(inner, "gt", None) == 0:
        parts.append("greater than zero")
    elif low:
        parts.append(f"at least {show(low)}")
    if high is not None:
        parts.append(f"at most {show(high)}")
    why = extra.get("why")
    text = f"{sample} ({', '.join(parts)})" if parts else sample
    return f"{text}: {why}" if why and parts else text


def _describe_list(kind: mi.ListType, *, key: KeyPath) -> str:
    """An array of tables (named by its section), of strings, or of anything."""
    if isinstance(kind.item_type, mi.StructType):
        section = f"[[{key[0]}]]" if key and isinstance(key[0], str) else "[[...]]"
        return f"an array of tables (write one {section} section per entry)"
    noun = "an array of strings" if isinstance(_strip(kind.item_type), mi.StrType) else "an array"
    return f"a non-empty {noun[3:]}" if kind.min_length else noun


def _describe_scalar(kind: mi.Type, *, bounds: bool) -> str:
    """A literal choice, a number with its bounds, a string or a boolean."""
    match kind:
        case mi.LiteralType(values=values):
            return "one of " + ", ".join(_show(v) for v in values)
        case mi.IntType() | mi.FloatType():
            noun = "an integer" if isinstance(kind, mi.IntType) else "a number"
            return noun + "".join(_bounds(kind)) if bounds else noun
        case mi.StrType(min_length=1):
            return "a non-empty string"
        case mi.StrType():
            return "a string"
        case mi.BoolType():
            return "true or false"
    return "a different value"


def _bounds(kind: mi.IntType | mi.FloatType) -> list[str]:
    """The numeric bounds of ``kind`` as `` >= 0`` style phrases."""
    pairs = ((">", kind.gt), (">=", kind.ge), ("<", kind.lt), ("<=", kind.le))
    return [f" {op} {limit}" for op, limit in pairs if limit is not None]


def _show(value: Any) -> str:
    """Show a value from the file the way TOML would spell it, shortened if long."""
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float | list):
        text = json.dumps(value, default=str, ensure_ascii=False)
    else:
        text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _unit_of(kind: mi.Type) -> str | None:
    """The ``unit`` marker on ``kind`` (duration or size), if it has one."""
    if isinstance(kind, mi.Metadata) and kind.extra:
        unit = kind.extra.get("unit")
        return unit if isinstance(unit, str) else None
    return None


def _format_path(path: KeyPath) -> str:
    """Spell a key path as ``pools[1].max_memory``; odd keys are quoted as TOML would."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            key = part if _BARE_KEY.match(part) else json.dumps(part)
            text += f".{key}" if text else key
    return text or "(top level)"
