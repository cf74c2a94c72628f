"""The wire protocol: what CRMs pack with any msgpack library decodes, and nothing else raises.

Frames here are packed with the plain ``msgpack`` library, as a CRM would, never with msgspec.
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.consent import ConsentAction, ConsentKind
from gateway.core.model import Category, Channel, Lane, RejectReason
from gateway.protocol import (
    CancelRequest,
    ConsentRequest,
    Content,
    EmailContent,
    EventKind,
    EventRequest,
    Frame,
    PushContent,
    Recipient,
    Request,
    Result,
    ResultStatus,
    SendRequest,
    SmsContent,
    StatusRequest,
    ViberContent,
    decode_frame,
    encode_reply,
    json_schema,
    validate,
)

SCHEMA_PATH = Path(__file__).parents[2] / "config" / "schema" / "cascadegw.schema.json"
MSK = timezone(timedelta(hours=3))
SEND_AT = "2026-05-01T09:00:00Z"

Wire = dict[str, Any]
"""A request as a CRM builds it before packing."""

SEND: Wire = {
    "v": 1,
    "op": "send",
    "id": "order-1001",
    "tenant": "demo",
    "recipient": {
        "id": "cust-42",
        "tz": "Europe/Moscow",
        "push_tokens": ["fcm-token-1"],
        "email": "anna@example.com",
        "viber_id": "viber-42",
        "phone": "+79161234567",
    },
    "category": "promo",
    "content": {
        "push": {"title": "Sale", "body": "Starts today", "data": {"screen": "sale"}},
        "email": {"subject": "Sale", "html": "<p>Starts today {link}</p>"},
        "viber": {"text": "Sale starts today", "image_url": "https://demo.example/sale.png"},
        "sms": {"text": "Sale: {link}"},
        "link_url": "https://demo.example/sale",
    },
    "topic": "promo",
    "priority": "bulk",
    "channels": ["push", "email", "viber", "sms"],
    "step_timeout_seconds": {"push": 60.0},
    "send_at": SEND_AT,  # times are RFC 3339 strings, UTC ...
    "expires_at": "2026-05-02T09:00:00+03:00",  # ... or with an offset
    "campaign": "spring",
    "variant": "b",
    "metadata": {"segment": "sleeping"},
}
MINIMAL_SEND: Wire = {
    "v": 1,
    "op": "send",
    "id": "otp-1",
    "tenant": "demo",
    "recipient": {"id": "cust-42", "phone": "+79161234567"},
    "category": "service",
    "content": {"sms": {"text": "Code 1234"}},
}
CANCEL: Wire = {"v": 1, "op": "cancel", "id": "order-1001", "tenant": "demo", "reason": "bought"}
EVENT: Wire = {
    "v": 1,
    "op": "event",
    "id": "order-1001",
    "tenant": "demo",
    "kind": "opened",
    "channel": "push",
    "at": SEND_AT,
}
CONSENT: Wire = {
    "v": 1,
    "op": "consent",
    "tenant": "demo",
    "recipient_id": "cust-42",
    "kind": "advertising",
    "action": "withdraw",
    "source": "unsubscribe-link",
    "channel": "email",
    "topic": "promo",
    "reason": "too many emails",
    "at": "2026-05-01T12:00:00Z",
}
PERSONAL_DATA: Wire = {
    "v": 1,
    "op": "consent",
    "tenant": "demo",
    "recipient_id": "cust-42",
    "kind": "personal_data",
    "action": "grant",
    "source": "signup-form",
}
STATUS: Wire = {"v": 1, "op": "status", "id": "order-1001", "tenant": "demo"}

DECODED: list[tuple[Wire, Request]] = [
    (
        SEND,
        SendRequest(
            v=1,
            id="order-1001",
            tenant="demo",
            recipient=Recipient(
                id="cust-42",
                tz="Europe/Moscow",
                push_tokens=["fcm-token-1"],
                email="anna@example.com",
                viber_id="viber-42",
                phone="+79161234567",
            ),
            category=Category.PROMO,
            content=Content(
                push=PushContent("Sale", "Starts today", {"screen": "sale"}),
                email=EmailContent("Sale", html="<p>Starts today {link}</p>"),
                viber=ViberContent("Sale starts today", "https://demo.example/sale.png"),
                sms=SmsContent("Sale: {link}"),
                link_url="https://demo.example/sale",
            ),
            topic="promo",
            priority=Lane.BULK,
            channels=[Channel.PUSH, Channel.EMAIL, Channel.VIBER, Channel.SMS],
            step_timeout_seconds={Channel.PUSH: 60.0},
            send_at=SEND_AT,
            expires_at="2026-05-02T09:00:00+03:00",
            campaign="spring",
            variant="b",
            metadata={"segment": "sleeping"},
        ),
    ),
    (
        MINIMAL_SEND,
        SendRequest(
            v=1,
            id="otp-1",
            tenant="demo",
            recipient=Recipient(id="cust-42", phone="+79161234567"),
            category=Category.SERVICE,
            content=Content(sms=SmsContent("Code 1234")),
        ),
    ),
    (CANCEL, CancelRequest(v=1, id="order-1001", tenant="demo", reason="bought")),
    (
        EVENT,
        EventRequest(
            v=1,
            id="order-1001",
            tenant="demo",
            kind=EventKind.OPENED,
            channel=Channel.PUSH,
            at=SEND_AT,
        ),
    ),
    (
        CONSENT,
        ConsentRequest(
            v=1,
            tenant="demo",
            recipient_id="cust-42",
            kind=ConsentKind.ADVERTISING,
            action=ConsentAction.WITHDRAW,
            source="unsubscribe-link",
            channel=Channel.EMAIL,
            topic="promo",
            reason="too many emails",
            at="2026-05-01T12:00:00Z",
        ),
    ),
    (
        PERSONAL_DATA,
        ConsentRequest(
            v=1,
            tenant="demo",
            recipient_id="cust-42",
            kind=ConsentKind.PERSONAL_DATA,
            action=ConsentAction.GRANT,
            source="signup-form",
        ),
    ),
    (STATUS, StatusRequest(v=1, id="order-1001", tenant="demo")),
]
VALID: list[Wire] = [wire for wire, _ in DECODED]
REQUEST_TYPES = (SendRequest, CancelRequest, EventRequest, ConsentRequest, StatusRequest)
IDS = ["send", "send-minimal", "cancel", "event", "consent", "consent-personal-data", "status"]


def pack(value: object) -> bytes:
    """Pack like a CRM using the plain msgpack library."""
    packed: bytes = msgpack.packb(value, datetime=True)
    return packed


def with_(wire: Wire, path: str, value: object) -> Wire:
    """A deep copy of ``wire`` with the dotted ``path`` set to ``value``."""
    copy: Wire = msgpack.unpackb(pack(wire))
    *parents, last = path.split(".")
    node = copy
    for part in parents:
        node = node[part]
    node[last] = value
    return copy


def without(wire: Wire, path: str) -> Wire:
    copy: Wire = msgpack.unpackb(pack(wire))
    *parents, last = path.split(".")
    node = copy
    for part in parents:
        node = node[part]
    del node[last]
    return copy


def invalid(detail: str, message_id: str | None = None) -> Result:
    return Result(ResultStatus.REJECTED, id=message_id, reason=RejectReason.INVALID, detail=detail)


def assert_well_formed(frame: Frame) -> None:
    """What any frame must decode to: valid requests, or invalid results that say why."""
    assert frame.batch or 1 == len(frame.items)
    for item in frame.items:
        if isinstance(item, Result):
            assert (ResultStatus.REJECTED, RejectReason.INVALID) == (item.status, item.reason)
            assert item.detail, "an invalid result must say what is wrong"
        else:
            assert isinstance(item, REQUEST_TYPES)
            assert validate(item) is None


class TestDecodeWire:
    """Every op decodes from frames packed by the plain msgpack library, alone or in a batch."""

    @pytest.mark.parametrize(("wire", "expected"), DECODED, ids=IDS)
    def test_single(self, wire: Wire, expected: Request) -> None:
        data = pack(wire)

        actual = decode_frame(data)

        assert Frame(False, [expected], [data]) == actual

    @pytest.mark.parametrize(("wire", "expected"), DECODED, ids=IDS)
    def test_memoryview(self, wire: Wire, expected: Request) -> None:
        # pyzmq hands out frames as memoryviews with copy=False
        assert [expected] == decode_frame(memoryview(pack(wire))).items

    def test_batch_keeps_order(self) -> None:
        expected = Frame(True, [request for _, request in DECODED], [pack(w) for w in VALID])

        assert expected == decode_frame(pack(VALID))

    def test_batch_of_one_is_still_a_batch(self) -> None:
        assert Frame(True, [DECODED[2][1]], [pack(CANCEL)]) == decode_frame(pack([CANCEL]))

    def test_empty_batch(self) -> None:
        assert Frame(True, [], []) == decode_frame(pack([]))

    def test_array32_batch(self) -> None:
        # 0xdd: a CRM library may pick the widest array header; it is still a batch
        data = b"\xdd\x00\x00\x00\x01" + pack(STATUS)

        assert Frame(True, [DECODED[-1][1]], [pack(STATUS)]) == decode_frame(data)

    def test_reply_has_one_result_per_request_in_order(self) -> None:
        frame = decode_frame(pack([CANCEL, {"v": 1, "op": "bogus", "id": "x"}, STATUS]))
        results = [
            item
            if isinstance(item, Result)
            else Result(ResultStatus.OK, id=getattr(item, "id", None))
            for item in frame.items
        ]

        actual = msgpack.unpackb(encode_reply(frame.batch, results))

        expected = [
            {"status": "ok", "id": "order-1001"},
            {
                "status": "rejected",
                "id": "x",
                "reason": "invalid",
                "detail": "Invalid value 'bogus' - at `$.op`",
            },
            {"status": "ok", "id": "order-1001"},
        ]
        assert expected == actual

    def test_reply_to_a_single_request_is_a_map(self) -> None:
        result = Result(ResultStatus.ACCEPTED, id="otp-1", channels=[Channel.SMS])

        actual = msgpack.unpackb(encode_reply(False, [result]))

        assert {"status": "accepted", "id": "otp-1", "channels": ["sms"]} == actual


# ---------------------------------------------------------------- precise details
REJECTIONS: dict[str, tuple[object, Result]] = {
    "wrong type names the path": (
        with_(SEND, "recipient.email", 42),
        invalid("Expected `str | null`, got `int` - at `$.recipient.email`", "order-1001"),
    ),
    "wrong nested type in a list": (
        with_(SEND, "channels", ["push", 7]),
        invalid("Expected `str`, got `int` - at `$.channels[1]`", "order-1001"),
    ),
    "unknown op": (
        {"v": 1, "op": "resend", "id": "order-1001", "tenant": "demo"},
        invalid("Invalid value 'resend' - at `$.op`", "order-1001"),
    ),
    "missing op": (
        {"v": 1, "id": "order-1001", "tenant": "demo"},
        invalid("Object missing required field `op`", "order-1001"),
    ),
    "unknown field": (
        with_(CANCEL, "expire_at", 5),
        invalid("Object contains unknown field `expire_at`", "order-1001"),
    ),
    "unknown nested field": (
        with_(SEND, "recipient.mail", "anna@example.com"),
        invalid("Object contains unknown field `mail` - at `$.recipient`", "order-1001"),
    ),
    "missing field": (
        without(STATUS, "tenant"),
        invalid("Object missing required field `tenant`", "order-1001"),
    ),
    "missing id": (without(CANCEL, "id"), invalid("Object missing required field `id`")),
    "unsupported version": (
        with_(STATUS, "v", 2),
        invalid(
            "unsupported protocol version 2, this gateway speaks 1 - at `$.v`",
            "order-1001",
        ),
    ),
    "unknown time zone": (
        with_(SEND, "recipient.tz", "Mars/Olympus_Mons"),
        invalid("unknown IANA time zone 'Mars/Olympus_Mons' - at `$.recipient.tz`", "order-1001"),
    ),
    "naive send_at": (
        with_(SEND, "send_at", "2026-05-01T09:00:00"),
        invalid(
            "'2026-05-01T09:00:00' is not an RFC 3339 date-time with an offset or Z "
            "(e.g. 2026-12-05T09:30:00Z) - at `$.send_at`",
            "order-1001",
        ),
    ),
    "leap second": (
        with_(SEND, "send_at", "2016-12-31T23:59:60Z"),
        invalid(
            "'2016-12-31T23:59:60Z' is not an RFC 3339 date-time with an offset or Z "
            "(e.g. 2026-12-05T09:30:00Z) - at `$.send_at`",
            "order-1001",
        ),
    ),
    "no such day": (
        with_(EVENT, "at", "2026-02-30T09:00:00Z"),
        invalid("'2026-02-30T09:00:00Z' is not a real date and time - at `$.at`", "order-1001"),
    ),
    "msgpack timestamp": (
        with_(CONSENT, "at", datetime(2026, 5, 1, tzinfo=UTC)),
        invalid(
            "Expected `str | null`, got `ext` - at `$.at` "
            "(times are RFC 3339 strings, not msgpack timestamps)"
        ),
    ),
    "reserved FCM data key": (
        with_(SEND, "content.push.data", {"screen": "sale", "Google.c.a.e": "1"}),
        invalid(
            "FCM reserves the data keys 'Google.c.a.e' (from, message_type, google*, gcm*) "
            "- at `$.content.push.data`",
            "order-1001",
        ),
    ),
    "duplicate channel": (
        with_(SEND, "channels", ["push", "sms", "push"]),
        invalid("a channel is listed twice - at `$.channels`", "order-1001"),
    ),
    "channel requested without content": (
        with_(MINIMAL_SEND, "channels", ["sms", "email"]),
        invalid("no content for requested channel email - at `$.content`", "otp-1"),
    ),
    "no content at all": (
        with_(MINIMAL_SEND, "content", {"link_url": "https://demo.example/"}),
        invalid("no content for any channel - at `$.content`", "otp-1"),
    ),
    "email without html or text": (
        with_(SEND, "content.email", {"subject": "Sale"}),
        invalid("email content needs `html` or `text` - at `$.content.email`", "order-1001"),
    ),
    "personal-data consent with a channel": (
        with_(with_(CONSENT, "kind", "personal_data"), "topic", None),
        invalid("personal-data consent is not per channel or topic - at `$.kind`"),
    ),
    "personal-data consent with a topic": (
        with_(without(CONSENT, "channel"), "kind", "personal_data"),
        invalid("personal-data consent is not per channel or topic - at `$.kind`"),
    ),
    "not a map": (42, invalid("Expected `object`, got `int`")),
    "bad tenant name": (
        with_(STATUS, "tenant", "Demo Shop"),
        invalid(
            "Expected `str` matching regex '^[a-z0-9][a-z0-9_-]{0,63}$(?!\\\\n)' - at `$.tenant`",
            "order-1001",
        ),
    ),
}


class TestDecodeRejects:
    """Each problem becomes one invalid result whose detail says what and where."""

    @pytest.mark.parametrize(("wire", "expected"), REJECTIONS.values(), ids=REJECTIONS.keys())
    def test_single(self, wire: object, expected: Result) -> None:
        assert [expected] == decode_frame(pack(wire)).items

    def test_empty_frame(self) -> None:
        assert Frame(False, [invalid("empty frame")]) == decode_frame(b"")

    def test_oversize_frame(self) -> None:
        data = pack(SEND)
        limit = len(data) - 1
        expected = Frame(
            False, [invalid(f"frame of {len(data)} bytes exceeds the {limit}-byte limit")]
        )

        assert expected == decode_frame(data, max_frame_bytes=limit)
        assert [DECODED[0][1]] == decode_frame(data, max_frame_bytes=len(data)).items

    def test_oversize_batch(self) -> None:
        """One result per request even then: a client matches replies by position."""
        detail = "batch of 3 requests exceeds the limit of 2"
        expected = Frame(True, [invalid(detail, "order-1001")] * 3)

        assert expected == decode_frame(pack([STATUS] * 3), max_batch=2)
        assert 2 == len(decode_frame(pack([STATUS] * 2), max_batch=2).items)

    def test_a_frame_over_the_byte_limit_gets_a_result_per_request(self) -> None:
        """Within the batch limit a client still matches the refusals by position and id."""
        data = pack([STATUS] * 3)
        detail = f"frame of {len(data)} bytes exceeds the 10-byte limit"
        expected = Frame(True, [invalid(detail, "order-1001")] * 3)

        assert expected == decode_frame(data, max_frame_bytes=10)

    def test_a_batch_far_over_the_limit_gets_one_result(self) -> None:
        """Past twice the limit it is no batch anybody meant: one result per element would
        answer a frame of nils with ninety times its size (a 4 MiB frame of 700,000 elements
        made a reply of 65 MB, and crashed the process building it)."""
        nils = b"\xdd" + (700_000).to_bytes(4, "big") + b"\xc0" * 700_000
        detail = "batch of 700000 requests exceeds the limit of 1000"

        assert Frame(True, [invalid(detail)]) == decode_frame(nils)
        assert 1 == len(decode_frame(nils, max_frame_bytes=100_000).items)
        assert 1 == len(decode_frame(pack([STATUS] * 3), max_batch=1).items)
        assert 2 == len(decode_frame(pack([STATUS] * 2), max_batch=1).items)

    def test_invalid_request_does_not_affect_its_neighbours(self) -> None:
        bad = with_(SEND, "recipient.tz", "Nowhere/Special")
        frame = decode_frame(pack([CANCEL, bad, without(STATUS, "id"), EVENT]))

        expected = [
            DECODED[2][1],
            invalid("unknown IANA time zone 'Nowhere/Special' - at `$.recipient.tz`", "order-1001"),
            invalid("Object missing required field `id`"),
            DECODED[3][1],
        ]
        assert (True, expected) == (frame.batch, frame.items)

    def test_malformed_batch(self) -> None:
        frame = decode_frame(b"\x92" + pack(STATUS))  # promises two requests, holds one

        # an array, so the answer is an array, though its requests cannot be counted
        assert (True, 1) == (frame.batch, len(frame.items))
        assert_well_formed(frame)

    @pytest.mark.parametrize(
        "data",
        [
            b"\x91" * 100_000 + b"\xc0",  # arrays nested 100k deep
            b"\x81\xa1a" * 100_000 + b"\xc0",  # maps nested 100k deep
            b"\x83\xa2op\xa6cancel\xa1v\xa1x\xa1b" + b"\x91" * 10_000 + b"\xc0",  # salvaging id
            b"\x81\xa2id\xa3\xff\xfe\xfd",  # invalid UTF-8
            b"\xc1",  # never used opcode
            b"\x81",  # truncated
            pack(STATUS) + b"\x00",  # trailing bytes
        ],
        ids=["deep-arrays", "deep-maps", "deep-salvage", "utf8", "c1", "truncated", "trailing"],
    )
    def test_malformed(self, data: bytes) -> None:
        frame = decode_frame(data)

        assert_well_formed(frame)
        assert isinstance(frame.items[0], Result)


# ---------------------------------------------------------------- garbage never raises
# msgpack's own range for integers; beyond it packb refuses, so no CRM can send those
wire_ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
scalars = (
    st.none()
    | st.booleans()
    | wire_ints
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | st.sampled_from(["v", "op", "id", "send", "cancel", "event", "consent", "status", 1, "demo"])
)
msgpackable = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(
            st.text(max_size=10) | wire_ints | st.sampled_from(["v", "op", "id"]),
            children,
            max_size=5,
        )
    ),
    max_leaves=30,
)
OTHER_TYPES: list[object] = [
    None,
    True,
    -1,
    2**64 - 1,
    1.5,
    "",
    "x",
    b"\x00",
    [],
    {},
    [1],
    {"a": 1},
]


def dict_paths(node: object, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every key path in ``node`` (maps only), outermost first."""
    paths: list[tuple[str, ...]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            paths.append((*prefix, key))
            paths.extend(dict_paths(value, (*prefix, key)))
    return paths


@st.composite
def structural_mutations(draw: st.DrawFn) -> object:
    """A valid request with fields dropped, swapped for other types, or unknown ones added."""
    wire: Wire = msgpack.unpackb(pack(draw(st.sampled_from(VALID))))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        paths = dict_paths(wire)
        path = draw(st.sampled_from(paths))
        parent: Any = wire
        for part in path[:-1]:
            parent = parent[part]
        match draw(st.sampled_from(["drop", "swap", "add"])):
            case "drop":
                del parent[path[-1]]
            case "swap":
                # a copy: a later round may mutate inside it, and OTHER_TYPES must stay as it is
                other = st.sampled_from(OTHER_TYPES).map(copy.deepcopy)
                parent[path[-1]] = draw(other | msgpackable)
            case _:
                parent[draw(st.text(min_size=1, max_size=10))] = draw(msgpackable)
        if not wire:
            break
    return wire


@st.composite
def byte_mutations(draw: st.DrawFn) -> bytes:
    """A valid single or batch frame with bytes flipped, overwritten, inserted or deleted."""
    wires = draw(st.lists(st.sampled_from(VALID), min_size=1, max_size=3))
    data = bytearray(pack(wires if draw(st.booleans()) else wires[0]))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        index = draw(st.integers(min_value=0, max_value=max(len(data) - 1, 0)))
        match draw(st.sampled_from(["flip", "set", "insert", "delete"])):
            case "flip":
                data[index] ^= 1 << draw(st.integers(min_value=0, max_value=7))
            case "set":
                data[index] = draw(st.integers(min_value=0, max_value=255))
            case "insert":
                data[index:index] = draw(st.binary(min_size=1, max_size=8))
            case _:
                del data[index : index + draw(st.integers(min_value=1, max_value=8))]
    return bytes(data)


class TestDecodeNeverRaises:
    """Whatever arrives, decode_frame answers with requests or invalid results that say why."""

    @given(data=st.binary(max_size=300))
    def test_arbitrary_bytes(self, data: bytes) -> None:
        assert_well_formed(decode_frame(data))

    @given(value=msgpackable)
    def test_arbitrary_msgpack(self, value: object) -> None:
        assert_well_formed(decode_frame(pack(value)))

    @given(data=byte_mutations())
    def test_byte_mutations_of_valid_frames(self, data: bytes) -> None:
        assert_well_formed(decode_frame(data))

    @given(wire=structural_mutations())
    def test_structural_mutations(self, wire: object) -> None:
        assert_well_formed(decode_frame(pack(wire)))

    @given(wire=st.sampled_from(VALID), data=st.data())
    def test_dropping_a_required_field_is_invalid(self, wire: Wire, data: st.DataObject) -> None:
        optional = {"topic", "priority", "channels", "step_timeout_seconds", "send_at"}
        optional |= {"expires_at", "campaign", "variant", "metadata", "reason", "channel", "at"}
        field = data.draw(st.sampled_from(sorted(set(wire) - optional)))

        [actual] = decode_frame(pack(without(wire, field))).items

        assert isinstance(actual, Result)
        assert f"Object missing required field `{field}`" == actual.detail

    @given(
        wire=st.sampled_from(VALID),
        key=st.text(min_size=1, max_size=12),
        value=msgpackable,
    )
    def test_an_unknown_field_is_invalid(self, wire: Wire, key: str, value: object) -> None:
        known = {"op"}.union(*(request.__struct_fields__ for request in REQUEST_TYPES))
        if key in known:
            key = f"x-{key}"

        [actual] = decode_frame(pack({**wire, key: value})).items

        assert invalid(f"Object contains unknown field `{key}`", wire.get("id")) == actual

    @given(
        neighbours=st.lists(st.sampled_from(VALID), min_size=1, max_size=4),
        position=st.integers(min_value=0, max_value=4),
        bad=structural_mutations(),
    )
    @settings(max_examples=50)
    def test_a_bad_request_in_a_batch_leaves_its_neighbours_alone(
        self, neighbours: list[Wire], position: int, bad: object
    ) -> None:
        position = min(position, len(neighbours))
        batch = [*neighbours[:position], bad, *neighbours[position:]]

        frame = decode_frame(pack(batch))

        alone = [decode_frame(pack(wire)).items[0] for wire in batch]
        assert (True, alone) == (frame.batch, frame.items)
        item = frame.items[position]
        if isinstance(item, Result) and isinstance(bad, dict) and isinstance(bad.get("id"), str):
            # its id when the id itself is valid; an empty or oversized one is not echoed
            echoed = bad["id"] if 1 <= len(bad["id"]) <= 128 else None
            assert echoed == item.id, "an invalid request's result carries its valid id"


# ---------------------------------------------------------------- request helpers
class TestRequestHelpers:
    """What a decoded send tells the policy engine: addresses and the consent topic."""

    @pytest.mark.parametrize(
        ("recipient", "expected"),
        [
            (Recipient(id="r"), set()),
            (Recipient(id="r", push_tokens=["t"]), {Channel.PUSH}),
            (
                Recipient(id="r", email="a@example.com", phone="+79161234567"),
                {Channel.EMAIL, Channel.SMS},
            ),
            (Recipient(id="r", viber_id="v"), {Channel.VIBER}),
        ],
    )
    def test_has_address(self, recipient: Recipient, expected: set[Channel]) -> None:
        assert expected == {channel for channel in Channel if recipient.has_address(channel)}

    @pytest.mark.parametrize(
        ("wire", "expected"),
        [(SEND, "promo"), (MINIMAL_SEND, "service")],
        ids=["topic", "category"],
    )
    def test_effective_topic(self, wire: Wire, expected: str) -> None:
        [request] = decode_frame(pack(wire)).items
        assert isinstance(request, SendRequest)

        assert expected == request.effective_topic


# ---------------------------------------------------------------- schema
def check_schema_file(path: Path) -> None:
    """Fail, saying what to run, unless ``path`` holds the schema the Structs generate."""
    expected = json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
    assert path.exists(), f"{path} is missing: run `make schema`"
    assert expected == path.read_text(encoding="utf-8"), f"{path} is stale: run `make schema`"


class TestSchema:
    """The published JSON Schema is the one the Structs generate."""

    def test_committed_schema_is_current(self) -> None:
        check_schema_file(SCHEMA_PATH)

    def test_stale_schema_fails_with_the_fix(self, tmp_path: Path) -> None:
        stale = tmp_path / "cascadegw.schema.json"
        stale.write_text(SCHEMA_PATH.read_text(encoding="utf-8").replace("send", "sned"))

        with pytest.raises(AssertionError, match="run `make schema`"):
            check_schema_file(stale)
        with pytest.raises(AssertionError, match="missing: run `make schema`"):
            check_schema_file(tmp_path / "absent.json")

    def test_schema_covers_every_op(self) -> None:
        defs: dict[str, Any] = json.loads(json.dumps(json_schema()))["$defs"]

        expected = {"send", "cancel", "event", "consent", "status"}
        actual = {
            definition["properties"]["op"]["enum"][0]
            for name, definition in defs.items()
            if name.endswith("Request") and name != "Request"
        }
        assert expected == actual
