"""Email through Twilio SendGrid: v3 Mail Send, and the Signed Event Webhook for receipts.

Wire format (https://www.twilio.com/docs/sendgrid/api-reference/mail-send/mail-send)::

    POST {base}/v3/mail/send
    Authorization: Bearer <api key>
    {"personalizations": [{"to": [{"email": "..."}],
                           "custom_args": {"cgw_key": "<tenant>:<id>",     # always
                                           "cgw_rcpt": "<recipient id>",   # when known
                                           "cgw_topic": "<consent topic>"}}],  # when known
     "from": {"email": "<sender.email_from>", "name": "<sender.email_name or brand>"},
     "subject": "...",
     "content": [{"type": "text/plain", "value": "..."}, {"type": "text/html", "value": "..."}],
     "headers": {"List-Unsubscribe": "<https://gw/t/u/...>",              # marketing only,
                 "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"},  # RFC 8058
     "categories": ["<campaign>"]}                                        # when set
    -> 202, empty body, ``X-Message-Id: <id>``

Errors (https://www.twilio.com/docs/sendgrid/api-reference/how-to-use-the-sendgrid-v3-api/errors)
are ``{"errors": [{"message": "...", "field": "...", "help": "..."}]}``; 429 carries the
``X-RateLimit-Reset`` epoch second.

Tracking: the html gets the gateway's own open pixel and its links already point at the
gateway's click tracker, which work the same on every channel and provider. ``tracking_settings``
is left to the account: when its open/click tracking is on, SendGrid's ``open``/``click``
events are a second signal for the same facts (READ and CLICKED are idempotent in the cascade),
and forcing it either way would override the account owner's privacy choice.

Receipts (https://www.twilio.com/docs/sendgrid/for-developers/tracking-events/event) come as a
JSON array of events, each carrying our ``custom_args`` as top-level keys (so ``cgw_key``,
``cgw_rcpt``, ``cgw_topic``) and SendGrid's own ``sg_event_id``, signed with ECDSA P-256 /
SHA-256 over ``timestamp + body``
(https://www.twilio.com/docs/sendgrid/for-developers/tracking-events/getting-started-event-webhook-security-features).

Freshness: SendGrid retries a POST that got no 2xx "at increasing intervals for up to 24 hours
after the event occurs" (Event Webhook troubleshooting), so the default tolerance is that day
plus an hour's margin (``DEFAULT_TOLERANCE_SECONDS``). A retry inside the window is accepted
again by verification; the gateway's idempotent receipt store applies each ``sg_event_id``
once, which is what makes replays harmless (SendGrid itself says to de-duplicate on it).
"""

from __future__ import annotations

import base64
import binascii
import html
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Final

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from adapters import Outgoing, ProviderReceipt, ReceiptKind, SendReceipt, WebhookRejected
from adapters._http import (
    check_freshness,
    error_for_status,
    map_transport_errors,
    retry_after_seconds,
)
from adapters._transport import HttpClient, HttpRequest, HttpResponse
from gateway.core.errors import (
    AuthRejected,
    ConfigError,
    InvalidRecipient,
    InvalidRequest,
    ProviderUnavailable,
    RateLimited,
)
from gateway.core.model import Channel
from gateway.protocol import EmailContent
from gateway.settings import ProviderSettingsBase, Secret

KIND: Final = "sendgrid"
CHANNEL: Final = Channel.EMAIL
DEFAULT_BASE_URL: Final = "https://api.sendgrid.com"
KEY_ARG: Final = "cgw_key"
"""``custom_args`` key carrying the message key; SendGrid echoes it in every event."""
RECIPIENT_ARG: Final = "cgw_rcpt"
"""``custom_args`` key carrying the CRM's recipient id, so an opt-out resolves to the recipient
even when the message has left the journal."""
TOPIC_ARG: Final = "cgw_topic"
"""``custom_args`` key carrying the message's consent topic."""
RETRY_WINDOW_SECONDS: Final = 24 * 3600.0
"""SendGrid retries an Event Webhook POST for up to 24 hours after the event."""
DEFAULT_TOLERANCE_SECONDS: Final = RETRY_WINDOW_SECONDS + 3600.0
SIGNATURE_HEADER: Final = "x-twilio-email-event-webhook-signature"
TIMESTAMP_HEADER: Final = "x-twilio-email-event-webhook-timestamp"


class SendgridSettings(ProviderSettingsBase, frozen=True, tag=KIND):
    """A ``kind = "sendgrid"`` provider: one SendGrid account."""

    channel: ClassVar[Channel] = CHANNEL

    api_key: Secret | None = None
    """The Mail Send API key, from the environment."""
    webhook_public_key: str | None = None
    """The signed event webhook's ECDSA verification key (base64 DER, from SendGrid's
    settings); unset, every event webhook is refused."""


