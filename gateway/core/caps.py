"""Frequency caps: sliding windows over what one recipient was sent.

Rule 1: a history is an immutable, time-ordered tuple of sends; checking is a pure function.
Rule 2: this module knows categories and channels, not consent, quiet hours or cascades.

A rule counts *messages*, not cascade steps: a promo that escalated from push to SMS is one
message against "promo <= 3 per 7 days". A rule narrowed to channels counts only messages that
reached those channels. Service messages are exempt from every rule (docs/domain.md).

An entry is inside a rule's window at ``now`` iff ``entry.at + window_seconds > now``; the
time a deferral waits for is computed from the same expression, so the re-check at that time
passes exactly (no float drift between "when" and "whether").
"""

from __future__ import annotations

import enum

import msgspec

from gateway.core.model import Category, Channel


class CapAction(enum.StrEnum):
    REJECT = "reject"
    DEFER = "defer"


class CapRule(msgspec.Struct, frozen=True):
    """At most ``max_count`` messages per ``window_seconds`` per recipient.

    ``categories``/``channels`` narrow the rule; empty means every marketing category / every
    channel.
    """

    name: str
    max_count: int
    window_seconds: float
    categories: frozenset[Category] = frozenset()
    channels: frozenset[Channel] = frozenset()
    action: CapAction = CapAction.REJECT


class SendEntry(msgspec.Struct, frozen=True, gc=False, array_like=True):
    """One cascade step that went out to the recipient."""

    at: float
    message: str
    category: Category
    channel: Channel


class CapHistory(msgspec.Struct, frozen=True, gc=False, array_like=True):
    """A recipient's recent sends, oldest first."""

    entries: tuple[SendEntry, ...] = ()

    def with_entry(self, entry: SendEntry, *, horizon_seconds: float) -> CapHistory:
        """Append ``entry`` and drop what no rule can see any more (older than the horizon)."""
        cutoff = entry.at - horizon_seconds
        kept = tuple(e for e in self.entries if e.at > cutoff)
        if kept and kept[-1].at > entry.at:
            # sends are recorded in clock order; keep the tuple sorted if a caller is late
            return CapHistory(tuple(sorted((*kept, entry), key=lambda e: e.at)))
        return CapHistory((*kept, entry))


class Capped(msgspec.Struct, frozen=True):
    """The verdict when a rule is full: which rule, and when a slot frees up."""

    rule: CapRule
    until: float

    @property
    def action(self) -> CapAction:
        return self.rule.action


def check(
    history: CapHistory,
    rules: tuple[CapRule, ...],
    *,
    message: str,
    category: Category,
    channel: Channel,
    now: float,
) -> Capped | None:
    """Whether one more send of ``message`` on ``channel`` fits every rule at ``now``.

    A message already counted by a rule inside its window passes that rule: the later steps of
    one cascade are the same message. When several rules are full, a rejecting rule wins over a
    deferring one, a message-wide rejecting rule over one narrowed to channels, and otherwise
    the one that frees up last decides.

    Returns:
        ``None`` when the send fits, else the rule that is full and when it frees up.
    """
    entries = history.entries
    if category is Category.SERVICE or not rules or not entries:
        return None
    verdict: Capped | None = None
    for rule in rules:
        categories, channels, window = rule.categories, rule.channels, rule.window_seconds
        if (categories and category not in categories) or (channels and channel not in channels):
            continue
        latest: dict[str, float] = {}
        # the entries this rule counts, spelled out in place: this loop runs for every admission
        for entry in entries:
            if (
                entry.at + window > now
                and entry.category is not Category.SERVICE
                and (not categories or entry.category in categories)
                and (not channels or entry.channel in channels)
            ):
                latest[entry.message] = entry.at  # entries are oldest first: keeps the latest
        if message in latest or len(latest) < rule.max_count:
            continue
        times = sorted(latest.values())
        until = times[len(times) - rule.max_count] + rule.window_seconds
        capped = Capped(rule, until)
        if verdict is None or _worse(capped, verdict):
            verdict = capped
    return verdict


def _worse(candidate: Capped, current: Capped) -> bool:
    if candidate.action is not current.action:
        return candidate.action is CapAction.REJECT
    if candidate.action is CapAction.REJECT and bool(candidate.rule.channels) != bool(
        current.rule.channels
    ):
        # a full message-wide rule refuses the message; a per-channel one only this channel
        return not candidate.rule.channels
    return candidate.until > current.until


def horizon_seconds(rules: tuple[CapRule, ...]) -> float:
    """How far back any rule looks; older entries can be forgotten."""
    return max((rule.window_seconds for rule in rules), default=0.0)
