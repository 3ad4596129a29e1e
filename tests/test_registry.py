"""Tests for corral.workers.registry: the @task decorator and its options,
handler signatures, typed payload decoding with errors that name the field,
and loading plugin modules (tests/plugins/sample_tasks.py and modules
written on the fly)."""

from __future__ import annotations

import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

import corral
from corral import JobContext
from corral.errors import CorralError
from corral.workers import registry as reg
from corral.workers.registry import (
    ATTRIBUTE,
    PayloadInvalid,
    PluginError,
    Registry,
    Task,
    TaskDef,
    add_python_path,
    load_plugins,
    task,
    tasks_in,
)

PLUGINS = Path(__file__).parent / "plugins"


def definition(fn: Callable[..., Any]) -> TaskDef:
    found = getattr(fn, ATTRIBUTE)
    assert isinstance(found, TaskDef)
    return found


def ctx() -> JobContext:
    return JobContext("job-1", 1, "t", "default", 1.0)


@pytest.fixture
def sample(monkeypatch: pytest.MonkeyPatch) -> Registry:
    monkeypatch.syspath_prepend(str(PLUGINS))
    return load_plugins(["sample_tasks"], entry_point_group=False)


@pytest.fixture
def make_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[str, str], str]]:
    """Write a module with a unique name into tmp_path; return its name."""
    monkeypatch.syspath_prepend(str(tmp_path))
    made: list[str] = []

    def make(stem: str, source: str) -> str:
        name = f"{stem}_{uuid.uuid4().hex[:8]}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        made.append(name)
        return name

    yield make
    for name in made:
        sys.modules.pop(name, None)


# -- the decorator ----------------------------------------------------------------


def test_bare_decorator_makes_a_task_that_still_runs_the_function() -> None:
    def handler(ctx: JobContext, payload: dict[str, int]) -> int:
        return payload["n"] + ctx.attempt

    marked = task(handler)
    assert isinstance(marked, Task)  # registers nothing: a wrapper with its definition
    assert marked.__wrapped__ is handler and marked.__name__ == "handler"  # type: ignore[attr-defined]
    d = definition(marked)
    assert d is marked.definition
    assert d.fn is handler
    assert (
        marked.name
        == d.name
        == (
            f"{__name__}.test_bare_decorator_makes_a_task_that_still_runs_the_function"
            ".<locals>.handler"
        )
    )
    assert d.queue == "default"
    assert (d.max_attempts, d.timeout, d.soft_timeout, d.result_ttl) == (None, None, None, None)
    assert (d.retry_backoff, d.retry_backoff_max) == (None, None)
    assert d.is_async is False
    assert marked(ctx(), {"n": 2}) == 3  # a call runs the function inline


def test_decorator_with_options() -> None:
    @task(
        name="emails.send",
        queue="emails",
        max_attempts=7,
        timeout=30,
        soft_timeout=25,
        retry_backoff=0.5,
        retry_backoff_max=90,
        result_ttl=60,
    )
    def send(ctx: JobContext, payload: str) -> None:
        return None

    d = definition(send)
    assert d.name == "emails.send"
    assert d.queue == "emails"
    assert d.max_attempts == 7
    assert d.timeout == 30
    assert d.soft_timeout == 25
    assert d.retry_backoff == 0.5
    assert d.retry_backoff_max == 90
    assert d.result_ttl == 60


def test_decorator_with_options_but_no_name_defaults_the_name() -> None:
    @task(queue="q")
    def job() -> None:
        return None

    assert definition(job).name == f"{__name__}.{job.__qualname__}"
    assert definition(job).queue == "q"


def test_corral_task_is_the_registry_decorator() -> None:
    assert corral.task is task


@pytest.mark.parametrize("bad", [0, -1])
def test_max_attempts_below_one_is_refused(bad: int) -> None:
    with pytest.raises(ValueError, match="max_attempts"):

        @task(name="x.y", max_attempts=bad)
        def handler() -> None:
            return None


