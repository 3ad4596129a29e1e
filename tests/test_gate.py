"""The broker's ZAP handler caps the connections of each endpoint
(``broker.max_connections``): real ROUTER and DEALER sockets over ipc, a
:class:`~corral.broker.gate.Gate` served the way the broker's loop serves
it, and, end to end, a real broker refusing the connection past its cap
while serving those it holds."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from conftest import Env, wait_for
from zmq.utils.monitor import recv_monitor_message

import corral
from corral.broker import protocol as p
from corral.broker.gate import Gate, Tally, files_needed
from corral.clientcore import RESEND_INTERVAL_MAX, resend_every
from corral.transport import bind_router

DOMAIN = "corral-client"


class Loop:
    """A ROUTER behind a Gate, read the way the broker reads it: every
    message read is counted in the tally, a socket found empty is noted."""

    def __init__(self, home: Path, cap: int) -> None:
        self.ctx = zmq.Context()
        self.stats: Counter[str] = Counter()
        self.gate = Gate(self.ctx, None, cap, self.stats)
        self.endpoint = f"ipc://{home}/gate.sock"
        self.router = bind_router(
            self.ctx,
            self.endpoint,
            None,
            1024,
            DOMAIN,
            before_bind=lambda sock: self.gate.watch(sock, DOMAIN),
        )
        self.tally: Tally = self.gate.tallies[DOMAIN]
        self.read: list[bytes] = []

    def turn(self, read: bool = True) -> None:
        """One turn of the loop: answer the gate, then read what is there."""
        self.gate.serve()
        while read:
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                self.tally.emptied()
                return
            self.tally.reads += 1
            self.read.append(frames[-1])

    def close(self) -> None:
        self.router.close(linger=0)
        self.gate.close()
        self.ctx.term()


@pytest.fixture
def loop(tmp_path: Path) -> Iterator[Loop]:
    made = Loop(tmp_path, cap=3)
    yield made
    made.close()


class Peer:
    """A DEALER that tells how its handshake ended, from its own monitor."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.monitor = self.sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
        )
        self.sock.connect(endpoint)
        self.outcome: tuple[str, int] | None = None

    def settled(self, loop: Loop, read: bool = True) -> bool:
        loop.turn(read)
        while self.outcome is None and self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.outcome = ("admitted", 0)
            else:
                self.outcome = ("refused", int(event["value"]))
        return self.outcome is not None

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=0)


def _connect(loop: Loop, ctx: zmq.Context[Any], n: int, read: bool = True) -> list[Peer]:
    """``n`` peers, one after the other, each once its handshake ended;
    ``read``: the loop reads the socket meanwhile."""
    peers = []
    for _ in range(n):
        peer = Peer(ctx, loop.endpoint)
        wait_for(
            lambda peer=peer: peer.settled(loop, read), 10, interval=0.01, message="a handshake"
        )
        peers.append(peer)
    return peers


def test_a_connection_past_the_cap_is_refused_until_one_leaves(loop: Loop) -> None:
    ctx = zmq.Context()
    try:
        peers = _connect(loop, ctx, 4)
        assert [peer.outcome for peer in peers] == [("admitted", 0)] * 3 + [("refused", 400)]
        assert loop.stats["connections_refused"] == 1
        peers[0].close()
        # its end is seen, the socket is found empty: its room comes back
        wait_for(lambda: (loop.turn(), loop.tally.held <= 2)[1], 10, interval=0.01)
        (again,) = _connect(loop, ctx, 1)
        assert again.outcome == ("admitted", 0)
        for peer in [*peers[1:], again]:
            peer.close()
    finally:
        ctx.destroy(linger=0)


def test_a_peer_that_left_holds_its_room_until_what_it_sent_is_read(loop: Loop) -> None:
    """A connection that sent and left still holds messages in the broker
    (libzmq keeps its pipe until it is read): it counts against the cap
    until they are read."""
    ctx = zmq.Context()
    try:
        (sender,) = _connect(loop, ctx, 1)
        for n in range(5):
            sender.sock.send(b"m%d" % n)
        sender.sock.disable_monitor()
        sender.monitor.close(linger=0)
        sender.sock.close(linger=5000)  # they are delivered, then it leaves
        wait_for(lambda: (loop.turn(read=False), loop.tally.open == 0)[1], 10, interval=0.01)
        assert loop.tally.held == 1  # gone, its messages still unread
        others = _connect(loop, ctx, 3, read=False)
        assert [peer.outcome for peer in others] == [("admitted", 0)] * 2 + [("refused", 400)]
        loop.turn()  # read what it sent: the socket is found empty
        loop.turn()  # one turn later its room is given back
        assert loop.read == [b"m%d" % n for n in range(5)]
        # (the refused peer's end reaches the loop by its monitor, whenever
        # libzmq's thread gets to it: on a loaded machine, a few turns on)
        wait_for(lambda: (loop.turn(), loop.tally.held == 2)[1], 10, interval=0.01)
        for peer in others:
            peer.close()
    finally:
        ctx.destroy(linger=0)


