"""Retries with backoff, Retry-After and provider failover (gateway/core/retry.py)."""

from __future__ import annotations

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from gateway.core.retry import GiveUp, Retry, RetryPolicy, after_failure

POLICY = RetryPolicy(
    attempts_per_provider=3,
    base_delay_seconds=0.5,
    max_delay_seconds=60.0,
    jitter_fraction=0.2,
    max_retry_after_seconds=300.0,
)


def fail(
    policy: RetryPolicy = POLICY,
    *,
    permanent: bool = False,
    attempt: int = 1,
    provider_index: int = 0,
    provider_count: int = 2,
    retry_after_seconds: float | None = None,
    random_unit: float = 0.5,
) -> Retry | GiveUp:
    return after_failure(
        policy,
        permanent=permanent,
        attempt=attempt,
        provider_index=provider_index,
        provider_count=provider_count,
        retry_after_seconds=retry_after_seconds,
        random_unit=random_unit,
    )


policies = st.builds(
    RetryPolicy,
    attempts_per_provider=st.integers(1, 6),
    base_delay_seconds=st.floats(min_value=0.0, max_value=5.0),
    max_delay_seconds=st.floats(min_value=5.0, max_value=120.0),
    jitter_fraction=st.floats(min_value=0.0, max_value=1.0),
    max_retry_after_seconds=st.floats(min_value=0.0, max_value=600.0),
)
units = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)


class TestRetryPolicy:
    """A policy refuses settings that cannot work."""

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"attempts_per_provider": 0}, "attempts_per_provider must be at least 1"),
            ({"jitter_fraction": -0.1}, "jitter_fraction must be within 0..1"),
            ({"jitter_fraction": 1.5}, "jitter_fraction must be within 0..1"),
            ({"base_delay_seconds": -1.0}, "need 0 <= base_delay_seconds"),
            ({"base_delay_seconds": 10.0, "max_delay_seconds": 5.0}, "need 0 <= base_delay"),
            ({"max_retry_after_seconds": -1.0}, "max_retry_after_seconds must not be negative"),
        ],
    )
    def test_invalid_settings_raise(self, kwargs: dict[str, float], message: str) -> None:
        with pytest.raises(ValueError, match=message):
            RetryPolicy(**kwargs)  # type: ignore[arg-type]

    def test_zero_retry_after_limit_fails_over_on_any_retry_after(self) -> None:
        # 0 is the smallest limit: a provider asking for any wait at all is not waited for
        impatient = RetryPolicy(max_retry_after_seconds=0.0)
        assert Retry(0.0, 1, 1) == fail(impatient, retry_after_seconds=1.0)
        assert Retry(0.5, 0, 2) == fail(impatient, retry_after_seconds=0.0)  # "now" is not a wait


class TestAfterFailure:
    """Back off on one provider, then fail over, then give up; permanent errors give up at once."""

    @pytest.mark.parametrize(
        ("attempt", "provider_index", "provider_count"), [(1, 0, 1), (1, 0, 3), (3, 1, 3)]
    )
    def test_permanent_gives_up_at_once(
        self, attempt: int, provider_index: int, provider_count: int
    ) -> None:
        assert GiveUp(permanent=True) == fail(
            permanent=True,
            attempt=attempt,
            provider_index=provider_index,
            provider_count=provider_count,
        )

    @pytest.mark.parametrize(
        ("attempt", "random_unit", "expected_delay"),
        [
            (1, 0.5, 0.5),  # no jitter at the middle of the draw
            (2, 0.5, 1.0),
            (1, 0.0, 0.4),  # -20 %
            (2, 0.0, 0.8),
            (2, 0.75, 1.1),  # +10 %
        ],
    )
    def test_backs_off_exponentially_on_the_same_provider(
        self, attempt: int, random_unit: float, expected_delay: float
    ) -> None:
        result = fail(attempt=attempt, random_unit=random_unit)
        assert isinstance(result, Retry)
        assert (0, attempt + 1) == (result.provider_index, result.attempt)
        assert expected_delay == pytest.approx(result.delay_seconds)

    @pytest.mark.parametrize("random_unit", [0.0, 0.5, 0.999999])
    def test_delay_is_capped(self, random_unit: float) -> None:
        policy = RetryPolicy(
            attempts_per_provider=20, base_delay_seconds=1.0, max_delay_seconds=8.0
        )
        result = fail(policy, attempt=10, random_unit=random_unit)
        assert isinstance(result, Retry)
        assert 8.0 * (1 - policy.jitter_fraction) <= result.delay_seconds <= 8.0

    @pytest.mark.parametrize(
        ("retry_after", "expected"), [(30.0, 30.0), (0.1, 0.5), (300.0, 300.0)]
    )
    def test_retry_after_is_honoured(self, retry_after: float, expected: float) -> None:
        result = fail(attempt=1, retry_after_seconds=retry_after)
        assert Retry(expected, 0, 2) == result

    def test_retry_after_too_long_fails_over(self) -> None:
        assert Retry(0.0, 1, 1) == fail(attempt=1, retry_after_seconds=300.5)

    def test_retry_after_too_long_on_the_last_provider_gives_up(self) -> None:
        assert GiveUp(permanent=False) == fail(
            attempt=1, provider_index=1, retry_after_seconds=3600.0
        )

    def test_fails_over_after_the_last_attempt(self) -> None:
        assert Retry(0.0, 1, 1) == fail(attempt=3, provider_index=0)

    def test_gives_up_after_the_last_provider(self) -> None:
        assert GiveUp(permanent=False) == fail(attempt=3, provider_index=1)

    def test_single_attempt_policy_fails_over_at_once(self) -> None:
        policy = RetryPolicy(attempts_per_provider=1)
        assert Retry(0.0, 1, 1) == fail(policy, attempt=1, provider_index=0)
        assert GiveUp(permanent=False) == fail(policy, attempt=1, provider_index=1)


