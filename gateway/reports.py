"""Campaign reports: the marketer's funnel, per variant and channel, with the control group.

The formulas are docs/domain.md's: deliverability = delivered / sent; open rate = opens /
delivered; click rate = unique clicks / delivered; conversion = conversions / delivered;
unsubscribe rate = unsubscribes / delivered. Push reports no delivery (FCM accepts and never
confirms), so its deliverability is unknown (``None``), never 0, and its rates are per message
sent: the rates' base is "delivered, or sent where delivery is never reported" (``reached``),
which is also what totals over several channels use. Counts are distinct messages; cost counts every provider request
(a resend after a crash is paid for twice). The incremental effect compares the conversion of
treated recipients with that of the control group, whose messages were never sent but whose
purchases the CRM reports like anyone else's (``event`` op, ``converted``).

The experiment report (``build_experiment``) puts an experiment's variants side by side: per
variant the funnel, cost, cost per conversion and the conversion rate (converted messages /
messages assigned) with its Wilson 95 % interval, and the difference to the first variant with
its 95 % interval (Newcombe's hybrid score interval) and p-value (two-proportion z-test, pooled
error; ``gateway.core.stats``). The campaign report gives the same ``lift`` for treated
against control.

Pure: rows in, report out; the journal supplies the rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

from gateway.core import stats
from gateway.core.model import Channel

_NO_VARIANT = "-"


class ChannelFigures(msgspec.Struct):
    sent: int = 0
    sent_with_delivery_reports: int = 0
    """Sent on channels whose providers report delivery (all but push)."""
    delivered: int | None = 0
    """None on a channel whose providers never report delivery (push): unknown, not zero."""
    opened: int = 0
    clicked: int = 0
    converted: int = 0
    unsubscribed: int = 0
    failed: int = 0
    cost: float = 0.0
    deliverability: float | None = None
    open_rate: float | None = None
    click_rate: float | None = None
    conversion_rate: float | None = None
    unsubscribe_rate: float | None = None

    def with_rates(self) -> ChannelFigures:
        delivered = self.delivered or 0
        # delivered, or sent where delivery is never reported (push)
        reached = delivered + self.sent - self.sent_with_delivery_reports
        return msgspec.structs.replace(
            self,
            cost=round(self.cost, 6),
            deliverability=_ratio(delivered, self.sent_with_delivery_reports),
            open_rate=_ratio(self.opened, reached),
            click_rate=_ratio(self.clicked, reached),
            conversion_rate=_ratio(self.converted, reached),
            unsubscribe_rate=_ratio(self.unsubscribed, reached),
        )


class Group(msgspec.Struct):
    size: int = 0
    converted: int = 0
    conversion_rate: float | None = None


class Lift(msgspec.Struct):
    """A difference of conversion rates (an arm minus its baseline), as fractions."""

    estimate: float
    interval: list[float]
    """95 % interval ``[low, high]``: Newcombe's hybrid score interval."""
    p_value: float
    """Two-sided, two-proportion z-test with the pooled standard error."""


def lift(successes: int, trials: int, base_successes: int, base_trials: int) -> Lift | None:
    found = stats.difference(successes, trials, base_successes, base_trials)
    if found is None:
        return None
    interval = found.interval
    return Lift(
        round(found.estimate, 6),
        [round(interval.low, 6), round(interval.high, 6)],
        round(found.p_value, 6),
    )


class VariantReport(msgspec.Struct):
    channels: dict[str, ChannelFigures]
    total: ChannelFigures
    treated: Group
    control: Group
    incremental_conversion: float | None
    """Treated minus control conversion rate (a difference of fractions)."""
    lift: Lift | None
    """``incremental_conversion`` with its 95 % interval and p-value (None without both)."""
    cost: float
    sms_equivalent_cost: float
    """What the treated messages would have cost as SMS to everyone."""
    savings: float


class CampaignReport(msgspec.Struct):
    tenant: str
    campaign: str
    currency: str
    variants: dict[str, VariantReport]
    total: VariantReport


_FIELDS = {
    "sent": "sent",
    "delivered": "delivered",
    "read": "opened",
    "clicked": "clicked",
    "converted": "converted",
    "unsubscribed": "unsubscribed",
    "failed": "failed",
}


def build(
    *,
    tenant: str,
    campaign: str,
    currency: str,
    message_rows: Iterable[tuple[Any, ...]],
    event_rows: Iterable[tuple[Any, ...]],
    prices: Mapping[str, float],
    sms_price: float,
) -> CampaignReport:
    """Assemble the report from the journal's aggregate rows (see ``campaign_rows``)."""
    sizes: dict[str, Group] = {}
    control: dict[str, Group] = {}
    for variant, outcome, count in message_rows:
        name = variant or _NO_VARIANT
        target = control if outcome == "holdout" else sizes
        target.setdefault(name, Group()).size += count
    channels: dict[str, dict[str, ChannelFigures]] = {}
    for variant, held_out, channel, kind, provider, events, distinct in event_rows:
        name = variant or _NO_VARIANT
        if kind == "converted":
            target = control if held_out else sizes
            target.setdefault(name, Group()).converted += distinct
        if held_out or channel is None:
            continue
        field = _FIELDS.get(kind)
        figures = channels.setdefault(name, {}).setdefault(channel, ChannelFigures())
        if field is not None:
            setattr(figures, field, getattr(figures, field) + distinct)
        if kind == "sent":
            figures.cost += events * prices.get(provider or "", 0.0)
            if _reports_delivery(channel):
                figures.sent_with_delivery_reports += distinct
    names = sorted(set(sizes) | set(control) | set(channels))
    variants = {
        name: _variant(
            channels.get(name, {}), sizes.get(name, Group()), control.get(name, Group()), sms_price
        )
        for name in names
    }
    overall = _variant(
        _sum_channels(channels.values()),
        _sum_groups(sizes.values()),
        _sum_groups(control.values()),
        sms_price,
    )
    return CampaignReport(tenant, campaign, currency, variants, overall)


