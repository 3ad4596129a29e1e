"""Hooks: code of yours that runs around every job in the workers, and
before every enqueue in a client (error reporting, tracing, metrics).

Subclass :class:`Hooks` and override what you need::

    class Timing(corral.Hooks):
        def before_job(self, ctx): ...                 # the handler is about to run
        def on_failure(self, ctx, error): ...          # it raised (not corral.Retry)
        def on_retry(self, ctx, error): ...            # it raised corral.Retry
        def after_job(self, ctx, end): ...             # every try, whatever its end
        def before_enqueue(self, job): ...             # client side: add job.headers
        def close(self): ...                           # the process stops: flush

Register them in code (``Client(..., hooks=[Timing()])``, ``Worker(...,
hooks=[...])``) or in the config: ``hooks = ["myapp.hooks"]`` at the top
level (every worker, ``Client.from_config`` and the CLI's enqueue
commands) or in a ``[[pools]]`` entry (that pool's workers). A listed
module is imported by each process that uses it, which then calls its
``corral_hooks()`` function (or the one named as ``"module:function"``)
for a :class:`Hooks` or a list of them: the module builds nothing at
import, and a worker makes its hooks after the fork, so a hook may start
threads or open connections.

A hook cannot break a job or a worker: an exception in one is logged
(``hook.failed``, with its traceback) and the job's outcome stands. What
asks the process to stop (:data:`EXITS`: Ctrl-C's KeyboardInterrupt,
``sys.exit``'s SystemExit, GeneratorExit) is never swallowed: it goes on up
through a client's call; in a worker it ends the try with that error and
the worker stops (see :mod:`corral.workers.execute`). The
end hooks (``on_failure``, ``on_retry``, ``after_job``) run once the
outcome is on its way to the broker, so a slow one never delays it nor
makes the job time out; ``before_job``'s time is the try's. A worker tells
its supervisor of each call (a :class:`HookWatch`): one that runs past the
pool's ``hook_timeout`` has its worker killed and replaced
(``hook.timeout``), since nothing else frees the thread it holds. A
client's ``before_enqueue`` runs in the caller's thread within the call's
timeout (a :class:`CallBudget`): one that returns past it raises
``corral.HookTimeout`` and nothing is sent. Hooks run in the order given,
on the thread (or asyncio task) that runs the job, so ``before_job`` may
set context variables the handler and ``after_job`` see. The worker's
per-job log lines are such a hook (:class:`corral.logs.JobLines`), run
first."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from corral.errors import CorralError, HookTimeout, SoftTimeout

if TYPE_CHECKING:
    from corral.context import JobContext

#: What a hook raises to stop the process, not as a bug: never caught here.
EXITS = (KeyboardInterrupt, SystemExit, GeneratorExit)

#: The function a hooks module listed by its name alone must define.
FACTORY = "corral_hooks"

#: How a try ended, as ``JobEnd.outcome`` (the suffix of the worker's log line):
#: ``errored``: the handler raised, the broker tries again if attempts remain;
#: ``failed``: no more tries (``corral.Fail``, a payload that does not match,
#: a result msgpack cannot hold); ``retry_asked``: it raised ``corral.Retry``.
Outcome = Literal["succeeded", "errored", "failed", "retry_asked"]


class HookError(CorralError):
    """A hooks module that cannot be loaded; the message names it and why."""


@dataclass
class Enqueuing:
    """A job about to be enqueued, as ``before_enqueue`` sees it. Add to
    ``headers`` (text keys and values): they travel with the job and the
    handler reads them as ``ctx.headers``. An entry the broker would refuse
    the job for (see :data:`~corral.broker.jobspec.MAX_HEADERS`) is dropped
    and logged (``hook.bad_header``); the job goes."""

    task: str
    job_id: str
    #: None: the task's queue (else "default"), as the broker resolves it.
    queue: str | None
    #: The payload as given (not yet encoded).
    payload: Any
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class CallBudget:
    """The time a client call has, shared by its jobs' ``before_enqueue``
    hooks and then its request: ``deadline`` in ``time.monotonic()``
    seconds, ``timeout`` the client's, ``hooks`` the seconds the hooks took."""

    deadline: float
    timeout: float
    hooks: float = 0.0

    def spent(self, hook: str, job: Enqueuing, started: float) -> None:
        """``hook`` ran from ``started`` until now; raises HookTimeout if
        that took the call past its deadline."""
        now = time.monotonic()
        self.hooks += now - started
        if now > self.deadline:
            raise HookTimeout(
                f"the hook {hook} took {now - started:.3g}s on job {job.job_id} of task "
                f"{job.task!r}, past the client's timeout={self.timeout:g}s for the whole "
                "call; nothing was enqueued. Give the hook's network calls a timeout, or "
                "give the client a longer one"
            )