def test_a_refused_handshake_holds_no_room(loop: Loop) -> None:
    """Connections refused at the cap end without a pipe: once they are
    gone, the count is back to the connections admitted."""
    ctx = zmq.Context()
    try:
        peers = _connect(loop, ctx, 8)
        assert sum(peer.outcome == ("refused", 400) for peer in peers) == 5
        for peer in peers[3:]:
            peer.close()
        wait_for(lambda: (loop.turn(), loop.tally.held == 3)[1], 10, interval=0.01)
        for peer in peers[:3]:
            peer.close()
    finally:
        ctx.destroy(linger=0)


def test_ended_connections_are_released_after_enough_reads() -> None:
    """A socket that is never empty (a flood) still gives back the room of
    a connection that ended, once as many messages were read as fair
    queueing needs to empty its pipe."""
    tally = Tally(open=1)
    tally.draining.append((0, 1))
    tally.reads = 999
    tally.release(drain_reads=1000)
    assert tally.held == 2
    tally.reads = 1000
    tally.release(drain_reads=1000)
    assert tally.held == 1


def test_the_file_limit_covers_both_endpoints() -> None:
    assert files_needed(1024) >= 2 * 1024 + 64


def test_resends_back_off() -> None:
    """A broker slow under a flood reads every copy of a request in turn:
    the copies come ever less often."""
    ping = p.Ping(1)
    gaps = [resend_every(ping, 0.0, n) for n in range(6)]
    assert gaps == [1.0, 2.0, 4.0, RESEND_INTERVAL_MAX, RESEND_INTERVAL_MAX, RESEND_INTERVAL_MAX]
    assert resend_every(p.Cancel(1, "j"), 0.0) is None


def test_the_broker_refuses_the_connection_past_its_cap(env: Env) -> None:
    """End to end: with ``max_connections = 2``, two clients are served, a
    third (Client and AsyncClient alike) gets BrokerUnavailable and the
    broker logs why; once one leaves, both connect again by themselves."""
    env.write_config(processes=0, extra_broker="max_connections = 2")
    broker = env.start("broker")
    env.wait_ready(broker)  # its client's room comes back a pass or two after it left
    first, second = env.client(timeout=1.0), env.client(timeout=1.0)
    _ping_until_in(first)
    _ping_until_in(second)
    third = corral.Client(env.endpoint, timeout=1.0)
    with pytest.raises(corral.BrokerUnavailable):
        third.ping()

    async def one_ping(client: corral.AsyncClient) -> str:
        return await client.ping()

    loop = asyncio.new_event_loop()
    late = corral.AsyncClient(env.endpoint, timeout=1.0)
    try:
        with pytest.raises(corral.BrokerUnavailable):
            loop.run_until_complete(one_ping(late))
        first.close()
        _ping_until_in(third)  # first's room comes back
        third.close()
        # the AsyncClient dropped its refused socket and opens a new one
        _ping_until_in(lambda: loop.run_until_complete(one_ping(late)))
    finally:
        late.close()
        loop.close()
        third.close()
    status = second.status()
    assert status.stats["connections_refused"] >= 2
    assert broker.alive()
    assert "broker.connections_full" in broker.output()


def _ping_until_in(client: corral.Client | Any, within: float = 30.0) -> None:
    """Ping (``client.ping`` or a callable) until the broker answers: a
    refused connection raises BrokerUnavailable, and the next try connects
    again."""
    ping = client.ping if isinstance(client, corral.Client) else client
    deadline = time.monotonic() + within
    while True:
        try:
            ping()
            return
        except corral.BrokerUnavailable:
            assert time.monotonic() < deadline, "the broker never let the client in"