def _variant(
    channels: Mapping[str, ChannelFigures], treated: Group, control: Group, sms_price: float
) -> VariantReport:
    total = ChannelFigures()
    for figures in channels.values():
        _add(total, figures)
    treated = Group(treated.size, treated.converted, _ratio(treated.converted, treated.size))
    control = Group(control.size, control.converted, _ratio(control.converted, control.size))
    incremental = (
        None
        if treated.conversion_rate is None or control.conversion_rate is None
        else round(treated.conversion_rate - control.conversion_rate, 6)
    )
    baseline = round(treated.size * sms_price, 6)
    cost = round(total.cost, 6)
    return VariantReport(
        channels={name: _shown(name, figures) for name, figures in sorted(channels.items())},
        total=total.with_rates(),
        treated=treated,
        control=control,
        incremental_conversion=incremental,
        lift=lift(treated.converted, treated.size, control.converted, control.size),
        cost=cost,
        sms_equivalent_cost=baseline,
        savings=round(baseline - cost, 6),
    )


def _shown(channel: str, figures: ChannelFigures) -> ChannelFigures:
    """A channel's figures with its rates; a delivery count it cannot have is unknown."""
    shown = figures.with_rates()
    if not _reports_delivery(channel):
        shown = msgspec.structs.replace(shown, delivered=None)
    return shown


def _sum_channels(per_variant: Iterable[Mapping[str, ChannelFigures]]) -> dict[str, ChannelFigures]:
    summed: dict[str, ChannelFigures] = {}
    for channels in per_variant:
        for name, figures in channels.items():
            _add(summed.setdefault(name, ChannelFigures()), figures)
    return summed


_COUNTED = (
    "sent",
    "sent_with_delivery_reports",
    "delivered",
    "opened",
    "clicked",
    "converted",
    "unsubscribed",
    "failed",
    "cost",
)


def _add(into: ChannelFigures, figures: ChannelFigures) -> None:
    for field in _COUNTED:
        setattr(into, field, (getattr(into, field) or 0) + (getattr(figures, field) or 0))


def _sum_groups(groups: Iterable[Group]) -> Group:
    total = Group()
    for group in groups:
        total.size += group.size
        total.converted += group.converted
    return total


def _reports_delivery(channel: str) -> bool:
    try:
        return Channel(channel).reports_delivery
    except ValueError:  # a channel this version does not know: assume it reports
        return True


def _ratio(numerator: int, denominator: int) -> float | None:
    return None if denominator == 0 else round(numerator / denominator, 6)


# ---------------------------------------------------------------- experiments
class Method(msgspec.Struct):
    """The statistics used, in words (a report read months later must say how it was made)."""

    conversion_rate: str = "converted messages / messages assigned to the variant"
    interval: str = "Wilson score interval, 95 %"
    difference: str = (
        "variant minus the first variant; 95 % interval: Newcombe's hybrid score interval "
        "(from the two Wilson intervals); two-sided p-value: two-proportion z-test, pooled "
        "standard error"
    )
    caveats: str = (
        "valid for a sample size fixed in advance and read once: stopping when p dips below "
        "0.05 (peeking) inflates false positives; normal approximation, rough below ~5 "
        "conversions or non-conversions per variant"
    )


class Arm(msgspec.Struct):
    messages: int
    """Messages assigned to the variant (held-out recipients are in no variant)."""
    channels: dict[str, ChannelFigures]
    """The funnel per channel: sent, delivered, opened, clicked, converted, unsubscribed."""
    total: ChannelFigures
    converted: int
    conversion_rate: float | None
    conversion_interval: list[float] | None
    cost: float
    cost_per_conversion: float | None
    difference: Lift | None
    """Conversion rate minus the first variant's (None for the first variant itself)."""


class ExperimentReport(msgspec.Struct):
    tenant: str
    experiment: str
    currency: str
    baseline: str
    """The first variant in the config: every difference is against it."""
    method: Method
    variants: dict[str, Arm]


def build_experiment(
    *,
    tenant: str,
    experiment: str,
    variants: list[str],
    currency: str,
    message_rows: Iterable[tuple[Any, ...]],
    event_rows: Iterable[tuple[Any, ...]],
    prices: Mapping[str, float],
    sms_price: float,
) -> ExperimentReport:
    """Assemble the experiment report from ``experiment_rows``; ``variants`` in config order."""
    campaign = build(
        tenant=tenant,
        campaign=experiment,
        currency=currency,
        message_rows=message_rows,
        event_rows=event_rows,
        prices=prices,
        sms_price=sms_price,
    )
    empty = _variant({}, Group(), Group(), sms_price)
    reports = {name: campaign.variants.get(f"{experiment}/{name}", empty) for name in variants}
    first = reports[variants[0]].treated
    arms = {}
    for index, (name, report) in enumerate(reports.items()):
        treated = report.treated
        interval = stats.wilson(treated.converted, treated.size)
        arms[name] = Arm(
            messages=treated.size,
            channels=report.channels,
            total=report.total,
            converted=treated.converted,
            conversion_rate=treated.conversion_rate,
            conversion_interval=None
            if interval is None
            else [round(interval.low, 6), round(interval.high, 6)],
            cost=report.cost,
            cost_per_conversion=None
            if not treated.converted
            else round(report.cost / treated.converted, 6),
            difference=None
            if index == 0
            else lift(treated.converted, treated.size, first.converted, first.size),
        )
    return ExperimentReport(tenant, experiment, currency, variants[0], Method(), arms)
