"""The policy engine: may this message go out at all, when, and through which channels.

Rule 1: two pure functions. ``decide`` runs once, when a message arrives; ``gate`` runs before
every cascade step is handed to a provider, because consent, caps and quiet hours may have
changed since (a withdrawal takes effect at once). A refusal is a value carrying a
``RejectReason``, never an exception.
Rule 2: everything the decision depends on arrives as an argument: the envelope, the
recipient's consents and send history, the tenant's rules, ``now`` and the recipient's zone.
The same inputs always give the same decision.

Order of checks in ``decide`` (cheapest and most final first): expired, no address, no
personal-data consent, control group (marketing only), no channel with advertising consent,
then the first step's timing through ``gate``: caps, quiet hours, ``send_at``. A channel the
timing rules out (``Skip``) passes the question to the next one, as the cascade would; a
deferral that would pass the message's TTL expires it instead.
"""

from __future__ import annotations

import enum
from datetime import tzinfo
from typing import assert_never

import msgspec

from gateway.core import caps, quiet_hours, send_windows
from gateway.core.caps import CapAction, CapHistory, CapRule
from gateway.core.consent import ConsentDefaults, ConsentState, advertising_mask
from gateway.core.control_group import ControlGroup
from gateway.core.model import (
    ALL_CHANNELS_MASK,
    Category,
    Channel,
    DeferReason,
    Envelope,
    Lane,
    RejectReason,
)
from gateway.core.quiet_hours import QuietWindow
from gateway.core.send_windows import SendWindows

# Holds can chain (quiet hours end, then a cap is still full, then quiet hours begin again);
# a handful of rounds settles every realistic configuration (send windows add a few: a window
# start in quiet hours, a cap freeing up after the window), and the edge re-checks anyway.
_MAX_HOLD_ROUNDS = 16


class QuietAction(enum.StrEnum):
    DEFER = "defer"  # hold until the window opens (the default: defer, never drop)
    DROP = "drop"
    BYPASS = "bypass"


class QuietRule(msgspec.Struct, frozen=True):
    """A quiet window for some channels and categories (empty sets mean all)."""

    window: QuietWindow
    action: QuietAction = QuietAction.DEFER
    channels: frozenset[Channel] = frozenset()
    categories: frozenset[Category] = frozenset()

    def applies(self, channel: Channel, category: Category) -> bool:
        return (not self.channels or channel in self.channels) and (
            not self.categories or category in self.categories
        )


class WindowRule(msgspec.Struct, frozen=True):
    """Send windows for some marketing categories (empty: every marketing category)."""

    windows: SendWindows
    categories: frozenset[Category] = frozenset()


class PolicyRules(msgspec.Struct, frozen=True):
    """One tenant's rules, as the core needs them (built from the config at start)."""

    consent_defaults: ConsentDefaults = ConsentDefaults()
    control_group: ControlGroup = ControlGroup()
    caps: tuple[CapRule, ...] = ()
    quiet_hours: tuple[QuietRule, ...] = ()
    critical_service_bypasses_quiet_hours: bool = True
    send_windows: tuple[WindowRule, ...] = ()
    variant_windows: tuple[tuple[str, SendWindows], ...] = ()
    """``("{experiment}/{variant}", windows)`` for the experiment variants that set a window."""

    def window(self, envelope: Envelope) -> SendWindows | None:
        """The send windows of a message: its variant's, else its category's first rule's;
        service messages have none (a receipt or a code goes when it is due)."""
        category = envelope.category
        if category is Category.SERVICE:
            return None
        variant = envelope.variant
        if variant is not None:
            for name, windows in self.variant_windows:
                if name == variant:
                    return windows
        for rule in self.send_windows:
            if not rule.categories or category in rule.categories:
                return rule.windows
        return None

    def quiet_rule(self, channel: Channel, category: Category) -> QuietRule | None:
        """The first rule that covers this channel and category; order in the config matters."""
        for rule in self.quiet_hours:
            if rule.applies(channel, category):
                return rule
        return None


class RecipientState(msgspec.Struct, frozen=True, gc=False):
    consents: ConsentState = ConsentState()
    history: CapHistory = CapHistory()


# ---------------------------------------------------------------- admission decisions
class Admit(msgspec.Struct, frozen=True):
    """Send the first step now. ``allowed`` is the consent mask over ``plan``."""

    plan: tuple[Channel, ...]
    allowed: int

    @property
    def channels(self) -> tuple[Channel, ...]:
        return tuple(c for c in self.plan if self.allowed & c.bit)


class Defer(msgspec.Struct, frozen=True):
    """Accept now, send the first step at ``until``."""

    plan: tuple[Channel, ...]
    allowed: int
    until: float
    why: DeferReason

    @property
    def channels(self) -> tuple[Channel, ...]:
        return tuple(c for c in self.plan if self.allowed & c.bit)


class Reject(msgspec.Struct, frozen=True):
    reason: RejectReason
    detail: str


Decision = Admit | Defer | Reject


