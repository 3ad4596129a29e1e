"""``corral.AsyncClient``: the methods of :class:`corral.Client` as
coroutines, over one zmq.asyncio DEALER socket. Kept apart from the blocking
client so that a process that never awaits a request never imports asyncio
(``corral.client.AsyncClient`` still names it, imported on first use). See
:mod:`corral.client` for how both drive the core's operations, and for
sharing and fork."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Concatenate, ParamSpec, Self, TypeVar, cast

import msgspec
import zmq
import zmq.asyncio

from corral.broker import protocol as p
from corral.broker.jobspec import JobSpec
from corral.client import _INHERITED, DEFAULT_TIMEOUT, _Driver, _signature, _ThisProcess
from corral.clientcore import (
    BIG_REQUEST,
    ClientCore,
    Plan,
    Step,
    check_broker_limit,
    decode_reply,
    encode_request,
    resend_every,
)
from corral.hooks import CallBudget, Hooks
from corral.transport import connect_dealer

__all__ = ["AsyncClient"]

T = TypeVar("T")
P = ParamSpec("P")


#: The most enqueues one EnqueueEach joins, and the most bytes of their
#: specs: under BIG_REQUEST, so that any broker takes it unasked. More
#: requests of fewer jobs let the broker work on one while the client makes
#: the next: with 100 in flight, 32 a request drained 42k jobs/s where 16
#: did 35k and 64 or 256 36 to 38k (bench/cpu.py --only async, fsync always).
JOIN_MAX = 32
JOIN_BYTES = BIG_REQUEST - 512


def _awaiting(
    op: Callable[Concatenate[ClientCore, P], Plan[T]],
) -> Callable[Concatenate[AsyncClient, P], Coroutine[Any, Any, T]]:
    """The core operation ``op`` as an :class:`AsyncClient` coroutine method."""

    @functools.wraps(op)
    async def method(self: AsyncClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        budget = self._budget()
        return await self._run(self._plan(budget, op, *args, **kwargs), budget)

    method.__qualname__ = f"AsyncClient.{op.__name__}"
    method.__signature__ = _signature(op)  # type: ignore[attr-defined]
    return method


def _joining(
    op: Callable[Concatenate[ClientCore, P], Plan[T]],
) -> Callable[Concatenate[AsyncClient, P], Coroutine[Any, Any, T]]:
    """:func:`_awaiting`, for an enqueue of one job: while other requests
    are in flight, it goes out with the others made in the same turn of the
    event loop (see :meth:`AsyncClient._join`)."""

    @functools.wraps(op)
    async def method(self: AsyncClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        budget = self._budget()
        plan = self._plan(budget, op, *args, **kwargs)
        if isinstance(plan, Step) and self._pending and self._each:
            return cast(T, await self._join(plan, budget))
        return await self._run(plan, budget)

    method.__qualname__ = f"AsyncClient.{op.__name__}"
    method.__signature__ = _signature(op)  # type: ignore[attr-defined]
    return method


class _Expired(Exception):
    """A request's wait for its reply ran out (raised into its future)."""


def _settle(
    future: asyncio.Future[Any], exc: BaseException | None = None, value: Any = None
) -> None:
    """End ``future`` with ``exc``, else ``value``, unless it ended already
    (its caller was cancelled)."""
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(value)


class _Joined:
    """Enqueues made in one turn of the event loop, to go out as one
    :class:`~corral.broker.protocol.EnqueueEach` (see AsyncClient._join)."""

    __slots__ = ("budget", "members", "size")

    def __init__(self, budget: CallBudget) -> None:
        #: The latest deadline of them all (the last call's): the request
        #: goes when the turn ends, after every call's hooks ran, so the
        #: first call's deadline may be past by then through no fault of
        #: the broker (the hooks of the calls after it blocked the loop).
        self.budget = budget
        #: (plan, encoded spec, future of its value) per call, in order.
        self.members: list[tuple[Step[Any], bytes, asyncio.Future[Any]]] = []
        self.size = 0


