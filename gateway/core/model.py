"""The vocabulary of the gateway: channels, categories, lanes and identifiers.

Rule 1: this module knows nothing about wires, stores or clocks; it only names things.
Rule 2: every enum here is also a bounded metric label, so members are never added casually.

Time in the core is always ``now: float``, POSIX seconds (UTC), passed in by the runtime.
One kind of time keeps persisted timers valid across restarts and lets trio's MockClock drive
everything in tests (the runtime derives ``now`` from ``trio.current_time()``).
"""

from __future__ import annotations

import enum
from typing import Final, NewType

import msgspec

MessageKey = NewType("MessageKey", str)
"""``"{tenant}:{message_id}"``; tenant names cannot contain ``:``, so the split is unambiguous."""
RecipientKey = NewType("RecipientKey", str)
"""``"{tenant}:{recipient_id}"``: consents, caps and the control group are per tenant."""


def message_key(tenant: str, message_id: str) -> MessageKey:
    return MessageKey(f"{tenant}:{message_id}")


def recipient_key(tenant: str, recipient_id: str) -> RecipientKey:
    return RecipientKey(f"{tenant}:{recipient_id}")


def split_key(key: str) -> tuple[str, str]:
    """Split a message or recipient key back into ``(tenant, id)``."""
    tenant, _, rest = key.partition(":")
    return tenant, rest


class Channel(enum.StrEnum):
    """Delivery channels, declared cheapest first."""

    PUSH = "push"
    EMAIL = "email"
    VIBER = "viber"
    SMS = "sms"

    @property
    def bit(self) -> int:
        """This channel's bit in a channel mask (masks keep cascade state small)."""
        return _CHANNEL_BITS[self]

    @property
    def has_read_signal(self) -> bool:
        """SMS reports delivery only; the others can tell us the message was read."""
        return self is not Channel.SMS

    @property
    def reports_delivery(self) -> bool:
        """FCM accepts a push and never confirms delivery: push deliverability is unknown,
        never zero, and opens (the app, clicks) are push's only signal."""
        return self is not Channel.PUSH


ALL_CHANNELS: Final = tuple(Channel)
DEFAULT_CASCADE: Final = (Channel.PUSH, Channel.EMAIL, Channel.VIBER, Channel.SMS)
_CHANNEL_BITS: Final = {channel: 1 << index for index, channel in enumerate(ALL_CHANNELS)}
ALL_CHANNELS_MASK: Final = (1 << len(ALL_CHANNELS)) - 1


class Category(enum.StrEnum):
    """What the CRM is sending; decides which consents and limits apply (docs/domain.md)."""

    SERVICE = "service"
    INFORMATIONAL = "informational"
    CONTENT = "content"
    PROMO = "promo"

    @property
    def is_marketing(self) -> bool:
        """Everything but service needs advertising consent and may be held out or capped."""
        return self is not Category.SERVICE


class Lane(enum.StrEnum):
    """Priority lanes, highest first: a million-message promo never delays an OTP."""

    CRITICAL = "critical"
    NORMAL = "normal"
    BULK = "bulk"


LANES_BY_PRIORITY: Final = (Lane.CRITICAL, Lane.NORMAL, Lane.BULK)


class Outcome(enum.StrEnum):
    """How a cascade ended. Terminal and final."""

    READ = "read"
    CLICKED = "clicked"
    CONVERTED = "converted"
    DELIVERED = "delivered"  # a channel without read signal (SMS) confirmed delivery
    EXHAUSTED = "exhausted"  # every step was tried (unread, failed or skipped)
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    UNSUBSCRIBED = "unsubscribed"  # consent withdrawn while the cascade ran
    NO_CHANNEL = "no_channel"  # nothing left to try at start
    HOLDOUT = "holdout"  # never sent: the recipient is in the control group (kept for reports)
    DROPPED = "dropped"  # a policy check before the first send dropped it (a rejecting cap)


class RejectReason(enum.StrEnum):
    """Why a request was refused; machine-readable, and a bounded metric label."""

    INVALID = "invalid"
    NO_CONSENT = "no_consent"
    HOLDOUT = "holdout"
    CAPPED = "capped"
    NO_CHANNEL = "no_channel"
    EXPIRED = "expired"
    OVERLOADED = "overloaded"
    UNKNOWN_TENANT = "unknown_tenant"
    QUIET_HOURS = "quiet_hours"  # the quiet-hours rule for this channel and category says drop
    NOT_FOUND = "not_found"  # cancel/event/status for a message id the gateway never accepted
    UNAUTHORIZED = "unauthorized"  # the client's key may not act for this tenant
    CONFLICT = "conflict"  # a message id reused with a different request


class DeferReason(enum.StrEnum):
    SEND_AT = "send_at"
    QUIET_HOURS = "quiet_hours"
    CAPPED = "capped"
    SEND_WINDOW = "send_window"  # outside the message's send windows: waits for the next one


class TimerKind(enum.StrEnum):
    """A cascade holds at most one timer of each kind."""

    STEP = "step"  # unread timeout of the current step, or a deferral before sending it
    EXPIRY = "expiry"  # the message's TTL


class Envelope(msgspec.Struct, frozen=True, gc=False):
    """The facts about one message that the policy engine needs; no content, no addresses.

    ``channels`` is the cascade order (requested or tenant default) already reduced to the
    channels the recipient has an address for, so an empty tuple means "nowhere to send".
    """

    tenant: str
    recipient_id: str
    category: Category
    topic: str
    lane: Lane
    channels: tuple[Channel, ...]
    send_at: float | None = None
    expires_at: float | None = None
    variant: str | None = None
    """``"{experiment}/{variant}"`` when an experiment assigned the message a variant: the
    variant's send window (``PolicyRules.variant_windows``) then applies instead of the
    category's."""

    def outside_experiments(self) -> Envelope:
        """This envelope without its experiment variant (a held-out message has none)."""
        return msgspec.structs.replace(self, variant=None)
