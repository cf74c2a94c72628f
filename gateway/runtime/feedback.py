"""Dispatch feedback: the dispatcher's questions and reports, turned into cascade events.

Right before a provider request the dispatcher asks ``claim`` whether the step is still wanted
and allowed now (a bulk backlog may drain into quiet hours, consent may have changed while the
job queued). Afterwards it reports how the request went: taken, retrying, or failed for good.
This is the seam ``gateway.runtime.dispatch`` talks to (``DispatchFeedbackPort`` there).
"""

from __future__ import annotations

from gateway.config import GatewayConfig
from gateway.core.cascade import (
    CascadeEvent,
    ConsentChanged,
    Dropped,
    Expired,
    SendFailed,
    SendSucceeded,
    Status,
    StepDeferred,
    StepSkipped,
)
from gateway.core.model import Channel, RejectReason, recipient_key
from gateway.core.policy import Go, Hold, Skip, Stop, gate
from gateway.protocol import StatusKind
from gateway.runtime.engine import Engine
from gateway.runtime.labels import Gate, Step
from gateway.runtime.metrics import Metrics
from gateway.runtime.queues import Job
from gateway.store.base import MessageRecord
from gateway.store.state import ADDRESS_INDEXED, State


class DispatchFeedback:
    def __init__(
        self, *, config: GatewayConfig, state: State, engine: Engine, metrics: Metrics
    ) -> None:
        self.state = state
        self.engine = engine
        self.metrics = metrics
        self._sms_price = {name: config.sms_price(name) for name in config.tenants}

    def claim(self, job: Job, now: float) -> MessageRecord | None:
        """May the step go now? Returns the record if so; otherwise applies the verdict."""
        record = self.state.records.get(job.key)
        if record is None:
            return None
        cascade = record.cascade
        if cascade.status is not Status.SENDING or cascade.step != job.step:
            return None
        engine = self.engine
        envelope = record.envelope
        verdict = gate(
            envelope,
            self.state.recipient(recipient_key(envelope.tenant, envelope.recipient_id)),
            engine.rules[envelope.tenant],
            message=record.key,
            channel=job.channel,
            now=now,
            tz=engine.zone(record.tz),
        )
        metrics = self.metrics
        match verdict:
            case Go():
                metrics.gate(Gate.GO)
                engine.count_send(record, job.channel, now)
                return record
            case Hold(until=until, why=why):
                metrics.gate(Gate.HOLD, why)
                engine.emit(
                    record.key, StatusKind.DEFERRED, now, channel=job.channel, detail=why.value
                )
                engine.apply(record, StepDeferred(until), now)
            case Skip(reason=reason):
                metrics.gate(Gate.SKIP, reason)
                metrics.step(job.channel, Step.SKIPPED)
                engine.emit(
                    record.key, StatusKind.SKIPPED, now, channel=job.channel, detail=reason.value
                )
                engine.apply(record, StepSkipped(job.channel, reason.value), now)
            case Stop(reason=reason):
                metrics.gate(Gate.STOP, reason)
                event: CascadeEvent
                if reason is RejectReason.EXPIRED:
                    event = Expired()
                elif reason is RejectReason.NO_CONSENT:
                    # what the consents allow now: the step's channel is not among them, so the
                    # cascade ends ``unsubscribed``, the other channels shown as still allowed
                    event = ConsentChanged(engine.allowed_now(record))
                else:
                    event = Dropped(reason.value)
                engine.apply(record, event, now, detail=reason.value)
        return None

    def send_succeeded(
        self,
        job: Job,
        *,
        provider: str,
        price: float,
        now: float,
        provider_message_id: str | None = None,
    ) -> None:
        """The provider took the request."""
        channel = job.channel
        self.metrics.provider_took(channel, provider, price=price)
        engine = self.engine
        record = self.state.records.get(job.key)
        if record is None:
            # finished while the request was in flight (cancelled, withdrawn): it still went out
            engine.emit(job.key, StatusKind.SENT, now, channel=channel, provider=provider)
            return
        if record.cascade.sent == 0:
            self.metrics.first_send(
                record.envelope.lane,
                waited_seconds=now - record.accepted_at,
                sms_price=self._sms_price.get(record.envelope.tenant, 0.0),
            )
        record.step_sent_at = now
        self.state.remember_provider_id(record, provider, provider_message_id)
        engine.emit(record.key, StatusKind.SENT, now, channel=channel, provider=provider)
        engine.apply(record, SendSucceeded(channel), now)

    def send_failed(self, job: Job, *, permanent: bool, detail: str, now: float) -> None:
        """Every retry and provider of the step is used up, or the error was permanent."""
        self.metrics.step(job.channel, Step.FAILED)
        record = self.state.records.get(job.key)
        if record is None:
            return
        engine = self.engine
        engine.emit(record.key, StatusKind.FAILED, now, channel=job.channel, detail=detail)
        engine.apply(record, SendFailed(job.channel, permanent), now)

    def send_retrying(self, job: Job, *, detail: str, now: float) -> None:
        if job.key in self.state.records:
            self.engine.emit(job.key, StatusKind.RETRYING, now, channel=job.channel, detail=detail)

    def remember_address(self, record: MessageRecord, channel: Channel, address: str) -> None:
        """Map a provider-side address back to the recipient, for the opt-outs that name only
        the address (a Viber user leaving, an SMS STOP)."""
        if channel not in ADDRESS_INDEXED:
            return
        state = self.state
        ref = state.address_refs(channel, address)[0]
        rkey = recipient_key(record.envelope.tenant, record.envelope.recipient_id)
        if state.remember_address(ref, rkey):
            self.engine.batch.address(ref, rkey)
