"""Naming the field a wire message was refused for, and finding float fields.

msgspec reports where a frame failed validation as a path of indexes into
its arrays (``$[1][0][3]``): corral's messages are ``array_like``, so the
path names no field. :func:`named_path` walks the message's type (with
:mod:`msgspec.inspect`) along that path and spells it with field names
(``Enqueue.jobs[0].delay``), so a refused peer is told which field was
wrong. :func:`float_paths` lists every float field a type can hold, for the
tests that send NaN and infinities to each. Leaf module: msgspec, stdlib.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Iterator
from typing import Any

import msgspec
from msgspec import inspect as mi

#: One step of a msgspec error path: ``[3]``, ``[...]`` or ``.name``.
_STEP = re.compile(r"\[(\d+|\.\.\.)\]|\.(\w+)")
#: Where msgspec's error message says the failure was.
_AT = re.compile(r" - at `\$([^`]*)`$")


def _struct_of(info: mi.Type, tag: Any) -> mi.StructType | None:
    """The struct a (possibly tagged-union, possibly optional) type stands for."""
    if isinstance(info, mi.StructType):
        return info
    if isinstance(info, mi.UnionType):
        structs = [t for t in info.types if isinstance(t, mi.StructType)]
        for struct in structs:
            if struct.tag is not None and struct.tag == tag:
                return struct
        if len(structs) == 1:
            return structs[0]
    return None


def _inner(info: mi.Type) -> mi.Type:
    """A ``T | None`` as ``T``."""
    if isinstance(info, mi.UnionType):
        others = [t for t in info.types if not isinstance(t, mi.NoneType)]
        if len(others) == 1:
            return others[0]
    return info


def _step(info: mi.Type, index: str | None, name: str | None, tag: Any) -> tuple[mi.Type, str]:
    """Follow one path step into ``info`` (a tagged union's member by
    ``tag``); returns the type reached and its spelling."""
    info = _inner(info)
    if isinstance(info, mi.ListType | mi.SetType | mi.FrozenSetType | mi.VarTupleType):
        return info.item_type, f"[{index}]"
    if isinstance(info, mi.DictType):
        return info.value_type, "[...]"
    struct = _struct_of(info, tag)
    if struct is None:
        raise LookupError(index or name)
    if name is not None:
        field = next(f for f in struct.fields if f.encode_name == name)
    else:
        position = int(index or 0) - (1 if struct.tag is not None else 0)
        if position < 0:
            return mi.StrType(), ".op"  # the tag itself
        field = struct.fields[position]
    return field.type, f".{field.name}"


_items = msgspec.msgpack.Decoder(list[msgspec.Raw])
_text = msgspec.msgpack.Decoder(str)
_int = msgspec.msgpack.Decoder(int)


def head(frame: bytes) -> tuple[str | None, int | None]:
    """The tag and the second element (a request number) of a frame that
    holds an array, where they are a str and an int; each None if not. Reads
    only those two elements, however deep the rest is nested."""
    try:
        items = _items.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None, None
    tag = req = None
    if items:
        with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
            tag = _text.decode(items[0])
    if len(items) > 1:
        with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
            req = _int.decode(items[1])
    return tag, req


@functools.cache
def _type_info(tp: Any) -> mi.Type:
    """msgspec's description of ``tp`` (built once: it takes milliseconds)."""
    return mi.type_info(tp)


def named_path(tp: Any, frame: bytes, path: str) -> str:
    """``path`` (msgspec's, after the ``$``) spelt with the field names of
    ``tp``, the type ``frame`` was decoded as, e.g. ``GetResult.wait``.
    Returns ``"$" + path`` when the path cannot be followed."""
    tag, _ = head(frame)
    try:
        info: mi.Type = _type_info(tp)
        root = _struct_of(info, tag)
        spelt = [root.cls.__name__ if root is not None else "$"]
        for match in _STEP.finditer(path):
            info, text = _step(info, match.group(1), match.group(2), tag)
            tag = None  # only the root is a tagged union
            spelt.append(text)
        return "".join(spelt)
    except (LookupError, StopIteration, ValueError):
        return f"${path}"


def explain(tp: Any, frame: bytes, error: str, finite_bound: str) -> str:
    """msgspec's validation ``error`` for ``frame`` (decoded as ``tp``),
    with the field named, and a float bound that only non-finite numbers
    fail (``finite_bound``, the largest float as msgspec prints it) said in
    words."""
    match = _AT.search(error)
    if match is None:
        return error
    what = error[: match.start()]
    where = named_path(tp, frame, match.group(1))
    if finite_bound in what:
        what = "must be a finite number (NaN and infinities are refused)"
    return f"{where}: {what}"


def float_paths(tp: Any) -> Iterator[tuple[type, tuple[str, ...]]]:
    """Every (message class, field path) of a float field in the union
    ``tp``, nested structs and lists included (each struct type once per
    path, so recursive types end)."""
    info = mi.type_info(tp)
    members = info.types if isinstance(info, mi.UnionType) else (info,)
    for member in members:
        if isinstance(member, mi.StructType):
            for path in _floats(member, (), frozenset()):
                yield member.cls, path


def _floats(
    info: mi.Type, path: tuple[str, ...], seen: frozenset[type]
) -> Iterator[tuple[str, ...]]:
    if isinstance(info, mi.FloatType):
        yield path
    elif isinstance(info, mi.UnionType):
        for member in info.types:
            yield from _floats(member, path, seen)
    elif isinstance(info, mi.ListType | mi.SetType | mi.FrozenSetType | mi.VarTupleType):
        yield from _floats(info.item_type, (*path, "[]"), seen)
    elif isinstance(info, mi.DictType):
        yield from _floats(info.value_type, (*path, "{}"), seen)
    elif isinstance(info, mi.StructType) and info.cls not in seen:
        for field in info.fields:
            yield from _floats(field.type, (*path, field.name), seen | {info.cls})
