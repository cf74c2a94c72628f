"""Twilio Programmable Messaging: the Messages API and its signed status callbacks.

Wire format (twilio.com/docs/messaging/api/message-resource, /docs/usage/webhooks/webhooks-security,
/docs/api/errors):

- ``POST {base}/2010-04-01/Accounts/{AccountSid}/Messages.json``, HTTP basic auth
  ``AccountSid:AuthToken``, form-encoded ``To`` (E.164), ``From`` (a number or an alphanumeric
  sender id) or, when the provider has ``messaging_service_sid``, ``MessagingServiceSid``
  instead (Twilio picks the sender from the service's pool), ``Body`` and ``StatusCallback``.
  The gateway's callback URL already names the message (``?m=<message key>``), so callbacks
  need no lookup by SID.
- Success is ``201`` with JSON ``{"sid": "SM...", "status": "queued", ...}``; failure is
  ``{"code": 21211, "message": ..., "more_info": ..., "status": 400}`` (table ``_CODES``).
- Status callbacks are form POSTs to ``StatusCallback`` with ``MessageSid``, ``MessageStatus``
  (queued, sending, sent, delivered, undelivered, failed; read on some channels),
  ``ErrorCode``, ``To``, ``From``, ``AccountSid``, ...
- Inbound messages (twilio.com/docs/messaging/guides/webhook-request) are form POSTs to the
  number's (or Messaging Service's) incoming-message webhook, which is the same gateway
  endpoint: ``MessageSid``, ``SmsSid``, ``SmsStatus=received``, ``From``, ``To``, ``Body``,
  ``NumMedia``, ... and, for a Messaging Service with Advanced Opt-Out, ``OptOutType``
  (``STOP``, ``START`` or ``HELP``). A STOP is the recipient's opt-out and becomes an
  ``UNSUBSCRIBED`` receipt naming the phone number (``parse_webhook``).
- Every webhook carries ``X-Twilio-Signature`` = base64(HMAC(key, URL + each POST parameter's
  name and value, sorted by name, then by value, identical pairs once)), the URL being the full
  URL Twilio requested, query string included. The key is the auth token and the HMAC SHA-1,
  unless a Webhooks rule matched the URL: then Twilio signs with the rule's SharedKey and
  algorithm (HMAC-SHA256) and says so in ``X-Twilio-Webhooks-Signature-Settings:
  key=<SharedKey id>,algorithm=HMAC_SHA256`` (twilio.com/docs/usage/webhooks/webhook-shared-keys).
  A JSON body is not signed as parameters: its hex SHA-256 is the URL's ``bodySHA256`` query
  parameter, and the signature covers the URL alone. ``verify_webhook`` accepts exactly what
  twilio-python's ``RequestValidator`` accepts (``tests/adapters/test_provider_sdks.py``).

Twilio signatures carry no timestamp, so a callback cannot be checked for freshness. Replays
are absorbed by idempotency instead: every receipt carries ``event_id`` = ``MessageSid:status``
and the gateway's receipt store applies each once. Do not invent a timestamp check.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from typing import ClassVar, Final
from urllib.parse import parse_qs, parse_qsl, urlsplit, urlunsplit

import msgspec

from adapters import Outgoing, ProviderReceipt, ReceiptKind, SendReceipt, WebhookRejected
from adapters._http import error_for_status, map_transport_errors, retry_after_seconds
from adapters._transport import HttpClient, HttpRequest, HttpResponse
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
from gateway.settings import ProviderSettingsBase, Secret

KIND: Final = "twilio"
CHANNEL: Final = Channel.SMS
DEFAULT_URL: Final = "https://api.twilio.com"
API_VERSION: Final = "2010-04-01"
SIGNATURE_HEADER: Final = "x-twilio-signature"
SIGNATURE_SETTINGS_HEADER: Final = "x-twilio-webhooks-signature-settings"
HMAC_SHA1: Final = "HMAC_SHA1"
HMAC_SHA256: Final = "HMAC_SHA256"
_DIGESTS: Final = {HMAC_SHA1: hashlib.sha1, HMAC_SHA256: hashlib.sha256}
BODY_HASH_PARAM: Final = "bodySHA256"

OPT_OUT_KEYWORDS: Final = frozenset(
    {"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "OPTOUT", "REVOKE"}
)
"""Twilio's default opt-out keywords (twilio.com/docs/messaging/tutorials/advanced-opt-out;
help.twilio.com "Twilio support for opt-out keywords"). Twilio acts on a message only when its
whole body is one of them, in any case ("Stop please" does nothing), so the same rule applies
here; "STOP ALL" is not on Twilio's list (two words), unlike some other carriers'."""
INBOUND_STATUS: Final = "received"
"""``SmsStatus`` of an inbound message (status callbacks of our own messages never have it)."""

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
    21701: InvalidRequest,  # the Messaging Service does not exist (messaging_service_sid)
    21705: InvalidRequest,  # the Messaging Service is invalid (not an MG... sid)
}

RECEIPT_STATUSES: Final[Mapping[str, ReceiptKind]] = {
    "delivered": ReceiptKind.DELIVERED,
    "undelivered": ReceiptKind.FAILED,
    "failed": ReceiptKind.FAILED,
    "read": ReceiptKind.READ,
}
"""MessageStatus values that are receipts; queued/accepted/sending/sent are progress only."""


class TwilioSettings(ProviderSettingsBase, frozen=True, tag=KIND):
    """A ``kind = "twilio"`` provider: one Twilio account."""

    channel: ClassVar[Channel] = CHANNEL

    account_sid: str | None = None
    """The account (``AC...``) that sends."""
    messaging_service_sid: str | None = None
    """Send through this Messaging Service (``MG...``) instead of ``From`` = the tenant's
    ``sms_from``; Twilio then picks the sender from the service's pool."""
    auth_token: Secret | None = None
    """The account's auth token, from the environment; it also keys the callbacks'
    HMAC-SHA1 signatures."""
    webhook_shared_key: Secret | None = None
    """The SharedKey secret that signs webhooks matched by a Webhooks rule (those carry
    ``X-Twilio-Webhooks-Signature-Settings``); the others are signed with ``auth_token``."""