def test_default_names_come_from_module_and_qualname(sample: Registry) -> None:
    names = set(sample.names())
    assert "sample_tasks.untyped" in names
    assert "sample_tasks.ctx_only" in names
    assert "orders.place" in names
    assert "sample_tasks.place_order" not in names  # name= overrides the default


# -- signatures ----------------------------------------------------------------


def test_signature_ctx_and_payload(sample: Registry) -> None:
    d = sample.get("orders.place")
    assert d is not None
    assert d.takes_context and d.takes_payload
    import sample_tasks

    assert d.payload_type is sample_tasks.Order
    c = ctx()
    assert d.args(c, "P") == (c, "P")


def test_signature_untyped_two_parameters(sample: Registry) -> None:
    d = sample.get("sample_tasks.untyped")
    assert d is not None
    assert d.takes_context and d.takes_payload
    assert d.payload_type is Any
    c = ctx()
    assert d.fn(*d.args(c, {"a": 1})) == [c, {"a": 1}]


def test_signature_ctx_only(sample: Registry) -> None:
    d = sample.get("sample_tasks.ctx_only")
    assert d is not None
    assert d.takes_context and not d.takes_payload
    c = ctx()
    assert d.args(c, "ignored") == (c,)
    assert d.fn(*d.args(c, None)) == "job-1"


def test_signature_payload_only(sample: Registry) -> None:
    d = sample.get("sample_tasks.payload_only")
    assert d is not None
    assert d.takes_payload and not d.takes_context
    import sample_tasks

    assert d.payload_type is sample_tasks.Order
    order = d.decode_payload(msgspec.msgpack.encode({"name": "n1"}))
    assert d.args(ctx(), order) == (order,)
    assert d.fn(*d.args(ctx(), order)) == "n1"


def test_signature_no_parameters(sample: Registry) -> None:
    d = sample.get("sample_tasks.no_args")
    assert d is not None
    assert not d.takes_context and not d.takes_payload
    assert d.args(ctx(), "ignored") == ()
    assert d.fn(*d.args(ctx(), None)) == 42


def test_a_single_unannotated_parameter_is_the_payload() -> None:
    @task
    def handler(x):  # type: ignore[no-untyped-def]
        return x

    d = definition(handler)
    assert d.takes_payload and not d.takes_context
    assert d.args(ctx(), 5) == (5,)


def test_keyword_only_and_variadic_parameters_are_not_passed() -> None:
    @task
    def handler(ctx: JobContext, payload: int, *rest: int, flag: bool = False, **kw: int) -> int:
        return payload

    d = definition(handler)
    assert d.takes_context and d.takes_payload
    assert d.payload_type is int
    c = ctx()
    assert d.args(c, 1) == (c, 1)


def test_async_tasks_are_marked(sample: Registry) -> None:
    d = sample.get("sample_tasks.doubled")
    assert d is not None
    assert d.is_async is True
    assert d.queue == "async"
    assert d.payload_type is int
    for name in sample.names():
        if name != "sample_tasks.doubled":
            assert sample.get(name).is_async is False  # type: ignore[union-attr]


# -- payload decoding -------------------------------------------------------------


class Item(msgspec.Struct):
    sku: str
    qty: int


class Order(msgspec.Struct):
    name: str
    items: list[Item] = []
    meta: dict[str, int] = {}


@task
def take_order(ctx: JobContext, order: Order) -> None:
    return None


ORDER = definition(take_order)


def enc(value: object) -> bytes:
    return msgspec.msgpack.encode(value)


