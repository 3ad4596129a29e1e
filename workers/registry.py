"""Tasks: the ``@corral.task`` decorator, task options, typed payloads, and
loading the plugin modules that define tasks.

The decorator registers nothing globally: it wraps the function in a
:class:`Task` that carries its :class:`TaskDef` (and still runs the function
when called). A worker builds its :class:`Registry` by scanning the plugin
modules it was told to load, so importing a module has no effect beyond
its definitions.

A :class:`Task` is generic in the function's parameters, its payload type
and its return type, so ``Client.enqueue(send, payload)`` is type-checked:
the overloads of :func:`task` read the payload type off the signature
(the second parameter after a ``JobContext``, else the only one).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import sys
import traceback
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Any,
    Concatenate,
    Generic,
    ParamSpec,
    Protocol,
    TypeVar,
    overload,
)

import msgspec

from corral.errors import CorralError

if TYPE_CHECKING:
    from corral.context import JobContext

ATTRIBUTE = "__corral_task__"
ENTRY_POINT_GROUP = "corral.tasks"

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")
#: A task's payload type: contravariant, as a task consumes its payload.
PayloadT = TypeVar("PayloadT", contravariant=True)


class PluginError(CorralError):
    """A plugin module that cannot be loaded."""


class PayloadInvalid(ValueError):
    """A payload that does not match its task's annotation."""


class ResultInvalid(TypeError):
    """A handler returned a value msgpack cannot hold (or too large a one)."""


class UnknownTask(LookupError):
    """A job of a task the worker has not registered."""


@dataclass(frozen=True)
class TaskDef:
    """A task: its name, options, and how to call its handler."""

    name: str
    fn: Callable[..., Any]
    queue: str = "default"
    max_attempts: int | None = None
    timeout: float | None = None
    soft_timeout: float | None = None
    retry_backoff: float | None = None
    retry_backoff_max: float | None = None
    result_ttl: float | None = None
    max_retries: int | None = None
    #: At most this many jobs of the task at once, across all workers.
    concurrency: int | None = None
    #: At most this many starts per period, as "100/m", "10/s", "1000/h".
    rate: str | None = None
    #: The same two per job ``limit_key`` (a customer id, say).
    key_concurrency: int | None = None
    key_rate: str | None = None
    payload_type: Any = Any
    takes_context: bool = False
    takes_payload: bool = False
    is_async: bool = False

    def decode_payload(self, raw: bytes) -> Any:
        """Decode and validate a payload; PayloadInvalid names the field."""
        try:
            return msgspec.msgpack.decode(raw, type=self.payload_type)
        except msgspec.ValidationError as exc:
            raise PayloadInvalid(_describe_validation(exc)) from None
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise PayloadInvalid(f"payload is not valid msgpack: {exc}") from None

    def args(self, ctx: Any, payload: Any) -> tuple[Any, ...]:
        if self.takes_context and self.takes_payload:
            return (ctx, payload)
        if self.takes_context:
            return (ctx,)
        if self.takes_payload:
            return (payload,)
        return ()


def _describe_validation(exc: msgspec.ValidationError) -> str:
    """'Expected `int`, got `str` - at `$.count`' -> 'payload.count: expected int, got str'."""
    text = str(exc)
    message, _, where = text.partition(" - at `")
    path = where.rstrip("`").replace("$", "payload", 1) if where else "payload"
    message = message.replace("`", "")
    return f"{path}: {message[:1].lower()}{message[1:]}"


class Task(Generic[P, PayloadT, R]):
    """What ``@corral.task`` makes of a function: the function itself, still
    callable (a call runs it here and now, with the arguments given: for
    tests), with its :class:`TaskDef` as ``definition``. Pass it to
    ``Client.enqueue`` in place of its name: the job takes the task's name,
    queue and options, and a type checker checks the payload against
    ``PayloadT``."""

    def __init__(self, fn: Callable[P, R], definition: TaskDef) -> None:
        functools.update_wrapper(self, fn)
        self._fn = fn
        self.definition = definition
        setattr(self, ATTRIBUTE, definition)

    @property
    def name(self) -> str:
        """The task's name (``module.function`` unless given)."""
        return self.definition.name

    @property
    def queue(self) -> str:
        return self.definition.queue

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<corral task {self.definition.name!r}>"


