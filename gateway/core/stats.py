"""Statistics for reports: conversion rates with confidence intervals and two-proportion tests.

Rule 1: pure arithmetic on counts (the ``math`` module's ``erfc`` gives the normal CDF); no
sampling, no state, no dependencies.
Rule 2: this module knows proportions, not messages, variants or reports.

The methods, and why:

* a rate's interval is the **Wilson score interval**: unlike the plain Wald interval it stays
  inside [0, 1] and keeps its coverage for small counts and rates near 0 or 1, which is where
  conversion rates live;
* a difference between two rates (variant minus baseline, treated minus control) gets
  **Newcombe's hybrid score interval** (his method 10, 1998), built from the two arms' Wilson
  intervals: the plain Wald interval of a difference collapses to a point when an arm has no
  conversions (a control group of ten with none would "prove" any lift), Newcombe's does not
  and keeps its coverage for small arms;
* its p-value is the **two-proportion z-test** with the *pooled* standard error (under the
  null hypothesis both arms share one rate; this z squared is Pearson's chi-square without
  continuity correction, R's ``prop.test(correct = FALSE)``), two-sided.

The p-value rests on the normal approximation: with fewer than about 5 successes or 5 failures
in an arm it is rough, and every report says how many there were. A p-value is valid once, for a
sample size fixed in advance: looking at it repeatedly and stopping when it dips below 0.05
("peeking") makes false positives far likelier than 5 %.
"""

from __future__ import annotations

import math

import msgspec

CONFIDENCE = 0.95


class Interval(msgspec.Struct, frozen=True, array_like=True):
    low: float
    high: float


class Difference(msgspec.Struct, frozen=True):
    """``estimate`` = rate of the arm minus rate of the baseline, with its interval."""

    estimate: float
    interval: Interval
    p_value: float


def normal_cdf(z: float) -> float:
    """P(Z <= z) for a standard normal Z."""
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


def normal_quantile(probability: float) -> float:
    """The z with ``normal_cdf(z) == probability`` (bisection: exact to float precision).

    Raises:
        ValueError: ``probability`` is not strictly between 0 and 1.
    """
    if not 0.0 < probability < 1.0:
        raise ValueError(f"a probability strictly between 0 and 1, not {probability!r}")
    low, high = -40.0, 40.0
    for _ in range(200):
        middle = (low + high) / 2.0
        if normal_cdf(middle) < probability:
            low = middle
        else:
            high = middle
    return (low + high) / 2.0


def _z(confidence: float) -> float:
    return normal_quantile(0.5 + confidence / 2.0)


def wilson(successes: int, trials: int, *, confidence: float = CONFIDENCE) -> Interval | None:
    """The Wilson score interval of ``successes / trials``; None without trials."""
    if trials <= 0:
        return None
    z = _z(confidence)
    rate = successes / trials
    z2 = z * z
    denominator = 1.0 + z2 / trials
    centre = (rate + z2 / (2.0 * trials)) / denominator
    margin = z * math.sqrt(rate * (1.0 - rate) / trials + z2 / (4.0 * trials * trials))
    margin /= denominator
    # at 0 or all successes the bound is exactly 0 or 1; rounding must not move it off
    low = 0.0 if successes <= 0 else max(0.0, centre - margin)
    high = 1.0 if successes >= trials else min(1.0, centre + margin)
    return Interval(low, high)


def difference(
    successes: int,
    trials: int,
    baseline_successes: int,
    baseline_trials: int,
    *,
    confidence: float = CONFIDENCE,
) -> Difference | None:
    """The arm's rate minus the baseline's: Newcombe's hybrid score interval, pooled z-test
    p-value (two-sided). None when either arm has no trials."""
    if trials <= 0 or baseline_trials <= 0:
        return None
    rate = successes / trials
    base = baseline_successes / baseline_trials
    estimate = rate - base
    arm = wilson(successes, trials, confidence=confidence)
    baseline = wilson(baseline_successes, baseline_trials, confidence=confidence)
    assert arm is not None  # both arms have trials
    assert baseline is not None
    # each bound moves by the two arms' own Wilson margins on the side that widens it
    low = estimate - math.hypot(rate - arm.low, baseline.high - base)
    high = estimate + math.hypot(arm.high - rate, base - baseline.low)
    pooled = (successes + baseline_successes) / (trials + baseline_trials)
    pooled_error = math.sqrt(pooled * (1 - pooled) * (1 / trials + 1 / baseline_trials))
    if pooled_error == 0.0:
        # both arms all successes or all failures: no evidence of any difference
        p_value = 1.0
    else:
        p_value = math.erfc(abs(estimate) / pooled_error / math.sqrt(2.0))
    return Difference(estimate, Interval(max(-1.0, low), min(1.0, high)), min(1.0, p_value))
