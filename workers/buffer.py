"""A worker's prefetch buffer: the jobs leased to it and not started.

The socket thread puts deliveries in and takes back the ones the broker
asks for (a cancel, a pause, a job wanted elsewhere); handler threads take
the next job to run. Jobs start highest priority first, then in delivery
order, so a job with a higher priority waits only behind jobs that already
run. A job is started exactly when a handler takes it: from then on a
withdraw no longer finds it, and the broker is told it started.

While the worker registers again (after a broker restart or a reconnect)
the buffer is paused: no buffered job starts until the broker has said
which of the jobs offered back are still this worker's.
"""

from __future__ import annotations

import heapq
import threading

from corral.broker import protocol as p
from corral.context import JobContext


class Buffer:
    """Thread-safe; see the module docstring."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        #: (-priority, arrival number, job id) of the buffered jobs.
        self._heap: list[tuple[int, int, str]] = []
        self._jobs: dict[str, p.Delivery] = {}
        #: Jobs a handler took and has not yet begun (see :meth:`settle`).
        self._taken: dict[str, p.Delivery] = {}
        self._arrivals = 0
        self._stops = 0
        self._paused = False

    def __len__(self) -> int:
        with self._cond:
            return len(self._jobs)

    def put(self, delivery: p.Delivery) -> None:
        """Buffer a delivered job. A delivery of a job id already buffered
        replaces it (the broker leased it anew)."""
        with self._cond:
            self._arrivals += 1
            self._jobs[delivery.job_id] = delivery
            heapq.heappush(self._heap, (-delivery.priority, self._arrivals, delivery.job_id))
            self._cond.notify()

    def take(self, timeout: float | None = None) -> p.Delivery | None:
        """The next job to start, taken out (it is started from now on);
        None once :meth:`stop` is called, or after ``timeout`` seconds with
        nothing to take (None: wait as long as it takes)."""
        with self._cond:
            while True:
                if self._stops:
                    self._stops -= 1
                    return None
                delivery = None if self._paused else self._pop()
                if delivery is not None:
                    self._taken[delivery.job_id] = delivery
                    return delivery
                if not self._cond.wait(timeout) and timeout is not None:
                    return None

    def _pop(self) -> p.Delivery | None:
        while self._heap:
            _, _, job_id = heapq.heappop(self._heap)
            delivery = self._jobs.pop(job_id, None)
            if delivery is not None:
                return delivery
        return None

    def withdraw(self, job_id: str, lease: int) -> p.Delivery | None:
        """Take back the buffered job ``job_id`` under ``lease``, so that it
        never starts here. None if it is not buffered (it started already,
        or was never here). Its heap entry is skipped when reached."""
        with self._cond:
            delivery = self._jobs.get(job_id)
            if delivery is None or delivery.lease != lease:
                return None
            del self._jobs[job_id]
            return delivery

    def clear(self) -> list[p.Delivery]:
        """Take back every buffered job, in the order they would have started."""
        with self._cond:
            out = []
            while (delivery := self._pop()) is not None:
                out.append(delivery)
            return out

    def settle(self, job_id: str) -> None:
        """A job :meth:`take` gave out began, or went back: it is no longer
        between the buffer and its handler."""
        with self._cond:
            self._taken.pop(job_id, None)

    def offered(self) -> list[p.Delivery]:
        """The jobs buffered or taken and not begun, in no particular order."""
        with self._cond:
            return [*self._taken.values(), *self._jobs.values()]

    def pause(self) -> None:
        """No buffered job starts until :meth:`resume` (a stop still ends
        :meth:`take`)."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def has_next(self) -> bool:
        """Whether a job could be taken now: a hint, read without the lock
        (another thread may change it the moment after)."""
        return bool(self._jobs) and not self._paused and not self._stops

    def stop(self, takers: int) -> None:
        """Make the next ``takers`` calls of :meth:`take` return None."""
        with self._cond:
            self._stops += takers
            self._cond.notify_all()


class Held:
    """The jobs a worker holds: buffered (a :class:`Buffer`) and running
    (their contexts). A cancel finds a job wherever it is, including in the
    moment between a handler taking it and beginning it."""

    def __init__(self) -> None:
        self.buffer = Buffer()
        #: job id -> the context of its running handler.
        self.running: dict[str, JobContext] = {}
        #: Cancels that came for a job taken from the buffer and not yet
        #: begun: (job id, lease), oldest first, bounded.
        self._revoked: dict[tuple[str, int], None] = {}
        self._lock = threading.Lock()

    def cancel(self, job_id: str, lease: int) -> str:
        """Cancel the job under ``lease``: ``"buffered"`` if it was dropped
        from the buffer unstarted (hand it back), ``"running"`` if its
        handler now sees ctx.cancelled, ``"pending"`` otherwise (a handler
        took it and :meth:`claim` will refuse it; or it had ended)."""
        with self._lock:
            if self.buffer.withdraw(job_id, lease) is not None:
                return "buffered"
            ctx = self.running.get(job_id)
            if ctx is not None and ctx.lease == lease:
                ctx._cancelled = True
                return "running"
            self._revoked[job_id, lease] = None
            while len(self._revoked) > 1000:  # cancels of jobs that had ended
                del self._revoked[next(iter(self._revoked))]
            return "pending"

    def claim(self, delivery: p.Delivery, ctx: JobContext) -> bool:
        """Make a job a handler took from the buffer a running one; False if
        it was cancelled in between (it must be handed back, never begun)."""
        with self._lock:
            self.buffer.settle(delivery.job_id)
            key = (delivery.job_id, delivery.lease)
            if key in self._revoked:
                del self._revoked[key]
                return False
            self.running[delivery.job_id] = ctx
            return True

    def holding(self) -> list[p.Holding]:
        """Every job held, to offer back as the worker registers again:
        running ones first (their handler began), then those not begun
        (buffered, or taken by a handler that has not begun them yet)."""
        with self._lock:  # a claim moves a job from taken to running under it
            running = [p.Holding(job_id, ctx.lease, True) for job_id, ctx in self.running.items()]
            waiting = [p.Holding(d.job_id, d.lease) for d in self.buffer.offered()]
        return running + [h for h in waiting if h.job_id not in self.running]

    def end(self, job_id: str) -> None:
        self.running.pop(job_id, None)