class TaskDecorator(Protocol):
    """``@corral.task(...)`` with options: makes a :class:`Task` of a
    function, its payload type read off the signature."""

    @overload
    def __call__(
        self, fn: Callable[Concatenate[JobContext, T, P], R], /
    ) -> Task[Concatenate[JobContext, T, P], T, R]: ...
    @overload
    def __call__(self, fn: Callable[[JobContext], R], /) -> Task[[JobContext], None, R]: ...
    @overload
    def __call__(self, fn: Callable[[T], R], /) -> Task[[T], T, R]: ...
    @overload
    def __call__(self, fn: Callable[[], R], /) -> Task[[], None, R]: ...


# The payload type of each handler shape: (ctx, payload, ...), (ctx), (payload),
# (). The same four shapes as TaskDecorator's. Only the first takes a ParamSpec
# (the keyword-only options a handler may have after its payload): where
# several overloads match a function whose signature holds an Any (a return of
# `dict`, `dict[str, Any]`, `Any`), mypy answers Task[Any, Any, Any] unless
# their parameter types agree, and a ParamSpec form matches every arity (so the
# payload would go unchecked). The fixed arities match one shape each, or, for
# (ctx), two that agree.
@overload
def task(
    fn: Callable[Concatenate[JobContext, T, P], R], /
) -> Task[Concatenate[JobContext, T, P], T, R]: ...
@overload
def task(fn: Callable[[JobContext], R], /) -> Task[[JobContext], None, R]: ...
@overload
def task(fn: Callable[[T], R], /) -> Task[[T], T, R]: ...
@overload
def task(fn: Callable[[], R], /) -> Task[[], None, R]: ...


@overload
def task(
    fn: None = None,
    /,
    *,
    name: str | None = None,
    queue: str = "default",
    max_attempts: int | None = None,
    timeout: float | None = None,
    soft_timeout: float | None = None,
    retry_backoff: float | None = None,
    retry_backoff_max: float | None = None,
    result_ttl: float | None = None,
    max_retries: int | None = None,
    concurrency: int | None = None,
    rate: str | None = None,
    key_concurrency: int | None = None,
    key_rate: str | None = None,
) -> TaskDecorator: ...


# The keywords are the task options users write in @corral.task(...): one
# argument per option is the public interface, so PLR0913 does not apply.
def task(  # noqa: PLR0913
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    queue: str = "default",
    max_attempts: int | None = None,
    timeout: float | None = None,
    soft_timeout: float | None = None,
    retry_backoff: float | None = None,
    retry_backoff_max: float | None = None,
    result_ttl: float | None = None,
    max_retries: int | None = None,
    concurrency: int | None = None,
    rate: str | None = None,
    key_concurrency: int | None = None,
    key_rate: str | None = None,
) -> Any:
    """Make a function a corral task (a :class:`Task`). Usable bare
    (``@task``) or with options.

    ``concurrency`` (at most N jobs of the task at once, across every worker
    and host) and ``rate`` (at most N starts per period: ``"100/m"``,
    ``"10/s"``, ``"1000/h"``) are enforced by the broker as it hands jobs
    out; ``key_concurrency``/``key_rate`` are the same per job
    ``limit_key``. Raises ValueError for a bad option (a limit below 1, a
    rate that cannot be read)."""

    def mark(func: Callable[..., Any]) -> Task[..., Any, Any]:
        definition = _define(
            func,
            name=name or f"{func.__module__}.{func.__qualname__}",
            queue=queue,
            max_attempts=max_attempts,
            timeout=timeout,
            soft_timeout=soft_timeout,
            retry_backoff=retry_backoff,
            retry_backoff_max=retry_backoff_max,
            result_ttl=result_ttl,
            max_retries=max_retries,
            concurrency=concurrency,
            rate=rate,
            key_concurrency=key_concurrency,
            key_rate=key_rate,
        )
        return Task(func, definition)

    return mark(fn) if fn is not None else mark


