"""Admission: the requests a CRM sends (send, cancel, event, consent, status), answered.

``handle_frame`` answers every request of a frame, in order, without waiting for I/O: it checks
who may act for the tenant, back-pressure (``overloaded``), the schedule horizon and the policy
(``gateway.core.policy.decide``), starts the cascade through the engine and stages the writes.
The acks go out once the committer has made the batch durable (``gateway.runtime.ingest``).
Requests whose answer needs the journal come back as queries (``gateway.runtime.queries``).
"""

from __future__ import annotations

from typing import Final

from gateway.config import GatewayConfig
from gateway.core.cascade import Cancelled, Cascade, Status
from gateway.core.consent import ConsentRecord
from gateway.core.model import (
    Channel,
    Envelope,
    Lane,
    Outcome,
    RejectReason,
    message_key,
    recipient_key,
)
from gateway.core.policy import Defer, Reject, decide
from gateway.core.receipts import Fact
from gateway.protocol import (
    CancelRequest,
    ConsentRequest,
    EventKind,
    EventRequest,
    Frame,
    Result,
    ResultStatus,
    SendRequest,
    StatusKind,
    StatusRequest,
    epoch,
    future_time,
    rejected,
    utc,
)
from gateway.runtime.committer import Committer
from gateway.runtime.engine import DispatchPort, Engine
from gateway.runtime.experiments import Assignment, Experiments
from gateway.runtime.labels import Op, OptOutSource
from gateway.runtime.metrics import Metrics
from gateway.runtime.queries import DuplicateQuery, JournalQuery, Queries, StatusQuery
from gateway.runtime.receipts import Receipt, Receipts
from gateway.store.base import MessageRecord
from gateway.store.state import State

Principal = frozenset[str] | None
"""The tenants the client behind a frame may act for; None: unauthenticated, all of them."""

_OK: Final = Result(ResultStatus.OK)
_HOLDOUT_DETAIL: Final = "the recipient is in this period's control group"
_EVENT_FACTS: Final = {
    EventKind.OPENED: Fact.READ,
    EventKind.CLICKED: Fact.CLICKED,
    EventKind.CONVERTED: Fact.CONVERTED,
}


