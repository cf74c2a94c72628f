"""Provider rate limits (GCRA) and priority lanes (gateway/core/ratelimit.py)."""

from __future__ import annotations

import copy
import math
from fractions import Fraction

import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from gateway.core.model import LANES_BY_PRIORITY, Lane
from gateway.core.ratelimit import LaneQueue, RateLimiter

rates = st.floats(min_value=0.01, max_value=5000.0) | st.sampled_from([1.0, 3.0, 10.0, 100.0])
bursts = st.integers(1, 20)
starts = (
    st.floats(min_value=0.0, max_value=4e9)
    | st.sampled_from([0.0, 100.0, 1.7e9])
    | st.floats(min_value=-1e3, max_value=0.0)  # nothing requires a clock to read positive
)


class TestRateLimiterValidation:
    """A limiter needs a positive rate and room for at least one request."""

    @pytest.mark.parametrize(("rate", "burst"), [(0.0, 1), (-1.0, 1), (1.0, 0), (1.0, -3)])
    def test_invalid_settings_raise(self, rate: float, burst: int) -> None:
        with pytest.raises(ValueError, match=r"rate_per_second|burst"):
            RateLimiter(rate, burst)

    def test_keeps_its_settings(self) -> None:
        limiter = RateLimiter(50.0, burst=5)
        assert (50.0, 5) == (limiter.rate_per_second, limiter.burst)


class TestRateLimiter:
    """A token bucket: ``burst`` requests at once, then one per ``1 / rate`` seconds."""

    @pytest.mark.parametrize(
        ("rate", "burst", "now"),
        [
            (1.0, 1, 0.0),
            (10.0, 3, 0.0),
            (100.0, 2, 100.0),
            (1000.0, 50, 100.0),
            (3.0, 50, 0.0),
            (7.0, 13, 1_700_000_000.25),
        ],
    )
    def test_burst_goes_at_once(self, rate: float, burst: int, now: float) -> None:
        limiter = RateLimiter(rate, burst)
        assert [0.0] * burst == [limiter.try_acquire(now) for _ in range(burst)]
        assert limiter.try_acquire(now) == pytest.approx(
            1.0 / rate, abs=4 * math.ulp(max(now, 1.0))
        )

    @pytest.mark.parametrize(("rate", "burst", "now"), [(100.0, 2, 100.0), (1000.0, 3, 100.0)])
    def test_the_wait_is_one_a_clock_can_tell(self, rate: float, burst: int, now: float) -> None:
        """A wait too small to move a float clock would spin a virtual clock forever."""
        limiter = RateLimiter(rate, burst)
        for _ in range(burst + 5):
            wait = limiter.try_acquire(now)
            if wait:
                assert now + wait > now
                now += wait
                assert 0.0 == limiter.try_acquire(now)

    def test_a_wait_is_rounded_up_to_what_the_clock_can_reach(self) -> None:
        # ready - now rounds down here; now + that would land one ulp short of ready
        limiter = RateLimiter(10.0, burst=1)
        start, now = -0.03158962440270309, -0.024412110303157646
        assert 0.0 == limiter.try_acquire(start)
        ready = start + 0.1
        assert now + (ready - now) < ready
        wait = limiter.wait_seconds(now)
        assert now + wait >= ready
        assert 0.0 == limiter.try_acquire(now + wait)

    def test_refills_at_the_rate(self) -> None:
        limiter = RateLimiter(2.0, burst=1)
        assert 0.0 == limiter.try_acquire(10.0)
        assert 0.5 == limiter.try_acquire(10.0)
        assert 0.25 == limiter.try_acquire(10.25)
        assert 0.0 == limiter.try_acquire(10.5)
        assert 0.5 == limiter.wait_seconds(10.5)

    def test_idle_time_refills_only_up_to_the_burst(self) -> None:
        limiter = RateLimiter(1.0, burst=3)
        assert 0.0 == limiter.try_acquire(0.0)
        results = [limiter.try_acquire(1000.0) for _ in range(4)]
        assert [0.0, 0.0, 0.0] == results[:3]
        assert results[3] > 0.0

    def test_wait_seconds_does_not_take_a_token(self) -> None:
        limiter = RateLimiter(1.0, burst=1)
        assert 0.0 == limiter.wait_seconds(5.0)
        assert 0.0 == limiter.wait_seconds(5.0)
        assert 0.0 == limiter.try_acquire(5.0)
        assert 1.0 == limiter.wait_seconds(5.0)

    @settings(max_examples=300, deadline=None)
    @given(
        rate=rates,
        burst=bursts,
        start=starts,
        gaps=st.lists(
            st.floats(min_value=0.0, max_value=2.0) | st.just(0.0) | st.sampled_from([1e-9, 0.1]),
            min_size=1,
            max_size=60,
        ),
    )
    def test_never_more_than_burst_plus_rate_times_t(
        self, rate: float, burst: int, start: float, gaps: list[float]
    ) -> None:
        limiter = RateLimiter(rate, burst)
        now = start
        taken: list[float] = []
        for gap in gaps:
            now += gap / rate  # gaps in units of the emission interval
            if limiter.try_acquire(now) == 0.0:
                taken.append(now)
        # The fullest closed interval starts and ends at an acquisition: check them all, in
        # exact arithmetic. Instants are floats: `1 / rate` and `base + k * interval` round, so
        # an acquisition may come a few ulps of the clock early, never more.
        exact_rate = Fraction(rate)
        for i, first in enumerate(taken):
            for j in range(i, len(taken)):
                span = Fraction(taken[j]) - Fraction(first)
                slack = Fraction(8 * math.ulp(max(abs(first), abs(taken[j]), 1.0)))
                assert j - i + 1 <= burst + exact_rate * (span + slack), (i, j, span)
        if len(taken) < len(gaps):
            event("some requests were refused")

    @settings(max_examples=300, deadline=None)
    @given(
        rate=rates,
        burst=bursts,
        start=starts,
        gaps=st.lists(st.floats(min_value=0.0, max_value=3.0), max_size=30),
        idle=st.floats(min_value=0.0, max_value=10.0),
    )
    # the caller's `start + 3 / 10` and the bucket's `3 * 0.1` differ by an ulp: the last
    # request of the burst was told to wait 5.5e-17 s
    @example(rate=10.0, burst=3, start=0.0, gaps=[0.0, 0.0, 1.1e-16], idle=0.0)
    def test_an_idle_bucket_serves_a_whole_burst(
        self, rate: float, burst: int, start: float, gaps: list[float], idle: float
    ) -> None:
        """After ``burst / rate`` idle seconds the bucket is full, whatever came before."""
        limiter = RateLimiter(rate, burst)
        now = start
        for gap in gaps:
            now += gap / rate
            limiter.try_acquire(now)
        now += (burst + idle) / rate
        assert [0.0] * burst == [limiter.try_acquire(now) for _ in range(burst)]
        assert limiter.try_acquire(now) > 0.0

    @settings(max_examples=300)
    @given(
        rate=rates,
        burst=bursts,
        start=starts,
        gaps=st.lists(st.floats(min_value=0.0, max_value=3.0), min_size=1, max_size=40),
    )
    def test_wait_seconds_agrees_with_try_acquire(
        self, rate: float, burst: int, start: float, gaps: list[float]
    ) -> None:
        limiter = RateLimiter(rate, burst)
        now = start
        waited = 0
        for gap in gaps:
            now += gap / rate
            wait = limiter.wait_seconds(now)
            assert wait >= 0.0
            got = limiter.try_acquire(now)
            assert wait == got
            if got == 0.0:
                continue
            # waiting what it says is enough (and the clock can tell the difference) ...
            later = now + got
            assert later > now
            assert 0.0 == copy.copy(limiter).wait_seconds(later)
            # ... and not much more than needed
            if got > 1e-6 * max(1.0, abs(now)):
                assert copy.copy(limiter).try_acquire(now + got * 0.99) > 0.0
            now = later
            assert 0.0 == limiter.try_acquire(now)
            waited += 1
        if waited:
            event("waited for a token")