def _define(func: Callable[..., Any], **options: Any) -> TaskDef:
    from corral.context import JobContext

    _check_options(options)
    _check_limits(options)
    params = [
        prm
        for prm in inspect.signature(func).parameters.values()
        if prm.kind in (prm.POSITIONAL_ONLY, prm.POSITIONAL_OR_KEYWORD)
    ]
    hints = _parameter_hints(func, params)
    takes_context = takes_payload = False
    payload_type: Any = Any
    if len(params) >= 2:
        takes_context = takes_payload = True
        payload_type = hints.get(params[1].name, Any)
    elif len(params) == 1:
        if hints.get(params[0].name) is JobContext:
            takes_context = True
        else:
            takes_payload = True
            payload_type = hints.get(params[0].name, Any)
    return TaskDef(
        fn=func,
        payload_type=payload_type,
        takes_context=takes_context,
        takes_payload=takes_payload,
        is_async=inspect.iscoroutinefunction(func),
        **options,
    )


#: The task options in seconds, and whether 0 is allowed: each is finite and
#: at most 100 years, as the broker takes it (a READY whose options it
#: cannot take is dropped: the worker would never register).
_SECONDS_OPTIONS = {
    "timeout": False,
    "soft_timeout": False,
    "result_ttl": True,
    "retry_backoff": True,
    "retry_backoff_max": True,
}


def _check_options(options: dict[str, Any]) -> None:
    """The options of ``@corral.task`` the broker checks (names, counts,
    seconds), as it checks them; raises ValueError naming the task and the
    option."""
    from corral.broker.jobspec import MAX_NAME, MAX_SECONDS

    task = options["name"]
    for name in ("name", "queue"):
        value = options[name]
        if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME:
            raise ValueError(
                f"task {str(task)[:80]}: {name} must be a non-empty string of at most "
                f"{MAX_NAME} characters, got {str(value)[:80]!r}"
            )
    for name, least in (("max_attempts", 1), ("max_retries", 0)):
        value = options[name]
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or not least <= value < 2**31
        ):
            raise ValueError(
                f"task {task}: {name} must be at least {least} and fit in 32 bits, got {value!r}"
            )
    for name, zero in _SECONDS_OPTIONS.items():
        value = options[name]
        if value is None:
            continue
        number = isinstance(value, int | float) and not isinstance(value, bool)
        low = 0.0 if zero else math.ulp(0.0)  # 0 itself, or only above it
        if not number or not low <= value <= MAX_SECONDS:
            bound = "at least" if zero else "above"
            raise ValueError(
                f"task {task}: {name} must be a number of seconds, {bound} 0 and at most "
                f"{MAX_SECONDS:.0f} (100 years), got {value!r}"
            )


def _check_limits(options: dict[str, Any]) -> None:
    """The limit options of ``@corral.task``; raises ValueError naming the
    task and the option."""
    from corral.broker.protocol import parse_rate

    for name in ("concurrency", "key_concurrency"):
        value = options.get(name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 2**31
        ):
            raise ValueError(f"task {options['name']}: {name} must be a whole number of at least 1")
    for name in ("rate", "key_rate"):
        value = options.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise ValueError(f'task {options["name"]}: {name} must be a string like "100/m"')
        try:
            parse_rate(value)
        except ValueError as exc:
            raise ValueError(f"task {options['name']}: {name}: {exc}") from None


def _parameter_hints(func: Callable[..., Any], params: list[inspect.Parameter]) -> dict[str, Any]:
    """Each parameter's resolved annotation. One that cannot be resolved (a
    name imported only under TYPE_CHECKING, say) costs only itself: it
    counts as Any, and the others keep their types."""
    try:
        return typing.get_type_hints(func)
    except Exception:
        pass
    from corral.context import JobContext

    hints: dict[str, Any] = {}
    namespace = getattr(func, "__globals__", {})
    for prm in params:
        annotation = prm.annotation
        if annotation is inspect.Parameter.empty:
            continue
        if isinstance(annotation, str):
            try:
                annotation = eval(annotation, namespace)
            except Exception:
                is_ctx = annotation.split(".")[-1] == "JobContext"
                annotation = JobContext if is_ctx else Any
        hints[prm.name] = annotation
    return hints