@dataclass(frozen=True)
class JobEnd:
    """How one try of a job ended, as ``after_job`` sees it."""

    outcome: Outcome
    #: Seconds from the delivery's start to the end of the try.
    seconds: float
    #: What the handler returned (``succeeded`` only).
    result: Any = None
    #: The exception that ended it (None when it succeeded).
    error: BaseException | None = None
    #: The error as the job's info keeps it ("" when it succeeded).
    error_type: str = ""
    error_message: str = ""


class Hooks:
    """Base of every hook: each method does nothing until overridden. The
    worker calls ``before_job``, then (the handler ran) ``on_failure`` or
    ``on_retry`` when it raised, then ``after_job``, on every try of every
    job it starts (a try ended by a kill, a hard timeout or the shutdown
    timeout has no end to report); a client calls ``before_enqueue`` for
    every job it sends (each of a batch, a flow and their callbacks)."""

    def before_enqueue(self, job: Enqueuing) -> None:
        """A client is about to send ``job``; add to ``job.headers`` here.
        It runs in the caller's thread, within the call's timeout: past it
        the call raises ``corral.HookTimeout`` (when it returns)."""

    def before_job(self, ctx: JobContext) -> None:
        """A worker is about to run ``ctx``'s job (its payload not yet decoded)."""

    def on_failure(self, ctx: JobContext, error: BaseException) -> None:
        """The try ended with ``error`` (anything but ``corral.Retry``):
        ``ctx.attempt`` is the run number, ``ctx.max_attempts`` the budget."""

    def on_retry(self, ctx: JobContext, error: BaseException) -> None:
        """The handler raised ``error``, a ``corral.Retry``."""

    def after_job(self, ctx: JobContext, end: JobEnd) -> None:
        """The try ended; ``end`` says how."""

    def close(self) -> None:
        """The process is stopping (a worker, after its drain): flush here."""


#: The methods a hook may override, each a point of :class:`HookSet`.
POINTS = ("before_enqueue", "before_job", "on_failure", "on_retry", "after_job", "close")


def async_points(hook: Hooks) -> list[str]:
    """Why each of ``hook``'s points that is an ``async def`` can never run
    (corral calls every hook as a plain function), one text each."""
    return [
        f"{type(hook).__qualname__}.{point} is an async def: corral calls hooks as plain "
        "functions (on the thread that runs the job, or the caller's), so it would never "
        "run; make it a plain def (run a coroutine in it with asyncio.run, or hand it to "
        "a loop of your own)"
        for point in POINTS
        if inspect.iscoroutinefunction(getattr(hook, point))
        or inspect.isasyncgenfunction(getattr(hook, point))
    ]


#: (hook, point) whose call returned something, said once each.
_returned: set[str] = set()


class HookWatch(Protocol):
    """Told of every hook call about a job (a worker's status pipe, so that
    its supervisor can bound a hook that never returns)."""

    def hook_started(self, job_id: str, hook: str) -> None:
        """``hook`` (``"Class.point"``) is about to run for ``job_id``."""

    def hooks_done(self, job_id: str) -> None:
        """The hooks of one point have run for ``job_id``."""


