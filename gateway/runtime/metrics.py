"""Prometheus metrics, built around an injected ``CollectorRegistry`` (no global REGISTRY).

Naming follows Prometheus conventions: ``gateway_`` prefix, base units, ``_total`` counters,
``_seconds`` histograms. Label values come only from enums and from configured provider names,
never from recipients, message ids, campaigns or exception text, and every label set is created
up front so its series exists at 0 (rates and ratios work from the first scrape).

Handlers call named methods (``metrics.admitted()``, ``metrics.step(channel, Step.SENT)``) with
enum arguments (``gateway.runtime.labels``); no label is a string typed at a call site. Label children are looked up once and kept:
``.labels()`` costs a lock and a hash of the values on every call, which adds up per message.

Multi-process mode keeps one scrape complete without prometheus-client's multiprocess files:
workers return each request's duration with its result and webhook processes forward their
verdicts to the router, which owns every series.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from gateway import __version__
from gateway.core.errors import PROVIDER_ERROR_KINDS
from gateway.core.model import Channel, DeferReason, Lane, Outcome, RejectReason
from gateway.core.timers import Deadlines
from gateway.inbound import HitKind, TrackingVerdict, WebhookOutcome
from gateway.protocol import ResultStatus
from gateway.runtime.labels import (
    Gate,
    IngestDrop,
    Op,
    OptOutSource,
    ReceiptMetric,
    ReplyDrop,
    RetryKind,
    SendResult,
    Step,
)

_NONE = "none"
"""The reason label of a verdict that needs none (admitted, go)."""
_LATENCY_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
    900,
)
_LATENCY_BUCKETS += (1800, 3600, 7200, 21600, 86400)
_FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class _Children(dict[tuple[str, ...], Any]):
    """The label children of one metric, each looked up once."""

    def __init__(self, metric: Counter | Histogram) -> None:
        super().__init__()
        self.metric = metric

    def __missing__(self, labels: tuple[str, ...]) -> Any:
        child = self[labels] = self.metric.labels(*labels)
        return child


class Metrics:
    """Every series the gateway exports; ``providers`` maps provider name -> channel."""

    def __init__(self, registry: CollectorRegistry, providers: dict[str, Channel]) -> None:
        self.registry = registry
        counter = partial(Counter, registry=registry)
        gauge = partial(Gauge, registry=registry)
        histogram = partial(Histogram, registry=registry)
        self.build_info = Info(
            "gateway_build", "Version of the running gateway.", registry=registry
        )
        self.build_info.info({"version": __version__})

        self.requests = counter(
            "gateway_requests_total",
            "Requests received over ZeroMQ, by op and result.",
            ["op", "result"],
        )
        self.frames = counter("gateway_frames_total", "Request frames received.")
        self.admissions = counter(
            "gateway_admissions_total",
            "Send requests by admission outcome (admitted, deferred, rejected, duplicate) and reason.",
            ["outcome", "reason"],
        )
        self.gate_verdicts = counter(
            "gateway_policy_gate_total",
            "Pre-send policy checks of cascade steps, by verdict and reason.",
            ["verdict", "reason"],
        )
        self.sends = counter(
            "gateway_sends_total",
            "Provider send attempts by channel, provider and result.",
            ["channel", "provider", "result"],
        )
        self.provider_errors = counter(
            "gateway_provider_errors_total",
            "Provider errors by provider and kind.",
            ["provider", "kind"],
        )
        self.retries = counter(
            "gateway_send_retries_total",
            "Send retries and failovers, by channel.",
            ["channel", "kind"],
        )
        self.receipts = counter(
            "gateway_receipts_total",
            "Delivery and engagement facts by channel: delivered, read, clicked, converted, "
            "failed, bounced, unsubscribed.",
            ["channel", "kind"],
        )
        self.steps = counter(
            "gateway_cascade_steps_total",
            "Cascade steps by channel and how they ended.",
            ["channel", "result"],
        )
        self.outcomes = counter(
            "gateway_cascade_outcomes_total",
            "Finished cascades by outcome, final channel and depth (channels sent).",
            ["outcome", "final_channel", "depth"],
        )
        self.experiment_assignments = counter(
            "gateway_experiment_assignments_total",
            "Messages admitted into an experiment, by tenant, experiment and variant (only the "
            "configured ones: a CRM's own variant labels are never metric labels).",
            ["tenant", "experiment", "variant"],
        )
        self.experiment_refusals = counter(
            "gateway_experiment_refusals_total",
            "Messages assigned a variant and then refused at admission (its channels had no "
            "consent or address, a cap, quiet hours), by tenant, experiment, variant and reason: "
            "the experiment report counts accepted messages only.",
            ["tenant", "experiment", "variant", "reason"],
        )
        self.unsubscribes = counter(
            "gateway_unsubscribes_total",
            "Advertising-consent withdrawals by channel and source.",
            ["channel", "source"],
        )
        self.cost = counter(
            "gateway_cost_total",
            "Spend on provider sends, in the configured currency, by channel.",
            ["channel"],
        )
        self.sms_equivalent_cost = counter(
            "gateway_sms_equivalent_cost_total",
            "What the same messages would have cost as SMS to everyone (savings baseline).",
        )
        self.provider_duration = histogram(
            "gateway_provider_request_duration_seconds",
            "Provider request duration.",
            ["provider", "channel"],
            buckets=_FAST_BUCKETS,
        )
        self.accept_to_send = histogram(
            "gateway_accept_to_send_seconds",
            "From acceptance to the provider taking the first step, by lane.",
            ["lane"],
            buckets=_LATENCY_BUCKETS,
        )
        self.send_to_delivered = histogram(
            "gateway_send_to_delivered_seconds",
            "From the provider taking a step to delivery.",
            ["channel"],
            buckets=_LATENCY_BUCKETS,
        )
        self.send_to_read = histogram(
            "gateway_send_to_read_seconds",
            "From the provider taking a step to read or click.",
            ["channel"],
            buckets=_LATENCY_BUCKETS,
        )
        self.journal_commit = histogram(
            "gateway_journal_commit_duration_seconds",
            "Duration of one journal group commit.",
            buckets=_FAST_BUCKETS,
        )
        self.journal_rows = counter(
            "gateway_journal_rows_total",
            "Rows written to the journal.",
        )
        self.journal_commit_failures = counter(
            "gateway_journal_commit_failures_total",
            "Journal commits that failed and are being retried (disk full, I/O errors).",
        )
        self.journal_writable = gauge(
            "gateway_journal_writable",
            "1 while journal commits succeed, 0 while they fail and are retried.",
        )
        self.journal_writable.set(1)
        self.receipt_duplicates = counter(
            "gateway_receipt_duplicates_total",
            "Provider events received again (a retried or replayed callback): acknowledged, "
            "not applied.",
            ["provider"],
        )
        self.ingest_dropped = counter(
            "gateway_ingest_dropped_total",
            "ZeroMQ messages dropped unanswered, by reason (answering would echo them).",
            ["reason"],
        )
        self.subscriptions = counter(
            "gateway_status_subscriptions_total",
            "Status-event subscriptions by verdict (refused: the key may not see the tenant).",
            ["verdict"],
        )
        self.webhooks = counter(
            "gateway_webhook_requests_total",
            "Provider webhook requests by provider and verdict.",
            ["provider", "verdict"],
        )
        self.tracking = counter(
            "gateway_tracking_requests_total",
            "Click, open-pixel and unsubscribe hits by kind.",
            ["kind", "verdict"],
        )
        self.status_events_dropped = counter(
            "gateway_status_events_dropped_total",
            "Status events not published (subscriber queue full); they are still stored.",
        )
        self.replies_dropped = counter(
            "gateway_replies_dropped_total",
            "Replies that could not be delivered to a client.",
            ["reason"],
        )
        self.queue_depth = gauge(
            "gateway_queue_depth",
            "Provider sends waiting in the dispatch queues, by lane.",
            ["lane"],
        )
        self.inflight_sends = gauge(
            "gateway_inflight_sends",
            "Provider requests in flight.",
        )
        self.pending_timers = gauge(
            "gateway_pending_timers",
            "Timers waiting to fire (unread timeouts, deferrals, expiry).",
        )
        self.active_cascades = gauge(
            "gateway_active_cascades",
            "Messages whose cascade has not finished.",
        )
        self.deferred_messages = gauge(
            "gateway_deferred_messages",
            "Active messages waiting for a send time.",
        )
        self._pre_initialise(providers)
        self._requests = _Children(self.requests)
        self._admissions = _Children(self.admissions)
        self._holding = False
        self._held: dict[Any, int] = {}
        self._gate = _Children(self.gate_verdicts)
        self._steps = _Children(self.steps)
        self._receipts = _Children(self.receipts)
        self._sends = _Children(self.sends)
        self._provider_duration = _Children(self.provider_duration)
        self._accept_to_send = _Children(self.accept_to_send)
        self._cost = _Children(self.cost)
        self._unsubscribes = _Children(self.unsubscribes)
        self._webhooks = _Children(self.webhooks)
        self._tracking = _Children(self.tracking)

    def _pre_initialise(self, providers: dict[str, Channel]) -> None:
        for op in Op:
            for result in ResultStatus:
                self.requests.labels(op, result)
        self.admissions.labels("admitted", _NONE)
        self.admissions.labels("duplicate", _NONE)
        for defer_reason in DeferReason:
            self.admissions.labels("deferred", defer_reason)
            self.gate_verdicts.labels(Gate.HOLD, defer_reason)
        for reason in RejectReason:
            self.admissions.labels("rejected", reason)
            self.gate_verdicts.labels(Gate.SKIP, reason)
            self.gate_verdicts.labels(Gate.STOP, reason)
        self.gate_verdicts.labels(Gate.GO, _NONE)
        for channel in Channel:
            for receipt_kind in ReceiptMetric:
                # push reports no delivery: no series at 0 to be mistaken for "none delivered"
                if receipt_kind is not ReceiptMetric.DELIVERED or channel.reports_delivery:
                    self.receipts.labels(channel, receipt_kind)
            for step in Step:
                self.steps.labels(channel, step)
            for source in OptOutSource:
                self.unsubscribes.labels(channel, source)
            for retry_kind in RetryKind:
                self.retries.labels(channel, retry_kind)
            self.cost.labels(channel)
            self.send_to_delivered.labels(channel)
            self.send_to_read.labels(channel)
        for name, channel in providers.items():
            for send_result in SendResult:
                self.sends.labels(channel, name, send_result)
            for error_kind in PROVIDER_ERROR_KINDS:
                self.provider_errors.labels(name, error_kind)
            for webhook_outcome in WebhookOutcome:
                self.webhooks.labels(name, webhook_outcome)
            self.provider_duration.labels(name, channel)
            self.receipt_duplicates.labels(name)
        for lane in Lane:
            self.accept_to_send.labels(lane)
        for outcome in Outcome:
            for final in (_NONE, *Channel):
                for depth in range(len(Channel) + 1):
                    self.outcomes.labels(outcome, final, str(depth))
        for kind in HitKind:
            for verdict in TrackingVerdict:
                self.tracking.labels(kind, verdict)
        for reply_drop in ReplyDrop:
            self.replies_dropped.labels(reply_drop)
        for ingest_drop in IngestDrop:
            self.ingest_dropped.labels(ingest_drop)
        for subscription_verdict in ("accepted", "refused"):
            self.subscriptions.labels(subscription_verdict)

    # ------------------------------------------------------------ requests and admission
    def hold_admission_counts(self) -> None:
        """Count requests and admissions in a plain dict until ``release_admission_counts``:
        a frame's hundred sends then take each counter's lock once, not a hundred times."""
        self._holding = True

    def release_admission_counts(self) -> None:
        self._holding = False
        held = self._held
        for child, count in held.items():
            child.inc(count)
        held.clear()

    def _count(self, child: Any) -> None:
        if self._holding:
            self._held[child] = self._held.get(child, 0) + 1
        else:
            child.inc()

    def request(self, op: Op, status: ResultStatus) -> None:
        self._count(self._requests[op, status])

    def admitted(self) -> None:
        self._count(self._admissions["admitted", _NONE])

    def deferred(self, why: DeferReason) -> None:
        self._count(self._admissions["deferred", why])

    def refused(self, reason: RejectReason) -> None:
        """A send answered ``rejected`` (policy, overload, a bad id or time, a conflict)."""
        self._count(self._admissions["rejected", reason])

    def duplicate(self) -> None:
        self._count(self._admissions["duplicate", _NONE])

    def experiment_arms(self, arms: list[tuple[str, str, str]]) -> dict[tuple[str, str, str], Any]:
        """Pre-initialise ``(tenant, experiment, variant)`` series; returns their children, for
        ``assigned``. Only configured arms get a series: the label set stays bounded."""
        return {arm: self.experiment_assignments.labels(*arm) for arm in arms}

    def assigned(self, child: Any) -> None:
        self._count(child)

    def experiment_refused(self, arm: tuple[str, str, str], reason: RejectReason) -> None:
        self.experiment_refusals.labels(*arm, reason).inc()

    # ------------------------------------------------------------ cascades
    def gate(self, verdict: Gate, reason: RejectReason | DeferReason | None = None) -> None:
        self._gate[verdict, _NONE if reason is None else reason].inc()

    def step(self, channel: Channel, step: Step) -> None:
        self._steps[channel, step].inc()

    def provider_took(self, channel: Channel, provider: str, *, price: float) -> None:
        """A provider accepted a step: an ``ok`` send, its cost, a step ``sent``."""
        self._sends[channel, provider, SendResult.OK].inc()
        self._cost[channel,].inc(price)
        self._steps[channel, Step.SENT].inc()

    def provider_request(self, provider: str, channel: Channel, seconds: float) -> None:
        """How long one provider request took, answered or failed."""
        self._provider_duration[provider, channel].observe(seconds)

    def first_send(self, lane: Lane, *, waited_seconds: float, sms_price: float) -> None:
        """A message's first step went out: how long it waited, what SMS would have cost."""
        self._accept_to_send[lane,].observe(max(0.0, waited_seconds))
        self.sms_equivalent_cost.inc(sms_price)

    def finished(self, outcome: Outcome, final_channel: Channel | None, depth: int) -> None:
        channel = _NONE if final_channel is None else final_channel
        self.outcomes.labels(outcome, channel, str(depth)).inc()

    def receipt(self, channel: Channel, kind: ReceiptMetric) -> None:
        self._receipts[channel, kind].inc()

    def delivered_after(self, channel: Channel, seconds: float) -> None:
        self.send_to_delivered.labels(channel).observe(max(0.0, seconds))

    def read_after(self, channel: Channel, seconds: float) -> None:
        self.send_to_read.labels(channel).observe(max(0.0, seconds))

    def unsubscribed(self, channel: Channel, source: OptOutSource) -> None:
        self._unsubscribes[channel, source].inc()

    # ------------------------------------------------------------ inbound
    def webhook(self, provider: str, outcome: WebhookOutcome, count: int = 1) -> None:
        self._webhooks[provider, outcome].inc(count)

    def tracking_hit(self, kind: HitKind, verdict: TrackingVerdict) -> None:
        self._tracking[kind, verdict].inc()

    def watch(
        self,
        *,
        queue_depth: Callable[[Lane], int],
        inflight: Callable[[], int],
        timers: Deadlines[object] | Callable[[], int],
        active: Callable[[], int],
        deferred: Callable[[], int],
    ) -> None:
        """Read gauges at scrape time from the live structures (no bookkeeping on hot paths)."""
        for lane in Lane:
            self.queue_depth.labels(lane.value).set_function(_bind(queue_depth, lane))
        self.inflight_sends.set_function(inflight)
        self.pending_timers.set_function(timers if callable(timers) else timers.__len__)
        self.active_cascades.set_function(active)
        self.deferred_messages.set_function(deferred)


def _bind(function: Callable[[Lane], int], lane: Lane) -> Callable[[], int]:
    return lambda: function(lane)
