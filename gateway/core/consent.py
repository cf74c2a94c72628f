"""Consent: what a recipient has agreed to, and what that allows per channel and topic.

Rule 1: consent is data. A recipient's state is the latest record per scope; resolving a
question ("may we advertise on email about promos?") is a pure function of that state.
Rule 2: this module does not know about messages, cascades or storage.

Two consents exist (152-FZ, 38-FZ): to processing personal data (needed for every message,
service included) and to receiving advertising, given or withdrawn per channel and per topic.
A record's scope may be broad (every channel, every topic) or narrow (email + "promo").
The latest record that covers a question wins; on equal timestamps the narrower scope wins,
and on a full tie withdrawal wins, because ignoring an unsubscribe is the fineable mistake.
"""

from __future__ import annotations

import enum

import msgspec

from gateway.core.model import ALL_CHANNELS, ALL_CHANNELS_MASK, Channel


class ConsentKind(enum.StrEnum):
    PERSONAL_DATA = "personal_data"
    ADVERTISING = "advertising"


class ConsentAction(enum.StrEnum):
    GRANT = "grant"
    WITHDRAW = "withdraw"


class ConsentRecord(msgspec.Struct, frozen=True, gc=False, array_like=True):
    """One grant or withdrawal, as the customer gave it.

    ``channel``/``topic`` of ``None`` mean "all"; personal-data records are never narrowed.
    ``at`` is when the customer acted (POSIX seconds), ``source`` who reported it (CRM, web
    form, one-click unsubscribe, provider webhook), ``reason`` the customer's words if any.
    """

    kind: ConsentKind
    action: ConsentAction
    at: float
    source: str
    channel: Channel | None = None
    topic: str | None = None
    reason: str | None = None

    @property
    def scope(self) -> tuple[ConsentKind, Channel | None, str | None]:
        return (self.kind, self.channel, self.topic)

    @property
    def specificity(self) -> int:
        return (self.channel is not None) + (self.topic is not None)

    def covers(self, kind: ConsentKind, channel: Channel, topic: str) -> bool:
        return (
            self.kind is kind
            and (self.channel is None or self.channel is channel)
            and (self.topic is None or self.topic == topic)
        )


class ConsentDefaults(msgspec.Struct, frozen=True):
    """What "never asked" means, per tenant (by default, unknown = no advertising consent)."""

    personal_data: bool = True
    advertising: bool = False


def _precedence(record: ConsentRecord) -> tuple[float, int, int]:
    # later wins; then narrower; then withdrawal (see the module docstring)
    return (record.at, record.specificity, record.action is ConsentAction.WITHDRAW)


class ConsentState(msgspec.Struct, frozen=True, gc=False, array_like=True):
    """The effective records of one recipient: the latest per scope.

    The full history is kept by the store; this value is what decisions need.
    """

    records: tuple[ConsentRecord, ...] = ()

    def with_record(self, record: ConsentRecord) -> ConsentState:
        """Return the state after ``record``; an older record for the same scope changes nothing.

        A broad record supersedes narrower ones that are not newer: "withdraw everything" at t
        must not be undone by a narrow grant from before t.
        """
        kept: list[ConsentRecord] = []
        for existing in self.records:
            if existing.scope == record.scope:
                if _precedence(existing) >= _precedence(record):
                    return self
                continue
            if (
                existing.kind is record.kind
                and _within(existing, record)
                and existing.at < record.at
            ):
                continue
            kept.append(existing)
        kept.append(record)
        return ConsentState(tuple(kept))

    def personal_data(self, defaults: ConsentDefaults) -> bool:
        latest = self._latest(ConsentKind.PERSONAL_DATA, None, None)
        if latest is None:
            return defaults.personal_data
        return latest.action is ConsentAction.GRANT

    def advertising(self, channel: Channel, topic: str, defaults: ConsentDefaults) -> bool:
        latest = self._latest(ConsentKind.ADVERTISING, channel, topic)
        if latest is None:
            return defaults.advertising
        return latest.action is ConsentAction.GRANT

    def _latest(
        self, kind: ConsentKind, channel: Channel | None, topic: str | None
    ) -> ConsentRecord | None:
        best: ConsentRecord | None = None
        for record in self.records:
            if record.kind is not kind:
                continue
            if kind is ConsentKind.ADVERTISING:
                assert channel is not None
                assert topic is not None
                if not record.covers(kind, channel, topic):
                    continue
            if best is None or _precedence(record) > _precedence(best):
                best = record
        return best


def _within(narrow: ConsentRecord, broad: ConsentRecord) -> bool:
    """Whether ``narrow``'s scope lies inside ``broad``'s (``None`` = all)."""
    return (broad.channel is None or broad.channel is narrow.channel) and (
        broad.topic is None or broad.topic == narrow.topic
    )


def allowed_mask(
    state: ConsentState,
    *,
    marketing: bool,
    topic: str,
    defaults: ConsentDefaults,
) -> int:
    """The channel mask consent allows for one message (see ``Channel.bit``).

    Service messages need only the personal-data consent; marketing needs both.
    """
    if not state.personal_data(defaults):
        return 0
    if not marketing:
        return ALL_CHANNELS_MASK
    return advertising_mask(state, topic=topic, defaults=defaults)


def advertising_mask(state: ConsentState, *, topic: str, defaults: ConsentDefaults) -> int:
    """The channels with advertising consent for ``topic``, ignoring personal-data consent.

    Equivalent to asking ``ConsentState.advertising`` per channel, in one pass over the records
    (this runs for every message admitted, so it avoids building precedence tuples).
    """
    records = state.records
    if not records:
        return ALL_CHANNELS_MASK if defaults.advertising else 0
    best: list[ConsentRecord | None] = [None] * len(ALL_CHANNELS)
    for record in records:
        if record.kind is not ConsentKind.ADVERTISING or (
            record.topic is not None and record.topic != topic
        ):
            continue
        indexes = _ALL_INDEXES if record.channel is None else (_INDEX[record.channel],)
        for index in indexes:
            current = best[index]
            if current is None or _outranks(record, current):
                best[index] = record
    mask = 0
    for index, channel in enumerate(ALL_CHANNELS):
        winner = best[index]
        if defaults.advertising if winner is None else winner.action is ConsentAction.GRANT:
            mask |= channel.bit
    return mask


def _outranks(record: ConsentRecord, other: ConsentRecord) -> bool:
    """``_precedence(record) > _precedence(other)``, without building the tuples."""
    if record.at != other.at:
        return record.at > other.at
    specificity, other_specificity = record.specificity, other.specificity
    if specificity != other_specificity:
        return specificity > other_specificity
    return record.action is ConsentAction.WITHDRAW and other.action is not ConsentAction.WITHDRAW


_INDEX = {channel: index for index, channel in enumerate(ALL_CHANNELS)}
_ALL_INDEXES = tuple(range(len(ALL_CHANNELS)))