EVENT_KINDS: Final[Mapping[str, ReceiptKind]] = {
    "delivered": ReceiptKind.DELIVERED,
    "open": ReceiptKind.READ,
    "click": ReceiptKind.CLICKED,
    "bounce": ReceiptKind.BOUNCED,
    "dropped": ReceiptKind.BOUNCED,  # suppressed or invalid: it will never arrive
    "spamreport": ReceiptKind.SPAM_REPORT,
    "unsubscribe": ReceiptKind.UNSUBSCRIBED,
    "group_unsubscribe": ReceiptKind.UNSUBSCRIBED,
}
"""Events that matter; ``processed``, ``deferred`` (SendGrid retries) and others are skipped."""

_RECIPIENT_FIELD: Final = re.compile(r"^personalizations\.\d+\.to(\.\d+(\.email)?)?$")
_BODY_CLOSE: Final = re.compile(r"</body\s*>", re.IGNORECASE)


# ---------------------------------------------------------------- mail send
def open_pixel(url: str) -> str:
    return f'<img src="{html.escape(url, quote=True)}" width="1" height="1" alt="">'


def with_open_pixel(body: str, pixel_url: str) -> str:
    """``body`` with the open pixel before its last ``</body>``, or at its end."""
    pixel = open_pixel(pixel_url)
    closings = list(_BODY_CLOSE.finditer(body))
    if not closings:
        return body + pixel
    at = closings[-1].start()
    return body[:at] + pixel + body[at:]


def build_request(
    outgoing: Outgoing, *, config: SendgridSettings, base_url: str, api_key: str
) -> HttpRequest:
    """The Mail Send request for one email.

    Raises:
        InvalidRequest: the email has neither text nor html (SendGrid would answer 400).
        TypeError: ``outgoing.content`` is not email content.
    """
    content = outgoing.content
    if not isinstance(content, EmailContent):
        raise TypeError(f"sendgrid sends email content, not {type(content).__name__}")
    parts: list[dict[str, str]] = []
    # text/plain first, then text/html: SendGrid refuses any other order
    if content.text:
        parts.append({"type": "text/plain", "value": content.text})
    if content.html:
        body = content.html
        if outgoing.open_pixel_url is not None:
            body = with_open_pixel(body, outgoing.open_pixel_url)
        parts.append({"type": "text/html", "value": body})
    if not parts:
        raise InvalidRequest("sendgrid: the email has neither text nor html", provider=KIND)
    sender = outgoing.sender
    from_: dict[str, str] = {"email": sender.email_from}
    name = sender.email_name or outgoing.brand
    if name:
        from_["name"] = name
    custom_args = {KEY_ARG: outgoing.message_key}
    if outgoing.recipient_id is not None:
        custom_args[RECIPIENT_ARG] = outgoing.recipient_id
    if outgoing.topic is not None:
        custom_args[TOPIC_ARG] = outgoing.topic
    payload: dict[str, Any] = {
        "personalizations": [{"to": [{"email": outgoing.address}], "custom_args": custom_args}],
        "from": from_,
        "subject": content.subject,
        "content": parts,
    }
    if outgoing.unsubscribe_url is not None:
        # RFC 8058: one-click unsubscribe; Gmail and Yahoo require it for bulk senders
        payload["headers"] = {
            "List-Unsubscribe": f"<{outgoing.unsubscribe_url}>",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        }
    if outgoing.campaign:
        payload["categories"] = [outgoing.campaign[:255]]  # SendGrid's limit per category
    return HttpRequest.with_json(
        "POST",
        f"{base_url.rstrip('/')}/v3/mail/send",
        payload,
        headers={"Authorization": f"Bearer {api_key}"},
    )


def error_fields(content: bytes) -> list[str]:
    """The ``field`` of each entry of ``{"errors": [...]}`` (never the messages: they quote
    addresses)."""
    try:
        document = msgspec.json.decode(content)
    except msgspec.DecodeError:
        return []
    errors = document.get("errors") if isinstance(document, dict) else None
    return [
        e["field"]
        for e in (errors if isinstance(errors, list) else ())
        if isinstance(e, dict) and isinstance(e.get("field"), str)
    ]


def rate_limit_reset_seconds(headers: Mapping[str, str], *, now: float | None) -> float | None:
    """Seconds until ``X-RateLimit-Reset`` (an epoch second), if given and ``now`` is known."""
    value = headers.get("x-ratelimit-reset")
    if value is None or now is None:
        return None
    reset_at = _seconds(value)
    return None if reset_at is None else max(0.0, reset_at - now)


