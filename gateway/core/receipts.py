"""What a fact about a sent message means to its cascade: one table.

Facts come from three places: provider webhooks (delivered, failed, bounced, and where the
provider sees them, read and clicked), the gateway's own tracker (a click, an email open) and
the CRM (``event`` op: opened, clicked, converted). Whatever the source, a fact goes on the
message's timeline as itself and reaches the cascade as the event below. Opt-outs reported by
providers are not facts of the message: they change consent (``gateway.core.consent``).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from gateway.core.cascade import CascadeEvent, Clicked, Converted, Delivered, Read, SendFailed
from gateway.core.model import Channel


class ReceiptKind(enum.StrEnum):
    """What a provider webhook (or the simulated app) reports about a sent message."""

    DELIVERED = "delivered"
    READ = "read"  # email open, Viber "seen", push opened
    CLICKED = "clicked"
    FAILED = "failed"  # undelivered, rejected after acceptance
    BOUNCED = "bounced"
    UNSUBSCRIBED = "unsubscribed"  # the recipient opted out with the provider
    SPAM_REPORT = "spam_report"  # treated as an unsubscribe: never mail them promos again


class Fact(enum.StrEnum):
    """A fact on a message's timeline (the status event's ``kind``)."""

    DELIVERED = "delivered"
    READ = "read"
    CLICKED = "clicked"
    CONVERTED = "converted"
    FAILED = "failed"


OPT_OUTS: Final = frozenset({ReceiptKind.UNSUBSCRIBED, ReceiptKind.SPAM_REPORT})
"""Provider receipts that withdraw advertising consent instead of being facts."""

PROVIDER_FACTS: Final[Mapping[ReceiptKind, Fact]] = MappingProxyType(
    {
        ReceiptKind.DELIVERED: Fact.DELIVERED,
        ReceiptKind.READ: Fact.READ,
        ReceiptKind.CLICKED: Fact.CLICKED,
        ReceiptKind.FAILED: Fact.FAILED,
        ReceiptKind.BOUNCED: Fact.FAILED,  # for the cascade a bounce is a failed step
    }
)
"""Every provider receipt that is not an opt-out, as the fact it is."""


def cascade_event(fact: Fact, channel: Channel | None) -> CascadeEvent | None:
    """The event the cascade gets for ``fact`` on ``channel``; None when it gets none.

    A conversion ends the cascade wherever it came from. Every other fact is about one
    channel's step, so without a channel (a CRM event for a message that had not been sent
    yet) it only goes on the timeline. A failure reported after the provider took the step
    (an undelivered SMS, a bounce) is permanent: retrying the same address will not help.
    """
    if fact is Fact.CONVERTED:
        return Converted()
    if channel is None:
        return None
    if fact is Fact.FAILED:
        return SendFailed(channel, permanent=True)
    return _ENGAGEMENT[fact](channel)


_ENGAGEMENT: Final[Mapping[Fact, type[Delivered] | type[Read] | type[Clicked]]] = MappingProxyType(
    {Fact.DELIVERED: Delivered, Fact.READ: Read, Fact.CLICKED: Clicked}
)
