"""EnqueueEach: several independent enqueues in one message (what an
AsyncClient sends for the enqueues its tasks make at once). Each job is
taken or refused as a one-job Enqueue of it would be, in order; and the
AsyncClient gives each call its own answer."""

from __future__ import annotations

import asyncio
import math
import tempfile
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq
from conftest import Env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inproc import InProcessBroker

import corral
from corral import asyncclient
from corral.broker import protocol as p
from corral.errors import BrokerError

IDS = ("a", "b", "c", "flow-1")
KEYS = (None, None, "k1", "k2")


@st.composite
def specs(draw: st.DrawFn, depth: int = 0) -> p.JobSpec:
    """Job specs whose ids, callbacks' ids and unique keys clash often, some
    of them refused (an empty task, a priority past 32 bits)."""
    callback = draw(st.none() | specs(depth + 1)) if depth == 0 else None
    return p.JobSpec(
        draw(st.sampled_from(IDS)),
        draw(st.sampled_from(("t.task", "t.task", "t.other", ""))),
        p.encode_value(draw(st.integers(0, 3))),
        priority=draw(st.sampled_from((0, 0, 5, 2**40))),
        unique_key=draw(st.sampled_from(KEYS)),
        on_success=callback,
    )


def _broker(root: str, name: str) -> InProcessBroker:
    broker = InProcessBroker(Path(root) / name)
    # a flow whose id the jobs may clash with
    reply = broker.request(
        p.EnqueueFlow(broker.next_req(), "flow-1", "chain", [p.JobSpec("f", "t")])
    )
    assert isinstance(reply, p.EnqueueOk), reply
    return broker


def _jobs(broker: InProcessBroker) -> list[tuple[Any, ...]]:
    reply = broker.request(p.ListJobs(broker.next_req(), limit=100))
    assert isinstance(reply, p.JobList)
    return sorted((j.id, j.task, j.status, j.priority) for j in reply.jobs)


def _zero(reply: p.EnqueueOk | p.ErrorReply) -> tuple[Any, ...]:
    if isinstance(reply, p.EnqueueOk):
        return ("ok", reply.ids)
    return ("error", reply.code, reply.message)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(specs(), min_size=1, max_size=6))
def test_each_job_is_answered_as_a_one_job_enqueue_of_it_would_be(
    jobs: list[p.JobSpec],
) -> None:
    with tempfile.TemporaryDirectory() as root:
        joined, alone = _broker(root, "joined"), _broker(root, "alone")
        try:
            reply = joined.request(p.EnqueueEach(joined.next_req(), jobs))
            assert isinstance(reply, p.EachReply), reply
            one_by_one = [alone.request(p.Enqueue(alone.next_req(), [spec])) for spec in jobs]
            assert [_zero(r) for r in reply.replies] == [_zero(r) for r in one_by_one]
            assert _jobs(joined) == _jobs(alone)
        finally:
            joined.close()
            alone.close()


def test_a_refused_job_refuses_only_itself(tmp_path: Path) -> None:
    broker = InProcessBroker(tmp_path)
    jobs = [
        p.JobSpec("a", "t.task"),
        p.JobSpec("b", "t.task", priority=2**40),
        p.JobSpec("c", "t.task", unique_key="k"),
        p.JobSpec("d", "t.task", unique_key="k"),
        p.JobSpec("a", "t.task"),
    ]
    reply = broker.request(p.EnqueueEach(broker.next_req(), jobs))
    assert isinstance(reply, p.EachReply)
    ok, refused, c, d, again = reply.replies
    assert ok == p.EnqueueOk(0, ["a"])
    assert isinstance(refused, p.ErrorReply) and refused.code == "invalid"
    assert "priority" in refused.message
    assert c == p.EnqueueOk(0, ["c"]) and d == p.EnqueueOk(0, ["c"])  # the key's holder
    assert again == p.EnqueueOk(0, ["a"])  # a resend of "a": the same job
    assert broker.job("b") is None and broker.job("d") is None
    assert broker.core.stats["enqueued"] == 2


# ------------------------------------------------------------ the AsyncClient


async def held_long_poll(client: corral.AsyncClient) -> tuple[str, asyncio.Future[Any]]:
    """A request left in flight (the result of a job no worker runs), so
    that the enqueues made next join: that job's id and the waiting
    result, to cancel at the end."""
    job_id = await client.enqueue("e2e.noop", "held")
    waiting = asyncio.ensure_future(client.result(job_id, timeout=20))
    while not client._pending:
        await asyncio.sleep(0.001)
    return job_id, waiting