# ---------------------------------------------------------------- pre-send gate verdicts
# What the router does with each verdict (gateway/runtime/feedback.py runs ``gate`` just before
# a step goes to a provider; ``decide`` asks the same question of the first steps on arrival):
class Go(msgspec.Struct, frozen=True):
    """Send the step now; the router counts it against the caps."""


class Hold(msgspec.Struct, frozen=True):
    """Not before ``until``: the router publishes ``deferred`` (``why``) and the cascade waits
    (``StepDeferred``) on the same channel. On arrival: ``Defer`` to ``until``."""

    until: float
    why: DeferReason


class Skip(msgspec.Struct, frozen=True):
    """Not on this channel; the cascade may try the next one.

    The router publishes ``skipped`` (``reason``) and the cascade moves on to the next allowed
    channel (``StepSkipped``), or ends ``exhausted`` when none is left. On arrival ``decide``
    does the same: the message is admitted on the rest of the plan and refused only when every
    channel is skipped.
    """

    reason: RejectReason


class Stop(msgspec.Struct, frozen=True):
    """Not at all; the cascade ends.

    The router ends it ``expired`` (``EXPIRED``), ``unsubscribed`` (``NO_CONSENT``: a consent
    went while the step waited) or ``dropped`` (anything else: a full message-wide rejecting
    cap). On arrival: ``Reject`` with ``reason``.
    """

    reason: RejectReason


Verdict = Go | Hold | Skip | Stop

GO = Go()


def decide(
    envelope: Envelope,
    recipient: RecipientState,
    rules: PolicyRules,
    *,
    message: str,
    now: float,
    tz: tzinfo,
) -> Decision:
    """Decide what happens to a newly arrived message.

    Args:
        envelope: the policy-relevant facts of the message; ``channels`` has addresses only.
        recipient: the recipient's consents and recent sends.
        rules: the tenant's policy rules.
        message: the message key (caps count messages, not steps).
        now: POSIX seconds.
        tz: the recipient's time zone, resolved by the caller.

    Returns:
        ``Admit`` (send the first step now), ``Defer`` (accepted, first step later) or
        ``Reject`` with the reason.
    """
    if envelope.expires_at is not None and envelope.expires_at <= now:
        return Reject(RejectReason.EXPIRED, "expires_at is not in the future")
    if not envelope.channels:
        return Reject(
            RejectReason.NO_CHANNEL,
            "the recipient has no address for any channel of the cascade order",
        )
    defaults = rules.consent_defaults
    consents = recipient.consents
    if not consents.personal_data(defaults):
        return Reject(RejectReason.NO_CONSENT, "the recipient withdrew personal-data consent")
    plan = envelope.channels
    if envelope.category is Category.SERVICE:
        allowed = ALL_CHANNELS_MASK  # service needs only the personal-data consent, checked above
    else:
        if rules.control_group.holds_out(envelope.tenant, envelope.recipient_id, now=now):
            return Reject(RejectReason.HOLDOUT, "the recipient is in this period's control group")
        allowed = advertising_mask(consents, topic=envelope.topic, defaults=defaults)
    candidates = [channel for channel in plan if allowed & channel.bit]
    if not candidates:
        names = ", ".join(plan)
        return Reject(
            RejectReason.NO_CONSENT,
            f"no advertising consent on {names} for topic {envelope.topic!r}",
        )

    at = now if envelope.send_at is None else max(now, envelope.send_at)
    why = DeferReason.SEND_AT
    index = holds = 0
    reopens: float | None = None  # when the first channel a quiet rule dropped opens again
    while holds < _MAX_HOLD_ROUNDS:
        # consent for the candidate was just established: only caps and quiet hours remain
        channel = candidates[index]
        verdict = _timing(
            envelope, recipient, rules, message=message, channel=channel, now=at, tz=tz
        )
        match verdict:
            case Go():
                break
            case Hold(until=until, why=hold_why):
                # a later instant may open the channels skipped so far: start over from the
                # first one there, as the cascade will. A channel a quiet rule dropped may open
                # before this one: then the message waits only for that (email after its
                # night-time drop, not push after its longer deferral)
                if reopens is not None and reopens < until:
                    until, hold_why = reopens, DeferReason.QUIET_HOURS
                at, why, index, holds, reopens = until, hold_why, 0, holds + 1, None
            case Skip(reason=reason):
                # not this channel now (a per-channel cap, a dropping quiet rule): the cascade
                # starts with it and the pre-send check skips it, so the message goes on the
                # rest of the plan; only when no channel is left is it refused (issue #15)
                if reason is RejectReason.QUIET_HOURS:
                    opening = _quiet_opening(envelope, rules, channel=channel, now=at, tz=tz)
                    if reopens is None or opening < reopens:
                        reopens = opening
                index += 1
                if index == len(candidates):
                    return Reject(reason, _skip_detail(reason, envelope, candidates))
            case Stop(reason=reason):
                return Reject(reason, _STOP_DETAILS.get(reason, str(reason)))
            case _:
                assert_never(verdict)
    if at > now:
        return Defer(plan, allowed, at, why)
    return Admit(plan, allowed)