class TestAfterFailureProperties:
    """Whole failure sequences: bounded delays and a fixed attempt budget."""

    @settings(max_examples=400)
    @given(
        policy=policies,
        provider_count=st.integers(1, 4),
        data=st.data(),
        random_unit=units,
        permanent=st.sampled_from([False, False, False, True]),
    )
    def test_one_failure(
        self,
        policy: RetryPolicy,
        provider_count: int,
        data: st.DataObject,
        random_unit: float,
        permanent: bool,
    ) -> None:
        provider_index = data.draw(st.integers(0, provider_count - 1))
        attempt = data.draw(st.integers(1, policy.attempts_per_provider))
        # a Retry-After below the limit, above it, or none
        limit = policy.max_retry_after_seconds
        retry_after = data.draw(
            st.none()
            | st.floats(min_value=0.0, max_value=limit)
            | st.floats(min_value=limit, max_value=limit + 600.0).filter(lambda s: s > limit)
        )
        result = fail(
            policy,
            permanent=permanent,
            attempt=attempt,
            provider_index=provider_index,
            provider_count=provider_count,
            retry_after_seconds=retry_after,
            random_unit=random_unit,
        )
        too_long = retry_after is not None and retry_after > policy.max_retry_after_seconds
        last_provider = provider_index == provider_count - 1
        if permanent:
            assert GiveUp(permanent=True) == result
            event("permanent")
        elif attempt < policy.attempts_per_provider and not too_long:
            assert isinstance(result, Retry)
            assert (provider_index, attempt + 1) == (result.provider_index, result.attempt)
            backoff = min(policy.max_delay_seconds, policy.base_delay_seconds * 2 ** (attempt - 1))
            low = backoff * (1 - policy.jitter_fraction)
            high = min(policy.max_delay_seconds, backoff * (1 + policy.jitter_fraction))
            if retry_after is None:
                assert low - 1e-9 <= result.delay_seconds <= high + 1e-9
                assert result.delay_seconds <= policy.max_delay_seconds
            else:
                assert result.delay_seconds >= retry_after
                assert result.delay_seconds <= max(high + 1e-9, retry_after)
                event("honours Retry-After")
        elif not last_provider:
            assert Retry(0.0, provider_index + 1, 1) == result
            event("fails over")
        else:
            assert GiveUp(permanent=False) == result
            event("gives up")

    @settings(max_examples=200)
    @given(policy=policies, provider_count=st.integers(1, 5), draws=st.lists(units, min_size=30))
    def test_attempt_budget(
        self, policy: RetryPolicy, provider_count: int, draws: list[float]
    ) -> None:
        """Every error transient, no Retry-After: attempts_per_provider on every provider."""
        attempts = 1  # the first try
        attempt, provider_index = 1, 0
        per_provider = [0] * provider_count
        per_provider[0] = 1
        delays: list[float] = []
        while True:
            result = fail(
                policy,
                attempt=attempt,
                provider_index=provider_index,
                provider_count=provider_count,
                random_unit=draws[attempts % len(draws)],
            )
            if isinstance(result, GiveUp):
                assert not result.permanent
                break
            assert result.provider_index in (provider_index, provider_index + 1)
            attempts += 1
            attempt, provider_index = result.attempt, result.provider_index
            per_provider[provider_index] += 1
            if result.attempt > 1:
                delays.append(result.delay_seconds)
            assert attempts <= policy.attempts_per_provider * provider_count
        assert policy.attempts_per_provider * provider_count == attempts
        assert [policy.attempts_per_provider] * provider_count == per_provider
        assert all(0.0 <= delay <= policy.max_delay_seconds for delay in delays)

    @settings(max_examples=200)
    @given(policy=policies, attempt=st.integers(1, 10), random_unit=units)
    def test_backoff_grows_without_jitter(
        self, policy: RetryPolicy, attempt: int, random_unit: float
    ) -> None:
        steady = RetryPolicy(
            attempts_per_provider=12,
            base_delay_seconds=policy.base_delay_seconds,
            max_delay_seconds=policy.max_delay_seconds,
            jitter_fraction=0.0,
        )
        first = fail(steady, attempt=attempt, random_unit=random_unit)
        second = fail(steady, attempt=attempt + 1, random_unit=random_unit)
        assert isinstance(first, Retry)
        assert isinstance(second, Retry)
        expected = min(steady.max_delay_seconds, 2 * first.delay_seconds)
        assert expected == pytest.approx(second.delay_seconds)
