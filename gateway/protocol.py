"""The wire protocol: msgpack frames over ZeroMQ, decoded and validated with msgspec Structs.

A request frame is one msgpack map (one request) or an array of maps (a batch). Every map has
``v`` (protocol version) and ``op``: ``send``, ``cancel``, ``event``, ``consent`` or ``status``.
The reply has the same shape: one result for a map, a list of results in request order for an
array. Nothing a client sends can make the decoder raise: garbage, wrong types, unknown ops,
unknown fields and oversize frames each come back as a ``rejected``/``invalid`` result whose
``detail`` names the problem and where it is (``- at `$.recipient.email```).

Times are RFC 3339 strings in both directions (``2026-12-05T09:30:00Z``, an offset or ``Z``
required, fractions to nanoseconds accepted and kept to microseconds): every msgpack library
and every JSON Schema validator reads a string the same way, while msgpack timestamps decode
differently per language (JavaScript's Date drops microseconds). A msgpack timestamp in a
request is refused ``invalid``.

Status events are stored for the timeline and published on the PUB socket as two-frame
messages: the tenant (the topic), then a msgpack array of ``StatusEvent`` maps, oldest first.
``config/schema/cascadegw.schema.json`` is generated from these Structs (``cascadegw schema``)
and a test keeps it in sync; every rule the gateway checks that JSON Schema can say is in it
(``_SCHEMA_RULES``), and ``docs/protocol.md`` lists the few it cannot.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from functools import cache, lru_cache
from importlib import resources
from typing import Annotated, Any, Final

import msgspec

from gateway.core.consent import ConsentAction, ConsentKind
from gateway.core.model import Category, Channel, Lane, Outcome, RejectReason

PROTOCOL_VERSION: Final = 1
DEFAULT_MAX_FRAME_BYTES: Final = 4 * 1024 * 1024
DEFAULT_MAX_BATCH: Final = 1000

# Patterns end in ``$(?!\n)``: Python's ``$`` also matches before a final newline, JavaScript's
# does not, and the schema must mean the same in both (``"+79161234567\n"`` is not a phone).
# Whitespace is spelled out for the same reason: ``\s`` differs between the two engines.
_SPACE: Final = r"\x00-\x20\x7f-\x9f\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
MessageId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
TenantName = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$(?!\n)",
        description="lowercase letters, digits, '-' and '_'; at most 64 characters",
    ),
]
RecipientId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Label = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
_EMAIL_PATTERN: Final = f"^[^@{_SPACE}]+@[^@{_SPACE}]+\\.[^@{_SPACE}]+$(?!\\n)"
_PHONE_PATTERN: Final = r"^\+[1-9][0-9]{6,14}$(?!\n)"
# the patterns are checked by validate(), which says what is wrong in words, not in a regex
Email = Annotated[str, msgspec.Meta(max_length=254, extra_json_schema={"pattern": _EMAIL_PATTERN})]
Phone = Annotated[
    str,
    msgspec.Meta(
        max_length=16,
        description="E.164, e.g. +79161234567",
        extra_json_schema={"pattern": _PHONE_PATTERN},
    ),
]
Token = Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
ShortText = Annotated[str, msgspec.Meta(max_length=1024)]
Url = Annotated[str, msgspec.Meta(max_length=2048, pattern=r"^https?://")]
_TIME_PATTERN: Final = (
    # years 1970 to 2999: every such time converts to and from POSIX seconds on any platform
    r"^(19[7-9][0-9]|2[0-9]{3})-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-5][0-9]"
    r"(\.[0-9]{1,9})?([Zz]|[+-][0-9]{2}:[0-9]{2})$(?!\n)"
)
Timestamp = Annotated[
    str,
    msgspec.Meta(
        max_length=64,
        description="RFC 3339 date-time with an offset or Z, e.g. 2026-12-05T09:30:00Z "
        "(years 1970-2999, no leap seconds; fractions beyond microseconds are dropped)",
        # checked by validate(), which can say what is wrong in words rather than a regex
        extra_json_schema={"format": "date-time", "pattern": _TIME_PATTERN},
    ),
]
Seconds = Annotated[float, msgspec.Meta(gt=0, le=30 * 86400)]
Version = Annotated[int, msgspec.Meta(extra_json_schema={"const": 1})]
UtcTime = Annotated[datetime, msgspec.Meta(tz=True)]
"""A time the gateway sends: always UTC, an RFC 3339 string on the wire."""
"""The protocol version; checked in ``validate`` so the answer says which one is spoken."""


class _Struct(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """Wire Structs reject unknown fields: a typo such as ``expire_at`` must not pass silently."""


@cache
def time_zones() -> frozenset[str]:
    """The IANA zone names a recipient may have: those of the ``tzdata`` package, pinned, so
    the gateway and the published schema agree on every machine whatever its system tzdata
    (``zoneinfo`` loads any of them: it falls back to the package)."""
    listing = resources.files("tzdata").joinpath("zones").read_text()
    return frozenset(line.strip() for line in listing.splitlines() if line.strip())


RESERVED_DATA_KEYS: Final = frozenset({"from", "message_type"})
RESERVED_DATA_KEY_PREFIXES: Final = ("google", "gcm")
"""Push ``data`` keys FCM refuses: "The key should not be a reserved word ("from",
"message_type", or any word starting with "google" or "gcm")" (FCM's data message docs; the v1
reference names the narrower ``google.`` and ``gcm.notification.``, so the wider rule is the
safe one). Compared without case: a refused push fails for good, while a key that only looks
reserved is easily renamed by the CRM."""


def reserved_data_keys(data: Mapping[str, str]) -> list[str]:
    """The keys of a push's ``data`` that FCM reserves, sorted; empty when there are none."""
    return sorted(
        key
        for key in data
        if key.lower() in RESERVED_DATA_KEYS or key.lower().startswith(RESERVED_DATA_KEY_PREFIXES)
    )


