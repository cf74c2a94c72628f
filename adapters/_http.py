"""Shared HTTP plumbing for adapters: one client factory, one place that maps errors, and the
freshness rule for signed webhooks.

Transport exceptions are translated once, here: the rest of the gateway only ever sees
``gateway.core.errors`` types.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from email.utils import parsedate_to_datetime
from typing import Final

from adapters import WebhookRejected
from adapters._transport import ConnectionPool, HttpResponse, TransportError, TransportTimeout
from gateway.core.errors import (
    AuthRejected,
    InvalidRequest,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)


def make_client(*, timeout_seconds: float, max_connections: int = 64) -> ConnectionPool:
    """The HTTP/1.1 keep-alive pool of one provider account (``adapters._transport``).

    ``max_connections`` is the account's ``concurrency``: sends beyond it wait for a connection.
    """
    return ConnectionPool(timeout_seconds=timeout_seconds, max_connections=max_connections)


@contextmanager
def map_transport_errors(provider: str) -> Iterator[None]:
    """Turn transport exceptions into transient provider errors."""
    try:
        yield
    except TransportTimeout as exc:
        raise ProviderTimeout(f"{provider}: timed out ({exc})", provider=provider) from exc
    except TransportError as exc:
        raise ProviderUnavailable(f"{provider}: {exc}", provider=provider) from exc


def retry_after_seconds(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Parse ``Retry-After`` (delta-seconds or an HTTP date; RFC 9110 section 10.2.3)."""
    value = headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except (ValueError, OverflowError):
        pass
    else:  # "inf" or "nan" is no delay anyone can wait out: as if the header were absent
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if now is None:
        return None
    return max(0.0, moment.timestamp() - now)


def error_for_status(
    provider: str, response: HttpResponse, *, code: str | None = None, detail: str = ""
) -> ProviderError:
    """The generic mapping of an unsuccessful HTTP status; adapters refine it with body codes."""
    status = response.status_code
    message = f"{provider}: HTTP {status}" + (f" ({detail})" if detail else "")
    retry_after = retry_after_seconds(response.headers)
    if status == 429:
        return RateLimited(
            message,
            provider=provider,
            status_code=status,
            code=code,
            retry_after_seconds=retry_after,
        )
    if status >= 500 or status == 408:
        return ProviderUnavailable(
            message,
            provider=provider,
            status_code=status,
            code=code,
            retry_after_seconds=retry_after,
        )
    if status in (401, 403):
        return AuthRejected(message, provider=provider, status_code=status, code=code)
    return InvalidRequest(message, provider=provider, status_code=status, code=code)


MAX_CLOCK_AHEAD_SECONDS: Final = 600.0
"""How far in the future a signed timestamp may be: the provider's clock against ours."""


def check_freshness(
    *, provider: str, signed_at_seconds: float, now: float, tolerance_seconds: float
) -> None:
    """Refuse a webhook signed more than ``tolerance_seconds`` before ``now`` or too far after.

    The tolerance must cover the provider's whole retry schedule: a callback retried after an
    outage carries its original timestamp, and refusing it loses the receipt (an opt-out, say)
    for good. Replays inside the window are the receipt store's business (it applies each
    provider event id once), not this check's.

    Raises:
        WebhookRejected: ``stale``.
    """
    age_seconds = now - signed_at_seconds
    if age_seconds > tolerance_seconds:
        raise WebhookRejected("stale", f"{provider}: signed {age_seconds:.0f} s ago")
    if -age_seconds > min(tolerance_seconds, MAX_CLOCK_AHEAD_SECONDS):
        raise WebhookRejected("stale", f"{provider}: signed {-age_seconds:.0f} s in the future")
