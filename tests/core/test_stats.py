"""Report statistics against reference values derived by hand (core/stats.py).

The references, so they can be checked without this code or scipy:

* z(0.975) = 1.959963984540054 (every statistics table);
* Wilson 95 % for 8/10: p = 0.8, z^2 = 3.8414588, denominator 1 + z^2/10 = 1.38414588,
  centre (0.8 + 0.19207294) / 1.38414588 = 0.71674016, margin
  1.95996398 * sqrt(0.016 + 0.00960365) / 1.38414588 = 0.22657769: [0.4901625, 0.9433178]
  (the interval published for 8/10 in Brown, Cai & DasGupta's tables rounds to [0.490, 0.943]);
* 30/100 against 45/100: difference 0.15; pooled rate 0.375, pooled standard error
  sqrt(0.375 * 0.625 * 0.02) = 0.0684653, z = 2.1908902, two-sided p = erfc(z / sqrt 2) =
  0.0284597 (R: prop.test(c(45, 30), c(100, 100), correct = FALSE) gives X-squared = 4.8 =
  z^2, p-value = 0.02846);
* Newcombe's hybrid score interval of a difference (his method 10): his own worked examples
  (Newcombe 1998, Statistics in Medicine 17:873, table II) are 56/70 - 48/80 = 0.2000,
  [0.0524, 0.3339], and 5/56 - 0/29 = 0.0893, [-0.0381, 0.1926]; for 45/100 - 30/100 the
  Wilson intervals [0.3561454, 0.5475540] and [0.2189489, 0.3958485] give
  0.15 - sqrt(0.0938546^2 + 0.0958485^2) = 0.0158522 and
  0.15 + sqrt(0.0975540^2 + 0.0810511^2) = 0.2768309.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.stats import difference, normal_cdf, normal_quantile, wilson


class TestNormal:
    """The normal CDF and its inverse."""

    def test_known_values(self) -> None:
        assert 0.5 == normal_cdf(0.0)
        assert math.isclose(0.975, normal_cdf(1.959963984540054), abs_tol=1e-12)
        assert math.isclose(1.959963984540054, normal_quantile(0.975), abs_tol=1e-9)
        assert math.isclose(-1.6448536269514722, normal_quantile(0.05), abs_tol=1e-9)

    @pytest.mark.parametrize("probability", [0.0, 1.0, -0.1, 1.5])
    def test_the_quantile_needs_an_open_probability(self, probability: float) -> None:
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            normal_quantile(probability)


class TestWilson:
    """The Wilson score interval."""

    def test_eight_of_ten(self) -> None:
        interval = wilson(8, 10)
        assert interval is not None
        assert math.isclose(0.4901625, interval.low, abs_tol=1e-6)
        assert math.isclose(0.9433178, interval.high, abs_tol=1e-6)

    def test_the_edges_stay_inside_zero_and_one(self) -> None:
        none, every = wilson(0, 20), wilson(20, 20)
        assert none is not None
        assert every is not None
        assert 0.0 == none.low
        assert 0.0 < none.high < 0.2
        assert 1.0 == every.high
        assert 0.8 < every.low < 1.0

    def test_no_trials_no_interval(self) -> None:
        assert None is wilson(0, 0)

    @given(trials=st.integers(1, 10_000), data=st.data())
    def test_contains_the_rate(self, trials: int, data: st.DataObject) -> None:
        successes = data.draw(st.integers(0, trials))
        interval = wilson(successes, trials)
        assert interval is not None
        assert 0.0 <= interval.low <= successes / trials <= interval.high <= 1.0


class TestDifference:
    """Pooled two-proportion z-test for the p-value, Newcombe's hybrid score interval."""

    def test_thirty_against_forty_five_of_a_hundred(self) -> None:
        found = difference(45, 100, 30, 100)
        assert found is not None
        assert math.isclose(0.15, found.estimate, abs_tol=1e-12)
        assert math.isclose(0.0284597, found.p_value, abs_tol=1e-6)
        assert math.isclose(0.0158522, found.interval.low, abs_tol=1e-6)
        assert math.isclose(0.2768309, found.interval.high, abs_tol=1e-6)

    @pytest.mark.parametrize(
        ("counts", "published"),
        [((56, 70, 48, 80), (0.0524, 0.3339)), ((5, 56, 0, 29), (-0.0381, 0.1926))],
    )
    def test_newcombes_own_examples(
        self, counts: tuple[int, int, int, int], published: tuple[float, float]
    ) -> None:
        found = difference(*counts)
        assert found is not None
        assert published == (round(found.interval.low, 4), round(found.interval.high, 4))

    def test_an_arm_without_conversions_still_has_a_wide_interval(self) -> None:
        """The Wald interval of 3/10 against 0/10 is [0.016, 0.584]: it rules out no lift
        on ten people; the score interval does not pretend to know that much."""
        found = difference(3, 10, 0, 10)
        assert found is not None
        assert found.interval.low < 0.0 < 0.3 < found.interval.high

    def test_it_is_antisymmetric(self) -> None:
        ahead, behind = difference(45, 100, 30, 100), difference(30, 100, 45, 100)
        assert ahead is not None
        assert behind is not None
        assert math.isclose(ahead.p_value, behind.p_value)
        assert math.isclose(-ahead.interval.high, behind.interval.low)

    def test_no_difference_at_all(self) -> None:
        assert difference(0, 50, 0, 70) == difference(0, 50, 0, 70)
        same = difference(0, 50, 0, 70)
        assert same is not None
        assert (0.0, 1.0) == (same.estimate, same.p_value)
        # no conversion in 50 or in 70 does not show the rates equal: each may be up to ~7 %
        assert math.isclose(-0.0520231, same.interval.low, abs_tol=1e-6)
        assert math.isclose(0.0713476, same.interval.high, abs_tol=1e-6)

    @pytest.mark.parametrize(("trials", "baseline"), [(0, 10), (10, 0)])
    def test_an_empty_arm_has_no_difference(self, trials: int, baseline: int) -> None:
        assert None is difference(0, trials, 0, baseline)
