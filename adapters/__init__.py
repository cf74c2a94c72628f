"""Provider adapters: one module per provider API, each small.

An adapter turns an ``Outgoing`` (one message, one channel, one address, content ready to send)
into one provider request and raises a ``ProviderError`` subclass (``gateway.core.errors``) when
it fails, so the dispatcher can retry, fail over, or move the cascade on. Its pure functions
(``build_request``, ``parse_response``, ``parse_webhook``, ``verify_signature``) are testable
without a server; ``send`` is the only coroutine.
"""

from __future__ import annotations

from typing import Protocol

import msgspec

from gateway.core.model import Category, Channel
from gateway.core.receipts import ReceiptKind as ReceiptKind  # part of the adapter interface
from gateway.protocol import EmailContent, PushContent, SmsContent, ViberContent
from gateway.settings import SenderConfig


class Outgoing(msgspec.Struct, frozen=True):
    """Everything one provider request needs; built by the dispatcher from the journalled request.

    ``content`` already has ``{link}`` replaced by the tracked click URL.
    """

    message_key: str
    tenant: str
    channel: Channel
    category: Category
    address: str
    content: PushContent | EmailContent | ViberContent | SmsContent
    brand: str
    sender: SenderConfig
    status_callback_url: str
    link_url: str | None = None
    unsubscribe_url: str | None = None
    open_pixel_url: str | None = None
    campaign: str | None = None
    recipient_id: str | None = None
    """The CRM's id of the recipient; providers that echo custom data (SendGrid
    ``custom_args``) carry it back, so an opt-out resolves to the recipient even after the
    message itself is long gone from the journal."""
    topic: str | None = None
    """The message's consent topic, carried back like ``recipient_id``."""

    @property
    def marketing(self) -> bool:
        return self.category.is_marketing


class SendReceipt(msgspec.Struct, frozen=True):
    provider_message_id: str | None = None


class ProviderReceipt(msgspec.Struct, frozen=True):
    """One fact parsed from a verified webhook.

    ``message_key`` is the gateway's key when the provider carries it back (SendGrid
    custom_args, the Twilio StatusCallback URL, FCM data); otherwise ``provider_message_id``
    (Viber's message_token) and the router resolves it from the ids its sends returned.

    An ``UNSUBSCRIBED`` receipt that names no message (Viber ``unsubscribed``, a Twilio
    inbound STOP) carries the provider-side address in ``detail`` (a Viber user id, a phone
    number): personal data, never logged; the router resolves it to recipients by keyed hash.
    """

    kind: ReceiptKind
    at: float
    message_key: str | None = None
    provider_message_id: str | None = None
    detail: str | None = None
    event_id: str | None = None
    """The provider's own identity of this event (SendGrid ``sg_event_id``, Twilio
    ``MessageSid`` + status, Viber ``message_token`` + event + timestamp): a provider that
    retries a callback sends the same id again, and the gateway applies it once."""
    recipient_id: str | None = None
    """The recipient, when the provider echoed it (SendGrid ``custom_args``)."""
    topic: str | None = None
    """The consent topic, when the provider echoed it."""


class WebhookRejected(Exception):
    """A webhook failed verification; ``verdict`` is the bounded metric label."""

    def __init__(self, verdict: str, detail: str) -> None:
        super().__init__(detail)
        self.verdict = verdict  # "bad_signature" | "stale" | "malformed"


class Adapter(Protocol):
    name: str
    channel: Channel

    async def send(self, outgoing: Outgoing) -> SendReceipt:
        """Make the provider request.

        Raises:
            gateway.core.errors.ProviderError: a subclass saying whether retrying can help.
        """
        ...

    async def aclose(self) -> None: ...
