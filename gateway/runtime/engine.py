"""The engine: the one place where core events meet message records.

``apply`` feeds an event to ``Cascade.handle`` and ``run`` carries out the commands it returns
(``Send`` -> the dispatch queue after commit, ``StartTimer``/``CancelTimer`` -> the timer heaps,
``Finish`` -> the final status event). Everything it changes is staged into the committer's
current batch; nothing leaves the process (a dispatched step, a published status event) before
that batch is durable. The services around it (admission, receipts, dispatch feedback,
recovery) decide *which* event a request or a receipt is; only the engine applies it.

Trio is cooperative and nothing here awaits, so a handler that calls the engine runs
atomically with respect to every other task: no locks.
"""

from __future__ import annotations

import zoneinfo
from collections.abc import Callable
from datetime import tzinfo
from typing import Protocol

import structlog

from gateway.config import GatewayConfig
from gateway.core.caps import SendEntry
from gateway.core.cascade import (
    CancelTimer,
    CascadeEvent,
    ConsentChanged,
    Finish,
    Send,
    StartTimer,
    Status,
    TimerFired,
)
from gateway.core.consent import ConsentAction, ConsentKind, ConsentRecord, allowed_mask
from gateway.core.model import Channel, Lane, Outcome, TimerKind, recipient_key, split_key
from gateway.core.policy import PolicyRules
from gateway.protocol import FINAL_KIND, StatusEvent, StatusKind, utc
from gateway.runtime.committer import Committer
from gateway.runtime.labels import OptOutSource, Step
from gateway.runtime.metrics import Metrics
from gateway.runtime.queues import Job
from gateway.runtime.timers import TimerAlarm
from gateway.store.base import Batch, MessageRecord
from gateway.store.state import State

log = structlog.get_logger("gateway.engine")

Command = Send | StartTimer | CancelTimer | Finish


class DispatchPort(Protocol):
    """What the engine asks of the dispatch queues."""

    def submit(self, job: Job) -> None: ...

    def depth(self, lane: Lane) -> int: ...