def parse_response(
    response: HttpResponse, *, provider: str, now: float | None = None
) -> SendReceipt:
    """The receipt of a 2xx, or the ProviderError the answer means.

    - 202 (queued) and 200 (sandbox mode): ``X-Message-Id`` is the provider message id;
    - 400: ``InvalidRecipient`` when a field is the recipient address, else ``InvalidRequest``;
    - 401, 403: ``AuthRejected`` (bad key, missing permission, unverified sender identity);
    - 413 and other 4xx: ``InvalidRequest``;
    - 429: ``RateLimited``, waiting ``Retry-After`` or else until ``X-RateLimit-Reset``
      (``now`` in POSIX seconds is needed for the latter);
    - 5xx: ``ProviderUnavailable``.
    """
    status = response.status_code
    if 200 <= status < 300:
        return SendReceipt(provider_message_id=response.headers.get("x-message-id"))
    fields = error_fields(response.content)
    code = fields[0] if fields else None
    detail = f"fields {', '.join(fields)}" if fields else ""
    text = f"{provider}: HTTP {status}" + (f" ({detail})" if detail else "")
    if status == 400 and any(_RECIPIENT_FIELD.match(field) for field in fields):
        recipient = next(f for f in fields if _RECIPIENT_FIELD.match(f))
        raise InvalidRecipient(text, provider=provider, status_code=status, code=recipient)
    if status == 429:
        retry_after = retry_after_seconds(response.headers, now=now)
        if retry_after is None:
            retry_after = rate_limit_reset_seconds(response.headers, now=now)
        raise RateLimited(
            text, provider=provider, status_code=status, code=code, retry_after_seconds=retry_after
        )
    if status in (401, 403):
        raise AuthRejected(text, provider=provider, status_code=status, code=code)
    if status >= 500:
        raise ProviderUnavailable(
            text,
            provider=provider,
            status_code=status,
            code=code,
            retry_after_seconds=retry_after_seconds(response.headers, now=now),
        )
    raise error_for_status(provider, response, code=code, detail=detail)


# ---------------------------------------------------------------- event webhook
def load_public_key(encoded: str) -> ec.EllipticCurvePublicKey:
    """The "Verification Key" of SendGrid's settings: base64 DER SubjectPublicKeyInfo.

    Raises:
        ValueError: not base64, not DER, or not an elliptic-curve key.
    """
    try:
        der = base64.b64decode(encoded.strip(), validate=True)
        key = serialization.load_der_public_key(der)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise ValueError("not a base64 DER public key") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError("not an elliptic-curve public key")
    return key


def sign_events(private_key: ec.EllipticCurvePrivateKey, *, timestamp: str, body: bytes) -> str:
    """SendGrid's signature header value: base64 DER ECDSA(SHA-256) of ``timestamp + body``."""
    signature = private_key.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    return base64.b64encode(signature).decode("ascii")


def _lowered(headers: Mapping[str, str]) -> dict[str, str]:
    return {key.lower(): value for key, value in headers.items()}


def _events(body: bytes) -> list[dict[str, Any]]:
    try:
        events = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise WebhookRejected("malformed", "sendgrid: the body is not JSON") from exc
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        raise WebhookRejected("malformed", "sendgrid: the body is not an array of events")
    return events


def verify_webhook(
    *, url: str, headers: Mapping[str, str], body: bytes, config: SendgridSettings, now: float
) -> None:
    """Check a Signed Event Webhook request before trusting a byte of it.

    Args:
        url: the URL the request came to (unused: SendGrid signs the body only).
        headers: the request headers; any case (they are lowercased here).
        body: the raw body, exactly as received (the signature covers the bytes).
        config: needs ``webhook_public_key``; ``webhook_tolerance_seconds`` bounds the
            signature's age (unset: ``DEFAULT_TOLERANCE_SECONDS``).
        now: POSIX seconds.

    Raises:
        WebhookRejected: ``bad_signature`` (a header missing, no key configured, or the
            signature does not verify), ``stale`` (signed longer ago than the tolerance, or
            more than ``MAX_CLOCK_AHEAD_SECONDS`` ahead of ``now``), ``malformed`` (not a JSON
            array of event objects).
    """
    lowered = _lowered(headers)
    signature = lowered.get(SIGNATURE_HEADER)
    timestamp = lowered.get(TIMESTAMP_HEADER)
    if not signature or not timestamp:
        raise WebhookRejected("bad_signature", "sendgrid: signature headers missing")
    if not config.webhook_public_key:
        raise WebhookRejected("bad_signature", "sendgrid: no webhook_public_key configured")
    try:
        key = load_public_key(config.webhook_public_key)
        key.verify(
            base64.b64decode(signature, validate=True),
            timestamp.encode() + body,
            ec.ECDSA(hashes.SHA256()),
        )
    except (ValueError, binascii.Error, InvalidSignature) as exc:
        raise WebhookRejected("bad_signature", "sendgrid: the signature does not verify") from exc
    signed_at = _seconds(timestamp)
    if signed_at is None:  # signed, yet garbage: SendGrid never sends this
        raise WebhookRejected("malformed", "sendgrid: the timestamp is not a number")
    tolerance = config.webhook_tolerance_seconds
    check_freshness(
        provider=KIND,
        signed_at_seconds=signed_at,
        now=now,
        tolerance_seconds=DEFAULT_TOLERANCE_SECONDS if tolerance is None else tolerance,
    )
    _events(body)


