"""The bundled Python client speaks exactly the published protocol.

Every request its builders make, and every reply and status event a live gateway sends back,
is validated with ``jsonschema`` against the committed schema, as the wire carries them (packed
and unpacked with the plain msgpack library).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgpack
import trio

from gateway.client import (
    cancel_request,
    consent_request,
    event_request,
    open_client,
    open_subscription,
    send_request,
    status_request,
)
from tests.contract.live import live_gateway, subscribed
from tests.contract.test_schema_agreement import validator

FRAME, REPLY, EVENTS = (
    validator("RequestFrame"),
    validator("ReplyFrame"),
    validator("StatusEventMessage"),
)


def on_the_wire(value: Any) -> Any:
    """What the other side decodes: through the client's own packing."""
    from gateway.client import _pack

    return msgpack.unpackb(_pack(value))


def assert_valid(which: Any, value: Any) -> None:
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in which.iter_errors(value)]
    assert [] == errors, value


async def test_the_python_client_matches_the_schema(tmp_path: Path) -> None:
    later = datetime.now(UTC) + timedelta(minutes=5)
    requests = [
        consent_request(
            "demo", "py-1", kind="advertising", action="grant", source="form", at=datetime.now(UTC)
        ),
        send_request(
            "py-m1",
            "demo",
            recipient={"id": "py-1", "tz": "Asia/Novosibirsk", "email": "read@example.com"},
            category="promo",
            content={
                "email": {"subject": "Hi", "text": "Hello {link}"},
                "link_url": "https://x.example/",
            },
            send_at=later,
        ),
        event_request("py-m1", "demo", kind="opened", channel="email", at=datetime.now(UTC)),
        status_request("py-m1", "demo"),
        cancel_request("py-m1", "demo", reason="done"),
        status_request("py-unknown", "demo"),
        send_request(
            "py-m1",
            "demo",
            recipient={"id": "py-1"},
            category="promo",
            content={"sms": {"text": "other"}},
        ),
    ]
    for request in requests:
        assert_valid(FRAME, on_the_wire(request))
    assert_valid(FRAME, on_the_wire(requests))
    async with (
        live_gateway(tmp_path) as embedded,
        open_client(embedded.gateway.ingest_endpoint, timeout_seconds=30) as client,
        open_subscription(embedded.gateway.status_endpoint, "demo") as events,
    ):
        await subscribed(embedded)
        replies = [await client.request(request) for request in requests]
        batch = await client.send_batch(requests[3:6])
        received: list[Any] = []
        with trio.fail_after(30):
            while not any(e["kind"] == "cancelled" for e in received):
                received.append(await events.receive())
    for reply in [*replies, batch]:
        assert_valid(REPLY, reply)
    assert_valid(EVENTS, received)
    assert ["ok", "accepted", "ok", "ok", "ok"] == [r["status"] for r in replies[:5]]
    assert "deferred_until" in replies[1]  # a string, validated as date-time above
    assert ("rejected", "not_found") == (replies[5]["status"], replies[5]["reason"])
    assert ("rejected", "conflict") == (replies[6]["status"], replies[6]["reason"])
    assert 3 == len(batch)
