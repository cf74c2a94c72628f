"""Viber REST Bot API: ``send_message`` and the signed callbacks (delivered, seen, failed, ...).

Wire format (https://creators.viber.com/docs/bots-api/ and the older
https://developers.viber.com/docs/api/rest-bot-api/):

- ``POST {base}/pa/send_message`` with header ``X-Viber-Auth-Token`` and a JSON body
  ``{"receiver", "min_api_version": 1, "sender": {"name"}, "tracking_data", "type", "text"}``;
  ``type`` is ``"picture"`` with ``"media"`` when the content has an image.
- The answer is HTTP 200 whatever happened: ``{"status": 0, "status_message": "ok",
  "message_token": <int64>, "chat_hostname": ...}`` on success, a non-zero ``status`` otherwise
  (the table is ``_STATUS`` below).
- Callbacks are JSON POSTs to the one webhook the bot registered with ``/pa/set_webhook``,
  signed with ``X-Viber-Content-Signature`` = hex HMAC-SHA256 of the raw body keyed with the
  bot's auth token. ``delivered``/``seen``/``failed`` name the message by ``message_token``
  only (``tracking_data`` comes back with user replies, never with receipts), so receipts
  carry ``provider_message_id`` and the router resolves it to the message. Each receipt's
  ``event_id`` is ``message_token:event:timestamp``, the same in every retry of the callback.

Freshness: "when a webhook appears offline, Viber will retry the callback several times for an
hour" (Viber's developer FAQ), and a retry carries the original ``timestamp``. The default
tolerance is that hour plus an hour's margin (``DEFAULT_TOLERANCE_SECONDS``); a retry inside it
is accepted again by verification and applied once by the gateway's idempotent receipt store,
which is what makes replays harmless. A shorter window would refuse the retried
``unsubscribed`` of an outage: a lost opt-out.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import ClassVar, Final
from urllib.parse import urlsplit

import msgspec

from adapters import Outgoing, ProviderReceipt, ReceiptKind, SendReceipt, WebhookRejected
from adapters._http import check_freshness, error_for_status, map_transport_errors
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
from gateway.protocol import ViberContent
from gateway.settings import ProviderSettingsBase, Secret

KIND: Final = "viber"
CHANNEL: Final = Channel.VIBER
DEFAULT_URL: Final = "https://chatapi.viber.com"
SIGNATURE_HEADER: Final = "x-viber-content-signature"

MAX_SENDER_NAME_CHARS: Final = 28
"""``sender.name``: "Required. Max 28 characters" (send_message docs)."""
MAX_TEXT_CHARS: Final = 7000
"""A text message's ``text``: "Max length 7,000 characters" (send_message docs)."""
MAX_PICTURE_TEXT_CHARS: Final = 768
"""A picture message's ``text`` (its caption) holds at most 768 characters."""
MAX_TRACKING_DATA_CHARS: Final = 4000
PICTURE_EXTENSIONS: Final = (".jpeg", ".png", ".gif")
"""``media`` of a picture: "The URL must have a resource with a .jpeg, .png or .gif file
extension as the last path segment" (send_message docs); other images go out as text."""

RECEIPT_EVENTS: Final = ("delivered", "seen", "failed", "unsubscribed")
"""The callbacks ``set_webhook`` subscribes to. ``unsubscribed`` is named although Viber says it
always comes: it is the opt-out, and asking for it explicitly costs nothing."""
RETRY_WINDOW_SECONDS: Final = 3600.0
"""Viber retries a callback "several times for an hour" while the webhook looks offline."""
DEFAULT_TOLERANCE_SECONDS: Final = RETRY_WINDOW_SECONDS + 3600.0


class ViberSettings(ProviderSettingsBase, frozen=True, tag=KIND):
    """A ``kind = "viber"`` provider: one Viber bot account."""

    channel: ClassVar[Channel] = CHANNEL

    auth_token: Secret | None = None
    """The bot's authentication token, from the environment; it also keys the callbacks'
    signatures."""