def test_struct_payload_is_decoded() -> None:
    order = ORDER.decode_payload(
        enc({"name": "o-1", "items": [{"sku": "a", "qty": 1}, {"sku": "b", "qty": 2}]})
    )
    assert order == Order("o-1", [Item("a", 1), Item("b", 2)])


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"name": 5}, "payload.name: expected str, got int"),
        (
            {"name": "o", "items": [{"sku": "a", "qty": 1}, {"sku": "b", "qty": "2"}]},
            "payload.items[1].qty: expected int, got str",
        ),
        ({"name": "o", "items": [{"sku": "a"}]}, "payload.items[0]: object missing required field"),
        ({"name": "o", "meta": {"k": "v"}}, "payload.meta[...]: expected int, got str"),
        ({"name": "o", "items": {"sku": "a"}}, "payload.items: expected array, got object"),
        ({}, "payload: object missing required field"),
        (["o"], "payload: expected object, got array"),
        (7, "payload: expected object, got int"),
    ],
)
def test_validation_errors_name_the_field_path(payload: object, message: str) -> None:
    with pytest.raises(PayloadInvalid) as info:
        ORDER.decode_payload(enc(payload))
    assert str(info.value).startswith(message)
    assert "`" not in str(info.value)
    assert "$" not in str(info.value)


def test_validation_error_for_a_scalar_payload_type() -> None:
    @task
    def count(n: int) -> int:
        return n

    d = definition(count)
    assert d.decode_payload(enc(3)) == 3
    with pytest.raises(PayloadInvalid, match=r"^payload: expected int, got str$"):
        d.decode_payload(enc("3"))


def test_untyped_payload_decodes_to_plain_values() -> None:
    @task
    def anything(ctx: JobContext, payload):  # type: ignore[no-untyped-def]
        return payload

    d = definition(anything)
    value = {"a": [1, 2.5, None, True, "s"], "b": {"c": b"\x00"}}
    assert d.decode_payload(enc(value)) == value


@pytest.mark.parametrize(
    "raw",
    [b"", b"\xc1", b"\x92\x01", b"\x81\xa4name", b"\xa5abc", b"\x91" * 100_000 + b"\xc0"],
    ids=["empty", "reserved-byte", "truncated-array", "truncated-map", "truncated-str", "deep"],
)
@pytest.mark.parametrize("typed", [True, False])
def test_invalid_msgpack_is_payload_invalid(raw: bytes, typed: bool) -> None:
    @task
    def anything(ctx: JobContext, payload):  # type: ignore[no-untyped-def]
        return payload

    d = ORDER if typed else definition(anything)
    with pytest.raises(PayloadInvalid):
        d.decode_payload(raw)


def test_trailing_bytes_are_payload_invalid() -> None:
    with pytest.raises(PayloadInvalid, match="not valid msgpack"):
        ORDER.decode_payload(enc({"name": "o"}) + b"\x01")


@pytest.mark.parametrize(
    "raw",
    [b"\xa2\xff\xfe", b"\x81\xa4name\xa2\xff\xfe"],
    ids=["bare-str", "struct-field"],
)
def test_invalid_utf8_payload_is_payload_invalid(raw: bytes) -> None:
    @task
    def anything(ctx: JobContext, payload):  # type: ignore[no-untyped-def]
        return payload

    d = definition(anything) if raw == b"\xa2\xff\xfe" else ORDER
    with pytest.raises(PayloadInvalid):
        d.decode_payload(raw)


# -- plugins ----------------------------------------------------------------------


def test_load_plugins_collects_every_decorated_function(sample: Registry) -> None:
    import sample_tasks

    assert sample.names() == sorted(
        [
            "orders.place",
            "sample_tasks.ctx_only",
            "sample_tasks.doubled",
            "sample_tasks.no_args",
            "sample_tasks.payload_only",
            "sample_tasks.untyped",
        ]
    )
    assert len(sample) == 6
    assert sample.get("orders.place").fn is sample_tasks.place_order.__wrapped__  # type: ignore[union-attr,attr-defined]
    assert sample.get("sample_tasks.plain_function") is None
    assert sample.get("sample.hidden") is None  # not a top-level name
    assert {d.name for d in sample} == set(sample.names())


def test_tasks_in_reads_only_marked_top_level_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(PLUGINS))
    import sample_tasks

    found = {d.fn for d in tasks_in(sample_tasks)}
    assert sample_tasks.plain_function not in found
    assert sample_tasks.place_order.__wrapped__ in found  # type: ignore[attr-defined]
    assert len(found) == 6