def test_an_async_client_joins_the_enqueues_made_at_once(env: Env) -> None:
    """Many tasks enqueueing at once against a real broker: each call gets
    its own id or its own error, the jobs go in fewer messages than calls,
    and a lone enqueue still goes at once, by itself."""
    env.write_config()
    env.wait_ready(env.start("broker"))
    n = 200

    async def run() -> tuple[list[Any], int]:
        async with corral.AsyncClient(env.endpoint, timeout=30) as client:
            assert await client.ping()
            sent = 0
            real = client._call

            async def counting(request: p.ClientRequest, *args: Any) -> p.ClientReply:
                nonlocal sent
                sent += 1
                return await real(request, *args)

            client._call = counting  # type: ignore[method-assign]
            _, waiting = await held_long_poll(client)
            calls = [
                client.enqueue("e2e.noop", i, id=None if i % 50 else "given-x")
                if i % 67
                else client.enqueue("e2e.noop", i, priority=2**40)
                for i in range(n)
            ]
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            waiting.cancel()
            return outcomes, sent

    outcomes, sent = asyncio.run(run())
    refused = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(refused) == math.ceil(n / 67)
    assert all(isinstance(o, BrokerError) and o.code == "invalid" for o in refused)
    assert all("priority" in str(o) for o in refused)
    ids = [o for o in outcomes if isinstance(o, str)]
    assert len(ids) == n - len(refused)
    # the id "given-x", given three times: one job, the same id each time
    assert ids.count("given-x") == 3 and len(set(ids)) == len(ids) - 2
    assert sent == 2 + math.ceil(n / asyncclient.JOIN_MAX)  # (the long poll: 2)
    client = env.client()
    assert client.status().queues["default"]["queued"] == len(set(ids)) + 1


def test_a_lone_async_enqueue_goes_by_itself(env: Env) -> None:
    env.write_config()
    env.wait_ready(env.start("broker"))

    async def run() -> list[type]:
        async with corral.AsyncClient(env.endpoint, timeout=30) as client:
            requests: list[type] = []
            real = client._call

            async def recording(request: p.ClientRequest, *args: Any) -> p.ClientReply:
                requests.append(type(request))
                return await real(request, *args)

            client._call = recording  # type: ignore[method-assign]
            for i in range(3):
                await client.enqueue("e2e.noop", i)
            return requests

    assert asyncio.run(run()) == [p.Enqueue] * 3


def test_a_cancelled_call_sends_no_job_and_the_others_are_answered(env: Env) -> None:
    env.write_config()
    env.wait_ready(env.start("broker"))

    async def run() -> tuple[list[Any], int]:
        async with corral.AsyncClient(env.endpoint, timeout=30) as client:
            _, waiting = await held_long_poll(client)
            calls = [asyncio.ensure_future(client.enqueue("e2e.noop", i)) for i in range(10)]
            await asyncio.sleep(0)  # each has joined; none is sent yet
            calls[3].cancel()
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            waiting.cancel()
            return outcomes, len(outcomes)

    outcomes, _ = asyncio.run(run())
    assert isinstance(outcomes[3], asyncio.CancelledError)
    assert all(isinstance(o, str) for i, o in enumerate(outcomes) if i != 3)
    assert env.client().status().queues["default"]["queued"] == 9 + 1


@pytest.mark.parametrize(
    ("refusal", "joins_after"),
    [
        ("bad request: $[0]: Invalid value 'enqueueeach'", False),  # an older broker
        ("bad request: $[2][1].delay: Expected `float`, got `str`", True),  # one bad job
    ],
    ids=["older-broker", "unreadable-job"],
)
def test_an_enqueue_each_refused_unread_sends_each_job_alone(
    tmp_path: Path, refusal: str, joins_after: bool
) -> None:
    """A broker that cannot read an EnqueueEach (bad request): its calls go
    again one by one, so each gets its own answer; a broker of an older
    version, which does not know the message, gets no more joined ones."""
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    endpoint = f"ipc://{tmp_path}/old.sock"
    router.bind(endpoint)
    seen: list[str] = []

    async def serve() -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        while True:
            if not poller.poll(0):
                await asyncio.sleep(0.001)
                continue
            identity, body = router.recv_multipart()
            op, req = msgspec.msgpack.decode(body)[:2]
            seen.append(op)
            if op == "enqueueeach":
                reply: p.Msg = p.ErrorReply(req, "invalid", refusal)
            elif op == "enqueue":
                reply = p.EnqueueOk(req, [f"id-{len(seen)}"])
            elif op == "getresult":
                continue  # a long poll left waiting
            else:
                reply = p.Pong(req, "old")
            router.send_multipart([identity, p.encode(reply)])

    async def run() -> list[Any]:
        server = asyncio.ensure_future(serve())
        try:
            async with corral.AsyncClient(endpoint, timeout=10) as client:
                waiting = asyncio.ensure_future(client.result("0" * 32, timeout=5))
                while not client._pending:  # (the fake broker leaves it unanswered)
                    await asyncio.sleep(0.001)
                first = await asyncio.gather(*(client.enqueue("t", i) for i in range(5)))
                later = await asyncio.gather(*(client.enqueue("t", i) for i in range(5)))
                waiting.cancel()
                return [*first, *later]
        finally:
            server.cancel()

    try:
        ids = asyncio.run(run())
    finally:
        router.close(linger=0)
    assert len(ids) == 10 and all(i.startswith("id-") for i in ids)
    assert seen.count("enqueueeach") == (2 if joins_after else 1)
    assert seen.count("enqueue") == 10
