"""An in-process broker for tests: the real BrokerCore, the real log on a
real directory, a FakeClock, and links that record what would go out on
the sockets. Nothing sleeps: a test moves the clock and runs a pass."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgspec

from corral.broker import protocol as p
from corral.broker.clock import FakeClock
from corral.broker.core import CLIENT, WORKER, BrokerCore
from corral.broker.logfiles import Files
from corral.config import loads

#: Small log segments, for tests that restart or compact: less preallocated
#: space to write and scan.
SMALL_LOG = 'segment_size = "1MiB"\ndisk_reserve = "16KiB"\nmax_message_size = "512KiB"'


class Recorder:
    """A link that records every message and reports it sent."""

    def __init__(self, events: list[tuple[str, Any]], side: str) -> None:
        self.events = events
        self.side = side
        self.sent: list[tuple[bytes, bytes]] = []
        self.frames: list[tuple[bytes, tuple[bytes, ...]]] = []
        self.refuse = False

    def send(self, identity: bytes, body: bytes) -> bool:
        if self.refuse:
            return False
        self.sent.append((identity, body))
        self.events.append((f"send-{self.side}", (identity, body)))
        return True

    def send_frames(self, identity: bytes, frames: tuple[bytes, ...]) -> bool:
        """Recorded joined, as a client reads them; the frames themselves
        in ``frames``."""
        if self.refuse:
            return False
        self.frames.append((identity, frames))
        return self.send(identity, b"".join(frames))


def config_text(state_dir: Path, *, fsync: str = "always", extra: str = "") -> str:
    return f"""
[broker]
state_dir = "{state_dir}"
client_endpoint = "ipc://{state_dir}/c.sock"
worker_endpoint = "ipc://{state_dir}/w.sock"
fsync = "{fsync}"
heartbeat_interval = "1s"
heartbeat_liveness = 3
{extra}
"""


class InProcessBroker:
    """A BrokerCore driven by hand; see the module docstring."""

    def __init__(
        self,
        state_dir: Path,
        *,
        clock: FakeClock | None = None,
        fsync: str = "always",
        extra: str = "",
        schedules: str = "",
        files: Files | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.clock = clock or FakeClock()
        self.config_text = config_text(state_dir, fsync=fsync, extra=extra) + schedules
        self.config = loads(self.config_text)
        self.events: list[tuple[str, Any]] = []
        self.core = BrokerCore(self.config, clock=self.clock, files=files)
        self.core.replay()
        self.clients = Recorder(self.events, CLIENT)
        self.workers = Recorder(self.events, WORKER)
        self.core.attach(self.clients, self.workers)
        self._req = 0
        #: Fake workers that heartbeat while time passes.
        self.live: list[FakeWorker] = []

    # -- driving

    def run_pass(self, *inbound: tuple[str, list[bytes]]) -> None:
        self.core.run_pass(list(inbound))

    def advance(self, seconds: float, step: float = 0.5) -> None:
        """Let ``seconds`` pass in steps of at most ``step``, running a pass
        (the tick) after each, with a heartbeat from every live FakeWorker."""
        left = seconds
        while True:
            dt = min(step, left)
            self.clock.advance(dt)
            left -= dt
            beats = [(WORKER, [w.identity, p.encode(p.WorkerHeartbeat())]) for w in self.live]
            self.run_pass(*beats)
            if left <= 1e-9:
                return

    def crash(self) -> None:
        """kill -9 of the broker: a compaction's child dies with it (the
        kernel's parent-death signal), what was written stays in the files,
        nothing more is synced. Open a new InProcessBroker on the same state
        dir to restart."""
        for child in (self.core.compactor.child, self.core.indexer.child):
            if child is not None:
                child.kill()
                child.wait()
        log = self.core.log
        if log._active is not None:
            os.close(log._active.fd)
            log._active = None
        cold = self.core.state.jobs.cold
        if cold is not None:  # the base the cold jobs are read from, as a kill closes it
            cold.close()

    def close(self) -> None:
        """A clean stop: a compaction under way is stopped, the log synced."""
        self.core.close()

    def request(self, msg: Any, identity: bytes = b"client-1") -> Any:
        """Send a client request in a pass of its own; returns its reply."""
        before = len(self.clients.sent)
        self.run_pass((CLIENT, [identity, p.encode(msg)]))
        replies = [b for i, b in self.clients.sent[before:] if i == identity]
        assert len(replies) == 1, replies
        return p.decode(p.client_reply_decoder, replies[0])

    def next_req(self) -> int:
        self._req += 1
        return self._req

    def enqueue(self, task: str = "t.task", payload: Any = None, **options: Any) -> str:
        job_id = options.pop("id", f"job-{self._req + 1}")
        spec = p.JobSpec(job_id, task, p.encode_value(payload), **options)
        reply = self.request(p.Enqueue(self.next_req(), [spec]))
        assert isinstance(reply, p.EnqueueOk), reply
        return str(reply.ids[0])

    def job(self, job_id: str) -> p.JobInfo | None:
        reply = self.request(p.GetJob(self.next_req(), job_id))
        return reply.job if isinstance(reply, p.JobReply) else None

    def to_worker(self, identity: bytes, since: int = 0) -> list[Any]:
        """Decoded messages sent to worker ``identity`` (from index ``since``)."""
        return [
            p.decode(p.worker_command_decoder, body)
            for i, body in self.workers.sent[since:]
            if i == identity
        ]


class FakeWorker:
    """A worker speaking the protocol through an :class:`InProcessBroker`."""

    def __init__(
        self,
        broker: InProcessBroker,
        identity: bytes = b"worker-1",
        *,
        queues: tuple[str, ...] = ("default",),
        credit: int = 1,
        tasks: tuple[p.TaskInfo, ...] = (),
    ) -> None:
        self.broker = broker
        self.identity = identity
        self.queues = queues
        self.credit = credit
        self.tasks = tasks
        self._seen = 0
        broker.live.append(self)

    def go_silent(self) -> None:
        """Stop heartbeating (a hung or partitioned worker)."""
        self.broker.live.remove(self)

    def send(self, msg: Any) -> list[Any]:
        """Send ``msg`` in a pass of its own; returns what the broker sent
        this worker since the last call."""
        self.broker.run_pass((WORKER, [self.identity, p.encode(msg)]))
        return self.inbox()

    def inbox(self) -> list[Any]:
        got = self.broker.to_worker(self.identity, self._seen)
        self._seen = len(self.broker.workers.sent)
        return got

    def ready(
        self, *, holding: list[p.Holding] | None = None, worker_id: str | None = None
    ) -> list[p.Delivery]:
        """Register (again): as ``worker_id`` (default: the identity),
        offering back the jobs in ``holding``."""
        msgs = self.send(
            p.Ready(
                worker_id or self.identity.decode(),
                list(self.queues),
                self.credit,
                1,
                list(self.tasks),
                "testhost",
                4242,
                holding=list(holding or []),
            )
        )
        return deliveries(msgs)

    def start(self, d: p.Delivery) -> list[Any]:
        return self.send(p.Report([p.Lease(d.job_id, d.lease)], []))

    def finish(self, d: p.Delivery, kind: str = "ok", result: Any = None, **kw: Any) -> list[Any]:
        outcome = p.Outcome(d.job_id, d.lease, kind, p.encode_value(result), **kw)
        return self.send(p.Report([], [outcome]))


def deliveries(msgs: list[Any]) -> list[p.Delivery]:
    return [d for m in msgs if isinstance(m, p.Deliver) for d in m.jobs]


def decoded(raw: msgspec.Raw) -> Any:
    return msgspec.msgpack.decode(raw)
