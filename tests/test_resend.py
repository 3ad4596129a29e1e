"""A request whose reply is lost on the way is sent again, with the same job
ids, and the broker creates the job once: a real broker behind a proxy that
drops the first reply it carries."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator

import msgspec
import pytest
import zmq
from conftest import Env

import corral
from corral.broker import protocol as p


class LossyProxy:
    """ROUTER in front, DEALER to the broker's client endpoint; drops the
    first ``drop`` replies, passes the others through ``rewrite`` if given,
    and records every request body it forwards."""

    def __init__(
        self, env: Env, drop: int = 1, rewrite: Callable[[bytes], bytes] | None = None
    ) -> None:
        self.endpoint = f"ipc://{env.home}/lossy.sock"
        self.requests: list[bytes] = []
        self.drop = drop
        self.rewrite = rewrite
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        self._front = self._ctx.socket(zmq.ROUTER)
        self._front.setsockopt(zmq.LINGER, 0)
        self._front.bind(self.endpoint)
        self._back = self._ctx.socket(zmq.DEALER)
        self._back.setsockopt(zmq.LINGER, 0)
        self._back.connect(env.endpoint)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._front, zmq.POLLIN)
        poller.register(self._back, zmq.POLLIN)
        client = b""
        while not self._stop.is_set():
            events = dict(poller.poll(50))
            if self._front in events:
                client, body = self._front.recv_multipart()
                self.requests.append(body)
                self._back.send(body)
            if self._back in events:
                body = self._back.recv()
                if self.drop:
                    self.drop -= 1
                    continue
                if self.rewrite is not None:
                    body = self.rewrite(body)
                self._front.send_multipart([client, body])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._front.close()
        self._back.close()
        self._ctx.term()


@pytest.fixture
def lossy(env: Env) -> Iterator[LossyProxy]:
    env.write_config(processes=0)
    broker = env.start("broker")
    env.wait_ready(broker)
    proxy = LossyProxy(env)
    yield proxy
    proxy.close()


def enqueued(env: Env) -> tuple[int, list[str]]:
    client = env.client()
    return client.status().stats.get("enqueued", 0), [j.id for j in client.jobs()]


def test_an_enqueue_whose_reply_is_lost_is_resent_and_creates_one_job(
    env: Env, lossy: LossyProxy
) -> None:
    client = corral.Client(lossy.endpoint, timeout=10)
    try:
        job_id = client.enqueue("e2e.square", 3)
    finally:
        client.close()
    assert len(lossy.requests) == 2 and lossy.requests[0] == lossy.requests[1]
    assert enqueued(env) == (1, [job_id])


def test_the_async_client_resends_too(env: Env, lossy: LossyProxy) -> None:
    async def main() -> list[str]:
        async with corral.AsyncClient(lossy.endpoint, timeout=10) as client:
            return await client.enqueue_many([corral.Job("e2e.square", n) for n in range(3)])

    ids = asyncio.run(main())
    assert len(lossy.requests) == 2 and lossy.requests[0] == lossy.requests[1]
    assert enqueued(env) == (3, ids)


def test_a_chain_whose_reply_is_lost_is_created_once(env: Env, lossy: LossyProxy) -> None:
    client = corral.Client(lossy.endpoint, timeout=10)
    try:
        chain_id = client.enqueue_chain([corral.Job("e2e.square", 2), corral.Job("e2e.square")])
    finally:
        client.close()
    assert len(lossy.requests) == 2
    listed = env.client().chain(chain_id)
    assert len(listed.jobs) == 2 and env.client().status().stats["flows"] == 1


def test_a_cancel_is_not_resent(env: Env, lossy: LossyProxy) -> None:
    job_id = env.client().enqueue("e2e.square", 1)
    client = corral.Client(lossy.endpoint, timeout=2.5)
    try:
        with pytest.raises(corral.BrokerUnavailable):
            client.cancel(job_id)
    finally:
        client.close()
    assert [type(p.decode(p.client_request_decoder, r)) for r in lossy.requests] == [p.Cancel]
    assert env.client().job(job_id).status == "cancelled"  # it was done, once


def test_a_reply_the_client_cannot_read_fails_the_call_in_both_clients(env: Env) -> None:
    """A reply of another protocol version (a broker upgraded first): the
    blocking client raised the ProtocolError naming it; the asyncio
    client's reply reader died of it, unseen, and the call waited out its
    timeout as BrokerUnavailable ("is the broker running?")."""
    env.write_config(processes=0)
    broker = env.start("broker")
    env.wait_ready(broker)

    def newer(body: bytes) -> bytes:
        reply = p.decode(p.client_reply_decoder, body)
        return p.encode(msgspec.structs.replace(reply, v=p.PROTOCOL_VERSION + 1))

    proxy = LossyProxy(env, drop=0, rewrite=newer)
    try:
        client = corral.Client(proxy.endpoint, timeout=10)
        with pytest.raises(p.ProtocolError, match="version"):
            client.ping()
        client.close()

        async def ping_twice() -> None:
            async_client = corral.AsyncClient(proxy.endpoint, timeout=10)
            try:
                for _ in range(2):  # the reader reads on after it
                    with pytest.raises(p.ProtocolError, match="version"):
                        await async_client.ping()
            finally:
                async_client.close()

        asyncio.run(ping_twice())
    finally:
        proxy.close()