# ---------------------------------------------------------------- send
class Recipient(_Struct, frozen=True):
    id: RecipientId
    tz: Annotated[
        str, msgspec.Meta(max_length=64, extra_json_schema={"enum": sorted(time_zones())})
    ] = "UTC"
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
    data: Annotated[
        dict[Annotated[str, msgspec.Meta(min_length=1, max_length=128)], ShortText],
        msgspec.Meta(max_length=32),
    ] = {}
    """Key-value data for the app (FCM carries at most 4 KB in all)."""


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
    v: Version
    id: MessageId
    """The CRM's message id; the idempotency key within the tenant."""
    tenant: TenantName
    recipient: Recipient
    category: Category
    content: Content
    topic: Label | None = None
    """Consent topic (e.g. ``promo``, ``orders``); defaults to the category."""
    priority: Lane = Lane.NORMAL
    channels: (
        Annotated[
            list[Channel],
            msgspec.Meta(min_length=1, max_length=4, extra_json_schema={"uniqueItems": True}),
        ]
        | None
    ) = None
    """Cascade order; defaults to the tenant's order. Every channel listed needs content."""
    step_timeout_seconds: Annotated[
        dict[Channel, Seconds],
        msgspec.Meta(extra_json_schema={"propertyNames": {"enum": [c.value for c in Channel]}}),
    ] = {}
    """Unread timeout per channel, overriding the configured ones."""
    send_at: Timestamp | None = None
    expires_at: Timestamp | None = None
    campaign: Label | None = None
    variant: Label | None = None
    experiment: Label | None = None
    """An experiment of the tenant's config: the gateway assigns the recipient a variant
    (recorded as ``variant`` = ``"{experiment}/{name}"``); ``variant`` must then be absent."""
    metadata: Annotated[
        dict[Annotated[str, msgspec.Meta(min_length=1, max_length=128)], ShortText],
        msgspec.Meta(max_length=32),
    ] = {}

    @property
    def effective_topic(self) -> str:
        return self.topic if self.topic is not None else self.category.value


