"""What the HTTP surface hands to the router: verified receipts, tracking hits, verdicts.

The webhook and tracking endpoints only verify and parse; they never touch router state. They
hand an ``Inbound`` value to a sink: the router itself in single-process mode, or a ZeroMQ PUSH
socket to the router's event PULL socket when webhooks run in their own processes. One path, two
wirings, and one scrape still sees every verdict because verdicts travel the same way.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import msgspec

from adapters import ProviderReceipt
from gateway.core.model import Channel


class HitKind(enum.StrEnum):
    CLICK = "click"
    OPEN = "open"
    UNSUBSCRIBE = "unsubscribe"


class WebhookReceipts(msgspec.Struct, frozen=True, tag=True):
    provider: str
    receipts: list[ProviderReceipt]
    at: float


class WebhookVerdict(msgspec.Struct, frozen=True, tag=True):
    provider: str
    verdict: str


class TrackingHit(msgspec.Struct, frozen=True, tag=True):
    """A tracking link was used; ``key``/``channel`` are None for a forged or garbled token."""

    kind: HitKind
    at: float
    key: str | None = None
    channel: Channel | None = None


Inbound = WebhookReceipts | WebhookVerdict | TrackingHit
InboundSink = Callable[[Inbound], None]


class SinkFull(Exception):
    """The router is not taking events right now; providers retry a webhook answered 503."""


encoder = msgspec.msgpack.Encoder()
decoder = msgspec.msgpack.Decoder(Inbound)
