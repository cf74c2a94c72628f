"""The published schema and the gateway agree on every request: what one accepts the other
accepts, what one refuses the other refuses.

The judge is Python's ``jsonschema`` (draft 2020-12, formats checked) on the committed
``config/schema/cascadegw.schema.json``; the gateway side is ``decode_frame``. Each refused case
breaks exactly one rule of ``gateway.protocol.validate`` or of the Structs; the few rules JSON
Schema cannot say (docs/protocol.md) are listed separately and are the only disagreements.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import msgpack
import pytest
from jsonschema import Draft202012Validator

from gateway.protocol import Result, decode_frame
from tests.contract.live import SCHEMA

schema = json.loads(SCHEMA.read_text())
Draft202012Validator.check_schema(schema)
checker = Draft202012Validator.FORMAT_CHECKER
assert "date-time" in checker.checkers, "rfc3339-validator is needed to check date-time"


def validator(name: str) -> Draft202012Validator:
    """A validator for one definition of the schema (its root is a request frame)."""
    one = {"$schema": schema["$schema"], "$defs": schema["$defs"], "$ref": f"#/$defs/{name}"}
    return Draft202012Validator(one, format_checker=checker)


REQUEST = validator("Request")
FRAME = validator("RequestFrame")
EXAMPLES = {
    name: definition["examples"][0]
    for name, definition in schema["$defs"].items()
    if "examples" in definition
}
SEND = EXAMPLES["SendRequest"]


def changed(base: dict[str, Any], path: str, value: object) -> dict[str, Any]:
    """A copy of ``base`` with the dotted ``path`` set (``...``: removed)."""
    request = copy.deepcopy(base)
    *parents, last = path.split(".")
    node = request
    for part in parents:
        node = node[part]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return request


def gateway_accepts(frame: object) -> bool:
    # surrogatepass: pack a lone surrogate the way JavaScript's msgpack library does
    decoded = decode_frame(msgpack.packb(frame, unicode_errors="surrogatepass"))
    return not any(isinstance(item, Result) for item in decoded.items)


ACCEPTED = {
    **{f"example {name}": example for name, example in EXAMPLES.items()},
    "nanoseconds": changed(SEND, "send_at", "2026-12-05T09:30:00.123456789+03:00"),
    "lowercase t and z": changed(SEND, "send_at", "2026-12-05t09:30:00z"),
    "every zone": changed(SEND, "recipient.tz", "America/Argentina/Buenos_Aires"),
    "null send_at": changed(SEND, "send_at", None),
    "push data key merely containing google": changed(
        SEND, "content.push.data", {"screen": "sale", "not_google": "1"}
    ),
    "personal data with explicit nulls": {
        "v": 1,
        "op": "consent",
        "tenant": "demo",
        "recipient_id": "r1",
        "kind": "personal_data",
        "action": "grant",
        "source": "form",
        "channel": None,
        "topic": None,
    },
    "1970 and 2999": changed(
        changed(SEND, "send_at", "1970-01-01T00:00:00+01:00"),
        "expires_at",
        "2999-12-31T23:59:59-01:00",
    ),
    "personal data unscoped": {
        "v": 1,
        "op": "consent",
        "tenant": "demo",
        "recipient_id": "r1",
        "kind": "personal_data",
        "action": "grant",
        "source": "form",
    },
}
REFUSED = {
    "version 2": changed(SEND, "v", 2),
    "unknown op": changed(SEND, "op", "sned"),
    "unknown field": changed(SEND, "expire_at", "2026-12-05T09:30:00Z"),
    "unknown time zone": changed(SEND, "recipient.tz", "Mars/Olympus"),
    "unknown channel timeout": changed(SEND, "step_timeout_seconds", {"fax": 10}),
    "a channel twice": changed(SEND, "channels", ["sms", "sms"]),
    "five channels": changed(SEND, "channels", ["push", "email", "viber", "sms", "push"]),
    "no content": changed(SEND, "content", {"link_url": "https://shop.example/"}),
    "email without html or text": changed(SEND, "content.email", {"subject": "s"}),
    "naive time": changed(SEND, "send_at", "2026-12-05T09:30:00"),
    "leap second": changed(SEND, "send_at", "2016-12-31T23:59:60Z"),
    "no such day": changed(SEND, "send_at", "2026-02-30T09:30:00Z"),
    "date only": changed(SEND, "send_at", "2026-12-05"),
    "reserved FCM key from": changed(SEND, "content.push.data", {"from": "x"}),
    "reserved FCM key gcm.*": changed(SEND, "content.push.data", {"GCM.notification": "x"}),
    "bad phone": changed(SEND, "recipient.phone", "89161234567"),
    "bad email": changed(SEND, "recipient.email", "ann@"),
    "tenant with a colon": changed(SEND, "tenant", "de:mo"),
    "empty id": changed(SEND, "id", ""),
    "timeout over 30 days": changed(SEND, "step_timeout_seconds", {"sms": 2_592_001}),
    "personal data per channel": changed(EXAMPLES["ConsentRequest"], "kind", "personal_data"),
    "missing tenant": changed(EXAMPLES["StatusRequest"], "tenant", ...),
    "event kind unknown": changed(EXAMPLES["EventRequest"], "kind", "liked"),
    "null content only": changed(SEND, "content", {"push": None}),
    "null content twice": changed(SEND, "content", {"email": None, "sms": None}),
    "empty email html": changed(SEND, "content.email", {"subject": "s", "html": ""}),
    "empty email text": changed(SEND, "content.email", {"subject": "s", "text": ""}),
    "null email html": changed(SEND, "content.email", {"subject": "s", "html": None}),
    "email with NEL": changed(SEND, "recipient.email", "a\u0085b@example.com"),
    "email with BOM": changed(SEND, "recipient.email", "a\ufeffb@example.com"),
    "email with newline": changed(SEND, "recipient.email", "a@example.com\n"),
    "phone with newline": changed(SEND, "recipient.phone", "+79161234567\n"),
    "tenant with newline": changed(SEND, "tenant", "demo\n"),
    "year 0000": changed(SEND, "send_at", "0000-01-01T00:00:00Z"),
    "year 9999": changed(EXAMPLES["EventRequest"], "at", "9999-12-31T23:59:59-01:00"),
    "year 1969": changed(EXAMPLES["ConsentRequest"], "at", "1969-12-31T23:59:59Z"),
    "time with newline": changed(SEND, "send_at", "2026-12-05T09:30:00Z\n"),
    "huge metadata value": changed(SEND, "metadata", {"k": "x" * 1025}),
    "huge push data value": changed(SEND, "content.push.data", {"k": "x" * 1025}),
}
CANNOT_SAY = {
    # a channel in `channels` without its content: the schema cannot relate the array's items
    # to the keys of another object (docs/protocol.md, "Rules beyond the schema")
    "requested channel without content": changed(SEND, "channels", ["viber"]),
    # msgpack cannot carry a lone surrogate (it is not UTF-8): the frame is malformed
    "lone surrogate": changed(SEND, "campaign", "spring\ud800"),
}


class TestAgreement:
    @pytest.mark.parametrize("request_", list(ACCEPTED.values()), ids=list(ACCEPTED))
    def test_both_accept(self, request_: dict[str, Any]) -> None:
        errors = [error.message for error in REQUEST.iter_errors(request_)]
        assert [] == errors
        assert gateway_accepts(request_)

    @pytest.mark.parametrize("request_", list(REFUSED.values()), ids=list(REFUSED))
    def test_both_refuse(self, request_: dict[str, Any]) -> None:
        assert not REQUEST.is_valid(request_)
        assert not gateway_accepts(request_)

    @pytest.mark.parametrize("request_", list(CANNOT_SAY.values()), ids=list(CANNOT_SAY))
    def test_the_documented_exceptions(self, request_: dict[str, Any]) -> None:
        assert REQUEST.is_valid(request_)
        assert not gateway_accepts(request_)

    def test_a_batch_of_1001_is_refused_by_both(self) -> None:
        frame = [EXAMPLES["StatusRequest"]] * 1001
        assert not FRAME.is_valid(frame)
        decoded = decode_frame(msgpack.packb(frame))
        assert 1001 == len(decoded.items)
        assert all(isinstance(item, Result) for item in decoded.items)
        assert FRAME.is_valid(frame[:1000])
