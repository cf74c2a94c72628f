"""Twilio Programmable Messaging: the Messages API and its signed status callbacks.

Wire format (twilio.com/docs/messaging/api/message-resource, /docs/usage/webhooks/webhooks-security,
/docs/api/errors):

- ``POST {base}/2010-04-01/Accounts/{AccountSid}/Messages.json``, HTTP basic auth
  ``AccountSid:AuthToken``, form-encoded ``To`` (E.164), ``From`` (a number or an alphanumeric
  sender id), ``Body`` and ``StatusCallback``. The gateway's callback URL already names the
  message (``?m=<message key>``), so callbacks need no lookup by SID.
- Success is ``201`` with JSON ``{"sid": "SM...", "status": "queued", ...}``; failure is
  ``{"code": 21211, "message": ..., "more_info": ..., "status": 400}`` (table ``_CODES``).
- Status callbacks are form POSTs to ``StatusCallback`` with ``MessageSid``, ``MessageStatus``
  (queued, sending, sent, delivered, undelivered, failed; read on some channels),
  ``ErrorCode``, ``To``, ``From``, ``AccountSid``, ... and the header ``X-Twilio-Signature`` =
  base64(HMAC-SHA1(auth token, URL + every POST parameter's name and value, sorted by name)).
  The URL is the full URL Twilio requested, query string included.

Twilio signatures carry no timestamp, so a callback cannot be checked for freshness. Replays
are absorbed by idempotency instead: a repeated ``delivered`` or ``failed`` for a message is a
no-op in the router. Do not invent a timestamp check.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from typing import Final
from urllib.parse import parse_qs, parse_qsl, urlsplit, urlunsplit

import httpx
import msgspec

from adapters import Outgoing, ProviderReceipt, ReceiptKind, SendReceipt, WebhookRejected
from adapters._http import error_for_status, map_httpx_errors, retry_after_seconds
from gateway.config import ProviderConfig
from gateway.core.errors import (
    AuthRejected,
    ConfigError,
    InvalidRecipient,
    InvalidRequest,
    ProviderError,
    ProviderUnavailable,
    RateLimited,
)
from gateway.core.model import Channel
from gateway.protocol import SmsContent

KIND: Final = "twilio"
CHANNEL: Final = Channel.SMS
DEFAULT_URL: Final = "https://api.twilio.com"
API_VERSION: Final = "2010-04-01"
SIGNATURE_HEADER: Final = "x-twilio-signature"

# Twilio's error dictionary (twilio.com/docs/api/errors/<code>). Twilio warns that codes get
# refined over time (2024: new codes split out of 21211/21212/21606/21614), so anything not
# listed falls back to the HTTP status (``error_for_status``).
_CODES: Final[Mapping[int, type[ProviderError]]] = {
    20003: AuthRejected,  # Authenticate: wrong AccountSid / AuthToken (HTTP 401)
    20429: RateLimited,  # Too Many Requests (HTTP 429)
    21211: InvalidRecipient,  # Invalid 'To' Phone Number (not E.164, typo, ...)
    21408: InvalidRecipient,  # Permission to send an SMS has not been enabled for the region
    21610: InvalidRecipient,  # the recipient replied STOP: unsubscribed from this sender
    21612: InvalidRecipient,  # this To/From pair can't be connected
    21614: InvalidRecipient,  # 'To' number is not a valid mobile number (a landline)
    21212: InvalidRequest,  # Invalid 'From' Phone Number
    21602: InvalidRequest,  # Message body is required
    21603: InvalidRequest,  # A 'From' or 'MessagingServiceSid' parameter is required
    21604: InvalidRequest,  # 'To' phone number is required
    21606: InvalidRequest,  # 'From' is not a valid message-capable Twilio number for this To
    21617: InvalidRequest,  # the concatenated body exceeds the 1600 character limit
}

RECEIPT_STATUSES: Final[Mapping[str, ReceiptKind]] = {
    "delivered": ReceiptKind.DELIVERED,
    "undelivered": ReceiptKind.FAILED,
    "failed": ReceiptKind.FAILED,
    "read": ReceiptKind.READ,
}
"""MessageStatus values that are receipts; queued/accepted/sending/sent are progress only."""


class _Created(msgspec.Struct):
    sid: str


class _Failure(msgspec.Struct):
    code: int | None = None


_created_decoder: Final = msgspec.json.Decoder(_Created)
_failure_decoder: Final = msgspec.json.Decoder(_Failure)


# ---------------------------------------------------------------- pure functions
def form_fields(outgoing: Outgoing) -> dict[str, str]:
    """The form fields of one ``Messages.json`` request."""
    content = outgoing.content
    if not isinstance(content, SmsContent):
        raise TypeError(f"twilio can't send {type(content).__name__}")
    fields = {"To": outgoing.address, "From": outgoing.sender.sms_from, "Body": content.text}
    if outgoing.status_callback_url:
        fields["StatusCallback"] = outgoing.status_callback_url
    return fields


def build_request(
    outgoing: Outgoing, *, config: ProviderConfig, base_url: str, auth_token: str
) -> httpx.Request:
    """The ``POST .../Messages.json`` request for one SMS (pure).

    Args:
        outgoing: an SMS; ``address`` is the E.164 phone, ``sender.sms_from`` the sender.
        config: supplies ``account_sid``.
        base_url: e.g. ``https://api.twilio.com`` or a simulator's address.
        auth_token: the account's auth token (basic-auth password).

    Raises:
        ConfigError: ``account_sid`` is not configured.
    """
    account_sid = config.account_sid
    if not account_sid:
        raise ConfigError("twilio: account_sid is not configured")
    credentials = base64.b64encode(f"{account_sid}:{auth_token}".encode()).decode()
    return httpx.Request(
        "POST",
        f"{base_url.rstrip('/')}/{API_VERSION}/Accounts/{account_sid}/Messages.json",
        data=form_fields(outgoing),
        headers={"Authorization": f"Basic {credentials}", "Accept": "application/json"},
    )


def parse_response(response: httpx.Response, *, provider: str) -> SendReceipt:
    """The receipt (``sid``) of an accepted message, or the error Twilio's answer means (pure).

    Twilio's ``message`` text is never copied into the error: it may quote the phone number.

    Raises:
        ProviderError: per ``_CODES``, else per the HTTP status; ``code`` is Twilio's code.
    """
    status = response.status_code
    if response.is_success:
        try:
            created = _created_decoder.decode(response.content)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ProviderUnavailable(
                f"{provider}: unreadable answer to a send", provider=provider, status_code=status
            ) from exc
        return SendReceipt(provider_message_id=created.sid)
    try:
        code = _failure_decoder.decode(response.content).code
    except (msgspec.DecodeError, msgspec.ValidationError):
        code = None
    error = _CODES.get(code) if code is not None else None
    code_text = None if code is None else str(code)
    if error is None or status == 429:
        raise error_for_status(provider, response, code=code_text)
    message = f"{provider}: HTTP {status}, twilio error {code}"
    retry_after = retry_after_seconds(response.headers) if error is RateLimited else None
    raise error(
        message,
        provider=provider,
        status_code=status,
        code=code_text,
        retry_after_seconds=retry_after,
    )


def signature(url: str, params: Sequence[tuple[str, str]], auth_token: str) -> str:
    """``X-Twilio-Signature`` for a POST to ``url`` with form ``params``.

    The signed string is the URL (with its query string) followed by each parameter's name and
    value, no separators, sorted by name (and by value for a repeated name, as Twilio's own
    helper libraries do).
    """
    data = url + "".join(name + value for name, value in sorted(params))
    digest = hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def _params(body: bytes) -> list[tuple[str, str]]:
    try:
        return parse_qsl(body.decode(), keep_blank_values=True, strict_parsing=bool(body))
    except (UnicodeDecodeError, ValueError) as exc:
        raise WebhookRejected("malformed", "body is not a form") from exc


def _url_variants(url: str) -> tuple[str, ...]:
    """``url`` as given, plus with its default port added or removed.

    Twilio's helper libraries accept both because "sig generation on back end is inconsistent"
    about ``:443`` (twilio-python ``RequestValidator.validate``).
    """
    parts = urlsplit(url)
    default_port = {"https": 443, "http": 80}.get(parts.scheme)
    host = parts.hostname
    if default_port is None or host is None or parts.username is not None:
        return (url,)
    try:
        port = parts.port
    except ValueError:
        return (url,)
    host = f"[{host}]" if ":" in host else host
    if port is None:
        other = parts._replace(netloc=f"{host}:{default_port}")
    elif port == default_port:
        other = parts._replace(netloc=host)
    else:
        return (url,)
    return (url, urlunsplit(other))


def verify_webhook(
    *, url: str, headers: Mapping[str, str], body: bytes, config: ProviderConfig, now: float
) -> None:
    """Check that a status callback comes from Twilio.

    Args:
        url: the full URL Twilio was given and requested, query string included (the
            ``StatusCallback`` as sent, i.e. the gateway's public URL, not the address a proxy
            forwarded to).
        headers: the request headers, any case.
        body: the raw form body.
        config: the provider whose ``auth_token`` keys the signature.
        now: unused: Twilio signs no timestamp, so there is no staleness to check (replays are
            absorbed by the router's idempotency).

    Raises:
        WebhookRejected: ``bad_signature`` (missing, wrong, or no token to check with) or
            ``malformed`` (the body is not a form).
    """
    del now
    lowered = {name.lower(): value for name, value in headers.items()}
    given = lowered.get(SIGNATURE_HEADER)
    if given is None:
        raise WebhookRejected("bad_signature", "no X-Twilio-Signature header")
    if config.auth_token is None:
        raise WebhookRejected("bad_signature", "no auth_token configured to check signatures")
    params = _params(body)
    token = config.auth_token.reveal()
    given_bytes = given.strip().encode()
    valid = False
    for candidate in _url_variants(url):
        # Constant time, and every variant is checked: no early exit to time.
        valid |= hmac.compare_digest(given_bytes, signature(candidate, params, token).encode())
    if not valid:
        raise WebhookRejected("bad_signature", "X-Twilio-Signature does not match")


def parse_webhook(*, url: str, headers: Mapping[str, str], body: bytes) -> list[ProviderReceipt]:
    """The receipt in one verified status callback, if its status is one.

    ``delivered`` -> DELIVERED; ``undelivered``/``failed`` -> FAILED with ``detail`` = Twilio's
    ``ErrorCode`` (a code such as ``30003``, never personal data); ``read`` -> READ; every
    other status -> no receipt. ``message_key`` is the ``m`` query parameter of ``url`` (the
    gateway put it into ``StatusCallback``); ``provider_message_id`` is ``MessageSid``.

    ``at`` is ``0.0``: Twilio's callbacks carry no event time, and this function gets no
    clock, so the webhook route substitutes the time it received the callback.

    Raises:
        WebhookRejected: ``malformed`` when the body is not a form or has no ``MessageStatus``.
    """
    del headers
    fields = dict(_params(body))
    status = fields.get("MessageStatus") or fields.get("SmsStatus")
    if not status:
        raise WebhookRejected("malformed", "status callback without MessageStatus")
    kind = RECEIPT_STATUSES.get(status)
    if kind is None:
        return []
    keys = parse_qs(urlsplit(url).query).get("m")
    sid = fields.get("MessageSid") or fields.get("SmsSid") or None
    detail = (fields.get("ErrorCode") or None) if kind is ReceiptKind.FAILED else None
    return [
        ProviderReceipt(
            kind,
            0.0,
            message_key=keys[0] if keys else None,
            provider_message_id=sid,
            detail=detail,
        )
    ]


# ---------------------------------------------------------------- the adapter
class TwilioAdapter:
    """Sends SMS through one Twilio account."""

    def __init__(self, name: str, config: ProviderConfig, client: httpx.AsyncClient) -> None:
        if config.auth_token is None:
            raise ConfigError(f"providers.{name}.auth_token: required for twilio")
        if not config.account_sid:
            raise ConfigError(f"providers.{name}.account_sid: required for twilio")
        self.name = name
        self.channel: Channel = CHANNEL
        self.config = config
        self._client = client
        self._auth_token = config.auth_token.reveal()
        self._base_url = config.url or DEFAULT_URL

    async def send(self, outgoing: Outgoing) -> SendReceipt:
        """Send one SMS.

        Raises:
            gateway.core.errors.ProviderError: see ``parse_response`` and ``map_httpx_errors``.
        """
        request = build_request(
            outgoing, config=self.config, base_url=self._base_url, auth_token=self._auth_token
        )
        with map_httpx_errors(self.name):
            response = await self._client.send(request)
        return parse_response(response, provider=self.name)

    async def aclose(self) -> None:
        """Nothing to close: the client belongs to the caller."""