def _message_id(event: Mapping[str, Any]) -> str | None:
    """``sg_message_id`` is ``<X-Message-Id>.<filter and instance>``: keep what send returned."""
    value = event.get("sg_message_id")
    return value.split(".", 1)[0] if isinstance(value, str) and value else None


def _string(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _seconds(value: object) -> float | None:
    """A finite number of seconds, or None: what a provider sends is not trusted to be one
    (a 400-digit integer overflows a float; "nan" would compare false with every bound)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        seconds = float(value)
    except (ValueError, OverflowError):
        return None
    return seconds if math.isfinite(seconds) else None


def _detail(name: str, event: Mapping[str, Any]) -> str | None:
    # never "email" or "reason": both may quote the address
    match name:
        case "click":
            url = event.get("url")
            return url if isinstance(url, str) else None
        case "bounce":
            kind, status = event.get("type"), event.get("status")
            return ":".join(str(part) for part in (kind, status) if part) or None
        case _:
            return name


def parse_webhook(*, url: str, headers: Mapping[str, str], body: bytes) -> list[ProviderReceipt]:
    """Receipts for our messages from a verified Event Webhook body.

    Events without ``cgw_key`` were not sent by this gateway and are skipped, and so are the
    event types that change nothing (``processed``, ``deferred``, ...). ``unsubscribe``,
    ``group_unsubscribe`` and ``spamreport`` are receipts like the others. ``at`` is the event's
    ``timestamp``, else the signature timestamp; ``event_id`` is ``sg_event_id``;
    ``recipient_id`` and ``topic`` are the echoed ``cgw_rcpt`` and ``cgw_topic``.

    Raises:
        WebhookRejected: ``malformed`` when the body is not a JSON array of objects.
    """
    fallback = _lowered(headers).get(TIMESTAMP_HEADER)
    receipts = []
    for event in _events(body):
        name = event.get("event")
        key = event.get(KEY_ARG)
        if not isinstance(name, str) or name not in EVENT_KINDS or not isinstance(key, str):
            continue
        at_seconds = _seconds(event.get("timestamp"))
        if at_seconds is None:
            at_seconds = _seconds(fallback)
        if at_seconds is None:
            continue
        receipts.append(
            ProviderReceipt(
                kind=EVENT_KINDS[name],
                at=at_seconds,
                message_key=key,
                provider_message_id=_message_id(event),
                detail=_detail(name, event),
                event_id=_string(event.get("sg_event_id")),
                recipient_id=_string(event.get(RECIPIENT_ARG)),
                topic=_string(event.get(TOPIC_ARG)),
            )
        )
    return receipts


# ---------------------------------------------------------------- adapter
class SendgridAdapter:
    """Sends email through one SendGrid account.

    Args:
        name: the configured provider name (metrics, errors).
        config: needs ``api_key``; ``url`` overrides the API base.
        client: shared, owned by the caller.
        wall_clock: POSIX seconds, to turn ``X-RateLimit-Reset`` into a delay.

    Raises:
        gateway.core.errors.ConfigError: no api_key.
    """

    def __init__(
        self,
        name: str,
        config: SendgridSettings,
        client: HttpClient,
        *,
        wall_clock: Callable[[], float],
    ) -> None:
        if config.api_key is None:
            raise ConfigError(f"providers.{name}.api_key: required for sendgrid")
        self.name = name
        self.channel = CHANNEL
        self.config = config
        self._api_key = config.api_key.reveal()
        self._client = client
        self._wall_clock = wall_clock
        self._base_url = config.url or DEFAULT_BASE_URL

    async def send(self, outgoing: Outgoing) -> SendReceipt:
        """Send one email.

        Raises:
            gateway.core.errors.ProviderError: see ``parse_response``.
        """
        try:
            request = build_request(
                outgoing, config=self.config, base_url=self._base_url, api_key=self._api_key
            )
        except InvalidRequest as exc:
            raise InvalidRequest(str(exc).replace(KIND, self.name, 1), provider=self.name) from exc
        with map_transport_errors(self.name):
            response = await self._client.send(request)
        return parse_response(response, provider=self.name, now=self._wall_clock())

    async def aclose(self) -> None:
        """Nothing to release: the client belongs to the caller."""
