"""Receipts and opt-outs: what comes back after a message went out.

Provider webhooks (delivered, failed, bounced, read, clicked, and opt-outs), the tracker (a
click, an email open, a one-click unsubscribe) and the CRM's ``event`` op all end here. A fact
goes on the message's timeline and reaches its cascade as the event ``gateway.core.receipts``
maps it to; an opt-out withdraws advertising consent, whatever became of the message it came
through, and every active cascade of the recipient sees the withdrawal at once.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final

import structlog

from adapters import ProviderReceipt
from gateway.config import GatewayConfig
from gateway.core.cascade import Unsubscribed
from gateway.core.consent import ConsentAction, ConsentKind, ConsentRecord
from gateway.core.model import Channel, split_key
from gateway.core.receipts import OPT_OUTS, PROVIDER_FACTS, Fact, ReceiptKind, cascade_event
from gateway.inbound import (
    HitKind,
    Inbound,
    OptOut,
    TrackingHit,
    TrackingVerdict,
    WebhookOutcome,
    WebhookReceipts,
    WebhookVerdict,
)
from gateway.protocol import FINAL_KIND, StatusKind
from gateway.runtime.engine import Engine
from gateway.runtime.labels import OptOutSource, ReceiptMetric
from gateway.runtime.metrics import Metrics
from gateway.store.state import ADDRESS_INDEXED, State

log = structlog.get_logger("gateway.receipts")

_REMEMBERED_HITS: Final = 200_000
"""Tracking hits remembered to drop repeats (~150 bytes each): a day of a large campaign's
first opens and clicks; a repeat older than that is applied again, harmlessly."""


class Receipt:
    """A fact about a sent message from outside: a provider webhook, the tracker, the CRM."""

    __slots__ = ("at", "channel", "detail", "fact", "key", "metric", "provider")

    def __init__(
        self,
        key: str,
        fact: Fact,
        *,
        channel: Channel | None,
        at: float,
        provider: str | None = None,
        detail: str | None = None,
        metric: ReceiptMetric | None = None,
    ) -> None:
        self.key = key
        self.fact = fact
        self.metric = ReceiptMetric(fact) if metric is None else metric
        """The receipts-metric label; finer than ``fact`` for a bounce (a failure)."""
        self.channel = channel
        self.at = at
        self.provider = provider
        self.detail = detail


class Receipts:
    def __init__(
        self, *, config: GatewayConfig, state: State, engine: Engine, metrics: Metrics
    ) -> None:
        self.config = config
        self.state = state
        self.engine = engine
        self.metrics = metrics
        self._hits: OrderedDict[tuple[HitKind, str, Channel | None], None] = OrderedDict()

    def apply(self, receipt: Receipt, *, now: float) -> bool:
        """Apply a delivery or engagement fact; False when the message is unknown."""
        key = receipt.key
        channel = receipt.channel
        record = self.state.records.get(key)
        if record is None and key not in self.state.finished:
            return False
        if channel is not None:
            self.metrics.receipt(channel, receipt.metric)
        kind = StatusKind(receipt.fact)
        engine = self.engine
        if record is None:
            # the cascade is over, but the fact still counts (a purchase after the read)
            engine.emit(
                key,
                kind,
                receipt.at,
                channel=channel,
                provider=receipt.provider,
                detail=receipt.detail,
            )
            return True
        sent_at = record.step_sent_at
        if channel is not None and sent_at is not None and channel is record.cascade.channel:
            if receipt.fact is Fact.DELIVERED:
                self.metrics.delivered_after(channel, receipt.at - sent_at)
            elif receipt.fact in (Fact.READ, Fact.CLICKED):
                self.metrics.read_after(channel, receipt.at - sent_at)
        before = record.cascade
        event = cascade_event(receipt.fact, channel)
        if event is not None:
            engine.apply(record, event, now, emit_final=False)
        after = record.cascade
        # the fact goes on the timeline; when it is what finished the cascade it is the final
        # event, unless the outcome is another kind (a failure that exhausted the plan)
        final = after.finished and not before.finished
        outcome = after.outcome
        own_final = final and outcome is not None and FINAL_KIND[outcome] is kind
        engine.emit(
            key,
            kind,
            receipt.at,
            channel=channel,
            provider=receipt.provider,
            detail=receipt.detail,
            final=own_final,
        )
        if final and not own_final and outcome is not None:
            engine.emit_final(record, outcome, now)
        return True

    # ------------------------------------------------------------ from the HTTP surface
    def inbound(self, item: Inbound, *, now: float) -> None:
        """A verified webhook, a verdict, a tracking hit or an opt-out from the HTTP surface.

        Stages its writes like every handler; ``gateway.runtime.inbox`` waits for them to be
        durable before the HTTP answer says so.
        """
        metrics = self.metrics
        match item:
            case WebhookVerdict(provider=provider, verdict=verdict):
                metrics.webhook(provider, verdict)
            case WebhookReceipts(provider=provider, receipts=receipts):
                metrics.webhook(provider, WebhookOutcome.ACCEPTED)
                unknown = self.provider_receipts(provider, receipts, now=now)
                if unknown:
                    metrics.webhook(provider, WebhookOutcome.UNKNOWN_MESSAGE, unknown)
            case OptOut():
                metrics.tracking_hit(HitKind.UNSUBSCRIBE, TrackingVerdict.ACCEPTED)
                self.opt_out(item, now=now)
            case TrackingHit(kind=kind, verdict=verdict, key=None):
                metrics.tracking_hit(kind, verdict)
            case TrackingHit(kind=kind, verdict=verdict, key=str(key), channel=channel, at=at):
                if not self._first_hit(kind, key, channel):
                    # the fact is known: a reopened email or a link tapped again (or a script
                    # hammering it) is counted, not journalled and published once more
                    metrics.tracking_hit(kind, TrackingVerdict.REPEAT)
                    return
                metrics.tracking_hit(kind, verdict)
                fact = Fact.CLICKED if kind is HitKind.CLICK else Fact.READ
                self.apply(Receipt(key, fact, channel=channel, at=at, detail="tracker"), now=now)

    def _first_hit(self, kind: HitKind, key: str, channel: Channel | None) -> bool:
        """Whether this is the first click (or open) of this message on this channel that
        the gateway remembers; the memory holds the latest ``_REMEMBERED_HITS``."""
        hit = (kind, key, channel)
        seen = self._hits
        if hit in seen:
            seen.move_to_end(hit)
            return False
        seen[hit] = None
        if len(seen) > _REMEMBERED_HITS:
            seen.popitem(last=False)
        return True

    def provider_receipts(
        self, provider: str, receipts: list[ProviderReceipt], *, now: float
    ) -> int:
        """Apply receipts parsed from one webhook; returns how many named no known message.

        The caller (``gateway.runtime.inbox``) has already dropped events it applied before and
        filled in the recipient of opt-outs whose message left memory.
        """
        channel = self.config.providers[provider].channel
        state = self.state
        unknown = 0
        for receipt in receipts:
            key = receipt.message_key
            if key is None and receipt.provider_message_id is not None:
                key = state.by_provider_id.get(f"{provider}:{receipt.provider_message_id}")
            # a provider's clock (or a forged-but-signed body) may say anything: not the future
            at = min(receipt.at, now) if receipt.at > 0 else now
            kind = receipt.kind
            if kind in OPT_OUTS:
                if not self._provider_opt_out(provider, channel, key, receipt, at=at, now=now):
                    unknown += 1
                    log.warning("opt_out_unresolved", provider=provider, message=key)
                continue
            if key is None or not state.known(key):
                unknown += 1
                continue
            fact = PROVIDER_FACTS[kind]
            detail = receipt.detail if fact is not Fact.FAILED else (receipt.detail or kind.value)
            bounced = kind is ReceiptKind.BOUNCED
            self.apply(
                Receipt(
                    key,
                    fact,
                    channel=channel,
                    at=at,
                    provider=provider,
                    detail=detail,
                    metric=ReceiptMetric.BOUNCED if bounced else None,
                ),
                now=now,
            )
        return unknown

    # ------------------------------------------------------------ opt-outs
    def _provider_opt_out(
        self,
        provider: str,
        channel: Channel,
        key: str | None,
        receipt: ProviderReceipt,
        *,
        at: float,
        now: float,
    ) -> bool:
        """A recipient opted out with the provider (SendGrid unsubscribe or spam report, a
        Viber user leaving, an SMS STOP): withdraw advertising consent on the channel, every
        topic, for whoever the receipt resolves to. Returns False when it resolves to nobody.

        The recipient comes, in order, from the receipt (SendGrid echoes it), from the active
        message, or from the address index (every recipient of a tenant served by this
        provider account who was sent to that address).
        """
        recipients: list[tuple[str, str]] = []
        record = self.state.records.get(key) if key is not None else None
        if receipt.recipient_id is not None and key is not None:
            recipients.append((split_key(key)[0], receipt.recipient_id))
        elif record is not None:
            recipients.append((record.envelope.tenant, record.envelope.recipient_id))
        elif receipt.detail is not None and channel in ADDRESS_INDEXED:
            for rkey in self.state.recipients_of(channel, receipt.detail):
                tenant, recipient_id = split_key(rkey)
                served = self.config.tenants.get(tenant)
                if served is not None and provider in served.providers.get(channel, ()):
                    recipients.append((tenant, recipient_id))
        recipients = [(t, r) for t, r in recipients if t in self.config.tenants]
        for tenant, recipient_id in recipients:
            opt_out = OptOut(tenant, recipient_id, channel, at=at, source="provider", key=key)
            self.opt_out(opt_out, now=now)
        return bool(recipients)

    def opt_out(self, opt_out: OptOut, *, now: float) -> None:
        """The recipient asked to hear no more advertising: withdraw it, stop what runs.

        A one-click link withdraws the message's topic on that channel ("unsubscribe from
        promotions but keep order updates"); a provider-level opt-out withdraws every topic on
        the channel. Nothing here needs the message to be active or even stored: the link and
        the provider name the recipient. The withdrawal reaches every active cascade of the
        recipient at once; the message the person acted on ends as ``unsubscribed``, or, when
        it had finished already, gets an ``unsubscribed`` event on its timeline.
        """
        key = opt_out.key
        own = key if key is not None and split_key(key)[0] == opt_out.tenant else None
        was_active = own is not None and own in self.state.records
        record = ConsentRecord(
            kind=ConsentKind.ADVERTISING,
            action=ConsentAction.WITHDRAW,
            at=opt_out.at,
            source=opt_out.source,
            channel=opt_out.channel,
            topic=opt_out.topic,
        )
        source = OptOutSource(opt_out.source)
        engine = self.engine
        engine.change_consent(opt_out.tenant, opt_out.recipient_id, record, now=now, source=source)
        if own is None:
            return
        active = self.state.records.get(own)
        if active is not None:
            engine.apply(active, Unsubscribed(), now, detail=opt_out.source)
        elif not was_active and own in self.state.finished:
            # the cascade was over, but the CRM still hears that this message lost a subscriber
            engine.emit(
                own,
                StatusKind.UNSUBSCRIBED,
                opt_out.at,
                channel=opt_out.channel,
                detail=opt_out.source,
            )
