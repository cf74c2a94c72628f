"""The gateway's exceptions, for failures of the outside world and for bugs.

Expected outcomes are values, not exceptions: a policy refusal is a ``Reject``, an exhausted
cascade a ``Finish``. What remains::

    GatewayError
    ├── ConfigError                       the configuration cannot be used (names the key)
    └── ProviderError                     a provider call failed (adapters raise these)
        ├── TransientProviderError        worth retrying, then failing over
        │   ├── ProviderTimeout
        │   ├── ProviderUnavailable       5xx, connection refused or reset
        │   └── RateLimited               429, with ``retry_after_seconds`` when given
        └── PermanentProviderError        retrying cannot help: the cascade moves on
            ├── InvalidRecipient          unknown token / number / address, unsubscribed
            ├── InvalidRequest            the provider rejected what we built (a bug or bad content)
            └── AuthRejected              credentials refused

Adapters translate foreign exceptions once, at the boundary (``adapters/_http.py``), so the rest
of the gateway never sees a transport type.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of everything the gateway raises on purpose."""


class ConfigError(GatewayError):
    """The configuration is unusable; the message names the key and the problem."""


class ProviderError(GatewayError):
    """A provider request failed.

    Attributes:
        provider: the configured provider name (e.g. ``"sendgrid-main"``).
        status_code: the HTTP status, when there was a response.
        code: the provider's own error code, when it gave one.
    """

    permanent: bool = False
    kind: str = "error"
    duration_seconds: float | None = None
    """How long the failed request took; set by whoever timed it."""

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        status_code: int | None = None,
        code: str | None = None,
        retry_after_seconds: float | None = None,
    ) -> None:
        super().__init__(message)
        self.provider = provider
        self.status_code = status_code
        self.code = code
        self.retry_after_seconds = retry_after_seconds
        """The provider's Retry-After (429, and 503 for FCM), honoured by the retry policy."""


class TransientProviderError(ProviderError):
    kind = "transient"


class ProviderTimeout(TransientProviderError):
    kind = "timeout"


class ProviderUnavailable(TransientProviderError):
    kind = "unavailable"


class RateLimited(TransientProviderError):
    kind = "rate_limited"


class PermanentProviderError(ProviderError):
    permanent = True
    kind = "permanent"


class InvalidRecipient(PermanentProviderError):
    kind = "invalid_recipient"


class InvalidRequest(PermanentProviderError):
    kind = "invalid_request"


class AuthRejected(PermanentProviderError):
    kind = "auth_rejected"


PROVIDER_ERROR_KINDS = (
    "timeout",
    "unavailable",
    "rate_limited",
    "transient",
    "invalid_recipient",
    "invalid_request",
    "auth_rejected",
    "permanent",
)
"""Every ``ProviderError.kind``: the bounded ``kind`` label of provider error metrics."""