# ---------------------------------------------------------------- other requests
class CancelRequest(_Struct, frozen=True, tag_field="op", tag="cancel"):
    v: Version
    id: MessageId
    tenant: TenantName
    reason: Label | None = None


class EventKind(enum.StrEnum):
    """What the CRM or the app reports about a message (e.g. the app saw a push opened)."""

    OPENED = "opened"
    CLICKED = "clicked"
    CONVERTED = "converted"


class EventRequest(_Struct, frozen=True, tag_field="op", tag="event"):
    v: Version
    id: MessageId
    tenant: TenantName
    kind: EventKind
    channel: Channel | None = None
    """Where it was read; defaults to the channel of the current step."""
    at: Timestamp | None = None


class ConsentRequest(_Struct, frozen=True, tag_field="op", tag="consent"):
    v: Version
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
    at: Timestamp | None = None
    """When the customer acted; defaults to when the gateway received it."""


class StatusRequest(_Struct, frozen=True, tag_field="op", tag="status"):
    v: Version
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
    at: UtcTime
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
    deferred_until: UtcTime | None = None
    timeline: list[StatusEvent] = []


class Result(msgspec.Struct, frozen=True, omit_defaults=True):
    status: ResultStatus
    id: str | None = None
    reason: RejectReason | None = None
    detail: str | None = None
    channels: list[Channel] | None = None
    """For ``accepted``: the channels the cascade may use, in order."""
    deferred_until: UtcTime | None = None
    message: MessageState | None = None
    """For ``duplicate`` and ``status``: the message's current state."""


def rejected(reason: RejectReason, detail: str, message_id: str | None = None) -> Result:
    return Result(ResultStatus.REJECTED, id=message_id, reason=reason, detail=detail)


_MAX_DETAIL_CHARS: Final = 300


def invalid(detail: str, message_id: str | None = None) -> Result:
    """An ``invalid`` result. Whatever of the request it quotes is clipped: a reply must never
    echo a client's megabytes back (a 4 MiB id, field name or time-zone value)."""
    if len(detail) > _MAX_DETAIL_CHARS:
        # keep where it is (" - at `$.path`"), clip what it quotes
        what, at, where = detail.rpartition(" - at `")
        if not at:
            what, where = detail, ""
        where = (at + where)[:120]
        detail = what[: _MAX_DETAIL_CHARS - len(where) - 3] + "..." + where
    if message_id is not None and not 1 <= len(message_id) <= 128:
        message_id = None  # not a valid id: not echoed either
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
    batch = data[0] in _ARRAY_MARKERS
    if size > max_frame_bytes:
        detail = f"frame of {size} bytes exceeds the {max_frame_bytes}-byte limit"
        if not batch:
            return Frame(False, [invalid(detail)])
        return Frame(True, _refuse_all(data, detail, max_batch))
    if not batch:
        return Frame(False, [_decode_one(data)], [bytes(data)])
    count = _array_length(data)
    if count is not None and count > max_batch:
        detail = f"batch of {count} requests exceeds the limit of {max_batch}"
        return Frame(True, _refuse_all(data, detail, max_batch))
    try:
        raws = _raw_list_decoder.decode(data)
    except _MALFORMED as exc:
        # an array that cannot be read: its requests cannot be counted, but the client sent
        # a batch and gets a list back
        return Frame(True, [invalid(f"malformed msgpack: {exc}")])
    return Frame(True, [_decode_one(raw) for raw in raws], [bytes(raw) for raw in raws])


_ARRAY_COUNT_WIDTHS: Final = {0xDC: 2, 0xDD: 4}
"""Bytes of the element count after an array16 / array32 marker."""