def test_a_reexported_task_is_not_a_duplicate(
    sample: Registry, make_module: Callable[[str, str], str]
) -> None:
    name = make_module("reexport", "from sample_tasks import no_args, place_order\n")
    registry = load_plugins(["sample_tasks", name], entry_point_group=False)
    assert registry.names() == sample.names()


def test_a_missing_module_is_a_plugin_error_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(PluginError) as info:
        load_plugins(["sample_tasks_that_does_not_exist"], entry_point_group=False)
    text = str(info.value)
    assert "'sample_tasks_that_does_not_exist'" in text
    assert "plugins" in text
    assert "python_path" in text
    assert isinstance(info.value, CorralError)
    assert isinstance(info.value.__cause__, ModuleNotFoundError)
    assert "registry.py" not in text  # corral's own import call is no place to look


def test_a_module_that_fails_on_import_is_a_plugin_error(
    make_module: Callable[[str, str], str],
) -> None:
    name = make_module("broken", "import msgspec\nraise RuntimeError('boom at import')\n")
    with pytest.raises(PluginError) as info:
        load_plugins([name], entry_point_group=False)
    assert repr(name) in str(info.value)
    assert "RuntimeError: boom at import" in str(info.value)


def test_a_later_missing_module_fails_the_whole_load(sample: Registry) -> None:
    with pytest.raises(PluginError, match="nope_not_here"):
        load_plugins(["sample_tasks", "nope_not_here"], entry_point_group=False)


def test_two_functions_with_one_task_name_is_a_plugin_error(
    make_module: Callable[[str, str], str],
) -> None:
    source = """
        import corral

        @corral.task(name="shared.name")
        def {fn}(ctx, payload):
            return None
    """
    first = make_module("dup_a", source.format(fn="first"))
    second = make_module("dup_b", source.format(fn="second"))
    with pytest.raises(PluginError) as info:
        load_plugins([first, second], entry_point_group=False)
    text = str(info.value)
    assert "'shared.name'" in text
    assert f"{first}.first" in text
    assert f"{second}.second" in text
    assert "name=" in text


def test_a_default_name_clash_between_modules_is_not_possible(
    make_module: Callable[[str, str], str],
) -> None:
    source = "import corral\n\n@corral.task\ndef send(ctx, payload):\n    return None\n"
    a, b = make_module("same_a", source), make_module("same_b", source)
    registry = load_plugins([a, b], entry_point_group=False)
    assert registry.names() == sorted([f"{a}.send", f"{b}.send"])


def test_registry_add_directly_refuses_a_second_function() -> None:
    def one() -> None:
        return None

    def two() -> None:
        return None

    marked = task(name="n.x")(one)
    r = Registry([marked.definition])
    r.add(definition(marked))  # the same function again is fine
    assert len(r) == 1
    with pytest.raises(PluginError, match="defined twice"):
        r.add(definition(task(name="n.x")(two)))
    assert r.get("n.x").fn is one  # type: ignore[union-attr]


def test_entry_point_modules_are_loaded(sample: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeEntryPoint:
        value = "sample_tasks"

    groups: list[str] = []

    def fake_entry_points(*, group: str) -> list[FakeEntryPoint]:
        groups.append(group)
        return [FakeEntryPoint()]

    monkeypatch.setattr(reg, "entry_points", fake_entry_points)
    registry = load_plugins([])
    assert groups == ["corral.tasks"]
    assert registry.names() == sample.names()
    assert len(load_plugins([], entry_point_group=False)) == 0


def test_add_python_path_puts_directories_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))
    a, b = tmp_path / "a", tmp_path / "b"
    add_python_path([str(a), str(b)])
    assert sys.path[:2] == [str(a.resolve()), str(b.resolve())]
    add_python_path([str(b)])  # already there: not added twice
    assert sys.path.count(str(b.resolve())) == 1


UNRESOLVABLE = """
    from __future__ import annotations

    from typing import TYPE_CHECKING

    import msgspec

    import corral

    if TYPE_CHECKING:
        from decimal import Decimal


    class Order(msgspec.Struct):
        name: str


    @corral.task
    def place(ctx: corral.JobContext, order: Order) -> Decimal:
        return order.name


    @corral.task
    def ctx_only(ctx: corral.JobContext) -> Decimal:
        return ctx
"""