class TestLaneQueue:
    """Strict priority across lanes, FIFO within one."""

    def test_empty(self) -> None:
        queue: LaneQueue[str] = LaneQueue()
        assert None is queue.pop()
        assert 0 == len(queue)

    def test_critical_before_normal_before_bulk(self) -> None:
        queue: LaneQueue[str] = LaneQueue()
        queue.push(Lane.BULK, "promo-1")
        queue.push(Lane.NORMAL, "news")
        queue.push(Lane.BULK, "promo-2")
        queue.push(Lane.CRITICAL, "otp")
        popped = [queue.pop() for _ in range(5)]
        assert [
            (Lane.CRITICAL, "otp"),
            (Lane.NORMAL, "news"),
            (Lane.BULK, "promo-1"),
            (Lane.BULK, "promo-2"),
            None,
        ] == popped

    def test_depth_per_lane(self) -> None:
        queue: LaneQueue[int] = LaneQueue()
        for i in range(3):
            queue.push(Lane.BULK, i)
        queue.push(Lane.CRITICAL, 9)
        assert [1, 0, 3] == [queue.depth(lane) for lane in LANES_BY_PRIORITY]
        assert 4 == len(queue)

    @settings(max_examples=300)
    @given(
        operations=st.lists(
            st.tuples(st.sampled_from(["push", "pop"]), st.sampled_from(Lane)),
            max_size=60,
        )
    )
    def test_matches_a_list_model(self, operations: list[tuple[str, Lane]]) -> None:
        queue: LaneQueue[int] = LaneQueue()
        model: dict[Lane, list[int]] = {lane: [] for lane in LANES_BY_PRIORITY}
        for serial, (operation, lane) in enumerate(operations):
            if operation == "push":
                queue.push(lane, serial)
                model[lane].append(serial)
            else:
                expected = next(
                    ((name, model[name].pop(0)) for name in LANES_BY_PRIORITY if model[name]),
                    None,
                )
                assert expected == queue.pop()
            assert [len(model[name]) for name in LANES_BY_PRIORITY] == [
                queue.depth(name) for name in LANES_BY_PRIORITY
            ]
            assert sum(len(items) for items in model.values()) == len(queue)