class _Created(msgspec.Struct):
    sid: str


class _Failure(msgspec.Struct):
    code: int | None = None


_created_decoder: Final = msgspec.json.Decoder(_Created)
_failure_decoder: Final = msgspec.json.Decoder(_Failure)


# ---------------------------------------------------------------- pure functions
def form_fields(outgoing: Outgoing, *, messaging_service_sid: str | None = None) -> dict[str, str]:
    """The form fields of one ``Messages.json`` request.

    With ``messaging_service_sid`` the message names the Messaging Service instead of a
    ``From``: Twilio then sends from the service's sender pool (and applies its Advanced
    Opt-Out), so the tenant's ``sms_from`` is not used.
    """
    content = outgoing.content
    if not isinstance(content, SmsContent):
        raise TypeError(f"twilio can't send {type(content).__name__}")
    fields = {"To": outgoing.address}
    if messaging_service_sid:
        fields["MessagingServiceSid"] = messaging_service_sid
    else:
        fields["From"] = outgoing.sender.sms_from
    fields["Body"] = content.text
    if outgoing.status_callback_url:
        fields["StatusCallback"] = outgoing.status_callback_url
    return fields


def build_request(
    outgoing: Outgoing, *, config: TwilioSettings, base_url: str, auth_token: str
) -> HttpRequest:
    """The ``POST .../Messages.json`` request for one SMS (pure).

    Args:
        outgoing: an SMS; ``address`` is the E.164 phone, ``sender.sms_from`` the sender.
        config: supplies ``account_sid``, and ``messaging_service_sid`` when the sender is a
            Messaging Service.
        base_url: e.g. ``https://api.twilio.com`` or a simulator's address.
        auth_token: the account's auth token (basic-auth password).

    Raises:
        ConfigError: ``account_sid`` is not configured.
    """
    account_sid = config.account_sid
    if not account_sid:
        raise ConfigError("twilio: account_sid is not configured")
    credentials = base64.b64encode(f"{account_sid}:{auth_token}".encode()).decode()
    return HttpRequest.with_form(
        "POST",
        f"{base_url.rstrip('/')}/{API_VERSION}/Accounts/{account_sid}/Messages.json",
        form_fields(outgoing, messaging_service_sid=config.messaging_service_sid),
        headers={"Authorization": f"Basic {credentials}", "Accept": "application/json"},
    )


def parse_response(response: HttpResponse, *, provider: str) -> SendReceipt:
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


def signature(
    url: str, params: Sequence[tuple[str, str]], key: str, *, algorithm: str = HMAC_SHA1
) -> str:
    """``X-Twilio-Signature`` for a POST to ``url`` with form ``params``.

    The signed string is the URL (with its query string) followed by each parameter's name and
    value, no separators, sorted by name, then by value; a pair repeated identically counts
    once (twilio-python's ``RequestValidator.compute_signature`` sorts ``set(values)``).
    ``key`` is the auth token, or the SharedKey secret with ``HMAC_SHA256``.

    Raises:
        ValueError: an algorithm other than ``HMAC_SHA1`` or ``HMAC_SHA256``.
    """
    digest = _DIGESTS.get(algorithm.upper())
    if digest is None:
        raise ValueError(f"unsupported webhook signature algorithm {algorithm!r}")
    data = url + "".join(name + value for name, value in sorted(set(params)))
    return base64.b64encode(hmac.new(key.encode(), data.encode(), digest).digest()).decode()


