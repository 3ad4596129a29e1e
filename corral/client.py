"""``corral.Client`` (blocking) and ``corral.AsyncClient`` (asyncio).

Every operation of a client is written once, in
:class:`~corral.clientcore.ClientCore`, as a :class:`~corral.clientcore.Step`:
the request to send and how to read its reply. The two clients here only
drive steps over a socket, one blocking, one awaited; each of their public
methods is a core operation bound by :func:`_blocking` or :func:`_awaiting`,
so the two cannot drift apart in names, arguments, replies or docs.

A request that gets no answer within the timeout raises BrokerUnavailable
and the blocking client throws its socket away (the lazy pirate pattern), so
a late reply or a queued request never surfaces later. Within the timeout,
a request the broker answers the same way twice (see
:data:`~corral.clientcore.RESENDABLE`) is sent again every
:data:`~corral.clientcore.RESEND_INTERVAL` seconds without an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import math
import os
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Concatenate, ParamSpec, Self, TypeVar

import zmq
import zmq.asyncio

from corral.broker import protocol as p
from corral.clientcore import (
    ClientCore,
    Job,
    JobPage,
    Plan,
    Step,
    decode_reply,
    encode_request,
    resend_every,
)
from corral.errors import BrokerUnavailable
from corral.hooks import Hooks, HookSet
from corral.transport import connect_dealer

#: The job specs the clients take and the pages they give, defined with the core.
__all__ = ["DEFAULT_TIMEOUT", "AsyncClient", "Client", "Job", "JobPage"]

DEFAULT_TIMEOUT = 5.0
#: The broker's default broker.max_message_size.
DEFAULT_MAX_MESSAGE = 16 * 1024 * 1024

T = TypeVar("T")
P = ParamSpec("P")


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
        return self._run(op(self._core, *args, **kwargs))

    method.__qualname__ = f"Client.{op.__name__}"
    method.__signature__ = _signature(op)  # type: ignore[attr-defined]
    return method


def _awaiting(
    op: Callable[Concatenate[ClientCore, P], Plan[T]],
) -> Callable[Concatenate[AsyncClient, P], Coroutine[Any, Any, T]]:
    """The core operation ``op`` as an :class:`AsyncClient` coroutine method."""

    @functools.wraps(op)
    async def method(self: AsyncClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._run(op(self._core, *args, **kwargs))

    method.__qualname__ = f"AsyncClient.{op.__name__}"
    method.__signature__ = _signature(op)  # type: ignore[attr-defined]
    return method


class _Driver:
    """What both clients hold: where the broker is, the timeout, the core."""

    def __init__(
        self, endpoint: str | None, timeout: float, config: Any, hooks: Iterable[Hooks] = ()
    ) -> None:
        if endpoint is None:
            if config is None:
                raise ValueError("give Client an endpoint or use Client.from_config(path)")
            endpoint = config.client.endpoint or config.broker.client_endpoint
        self.endpoint: str = endpoint
        self.timeout = timeout
        self.config = config
        self.max_message_size: int = (
            config.broker.max_message_size if config is not None else DEFAULT_MAX_MESSAGE
        )
        self._core = ClientCore(hooks=HookSet(hooks))

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

    def _unavailable(self, timeout: float) -> BrokerUnavailable:
        hint = "is `corral run` (or `corral broker`) running there?"
        security = getattr(self.config, "security", None)
        if self.endpoint.startswith("tcp://") and getattr(security, "server_public_key", None):
            # A CURVE handshake the broker refuses is silent on this side.
            hint += (
                " Over tcp a refused CURVE key looks the same: check that"
                " security.server_public_key is the broker's and that the broker"
                " authorizes this client's key (security.client_secret_key)"
            )
        return BrokerUnavailable(
            f"no answer from the broker at {self.endpoint} within {timeout:g}s; {hint}"
        )


class Client(_Driver):
    """A blocking client of one broker. Not thread-safe: use one per thread.

    ``endpoint`` is the broker's client endpoint (``ipc://...`` or, with
    CURVE keys in ``config``, ``tcp://...``); ``timeout`` is the seconds
    each request waits for an answer before BrokerUnavailable; ``hooks``
    (``corral.Hooks``) see every job before it is sent.
    """

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
        self._ctx = context or zmq.Context.instance()
        self._sock: zmq.Socket[Any] | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket; the next request opens a new one."""
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def _run(self, plan: Plan[T]) -> T:
        """Send each step's request and read its reply until the operation has its value."""
        while isinstance(plan, Step):
            plan = plan.answer(self._call(plan.request, plan.wait))
        return plan

    def _call(self, request: p.ClientRequest, wait: float) -> p.ClientReply:
        """Send one request and return its reply."""
        timeout = self.timeout + wait
        deadline = time.monotonic() + timeout
        if self._sock is None:
            self._sock = connect_dealer(self._ctx, self.endpoint, self.config)
        sock = self._sock
        body = encode_request(request, self.max_message_size)
        every = resend_every(request, wait)
        while True:
            try:
                sock.send(body, zmq.NOBLOCK)
                break
            except zmq.Again:
                if time.monotonic() >= deadline:
                    self.close()
                    raise self._unavailable(timeout) from None
                sock.poll(50, zmq.POLLOUT)
        resend_at = time.monotonic() + every if every is not None else math.inf
        while True:
            now = time.monotonic()
            if now >= deadline:
                self.close()
                raise self._unavailable(timeout)
            if now >= resend_at:  # no answer yet: the same request again
                with contextlib.suppress(zmq.Again):
                    sock.send(body, zmq.NOBLOCK)
                resend_at = now + (every or math.inf)
            if sock.poll(math.ceil((min(deadline, resend_at) - now) * 1000), zmq.POLLIN):
                reply = decode_reply(sock.recv())
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


