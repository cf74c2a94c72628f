"""The router: turns requests, timers, send results and receipts into cascade transitions.

Every handler here is synchronous up to the point where it stages its writes into the
committer's current batch; nothing it changes is visible to a client or a provider before that
batch is durable (replies, dispatches and status publications are after-commit actions). Trio
is cooperative, so a handler that does not await runs atomically with respect to every other
task: no locks.

The loop in the middle is the sans-I/O one: feed an event to ``Cascade.handle``, run the
commands it returns (``Send`` -> dispatch queue, ``StartTimer``/``CancelTimer`` -> timer heaps,
``Finish`` -> final status event), and feed the policy's verdict at send time back as events.
"""

from __future__ import annotations

import zoneinfo
from collections import OrderedDict
from collections.abc import Callable
from datetime import tzinfo
from typing import TYPE_CHECKING, Any, Final, Protocol

import msgspec
import structlog

from adapters import ProviderReceipt, ReceiptKind
from gateway.config import GatewayConfig, TenantConfig
from gateway.core.caps import SendEntry
from gateway.core.cascade import (
    Cancelled,
    CancelTimer,
    Cascade,
    CascadeEvent,
    Clicked,
    ConsentChanged,
    Converted,
    Delivered,
    Dropped,
    Expired,
    Finish,
    Read,
    Send,
    SendFailed,
    SendSucceeded,
    StartTimer,
    Status,
    StepDeferred,
    StepSkipped,
    TimerFired,
    Unsubscribed,
)
from gateway.core.consent import ConsentAction, ConsentKind, ConsentRecord, allowed_mask
from gateway.core.model import (
    Channel,
    Envelope,
    Lane,
    Outcome,
    RejectReason,
    TimerKind,
    message_key,
    recipient_key,
    split_key,
)
from gateway.core.policy import Defer, Go, Hold, PolicyRules, Reject, Skip, Stop, decide, gate
from gateway.http.inbound import (
    HitKind,
    Inbound,
    OptOut,
    TrackingHit,
    WebhookReceipts,
    WebhookVerdict,
)
from gateway.protocol import (
    FINAL_KIND,
    CancelRequest,
    ConsentRequest,
    EventKind,
    EventRequest,
    Frame,
    MessageState,
    Result,
    ResultStatus,
    SendRequest,
    StatusEvent,
    StatusKind,
    StatusRequest,
    epoch,
    future_time,
    rejected,
    utc,
)
from gateway.runtime.clock import Clock
from gateway.runtime.committer import Committer
from gateway.runtime.metrics import Metrics
from gateway.runtime.timers import TimerAlarm
from gateway.store.base import Journal, JournalCorrupt, MessageRecord, active_pages
from gateway.store.state import State

if TYPE_CHECKING:
    from gateway.runtime.dispatch import Job

log = structlog.get_logger("gateway.router")

_OK: Final = Result(ResultStatus.OK)
_request_decoder: Final = msgspec.msgpack.Decoder(SendRequest)
_RECOVERY_PAGE: Final = 10_000
_REMEMBERED_HITS: Final = 200_000
"""Tracking hits remembered to drop repeats (~150 bytes each): a day of a large campaign's
first opens and clicks; a repeat older than that is applied again, harmlessly."""
_HOLDOUT_DETAIL: Final = "the recipient is in this period's control group"
_STATE_NAMES: Final = {
    Status.DEFERRED: "deferred",
    Status.SENDING: "sending",
    Status.AWAITING: "awaiting",
    Status.FINISHED: "finished",
}
_RECEIPT_FACTS: Final = {
    ReceiptKind.DELIVERED: StatusKind.DELIVERED,
    ReceiptKind.READ: StatusKind.READ,
    ReceiptKind.CLICKED: StatusKind.CLICKED,
    ReceiptKind.FAILED: StatusKind.FAILED,
    ReceiptKind.BOUNCED: StatusKind.FAILED,
}
_RECEIPT_EVENTS: Final[dict[StatusKind, type[Delivered] | type[Read] | type[Clicked]]] = {
    StatusKind.DELIVERED: Delivered,
    StatusKind.READ: Read,
    StatusKind.CLICKED: Clicked,
}


class Receipt:
    """A fact about a sent message from outside: a provider webhook, the app, the CRM."""

    __slots__ = ("at", "channel", "detail", "key", "kind", "metric_kind", "provider")

    def __init__(
        self,
        key: str,
        kind: StatusKind,
        *,
        channel: Channel | None,
        at: float,
        provider: str | None = None,
        detail: str | None = None,
        metric_kind: str | None = None,
    ) -> None:
        self.key = key
        self.kind = kind
        self.metric_kind = metric_kind
        """The receipts-metric label when it is finer than ``kind`` (a bounce is a failure)."""
        self.channel = channel
        self.at = at
        self.provider = provider
        self.detail = detail


class DispatchPort(Protocol):
    """What the router asks of the dispatch queues."""

    def submit(self, job: Job) -> None: ...

    def depth(self, lane: Lane) -> int: ...


Principal = frozenset[str] | None
"""The tenants the client behind a frame may act for; None: unauthenticated, all of them."""

_ADDRESS_INDEXED: Final = frozenset({Channel.VIBER, Channel.SMS})
"""Channels whose provider opt-outs name only the address (a Viber user id, a phone)."""


