"""Keyed deadlines expired by a ``now`` passed in (gateway/core/timers.py)."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from gateway.core.timers import Deadlines

keys = st.sampled_from([f"k{i}" for i in range(8)])
times = st.integers(0, 20).map(float) | st.floats(min_value=0.0, max_value=20.0)


class TestDeadlines:
    """One deadline per key; ``pop_due`` hands back what is due, earliest first."""

    def test_empty(self) -> None:
        deadlines: Deadlines[str] = Deadlines()
        assert 0 == len(deadlines)
        assert None is deadlines.next_deadline()
        assert [] == deadlines.pop_due(1e18)

    def test_pop_due_earliest_first(self) -> None:
        deadlines: Deadlines[str] = Deadlines()
        deadlines.schedule("c", 30.0)
        deadlines.schedule("a", 10.0)
        deadlines.schedule("b", 20.0)
        assert [("a", 10.0), ("b", 20.0)] == deadlines.pop_due(20.0)
        assert 1 == len(deadlines)
        assert 30.0 == deadlines.next_deadline()

    def test_equal_deadlines_come_out_in_scheduling_order(self) -> None:
        deadlines: Deadlines[str] = Deadlines()
        for key in ("z", "a", "m"):
            deadlines.schedule(key, 5.0)
        assert [("z", 5.0), ("a", 5.0), ("m", 5.0)] == deadlines.pop_due(5.0)

    def test_keys_need_not_be_orderable(self) -> None:
        deadlines: Deadlines[object] = Deadlines()
        first, second = object(), object()
        deadlines.schedule(first, 1.0)
        deadlines.schedule(second, 1.0)
        assert [(first, 1.0), (second, 1.0)] == deadlines.pop_due(1.0)

    @pytest.mark.parametrize(("first", "second"), [(10.0, 20.0), (20.0, 10.0)])
    def test_schedule_again_replaces(self, first: float, second: float) -> None:
        deadlines: Deadlines[str] = Deadlines()
        deadlines.schedule("a", first)
        deadlines.schedule("a", second)
        assert 1 == len(deadlines)
        assert second == deadlines.next_deadline()
        assert [("a", second)] == deadlines.pop_due(30.0)

    def test_cancel(self) -> None:
        deadlines: Deadlines[str] = Deadlines()
        deadlines.schedule("a", 10.0)
        assert "a" in deadlines
        assert deadlines.cancel("a")
        assert "a" not in deadlines
        assert not deadlines.cancel("a")
        assert None is deadlines.next_deadline()
        assert [] == deadlines.pop_due(10.0)

    def test_limit(self) -> None:
        deadlines: Deadlines[int] = Deadlines()
        for key in range(5):
            deadlines.schedule(key, float(key))
        assert [(0, 0.0), (1, 1.0)] == deadlines.pop_due(10.0, limit=2)
        assert [(2, 2.0), (3, 3.0), (4, 4.0)] == deadlines.pop_due(10.0, limit=10)

    def test_many_reschedules_stay_compact(self) -> None:
        """Stale heap entries are compacted, so rescheduling one key forever costs O(1) memory."""
        deadlines: Deadlines[str] = Deadlines()
        deadlines.schedule("other", 1e9)
        for step in range(5000):
            deadlines.schedule("a", float(step))
        assert len(deadlines._heap) <= 2 * len(deadlines) + 1024 + 1
        assert 0.0 + 4999 == deadlines.next_deadline()
        assert [("a", 4999.0)] == deadlines.pop_due(1e6)
        assert [("other", 1e9)] == deadlines.pop_due(1e9)


class DeadlinesMachine(RuleBasedStateMachine):
    """``Deadlines`` against a dict of key -> (deadline, scheduling order)."""

    def __init__(self) -> None:
        super().__init__()
        self.deadlines: Deadlines[str] = Deadlines()
        self.model: dict[str, tuple[float, int]] = {}
        self.serial = 0

    @rule(key=keys, deadline=times)
    def schedule(self, key: str, deadline: float) -> None:
        self.serial += 1
        self.model[key] = (deadline, self.serial)
        self.deadlines.schedule(key, deadline)

    @rule(key=keys)
    def cancel(self, key: str) -> None:
        expected = self.model.pop(key, None) is not None
        assert expected == self.deadlines.cancel(key)

    @rule(now=times, limit=st.none() | st.integers(0, 4))
    def pop_due(self, now: float, limit: int | None) -> None:
        due = sorted(
            (
                (order, key, deadline)
                for key, (deadline, order) in self.model.items()
                if deadline <= now
            ),
            key=lambda item: (item[2], item[0]),
        )
        if limit is not None:
            due = due[:limit]
        for _, key, _ in due:
            del self.model[key]
        assert [(key, deadline) for _, key, deadline in due] == self.deadlines.pop_due(now, limit)

    @rule(key=keys)
    def contains(self, key: str) -> None:
        assert (key in self.model) == (key in self.deadlines)

    @invariant()
    def same_size(self) -> None:
        assert len(self.model) == len(self.deadlines)

    @invariant()
    def same_next_deadline(self) -> None:
        expected = min((deadline for deadline, _ in self.model.values()), default=None)
        assert expected == self.deadlines.next_deadline()


TestDeadlinesMachine = DeadlinesMachine.TestCase
TestDeadlinesMachine.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
