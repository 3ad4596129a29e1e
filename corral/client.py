"""``corral.Client`` (blocking); ``corral.AsyncClient`` (asyncio) is in
:mod:`corral.asyncclient`, on the same parts.

Every operation of a client is written once, in
:class:`~corral.clientcore.ClientCore`, as a :class:`~corral.clientcore.Step`:
the request to send and how to read its reply. The two clients here only
drive steps over a socket, one blocking, one awaited; each of their public
methods is a core operation bound by :func:`_blocking` (or
:func:`corral.asyncclient._awaiting`),
so the two cannot drift apart in names, arguments, replies or docs.

A call's timeout starts with the call: the ``before_enqueue`` hooks of its
jobs run first, in the caller's thread or task (a hook that returns past
the timeout raises HookTimeout, nothing sent), and its first request has
what they left (a :class:`~corral.hooks.CallBudget`, passed to the core's
job specs in :data:`~corral.clientjobs.call_budget`). A request that gets
no answer within the timeout raises BrokerUnavailable and the blocking
client throws its socket away (the lazy pirate pattern), so a late reply
or a queued request never surfaces later. Within the timeout, a request
the broker answers the same way twice (see
:data:`~corral.clientcore.RESENDABLE`) is sent again after
:data:`~corral.clientcore.RESEND_INTERVAL` seconds without an answer, then
after twice that, and so on up to
:data:`~corral.clientcore.RESEND_INTERVAL_MAX`.

Sharing. A ZeroMQ socket belongs to one thread at a time, and to the process
that made it. The blocking client keeps a small pool of DEALER sockets
(:class:`_Sockets`): each request takes one no other thread holds and puts it
back, so any number of threads can share one client, and a single thread
keeps reusing one socket. Both clients note the process their sockets were
made in (:class:`_ThisProcess`, kept current by an at-fork hook); a forked
child sets the parent's sockets aside, never closing them (a zmq.asyncio
socket closed there would leave the epoll set the two processes share), and
opens its own from the child's ``zmq.Context.instance()``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, Self, TypeVar

import zmq

from corral.broker import protocol as p
from corral.broker.jobspec import MAX_SECONDS
from corral.clientcore import (
    BIG_REQUEST,
    ClientCore,
    Job,
    JobPage,
    Plan,
    Step,
    check_broker_limit,
    decode_reply,
    encode_request,
    resend_every,
)
from corral.clientjobs import call_budget
from corral.errors import BrokerUnavailable
from corral.hooks import CallBudget, Hooks, HookSet
from corral.transport import connect_dealer

if TYPE_CHECKING:
    from corral.asyncclient import AsyncClient

#: The job specs the clients take and the pages they give, defined with the core.
__all__ = ["DEFAULT_TIMEOUT", "AsyncClient", "Client", "Job", "JobPage"]

DEFAULT_TIMEOUT = 5.0
#: zmq.POLLIN as a plain int: pyzmq's flag enums cost a conversion per call.
_POLLIN = int(zmq.POLLIN)
#: The broker's default broker.max_message_size.
DEFAULT_MAX_MESSAGE = 16 * 1024 * 1024

T = TypeVar("T")
P = ParamSpec("P")

#: What a forked child's clients inherited from the parent (sockets, a
#: reader task), kept for the child's life so that neither the client nor
#: the garbage collector ever closes them there: closing a zmq.asyncio
#: socket unregisters it from its event loop's epoll set, which the child
#: shares with the parent, and the parent's socket would go deaf.
_INHERITED: list[object] = []


class _ThisProcess:
    """This process's id, read on every request without a system call: set
    when a client is made, and in every forked child by an at-fork hook
    (which runs for any fork that goes on running Python: ``os.fork``,
    multiprocessing, gunicorn, uWSGI)."""

    pid = 0

    @classmethod
    def watch(cls) -> int:
        """Start keeping :attr:`pid` current (once per process tree); returns it."""
        if cls.pid == 0:
            os.register_at_fork(after_in_child=cls._forked)
        cls.pid = os.getpid()
        return cls.pid

    @classmethod
    def _forked(cls) -> None:
        cls.pid = os.getpid()


def _signature(op: Callable[..., Any]) -> inspect.Signature:
    """``op``'s signature as a client method has it: ``-> Plan[X]`` reads ``-> X``."""
    signature = inspect.signature(op)
    returns = str(signature.return_annotation).removeprefix("Plan[").removesuffix("]")
    return signature.replace(return_annotation=returns)


