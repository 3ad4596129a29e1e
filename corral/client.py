"""``corral.Client`` (blocking) and ``corral.AsyncClient`` (asyncio).

Both build the same requests and read the same replies (:class:`_Core`);
only the socket differs. A request that gets no answer within the timeout
raises BrokerUnavailable and the socket is thrown away (the lazy pirate
pattern), so a late reply or a queued request never surfaces later. Job ids
are made here, so a resent enqueue is idempotent at the broker.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from corral.broker import protocol as p
from corral.broker.jobspec import JobOptions, options_of
from corral.broker.protocol import TERMINAL
from corral.errors import (
    BrokerError,
    BrokerUnavailable,
    DiskFull,
    JobCancelled,
    JobFailed,
    JobNotFound,
    RequestTooLarge,
    ResultTimeout,
)
from corral.transport import connect_dealer

DEFAULT_TIMEOUT = 5.0
#: Longest single long-poll; longer waits are made of several.
MAX_WAIT_SLICE = 30.0
#: The broker's default broker.max_message_size.
DEFAULT_MAX_MESSAGE = 16 * 1024 * 1024


class _JobExtras(JobOptions, kw_only=True):
    """The keyword-only fields of :class:`Job` beside the options."""

    #: A job id of your choosing (at most 64 characters); an enqueue with an
    #: id the broker has is a no-op that returns it. None: a new id.
    id: str | None = None
    #: Jobs created when this one succeeds (its result as their
    #: ``ctx.prev_result``) or fails (a dict with the error as prev_result).
    on_success: Job | None = None
    on_failure: Job | None = None


class Job(_JobExtras):
    """A job spec for ``enqueue_many``, chains and groups:
    ``Job(task, payload=None, **options)``. The options are those of
    :class:`corral.broker.jobspec.JobOptions` (``queue``, ``priority``,
    ``delay``, ``run_at``, ``max_attempts``, ``timeout``, ``unique_key``,
    ``result_ttl``, ``unique_for``), plus ``id``, ``on_success`` and
    ``on_failure``."""

    task: str
    payload: Any = None


class JobPage(list[p.JobInfo]):
    """A page of ``jobs()``; pass ``cursor`` to get the next (None: the last)."""

    cursor: str | None = None


def new_job_id() -> str:
    """A 32-hex-digit id that sorts by creation time (48-bit ms + 80 random bits)."""
    return f"{time.time_ns() // 1_000_000:012x}{os.urandom(10).hex()}"


class _Core:
    """Request building and reply reading shared by both clients."""

    def __init__(self, endpoint: str | None, timeout: float, config: Any) -> None:
        if endpoint is None:
            if config is None:
                raise ValueError("give Client an endpoint or use Client.from_config(path)")
            endpoint = config.client.endpoint or config.broker.client_endpoint
        self.endpoint = endpoint
        self.timeout = timeout
        self.config = config
        self.max_message_size = (
            config.broker.max_message_size if config is not None else DEFAULT_MAX_MESSAGE
        )
        self._req = itertools.count(1)

    @classmethod
    def from_config(cls, path: str | os.PathLike[str], **kwargs: Any) -> Any:
        from corral.config import load

        config = load(path)
        kwargs.setdefault("timeout", config.client.timeout)
        return cls(None, config=config, **kwargs)

    # --- requests

    def _spec(self, job: Job) -> p.JobSpec:
        """The wire spec of ``job``: every option as given, the payload
        encoded, a new id unless the job has one."""
        return p.JobSpec(
            job.id or new_job_id(),
            job.task,
            _encode_payload(job.payload),
            on_success=self._spec(job.on_success) if job.on_success is not None else None,
            on_failure=self._spec(job.on_failure) if job.on_failure is not None else None,
            **options_of(job),  # type: ignore[arg-type]
        )

    # --- management requests: built once, sent by either client

    def _cancel_msg(self, job_id: str) -> p.Cancel:
        return p.Cancel(next(self._req), job_id)

    def _retry_msg(self, job_id: str | None, queue: str | None = None) -> p.RetryJobs:
        return p.RetryJobs(next(self._req), job_id, all_failed=job_id is None, queue=queue)

    def _jobs_msg(
        self,
        queue: str | None,
        status: str | None,
        task: str | None,
        limit: int,
        cursor: str | None,
    ) -> p.ListJobs:
        return p.ListJobs(next(self._req), queue, status, task, limit, cursor)

    @staticmethod
    def _page(reply: p.JobList) -> JobPage:
        page = JobPage(reply.jobs)
        page.cursor = reply.cursor
        return page

    def _enqueue_msg(self, jobs: list[Job]) -> p.Enqueue:
        return p.Enqueue(next(self._req), [self._spec(job) for job in jobs])

    def _flow_msg(self, kind: str, jobs: list[Job], callback: Job | None) -> p.EnqueueFlow:
        if not jobs:
            raise ValueError(f"a {kind} needs at least one job")
        specs = [self._spec(job) for job in jobs]
        spec = self._spec(callback) if callback is not None else None
        return p.EnqueueFlow(next(self._req), new_job_id(), kind, specs, spec)

    def _encode(self, msg: p.Msg) -> bytes:
        """Encode a request, refusing one the broker would drop unanswered."""
        body = p.encode(msg)
        if len(body) > self.max_message_size:
            raise RequestTooLarge(
                f"the request is {len(body)} bytes, over the broker's max_message_size of "
                f"{self.max_message_size}; send fewer jobs per enqueue_many or smaller payloads"
            )
        return body

    # --- replies

    def _check(self, reply: Any) -> Any:
        if isinstance(reply, p.ErrorReply):
            if reply.code == "not_found":
                raise JobNotFound(reply.message)
            if reply.code == "disk_full":
                raise DiskFull(reply.message)
            raise BrokerError(reply.code, reply.message)
        return reply

    def _result_msg(self, job_id: str, deadline: float | None) -> p.GetResult:
        """One long poll, at most MAX_WAIT_SLICE, never past ``deadline``."""
        left = MAX_WAIT_SLICE if deadline is None else max(0.0, deadline - time.monotonic())
        return p.GetResult(next(self._req), job_id, min(left, MAX_WAIT_SLICE))

    @staticmethod
    def _settled(reply: p.ResultReply, deadline: float | None) -> bool:
        """The job ended, or the caller's wait is over."""
        ended = reply.status in TERMINAL
        return ended or (deadline is not None and time.monotonic() >= deadline)

    def _outcome(self, reply: p.ResultReply) -> Any:
        if reply.status == "succeeded":
            return msgspec.msgpack.decode(reply.result)
        if reply.status == "failed":
            raise JobFailed(reply.job_id, reply.error)
        if reply.status == "cancelled":
            raise JobCancelled(reply.job_id)
        raise ResultTimeout(f"job {reply.job_id} is still {reply.status}")

    def _unavailable(self, timeout: float) -> BrokerUnavailable:
        return BrokerUnavailable(
            f"no answer from the broker at {self.endpoint} within {timeout:g}s; "
            "is `corral run` (or `corral broker`) running there?"
        )