def _array_length(data: bytes | memoryview) -> int | None:
    """The element count a msgpack array header promises, or None when it cannot tell."""
    marker = data[0]
    if 0x90 <= marker <= 0x9F:
        return marker & 0x0F
    width = _ARRAY_COUNT_WIDTHS.get(marker)
    if width is None or len(data) < 1 + width:
        return None
    return int.from_bytes(data[1 : 1 + width], "big")


_REFUSALS_PER_BATCH_LIMIT: Final = 2
"""A batch refused whole gets one result per request (a client matches replies by position)
up to this many times ``max_batch`` requests; past that it is not a batch anybody meant, and
one result per element would answer a frame of nils with ninety times its size, unbounded."""


def _refuse_all(data: bytes | memoryview, detail: str, max_batch: int) -> list[Request | Result]:
    """One ``invalid`` per request of a batch refused whole (each keeps its id); one for an
    array that cannot even be read, or that holds far more than any batch may."""
    count = _array_length(data)
    if count is None or count > _REFUSALS_PER_BATCH_LIMIT * max_batch:
        return [invalid(detail)]
    try:
        raws = _raw_list_decoder.decode(data)
    except _MALFORMED:
        return [invalid(detail)]
    return [invalid(detail, _salvage_id(raw)) for raw in raws]


def _decode_one(data: bytes | memoryview | msgspec.Raw) -> Request | Result:
    try:
        request: Request = _request_decoder.decode(data)
    except msgspec.ValidationError as exc:
        detail = str(exc)
        if detail.startswith(("Expected `str`, got `ext`", "Expected `str | null`, got `ext`")):
            detail += " (times are RFC 3339 strings, not msgpack timestamps)"
        return invalid(detail, _salvage_id(data))
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
            if recipient.email is not None and not _EMAIL.match(recipient.email):
                return "not an email address - at `$.recipient.email`"
            if recipient.phone is not None and not _PHONE.match(recipient.phone):
                return "not an E.164 phone number (e.g. +79161234567) - at `$.recipient.phone`"
            if recipient.tz != "UTC" and recipient.tz not in time_zones():
                return f"unknown IANA time zone {recipient.tz[:64]!r} - at `$.recipient.tz`"
            for name in ("send_at", "expires_at"):
                problem = _time_problem(getattr(request, name), name)
                if problem is not None:
                    return problem
            if content.push is not None:
                reserved = reserved_data_keys(content.push.data)
                if reserved:
                    return (
                        f"FCM reserves the data keys {', '.join(map(repr, reserved))} (from, "
                        "message_type, google*, gcm*) - at `$.content.push.data`"
                    )
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
        case ConsentRequest(kind=kind, channel=scope, topic=topic, at=at):
            if kind is ConsentKind.PERSONAL_DATA and (scope is not None or topic is not None):
                return "personal-data consent is not per channel or topic - at `$.kind`"
            return _time_problem(at, "at")
        case EventRequest(at=at):
            return _time_problem(at, "at")
        case _:
            pass
    return None


_FRACTION: Final = re.compile(r"\.([0-9]+)")
_TIME: Final = re.compile(_TIME_PATTERN)
_EMAIL: Final = re.compile(_EMAIL_PATTERN)
_PHONE: Final = re.compile(_PHONE_PATTERN)


def parse_time(text: str) -> datetime:
    """An RFC 3339 string (``Timestamp``) as an aware datetime; fractions kept to microseconds.

    Raises:
        ValueError: not a real date and time (the pattern already holds, e.g. February 30).
    """
    fraction = _FRACTION.search(text)
    if fraction is not None and len(fraction.group(1)) > 6:
        text = text[: fraction.start(1) + 6] + text[fraction.end(1) :]
    moment = datetime.fromisoformat(text.upper())
    if moment.tzinfo is None:  # the pattern requires an offset; belt and braces
        raise ValueError("no UTC offset")
    return moment


_CLOCK_SKEW_SECONDS: Final = 300.0