def signature_algorithm(settings: str | None) -> str:
    """The algorithm ``X-Twilio-Webhooks-Signature-Settings`` names (``key=...,algorithm=...``);
    ``HMAC_SHA1`` when the header or its ``algorithm`` is absent (twilio-python's
    ``get_signature_algorithm``)."""
    for part in (settings or "").split(","):
        name, separator, value = part.partition("=")
        if separator and name.strip() == "algorithm" and value.strip():
            return value.strip()
    return HMAC_SHA1


_MAX_FIELDS = 200
"""Twilio's callbacks carry a few dozen parameters. The signature covers them all sorted, so
they are parsed before it can be checked: a forged form of 100k fields must be refused before
the sort and the HMAC, or it stalls the event loop for everyone."""


def _params(body: bytes) -> list[tuple[str, str]]:
    try:
        return parse_qsl(
            body.decode(),
            keep_blank_values=True,
            strict_parsing=bool(body),
            max_num_fields=_MAX_FIELDS,
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise WebhookRejected("malformed", "body is not a form (or has too many fields)") from exc


def _url_variants(url: str) -> tuple[str, ...]:
    """``url`` without its port and with one (the default port of the scheme when it names
    none), the two forms twilio-python's ``RequestValidator.validate`` checks because "sig
    generation on back end is inconsistent" about ports."""
    parts = urlsplit(url)
    if not parts.netloc or "@" in parts.netloc:
        return (url,)
    try:
        port = parts.port
    except ValueError:
        return (url,)
    # the netloc's own spelling (case, IPv6 brackets), as twilio-python keeps it
    host = parts.netloc.rsplit(":", 1)[0] if port is not None else parts.netloc
    with_port = port if port is not None else (443 if parts.scheme == "https" else 80)
    without = urlunsplit(parts._replace(netloc=host))
    return (without, urlunsplit(parts._replace(netloc=f"{host}:{with_port}")))


def _signing_key(lowered: Mapping[str, str], config: TwilioSettings) -> tuple[str, str]:
    """``(key, algorithm)``: the SharedKey and its algorithm when the settings header is there,
    else the auth token and HMAC-SHA1."""
    settings = lowered.get(SIGNATURE_SETTINGS_HEADER)
    if settings is None:
        if config.auth_token is None:
            raise WebhookRejected("bad_signature", "no auth_token configured to check signatures")
        return config.auth_token.reveal(), HMAC_SHA1
    algorithm = signature_algorithm(settings).upper()
    if algorithm not in _DIGESTS:
        raise WebhookRejected("bad_signature", f"unsupported signature algorithm {algorithm}")
    if config.webhook_shared_key is None:
        raise WebhookRejected(
            "bad_signature", "signed with a SharedKey, but no webhook_shared_key is configured"
        )
    return config.webhook_shared_key.reveal(), algorithm


def verify_webhook(
    *, url: str, headers: Mapping[str, str], body: bytes, config: TwilioSettings, now: float
) -> None:
    """Check that a webhook (status callback or inbound message) comes from Twilio.

    Args:
        url: the full URL Twilio was given and requested, query string included (the
            ``StatusCallback`` as sent, i.e. the gateway's public URL, not the address a proxy
            forwarded to).
        headers: the request headers, any case.
        body: the raw body: a form, or JSON when ``url`` carries ``bodySHA256``.
        config: ``auth_token`` keys HMAC-SHA1 signatures; ``webhook_shared_key`` keys those
            whose ``X-Twilio-Webhooks-Signature-Settings`` names a SharedKey.
        now: unused: Twilio signs no timestamp, so there is no staleness to check (replays are
            absorbed by the receipt store's idempotency on ``event_id``).

    Raises:
        WebhookRejected: ``bad_signature`` (missing, wrong, an unknown algorithm, no key to
            check with, or a body that does not match ``bodySHA256``) or ``malformed`` (the
            body is not a form).
    """
    del now
    lowered = {name.lower(): value for name, value in headers.items()}
    given = lowered.get(SIGNATURE_HEADER)
    if given is None:
        raise WebhookRejected("bad_signature", "no X-Twilio-Signature header")
    key, algorithm = _signing_key(lowered, config)
    body_hashes = parse_qs(urlsplit(url).query).get(BODY_HASH_PARAM)
    if body_hashes:
        # a JSON body: its hash is in the signed URL, and there are no parameters to sign
        params: list[tuple[str, str]] = []
        body_ok = hmac.compare_digest(
            body_hashes[0].encode(), hashlib.sha256(body).hexdigest().encode()
        )
    else:
        params = _params(body)
        body_ok = True
    given_bytes = given.strip().encode()
    valid = False
    for candidate in _url_variants(url):
        # Constant time, and every variant is checked: no early exit to time.
        expected = signature(candidate, params, key, algorithm=algorithm)
        valid |= hmac.compare_digest(given_bytes, expected.encode())
    if not (valid and body_ok):
        raise WebhookRejected("bad_signature", "X-Twilio-Signature does not match")


def is_opt_out(fields: Mapping[str, str]) -> bool:
    """Whether an inbound message is the sender's opt-out.

    ``OptOutType`` (Advanced Opt-Out) decides when Twilio sent it: ``STOP`` is an opt-out,
    ``START`` and ``HELP`` are not, whatever the body says (the service may have custom
    keywords). Without it, the body decides: one of ``OPT_OUT_KEYWORDS``, trimmed, any case.
    """
    opt_out_type = fields.get("OptOutType")
    if opt_out_type:
        return opt_out_type.strip().upper() == "STOP"
    return fields.get("Body", "").strip().upper() in OPT_OUT_KEYWORDS


def parse_webhook(*, url: str, headers: Mapping[str, str], body: bytes) -> list[ProviderReceipt]:
    """The receipt in one verified webhook, if it holds one.

    Status callbacks: ``delivered`` -> DELIVERED; ``undelivered``/``failed`` -> FAILED with
    ``detail`` = Twilio's ``ErrorCode`` (a code such as ``30003``, never personal data);
    ``read`` -> READ; every other status -> no receipt. ``message_key`` is the ``m`` query
    parameter of ``url`` (the gateway put it into ``StatusCallback``); ``provider_message_id``
    is ``MessageSid``.

    Inbound messages (``SmsStatus=received``): an opt-out (``is_opt_out``) -> one UNSUBSCRIBED
    naming no message, with ``detail`` = the sender's phone (``From``; personal data, never
    logged); START, HELP and every other inbound message -> no receipt.

    ``event_id`` is ``MessageSid:status`` (Twilio sends the same again when it retries).
    ``at`` is ``0.0``: Twilio's webhooks carry no event time, and this function gets no
    clock, so the webhook route substitutes the time it received the request.

    Raises:
        WebhookRejected: ``malformed`` when the body is not a form, has no ``MessageStatus``
            or ``SmsStatus``, or is an opt-out without ``From``.
    """
    del headers
    fields = dict(_params(body))
    status = fields.get("MessageStatus") or fields.get("SmsStatus")
    if not status:
        raise WebhookRejected("malformed", "webhook without MessageStatus or SmsStatus")
    sid = fields.get("MessageSid") or fields.get("SmsSid") or None
    event_id = f"{sid}:{status}" if sid else None
    if status == INBOUND_STATUS:
        if not is_opt_out(fields):
            return []
        phone = fields.get("From")
        if not phone:
            raise WebhookRejected("malformed", "inbound opt-out without From")
        return [ProviderReceipt(ReceiptKind.UNSUBSCRIBED, 0.0, detail=phone, event_id=event_id)]
    kind = RECEIPT_STATUSES.get(status)
    if kind is None:
        return []
    keys = parse_qs(urlsplit(url).query).get("m")
    detail = (fields.get("ErrorCode") or None) if kind is ReceiptKind.FAILED else None
    return [
        ProviderReceipt(
            kind,
            0.0,
            message_key=keys[0] if keys else None,
            provider_message_id=sid,
            detail=detail,
            event_id=event_id,
        )
    ]


# ---------------------------------------------------------------- the adapter
class TwilioAdapter:
    """Sends SMS through one Twilio account."""

    def __init__(self, name: str, config: TwilioSettings, client: HttpClient) -> None:
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
            gateway.core.errors.ProviderError: see ``parse_response`` and ``map_transport_errors``.
        """
        request = build_request(
            outgoing, config=self.config, base_url=self._base_url, auth_token=self._auth_token
        )
        with map_transport_errors(self.name):
            response = await self._client.send(request)
        return parse_response(response, provider=self.name)

    async def aclose(self) -> None:
        """Nothing to close: the client belongs to the caller."""