class AsyncClient(_Driver):
    """The methods of :class:`Client`, as coroutines. Many requests may be in
    flight at once on its one socket; use it from one event loop."""

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        config: Any = None,
        context: zmq.asyncio.Context | None = None,
        hooks: Iterable[Hooks] = (),
    ) -> None:
        super().__init__(endpoint, timeout, config, hooks)
        self._ctx = context or zmq.asyncio.Context.instance()
        self._sock: zmq.asyncio.Socket | None = None
        self._pending: dict[int, asyncio.Future[p.ClientReply]] = {}
        self._reader: asyncio.Future[None] | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket; the next request opens a new one."""
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    async def _run(self, plan: Plan[T]) -> T:
        """Send each step's request and read its reply until the operation has its value."""
        while isinstance(plan, Step):
            plan = plan.answer(await self._call(plan.request, plan.wait))
        return plan

    async def _call(self, request: p.ClientRequest, wait: float) -> p.ClientReply:
        """Send one request and return its reply; a single reader task hands
        each reply to its request by id."""
        timeout = self.timeout + wait
        deadline = time.monotonic() + timeout
        if self._sock is None:
            self._sock = connect_dealer(self._ctx, self.endpoint, self.config)
        sock = self._sock
        body = encode_request(request, self.max_message_size)
        while True:
            try:
                await sock.send(body, zmq.NOBLOCK)
                break
            except zmq.Again:
                if time.monotonic() >= deadline:
                    raise self._unavailable(timeout) from None
                await sock.poll(50, zmq.POLLOUT)  # type: ignore[call-arg]  # pyzmq's stub
        future: asyncio.Future[p.ClientReply] = asyncio.get_running_loop().create_future()
        self._pending[request.req] = future
        if self._reader is None or self._reader.done():
            self._reader = asyncio.ensure_future(self._read_replies(sock))
        every = resend_every(request, wait)
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._unavailable(timeout)
                try:
                    return await asyncio.wait_for(asyncio.shield(future), min(left, every or left))
                except TimeoutError:
                    if every is not None and deadline - time.monotonic() > 0:
                        with contextlib.suppress(zmq.Again):
                            await sock.send(body, zmq.NOBLOCK)  # the same request again
        finally:
            self._pending.pop(request.req, None)

    async def _read_replies(self, sock: zmq.asyncio.Socket) -> None:
        while self._pending and sock is self._sock:
            try:
                frame = await sock.recv()
            except zmq.ZMQError:
                return
            reply = decode_reply(frame)
            if reply.req == 0:  # a request the broker could not read: fail them all
                for future in self._pending.values():
                    if not future.done():
                        future.set_result(reply)
                continue
            waiting = self._pending.get(reply.req)
            if waiting is not None and not waiting.done():
                waiting.set_result(reply)

    enqueue = _awaiting(ClientCore.enqueue)
    enqueue_many = _awaiting(ClientCore.enqueue_many)
    enqueue_chain = _awaiting(ClientCore.enqueue_chain)
    enqueue_group = _awaiting(ClientCore.enqueue_group)
    job = _awaiting(ClientCore.job)
    result = _awaiting(ClientCore.result)
    status = _awaiting(ClientCore.status)
    ping = _awaiting(ClientCore.ping)
    chain = _awaiting(ClientCore.chain)
    group = _awaiting(ClientCore.group)
    jobs = _awaiting(ClientCore.jobs)
    cancel = _awaiting(ClientCore.cancel)
    retry = _awaiting(ClientCore.retry)
    retry_failed = _awaiting(ClientCore.retry_failed)
    delete = _awaiting(ClientCore.delete)
    purge = _awaiting(ClientCore.purge)
    pause = _awaiting(ClientCore.pause)
    resume = _awaiting(ClientCore.resume)
    report_supervisor = _awaiting(ClientCore.report_supervisor)
    worker_exited = _awaiting(ClientCore.worker_exited)
