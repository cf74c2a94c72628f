"""What the HTTP surface hands to the runtime: verified receipts, opt-outs, tracking hits, verdicts.

The one module both sides import (``gateway.http`` and ``gateway.runtime`` never import each
other): the values that cross, and the sink they cross through.

The webhook and tracking endpoints only verify and parse; they never touch router state. They
hand an ``Inbound`` value to an ``InboundSink``: the router's inbox in single-process mode, or
a ZeroMQ DEALER connected to the router's event socket when webhooks run in their own
processes. One path, two wirings, and one scrape still sees every verdict because verdicts
travel the same way.

Two ways to hand something over:

- ``deliver``: the answer promises something (a provider receipt was taken, a person is
  unsubscribed), so it returns only once the router has applied it and the journal has made it
  durable. A provider retries a webhook that was not answered 2xx; a person sees "try again".
- ``notify``: nothing is promised (a click's redirect, the open pixel, a verdict counted).
"""

from __future__ import annotations

import enum
from typing import Protocol

import msgspec

from adapters import ProviderReceipt
from gateway.core.model import Channel


class HitKind(enum.StrEnum):
    CLICK = "click"
    OPEN = "open"
    UNSUBSCRIBE = "unsubscribe"


class WebhookOutcome(enum.StrEnum):
    """What became of a provider webhook request (a metric label)."""

    ACCEPTED = "accepted"
    BAD_SIGNATURE = "bad_signature"
    STALE = "stale"
    MALFORMED = "malformed"
    UNKNOWN_MESSAGE = "unknown_message"


class TrackingVerdict(enum.StrEnum):
    """What became of a click, open or unsubscribe link (a metric label)."""

    ACCEPTED = "accepted"
    BAD_TOKEN = "bad_token"  # noqa: S105 - a verdict, not a credential
    EXPIRED = "expired"
    REPEAT = "repeat"


class WebhookReceipts(msgspec.Struct, frozen=True, tag=True):
    """Receipts parsed from one verified webhook request (each carries its own time)."""

    provider: str
    receipts: list[ProviderReceipt]


class WebhookVerdict(msgspec.Struct, frozen=True, tag=True):
    """A webhook request refused before anything in it was applied."""

    provider: str
    verdict: WebhookOutcome


class TrackingHit(msgspec.Struct, frozen=True, tag=True):
    """A click or open link was used, or any tracking link was refused (``verdict``);
    ``key``/``channel`` are None for a refused token."""

    kind: HitKind
    at: float
    verdict: TrackingVerdict = TrackingVerdict.ACCEPTED
    key: str | None = None
    channel: Channel | None = None


class OptOut(msgspec.Struct, frozen=True, tag=True):
    """A recipient withdrew advertising consent on ``channel`` (``topic``: only that topic).

    Carries everything the withdrawal needs, so it works whether or not the message it came
    through (``key``) is still active or even stored.
    """

    tenant: str
    recipient_id: str
    channel: Channel
    at: float
    source: str
    topic: str | None = None
    key: str | None = None


Inbound = WebhookReceipts | WebhookVerdict | TrackingHit | OptOut


class SinkFull(Exception):
    """Not taken, or not durable in time: answer 503, the provider (or person) retries."""


class InboundSink(Protocol):
    def notify(self, item: Inbound) -> None:
        """Hand over without waiting.

        Raises:
            SinkFull: the router is not taking events right now.
        """
        ...

    async def deliver(self, item: Inbound) -> None:
        """Hand over and return once applied and durable.

        Raises:
            SinkFull: not taken, or not durable within the configured wait.
        """
        ...


encoder = msgspec.msgpack.Encoder()
decoder = msgspec.msgpack.Decoder(Inbound)