def _skip_detail(reason: RejectReason, envelope: Envelope, channels: list[Channel]) -> str:
    names = ", ".join(channels)
    if reason is RejectReason.QUIET_HOURS:
        return f"quiet hours drop {envelope.category} messages on {names}"
    return f"a frequency cap for this recipient is full on {names}"


_STOP_DETAILS = {
    RejectReason.EXPIRED: "the first send would fall after expires_at",
    RejectReason.CAPPED: "a frequency cap for this recipient is full",
    RejectReason.NO_CONSENT: "no consent for this channel",
}


def gate(
    envelope: Envelope,
    recipient: RecipientState,
    rules: PolicyRules,
    *,
    message: str,
    channel: Channel,
    now: float,
    tz: tzinfo,
) -> Verdict:
    """Check one cascade step just before it goes to a provider.

    Returns:
        ``Go``; ``Hold(until)`` for quiet hours or a deferring cap; ``Skip`` when this channel
        may not be used but the next may (a per-channel cap, a dropping quiet rule); ``Stop``
        when the message may not go at all: expired, a full message cap, or consent gone (for
        personal data, or advertising on this channel: a withdrawal reaching the step in use
        ends the cascade as ``unsubscribed``, exactly as it would have had it come a moment
        earlier, while the step waited).
    """
    expires_at = envelope.expires_at
    if expires_at is not None and now >= expires_at:
        return Stop(RejectReason.EXPIRED)
    defaults = rules.consent_defaults
    consents = recipient.consents
    if not consents.personal_data(defaults):
        return Stop(RejectReason.NO_CONSENT)
    category = envelope.category
    if category is not Category.SERVICE and not consents.advertising(
        channel, envelope.topic, defaults
    ):
        return Stop(RejectReason.NO_CONSENT)
    return _timing(envelope, recipient, rules, message=message, channel=channel, now=now, tz=tz)


def _timing(
    envelope: Envelope,
    recipient: RecipientState,
    rules: PolicyRules,
    *,
    message: str,
    channel: Channel,
    now: float,
    tz: tzinfo,
) -> Verdict:
    """Caps, quiet hours and send windows for a step whose consent is already established."""
    expires_at = envelope.expires_at
    if expires_at is not None and now >= expires_at:
        return Stop(RejectReason.EXPIRED)
    capped = caps.check(
        recipient.history,
        rules.caps,
        message=message,
        category=envelope.category,
        channel=channel,
        now=now,
    )
    if capped is not None:
        if capped.action is CapAction.REJECT:
            return Skip(RejectReason.CAPPED) if capped.rule.channels else Stop(RejectReason.CAPPED)
        return _within_ttl(Hold(capped.until, DeferReason.CAPPED), expires_at)
    quiet = _quiet_verdict(envelope, rules, channel=channel, now=now, tz=tz)
    if isinstance(quiet, Hold):
        return _within_ttl(quiet, expires_at)
    if not isinstance(quiet, Go) or not (rules.send_windows or rules.variant_windows):
        return quiet
    windows = rules.window(envelope)
    if windows is not None:
        # outside the windows: the next window start. ``decide`` re-checks caps and quiet
        # hours there, so a window start in quiet hours or over a cap moves on again
        opening = send_windows.next_start(windows, now, tz)
        if opening is not None:
            return _within_ttl(Hold(opening, DeferReason.SEND_WINDOW), expires_at)
    return quiet


def _within_ttl(hold: Hold, expires_at: float | None) -> Hold | Stop:
    """A deferral that would pass the message's TTL expires it instead."""
    if expires_at is not None and hold.until >= expires_at:
        return Stop(RejectReason.EXPIRED)
    return hold


def _quiet_opening(
    envelope: Envelope, rules: PolicyRules, *, channel: Channel, now: float, tz: tzinfo
) -> float:
    """When the quiet rule that dropped ``channel`` at ``now`` lets it through again."""
    rule = rules.quiet_rule(channel, envelope.category)
    assert rule is not None  # it just dropped the channel
    return quiet_hours.next_open(rule.window, now, tz)


def _quiet_verdict(
    envelope: Envelope, rules: PolicyRules, *, channel: Channel, now: float, tz: tzinfo
) -> Verdict:
    if (
        rules.critical_service_bypasses_quiet_hours
        and envelope.lane is Lane.CRITICAL
        and envelope.category is Category.SERVICE
    ):
        return GO
    rule = rules.quiet_rule(channel, envelope.category)
    if rule is None or rule.action is QuietAction.BYPASS:
        return GO
    opening = quiet_hours.quiet_until(rule.window, now, tz)
    if opening is None:
        return GO
    if rule.action is QuietAction.DROP:
        return Skip(RejectReason.QUIET_HOURS)
    return Hold(opening, DeferReason.QUIET_HOURS)