# Viber's status codes (creators.viber.com/docs/bots-api/errors; the same table ships in
# Viber's own SDKs). What each means for us:
# - 2 (and 7/8/9/10/15: the account is blocked, unknown, suspended, has no webhook, or is not
#   authorised) say that *this bot account* cannot send anything. Nothing about the message
#   is wrong, so it is not InvalidRequest; AuthRejected is the permanent "fix the provider
#   account" error the operator is alerted on, and failover to another account may help.
# - 1/3/4/13/14 say that what we built is wrong: InvalidRequest.
# - 5/6/11: this receiver can't get bot messages (not on Viber, not subscribed, old client).
# - 12: "rate control breach"; Viber gives no Retry-After, so the retry policy's backoff rules.
# - anything else (16+ concern features we never use, new codes may appear): transient.
_STATUS: Final[Mapping[int, tuple[str, type[ProviderError]]]] = {
    1: ("invalidUrl", InvalidRequest),
    2: ("invalidAuthToken", AuthRejected),
    3: ("badData", InvalidRequest),
    4: ("missingData", InvalidRequest),
    5: ("receiverNotRegistered", InvalidRecipient),
    6: ("receiverNotSubscribed", InvalidRecipient),
    7: ("publicAccountBlocked", AuthRejected),
    8: ("publicAccountNotFound", AuthRejected),
    9: ("publicAccountSuspended", AuthRejected),
    10: ("webhookNotSet", AuthRejected),
    11: ("receiverNoSuitableDevice", InvalidRecipient),
    12: ("tooManyRequests", RateLimited),
    13: ("apiVersionNotSupported", InvalidRequest),
    14: ("incompatibleWithVersion", InvalidRequest),
    15: ("publicAccountNotAuthorized", AuthRejected),
}


class _Answer(msgspec.Struct):
    status: int
    message_token: int | None = None


class _Callback(msgspec.Struct):
    event: str
    timestamp: int
    message_token: int | str | None = None
    user_id: str | None = None
    desc: str | None = None


_answer_decoder: Final = msgspec.json.Decoder(_Answer)
_callback_decoder: Final = msgspec.json.Decoder(_Callback)


# ---------------------------------------------------------------- pure functions
def message_body(outgoing: Outgoing) -> dict[str, object]:
    """The ``send_message`` JSON for one outgoing message.

    A button (``button_text`` with a ``link_url``) is sent as text, not as a Viber keyboard:
    ``"{text}\\n\\n{button_text}: {link}"`` unless the text already carries the link. Keyboards
    need newer clients (``min_api_version``) and are not worth that here. When the line would
    take the text past Viber's 7,000 characters it is left out: the message still goes, with
    the CRM's text whole (cutting it could cut the advertiser's name or the terms).

    An image makes a ``picture`` message whose caption is the text when Viber can take it: a
    caption of at most 768 characters and a media URL whose last path segment ends in .jpeg,
    .png or .gif. Otherwise the message goes out as text without the image rather than not at
    all.

    Raises:
        InvalidRequest: the text itself is over 7,000 characters (after ``{link}`` became the
            tracked URL); Viber would refuse it with status 3.
        TypeError: ``outgoing.content`` is not Viber content.
    """
    content = outgoing.content
    if not isinstance(content, ViberContent):
        raise TypeError(f"viber can't send {type(content).__name__}")
    text = content.text
    if len(text) > MAX_TEXT_CHARS:
        raise InvalidRequest(
            f"viber: the text has {len(text)} characters, over {MAX_TEXT_CHARS}", provider=KIND
        )
    if content.button_text and outgoing.link_url and outgoing.link_url not in text:
        with_button = f"{text}\n\n{content.button_text}: {outgoing.link_url}"
        if len(with_button) <= MAX_TEXT_CHARS:
            text = with_button
    body: dict[str, object] = {
        "receiver": outgoing.address,
        "min_api_version": 1,
        "sender": {"name": outgoing.sender.viber_name[:MAX_SENDER_NAME_CHARS]},
        # Comes back only with the user's replies; the message key is no personal data.
        "tracking_data": outgoing.message_key[:MAX_TRACKING_DATA_CHARS],
    }
    if (
        content.image_url is not None
        and len(text) <= MAX_PICTURE_TEXT_CHARS
        and picture_url_accepted(content.image_url)
    ):
        body["type"] = "picture"
        body["text"] = text
        body["media"] = content.image_url
    else:
        body["type"] = "text"
        body["text"] = text
    return body


def picture_url_accepted(url: str) -> bool:
    """Whether Viber takes ``url`` as a picture's ``media`` (see ``PICTURE_EXTENSIONS``)."""
    last_segment = urlsplit(url).path.rsplit("/", 1)[-1]
    return last_segment.lower().endswith(PICTURE_EXTENSIONS)


