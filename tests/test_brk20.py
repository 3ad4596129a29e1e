"""Break-tests of the AsyncClient's joined enqueues (EnqueueEach), through
a real broker: a joined request whose reply is lost goes again, as a
one-job enqueue would, and each job is still made once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from typing import Any

from conftest import Env
from test_enqueue_each import held_long_poll
from test_resend import LossyProxy, enqueued

import corral
from corral.broker import protocol as p
from corral.broker.server import Broker
from corral.config import loads
from corral.hooks import Enqueuing


def test_a_joined_enqueue_whose_reply_is_lost_is_resent_and_makes_each_job_once(
    env: Env,
) -> None:
    """Before: EnqueueEach was not resendable, so a lost reply (a broker
    restarted, a dropped connection) failed every joined call with
    BrokerUnavailable at the timeout, where each alone would have been
    sent again and answered."""
    env.write_config(processes=0)
    env.wait_ready(env.start("broker"))
    proxy = LossyProxy(env, drop=0)
    try:

        async def run() -> list[Any]:
            async with corral.AsyncClient(proxy.endpoint, timeout=6) as client:
                held, waiting = await held_long_poll(client)
                proxy.drop = 1  # the next reply: the joined enqueues'
                outcomes = await asyncio.gather(
                    *(client.enqueue("e2e.noop", i) for i in range(5)), return_exceptions=True
                )
                waiting.cancel()
                return [held, *outcomes]

        outcomes = asyncio.run(run())
    finally:
        proxy.close()
    assert all(isinstance(o, str) for o in outcomes), outcomes
    kinds = [type(p.decode(p.client_request_decoder, r)) for r in proxy.requests]
    assert kinds.count(p.EnqueueEach) == 2, kinds
    count, ids = enqueued(env)
    assert count == 6 and sorted(ids) == sorted(outcomes)


class Slow(corral.Hooks):
    """A before_enqueue that blocks the event loop (a synchronous lookup)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def before_enqueue(self, job: Enqueuing) -> None:
        time.sleep(self.seconds)


def test_joined_calls_are_not_failed_by_the_hooks_of_the_calls_after_them(env: Env) -> None:
    """Each call's hook takes well within the timeout, but the hooks of one
    turn's calls together take more than it. Before: the joined request had
    the first call's deadline, past when the turn ended, so every call
    raised BrokerUnavailable (its jobs made all the same); as one-job
    enqueues none would have."""
    env.write_config(processes=0)
    env.wait_ready(env.start("broker"))
    n = 10

    async def run() -> list[Any]:
        slow = Slow(0.0)
        async with corral.AsyncClient(env.endpoint, timeout=2, hooks=[slow]) as client:
            _, waiting = await held_long_poll(client)
            slow.seconds = 0.3
            outcomes = await asyncio.gather(
                *(client.enqueue("e2e.noop", i) for i in range(n)), return_exceptions=True
            )
            waiting.cancel()
            return outcomes

    outcomes = asyncio.run(run())
    assert all(isinstance(o, str) for o in outcomes), outcomes
    assert enqueued(env)[0] == n + 1


def test_a_broker_that_had_a_signal_waits_on_its_poll_again(env: Env) -> None:
    """After a SIGHUP (keys reloaded), an idle broker's loop waits on its
    poll as before. Before: the wake-up socket was drained only when the
    poll's answer held the socket object, but a zmq.Poller names a plain
    socket by its file descriptor, so the byte the signal left was never
    read and every poll returned at once: a full core from the first
    SIGHUP on, for as long as the broker lived."""
    env.write_config(processes=0)
    broker = Broker(loads(env.config.read_text()))
    kept = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    wakeup = signal.set_wakeup_fd(-1)
    passes = 0
    try:
        broker.open()
        broker.install_signal_handlers()
        real_pass = broker.run_pass
        end = 0.0

        def counted() -> None:
            nonlocal passes, end
            real_pass()
            passes += 1
            if passes == 1:
                os.kill(os.getpid(), signal.SIGHUP)
                end = time.monotonic() + 1.0  # a window, not a timing assertion
            elif time.monotonic() >= end:
                broker.stop()

        broker.run_pass = counted  # type: ignore[method-assign]
        broker.run()
    finally:
        signal.set_wakeup_fd(wakeup)
        for sig, handler in kept.items():
            signal.signal(sig, handler)
        broker.close()
    # an idle broker wakes for its timers a few times a second; a spinning
    # loop passes tens of thousands of times
    assert passes <= 100, f"{passes} passes of the loop in a second after a SIGHUP"


def test_a_client_whose_last_loop_stopped_mid_call_serves_the_next_loop(env: Env) -> None:
    """An event loop stopped (loop.stop(), a closed notebook kernel's loop)
    while a call was in flight and enqueues had joined, unsent: the client
    then serves calls in a new loop. Before: a new enqueue joined the
    stale batch, whose send was scheduled in the dead loop, and waited for
    ever (past any timeout); and the dead loop's reply reader, never done,
    kept a new one from starting, so every later call timed out."""
    env.write_config(processes=0)
    env.wait_ready(env.start("broker"))
    client = corral.AsyncClient(env.endpoint, timeout=3)

    left: list[asyncio.Future[Any]] = []

    async def stopped_mid_call() -> None:
        left.append((await held_long_poll(client))[1])
        left.extend(asyncio.ensure_future(client.enqueue("e2e.noop", i)) for i in range(5))
        await asyncio.sleep(0)  # they joined; their send is scheduled
        asyncio.get_running_loop().stop()

    async def next_loop() -> list[Any]:
        first = await client.enqueue("e2e.noop", "first")
        rest = await asyncio.gather(*(client.enqueue("e2e.noop", i) for i in range(5)))
        return [first, *rest, await client.ping()]

    loop = asyncio.new_event_loop()
    try:
        with contextlib.suppress(RuntimeError):  # stopped before its future was done
            loop.run_until_complete(stopped_mid_call())
        outcomes = asyncio.run(asyncio.wait_for(next_loop(), 20))
    finally:
        client.close()
        left.extend(asyncio.all_tasks(loop))  # (ended here: no warnings at exit)
        for task in left:
            task.cancel()
        ending = asyncio.gather(*left, return_exceptions=True) if left else None
        while ending is not None and not ending.done():  # (the first run's stop is left)
            with contextlib.suppress(RuntimeError):
                loop.run_until_complete(ending)
        loop.close()
    assert all(isinstance(o, str) for o in outcomes[:-1]) and outcomes[-1], outcomes
