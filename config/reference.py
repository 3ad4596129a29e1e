"""The configuration reference, docs/CONFIG.md, written from the schema.

Each field of :mod:`corral.config.schema` is described by the ``#:``
comment lines just above it (the convention Sphinx's autodoc reads), and
each section by its class docstring; the type, default, units and allowed
values come from the schema itself (``msgspec.inspect``). So the reference
cannot drift from the schema: ``tests/test_config_reference.py`` writes it
again and compares it with the committed file.

``make docs`` runs ``python -m corral.config.reference docs/CONFIG.md``;
``--check`` only compares (exit 1 when the file differs).
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import msgspec
import msgspec.inspect as mi

from . import schema
from .schema import DURATION, Config
from .units import format_duration, format_size

#: What to run when docs/CONFIG.md is out of date.
REGENERATE = "make docs"

_HEADER = """\
# Configuration reference

<!-- Written from config/schema.py by `make docs` (python -m corral.config.reference
docs/CONFIG.md); edit the schema's comments, not this file. -->

corral reads one TOML file: the one named by `-c FILE`, else `$CORRAL_CONFIG`, else
`./corral.toml`, else `/etc/corral/corral.toml` (else every key takes its default).
`corral check-config -c FILE` validates it: an unknown key, a wrong type or a bad value is
an error naming its path (`pools[1].max_memory: expected a size like "512MiB"`). Examples:
`config/corral.toml` (one host), `config/system.toml` (under systemd),
`config/broker-host.toml` and `config/worker-host.toml` (workers on other hosts: see
[MANY-HOSTS.md](MANY-HOSTS.md)).

Durations are strings like `"250ms"`, `"1.5s"`, `"5m"`, `"2h"`, `"1d"` or `"1h30m"`, or a
number of seconds. Sizes are strings like `"512MiB"`, `"64KiB"`, `"10MB"` or `"100B"`, or a
number of bytes (KiB, MiB, GiB and TiB are powers of 1024; KB, MB, GB and TB powers of
1000). Relative paths, `ipc://` endpoints included, are relative to the current directory.
*unset* means the key is left out; its description says what that means.
"""

_DOUBLE_BACKQUOTE = re.compile(r"``(.+?)``")


# ---------------------------------------------------------------- descriptions


def field_descriptions(source: str | None = None) -> dict[str, dict[str, str]]:
    """``{class name: {field name: description}}`` for every class in
    ``source`` (default: the schema module's): each field's ``#:`` comment
    lines, joined into one line."""
    source = inspect.getsource(schema) if source is None else source
    lines = source.splitlines()
    found: dict[str, dict[str, str]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = found.setdefault(node.name, {})
        for item in node.body:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                text = _comment_above(lines, item.lineno - 1)
                if text:
                    fields[item.target.id] = text
    return found


def _comment_above(lines: list[str], index: int) -> str:
    """The ``#:`` lines right above line ``index`` (0-based), as one line."""
    parts: list[str] = []
    while index > 0 and lines[index - 1].strip().startswith("#:"):
        index -= 1
        parts.insert(0, lines[index].strip()[2:].strip())
    return " ".join(part for part in parts if part)


def sections() -> list[tuple[str, mi.StructType, str]]:
    """Every section of the file, in schema order: (heading, struct, key
    prefix); the top-level keys first, under the heading "Top-level keys"."""
    top = _struct(Config)
    found = [("Top-level keys", top, "")]
    for field in top.fields:
        kind = _section_struct(field.type)
        if kind is not None:
            many = isinstance(field.type, mi.ListType)
            name = field.encode_name
            found.append((f"[[{name}]]" if many else f"[{name}]", kind, f"{name}."))
    return found


def missing_descriptions() -> list[str]:
    """The keys (``broker.state_dir``) with no description, and the
    sections whose class has no docstring; [] when all have one."""
    described = field_descriptions()
    missing = []
    for heading, kind, prefix in sections():
        if prefix and not kind.cls.__doc__:
            missing.append(f"{heading} (class {kind.cls.__name__} has no docstring)")
        for field in _keys(kind):
            if field.name not in described.get(kind.cls.__name__, {}):
                missing.append(f"{prefix}{field.encode_name} ({kind.cls.__name__}.{field.name})")
    return missing


# -------------------------------------------------------------------- render


def render() -> str:
    """The whole reference, as Markdown."""
    described = field_descriptions()
    parts = [_HEADER]
    for heading, kind, prefix in sections():
        parts.append(f"## {heading}\n")
        if prefix:
            parts.append(_paragraphs(kind.cls.__doc__ or "") + "\n")
        parts.append("| key | type | default | description |\n|---|---|---|---|")
        texts = described.get(kind.cls.__name__, {})
        for field in _keys(kind):
            cells = (
                f"`{field.encode_name}`",
                type_text(field.type),
                default_text(field),
                _markdown(texts.get(field.name, "")),
            )
            parts.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
        parts.append("")
    return "\n".join(parts)


def type_text(kind: mi.Type) -> str:
    """What a key takes, in words: ``duration > 0``, ``integer ≥ 1``,
    ``one of `"a"`, `"b"```, ``array of strings``, ..."""
    match kind:
        case mi.Metadata():
            return _metadata_text(kind)
        case mi.UnionType(types=members):
            shown = [m for m in members if not isinstance(m, mi.NoneType)]
            return " or ".join(type_text(m) for m in shown)
        case mi.ListType(item_type=item, min_length=least):
            return ("non-empty " if least else "") + "array of " + _plural(item)
        case mi.DictType(value_type=value):
            return f"table of `name = {type_text(value)}`"
    return _scalar_text(kind)


def _metadata_text(kind: mi.Metadata) -> str:
    """A duration or a size (with its bound), or a type the schema describes itself."""
    match kind:
        case mi.Metadata(extra={"unit": unit}, type=inner):
            noun, show = (
                ("duration", format_duration) if unit == DURATION else ("size", format_size)
            )
            low, high = getattr(inner, "ge", None), getattr(inner, "le", None)
            bounds = [" > 0"] if getattr(inner, "gt", None) == 0 else []
            bounds += [f" ≥ {show(low)}"] if low else []
            bounds += [f" ≤ {show(high)}"] if high is not None else []
            return noun + ",".join(bounds)
        case mi.Metadata(extra_json_schema={"description": str(description)}, type=inner):
            return f"{_noun(inner)}: {description}"
    return type_text(kind.type)


def _scalar_text(kind: mi.Type) -> str:
    """A literal choice, a number with its bounds, a string, a boolean, anything."""
    match kind:
        case mi.LiteralType(values=values):
            return "one of " + ", ".join(f"`{json.dumps(v)}`" for v in values)
        case mi.IntType() | mi.FloatType():
            noun = "integer" if isinstance(kind, mi.IntType) else "number"
            return noun + "".join(_bounds(kind))
        case mi.StrType():
            return "string"
        case mi.BoolType():
            return "boolean"
        case mi.AnyType():
            return "any TOML value"
    return type(kind).__name__


def default_text(field: mi.Field) -> str:
    """A key's default as it would be written in the file; ``unset`` for
    None, ``required`` when there is none."""
    if field.required:
        return "required"
    value = field.default_factory() if field.default is msgspec.NODEFAULT else field.default
    if value is None:
        return "unset"
    unit = _unit(field.type)
    if unit is not None:
        shown = format_duration(value) if unit == DURATION else format_size(value)
        return f'`"{shown}"`'
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, dict):
        inner = ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items())
        return f"`{{ {inner} }}`" if inner else "`{}`"
    return f"`{json.dumps(value)}`"