def build_request(
    outgoing: Outgoing, *, config: ViberSettings, base_url: str, auth_token: str
) -> HttpRequest:
    """The ``POST /pa/send_message`` request for one message (pure).

    Args:
        outgoing: a Viber message; ``address`` is the receiver's Viber user id.
        config: the provider's configuration (Viber needs nothing from it beyond the token).
        base_url: e.g. ``https://chatapi.viber.com`` or a simulator's address.
        auth_token: the bot's authentication token.
    """
    del config  # the same signature for every provider; Viber reads nothing else from it
    return HttpRequest.with_json(
        "POST",
        f"{base_url.rstrip('/')}/pa/send_message",
        message_body(outgoing),
        headers={"X-Viber-Auth-Token": auth_token},
    )


def build_set_webhook_request(
    *,
    base_url: str,
    auth_token: str,
    url: str,
    event_types: tuple[str, ...] = RECEIPT_EVENTS,
) -> HttpRequest:
    """``POST /pa/set_webhook``: register the gateway's webhook URL (an empty URL removes it)."""
    body = {"url": url, "event_types": list(event_types), "send_name": False, "send_photo": False}
    return HttpRequest.with_json(
        "POST",
        f"{base_url.rstrip('/')}/pa/set_webhook",
        body,
        headers={"X-Viber-Auth-Token": auth_token},
    )


def parse_response(response: HttpResponse, *, provider: str) -> SendReceipt:
    """The receipt of an accepted message, or the ``ProviderError`` the answer means (pure).

    Raises:
        ProviderError: a subclass per ``_STATUS``; ``code`` is Viber's status as a string.
            HTTP errors (429, 5xx from Viber's front ends) map as ``error_for_status`` says.
    """
    answer = _answer(response, provider=provider)
    if answer.message_token is None:
        raise ProviderUnavailable(
            f"{provider}: status 0 without a message_token",
            provider=provider,
            status_code=response.status_code,
        )
    return SendReceipt(provider_message_id=str(answer.message_token))


def _answer(response: HttpResponse, *, provider: str) -> _Answer:
    """Viber's decoded answer when its status is 0; raise the mapped error otherwise."""
    if not response.is_success:
        raise error_for_status(provider, response)
    try:
        answer = _answer_decoder.decode(response.content)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        # A 200 that isn't Viber's JSON is a proxy or front end misbehaving: try again later.
        raise ProviderUnavailable(
            f"{provider}: unreadable answer", provider=provider, status_code=response.status_code
        ) from exc
    if answer.status == 0:
        return answer
    name, error = _STATUS.get(answer.status, ("unknown", ProviderUnavailable))
    raise error(
        f"{provider}: viber status {answer.status} ({name})",
        provider=provider,
        status_code=response.status_code,
        code=str(answer.status),
    )


def signature(body: bytes, auth_token: str) -> str:
    """``X-Viber-Content-Signature``: hex HMAC-SHA256 of the raw body, keyed with the token."""
    return hmac.new(auth_token.encode(), body, hashlib.sha256).hexdigest()


def verify_webhook(
    *, url: str, headers: Mapping[str, str], body: bytes, config: ViberSettings, now: float
) -> None:
    """Check that a callback comes from Viber and is fresh.

    Args:
        url: unused (Viber signs the body only); here for the common webhook interface.
        headers: the request headers, any case.
        body: the raw request body, exactly as received.
        config: the provider whose ``auth_token`` keys the signature and whose
            ``webhook_tolerance_seconds`` bounds the callback's age (unset:
            ``DEFAULT_TOLERANCE_SECONDS``).
        now: wall time, POSIX seconds.

    Raises:
        WebhookRejected: ``bad_signature`` (missing, wrong, or no token to check with),
            ``malformed`` (signed, but not a Viber callback), ``stale`` (its ``timestamp`` is
            older than the tolerance, or too far in the future: a broken clock).
    """
    del url
    lowered = {name.lower(): value for name, value in headers.items()}
    given = lowered.get(SIGNATURE_HEADER)
    if given is None:
        raise WebhookRejected("bad_signature", "no X-Viber-Content-Signature header")
    if config.auth_token is None:
        raise WebhookRejected("bad_signature", "no auth_token configured to check signatures")
    expected = signature(body, config.auth_token.reveal())
    if not hmac.compare_digest(given.strip().lower().encode(), expected.encode()):
        raise WebhookRejected("bad_signature", "X-Viber-Content-Signature does not match")
    callback = _callback(body)
    tolerance = config.webhook_tolerance_seconds
    check_freshness(
        provider=KIND,
        signed_at_seconds=callback.timestamp / 1000.0,
        now=now,
        tolerance_seconds=DEFAULT_TOLERANCE_SECONDS if tolerance is None else tolerance,
    )