class AsyncClient(_Driver):
    """The methods of :class:`Client`, as coroutines. Many requests may be in
    flight at once on its one socket, from any number of tasks of one event
    loop at a time; it is not for several threads or loops at once (give
    each its own AsyncClient, or use :class:`Client`).

    Enqueues made at once join: while any request is in flight, the
    one-job enqueues the tasks make in one turn of the event loop go to the
    broker together, up to :data:`JOIN_MAX` a message, and each call still
    gets its own id or its own error (the broker takes or refuses each job
    as if it came alone). A lone enqueue goes at once, by itself.

    Fork: a client used before ``os.fork`` works in the child's event
    loop; its first request (or ``close()``) there sets aside the parent's
    socket, reader task and waiting requests, never closing them, and opens
    a socket in the child's own ``zmq.asyncio.Context.instance()`` (a
    ``context`` given here is the parent's).
    """

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
        #: The enqueues joining in this turn of the loop; None: none.
        self._joined: _Joined | None = None
        #: The tasks sending joined enqueues (held here until done).
        self._senders: set[asyncio.Future[None]] = set()
        #: False once the broker has refused an EnqueueEach (an older one).
        self._each = True
        #: The event loop of the last call; None: none yet.
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket; the next request opens a new one. In a forked
        child, the parent's socket is left alone."""
        if self._pid != _ThisProcess.pid:
            self._forked()
            return
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def _forked(self) -> None:
        """Set aside what belongs to the parent (its socket, reader task and
        futures are bound to its context and loop), closing nothing."""
        _INHERITED.append((self._sock, self._reader, self._pending))
        self._pid = _ThisProcess.pid
        self._ctx = zmq.asyncio.Context.instance()
        self._sock = None
        self._reader = None
        self._pending = {}
        self._joined = None
        self._senders = set()

    def _here(self) -> asyncio.AbstractEventLoop:
        """The running loop, once what a fork or another loop left is set
        aside (see :meth:`_forked`, :meth:`_in_loop`)."""
        if self._pid != _ThisProcess.pid:
            self._forked()
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._in_loop(loop)
        return loop

    def _in_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """A call runs in ``loop``. When the last one ran in another loop
        that stopped with work left (a request in flight, its reader task,
        enqueues joined but unsent: a loop stopped mid-call, never to run
        again), that work is set aside, as after a fork: its futures and
        tasks belong to that loop, and its reader, never done, would keep
        this loop's from starting. The socket is closed (its replies answer
        nobody now). A loop that ended cleanly (``asyncio.run`` cancels and
        finishes what is left) leaves nothing: the socket is kept."""
        old, self._loop = self._loop, loop
        if old is None or old is loop:
            return
        reader = self._reader
        if not self._pending and self._joined is None and (reader is None or reader.done()):
            return
        _INHERITED.append((self._sock, reader, self._pending))
        if self._sock is not None:
            with contextlib.suppress(Exception):  # (its loop may be closed)
                self._sock.close(linger=0)
        self._sock = None
        self._reader = None
        self._pending = {}
        self._joined = None
        self._senders = set()

    async def _run(self, plan: Plan[T], budget: CallBudget | None = None) -> T:
        """Send each step's request and read its reply until the operation
        has its value (the first within what ``budget`` left)."""
        while isinstance(plan, Step):
            plan = plan.answer(await self._call(plan.request, plan.wait, budget))
            budget = None
        return plan

    def _join(self, plan: Step[Any], budget: CallBudget) -> asyncio.Future[Any]:
        """Have a one-job enqueue go out with the others made in this turn
        of the event loop, as one EnqueueEach (the broker takes or refuses
        each job on its own, so one call's bad job fails that call only);
        the future of its value. Asked only while other requests are in
        flight: a lone enqueue goes out at once. Like Nagle's algorithm, or
        a Kafka producer's batches: many tasks enqueueing at once cost the
        broker and this process a message per turn instead of one per job
        (the 100-in-flight figure in docs/PERFORMANCE.md)."""
        loop = self._here()
        future: asyncio.Future[Any] = loop.create_future()
        request = cast(p.Enqueue, plan.request)
        body = p.encode_struct(request.jobs[0]) if len(request.jobs) == 1 else b""
        if not body or len(body) > JOIN_BYTES:  # (none such: enqueue makes one job)
            self._senders_start(self._alone(plan, budget, future))
            return future
        joined = self._joined
        if (
            joined is None
            or len(joined.members) >= JOIN_MAX
            or joined.size + len(body) > JOIN_BYTES
        ):
            joined = self._joined = _Joined(budget)
            loop.call_soon(self._send_joined, joined)  # after the turn's other callbacks
        joined.members.append((plan, body, future))
        joined.size += len(body)
        if budget.deadline > joined.budget.deadline:
            joined.budget = budget
        return future

    def _senders_start(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._senders.add(task)
        task.add_done_callback(self._senders.discard)

    def _send_joined(self, joined: _Joined) -> None:
        if self._joined is joined:
            self._joined = None
        # a task of its own: a call cancelled while it waits cancels only its own future
        self._senders_start(self._send_each(joined))

    async def _alone(
        self, plan: Step[Any], budget: CallBudget, future: asyncio.Future[Any]
    ) -> None:
        """Send one call's request by itself; its outcome to ``future``."""
        try:
            value = await self._run(plan, budget)
        except Exception as exc:
            _settle(future, exc)
        else:
            _settle(future, value=value)

    async def _send_each(self, joined: _Joined) -> None:
        """Send ``joined``'s calls (those not cancelled meanwhile) as one
        EnqueueEach, and answer each from its own part of the reply. Its
        callers wait on nothing else: whatever ends this task ends each
        call not answered yet."""
        members = [m for m in joined.members if not m[2].done()]
        try:
            await self._send_members(joined, members)
        except BaseException as exc:
            for _, _, future in members:
                _settle(future, exc)
            raise

    async def _send_members(
        self, joined: _Joined, members: list[tuple[Step[Any], bytes, asyncio.Future[Any]]]
    ) -> None:
        if len(members) > 1 and self._each:
            specs = [msgspec.Raw(body) for _, body, _ in members]
            request = p.EnqueueEach(next(self._core._req), cast(list[JobSpec], specs))
            try:
                reply = await self._call(request, 0.0, joined.budget)
            except Exception as exc:
                for _, _, future in members:
                    _settle(future, exc)
                return
            unread = isinstance(reply, p.ErrorReply) and reply.message.startswith("bad request")
            if not unread:
                answers: list[p.ClientReply] = (
                    list(reply.replies)
                    if isinstance(reply, p.EachReply) and len(reply.replies) == len(members)
                    else [reply] * len(members)  # refused whole (a full disk, say)
                )
                for (plan, _, future), answer in zip(members, answers, strict=True):
                    try:
                        value = plan.answer(answer)
                    except Exception as exc:
                        _settle(future, exc)
                    else:
                        _settle(future, value=value)
                return
            # each alone: its own error names the job the broker could not
            # read; a broker that does not know EnqueueEach (an older one)
            # gets each alone from now on
            if isinstance(reply, p.ErrorReply) and "'enqueueeach'" in reply.message:
                self._each = False
        for plan, _, future in members:
            self._senders_start(self._alone(plan, joined.budget, future))

    async def _check_size(
        self, request: p.ClientRequest, size: int, budget: CallBudget | None
    ) -> None:
        """A request of ``size`` bytes past any broker's least limit is
        checked against the broker's own max_message_size, asked once (a
        Ping). Raises RequestTooLarge."""
        if size <= BIG_REQUEST or isinstance(request, p.Ping):
            return
        if self._broker_limit is None:
            pong = await self._call(p.Ping(next(self._core._req)), 0.0, budget)
            self._broker_limit = getattr(pong, "max_message_size", 0)
        check_broker_limit(size, self._broker_limit)

    async def _call(
        self, request: p.ClientRequest, wait: float, budget: CallBudget | None = None
    ) -> p.ClientReply:
        """Send one request and return its reply; a single reader task hands
        each reply to its request by id."""
        deadline, timeout = self._deadline(budget, wait)
        loop = self._here()
        if self._sock is None:
            self._sock = connect_dealer(self._ctx, self.endpoint, self.config)
        body = encode_request(request, self.max_message_size)
        await self._check_size(request, len(body), budget)
        sock = self._sock
        while True:
            try:
                await sock.send(body, zmq.NOBLOCK)
                break
            except zmq.Again:
                if time.monotonic() >= deadline:
                    self._drop_if_idle(sock)
                    raise self._unavailable(timeout, budget) from None
                await sock.poll(50, zmq.POLLOUT)  # type: ignore[call-arg]  # pyzmq's stub
        req = request.req
        future: asyncio.Future[p.ClientReply] = loop.create_future()
        self._pending[req] = future
        if self._reader is None or self._reader.done():
            self._reader = asyncio.ensure_future(self._read_replies(sock))
        every = resend_every(request, wait)
        resent = 0
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._pending.pop(req, None)
                    self._drop_if_idle(sock)
                    raise self._unavailable(timeout, budget)
                # The reply's future itself is awaited, with one timer: no
                # shield, no wait_for (they cost a future, a task step and a
                # callback each, per request).
                timer = loop.call_later(min(left, every or left), self._expire, req, future)
                try:
                    return await future
                except _Expired:
                    future = self._pending[req]  # the one _expire put there
                    if future.done():  # the reply came between the timer and here
                        return future.result()
                finally:
                    timer.cancel()
                if every is not None and deadline - time.monotonic() > 0:
                    with contextlib.suppress(zmq.Again):
                        await sock.send(body, zmq.NOBLOCK)  # the same request again
                    resent += 1
                    every = resend_every(request, wait, resent)
        finally:
            self._pending.pop(req, None)

    def _expire(self, req: int, future: asyncio.Future[p.ClientReply]) -> None:
        """No reply to ``req`` in time: a fresh future takes its reply from
        now on (so none is lost while the caller wakes), and the awaited
        one ends with :class:`_Expired`."""
        if future.done() or self._pending.get(req) is not future:
            return
        self._pending[req] = future.get_loop().create_future()
        future.set_exception(_Expired())

    def _drop_if_idle(self, sock: zmq.asyncio.Socket) -> None:
        """A request had no answer in time: with no other request in
        flight, close the socket, so the next request connects afresh. A
        broker that refused the connection (a key it did not know then, or
        ``broker.max_connections`` reached) is asked again that way: libzmq
        does not connect again by itself after a refused handshake."""
        if not self._pending and sock is self._sock:
            self.close()

    async def _read_replies(self, sock: zmq.asyncio.Socket) -> None:
        while self._pending and sock is self._sock:
            try:
                frames = await sock.recv_multipart()
            except zmq.ZMQError:
                return
            try:
                reply = decode_reply(b"".join(frames))
            except p.ProtocolError as exc:  # the call(s) it answers fail with it
                self._fail_pending(exc)
                continue
            if reply.req == 0:  # a request the broker could not read: fail them all
                for future in self._pending.values():
                    if not future.done():
                        future.set_result(reply)
                continue
            waiting = self._pending.get(reply.req)
            if waiting is not None and not waiting.done():
                waiting.set_result(reply)

    def _fail_pending(self, exc: p.ProtocolError) -> None:
        """A reply that cannot be read (another protocol version): the call
        it answers raises ``exc`` (every call waiting, if its request
        number cannot be read), as the blocking client's would, rather than
        waiting out its timeout."""
        waiting = self._pending.get(exc.req) if exc.req else None
        futures = [waiting] if waiting is not None else list(self._pending.values())
        for future in futures:
            if not future.done():
                future.set_exception(exc)

    enqueue = _joining(ClientCore.enqueue)
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
