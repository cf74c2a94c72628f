"""Retries and provider failover inside one cascade step.

Rule 1: a pure decision. Given what just failed, return ``Retry(delay, provider)`` or
``GiveUp``; the runtime sleeps and the randomness for jitter comes in as an argument.
Rule 2: the cascade never sees a retry. It hears ``SendFailed`` once, when this module gives up
on every provider of the channel (docs/domain.md: "only then does the cascade move on").

Order of escalation for transient errors (timeouts, 5xx, 429): back off exponentially with
jitter on the same provider up to ``attempts_per_provider``, honouring Retry-After when the
provider sends one; then fail over to the channel's next provider with a fresh budget; then
give up. A permanent error (invalid token, unknown number, bounced address) gives up at once:
another provider cannot fix the recipient's address.
"""

from __future__ import annotations

import math

import msgspec


class RetryPolicy(msgspec.Struct, frozen=True):
    attempts_per_provider: int = 3
    base_delay_seconds: float = 0.5
    max_delay_seconds: float = 60.0
    jitter_fraction: float = 0.2
    max_retry_after_seconds: float = 300.0
    """A Retry-After longer than this fails over instead of holding the message."""

    def __post_init__(self) -> None:
        # NaN passes every comparison below silently (TOML can spell it), so refuse it first
        for name in (
            "base_delay_seconds",
            "max_delay_seconds",
            "jitter_fraction",
            "max_retry_after_seconds",
        ):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number")
        if self.max_retry_after_seconds < 0:
            raise ValueError("max_retry_after_seconds must not be negative")
        if self.attempts_per_provider < 1:
            raise ValueError("attempts_per_provider must be at least 1")
        if not 0.0 <= self.jitter_fraction <= 1.0:
            raise ValueError("jitter_fraction must be within 0..1")
        if self.base_delay_seconds < 0 or self.max_delay_seconds < self.base_delay_seconds:
            raise ValueError("need 0 <= base_delay_seconds <= max_delay_seconds")


class Retry(msgspec.Struct, frozen=True):
    delay_seconds: float
    provider_index: int
    attempt: int
    """1-based attempt number on ``provider_index`` that this retry will be."""


class GiveUp(msgspec.Struct, frozen=True):
    permanent: bool


def after_failure(
    policy: RetryPolicy,
    *,
    permanent: bool,
    attempt: int,
    provider_index: int,
    provider_count: int,
    retry_after_seconds: float | None,
    random_unit: float,
) -> Retry | GiveUp:
    """What to do after attempt ``attempt`` (1-based) on provider ``provider_index`` failed.

    Args:
        random_unit: a uniform draw from [0, 1) for jitter; passing it in keeps this pure.
    """
    if permanent:
        return GiveUp(permanent=True)
    too_long = retry_after_seconds is not None and (
        retry_after_seconds > policy.max_retry_after_seconds
    )
    if attempt < policy.attempts_per_provider and not too_long:
        backoff = min(policy.max_delay_seconds, policy.base_delay_seconds * 2 ** (attempt - 1))
        jitter = backoff * policy.jitter_fraction * (2.0 * random_unit - 1.0)
        # the cap bounds the jittered delay too: max_delay_seconds is the longest we back off
        delay = min(policy.max_delay_seconds, max(0.0, backoff + jitter))
        if retry_after_seconds is not None:
            delay = max(delay, retry_after_seconds)  # the provider said when; never earlier
        return Retry(delay, provider_index, attempt + 1)
    if provider_index + 1 < provider_count:
        return Retry(0.0, provider_index + 1, 1)
    return GiveUp(permanent=False)