def test_an_unresolvable_return_annotation_keeps_payload_typing(
    make_module: Callable[[str, str], str],
) -> None:
    name = make_module("typing_only", UNRESOLVABLE)
    registry = load_plugins([name], entry_point_group=False)
    d = registry.get(f"{name}.place")
    assert d is not None
    with pytest.raises(PayloadInvalid, match=r"^payload\.name: expected str, got int$"):
        d.decode_payload(enc({"name": 1}))


def test_an_unresolvable_return_annotation_keeps_the_context_parameter(
    make_module: Callable[[str, str], str],
) -> None:
    name = make_module("typing_only", UNRESOLVABLE)
    d = definition(__import__(name).ctx_only)
    assert d.takes_context and not d.takes_payload


TYPE_CHECKING_CONTEXT = """
    from __future__ import annotations

    from typing import TYPE_CHECKING

    import corral

    if TYPE_CHECKING:
        from corral import JobContext
        from myapp.models import Unknown


    @corral.task
    def only_ctx(ctx: JobContext) -> None:
        return None


    @corral.task
    def untypable(ctx: JobContext, payload: Unknown) -> None:
        return None
"""


def test_a_type_checking_only_context_annotation_is_still_the_context(
    make_module: Callable[[str, str], str],
) -> None:
    name = make_module("tc_ctx", TYPE_CHECKING_CONTEXT)
    registry = load_plugins([name], entry_point_group=False)
    only = registry.get(f"{name}.only_ctx")
    assert only is not None
    assert only.takes_context and not only.takes_payload
    c = ctx()
    assert only.args(c, "payload") == (c,)
    # an annotation that cannot be resolved costs only itself: plain decoding
    untypable = registry.get(f"{name}.untypable")
    assert untypable is not None
    assert untypable.takes_context and untypable.takes_payload
    assert untypable.payload_type is Any
    assert untypable.decode_payload(enc({"a": 1})) == {"a": 1}


LATER_STRUCT = """
    from __future__ import annotations

    import msgspec

    import corral


    @corral.task
    def place(ctx: corral.JobContext, order: Order) -> None:
        return None


    class Order(msgspec.Struct):
        name: str
"""


def test_a_payload_struct_defined_after_the_task_is_used(
    make_module: Callable[[str, str], str],
) -> None:
    name = make_module("later_struct", LATER_STRUCT)
    registry = load_plugins([name], entry_point_group=False)
    d = registry.get(f"{name}.place")
    assert d is not None
    with pytest.raises(PayloadInvalid, match=r"^payload\.name: expected str, got int$"):
        d.decode_payload(enc({"name": 1}))


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("timeout", float("nan")),
        ("timeout", -1),
        ("timeout", 0),
        ("timeout", float("inf")),
        ("timeout", "5m"),
        ("timeout", True),
        ("soft_timeout", float("inf")),
        ("result_ttl", float("nan")),
        ("result_ttl", -5),
        ("retry_backoff", -1),
        ("retry_backoff_max", 1e300),
        ("max_attempts", 10**12),
        ("max_attempts", 1.5),
        ("max_retries", 10**12),
        ("queue", ""),
        ("queue", "q" * 201),
        ("name", "n" * 201),
        ("queue", 5),
    ],
)
def test_a_task_option_the_broker_would_refuse_is_refused_at_the_decorator(
    option: str, value: object
) -> None:
    """The broker drops a worker's READY whose task options it cannot take
    (a NaN timeout: "must be a finite number"), so one such task kept its
    whole pool from ever registering, past check-config; a typed enqueue
    of it was refused as invalid. Each is a ValueError naming the option."""
    options: dict[str, Any] = {"name": "t.bad", option: value}
    with pytest.raises(ValueError, match=rf"task .*: {option}"):

        @corral.task(**options)
        def handler(ctx: JobContext) -> None: ...