class HookSet:
    """The hooks of one process, each call guarded: an exception is logged
    and the next hook runs (but :data:`EXITS`, which go on up). A point
    none of them overrides costs nothing. ``watch`` is told of each call
    about a job, but of the first ``builtin`` hooks' (corral's own)."""

    def __init__(
        self, hooks: Iterable[Hooks] = (), *, watch: HookWatch | None = None, builtin: int = 0
    ) -> None:
        self.hooks: tuple[Hooks, ...] = tuple(hooks)
        for hook in self.hooks:
            if not isinstance(hook, Hooks):
                raise TypeError(f"a hook must be a corral.Hooks, not {hook!r}")
            for why in async_points(hook):
                raise TypeError(why)
        self.watch = watch
        # Per point, the bound methods that do something, each with its name
        # ("Class.point") and whether the watch is told of it (not a built-in).
        self._calls: dict[str, list[tuple[Callable[..., None], str, bool]]] = {
            point: [
                (getattr(hook, point), f"{type(hook).__qualname__}.{point}", i >= builtin)
                for i, hook in enumerate(self.hooks)
                if getattr(type(hook), point) is not getattr(Hooks, point)
            ]
            for point in POINTS
        }
        #: The points with a hook the watch is told of.
        self._watched = {point for point, calls in self._calls.items() if any(c[2] for c in calls)}

    def __bool__(self) -> bool:
        return bool(self.hooks)

    def before_enqueue(self, job: Enqueuing, budget: CallBudget | None = None) -> None:
        """``before_enqueue`` of each hook, within ``budget`` if given: one
        that returns past its deadline raises HookTimeout (the hooks after
        it do not run)."""
        if budget is None:
            self._run("before_enqueue", job.job_id, job)
            return
        for call, name, _ in self._calls["before_enqueue"]:
            started = time.monotonic()
            self._guarded(call, "before_enqueue", job.job_id, (job,), None)
            budget.spent(name, job, started)

    def before_job(self, ctx: JobContext) -> None:
        """``before_job`` of each hook. A soft timeout that fires meanwhile
        is the job's: it goes on up (and ends the try)."""
        self._run("before_job", ctx.job_id, ctx, reraise=SoftTimeout)

    def job_ended(self, ctx: JobContext, end: JobEnd) -> None:
        """``on_failure`` or ``on_retry`` as ``end`` says, then ``after_job``."""
        if end.error is not None:
            point = "on_retry" if end.outcome == "retry_asked" else "on_failure"
            self._run(point, ctx.job_id, ctx, end.error)
        self._run("after_job", ctx.job_id, ctx, end)

    def close(self) -> None:
        self._run("close", None)

    def _run(
        self,
        point: str,
        job_id: str | None,
        *args: Any,
        reraise: type[BaseException] | None = None,
    ) -> None:
        calls = self._calls[point]
        watch = self.watch
        if watch is None or job_id is None or point not in self._watched:
            for call, _, _ in calls:
                self._guarded(call, point, job_id, args, reraise)
            return
        try:
            for call, name, watched in calls:
                if watched:
                    watch.hook_started(job_id, name)
                self._guarded(call, point, job_id, args, reraise)
        finally:
            watch.hooks_done(job_id)

    @staticmethod
    def _guarded(
        call: Callable[..., object],  # (a hook returns None; one that does not is said)
        point: str,
        job_id: str | None,
        args: tuple[Any, ...],
        reraise: type[BaseException] | None,
    ) -> None:
        try:
            returned = call(*args)
        except EXITS:  # Ctrl-C, sys.exit: the process is asked to stop
            raise
        except BaseException as exc:  # a hook never breaks a job or a worker
            if reraise is not None and isinstance(exc, reraise):
                raise
            _logger().exception(
                "hook.failed",
                hook=type(getattr(call, "__self__", call)).__qualname__,
                point=point,
                job_id=job_id,
                error=f"{type(exc).__name__}: {exc}"[:500],
            )
            return
        if returned is not None:
            _said_returned(call, point, returned)


def _said_returned(call: Callable[..., Any], point: str, returned: Any) -> None:
    """A hook returned something, which corral ignores: say so, once per
    hook and point (a coroutine, from a plain def that calls an async
    function without awaiting it, is closed: it never ran)."""
    if inspect.iscoroutine(returned):
        returned.close()
    name = f"{type(getattr(call, '__self__', call)).__qualname__}.{point}"
    if name in _returned or len(_returned) > 1000:
        return
    _returned.add(name)
    _logger().warning(
        "hook.returned",
        hook=name,
        returned=repr(returned)[:200],
        hint="corral ignores what a hook returns; a coroutine or future returned here "
        "never ran: await it inside the hook (asyncio.run) or drop the return",
    )


def _logger() -> Any:
    # structlog is imported when a hook fails, not with the module: a
    # client's import of corral stays light.
    import structlog

    return structlog.get_logger()


def find_factory(spec: str) -> Callable[[], Any]:
    """The function a hooks entry names: ``"module"`` (its
    ``corral_hooks``) or ``"module:function"``, imported. Raises HookError
    naming the entry and what to do."""
    from corral.workers.registry import import_or_raise

    module_name, _, attr = spec.partition(":")
    attr = attr or FACTORY
    module = import_or_raise(
        module_name, HookError, "hooks module", "Check the hooks list and python_path"
    )
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise HookError(
            f"hooks module {module_name!r} has no function {attr}(): define "
            f'`def {attr}() -> corral.Hooks` in it, or name another as "{module_name}:FUNCTION"'
        )
    return factory  # type: ignore[no-any-return]


def load_hooks(specs: Iterable[str]) -> list[Hooks]:
    """The hooks of each entry (see :func:`find_factory`): its function
    called, for a :class:`Hooks` or a list of them. Raises HookError."""
    loaded: list[Hooks] = []
    for spec in specs:
        factory = find_factory(spec)
        try:
            made = factory()
        except (Exception, SystemExit) as exc:
            raise HookError(
                f"hooks {spec!r}: {_name(factory)}() raised {type(exc).__name__}: {exc}"
            ) from exc
        items = made if isinstance(made, Sequence) and not isinstance(made, str | bytes) else [made]
        for item in items:
            if not isinstance(item, Hooks):
                raise HookError(
                    f"hooks {spec!r}: {_name(factory)}() returned {item!r}, not a corral.Hooks "
                    "(or a list of them): subclass corral.Hooks"
                )
            for why in async_points(item):
                raise HookError(f"hooks {spec!r}: {why}")
            loaded.append(item)
    return loaded


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", repr(fn))