class Registry:
    """The tasks one worker can run, by name."""

    def __init__(self, tasks: Iterable[TaskDef] = ()) -> None:
        self._tasks: dict[str, TaskDef] = {}
        for definition in tasks:
            self.add(definition)

    def add(self, definition: TaskDef) -> None:
        existing = self._tasks.get(definition.name)
        if existing is not None and existing.fn is not definition.fn:
            raise PluginError(
                f"task name {definition.name!r} is defined twice "
                f"({_where(existing.fn)} and {_where(definition.fn)}); "
                "give one of them @corral.task(name=...)"
            )
        self._tasks[definition.name] = definition

    def get(self, name: str) -> TaskDef | None:
        return self._tasks.get(name)

    def names(self) -> list[str]:
        return sorted(self._tasks)

    def __iter__(self) -> typing.Iterator[TaskDef]:
        return iter(self._tasks.values())

    def __len__(self) -> int:
        return len(self._tasks)


def _where(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


def tasks_in(module: Any) -> list[TaskDef]:
    """Every task defined by a module's top-level names, with annotations
    resolved again now that the whole module exists (a payload Struct may be
    defined below its task)."""
    found = []
    for value in vars(module).values():
        definition = getattr(value, ATTRIBUTE, None)
        if isinstance(definition, TaskDef):
            found.append(_define(definition.fn, **_options(definition)))
    return found


def _options(definition: TaskDef) -> dict[str, Any]:
    return {
        "name": definition.name,
        "queue": definition.queue,
        "max_attempts": definition.max_attempts,
        "timeout": definition.timeout,
        "soft_timeout": definition.soft_timeout,
        "retry_backoff": definition.retry_backoff,
        "retry_backoff_max": definition.retry_backoff_max,
        "result_ttl": definition.result_ttl,
        "max_retries": definition.max_retries,
        "concurrency": definition.concurrency,
        "rate": definition.rate,
        "key_concurrency": definition.key_concurrency,
        "key_rate": definition.key_rate,
    }


def add_python_path(paths: Iterable[str]) -> None:
    """Put config ``python_path`` directories first on sys.path."""
    for path in reversed(list(paths)):
        resolved = str(Path(path).resolve())
        if resolved not in sys.path:
            sys.path.insert(0, resolved)


def where(exc: BaseException) -> str:
    """``"path:line: "`` of the code an import failed at: the offending line
    of a syntax error, else the innermost frame outside importlib and this
    module; "" if there is none (the module itself was not found)."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{exc.filename}:{exc.lineno}: "
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if "importlib" not in f.filename and f.filename != __file__
    ]
    return f"{frames[-1].filename}:{frames[-1].lineno}: " if frames else ""


def import_or_raise(name: str, error: type[Exception], what: str, check: str) -> Any:
    """Import module ``name``; anything its import raises (SystemExit too)
    becomes ``error``, naming it as ``what``, where it failed, and ``check``
    (what to look at) "in the config"."""
    try:
        return importlib.import_module(name)
    except (Exception, SystemExit) as exc:
        raise error(
            f"{what} {name!r} could not be imported: {where(exc)}{type(exc).__name__}: "
            f"{exc}. {check} in the config"
        ) from exc


def load_plugins(modules: Iterable[str], *, entry_point_group: bool = True) -> Registry:
    """Import each plugin module and collect its tasks, plus the modules
    that installed distributions declare in the ``corral.tasks`` group."""
    registry = Registry()
    names = list(modules)
    if entry_point_group:
        names += [ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)]
    for name in names:
        module = import_or_raise(
            name, PluginError, "plugin", "Check the pool's plugins list and python_path"
        )
        for definition in tasks_in(module):
            registry.add(definition)
    return registry
