"""The global control group: deterministic, uniform, redrawn per period (core/control_group.py)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.control_group import ControlGroup

DAY = 86400.0
RECIPIENTS = 100_000


def share(group: ControlGroup, *, now: float, tenant: str = "shop") -> float:
    held = sum(group.holds_out(tenant, f"r{index}", now=now) for index in range(RECIPIENTS))
    return held / RECIPIENTS


class TestValidation:
    """A control group refuses percents outside 0..100 and non-positive periods."""

    @pytest.mark.parametrize("percent", [-0.001, -5.0, 100.001, 250.0, math.nan, math.inf])
    def test_invalid_percent_raises(self, percent: float) -> None:
        with pytest.raises(ValueError, match="percent"):
            ControlGroup(percent=percent)

    @pytest.mark.parametrize("period", [0.0, -1.0, -DAY])
    def test_non_positive_period_raises(self, period: float) -> None:
        with pytest.raises(ValueError, match="period"):
            ControlGroup(percent=5.0, period_seconds=period)

    @pytest.mark.parametrize("percent", [0.0, 0.5, 5.0, 100.0])
    def test_valid_percent_is_kept(self, percent: float) -> None:
        assert percent == ControlGroup(percent=percent).percent


class TestPeriod:
    """Periods count whole ``period_seconds`` from the epoch."""

    @pytest.mark.parametrize(
        ("now", "expected"),
        [(0.0, 0), (90 * DAY - 0.001, 0), (90 * DAY, 1), (200 * DAY, 2), (-1.0, -1)],
    )
    def test_period_index(self, now: float, expected: int) -> None:
        assert expected == ControlGroup(percent=5.0).period(now)


class TestMembership:
    """Membership is a pure hash of salt, period, tenant and recipient."""

    @pytest.mark.parametrize("percent", [0.0, -0.0])
    def test_zero_percent_never_holds_out(self, percent: float) -> None:
        group = ControlGroup(percent=percent)
        assert 0.0 == share(group, now=1_700_000_000.0)

    def test_hundred_percent_always_holds_out(self) -> None:
        group = ControlGroup(percent=100.0)
        assert 1.0 == share(group, now=1_700_000_000.0)

    @pytest.mark.parametrize("percent", [5.0, 7.0, 50.0, 93.5])
    def test_share_matches_configured_percent(self, percent: float) -> None:
        group = ControlGroup(percent=percent)
        actual = share(group, now=1_700_000_000.0) * 100.0
        assert abs(percent - actual) <= 0.5, actual

    @settings(max_examples=200)
    @given(
        percent=st.floats(min_value=0.0, max_value=100.0),
        tenant=st.text(max_size=8),
        recipient=st.text(max_size=16),
        now=st.floats(min_value=0.0, max_value=4e9),
    )
    def test_deterministic(self, percent: float, tenant: str, recipient: str, now: float) -> None:
        first = ControlGroup(percent=percent).holds_out(tenant, recipient, now=now)
        again = ControlGroup(percent=percent).holds_out(tenant, recipient, now=now)
        assert first == again

    def test_same_period_same_answer(self) -> None:
        group = ControlGroup(percent=50.0, period_seconds=30 * DAY)
        start = 40 * 30 * DAY
        members = [group.holds_out("shop", f"r{i}", now=start) for i in range(1000)]
        later = [group.holds_out("shop", f"r{i}", now=start + 30 * DAY - 1) for i in range(1000)]
        assert members == later

    def test_next_period_redraws(self) -> None:
        group = ControlGroup(percent=50.0, period_seconds=30 * DAY)
        start = 40 * 30 * DAY
        this = [group.holds_out("shop", f"r{i}", now=start) for i in range(1000)]
        following = [group.holds_out("shop", f"r{i}", now=start + 30 * DAY) for i in range(1000)]
        changed = sum(a != b for a, b in zip(this, following, strict=True))
        # independent draws at 50 % disagree for about half the recipients
        assert 400 < changed < 600, changed

    @pytest.mark.parametrize(
        ("left", "right"),
        [
            (ControlGroup(percent=50.0, salt="a"), ControlGroup(percent=50.0, salt="b")),
        ],
    )
    def test_salt_changes_the_draw(self, left: ControlGroup, right: ControlGroup) -> None:
        now = 1_700_000_000.0
        changed = sum(
            left.holds_out("shop", f"r{i}", now=now) != right.holds_out("shop", f"r{i}", now=now)
            for i in range(1000)
        )
        assert 400 < changed < 600, changed

    def test_tenant_is_part_of_the_draw(self) -> None:
        group = ControlGroup(percent=50.0)
        now = 1_700_000_000.0
        changed = sum(
            group.holds_out("a", f"r{i}", now=now) != group.holds_out("b", f"r{i}", now=now)
            for i in range(1000)
        )
        assert 400 < changed < 600, changed

    def test_larger_percent_holds_out_a_superset(self) -> None:
        """Raising the percent within a period only adds members (the hash threshold grows)."""
        now = 1_700_000_000.0
        small, large = ControlGroup(percent=5.0), ControlGroup(percent=7.0)
        for i in range(20_000):
            if small.holds_out("shop", f"r{i}", now=now):
                assert large.holds_out("shop", f"r{i}", now=now)

    @settings(max_examples=300)
    @given(
        percents=st.tuples(
            st.floats(min_value=0.0, max_value=100.0), st.floats(min_value=0.0, max_value=100.0)
        ).map(sorted),
        salt=st.text(max_size=8),
        tenant=st.text(max_size=8),
        recipient=st.text(max_size=16),
        period_seconds=st.sampled_from([DAY, 30 * DAY, 90 * DAY]),
        period=st.integers(0, 200),
        into_period=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
    )
    def test_membership_grows_with_the_percent_and_holds_for_the_period(
        self,
        percents: list[float],
        salt: str,
        tenant: str,
        recipient: str,
        period_seconds: float,
        period: int,
        into_period: float,
    ) -> None:
        """A recipient held out at some percent is held out at every larger one, and from the
        first instant of the period to any later instant in it."""
        low, high = (
            ControlGroup(percent=percent, period_seconds=period_seconds, salt=salt)
            for percent in percents
        )
        start = period * period_seconds
        later = start + into_period * period_seconds
        if later >= start + period_seconds:  # rounding up into the next period
            later = start
        assert low.period(later) == low.period(start) == period
        held_low = low.holds_out(tenant, recipient, now=start)
        held_high = high.holds_out(tenant, recipient, now=start)
        if held_low:
            assert held_high
        assert held_low == low.holds_out(tenant, recipient, now=later)
        assert held_high == high.holds_out(tenant, recipient, now=later)