class Engine:
    def __init__(
        self,
        *,
        config: GatewayConfig,
        state: State,
        committer: Committer,
        metrics: Metrics,
        publish: Callable[[StatusEvent], None],
        dispatch: DispatchPort,
        alarm: TimerAlarm,
    ) -> None:
        self.config = config
        self.state = state
        self.committer = committer
        self.metrics = metrics
        self.publish = publish
        self.dispatch = dispatch
        self.alarm = alarm
        self.rules: dict[str, PolicyRules] = {t: config.policy_rules(t) for t in config.tenants}
        self._zones: dict[str, tzinfo] = {}

    @property
    def batch(self) -> Batch:
        """The batch to stage into (asking for it wakes the committer)."""
        return self.committer.current

    def zone(self, name: str) -> tzinfo:
        zone = self._zones.get(name)
        if zone is None:
            zone = self._zones[name] = zoneinfo.ZoneInfo(name)
        return zone

    # ------------------------------------------------------------ the cascade loop
    def apply(
        self,
        record: MessageRecord,
        event: CascadeEvent,
        now: float,
        *,
        detail: str | None = None,
        emit_final: bool = True,
    ) -> None:
        """Feed ``event`` to the record's cascade and run what it says."""
        before = record.cascade
        cascade, commands = before.handle(event, now=now)
        if cascade is before and not commands:
            return
        self.state.update(record, cascade)
        self.run(record, commands, now, detail=detail, emit_final=emit_final)

    def run(
        self,
        record: MessageRecord,
        commands: list[Command],
        now: float,
        *,
        request: bytes | None = None,
        detail: str | None = None,
        emit_final: bool = True,
    ) -> None:
        """Carry out a cascade's commands and stage the record's new value."""
        key = record.key
        state = self.state
        for command in commands:
            match command:
                case Send(channel=channel, step=step):
                    self.enqueue(record, channel, step, now, request)
                case StartTimer(kind=kind, at=at):
                    state.schedule(key, kind, at)
                    if kind is TimerKind.STEP:
                        record.step_due = at
                    else:
                        record.expiry_due = at
                    self.alarm.changed(at)
                case CancelTimer(kind=kind):
                    state.cancel(key, kind)
                    if kind is TimerKind.STEP:
                        record.step_due = None
                    else:
                        record.expiry_due = None
                case Finish(outcome=outcome):
                    self._finish(record, outcome, now, detail=detail, emit=emit_final)
        self.batch.write(record)

    def enqueue(
        self, record: MessageRecord, channel: Channel, step: int, now: float, request: bytes | None
    ) -> None:
        """Queue a step for its provider once the batch that decided it is durable."""
        lane = record.envelope.lane
        job = Job(
            key=record.key,
            tenant=record.envelope.tenant,
            channel=channel,
            step=step,
            lane=lane,
            enqueued_at=now,
            # a bulk campaign may queue a million jobs: they load their request when their turn
            # comes (one read per batch of them) instead of holding ~1 KB each meanwhile
            request=None if lane is Lane.BULK else request,
        )
        submit = self.dispatch.submit
        self.batch.then(lambda: submit(job))

    def _finish(
        self, record: MessageRecord, outcome: Outcome, now: float, *, detail: str | None, emit: bool
    ) -> None:
        cascade = record.cascade
        self.state.finish(record, outcome, now=now)
        final_channel = cascade.channel if cascade.sent else None
        self.metrics.finished(outcome, final_channel, cascade.depth)
        if outcome in (Outcome.READ, Outcome.CLICKED):
            self.metrics.step(cascade.channel, Step.READ)
        elif outcome is Outcome.DELIVERED:
            self.metrics.step(cascade.channel, Step.DELIVERED)
        if emit:
            self.emit_final(record, outcome, now, detail=detail)
        log.info(
            "dispatch_finished",
            message=record.key,
            outcome=outcome.value,
            depth=cascade.depth,
            channel=final_channel.value if final_channel else "none",
            duration_seconds=round(now - record.accepted_at, 3),
        )

    # ------------------------------------------------------------ timers
    def fire_timers(self, due: list[tuple[str, TimerKind]], now: float) -> None:
        """Timers whose time came: an unread step timed out, a deferral ended, expiry."""
        for key, kind in due:
            record = self.state.records.get(key)
            if record is None:
                continue
            if kind is TimerKind.STEP:
                record.step_due = None
                if record.cascade.status is Status.AWAITING:
                    channel = record.cascade.channel
                    self.metrics.step(channel, Step.TIMED_OUT)
                    self.emit(key, StatusKind.STEP_TIMEOUT, now, channel=channel)
            else:
                record.expiry_due = None
            self.apply(record, TimerFired(kind), now)

    # ------------------------------------------------------------ consent and caps
    def change_consent(
        self,
        tenant: str,
        recipient_id: str,
        record: ConsentRecord,
        *,
        now: float,
        source: OptOutSource,
    ) -> None:
        """Apply a consent record; the recipient's active cascades see it at once."""
        rkey = recipient_key(tenant, recipient_id)
        state = self.state
        consents = state.apply_consent(rkey, record)
        self.batch.consent(rkey, record)
        if record.action is ConsentAction.WITHDRAW and record.kind is ConsentKind.ADVERTISING:
            channels = (record.channel,) if record.channel is not None else tuple(Channel)
            for channel in channels:
                self.metrics.unsubscribed(channel, source)
        defaults = self.rules[tenant].consent_defaults
        for active in state.active_for(rkey):
            envelope = active.envelope
            mask = allowed_mask(
                consents,
                marketing=envelope.category.is_marketing,
                topic=envelope.topic,
                defaults=defaults,
            )
            if mask != active.cascade.allowed:
                self.apply(active, ConsentChanged(mask), now, detail=source)

    def allowed_now(self, record: MessageRecord) -> int:
        """The channels the recipient's consents allow this message now (a bit mask)."""
        envelope = record.envelope
        recipient = self.state.recipient(recipient_key(envelope.tenant, envelope.recipient_id))
        return allowed_mask(
            recipient.consents,
            marketing=envelope.category.is_marketing,
            topic=envelope.topic,
            defaults=self.rules[envelope.tenant].consent_defaults,
        )

    def count_send(self, record: MessageRecord, channel: Channel, now: float) -> None:
        """Count a send against the recipient's frequency caps (once per message and channel)."""
        envelope = record.envelope
        if not envelope.category.is_marketing or not self.rules[envelope.tenant].caps:
            return
        rkey = recipient_key(envelope.tenant, envelope.recipient_id)
        if self.state.history(rkey).counted(record.key, channel):
            return
        entry = SendEntry(now, record.key, envelope.category, channel)
        self.state.record_send(rkey, entry)
        self.batch.send(rkey, entry)

    # ------------------------------------------------------------ status events
    def emit(
        self,
        key: str,
        kind: StatusKind,
        at: float,
        *,
        channel: Channel | None = None,
        provider: str | None = None,
        detail: str | None = None,
        final: bool = False,
    ) -> None:
        """Journal a status event on the message's timeline; publish it once durable."""
        tenant, message_id = split_key(key)
        event = StatusEvent(
            tenant=tenant,
            id=message_id,
            kind=kind,
            at=utc(at),
            final=final,
            channel=channel,
            provider=provider,
            detail=detail,
        )
        batch = self.batch
        batch.event(event)
        publish = self.publish
        batch.then(lambda: publish(event))

    def emit_final(
        self, record: MessageRecord, outcome: Outcome, now: float, *, detail: str | None = None
    ) -> None:
        channel = record.cascade.channel if record.cascade.sent else None
        self.emit(record.key, FINAL_KIND[outcome], now, channel=channel, detail=detail, final=True)

    def opening(
        self,
        record: MessageRecord,
        kind: StatusKind,
        at: float,
        *,
        detail: str | None = None,
        final: bool = False,
    ) -> None:
        """A status event of the admission itself: journalled inside the message's own row
        (one row per admitted message instead of three), published like any other."""
        tenant, message_id = split_key(record.key)
        event = StatusEvent(
            tenant=tenant, id=message_id, kind=kind, at=utc(at), final=final, detail=detail
        )
        batch = self.batch
        batch.opening_event(record.key, event)
        publish = self.publish
        batch.then(lambda: publish(event))