def _callback(body: bytes) -> _Callback:
    try:
        return _callback_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise WebhookRejected("malformed", f"not a Viber callback: {exc}") from exc


def parse_webhook(*, url: str, headers: Mapping[str, str], body: bytes) -> list[ProviderReceipt]:
    """The receipts in one verified callback (Viber posts one event per request).

    - ``delivered`` / ``seen`` / ``failed`` -> DELIVERED / READ / FAILED with
      ``provider_message_id=str(message_token)`` and ``message_key=None``: the router resolves
      the token to the message it sent. ``failed`` carries Viber's ``desc`` as ``detail``.
    - ``unsubscribed`` -> UNSUBSCRIBED with no message at all: the user left the bot, so
      ``detail`` holds the Viber **user id** (personal data; ``message_token`` in this event
      identifies the callback, not a message of ours). The gateway must resolve the user id to
      its recipient and withdraw Viber consent, and must never log ``detail`` of this receipt.
    - ``webhook``, ``subscribed``, ``conversation_started``, ``message`` and unknown events:
      no receipts.

    ``at`` is the callback's ``timestamp`` (milliseconds) in POSIX seconds; ``event_id`` is
    ``message_token:event:timestamp`` (None for a callback without ``message_token``).

    Raises:
        WebhookRejected: ``malformed`` when the body is not a Viber callback.
    """
    del url, headers
    callback = _callback(body)
    at = callback.timestamp / 1000.0
    token = None if callback.message_token is None else str(callback.message_token)
    # the user id stays out of the event id: it is personal data, and the token identifies
    # the callback already
    event_id = None if token is None else f"{token}:{callback.event}:{callback.timestamp}"
    match callback.event:
        case "delivered" | "seen" | "failed" if token is None:
            raise WebhookRejected("malformed", f"{callback.event} callback without message_token")
        case "delivered":
            return [
                ProviderReceipt(
                    ReceiptKind.DELIVERED, at, provider_message_id=token, event_id=event_id
                )
            ]
        case "seen":
            return [
                ProviderReceipt(ReceiptKind.READ, at, provider_message_id=token, event_id=event_id)
            ]
        case "failed":
            detail = callback.desc[:256] if callback.desc else None
            return [
                ProviderReceipt(
                    ReceiptKind.FAILED,
                    at,
                    provider_message_id=token,
                    detail=detail,
                    event_id=event_id,
                )
            ]
        case "unsubscribed" if callback.user_id:
            return [
                ProviderReceipt(
                    ReceiptKind.UNSUBSCRIBED, at, detail=callback.user_id, event_id=event_id
                )
            ]
        case "unsubscribed":
            raise WebhookRejected("malformed", "unsubscribed callback without user_id")
        case _:
            return []


# ---------------------------------------------------------------- the adapter
class ViberAdapter:
    """Sends Viber bot messages through one bot account (one auth token)."""

    def __init__(self, name: str, config: ViberSettings, client: HttpClient) -> None:
        if config.auth_token is None:
            raise ConfigError(f"providers.{name}.auth_token: required for viber")
        self.name = name
        self.channel: Channel = CHANNEL
        self.config = config
        self._client = client
        self._auth_token = config.auth_token.reveal()
        self._base_url = config.url or DEFAULT_URL

    async def send(self, outgoing: Outgoing) -> SendReceipt:
        """Send one message.

        Raises:
            gateway.core.errors.ProviderError: see ``parse_response`` and ``map_transport_errors``.
        """
        try:
            request = build_request(
                outgoing, config=self.config, base_url=self._base_url, auth_token=self._auth_token
            )
        except InvalidRequest as exc:
            raise InvalidRequest(str(exc).replace(KIND, self.name, 1), provider=self.name) from exc
        with map_transport_errors(self.name):
            response = await self._client.send(request)
        return parse_response(response, provider=self.name)

    async def set_webhook(self, url: str, *, event_types: tuple[str, ...] = RECEIPT_EVENTS) -> None:
        """Register the gateway's webhook with Viber (Viber calls it once to check it).

        Raises:
            gateway.core.errors.ProviderError: e.g. InvalidRequest for status 1 (invalidUrl).
        """
        request = build_set_webhook_request(
            base_url=self._base_url, auth_token=self._auth_token, url=url, event_types=event_types
        )
        with map_transport_errors(self.name):
            response = await self._client.send(request)
        _answer(response, provider=self.name)

    async def aclose(self) -> None:
        """Nothing to close: the client belongs to the caller."""