def future_time(moment: str | None, now: float) -> str | None:
    """Why ``moment`` (when a customer or the app acted) cannot be taken at ``now``: it lies
    in the future, beyond the clock skew tolerated between machines."""
    if moment is not None and (epoch(moment) or 0.0) > now + _CLOCK_SKEW_SECONDS:
        return f"{moment!r} is in the future; when something happened cannot be - at `$.at`"
    return None


def _time_problem(text: str | None, name: str) -> str | None:
    if text is None:
        return None
    if not _TIME.match(text):
        return (
            f"{text[:40]!r} is not an RFC 3339 date-time with an offset or Z "
            f"(e.g. 2026-12-05T09:30:00Z) - at `$.{name}`"
        )
    try:
        parse_time(text)
    except ValueError:
        return f"{text!r} is not a real date and time - at `$.{name}`"
    return None


def _salvage_id(data: bytes | memoryview | msgspec.Raw) -> str | None:
    try:
        return _id_decoder.decode(data).id
    except (msgspec.ValidationError, *_MALFORMED):
        return None


def encode_reply(frame_is_batch: bool, results: list[Result]) -> bytes:
    if frame_is_batch:
        return encode(results)
    return encode(results[0])


def encode(value: object) -> bytes:
    """Msgpack for the wire: times become RFC 3339 strings (the journal keeps msgpack
    timestamps, so its rows stay as earlier versions wrote them)."""
    return _encoder.encode(msgspec.to_builtins(value))


def epoch(moment: str | None) -> float | None:
    """POSIX seconds of a validated ``Timestamp``."""
    return None if moment is None else parse_time(moment).timestamp()


_LAST_SECOND: Final = 32503680000.0 - 1  # 2999-12-31T23:59:59Z


@lru_cache(maxsize=1024)
def utc(seconds: float) -> datetime:
    """POSIX seconds as an aware UTC datetime; clamped to the protocol's years, so that no
    time a provider or a client sends can make a status event fail to encode.

    Memoised (datetimes are immutable): a frame's messages share one ``now``, and messages
    deferred by one quiet window share their ``deferred_until``."""
    return datetime.fromtimestamp(min(max(seconds, 0.0), _LAST_SECOND), UTC)


# ---------------------------------------------------------------- schema
def _present(name: str, value: dict[str, Any]) -> dict[str, Any]:
    """A subschema saying "``name`` is there, and ``value``" (the gateway takes a field
    that is null, or an empty text, as missing; ajv's strictRequired wants every required
    property defined where it is required)."""
    return {"type": "object", "required": [name], "properties": {name: value}}


