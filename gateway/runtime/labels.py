"""The label values of the gateway's metrics that are not already core or protocol enums.

``gateway.runtime.metrics`` takes these (and ``Channel``, ``Lane``, ``Outcome``,
``RejectReason``, ``DeferReason``, ``ResultStatus``) so no label is a string typed by hand.
"""

from __future__ import annotations

import enum


class Op(enum.StrEnum):
    """A request's op; ``invalid`` when it could not be read as any."""

    SEND = "send"
    CANCEL = "cancel"
    EVENT = "event"
    CONSENT = "consent"
    STATUS = "status"
    INVALID = "invalid"


class Step(enum.StrEnum):
    """How a cascade step ended (``gateway_cascade_steps_total{result}``)."""

    SENT = "sent"
    FAILED = "failed"
    SKIPPED = "skipped"
    TIMED_OUT = "timed_out"
    READ = "read"
    DELIVERED = "delivered"


class Gate(enum.StrEnum):
    """The pre-send policy verdict (``gateway_policy_gate_total{verdict}``)."""

    GO = "go"
    HOLD = "hold"
    SKIP = "skip"
    STOP = "stop"


class ReceiptMetric(enum.StrEnum):
    """A delivery or engagement fact (``gateway_receipts_total{kind}``); a bounce is also a
    failure on the message's timeline, but counted apart here."""

    DELIVERED = "delivered"
    READ = "read"
    CLICKED = "clicked"
    CONVERTED = "converted"
    FAILED = "failed"
    BOUNCED = "bounced"
    UNSUBSCRIBED = "unsubscribed"


class OptOutSource(enum.StrEnum):
    """Where an advertising withdrawal came from (``gateway_unsubscribes_total{source}``)."""

    API = "api"
    ONE_CLICK = "one_click"
    PROVIDER = "provider"


class SendResult(enum.StrEnum):
    OK = "ok"
    TRANSIENT_ERROR = "transient_error"
    PERMANENT_ERROR = "permanent_error"


class RetryKind(enum.StrEnum):
    RETRY = "retry"
    FAILOVER = "failover"


class IngestDrop(enum.StrEnum):
    TOO_MANY_PARTS = "too_many_parts"
    ENVELOPE_TOO_LARGE = "envelope_too_large"


class ReplyDrop(enum.StrEnum):
    PEER_GONE = "peer_gone"
    PEER_FULL = "peer_full"