class StatusQuery:
    """A ``status`` request whose answer needs the journal (see ``Router.answer``)."""

    __slots__ = ("key", "message_id")

    def __init__(self, key: str, message_id: str) -> None:
        self.key = key
        self.message_id = message_id


class DuplicateQuery:
    """A ``send`` whose id is taken: ``duplicate`` if it is the same request, ``conflict`` if
    not (Stripe's idempotency keys); telling them apart reads the original from the journal."""

    __slots__ = ("key", "request")

    def __init__(self, key: str, request: SendRequest) -> None:
        self.key = key
        self.request = request


JournalQuery = StatusQuery | DuplicateQuery


class Router:
    def __init__(
        self,
        *,
        config: GatewayConfig,
        state: State,
        journal: Journal,
        committer: Committer,
        metrics: Metrics,
        clock: Clock,
        publish: Callable[[StatusEvent], None],
        dispatch: DispatchPort,
        alarm: TimerAlarm,
    ) -> None:
        self.config = config
        self.state = state
        self.journal = journal
        self.committer = committer
        self.metrics = metrics
        self.clock = clock
        self.publish = publish
        self.dispatch = dispatch
        self.alarm = alarm
        self._rules: dict[str, PolicyRules] = {t: config.policy_rules(t) for t in config.tenants}
        self._tenant_cascade: dict[str, tuple[Channel, ...]] = {
            name: tuple(c for c in t.cascade if t.providers.get(c))
            for name, t in config.tenants.items()
        }
        self._timeouts = config.step_timeouts()
        self._zones: dict[str, tzinfo] = {}
        self._lane_limits = {lane: config.dispatch.max_queued.limit(lane) for lane in Lane}
        self._sms_price = {
            name: _first_price(config, t, Channel.SMS) for name, t in config.tenants.items()
        }
        self._admissions = _Children(metrics.admissions)
        self._hits: OrderedDict[tuple[HitKind, str, Channel | None], None] = OrderedDict()
        self._request_counters = {
            (op, status): metrics.requests.labels(op, status.value)
            for op in ("send", "cancel", "event", "consent", "status", "invalid")
            for status in ResultStatus
        }

    # ================================================================ requests
    def handle_frame(
        self, frame: Frame, principal: Principal = None
    ) -> list[Result | JournalQuery]:
        """Answer every request of a frame, in order, without waiting for I/O.

        Writes are staged, not yet durable. A ``status``, and a ``send`` whose id is taken,
        need the journal, so they come back as queries for ``answer`` to resolve off the ingest
        path. ``principal``
        is who sent the frame (``gateway.runtime.curve``): a request for any other tenant is
        refused ``unauthorized`` before anything else looks at it.
        """
        now = self.clock.now()
        self.metrics.frames.inc()
        results: list[Result | JournalQuery] = []
        counters = self._request_counters
        for item, raw in zip(frame.items, frame.raws or [b""] * len(frame.items), strict=True):
            if (
                principal is not None
                and not isinstance(item, Result)
                and item.tenant not in principal
            ):
                op = item.__struct_config__.tag
                assert isinstance(op, str)
                if op == "send":
                    self._admissions["rejected", RejectReason.UNAUTHORIZED.value].inc()
                result = rejected(
                    RejectReason.UNAUTHORIZED,
                    f"this client's key may not act for tenant {item.tenant!r}",
                    getattr(item, "id", None),
                )
                counters[op, result.status].inc()
                results.append(result)
                continue
            if not isinstance(item, Result) and item.tenant not in self.config.tenants:
                op = item.__struct_config__.tag
                assert isinstance(op, str)
                if op == "send":
                    self._admissions["rejected", RejectReason.UNKNOWN_TENANT.value].inc()
                result = rejected(
                    RejectReason.UNKNOWN_TENANT,
                    f"tenant {item.tenant!r} is not configured",
                    getattr(item, "id", None),
                )
                counters[op, result.status].inc()
                results.append(result)
                continue
            match item:
                case Result():
                    result, op = item, "invalid"
                case SendRequest():
                    sent = self._send(item, raw, now)
                    if isinstance(sent, DuplicateQuery):
                        results.append(sent)  # counted once answered
                        continue
                    result, op = sent, "send"
                case CancelRequest():
                    result, op = self._cancel(item, now), "cancel"
                case EventRequest():
                    result, op = self._event(item, now), "event"
                case ConsentRequest():
                    result, op = self.consent(item, now), "consent"
                case StatusRequest():
                    key = message_key(item.tenant, item.id)
                    if self.state.known(key):
                        counters["status", ResultStatus.OK].inc()
                        results.append(StatusQuery(key, item.id))
                        continue
                    result = rejected(RejectReason.NOT_FOUND, f"no message {item.id!r}", item.id)
                    op = "status"
            counters[op, result.status].inc()
            results.append(result)
        return results

    async def answer(self, queries: list[JournalQuery]) -> list[Result]:
        """Resolve the queries of a frame that need the journal, one read per kind."""
        statuses = [q for q in queries if isinstance(q, StatusQuery)]
        duplicates = [q for q in queries if isinstance(q, DuplicateQuery)]
        try:
            states = await self.message_states([q.key for q in statuses]) if statuses else {}
            originals = await self._originals([q.key for q in duplicates]) if duplicates else {}
        except JournalCorrupt as exc:
            # one unreadable row must not take the ingest loop (and the gateway) down
            log.error("query_unreadable", error=str(exc))
            return [
                rejected(RejectReason.NOT_FOUND, f"unreadable: {exc}", split_key(q.key)[1])
                for q in queries
            ]
        answers: list[Result] = []
        counters = self._request_counters
        for query in queries:
            message_id = split_key(query.key)[1]
            if isinstance(query, StatusQuery):
                answers.append(
                    Result(ResultStatus.OK, id=message_id, message=states.get(query.key))
                )
                continue
            original = originals.get(query.key)
            if original is not None and _canonical(original) != _canonical(query.request):
                self._admissions["rejected", RejectReason.CONFLICT.value].inc()
                answer = rejected(
                    RejectReason.CONFLICT,
                    "this id was used for a different request; a retry must repeat it exactly",
                    message_id,
                )
            else:
                self._admissions["duplicate", "none"].inc()
                answer = Result(
                    ResultStatus.DUPLICATE, id=message_id, message=self._brief(query.key)
                )
            counters["send", answer.status].inc()
            answers.append(answer)
        return answers

    async def _originals(self, keys: list[str]) -> dict[str, SendRequest]:
        """The requests first sent under these keys: staged ones, else the journal's."""
        raws = {key: raw for key in keys if (raw := self.committer.staged_request(key))}
        missing = [key for key in keys if key not in raws]
        if missing:
            raws.update(await self.journal.requests(missing))
        return {key: _request_decoder.decode(raw) for key, raw in raws.items()}

    def overloaded(self, lane: Lane) -> str | None:
        """Why a new send in ``lane`` must be refused now, or None."""
        unavailable = self.committer.unavailable
        if unavailable is not None:
            return f"the journal cannot commit ({unavailable}); retrying, retry later"
        pending = self.committer.pending_rows
        if pending >= self.config.store.max_pending_rows:
            return f"the journal is {pending} rows behind; retry later"
        # deferred messages wait in memory like queued ones: both count toward the bound
        depth = self.dispatch.depth(lane) + self.state.deferred(lane)
        if depth >= self._lane_limits[lane]:
            return f"the {lane} lane holds {depth} queued or deferred sends; retry later"
        return None

    def _beyond_horizon(self, request: SendRequest, now: float) -> str | None:
        """A ``send_at``/``expires_at`` too far ahead: it would wait (in memory and in the
        journal, unpruned) for longer than anyone means to."""
        horizon = self.config.ingest.max_schedule_ahead_seconds
        for name, moment in (("send_at", request.send_at), ("expires_at", request.expires_at)):
            seconds = epoch(moment)
            if seconds is not None and seconds - now > horizon:
                days = horizon / 86400
                return f"{name} is more than {days:g} days ahead - at `$.{name}`"
        return None

    def _send(self, request: SendRequest, raw: bytes, now: float) -> Result | DuplicateQuery:
        tenant = self.config.tenants[request.tenant]
        key = message_key(request.tenant, request.id)
        state = self.state
        too_far = self._beyond_horizon(request, now)
        if too_far is not None:
            self._admissions["rejected", RejectReason.INVALID.value].inc()
            return rejected(RejectReason.INVALID, too_far, request.id)
        if state.finished.get(key) is Outcome.HOLDOUT:
            # a repeat of a held-out message gets the same answer, not "duplicate"
            self._admissions["rejected", "holdout"].inc()
            return rejected(RejectReason.HOLDOUT, _HOLDOUT_DETAIL, request.id)
        if key in state.records or key in state.finished:
            return DuplicateQuery(key, request)
        lane = request.priority
        overload = self.overloaded(lane)
        if overload is not None:
            self._admissions["rejected", "overloaded"].inc()
            return rejected(RejectReason.OVERLOADED, overload, request.id)

        recipient = request.recipient
        content = request.content
        order = request.channels or self._tenant_cascade[request.tenant]
        providers = tenant.providers
        share = state.share
        plan = share(
            tuple(
                channel
                for channel in order
                if channel in providers and recipient.has_address(channel) and content.has(channel)
            )
        )
        envelope = Envelope(
            tenant=share(request.tenant),
            recipient_id=recipient.id,
            category=request.category,
            topic=share(request.effective_topic),
            lane=lane,
            channels=plan,
            send_at=epoch(request.send_at),
            expires_at=epoch(request.expires_at),
        )
        rkey = recipient_key(request.tenant, recipient.id)
        decision = decide(
            envelope,
            state.recipient(rkey),
            self._rules[request.tenant],
            message=key,
            now=now,
            tz=self._zone(recipient.tz),
        )
        if isinstance(decision, Reject):
            self._admissions["rejected", decision.reason.value].inc()
            if decision.reason is RejectReason.HOLDOUT:
                self._hold_out(key, envelope, request, raw, now)
            return rejected(decision.reason, decision.detail, request.id)

        overrides = request.step_timeout_seconds
        timeouts = share(tuple(overrides.get(c) or self._timeouts[c] for c in plan))
        defer_until = decision.until if isinstance(decision, Defer) else None
        cascade, commands = Cascade.start(
            plan=plan,
            timeouts=timeouts,
            allowed=decision.allowed,
            now=now,
            expires_at=envelope.expires_at,
            defer_until=defer_until,
        )
        record = MessageRecord(
            key, envelope, share(recipient.tz), cascade, now, request.campaign, request.variant
        )
        state.add(record)
        batch = self.committer.current
        batch.inserts[key] = raw  # the row is counted once, when _run marks the record dirty
        self._opening(record, StatusKind.ACCEPTED, now)
        if defer_until is not None:
            assert isinstance(decision, Defer)
            self._admissions["deferred", decision.why.value].inc()
            self._opening(record, StatusKind.DEFERRED, now, detail=decision.why.value)
        else:
            self._admissions["admitted", "none"].inc()
            # the first send is imminent: count it against the caps now, so a burst of messages
            # for one recipient in one frame cannot all pass a cap that none has filled yet
            self._count_send(record, cascade.channel, now)
        self._run(record, commands, now, request=raw)
        return Result(
            ResultStatus.ACCEPTED,
            id=request.id,
            channels=[c for c in plan if decision.allowed & c.bit],
            deferred_until=None if defer_until is None else utc(defer_until),
        )

    def _hold_out(
        self, key: str, envelope: Envelope, request: SendRequest, raw: bytes, now: float
    ) -> None:
        """Keep a held-out message, finished as ``holdout``: the CRM may later report the
        recipient's purchase (an ``event`` op), which is how the control group's conversion,
        and so the campaign's incremental effect, gets measured."""
        cascade = Cascade(
            envelope.channels,
            (0.0,) * len(envelope.channels),
            0,
            0,
            Status.FINISHED,
            0,
            Outcome.HOLDOUT,
        )
        record = MessageRecord(
            key, envelope, request.recipient.tz, cascade, now, request.campaign, request.variant
        )
        self.state.finished[key] = Outcome.HOLDOUT
        self.state.remember_finished(key, now)
        batch = self.committer.current
        batch.inserts[key] = raw
        self._dirty(record)
        self._opening(record, StatusKind.HOLDOUT, now, final=True, detail=_HOLDOUT_DETAIL)

    def _cancel(self, request: CancelRequest, now: float) -> Result:
        key = message_key(request.tenant, request.id)
        record = self.state.records.get(key)
        if record is None:
            return self._not_active(key, request.id)
        self._apply(record, Cancelled(), now, detail=request.reason)
        return Result(ResultStatus.OK, id=request.id, message=self._brief(key))

    def _event(self, request: EventRequest, now: float) -> Result:
        key = message_key(request.tenant, request.id)
        problem = future_time(request.at, now)
        if problem is not None:
            return rejected(RejectReason.INVALID, problem, request.id)
        at = min(epoch(request.at) or now, now)
        record = self.state.records.get(key)
        if record is None and key not in self.state.finished:
            return rejected(RejectReason.NOT_FOUND, f"no message {request.id!r}", request.id)
        kind = {
            EventKind.OPENED: StatusKind.READ,
            EventKind.CLICKED: StatusKind.CLICKED,
            EventKind.CONVERTED: StatusKind.CONVERTED,
        }[request.kind]
        channel = request.channel
        if channel is None and record is not None:
            channel = record.cascade.channel
        self.receipt(Receipt(key, kind, channel=channel, at=at, detail="crm"), now=now)
        return Result(ResultStatus.OK, id=request.id, message=self._brief(key))

    def consent(self, request: ConsentRequest, now: float) -> Result:
        """Record a grant or withdrawal (the ``consent`` op, and the admin API's PUT)."""
        if request.tenant not in self.config.tenants:
            return rejected(
                RejectReason.UNKNOWN_TENANT, f"tenant {request.tenant!r} is not configured"
            )
        problem = future_time(request.at, now)
        if problem is not None:
            return rejected(RejectReason.INVALID, problem)
        record = ConsentRecord(
            kind=request.kind,
            action=request.action,
            # the latest record wins: a time ahead of ours (within the clock skew allowed)
            # would outrank a withdrawal received after it, so it counts from now
            at=min(epoch(request.at) or now, now),
            source=request.source,
            channel=request.channel,
            topic=request.topic,
            reason=request.reason,
        )
        self.change_consent(request.tenant, request.recipient_id, record, now=now, source="api")
        return _OK

    async def message_state(self, key: str) -> MessageState | None:
        """The message's state and whole timeline (reads the journal)."""
        return (await self.message_states([key])).get(key)

    async def message_states(self, keys: list[str]) -> dict[str, MessageState]:
        """States and timelines of several messages: one read for the timelines, one for
        finished messages' records.

        The reads await a thread, and a commit may land meanwhile: staged events are taken
        before and after the reads (and de-duplicated against the journal), and a record that
        finished and became durable during the reads is fetched in a second read.
        """
        records = self.state.records
        wanted = set(keys)
        staged = self._staged_events(wanted)
        committer = self.committer
        # a record staged now may commit while the reads run, and the read may have taken its
        # snapshot before: such a row is read again below (read-your-writes for a status asked
        # right after a receipt finished the message)
        staged_before = {key for key in keys if committer.staged_record(key) is not None}
        archived = [key for key in keys if key not in records]
        stored = await self.journal.messages(archived) if archived else {}
        timelines = await self.journal.timelines(keys)
        for key, events in self._staged_events(wanted).items():
            staged.setdefault(key, []).extend(events)
        for key, events in staged.items():
            timeline = timelines.setdefault(key, [])
            seen = set(timeline)
            for event in events:
                if event not in seen:
                    seen.add(event)
                    timeline.append(event)
        late = [
            k
            for k in keys
            if k not in records
            and committer.staged_record(k) is None
            and (k not in stored or k in staged_before)
        ]
        if late:
            stored.update(await self.journal.messages(late))
        states: dict[str, MessageState] = {}
        for key in keys:
            # newest first: live, then staged (finished but not yet durable), then journalled
            record = records.get(key) or self.committer.staged_record(key)
            if record is None:
                found = stored.get(key)
                if found is None:
                    continue
                record = found.record
            states[key] = msgspec.structs.replace(
                _describe(record), timeline=timelines.get(key, [])
            )
        return states

    def _staged_events(self, wanted: set[str]) -> dict[str, list[StatusEvent]]:
        found: dict[str, list[StatusEvent]] = {}
        for event in self.committer.staged_events():  # written but not yet durable
            key = f"{event.tenant}:{event.id}"
            if key in wanted:
                found.setdefault(key, []).append(event)
        return found

    def _brief(self, key: str) -> MessageState | None:
        record = self.state.records.get(key)
        if record is not None:
            return _describe(record)
        outcome = self.state.finished.get(key)
        if outcome is not None:
            return MessageState(state="finished", outcome=outcome)
        return None

    def _not_active(self, key: str, message_id: str) -> Result:
        brief = self._brief(key)
        if brief is None:
            return rejected(RejectReason.NOT_FOUND, f"no message {message_id!r}", message_id)
        return Result(ResultStatus.OK, id=message_id, message=brief)

    # ================================================================ consent
    def change_consent(
        self, tenant: str, recipient_id: str, record: ConsentRecord, *, now: float, source: str
    ) -> None:
        """Apply a consent record; active cascades of the recipient see it at once."""
        rkey = recipient_key(tenant, recipient_id)
        state = self.state
        consents = state.apply_consent(rkey, record)
        batch = self.committer.current
        batch.consents.append((rkey, record))
        batch.rows += 1
        if record.action is ConsentAction.WITHDRAW and record.kind is ConsentKind.ADVERTISING:
            channels = (record.channel,) if record.channel is not None else tuple(Channel)
            for channel in channels:
                self.metrics.unsubscribes.labels(channel.value, source).inc()
        defaults = self._rules[tenant].consent_defaults
        for active in state.active_for(rkey):
            envelope = active.envelope
            mask = allowed_mask(
                consents,
                marketing=envelope.category.is_marketing,
                topic=envelope.topic,
                defaults=defaults,
            )
            if mask != active.cascade.allowed:
                self._apply(active, ConsentChanged(mask), now, detail=source)

    # ================================================================ timers
    def fire_timers(self, due: list[tuple[str, TimerKind]], now: float) -> None:
        for key, kind in due:
            record = self.state.records.get(key)
            if record is None:
                continue
            if kind is TimerKind.STEP:
                record.step_due = None
                if record.cascade.status is Status.AWAITING:
                    self.metrics.steps.labels(record.cascade.channel.value, "timed_out").inc()
                    self._emit(record, StatusKind.STEP_TIMEOUT, now, channel=record.cascade.channel)
            else:
                record.expiry_due = None
            self._apply(record, TimerFired(kind), now)

    # ================================================================ dispatch
    def claim(self, job: Job, now: float) -> MessageRecord | None:
        """Called right before a provider request: is the step still wanted, and allowed now?

        Runs the policy gate at the real send time (a bulk backlog may drain into quiet hours,
        consent may have changed while the job queued). Returns the record when the request
        may go; otherwise applies the verdict to the cascade and returns None.
        """
        record = self.state.records.get(job.key)
        if record is None:
            return None
        cascade = record.cascade
        if cascade.status is not Status.SENDING or cascade.step != job.step:
            return None
        envelope = record.envelope
        rkey = recipient_key(envelope.tenant, envelope.recipient_id)
        rules = self._rules[envelope.tenant]
        recipient = self.state.recipient(rkey)
        verdict = gate(
            envelope,
            recipient,
            rules,
            message=record.key,
            channel=job.channel,
            now=now,
            tz=self._zone(record.tz),
        )
        gate_counter = self.metrics.gate_verdicts
        match verdict:
            case Go():
                gate_counter.labels("go", "none").inc()
                self._count_send(record, job.channel, now)
                return record
            case Hold(until=until, why=why):
                gate_counter.labels("hold", why.value).inc()
                self._emit(record, StatusKind.DEFERRED, now, channel=job.channel, detail=why.value)
                self._apply(record, StepDeferred(until), now)
            case Skip(reason=RejectReason.NO_CONSENT):
                gate_counter.labels("skip", "no_consent").inc()
                mask = allowed_mask(
                    recipient.consents,
                    marketing=envelope.category.is_marketing,
                    topic=envelope.topic,
                    defaults=rules.consent_defaults,
                )
                self._apply(record, ConsentChanged(mask), now)
            case Skip(reason=reason):
                gate_counter.labels("skip", reason.value).inc()
                self.metrics.steps.labels(job.channel.value, "skipped").inc()
                self._emit(
                    record, StatusKind.SKIPPED, now, channel=job.channel, detail=reason.value
                )
                self._apply(record, StepSkipped(job.channel, reason.value), now)
            case Stop(reason=reason):
                gate_counter.labels("stop", reason.value).inc()
                event: CascadeEvent
                if reason is RejectReason.EXPIRED:
                    event = Expired()
                elif reason is RejectReason.NO_CONSENT:
                    event = ConsentChanged(0)
                else:
                    event = Dropped(reason.value)
                self._apply(record, event, now, detail=reason.value)
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
        self.metrics.sends.labels(channel.value, provider, "ok").inc()
        self.metrics.cost.labels(channel.value).inc(price)
        self.metrics.steps.labels(channel.value, "sent").inc()
        record = self.state.records.get(job.key)
        if record is None:
            # finished while the request was in flight (cancelled, withdrawn): it still went out
            self._emit_key(job.key, StatusKind.SENT, now, channel=channel, provider=provider)
            return
        first = record.cascade.sent == 0
        if first:
            lane = record.envelope.lane.value
            self.metrics.accept_to_send.labels(lane).observe(max(0.0, now - record.accepted_at))
            self.metrics.sms_equivalent_cost.inc(self._sms_price.get(record.envelope.tenant, 0.0))
        record.step_sent_at = now
        self.state.remember_provider_id(record, provider, provider_message_id)
        self._emit(record, StatusKind.SENT, now, channel=channel, provider=provider)
        self._apply(record, SendSucceeded(channel), now)

    def send_failed(self, job: Job, *, permanent: bool, detail: str, now: float) -> None:
        """Every retry and provider of the step is used up, or the error was permanent."""
        self.metrics.steps.labels(job.channel.value, "failed").inc()
        record = self.state.records.get(job.key)
        if record is None:
            return
        self._emit(record, StatusKind.FAILED, now, channel=job.channel, detail=detail)
        self._apply(record, SendFailed(job.channel, permanent), now)

    def send_retrying(self, job: Job, *, detail: str, now: float) -> None:
        record = self.state.records.get(job.key)
        if record is not None:
            self._emit(record, StatusKind.RETRYING, now, channel=job.channel, detail=detail)

    # ================================================================ receipts
    def receipt(self, receipt: Receipt, *, now: float) -> bool:
        """Apply a delivery/engagement fact; returns False when the message is unknown."""
        key = receipt.key
        kind = receipt.kind
        channel = receipt.channel
        metrics = self.metrics
        record = self.state.records.get(key)
        if record is None:
            if key not in self.state.finished:
                return False
            # the cascade is over, but the fact still counts (a purchase after the read)
            if channel is not None:
                metrics.receipts.labels(channel.value, receipt.metric_kind or kind.value).inc()
            self._emit_key(
                key,
                kind,
                receipt.at,
                channel=channel,
                provider=receipt.provider,
                detail=receipt.detail,
            )
            return True
        if channel is not None:
            metrics.receipts.labels(channel.value, receipt.metric_kind or kind.value).inc()
            sent_at = record.step_sent_at
            if sent_at is not None and channel is record.cascade.channel:
                if kind is StatusKind.DELIVERED:
                    metrics.send_to_delivered.labels(channel.value).observe(
                        max(0.0, receipt.at - sent_at)
                    )
                elif kind in (StatusKind.READ, StatusKind.CLICKED):
                    metrics.send_to_read.labels(channel.value).observe(
                        max(0.0, receipt.at - sent_at)
                    )
        event: CascadeEvent | None
        if kind is StatusKind.CONVERTED:
            event = Converted()
        elif kind is StatusKind.FAILED:
            event = None if channel is None else SendFailed(channel, permanent=True)
        else:
            factory = _RECEIPT_EVENTS.get(kind)
            event = None if factory is None or channel is None else factory(channel)
        before = record.cascade
        if event is not None:
            self._apply(record, event, now, emit_final=False)
        after = record.cascade
        # the fact event; when the fact is what finished the cascade it carries `final`
        final = after.finished and not before.finished
        outcome = after.outcome
        if final and outcome is not None and FINAL_KIND[outcome] is not kind:
            self._emit(
                record,
                kind,
                receipt.at,
                channel=channel,
                provider=receipt.provider,
                detail=receipt.detail,
            )
            self._emit_final(record, outcome, now)
        else:
            self._emit(
                record,
                kind,
                receipt.at,
                channel=channel,
                provider=receipt.provider,
                detail=receipt.detail,
                final=final,
            )
        return True

    # ================================================================ inbound (HTTP)
    def inbound(self, item: Inbound) -> None:
        """A verified webhook, a verdict, a tracking hit or an opt-out from the HTTP surface.

        Stages its writes like every handler; ``gateway.runtime.inbox`` waits for them to be
        durable before the HTTP answer says so.
        """
        now = self.clock.now()
        metrics = self.metrics
        match item:
            case WebhookVerdict(provider=provider, verdict=verdict):
                metrics.webhooks.labels(provider, verdict).inc()
            case WebhookReceipts(provider=provider, receipts=receipts):
                metrics.webhooks.labels(provider, "accepted").inc()
                unknown = self.provider_receipts(provider, receipts, now=now)
                if unknown:
                    metrics.webhooks.labels(provider, "unknown_message").inc(unknown)
            case OptOut():
                metrics.tracking.labels(HitKind.UNSUBSCRIBE.value, "accepted").inc()
                self.opt_out(item, now=now)
            case TrackingHit(kind=kind, verdict=verdict, key=None):
                metrics.tracking.labels(kind.value, verdict).inc()
            case TrackingHit(kind=kind, verdict=verdict, key=str(key), channel=channel, at=at):
                if not self._first_hit(kind, key, channel):
                    # the fact is known: a reopened email or a link tapped again (or a script
                    # hammering it) is counted, not journalled and published once more
                    metrics.tracking.labels(kind.value, "repeat").inc()
                    return
                metrics.tracking.labels(kind.value, verdict).inc()
                fact = StatusKind.CLICKED if kind is HitKind.CLICK else StatusKind.READ
                self.receipt(Receipt(key, fact, channel=channel, at=at, detail="tracker"), now=now)

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

    # ================================================================ opt-outs
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
            if kind in (ReceiptKind.UNSUBSCRIBED, ReceiptKind.SPAM_REPORT):
                if not self._provider_opt_out(provider, channel, key, receipt, at=at, now=now):
                    unknown += 1
                    log.warning("opt_out_unresolved", provider=provider, message=key)
                continue
            if key is None or not state.known(key):
                unknown += 1
                continue
            fact = _RECEIPT_FACTS[kind]
            detail = (
                receipt.detail if fact is not StatusKind.FAILED else (receipt.detail or kind.value)
            )
            metric_kind = "bounced" if kind is ReceiptKind.BOUNCED else None
            self.receipt(
                Receipt(
                    key,
                    fact,
                    channel=channel,
                    at=at,
                    provider=provider,
                    detail=detail,
                    metric_kind=metric_kind,
                ),
                now=now,
            )
        return unknown

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
        elif receipt.detail is not None and channel in _ADDRESS_INDEXED:
            for rkey in self.state.recipients_of(channel, receipt.detail):
                tenant, recipient_id = split_key(rkey)
                served = self.config.tenants.get(tenant)
                if served is not None and provider in served.providers.get(channel, ()):
                    recipients.append((tenant, recipient_id))
        recipients = [(t, r) for t, r in recipients if t in self.config.tenants]
        for tenant, recipient_id in recipients:
            self.opt_out(
                OptOut(tenant, recipient_id, channel, at=at, source="provider", key=key), now=now
            )
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
        self.change_consent(
            opt_out.tenant, opt_out.recipient_id, record, now=now, source=opt_out.source
        )
        if own is None:
            return
        active = self.state.records.get(own)
        if active is not None:
            self._apply(active, Unsubscribed(), now, detail=opt_out.source)
        elif not was_active and own in self.state.finished:
            # the cascade was over, but the CRM still hears that this message lost a subscriber
            self._emit_key(
                own,
                StatusKind.UNSUBSCRIBED,
                opt_out.at,
                channel=opt_out.channel,
                detail=opt_out.source,
            )

    def remember_address(self, record: MessageRecord, channel: Channel, address: str) -> None:
        """Map a provider-side address back to the recipient (for opt-outs that name only it)."""
        if channel not in _ADDRESS_INDEXED:
            return
        ref = self.state.address_refs(channel, address)[0]
        envelope = record.envelope
        rkey = recipient_key(envelope.tenant, envelope.recipient_id)
        if self.state.remember_address(ref, rkey):
            batch = self.committer.current
            batch.addresses.append((ref, rkey))
            batch.rows += 1

    # ================================================================ the cascade loop
    def _apply(
        self,
        record: MessageRecord,
        event: CascadeEvent,
        now: float,
        *,
        detail: str | None = None,
        emit_final: bool = True,
    ) -> None:
        before = record.cascade
        cascade, commands = before.handle(event, now=now)
        if cascade is before and not commands:
            return
        self.state.update(record, cascade)
        self._run(record, commands, now, detail=detail, emit_final=emit_final)

    def _run(
        self,
        record: MessageRecord,
        commands: list[Send | StartTimer | CancelTimer | Finish],
        now: float,
        *,
        request: bytes | None = None,
        detail: str | None = None,
        emit_final: bool = True,
    ) -> None:
        key = record.key
        state = self.state
        for command in commands:
            match command:
                case Send(channel=channel, step=step):
                    self._enqueue(record, channel, step, now, request)
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
        self._dirty(record)

    def _enqueue(
        self, record: MessageRecord, channel: Channel, step: int, now: float, request: bytes | None
    ) -> None:
        from gateway.runtime.dispatch import Job

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
        self.committer.current.after.append(lambda: submit(job))

    def _finish(
        self, record: MessageRecord, outcome: Outcome, now: float, *, detail: str | None, emit: bool
    ) -> None:
        cascade = record.cascade
        self.state.finish(record, outcome, now=now)
        final_channel = cascade.channel.value if cascade.sent else "none"
        self.metrics.outcomes.labels(outcome.value, final_channel, str(cascade.depth)).inc()
        if outcome in (Outcome.READ, Outcome.CLICKED):
            self.metrics.steps.labels(cascade.channel.value, "read").inc()
        elif outcome is Outcome.DELIVERED:
            self.metrics.steps.labels(cascade.channel.value, "delivered").inc()
        if emit:
            self._emit_final(record, outcome, now, detail=detail)
        log.info(
            "dispatch_finished",
            message=record.key,
            outcome=outcome.value,
            depth=cascade.depth,
            channel=final_channel,
            duration_seconds=round(now - record.accepted_at, 3),
        )

    def _emit_final(
        self, record: MessageRecord, outcome: Outcome, now: float, *, detail: str | None = None
    ) -> None:
        channel = record.cascade.channel if record.cascade.sent else None
        self._emit(record, FINAL_KIND[outcome], now, channel=channel, detail=detail, final=True)

    def _count_send(self, record: MessageRecord, channel: Channel, now: float) -> None:
        envelope = record.envelope
        if not envelope.category.is_marketing or not self._rules[envelope.tenant].caps:
            return
        rkey = recipient_key(envelope.tenant, envelope.recipient_id)
        history = self.state.histories.get(rkey)
        if history is not None and any(
            e.message == record.key and e.channel is channel for e in history.entries
        ):
            return
        entry = SendEntry(now, record.key, envelope.category, channel)
        self.state.record_send(rkey, entry)
        batch = self.committer.current
        batch.sends.append((rkey, entry))
        batch.rows += 1

    # ================================================================ status events
    def _emit(
        self,
        record: MessageRecord,
        kind: StatusKind,
        at: float,
        *,
        channel: Channel | None = None,
        provider: str | None = None,
        detail: str | None = None,
        final: bool = False,
    ) -> None:
        self._emit_key(
            record.key, kind, at, channel=channel, provider=provider, detail=detail, final=final
        )

    def _emit_key(
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
        batch = self.committer.current
        batch.events.append(event)
        batch.rows += 1
        publish = self.publish
        batch.after.append(lambda: publish(event))

    def _opening(
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
        batch = self.committer.current
        batch.opening.setdefault(record.key, []).append(event)
        publish = self.publish
        batch.after.append(lambda: publish(event))

    def _dirty(self, record: MessageRecord) -> None:
        batch = self.committer.current
        if record.key not in batch.dirty:
            batch.dirty[record.key] = record
            batch.rows += 1

    # ================================================================ recovery
    async def recover(self, *, now: float) -> int:
        """Rebuild the state from the journal at start; returns how many steps are sent again.

        Active messages come page by page, so each page's copies are freed before the next is
        decoded.
        """
        state = self.state
        recovered = await self.journal.recover(
            now=now,
            retention_seconds=self.config.store.idempotency_retention_seconds,
            horizon_seconds=state.horizon_seconds,
        )
        state.finished.update(recovered.finished)
        for key in recovered.finished:
            # finish times are not journalled: each key is kept a full retention from now,
            # longer than needed, never shorter (without this they were never forgotten)
            state.remember_finished(key, now)
        for rkey, consent in recovered.consents:
            state.apply_consent(rkey, consent)
        for rkey, entry in recovered.sends:
            state.record_send(rkey, entry)
        state.address_key = recovered.address_key
        for address, recipient in recovered.addresses:
            state.remember_address(address, recipient)
        active = resent = 0
        async for records in active_pages(self.journal, limit=_RECOVERY_PAGE):
            active += len(records)
            resent += len(self.restore(records, now=now))
        if active or recovered.finished:
            log.info(
                "journal_recovered",
                active=active,
                finished=len(recovered.finished),
                resent=resent,
            )
        return resent

    def restore(self, records: list[MessageRecord], *, now: float) -> list[MessageRecord]:
        """Rebuild timers and indexes from recovered records; returns those caught mid-send.

        A record in SENDING was queued or in flight when the process stopped: its step is sent
        again (at-least-once), which is the only way a message can reach a person twice.
        """
        state = self.state
        resend: list[MessageRecord] = []
        for record in records:
            state.restore(record)
            status = record.cascade.status
            if record.step_due is not None:
                state.schedule(record.key, TimerKind.STEP, record.step_due)
            if record.expiry_due is not None:
                state.schedule(record.key, TimerKind.EXPIRY, record.expiry_due)
            if status is Status.SENDING:
                resend.append(record)
        for record in resend:
            self._enqueue(record, record.cascade.channel, record.cascade.step, now, None)
        return resend

    # ================================================================ helpers
    def _zone(self, name: str) -> tzinfo:
        zone = self._zones.get(name)
        if zone is None:
            zone = self._zones[name] = zoneinfo.ZoneInfo(name)
        return zone


class _Children(dict[tuple[str, ...], Any]):
    """Label children of one metric, looked up once: ``.labels()`` costs a lock and a hash of
    the label values on every call, which adds up per message."""

    def __init__(self, metric: Any) -> None:
        super().__init__()
        self.metric = metric

    def __missing__(self, labels: tuple[str, ...]) -> Any:
        child = self[labels] = self.metric.labels(*labels)
        return child


def _canonical(request: SendRequest) -> SendRequest:
    """The request with its times as instants: the same moment written with another offset
    is the same request (a retry may be re-serialised by another library)."""

    def instant(moment: str | None) -> str | None:
        seconds = epoch(moment)
        return None if seconds is None else repr(seconds)

    return msgspec.structs.replace(
        request, send_at=instant(request.send_at), expires_at=instant(request.expires_at)
    )


def _describe(record: MessageRecord) -> MessageState:
    cascade = record.cascade
    return MessageState(
        state=_STATE_NAMES[cascade.status],
        channel=None if cascade.finished else cascade.channel,
        outcome=cascade.outcome,
        channels=[c for c in cascade.plan if cascade.allowed & c.bit],
        deferred_until=(
            utc(record.step_due)
            if cascade.status is Status.DEFERRED and record.step_due is not None
            else None
        ),
    )


def _first_price(config: GatewayConfig, tenant: TenantConfig, channel: Channel) -> float:
    names = tenant.providers.get(channel, ())
    return config.providers[names[0]].price if names else 0.0