_SCHEMA_RULES: Final[dict[str, dict[str, Any]]] = {
    # validate() checks each of these; the schema says them too, so a client validating
    # against the schema is never surprised by an `invalid` (tests/contract checks both agree)
    "Content": {
        "anyOf": [_present(channel.value, {"type": "object"}) for channel in Channel],
        "description": "Content for at least one channel; with `channels`, for each listed one.",
    },
    "EmailContent": {
        "anyOf": [
            _present("html", {"type": "string", "minLength": 1}),
            _present("text", {"type": "string", "minLength": 1}),
        ]
    },
    "ConsentRequest": {
        "if": {
            "type": "object",
            "required": ["kind"],
            "properties": {"kind": {"const": "personal_data"}},
        },
        "then": {
            "not": {
                "anyOf": [
                    _present("channel", {"not": {"type": "null"}}),
                    _present("topic", {"not": {"type": "null"}}),
                ]
            }
        },
        "description": "Personal-data consent is never per channel or topic.",
    },
}
_RESERVED_KEYS_PATTERN: Final = "^([Ff][Rr][Oo][Mm]|[Mm][Ee][Ss][Ss][Aa][Gg][Ee]_[Tt][Yy][Pp][Ee])$|^([Gg][Oo][Oo][Gg][Ll][Ee]|[Gg][Cc][Mm])"
_EXAMPLES: Final[dict[str, list[dict[str, Any]]]] = {
    "SendRequest": [
        {
            "v": 1,
            "op": "send",
            "id": "order-42-promo",
            "tenant": "demo",
            "recipient": {
                "id": "customer-1",
                "tz": "Europe/Moscow",
                "push_tokens": ["fcm-registration-token"],
                "email": "ann@example.com",
                "phone": "+79161234567",
            },
            "category": "promo",
            "content": {
                "push": {"title": "Sale", "body": "-50% {link}", "data": {"screen": "sale"}},
                "email": {"subject": "Sale", "html": "<a href='{link}'>Shop</a>"},
                "sms": {"text": "Sale -50% {link}"},
                "link_url": "https://shop.example/sale",
            },
            "campaign": "spring-sale",
            "send_at": "2026-12-05T09:30:00Z",
        }
    ],
    "CancelRequest": [
        {"v": 1, "op": "cancel", "id": "order-42-promo", "tenant": "demo", "reason": "bought"}
    ],
    "EventRequest": [
        {"v": 1, "op": "event", "id": "order-42-promo", "tenant": "demo", "kind": "opened"}
    ],
    "ConsentRequest": [
        {
            "v": 1,
            "op": "consent",
            "tenant": "demo",
            "recipient_id": "customer-1",
            "kind": "advertising",
            "action": "grant",
            "source": "signup-form",
            "channel": "email",
            "at": "2026-12-01T18:04:05.123456+03:00",
        }
    ],
    "StatusRequest": [{"v": 1, "op": "status", "id": "order-42-promo", "tenant": "demo"}],
}


def _without_discriminators(node: object) -> object:
    """msgspec marks tagged unions with OpenAPI's ``discriminator``, which is not JSON Schema:
    strict validators (ajv) refuse it; the ``op`` const of each branch says the same."""
    if isinstance(node, dict):
        return {k: _without_discriminators(v) for k, v in node.items() if k != "discriminator"}
    if isinstance(node, list):
        return [_without_discriminators(item) for item in node]
    return node


def json_schema() -> dict[str, object]:
    """JSON Schema for every wire type: requests, a request frame, results and status events.

    It describes the wire exactly: times are RFC 3339 strings, every rule of ``validate`` that
    JSON Schema can express is in it, and it loads in ajv's strict mode and in Python's
    ``jsonschema`` (both checked by tests/contract).
    """
    (request, result, event), components = msgspec.json.schema_components(
        [Request, Result, StatusEvent], ref_template="#/$defs/{name}"
    )
    components = {name: dict(schema) for name, schema in components.items()}
    for name, rules in _SCHEMA_RULES.items():
        components[name].update(rules)
    push_data = components["PushContent"]["properties"]["data"]
    push_data["propertyNames"] = {
        "not": {"pattern": _RESERVED_KEYS_PATTERN},
        "description": "FCM reserves from, message_type and keys starting with google or gcm.",
    }
    for name, examples in _EXAMPLES.items():
        components[name]["examples"] = examples
    batch = {"type": "array", "items": request, "maxItems": DEFAULT_MAX_BATCH}
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://cascadegw.dev/schema/v1",
        "title": "cascadegw wire protocol v1 (msgpack over ZeroMQ)",
        "description": (
            "A request frame is one Request map or an array of at most 1000 of them; the reply "
            "is one Result for a map, or an array with one Result per request, in order, for "
            "an array. Status events are published on the XPUB socket as two frames: the "
            "tenant name (the topic) and a StatusEventMessage. Times are RFC 3339 strings. "
            "See docs/protocol.md."
        ),
        "oneOf": [request, batch],
        "$defs": {
            **components,
            "Request": request,
            "RequestFrame": {"oneOf": [request, batch]},
            "ReplyFrame": {"oneOf": [result, {"type": "array", "items": result}]},
            "StatusEventMessage": {"type": "array", "items": event},
        },
    }
    cleaned = _without_discriminators(schema)
    assert isinstance(cleaned, dict)
    return cleaned


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
