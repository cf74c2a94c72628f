"""The wire protocol: msgpack frames over ZeroMQ, decoded and validated with msgspec Structs.

A request frame is one msgpack map (one request) or an array of maps (a batch). Every map has
``v`` (protocol version) and ``op``: ``send``, ``cancel``, ``event``, ``consent`` or ``status``.
The reply has the same shape: one result for a map, a list of results in request order for an
array. Nothing a client sends can make the decoder raise: garbage, wrong types, unknown ops,
unknown fields and oversize frames each come back as a ``rejected``/``invalid`` result whose
``detail`` names the problem and where it is (``- at `$.recipient.email```).

Status events are stored for the timeline and published on the PUB socket as two-frame
messages: the tenant (the topic), then a msgpack array of ``StatusEvent`` maps, oldest first. ``config/schema/cascadegw.schema.json`` is generated from these Structs
(``cascadegw schema``) and a test keeps it in sync.
"""

from __future__ import annotations

import enum
import zoneinfo
from datetime import UTC, datetime
from functools import cache
from typing import Annotated, Final

import msgspec

from gateway.core.consent import ConsentAction, ConsentKind
from gateway.core.model import Category, Channel, Lane, Outcome, RejectReason

PROTOCOL_VERSION: Final = 1
DEFAULT_MAX_FRAME_BYTES: Final = 4 * 1024 * 1024
DEFAULT_MAX_BATCH: Final = 1000

MessageId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
TenantName = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$",
        description="lowercase letters, digits, '-' and '_'; at most 64 characters",
    ),
]
RecipientId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Label = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Email = Annotated[
    str,
    msgspec.Meta(max_length=254, pattern=r"^[^@\s\x00-\x1f]+@[^@\s\x00-\x1f]+\.[^@\s\x00-\x1f]+$"),
]
Phone = Annotated[
    str, msgspec.Meta(pattern=r"^\+[1-9][0-9]{6,14}$", description="E.164, e.g. +79161234567")
]
Token = Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
Url = Annotated[str, msgspec.Meta(max_length=2048, pattern=r"^https?://")]
AwareDatetime = Annotated[datetime, msgspec.Meta(tz=True)]
Seconds = Annotated[float, msgspec.Meta(gt=0, le=30 * 86400)]