def _encode_payload(payload: Any) -> msgspec.Raw:
    if isinstance(payload, msgspec.Raw):
        return payload
    try:
        return p.encode_value(payload)
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(f"payload cannot be encoded as msgpack: {exc}") from None


def _job(task: str, payload: Any, queue: str | None, options: dict[str, Any]) -> Job:
    return Job(task, payload, queue=queue, **options)


class Client(_Core):
    """A blocking client of one broker. Not thread-safe: use one per thread."""

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        config: Any = None,
        context: zmq.Context[Any] | None = None,
    ) -> None:
        super().__init__(endpoint, timeout, config)
        self._ctx = context or zmq.Context.instance()
        self._sock: zmq.Socket[Any] | None = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def _socket(self) -> zmq.Socket[Any]:
        if self._sock is None:
            self._sock = connect_dealer(self._ctx, self.endpoint, self.config)
        return self._sock

    def _call(self, msg: p.Msg, wait: float = 0.0) -> Any:
        """Send one request and return its reply (errors raised)."""
        timeout = self.timeout + wait
        deadline = time.monotonic() + timeout
        sock = self._socket()
        body = self._encode(msg)
        while True:
            try:
                sock.send(body, zmq.NOBLOCK)
                break
            except zmq.Again:
                if time.monotonic() >= deadline:
                    self.close()
                    raise self._unavailable(timeout) from None
                sock.poll(50, zmq.POLLOUT)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sock.poll(remaining * 1000, zmq.POLLIN):
                self.close()
                raise self._unavailable(timeout)
            reply = p.decode(p.client_reply_decoder, sock.recv())
            if reply.req in (msg.req, 0):  # type: ignore[attr-defined]
                return self._check(reply)

    # --- the public methods

    def enqueue(
        self, task: str, payload: Any = None, *, queue: str | None = None, **options: Any
    ) -> str:
        """Enqueue one job; returns its id once the broker has it durably."""
        return self.enqueue_many([_job(task, payload, queue, options)])[0]

    def enqueue_many(self, jobs: list[Job]) -> list[str]:
        """Enqueue several jobs in one durable batch; returns their ids."""
        if not jobs:
            return []
        reply = self._call(self._enqueue_msg(list(jobs)))
        return list(reply.ids)

    def job(self, job_id: str) -> p.JobInfo:
        return self._call(p.GetJob(next(self._req), job_id)).job

    def result(self, job_id: str, timeout: float | None = None) -> Any:
        """Wait for a job to end and return its result. Raises JobFailed,
        JobCancelled, or ResultTimeout when ``timeout`` passes first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            msg = self._result_msg(job_id, deadline)
            reply = self._call(msg, msg.wait)
            if self._settled(reply, deadline):
                return self._outcome(reply)

    def status(self) -> p.StatusInfo:
        return self._call(p.GetStatus(next(self._req))).status

    def ping(self) -> str:
        """Round trip to the broker; returns its id."""
        return self._call(p.Ping(next(self._req))).broker_id

    def enqueue_chain(self, jobs: list[Job]) -> str:
        """Run jobs one after another, each handler getting the previous
        one's result as ``ctx.prev_result``; a failure stops the chain.
        Returns the chain's id (for ``chain()`` and ``result()``)."""
        return self._call(self._flow_msg("chain", list(jobs), None)).ids[0]

    def enqueue_group(self, jobs: list[Job], callback: Job | None = None) -> str:
        """Run jobs in parallel; with ``callback`` (a chord), run it once all
        succeeded, with the list of their results as ``ctx.prev_result``."""
        return self._call(self._flow_msg("group", list(jobs), callback)).ids[0]

    def chain(self, chain_id: str) -> p.FlowInfo:
        return self._call(p.GetFlow(next(self._req), chain_id)).flow

    def group(self, group_id: str) -> p.FlowInfo:
        return self._call(p.GetFlow(next(self._req), group_id)).flow

    def cancel(self, job_id: str) -> bool:
        """Cancel a job: a queued or scheduled one never runs; a running one's
        handler sees ``ctx.cancelled`` and its result is discarded. False if
        the job had already ended."""
        return bool(self._call(self._cancel_msg(job_id)).count)

    def retry(self, job_id: str) -> str:
        """Put a failed or cancelled job back, with a fresh budget of attempts."""
        self._call(self._retry_msg(job_id))
        return job_id

    def retry_failed(self, queue: str | None = None) -> list[str]:
        """Put every failed job (of ``queue``) back; returns their ids."""
        return list(self._call(self._retry_msg(None, queue)).ids)

    def delete(self, job_id: str) -> None:
        """Remove a finished job and its result."""
        self._call(p.Delete(next(self._req), job_id))

    def purge(self, queue: str) -> int:
        """Remove a queue's queued jobs; returns how many."""
        return int(self._call(p.Purge(next(self._req), queue)).count)

    def pause(self, queue: str) -> None:
        """Stop handing out the queue's jobs (enqueueing goes on)."""
        self._call(p.Pause(next(self._req), queue, True))

    def resume(self, queue: str) -> None:
        self._call(p.Pause(next(self._req), queue, False))

    def jobs(
        self,
        queue: str | None = None,
        status: str | None = None,
        limit: int = 100,
        *,
        task: str | None = None,
        cursor: str | None = None,
    ) -> JobPage:
        """Jobs in creation order, filtered; ``.cursor`` of the result gets
        the next page."""
        return self._page(self._call(self._jobs_msg(queue, status, task, limit, cursor)))

    def report_supervisor(self, info: p.SupervisorInfo) -> int:
        """A supervisor's periodic report (supervisors do this); returns how
        many jobs are queued, for its STATUS line."""
        return int(self._call(p.SupervisorReport(next(self._req), info)).count)

    def worker_exited(self, host: str, pid: int, reason: str) -> int:
        """Tell the broker a worker process is gone (supervisors do this);
        returns how many registrations it dropped."""
        return self._call(p.WorkerExited(next(self._req), host, pid, reason)).count