def _keys(kind: mi.StructType) -> Iterator[mi.Field]:
    """The fields of a section that are keys (not sections themselves)."""
    return (field for field in kind.fields if _section_struct(field.type) is None)


def _struct(cls: type) -> mi.StructType:
    kind = mi.type_info(cls)
    assert isinstance(kind, mi.StructType)
    return kind


def _section_struct(kind: mi.Type) -> mi.StructType | None:
    """The struct of a ``[table]`` or ``[[array of tables]]`` field, else None."""
    if isinstance(kind, mi.StructType):
        return kind
    if isinstance(kind, mi.ListType) and isinstance(kind.item_type, mi.StructType):
        return kind.item_type
    return None


def _plural(item: mi.Type) -> str:
    """``strings``, ``dotted module names like ...``: the items of an array."""
    if isinstance(item, mi.Metadata) and item.extra_json_schema:
        description = str(item.extra_json_schema.get("description", ""))
        return f"{_noun(item.type)}s, each {description}"
    text = type_text(item)
    return "strings" if text == "string" else f"{text}s"


def _noun(kind: mi.Type) -> str:
    """``integer``, ``string``, ...: a scalar type without its bounds."""
    names = {mi.IntType: "integer", mi.FloatType: "number", mi.StrType: "string"}
    return names.get(type(kind), type_text(kind))


def _bounds(kind: mi.IntType | mi.FloatType) -> list[str]:
    pairs = ((">", kind.gt), ("≥", kind.ge), ("<", kind.lt), ("≤", kind.le))
    return [f" {op} {limit}" for op, limit in pairs if limit is not None]


def _unit(kind: mi.Type) -> str | None:
    """``duration`` or ``size`` for such a field (optional or not), else None."""
    if isinstance(kind, mi.UnionType):
        units = [_unit(member) for member in kind.types]
        return next((unit for unit in units if unit), None)
    if isinstance(kind, mi.Metadata) and kind.extra:
        unit = kind.extra.get("unit")
        return unit if isinstance(unit, str) else None
    return None


def _paragraphs(docstring: str) -> str:
    """A docstring as Markdown paragraphs, one line each."""
    paragraphs = inspect.cleandoc(docstring).split("\n\n")
    return "\n\n".join(_markdown(" ".join(p.split())) for p in paragraphs)


def _markdown(text: str) -> str:
    """reStructuredText's ``code`` as Markdown's `code`."""
    return _DOUBLE_BACKQUOTE.sub(r"`\1`", text)


def _cell(text: str) -> str:
    """Text fit for one cell of a Markdown table."""
    return text.replace("|", "\\|").replace("\n", " ")


# ---------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """Write the reference to PATH (stdout without one); with ``--check``,
    exit 1 when PATH differs from it."""
    parser = argparse.ArgumentParser(
        prog="python -m corral.config.reference",
        description="write the configuration reference (docs/CONFIG.md) from the schema",
    )
    parser.add_argument("path", nargs="?", help="the file to write (default: stdout)")
    parser.add_argument("--check", action="store_true", help="compare with PATH, write nothing")
    args = parser.parse_args(argv)
    if args.check and args.path is None:
        parser.error("--check compares with a file: give its PATH (docs/CONFIG.md)")
    missing = missing_descriptions()
    if missing:
        print(
            "config/schema.py: these keys have no description (a `#:` comment line above the "
            "field): " + ", ".join(missing),
            file=sys.stderr,
        )
        return 1
    text = render()
    if args.path is None:
        sys.stdout.write(text)
        return 0
    path = Path(args.path)
    if args.check:
        current = path.read_text() if path.exists() else ""
        if current != text:
            print(f"{path} is out of date with config/schema.py: run {REGENERATE}", file=sys.stderr)
            return 1
        return 0
    path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
