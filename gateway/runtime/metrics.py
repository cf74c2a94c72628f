"""Prometheus metrics, built around an injected ``CollectorRegistry`` (no global REGISTRY).

Naming follows Prometheus conventions: ``gateway_`` prefix, base units, ``_total`` counters,
``_seconds`` histograms. Label values come only from enums and from configured provider names,
never from recipients, message ids, campaigns or exception text, and every label set is created
up front so its series exists at 0 (rates and ratios work from the first scrape).

Multi-process mode keeps one scrape complete without prometheus-client's multiprocess files:
workers return each request's duration with its result and webhook processes forward their
verdicts to the router, which owns every series.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from gateway import __version__
from gateway.core.errors import PROVIDER_ERROR_KINDS
from gateway.core.model import Channel, DeferReason, Lane, Outcome, RejectReason
from gateway.core.timers import Deadlines
from gateway.protocol import ResultStatus

OPS = ("send", "cancel", "event", "consent", "status", "invalid")
SEND_RESULTS = ("ok", "transient_error", "permanent_error")
RECEIPT_KINDS = (
    "delivered",
    "read",
    "clicked",
    "converted",
    "failed",
    "bounced",
    "unsubscribed",
)
WEBHOOK_VERDICTS = ("accepted", "bad_signature", "stale", "malformed", "unknown_message")
UNSUBSCRIBE_SOURCES = ("api", "one_click", "provider")
TRACKING_VERDICTS = ("accepted", "bad_token", "expired", "repeat")
INGEST_DROPS = ("too_many_parts", "envelope_too_large")
_LATENCY_BUCKETS = (
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
    1800,
    3600,
    7200,
    21600,
    86400,
)
_FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """Every series the gateway exports; ``providers`` maps provider name -> channel."""

    def __init__(self, registry: CollectorRegistry, providers: dict[str, Channel]) -> None:
        self.registry = registry
        r = registry
        self.build_info = Info("gateway_build", "Version of the running gateway.", registry=r)
        self.build_info.info({"version": __version__})

        self.requests = Counter(
            "gateway_requests_total",
            "Requests received over ZeroMQ, by op and result.",
            ["op", "result"],
            registry=r,
        )
        self.frames = Counter("gateway_frames_total", "Request frames received.", registry=r)
        self.admissions = Counter(
            "gateway_admissions_total",
            "Send requests by admission outcome (admitted, deferred, rejected, duplicate) and reason.",
            ["outcome", "reason"],
            registry=r,
        )
        self.gate_verdicts = Counter(
            "gateway_policy_gate_total",
            "Pre-send policy checks of cascade steps, by verdict and reason.",
            ["verdict", "reason"],
            registry=r,
        )
        self.sends = Counter(
            "gateway_sends_total",
            "Provider send attempts by channel, provider and result.",
            ["channel", "provider", "result"],
            registry=r,
        )
        self.provider_errors = Counter(
            "gateway_provider_errors_total",
            "Provider errors by provider and kind.",
            ["provider", "kind"],
            registry=r,
        )
        self.retries = Counter(
            "gateway_send_retries_total",
            "Send retries and failovers, by channel.",
            ["channel", "kind"],
            registry=r,
        )
        self.receipts = Counter(
            "gateway_receipts_total",
            "Delivery and engagement facts by channel: delivered, read, clicked, converted, "
            "failed, bounced, unsubscribed.",
            ["channel", "kind"],
            registry=r,
        )
        self.steps = Counter(
            "gateway_cascade_steps_total",
            "Cascade steps by channel and how they ended.",
            ["channel", "result"],
            registry=r,
        )
        self.outcomes = Counter(
            "gateway_cascade_outcomes_total",
            "Finished cascades by outcome, final channel and depth (channels sent).",
            ["outcome", "final_channel", "depth"],
            registry=r,
        )
        self.unsubscribes = Counter(
            "gateway_unsubscribes_total",
            "Advertising-consent withdrawals by channel and source.",
            ["channel", "source"],
            registry=r,
        )
        self.cost = Counter(
            "gateway_cost_total",
            "Spend on provider sends, in the configured currency, by channel.",
            ["channel"],
            registry=r,
        )
        self.sms_equivalent_cost = Counter(
            "gateway_sms_equivalent_cost_total",
            "What the same messages would have cost as SMS to everyone (savings baseline).",
            registry=r,
        )
        self.provider_duration = Histogram(
            "gateway_provider_request_duration_seconds",
            "Provider request duration.",
            ["provider", "channel"],
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.accept_to_send = Histogram(
            "gateway_accept_to_send_seconds",
            "From acceptance to the provider taking the first step, by lane.",
            ["lane"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.send_to_delivered = Histogram(
            "gateway_send_to_delivered_seconds",
            "From the provider taking a step to delivery.",
            ["channel"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.send_to_read = Histogram(
            "gateway_send_to_read_seconds",
            "From the provider taking a step to read or click.",
            ["channel"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.journal_commit = Histogram(
            "gateway_journal_commit_duration_seconds",
            "Duration of one journal group commit.",
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.journal_rows = Counter(
            "gateway_journal_rows_total",
            "Rows written to the journal.",
            registry=r,
        )
        self.journal_commit_failures = Counter(
            "gateway_journal_commit_failures_total",
            "Journal commits that failed and are being retried (disk full, I/O errors).",
            registry=r,
        )
        self.journal_writable = Gauge(
            "gateway_journal_writable",
            "1 while journal commits succeed, 0 while they fail and are retried.",
            registry=r,
        )
        self.journal_writable.set(1)
        self.receipt_duplicates = Counter(
            "gateway_receipt_duplicates_total",
            "Provider events received again (a retried or replayed callback): acknowledged, "
            "not applied.",
            ["provider"],
            registry=r,
        )
        self.ingest_dropped = Counter(
            "gateway_ingest_dropped_total",
            "ZeroMQ messages dropped unanswered, by reason (answering would echo them).",
            ["reason"],
            registry=r,
        )
        self.subscriptions = Counter(
            "gateway_status_subscriptions_total",
            "Status-event subscriptions by verdict (refused: the key may not see the tenant).",
            ["verdict"],
            registry=r,
        )
        self.webhooks = Counter(
            "gateway_webhook_requests_total",
            "Provider webhook requests by provider and verdict.",
            ["provider", "verdict"],
            registry=r,
        )
        self.tracking = Counter(
            "gateway_tracking_requests_total",
            "Click, open-pixel and unsubscribe hits by kind.",
            ["kind", "verdict"],
            registry=r,
        )
        self.status_events_dropped = Counter(
            "gateway_status_events_dropped_total",
            "Status events not published (subscriber queue full); they are still stored.",
            registry=r,
        )
        self.replies_dropped = Counter(
            "gateway_replies_dropped_total",
            "Replies that could not be delivered to a client.",
            ["reason"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "gateway_queue_depth",
            "Provider sends waiting in the dispatch queues, by lane.",
            ["lane"],
            registry=r,
        )
        self.inflight_sends = Gauge(
            "gateway_inflight_sends",
            "Provider requests in flight.",
            registry=r,
        )
        self.pending_timers = Gauge(
            "gateway_pending_timers",
            "Timers waiting to fire (unread timeouts, deferrals, expiry).",
            registry=r,
        )
        self.active_cascades = Gauge(
            "gateway_active_cascades",
            "Messages whose cascade has not finished.",
            registry=r,
        )
        self.deferred_messages = Gauge(
            "gateway_deferred_messages",
            "Active messages waiting for a send time.",
            registry=r,
        )
        self._pre_initialise(providers)

    def _pre_initialise(self, providers: dict[str, Channel]) -> None:
        for op in OPS:
            for result in ResultStatus:
                self.requests.labels(op, result.value)
        self.admissions.labels("admitted", "none")
        self.admissions.labels("duplicate", "none")
        for defer_reason in DeferReason:
            self.admissions.labels("deferred", defer_reason.value)
        for reason in RejectReason:
            self.admissions.labels("rejected", reason.value)
            self.gate_verdicts.labels("skip", reason.value)
            self.gate_verdicts.labels("stop", reason.value)
        self.gate_verdicts.labels("go", "none")
        for defer_reason in DeferReason:
            self.gate_verdicts.labels("hold", defer_reason.value)
        for channel in Channel:
            for kind in RECEIPT_KINDS:
                # push reports no delivery: no series at 0 to be mistaken for "none delivered"
                if kind != "delivered" or channel.reports_delivery:
                    self.receipts.labels(channel.value, kind)
            for step_result in ("sent", "failed", "skipped", "timed_out", "read", "delivered"):
                self.steps.labels(channel.value, step_result)
            for source in UNSUBSCRIBE_SOURCES:
                self.unsubscribes.labels(channel.value, source)
            for retry_kind in ("retry", "failover"):
                self.retries.labels(channel.value, retry_kind)
            self.cost.labels(channel.value)
            self.send_to_delivered.labels(channel.value)
            self.send_to_read.labels(channel.value)
        for name, channel in providers.items():
            for send_result in SEND_RESULTS:
                self.sends.labels(channel.value, name, send_result)
            for error_kind in PROVIDER_ERROR_KINDS:
                self.provider_errors.labels(name, error_kind)
            for verdict in WEBHOOK_VERDICTS:
                self.webhooks.labels(name, verdict)
            self.provider_duration.labels(name, channel.value)
        for lane in Lane:
            self.accept_to_send.labels(lane.value)
        for outcome in Outcome:
            for final in ("none", *(c.value for c in Channel)):
                for depth in range(len(Channel) + 1):
                    self.outcomes.labels(outcome.value, final, str(depth))
        for kind in ("click", "open", "unsubscribe"):
            for verdict in TRACKING_VERDICTS:
                self.tracking.labels(kind, verdict)
        for drop_reason in ("peer_gone", "peer_full"):
            self.replies_dropped.labels(drop_reason)
        for name in providers:
            self.receipt_duplicates.labels(name)
        for ingest_reason in INGEST_DROPS:
            self.ingest_dropped.labels(ingest_reason)
        for subscription_verdict in ("accepted", "refused"):
            self.subscriptions.labels(subscription_verdict)

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