class _Struct(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """Wire Structs reject unknown fields: a typo such as ``expire_at`` must not pass silently."""


@cache
def _time_zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


# ---------------------------------------------------------------- send
class Recipient(_Struct, frozen=True):
    id: RecipientId
    tz: str = "UTC"
    """IANA time zone of the recipient, for quiet hours (e.g. ``Europe/Moscow``)."""
    push_tokens: Annotated[list[Token], msgspec.Meta(max_length=16)] = []
    email: Email | None = None
    viber_id: Token | None = None
    phone: Phone | None = None

    def has_address(self, channel: Channel) -> bool:
        match channel:
            case Channel.PUSH:
                return bool(self.push_tokens)
            case Channel.EMAIL:
                return self.email is not None
            case Channel.VIBER:
                return self.viber_id is not None
            case Channel.SMS:
                return self.phone is not None


class PushContent(_Struct, frozen=True):
    title: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    body: Annotated[str, msgspec.Meta(min_length=1, max_length=4000)]
    data: dict[str, str] = {}


class EmailContent(_Struct, frozen=True):
    subject: Annotated[str, msgspec.Meta(min_length=1, max_length=998)]
    html: Annotated[str, msgspec.Meta(max_length=1024 * 1024)] | None = None
    text: Annotated[str, msgspec.Meta(max_length=1024 * 1024)] | None = None


class ViberContent(_Struct, frozen=True):
    text: Annotated[str, msgspec.Meta(min_length=1, max_length=7000)]
    image_url: Url | None = None
    button_text: Annotated[str, msgspec.Meta(min_length=1, max_length=30)] | None = None


class SmsContent(_Struct, frozen=True):
    text: Annotated[str, msgspec.Meta(min_length=1, max_length=1600)]


class Content(_Struct, frozen=True):
    """Content per channel. ``{link}`` in any text is replaced by the tracked ``link_url``."""

    push: PushContent | None = None
    email: EmailContent | None = None
    viber: ViberContent | None = None
    sms: SmsContent | None = None
    link_url: Url | None = None

    def has(self, channel: Channel) -> bool:
        return getattr(self, channel.value) is not None


class SendRequest(_Struct, frozen=True, tag_field="op", tag="send"):
    v: int
    id: MessageId
    """The CRM's message id; the idempotency key within the tenant."""
    tenant: TenantName
    recipient: Recipient
    category: Category
    content: Content
    topic: Label | None = None
    """Consent topic (e.g. ``promo``, ``orders``); defaults to the category."""
    priority: Lane = Lane.NORMAL
    channels: Annotated[list[Channel], msgspec.Meta(min_length=1, max_length=4)] | None = None
    """Cascade order; defaults to the tenant's order. Every channel listed needs content."""
    step_timeout_seconds: dict[Channel, Seconds] = {}
    """Unread timeout per channel, overriding the configured ones."""
    send_at: AwareDatetime | None = None
    expires_at: AwareDatetime | None = None
    campaign: Label | None = None
    variant: Label | None = None
    metadata: Annotated[dict[str, str], msgspec.Meta(max_length=32)] = {}

    @property
    def effective_topic(self) -> str:
        return self.topic if self.topic is not None else self.category.value


# ---------------------------------------------------------------- other requests
class CancelRequest(_Struct, frozen=True, tag_field="op", tag="cancel"):
    v: int
    id: MessageId
    tenant: TenantName
    reason: Label | None = None


class EventKind(enum.StrEnum):
    """What the CRM or the app reports about a message (e.g. the app saw a push opened)."""

    OPENED = "opened"
    CLICKED = "clicked"
    CONVERTED = "converted"


class EventRequest(_Struct, frozen=True, tag_field="op", tag="event"):
    v: int
    id: MessageId
    tenant: TenantName
    kind: EventKind
    channel: Channel | None = None
    """Where it was read; defaults to the channel of the current step."""
    at: AwareDatetime | None = None


class ConsentRequest(_Struct, frozen=True, tag_field="op", tag="consent"):
    v: int
    tenant: TenantName
    recipient_id: RecipientId
    kind: ConsentKind
    action: ConsentAction
    source: Label
    channel: Channel | None = None
    """Advertising consent only; ``None`` means every channel."""
    topic: Label | None = None
    """Advertising consent only; ``None`` means every topic."""
    reason: Annotated[str, msgspec.Meta(max_length=1000)] | None = None
    at: AwareDatetime | None = None
    """When the customer acted; defaults to when the gateway received it."""


class StatusRequest(_Struct, frozen=True, tag_field="op", tag="status"):
    v: int
    id: MessageId
    tenant: TenantName


Request = SendRequest | CancelRequest | EventRequest | ConsentRequest | StatusRequest


# ---------------------------------------------------------------- status events
class StatusKind(enum.StrEnum):
    ACCEPTED = "accepted"
    DEFERRED = "deferred"
    SENT = "sent"
    DELIVERED = "delivered"
    READ = "read"
    CLICKED = "clicked"
    CONVERTED = "converted"
    FAILED = "failed"
    RETRYING = "retrying"
    STEP_TIMEOUT = "step_timeout"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    EXHAUSTED = "exhausted"
    UNSUBSCRIBED = "unsubscribed"
    DROPPED = "dropped"
    NO_CHANNEL = "no_channel"
    HOLDOUT = "holdout"


FINAL_KIND: Final = {
    Outcome.READ: StatusKind.READ,
    Outcome.CLICKED: StatusKind.CLICKED,
    Outcome.CONVERTED: StatusKind.CONVERTED,
    Outcome.DELIVERED: StatusKind.DELIVERED,
    Outcome.EXHAUSTED: StatusKind.EXHAUSTED,
    Outcome.CANCELLED: StatusKind.CANCELLED,
    Outcome.EXPIRED: StatusKind.EXPIRED,
    Outcome.UNSUBSCRIBED: StatusKind.UNSUBSCRIBED,
    Outcome.DROPPED: StatusKind.DROPPED,
    Outcome.NO_CHANNEL: StatusKind.NO_CHANNEL,
    Outcome.HOLDOUT: StatusKind.HOLDOUT,
}
"""The status event that ends a timeline, per outcome; it carries ``final: true``."""


class StatusEvent(msgspec.Struct, frozen=True, omit_defaults=True):
    """One state change of a message. ``final`` marks the last one; its kind is the outcome."""

    tenant: str
    id: str
    kind: StatusKind
    at: datetime
    final: bool = False
    channel: Channel | None = None
    provider: str | None = None
    detail: str | None = None


# ---------------------------------------------------------------- results
class ResultStatus(enum.StrEnum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"
    OK = "ok"


class MessageState(msgspec.Struct, frozen=True, omit_defaults=True):
    """Where a message stands: ``deferred``, ``sending``, ``awaiting`` or ``finished``."""

    state: str
    channel: Channel | None = None
    outcome: Outcome | None = None
    channels: list[Channel] = []
    deferred_until: datetime | None = None
    timeline: list[StatusEvent] = []


class Result(msgspec.Struct, frozen=True, omit_defaults=True):
    status: ResultStatus
    id: str | None = None
    reason: RejectReason | None = None
    detail: str | None = None
    channels: list[Channel] | None = None
    """For ``accepted``: the channels the cascade may use, in order."""
    deferred_until: datetime | None = None
    message: MessageState | None = None
    """For ``duplicate`` and ``status``: the message's current state."""


def rejected(reason: RejectReason, detail: str, message_id: str | None = None) -> Result:
    return Result(ResultStatus.REJECTED, id=message_id, reason=reason, detail=detail)


def invalid(detail: str, message_id: str | None = None) -> Result:
    return rejected(RejectReason.INVALID, detail, message_id)


# ---------------------------------------------------------------- frames
class _AnyId(msgspec.Struct):
    """Fishes the ``id`` out of an invalid request so its result can name it."""

    id: str | None = None


_request_decoder: Final = msgspec.msgpack.Decoder(Request)
_id_decoder: Final = msgspec.msgpack.Decoder(_AnyId)
_raw_list_decoder: Final = msgspec.msgpack.Decoder(list[msgspec.Raw])
_encoder: Final = msgspec.msgpack.Encoder()
_ARRAY_MARKERS: Final = frozenset({*range(0x90, 0xA0), 0xDC, 0xDD})
# msgspec signals malformed input with more than DecodeError: invalid UTF-8 in a str raises
# UnicodeDecodeError and deep nesting RecursionError (both found by the ingest fuzz test).
_MALFORMED: Final = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


class Frame(msgspec.Struct):
    """A decoded request frame: one entry per request, each a Request or its invalid Result.

    ``raws`` holds each request's own msgpack bytes (same positions), so the journal stores the
    request as the client sent it without encoding it again.
    """

    batch: bool
    items: list[Request | Result]
    raws: list[bytes] = []


def decode_frame(
    data: bytes | memoryview,
    *,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> Frame:
    """Decode one request frame; never raises for any input."""
    size = len(data)
    if size == 0:
        return Frame(False, [invalid("empty frame")])
    if size > max_frame_bytes:
        return Frame(
            False, [invalid(f"frame of {size} bytes exceeds the {max_frame_bytes}-byte limit")]
        )
    if data[0] not in _ARRAY_MARKERS:
        return Frame(False, [_decode_one(data)], [bytes(data)])
    try:
        raws = _raw_list_decoder.decode(data)
    except _MALFORMED as exc:
        return Frame(False, [invalid(f"malformed msgpack: {exc}")])
    if len(raws) > max_batch:
        return Frame(
            False, [invalid(f"batch of {len(raws)} requests exceeds the limit of {max_batch}")]
        )
    return Frame(True, [_decode_one(raw) for raw in raws], [bytes(raw) for raw in raws])


def _decode_one(data: bytes | memoryview | msgspec.Raw) -> Request | Result:
    try:
        request: Request = _request_decoder.decode(data)
    except msgspec.ValidationError as exc:
        return invalid(str(exc), _salvage_id(data))
    except _MALFORMED as exc:
        return invalid(f"malformed msgpack: {exc}")
    problem = validate(request)
    if problem is not None:
        return invalid(problem, getattr(request, "id", None))
    return request


def validate(request: Request) -> str | None:
    """The checks a type cannot express; returns what is wrong, in msgspec's style, or None.

    One function instead of ``__post_init__`` hooks: it runs once per request rather than once
    per nested Struct, which halves the decode cost of a ``send``.
    """
    if request.v != PROTOCOL_VERSION:
        return f"unsupported protocol version {request.v}, this gateway speaks {PROTOCOL_VERSION} - at `$.v`"
    match request:
        case SendRequest(recipient=recipient, content=content, channels=channels):
            if recipient.tz != "UTC" and recipient.tz not in _time_zones():
                return f"unknown IANA time zone {recipient.tz!r} - at `$.recipient.tz`"
            if content.email is not None and not (content.email.html or content.email.text):
                return "email content needs `html` or `text` - at `$.content.email`"
            if channels is not None:
                if len(set(channels)) != len(channels):
                    return "a channel is listed twice - at `$.channels`"
                for channel in channels:
                    if not content.has(channel):
                        return f"no content for requested channel {channel.value} - at `$.content`"
            elif (
                content.push is None
                and content.email is None
                and content.viber is None
                and content.sms is None
            ):
                return "no content for any channel - at `$.content`"
        case ConsentRequest(kind=ConsentKind.PERSONAL_DATA, channel=scope, topic=topic):
            if scope is not None or topic is not None:
                return "personal-data consent is not per channel or topic - at `$.kind`"
        case _:
            pass
    return None


def _salvage_id(data: bytes | memoryview | msgspec.Raw) -> str | None:
    try:
        return _id_decoder.decode(data).id
    except (msgspec.ValidationError, *_MALFORMED):
        return None


def encode_reply(frame_is_batch: bool, results: list[Result]) -> bytes:
    if frame_is_batch:
        return _encoder.encode(results)
    return _encoder.encode(results[0])


def encode(value: object) -> bytes:
    return _encoder.encode(value)


def epoch(moment: datetime | None) -> float | None:
    return None if moment is None else moment.timestamp()


def utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


# ---------------------------------------------------------------- schema
def json_schema() -> dict[str, object]:
    """JSON Schema for every wire type: requests, a request frame, results and status events."""
    (request, result, event), components = msgspec.json.schema_components(
        [Request, Result, StatusEvent], ref_template="#/$defs/{name}"
    )
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://cascadegw.dev/schema/v1",
        "title": "cascadegw wire protocol v1 (msgpack over ZeroMQ)",
        "description": (
            "A request frame is one Request map or an array of them; the reply is one Result "
            "or an array of Results in the same order. StatusEvents are published on the PUB "
            "socket with the tenant as topic."
        ),
        "oneOf": [request, {"type": "array", "items": request}],
        "$defs": {
            **components,
            "Request": request,
            "RequestFrame": {"oneOf": [request, {"type": "array", "items": request}]},
            "ReplyFrame": {"oneOf": [result, {"type": "array", "items": result}]},
            "StatusEventMessage": {"type": "array", "items": event},
        },
    }


__all__ = [
    "DEFAULT_MAX_BATCH",
    "DEFAULT_MAX_FRAME_BYTES",
    "PROTOCOL_VERSION",
    "CancelRequest",
    "ConsentRequest",
    "Content",
    "EmailContent",
    "EventKind",
    "EventRequest",
    "Frame",
    "MessageState",
    "PushContent",
    "Recipient",
    "Request",
    "Result",
    "ResultStatus",
    "SendRequest",
    "SmsContent",
    "StatusEvent",
    "StatusKind",
    "StatusRequest",
    "ViberContent",
    "decode_frame",
    "encode_reply",
    "json_schema",
]