class AsyncClient(_Core):
    """The same methods as :class:`Client`, as coroutines."""

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        config: Any = None,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        super().__init__(endpoint, timeout, config)
        self._ctx = context or zmq.asyncio.Context.instance()
        self._sock: Any = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._reader: asyncio.Future[None] | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    async def _call(self, msg: p.Msg, wait: float = 0.0) -> Any:
        """Send one request; many may be in flight at once on the one socket,
        and a single reader task hands each reply to its request by id."""
        timeout = self.timeout + wait
        deadline = time.monotonic() + timeout
        if self._sock is None:
            self._sock = connect_dealer(self._ctx, self.endpoint, self.config)
        sock = self._sock
        body = self._encode(msg)
        while True:
            try:
                await sock.send(body, zmq.NOBLOCK)
                break
            except zmq.Again:
                if time.monotonic() >= deadline:
                    raise self._unavailable(timeout) from None
                await sock.poll(50, zmq.POLLOUT)
        req = msg.req  # type: ignore[attr-defined]
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[req] = future
        if self._reader is None or self._reader.done():
            self._reader = asyncio.ensure_future(self._read_replies(sock))
        try:
            reply = await asyncio.wait_for(future, max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise self._unavailable(timeout) from None
        finally:
            self._pending.pop(req, None)
        return self._check(reply)

    async def _read_replies(self, sock: Any) -> None:
        while self._pending and sock is self._sock:
            try:
                frame = await sock.recv()
            except zmq.ZMQError:
                return
            reply = p.decode(p.client_reply_decoder, frame)
            if reply.req == 0:  # a request the broker could not read: fail them all
                for future in self._pending.values():
                    if not future.done():
                        future.set_result(reply)
                continue
            future = self._pending.get(reply.req)
            if future is not None and not future.done():
                future.set_result(reply)

    async def enqueue(
        self, task: str, payload: Any = None, *, queue: str | None = None, **options: Any
    ) -> str:
        return (await self.enqueue_many([_job(task, payload, queue, options)]))[0]

    async def enqueue_many(self, jobs: list[Job]) -> list[str]:
        if not jobs:
            return []
        reply = await self._call(self._enqueue_msg(list(jobs)))
        return list(reply.ids)

    async def job(self, job_id: str) -> p.JobInfo:
        return (await self._call(p.GetJob(next(self._req), job_id))).job

    async def result(self, job_id: str, timeout: float | None = None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            msg = self._result_msg(job_id, deadline)
            reply = await self._call(msg, msg.wait)
            if self._settled(reply, deadline):
                return self._outcome(reply)

    async def status(self) -> p.StatusInfo:
        return (await self._call(p.GetStatus(next(self._req)))).status

    async def ping(self) -> str:
        return (await self._call(p.Ping(next(self._req)))).broker_id

    async def enqueue_chain(self, jobs: list[Job]) -> str:
        return (await self._call(self._flow_msg("chain", list(jobs), None))).ids[0]

    async def enqueue_group(self, jobs: list[Job], callback: Job | None = None) -> str:
        return (await self._call(self._flow_msg("group", list(jobs), callback))).ids[0]

    async def chain(self, chain_id: str) -> p.FlowInfo:
        return (await self._call(p.GetFlow(next(self._req), chain_id))).flow

    async def group(self, group_id: str) -> p.FlowInfo:
        return (await self._call(p.GetFlow(next(self._req), group_id))).flow

    async def cancel(self, job_id: str) -> bool:
        return bool((await self._call(self._cancel_msg(job_id))).count)

    async def retry(self, job_id: str) -> str:
        await self._call(self._retry_msg(job_id))
        return job_id

    async def retry_failed(self, queue: str | None = None) -> list[str]:
        return list((await self._call(self._retry_msg(None, queue))).ids)

    async def delete(self, job_id: str) -> None:
        await self._call(p.Delete(next(self._req), job_id))

    async def purge(self, queue: str) -> int:
        return int((await self._call(p.Purge(next(self._req), queue))).count)

    async def pause(self, queue: str) -> None:
        await self._call(p.Pause(next(self._req), queue, True))

    async def resume(self, queue: str) -> None:
        await self._call(p.Pause(next(self._req), queue, False))

    async def jobs(
        self,
        queue: str | None = None,
        status: str | None = None,
        limit: int = 100,
        *,
        task: str | None = None,
        cursor: str | None = None,
    ) -> JobPage:
        return self._page(await self._call(self._jobs_msg(queue, status, task, limit, cursor)))
