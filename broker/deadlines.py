"""Deadlines by key: set, move or cancel one in O(log n), take the due ones
in order. Pure; times are in whatever clock the caller uses (seconds).

A heap with lazy deletion: cancelling or moving a deadline leaves its old
heap entry behind, skipped when it reaches the top. So that those entries
never outnumber the live ones (a heap of 20,000 finished tries kept until
each one's timeout passed), the heap is rebuilt from the live deadlines
whenever its stale entries outnumber the live ones by :data:`SLACK`, and
emptied when none is live: its size follows the live deadlines, never the
history, at an amortised O(1) per change.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

#: Stale heap entries tolerated beyond the live ones before a rebuild.
SLACK = 64


class Deadlines(Generic[K, V]):
    """key -> (when it is due, a value). ``len()`` counts the live ones."""

    def __init__(self) -> None:
        #: key -> (due, entry number, value); the entry number tells the
        #: heap entry that is live from those left behind.
        self._live: dict[K, tuple[float, int, V]] = {}
        self._heap: list[tuple[float, int, K]] = []
        self._numbers = itertools.count()

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, key: object) -> bool:
        return key in self._live

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._live))

    @property
    def heap_size(self) -> int:
        """Heap entries, stale ones included (at most twice the live ones
        plus :data:`SLACK`)."""
        return len(self._heap)

    def set(self, key: K, due: float, value: V) -> None:
        """``key`` is due at ``due``, with ``value`` (replacing any deadline
        it had)."""
        number = next(self._numbers)
        self._live[key] = (due, number, value)
        heapq.heappush(self._heap, (due, number, key))
        self._tidy()

    def get(self, key: K) -> tuple[float, V] | None:
        """(due, value) of ``key``, or None if it has no deadline."""
        entry = self._live.get(key)
        return (entry[0], entry[2]) if entry is not None else None

    def discard(self, key: K) -> None:
        """``key`` has no deadline any more (nothing if it had none)."""
        if self._live.pop(key, None) is not None:
            self._tidy()

    def next_due(self) -> float | None:
        """When the earliest live deadline is due, if any."""
        self._drop_stale_top()
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> tuple[K, float, V] | None:
        """The earliest deadline due by ``now`` (key, due, value), taken
        off; None if none is due. Changes made between two calls (a key
        set again, another cancelled) are seen by the next call."""
        self._drop_stale_top()
        if not self._heap or self._heap[0][0] > now:
            return None
        due, _, key = heapq.heappop(self._heap)
        _, _, value = self._live.pop(key)
        self._tidy()
        return key, due, value

    def shift(self, seconds: float) -> None:
        """Move every deadline ``seconds`` later (the same amount for all
        keeps the heap a heap)."""
        self._live = {k: (due + seconds, n, v) for k, (due, n, v) in self._live.items()}
        self._heap = [(due + seconds, n, k) for due, n, k in self._heap]

    def _drop_stale_top(self) -> None:
        heap = self._heap
        while heap and not self._is_live(heap[0]):
            heapq.heappop(heap)

    def _is_live(self, entry: tuple[float, int, K]) -> bool:
        live = self._live.get(entry[2])
        return live is not None and live[1] == entry[1]

    def _tidy(self) -> None:
        """Empty the heap if nothing is live; rebuild it from the live
        deadlines once stale entries outnumber them by SLACK."""
        if not self._live:
            self._heap.clear()
        elif len(self._heap) > 2 * len(self._live) + SLACK:
            self._heap = [(due, n, k) for k, (due, n, _) in self._live.items()]
            heapq.heapify(self._heap)