class Admission:
    def __init__(
        self,
        *,
        config: GatewayConfig,
        state: State,
        engine: Engine,
        committer: Committer,
        dispatch: DispatchPort,
        receipts: Receipts,
        queries: Queries,
        metrics: Metrics,
    ) -> None:
        self.config = config
        self.state = state
        self.engine = engine
        self.committer = committer
        self.dispatch = dispatch
        self.receipts = receipts
        self.queries = queries
        self.metrics = metrics
        self._tenant_cascade: dict[str, tuple[Channel, ...]] = {
            name: tuple(c for c in t.cascade if t.providers.get(c))
            for name, t in config.tenants.items()
        }
        self._timeouts = config.step_timeouts()
        self.experiments = Experiments(config, metrics)
        self._lane_limits = {lane: config.dispatch.max_queued.limit(lane) for lane in Lane}
        self._frame_depths: dict[Lane, int] = {}
        """Each lane's queued and deferred sends, as of this frame's first send in it plus
        what the frame admitted since (``overloaded``); cleared per frame."""

    def handle_frame(
        self, frame: Frame, principal: Principal, now: float
    ) -> list[Result | JournalQuery]:
        """Answer every request of a frame, in order; writes are staged, not yet durable.

        ``principal`` is who sent the frame (``gateway.runtime.curve``): a request for any
        other tenant is refused ``unauthorized`` before anything else looks at it.
        """
        metrics = self.metrics
        metrics.frames.inc()
        # the lanes' depths are summed over every provider queue: once per frame, then
        # counted up as this frame admits (nothing leaves a queue while the frame is handled)
        self._frame_depths.clear()
        metrics.hold_admission_counts()
        try:
            return self._answer_all(frame, principal, now)
        finally:
            metrics.release_admission_counts()

    def _answer_all(
        self, frame: Frame, principal: Principal, now: float
    ) -> list[Result | JournalQuery]:
        metrics = self.metrics
        results: list[Result | JournalQuery] = []
        for item, raw in zip(frame.items, frame.raws or [b""] * len(frame.items), strict=True):
            if isinstance(item, Result):
                metrics.request(Op.INVALID, item.status)
                results.append(item)
                continue
            op = Op(str(item.__struct_config__.tag))
            refusal = self._refusal(item.tenant, principal)
            if refusal is not None:
                reason, detail = refusal
                if op is Op.SEND:
                    metrics.refused(reason)
                result = rejected(reason, detail, getattr(item, "id", None))
                metrics.request(op, result.status)
                results.append(result)
                continue
            answer: Result | JournalQuery
            match item:
                case SendRequest():
                    answer = self._send(item, raw, now)
                case CancelRequest():
                    answer = self._cancel(item, now)
                case EventRequest():
                    answer = self._event(item, now)
                case ConsentRequest():
                    answer = self.consent(item, now)
                case StatusRequest():
                    answer = self._status(item)
            if isinstance(answer, Result):
                metrics.request(op, answer.status)
            elif isinstance(answer, StatusQuery):
                metrics.request(op, ResultStatus.OK)
            # a DuplicateQuery is counted once answered
            results.append(answer)
        return results

    def _refusal(self, tenant: str, principal: Principal) -> tuple[RejectReason, str] | None:
        if principal is not None and tenant not in principal:
            detail = f"this client's key may not act for tenant {tenant!r}"
            return RejectReason.UNAUTHORIZED, detail
        if tenant not in self.config.tenants:
            return RejectReason.UNKNOWN_TENANT, f"tenant {tenant!r} is not configured"
        return None

    def overloaded(self, lane: Lane) -> str | None:
        """Why a new send in ``lane`` must be refused now, or None."""
        unavailable = self.committer.unavailable
        if unavailable is not None:
            return f"the journal cannot commit ({unavailable}); retrying, retry later"
        pending = self.committer.pending_rows
        if pending >= self.config.store.max_pending_rows:
            return f"the journal is {pending} rows behind; retry later"
        depths = self._frame_depths
        depth = depths.get(lane)
        if depth is None:
            # deferred messages wait in memory like queued ones: both count toward the bound
            depth = depths[lane] = self.dispatch.depth(lane) + self.state.deferred(lane)
        if depth >= self._lane_limits[lane]:
            return f"the {lane} lane holds {depth} queued or deferred sends; retry later"
        return None

    def _beyond_horizon(
        self, send_at: float | None, expires_at: float | None, now: float
    ) -> str | None:
        """A ``send_at``/``expires_at`` too far ahead: it would wait (in memory and in the
        journal, unpruned) for longer than anyone means to."""
        horizon = self.config.ingest.max_schedule_ahead_seconds
        for name, seconds in (("send_at", send_at), ("expires_at", expires_at)):
            if seconds is not None and seconds - now > horizon:
                days = horizon / 86400
                return f"{name} is more than {days:g} days ahead - at `$.{name}`"
        return None

    def _send(self, request: SendRequest, raw: bytes, now: float) -> Result | DuplicateQuery:
        key = message_key(request.tenant, request.id)
        state = self.state
        metrics = self.metrics
        send_at, expires_at = epoch(request.send_at), epoch(request.expires_at)
        too_far = None
        if send_at is not None or expires_at is not None:
            too_far = self._beyond_horizon(send_at, expires_at, now)
        if too_far is not None:
            metrics.refused(RejectReason.INVALID)
            return rejected(RejectReason.INVALID, too_far, request.id)
        if state.finished.get(key) is Outcome.HOLDOUT:
            # a repeat of a held-out message gets the same answer, not "duplicate"
            metrics.refused(RejectReason.HOLDOUT)
            return rejected(RejectReason.HOLDOUT, _HOLDOUT_DETAIL, request.id)
        if key in state.records or key in state.finished:
            return DuplicateQuery(key, request)
        lane = request.priority
        overload = self.overloaded(lane)
        if overload is not None:
            metrics.refused(RejectReason.OVERLOADED)
            return rejected(RejectReason.OVERLOADED, overload, request.id)

        assignment: Assignment | None = None
        if request.experiment is not None:
            chosen = self.experiments.assign(request, request.experiment)
            if isinstance(chosen, str):
                metrics.refused(RejectReason.INVALID)
                return rejected(RejectReason.INVALID, chosen, request.id)
            assignment = chosen
        elif request.variant is not None:
            foreign = self.experiments.foreign_label(request)
            if foreign is not None:
                metrics.refused(RejectReason.INVALID)
                return rejected(RejectReason.INVALID, foreign, request.id)
        recipient = request.recipient
        content = request.content
        order = (
            (assignment is not None and assignment.channels)
            or request.channels
            or self._tenant_cascade[request.tenant]
        )
        providers = self.config.tenants[request.tenant].providers
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
            send_at=send_at,
            expires_at=expires_at,
            variant=None if assignment is None else share(assignment.key),
        )
        engine = self.engine
        decision = decide(
            envelope,
            state.recipient(recipient_key(request.tenant, recipient.id)),
            engine.rules[request.tenant],
            message=key,
            now=now,
            tz=engine.zone(recipient.tz),
        )
        if isinstance(decision, Reject):
            metrics.refused(decision.reason)
            detail = decision.detail
            if decision.reason is RejectReason.HOLDOUT:
                # the control group stays outside every experiment
                outside = envelope if assignment is None else envelope.outside_experiments()
                self._hold_out(key, outside, request, raw, now)
            elif assignment is not None and not engine.rules[
                request.tenant
            ].control_group.holds_out(request.tenant, recipient.id, now=now):
                # refused for a reason decide checks before the control group (no channel, no
                # personal-data consent, expired): a held-out recipient is in no arm, so the
                # refusal is neither counted for one nor named after one
                self.experiments.refused(assignment, decision.reason)
                detail = f"{detail} (in variant {assignment.key})"
            return rejected(decision.reason, detail, request.id)

        overrides = request.step_timeout_seconds
        if assignment is not None:
            # the variant's timeouts win: an experiment on timeouts must not be overridden
            overrides = {**overrides, **assignment.step_timeout_seconds}
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
        variant = request.variant if assignment is None else envelope.variant
        record = MessageRecord(
            key, envelope, share(recipient.tz), cascade, now, request.campaign, variant
        )
        state.add(record)
        depths = self._frame_depths
        if lane in depths:
            depths[lane] += 1
        engine.batch.insert(record, raw)
        if assignment is None:
            engine.opening(record, StatusKind.ACCEPTED, now)
        else:
            # the assignment on the message's timeline: `variant <experiment>/<name>`
            engine.opening(record, StatusKind.ACCEPTED, now, detail=f"variant {variant}")
            self.experiments.counted(assignment)
        if isinstance(decision, Defer):
            metrics.deferred(decision.why)
            engine.opening(record, StatusKind.DEFERRED, now, detail=decision.why.value)
        else:
            metrics.admitted()
            # the first send is imminent: count it against the caps now, so a burst of messages
            # for one recipient in one frame cannot all pass a cap that none has filled yet
            engine.count_send(record, cascade.channel, now)
        engine.run(record, commands, now, request=raw)
        return Result(
            ResultStatus.ACCEPTED,
            id=request.id,
            channels=list(decision.channels),
            deferred_until=None if defer_until is None else utc(defer_until),
        )

    def _hold_out(
        self, key: str, envelope: Envelope, request: SendRequest, raw: bytes, now: float
    ) -> None:
        """Keep a held-out message, finished as ``holdout``: the CRM may later report the
        recipient's purchase (an ``event`` op), which is how the control group's conversion,
        and so the campaign's incremental effect, gets measured."""
        plan = envelope.channels
        cascade = Cascade(plan, (0.0,) * len(plan), 0, 0, Status.FINISHED, 0, Outcome.HOLDOUT)
        record = MessageRecord(
            key, envelope, request.recipient.tz, cascade, now, request.campaign, request.variant
        )
        self.state.finished[key] = Outcome.HOLDOUT
        self.state.remember_finished(key, now)
        engine = self.engine
        engine.batch.insert(record, raw)
        engine.opening(record, StatusKind.HOLDOUT, now, final=True, detail=_HOLDOUT_DETAIL)

    def _cancel(self, request: CancelRequest, now: float) -> Result:
        key = message_key(request.tenant, request.id)
        record = self.state.records.get(key)
        if record is not None:
            self.engine.apply(record, Cancelled(), now, detail=request.reason)
        return self._known(key, request.id)

    def _event(self, request: EventRequest, now: float) -> Result:
        key = message_key(request.tenant, request.id)
        problem = future_time(request.at, now)
        if problem is not None:
            return rejected(RejectReason.INVALID, problem, request.id)
        record = self.state.records.get(key)
        if record is None and key not in self.state.finished:
            return rejected(RejectReason.NOT_FOUND, f"no message {request.id!r}", request.id)
        channel = request.channel
        if channel is None and record is not None:
            channel = record.cascade.channel
        at = min(epoch(request.at) or now, now)
        fact = _EVENT_FACTS[request.kind]
        self.receipts.apply(Receipt(key, fact, channel=channel, at=at, detail="crm"), now=now)
        return self._known(key, request.id)

    def _status(self, request: StatusRequest) -> Result | StatusQuery:
        key = message_key(request.tenant, request.id)
        if self.state.known(key):
            return StatusQuery(key, request.id)
        return rejected(RejectReason.NOT_FOUND, f"no message {request.id!r}", request.id)

    def _known(self, key: str, message_id: str) -> Result:
        brief = self.queries.brief(key)
        if brief is None:
            return rejected(RejectReason.NOT_FOUND, f"no message {message_id!r}", message_id)
        return Result(ResultStatus.OK, id=message_id, message=brief)

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
        self.engine.change_consent(
            request.tenant, request.recipient_id, record, now=now, source=OptOutSource.API
        )
        return _OK