def _blocking(
    op: Callable[Concatenate[ClientCore, P], Plan[T]],
) -> Callable[Concatenate[Client, P], T]:
    """The core operation ``op`` as a :class:`Client` method."""

    @functools.wraps(op)
    def method(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> T:
        budget = self._budget()
        return self._run(self._plan(budget, op, *args, **kwargs), budget)

    method.__qualname__ = f"Client.{op.__name__}"
    method.__signature__ = _signature(op)  # type: ignore[attr-defined]
    return method


def _checked_timeout(timeout: Any) -> float:
    """``timeout`` if it is a number of seconds above 0 and at most 100
    years (:data:`~corral.broker.jobspec.MAX_SECONDS`, as the config's
    durations: each call would otherwise hang, give up at once, or overflow
    the socket poll's milliseconds); else TypeError or ValueError."""
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise TypeError(f"timeout: expected a number of seconds, got {timeout!r}")
    if not 0 < timeout <= MAX_SECONDS:
        raise ValueError(
            f"timeout: must be a number of seconds above 0 and at most {MAX_SECONDS:.0f} "
            f"(100 years), got {timeout!r}"
        )
    return float(timeout)


def _checked_endpoint(endpoint: Any) -> str:
    """``endpoint`` if a client can connect to it (see
    :func:`corral.config.endpoints.endpoint_problem`); else ValueError
    naming it and the forms accepted."""
    from corral.config.endpoints import endpoint_problem

    problem = endpoint_problem(endpoint, connect=True)
    if problem is not None:
        raise ValueError(f"broker endpoint: {problem}")
    return str(endpoint)


class _Driver:
    """What both clients hold: where the broker is, the timeout, the core."""

    def __init__(
        self, endpoint: str | None, timeout: float, config: Any, hooks: Iterable[Hooks] = ()
    ) -> None:
        if endpoint is None:
            if config is None:
                raise ValueError("give Client an endpoint or use Client.from_config(path)")
            endpoint = config.client.endpoint or config.broker.client_endpoint
        self.endpoint: str = _checked_endpoint(endpoint)
        self.timeout = _checked_timeout(timeout)
        self.config = config
        self.max_message_size: int = (
            config.broker.max_message_size if config is not None else DEFAULT_MAX_MESSAGE
        )
        self._core = ClientCore(hooks=HookSet(hooks))
        #: The broker's max_message_size, once a large request asked it
        #: (None: not yet; 0: the broker did not say).
        self._broker_limit: int | None = None
        #: The process the client was made in: its given context is that
        #: process's; a forked child uses its own.
        self._pid = _ThisProcess.watch()

    @classmethod
    def from_config(cls, path: str | os.PathLike[str], **kwargs: Any) -> Self:
        """A client of the broker a corral TOML config names (``client.endpoint``,
        else ``broker.client_endpoint``), with its CURVE keys, message size
        limit, ``client.timeout`` (seconds) unless ``timeout`` is given, and
        the config's top-level ``hooks`` (before any ``hooks`` given).
        Raises ConfigError for a config that cannot be used, HookError for
        a hooks module that cannot be loaded."""
        from corral.config import load
        from corral.hooks import load_hooks
        from corral.workers.registry import add_python_path

        config = load(path)
        kwargs.setdefault("timeout", config.client.timeout)
        if config.hooks:
            add_python_path(config.python_path)
            kwargs["hooks"] = [*load_hooks(config.hooks), *kwargs.get("hooks", ())]
        return cls(None, config=config, **kwargs)

    def _budget(self) -> CallBudget:
        """The time a call has from now: its hooks' and its first request's."""
        return CallBudget(time.monotonic() + self.timeout, self.timeout)

    def _plan(
        self,
        budget: CallBudget,
        op: Callable[Concatenate[ClientCore, P], Plan[T]],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> Plan[T]:
        """``op``'s plan, its job specs' hooks run within ``budget`` (in
        this thread or task, which they may read context from: a hook
        cannot be stopped, so one that never returns holds the call)."""
        token = call_budget.set(budget)
        try:
            return op(self._core, *args, **kwargs)
        finally:
            call_budget.reset(token)

    def _deadline(self, budget: CallBudget | None, wait: float) -> tuple[float, float]:
        """A request's (deadline, timeout): a call's first request has what
        its ``budget`` left, a later one the whole timeout; plus ``wait``."""
        if budget is not None:
            return budget.deadline + wait, self.timeout + wait
        return time.monotonic() + self.timeout + wait, self.timeout + wait

    def _unavailable(self, timeout: float, budget: CallBudget | None = None) -> BrokerUnavailable:
        hint = _ipc_hint(self.endpoint) or "is `corral run` (or `corral broker`) running there?"
        security = getattr(self.config, "security", None)
        if self.endpoint.startswith("tcp://") and getattr(security, "server_public_key", None):
            # A CURVE handshake the broker refuses is silent on this side.
            hint += (
                " Over tcp a refused CURVE key looks the same: check that"
                " security.server_public_key is the broker's and that the broker"
                " authorizes this client's key (security.client_secret_key)"
            )
        spent = ""
        if budget is not None and budget.hooks >= 0.001:
            spent = f" (of which the before_enqueue hooks took {budget.hooks:.3g}s)"
        return BrokerUnavailable(
            f"no answer from the broker at {self.endpoint} within {timeout:g}s{spent}; {hint}"
        )


def _ipc_hint(endpoint: str) -> str:
    """Why an ipc:// endpoint cannot answer, when its file says so: no
    socket file there (the broker is not running, or another path), or one
    this user may not reach (the kernel refuses each connect, which ZeroMQ
    retries silently). "" otherwise, and for other transports."""
    if not endpoint.startswith("ipc://"):
        return ""
    path = endpoint[len("ipc://") :]
    try:
        os.stat(path)
    except FileNotFoundError:
        return f"no socket file at {path}: is `corral run` (or `corral broker`) running there?"
    except PermissionError:
        return _refused(path)
    except OSError:
        return ""
    return "" if os.access(path, os.R_OK | os.W_OK) else _refused(path)


def _refused(path: str) -> str:
    return (
        f"permission denied on {path} (or a directory on its way) for this user: "
        "the broker's socket_group and socket_mode say who may connect"
    )


class _Sockets:
    """The DEALER sockets of one :class:`Client` in one process, idle ones in
    a LIFO pool: ``take`` gives a socket no other thread holds (a new one if
    none is idle), ``give`` puts it back, or closes it once the pool is
    closed or holds ``keep`` idle sockets already. Lock-free: a list's pop
    and append are atomic."""

    def __init__(
        self, context: zmq.Context[Any] | None, endpoint: str, config: Any, keep: int
    ) -> None:
        #: The process the sockets belong to; a forked child makes its own pool.
        self.pid = _ThisProcess.pid
        self._context = context
        self._endpoint = endpoint
        self._config = config
        self._keep = keep
        self._idle: list[zmq.Socket[Any]] = []
        self._closed = False

    def take(self) -> zmq.Socket[Any]:
        try:
            return self._idle.pop()  # atomic: two threads never get the same one
        except IndexError:
            # None: this process's instance, made at its first socket.
            context = self._context or zmq.Context.instance()
            return connect_dealer(context, self._endpoint, self._config)

    def give(self, sock: zmq.Socket[Any]) -> None:
        if self._closed or len(self._idle) >= self._keep:
            sock.close(linger=0)
            return
        self._idle.append(sock)
        if self._closed:  # close() ran meanwhile and may have missed it
            self._drain()

    def close(self) -> None:
        """Close the idle sockets now, and each one in use when it comes back."""
        self._closed = True
        self._drain()

    def _drain(self) -> None:
        # One at a time, each by whoever pops it: a take() or another drain may race us.
        while True:
            try:
                sock = self._idle.pop()
            except IndexError:
                return
            sock.close(linger=0)


class Client(_Driver):
    """A blocking client of one broker, safe to share between threads and
    across ``fork``.

    ``endpoint`` is the broker's client endpoint (``ipc://...`` or, with
    CURVE keys in ``config``, ``tcp://...``); ``timeout`` is the seconds
    each call may take (its hooks' ``before_enqueue``, then the wait for the
    answer) before BrokerUnavailable (HookTimeout, for a hook past it),
    finite and above 0 (else ValueError, or TypeError for no number);
    ``context`` is the zmq.Context its sockets are made in (default:
    ``zmq.Context.instance()``); ``hooks`` (``corral.Hooks``) see every job
    before it is sent.

    Threads: each request uses a socket no other thread is using at that
    moment, from a pool that keeps at most :attr:`max_idle_sockets` idle;
    one thread alone always reuses the same socket. ``close()`` may be
    called from any thread: idle sockets close at once, those in use as
    their requests end.

    Fork: a client used before ``os.fork`` (gunicorn ``--preload``,
    multiprocessing's fork start method) works in the child: its first
    request there opens a socket in the child's own
    ``zmq.Context.instance()`` (a ``context`` given here belongs to the
    parent and is not used in the child), leaving the parent's sockets as
    they are. The parent goes on with its own.
    """

    #: Idle sockets kept for reuse after a burst of threads; more are closed.
    max_idle_sockets = 8

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        config: Any = None,
        context: zmq.Context[Any] | None = None,
        hooks: Iterable[Hooks] = (),
    ) -> None:
        super().__init__(endpoint, timeout, config, hooks)
        self._context = context
        self._sockets = self._new_sockets()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the sockets (any thread may call it); the next request
        opens a new one. In a forked child, the parent's sockets are left
        alone."""
        sockets, self._sockets = self._sockets, self._new_sockets()
        if sockets.pid == _ThisProcess.pid:
            sockets.close()
        else:
            _INHERITED.append(sockets)

    def _new_sockets(self) -> _Sockets:
        """An empty pool for this process (a given context is the parent's in a child)."""
        context = self._context if self._pid == _ThisProcess.pid else None
        return _Sockets(context, self.endpoint, self.config, self.max_idle_sockets)

    def _run(self, plan: Plan[T], budget: CallBudget | None = None) -> T:
        """Send each step's request and read its reply until the operation
        has its value (the first within what ``budget`` left)."""
        while isinstance(plan, Step):
            plan = plan.answer(self._call(plan.request, plan.wait, budget))
            budget = None
        return plan

    def _check_size(self, request: p.ClientRequest, size: int, budget: CallBudget | None) -> None:
        """A request of ``size`` bytes past any broker's least limit is
        checked against the broker's own max_message_size, asked once (a
        Ping). Raises RequestTooLarge."""
        if size <= BIG_REQUEST or isinstance(request, p.Ping):
            return
        if self._broker_limit is None:
            pong = self._call(p.Ping(next(self._core._req)), 0.0, budget)
            self._broker_limit = getattr(pong, "max_message_size", 0)
        check_broker_limit(size, self._broker_limit)

    def _call(
        self, request: p.ClientRequest, wait: float, budget: CallBudget | None = None
    ) -> p.ClientReply:
        """Send one request on a socket no other thread holds; return its reply."""
        sockets = self._sockets
        if sockets.pid != _ThisProcess.pid:  # forked: the parent's sockets are not ours
            _INHERITED.append(sockets)
            sockets = self._sockets = self._new_sockets()
        body = encode_request(request, self.max_message_size)
        self._check_size(request, len(body), budget)
        sock = sockets.take()
        try:
            reply = self._exchange(sock, request, body, wait, budget)
        except BaseException:
            # No answer, or interrupted: a late reply must never reach the
            # next request, so the socket goes (the lazy pirate pattern).
            sock.close(linger=0)
            raise
        sockets.give(sock)
        return reply

    def _exchange(
        self,
        sock: zmq.Socket[Any],
        request: p.ClientRequest,
        body: bytes,
        wait: float,
        budget: CallBudget | None,
    ) -> p.ClientReply:
        """Send ``body`` on ``sock`` (again every so often, if resendable)
        and wait for its reply, at most the timeout (what ``budget`` left of
        it) plus ``wait`` seconds."""
        deadline, timeout = self._deadline(budget, wait)
        while True:
            try:
                sock.send(body, zmq.NOBLOCK)
                break
            except zmq.Again:
                if time.monotonic() >= deadline:
                    raise self._unavailable(timeout, budget) from None
                sock.poll(50, zmq.POLLOUT)
        every = resend_every(request, wait)
        resend_at = time.monotonic() + every if every is not None else math.inf
        resent = 0
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise self._unavailable(timeout, budget)
            if now >= resend_at:  # no answer yet: the same request again
                with contextlib.suppress(zmq.Again):
                    sock.send(body, zmq.NOBLOCK)
                resent += 1
                resend_at = now + (resend_every(request, wait, resent) or math.inf)
            # zmq_poll on the one socket: Socket.poll makes a Poller per call
            if zmq.zmq_poll([(sock, _POLLIN)], math.ceil((min(deadline, resend_at) - now) * 1000)):
                reply = decode_reply(b"".join(sock.recv_multipart()))
                if reply.req in (request.req, 0):  # 0: the broker could not read it
                    return reply

    enqueue = _blocking(ClientCore.enqueue)
    enqueue_many = _blocking(ClientCore.enqueue_many)
    enqueue_chain = _blocking(ClientCore.enqueue_chain)
    enqueue_group = _blocking(ClientCore.enqueue_group)
    job = _blocking(ClientCore.job)
    result = _blocking(ClientCore.result)
    status = _blocking(ClientCore.status)
    ping = _blocking(ClientCore.ping)
    chain = _blocking(ClientCore.chain)
    group = _blocking(ClientCore.group)
    jobs = _blocking(ClientCore.jobs)
    cancel = _blocking(ClientCore.cancel)
    retry = _blocking(ClientCore.retry)
    retry_failed = _blocking(ClientCore.retry_failed)
    delete = _blocking(ClientCore.delete)
    purge = _blocking(ClientCore.purge)
    pause = _blocking(ClientCore.pause)
    resume = _blocking(ClientCore.resume)
    report_supervisor = _blocking(ClientCore.report_supervisor)
    worker_exited = _blocking(ClientCore.worker_exited)


def __getattr__(name: str) -> Any:
    """``AsyncClient`` lives in :mod:`corral.asyncclient`, imported on first
    use: a blocking client's process never loads asyncio."""
    if name == "AsyncClient":
        from corral.asyncclient import AsyncClient

        return AsyncClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
