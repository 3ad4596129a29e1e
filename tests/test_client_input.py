"""The Python client given bad input, as a new user would: a clear error
naming what was wrong, raised where the mistake is made, never a hang, an
internal error from deep inside pyzmq, or a silent answer to another
question."""

from __future__ import annotations

import asyncio
import math

import pytest
from conftest import Env

import corral


@pytest.mark.parametrize("timeout", [math.nan, math.inf, 0, -1, "5s", True, 1e20, 10**30])
def test_a_client_timeout_that_is_no_timeout_is_refused_at_once(timeout: object) -> None:
    """NaN raised "cannot convert float NaN to integer" from the first poll;
    0 and -1 made every call "no answer from the broker"; 1e20 was taken,
    and raised OverflowError from zmq_poll once a request went unanswered
    (milliseconds past a C long)."""
    with pytest.raises((ValueError, TypeError), match="timeout"):
        corral.Client("ipc:///nonexistent/client.sock", timeout=timeout)  # type: ignore[arg-type]
    with pytest.raises((ValueError, TypeError), match="timeout"):
        corral.AsyncClient("ipc:///nonexistent/client.sock", timeout=timeout)  # type: ignore[arg-type]


def test_a_client_timeout_of_up_to_100_years_is_taken() -> None:
    corral.Client("ipc:///nonexistent/client.sock", timeout=100 * 365.25 * 86400).close()


def test_a_job_list_with_a_status_or_limit_that_cannot_be_is_refused(env: Env) -> None:
    """An unknown status listed nothing (a typo looked like an empty queue),
    a limit of 0 or below listed one job."""
    broker = env.start("broker")
    env.wait_ready(broker)
    client = env.client()
    client.enqueue("e2e.square", 3)
    with pytest.raises(corral.BrokerError, match="status: 'done' is not one of") as info:
        client.jobs(status="done")
    assert info.value.code == "invalid"
    for limit in (0, -1):
        with pytest.raises(corral.BrokerError, match="limit: must be at least 1") as info:
            client.jobs(limit=limit)
        assert info.value.code == "invalid"
    assert len(client.jobs(status="queued", limit=1)) == 1


class _Replaces(corral.Hooks):
    """A before_enqueue that replaces the job's headers instead of adding to them."""

    def __init__(self, headers: object) -> None:
        self.headers = headers

    def before_enqueue(self, job: corral.hooks.Enqueuing) -> None:
        job.headers = self.headers  # type: ignore[assignment]


@pytest.mark.parametrize("headers", [None, "tenant=acme", [("tenant", "acme")], 5])
def test_a_hook_that_replaces_the_headers_with_no_mapping_cannot_break_the_enqueue(
    headers: object,
) -> None:
    """README: "A hook cannot break anything". headers = None made every
    enqueue raise AttributeError ('NoneType' object has no attribute 'items')."""
    from corral.clientcore import ClientCore
    from corral.hooks import HookSet

    core = ClientCore(hooks=HookSet([_Replaces(headers)]))
    step = core.enqueue("e2e.square", 3, headers={"tenant": "acme"})
    (spec,) = step.request.jobs  # type: ignore[union-attr]
    assert spec.headers == {"tenant": "acme"}  # the caller's own headers go
    step = core.enqueue("e2e.square", 3)
    (spec,) = step.request.jobs  # type: ignore[union-attr]
    assert not spec.headers


def test_a_request_over_the_brokers_own_limit_is_refused_naming_it(env: Env) -> None:
    """A client that does not know the broker's max_message_size (made with
    an endpoint, or a config saying more) sent a 2 MiB enqueue to a broker
    taking 1 MiB: the broker's socket dropped it with the connection, and
    the client said "no answer from the broker ... is it running?". A
    request past the smallest limit a broker takes asks the broker's first
    (once per client) and is refused with both sizes."""
    env.write_config(processes=0, extra_broker='max_message_size = "1MiB"')
    broker = env.start("broker")
    env.wait_ready(broker)
    client = env.client(timeout=5)
    big = "x" * (2 * 2**20)
    with pytest.raises(corral.RequestTooLarge, match=r"broker's max_message_size of 1048576"):
        client.enqueue("e2e.square", big)
    assert client.enqueue("e2e.square", "x" * 600_000)  # under the broker's limit: sent

    async def from_async() -> None:
        async_client = corral.AsyncClient(env.endpoint, timeout=5)
        try:
            with pytest.raises(corral.RequestTooLarge, match="1048576"):
                await async_client.enqueue("e2e.square", big)
            assert await async_client.enqueue("e2e.square", "x" * 600_000)
        finally:
            async_client.close()

    asyncio.run(from_async())
