"""Tests for corral.broker.timers.Deadlines against a plain dict model: the
same deadlines come due in the same order, and the heap never holds more
than twice the live deadlines plus the slack, whatever is set, moved,
cancelled, shifted or taken."""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from corral.broker.deadlines import SLACK, Deadlines

keys = st.integers(min_value=0, max_value=40)
times = st.floats(min_value=0, max_value=100, allow_nan=False)


class DeadlinesMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.timers: Deadlines[int, str] = Deadlines()
        self.model: dict[int, tuple[float, str]] = {}

    @rule(key=keys, due=times)
    def set(self, key: int, due: float) -> None:
        self.timers.set(key, due, f"v{due}")
        self.model[key] = (due, f"v{due}")

    @rule(key=keys)
    def discard(self, key: int) -> None:
        self.timers.discard(key)
        self.model.pop(key, None)

    @rule(seconds=st.floats(min_value=0, max_value=10, allow_nan=False))
    def shift(self, seconds: float) -> None:
        self.timers.shift(seconds)
        self.model = {k: (due + seconds, v) for k, (due, v) in self.model.items()}

    @rule(now=times)
    def pop_due(self, now: float) -> None:
        got = []
        while (entry := self.timers.pop_due(now)) is not None:
            got.append(entry)
        dues = [due for _, due, _ in got]
        assert dues == sorted(dues)
        expected = {k: (due, v) for k, (due, v) in self.model.items() if due <= now}
        assert {k: (due, v) for k, due, v in got} == expected
        for key in expected:
            del self.model[key]

    @invariant()
    def agrees(self) -> None:
        assert len(self.timers) == len(self.model)
        assert self.timers.next_due() == min((d for d, _ in self.model.values()), default=None)
        for key, (due, value) in self.model.items():
            assert self.timers.get(key) == (due, value)
        assert self.timers.heap_size <= 2 * len(self.model) + SLACK
        if not self.model:
            assert self.timers.heap_size == 0


TestDeadlines = DeadlinesMachine.TestCase


def test_a_key_set_over_and_over_holds_one_live_deadline() -> None:
    timers: Deadlines[str, None] = Deadlines()
    for n in range(10_000):
        timers.set("job", float(n), None)
    assert len(timers) == 1 and timers.heap_size <= 2 + SLACK
    assert timers.pop_due(1e9) == ("job", 9999.0, None)
    assert timers.pop_due(1e9) is None and timers.heap_size == 0
