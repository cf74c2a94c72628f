"""A message id is an idempotency key: the same request again is a ``duplicate``, a different
request under the same id a ``conflict``; and every op names an unknown tenant the same way.

On the threadless harness: requests in, results out, no sockets.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trio.testing

from adapters import ProviderReceipt, ReceiptKind
from gateway.clock import Clock
from gateway.inbound import WebhookReceipts
from gateway.protocol import Result, decode_frame, encode
from gateway.runtime.queries import DuplicateQuery
from gateway.store.memory import MemoryStore
from tests.runtime.harness import Harness
from tests.support import NOON_UTC, make_config, promo


@pytest.fixture
async def harness(tmp_path: Path, mock_clock: trio.testing.MockClock) -> Harness:
    return await Harness.start(make_config(tmp_path), MemoryStore(), Clock(NOON_UTC))


async def answer(harness: Harness, request: dict[str, Any]) -> Result:
    """One request through the router, its journal query (if any) resolved."""
    (item,) = harness.router.handle_frame(decode_frame(encode(request)))
    if isinstance(item, Result):
        return item
    (resolved,) = await harness.router.answer([item])
    return resolved


class TestRepeatedIds:
    @pytest.mark.parametrize("when", ["staged", "committed", "finished", "restarted"])
    async def test_same_request_is_a_duplicate_a_changed_one_a_conflict(
        self, harness: Harness, when: str
    ) -> None:
        first = promo("m1")
        assert "accepted" == (await answer(harness, first)).status
        if when != "staged":
            await harness.commit()
        if when == "finished":
            cancelled = await answer(
                harness, {"v": 1, "op": "cancel", "id": "m1", "tenant": "acme"}
            )
            assert "finished" == (cancelled.message.state if cancelled.message else None)
            await harness.commit()
        if when == "restarted":
            harness = await harness.restart()
        same = await answer(harness, promo("m1"))
        other = await answer(harness, promo("m1", category="content"))
        assert ("duplicate", "m1") == (same.status, same.id)
        assert same.message is not None
        assert ("rejected", "conflict", "m1") == (other.status, other.reason, other.id)
        assert other.detail is not None
        assert "different request" in other.detail

    async def test_the_repeat_is_a_query_not_a_second_admission(self, harness: Harness) -> None:
        await answer(harness, promo("m1"))
        (item,) = harness.router.handle_frame(decode_frame(encode(promo("m1"))))
        assert isinstance(item, DuplicateQuery)
        assert 1 == len(harness.state.records)

    async def test_duplicates_and_conflicts_are_counted(self, harness: Harness) -> None:
        await answer(harness, promo("m1"))
        await answer(harness, promo("m1"))
        await answer(harness, promo("m1", topic="other"))
        sample = harness.registry.get_sample_value
        assert 1 == sample("gateway_admissions_total", {"outcome": "duplicate", "reason": "none"})
        assert 1 == sample(
            "gateway_admissions_total", {"outcome": "rejected", "reason": "conflict"}
        )


class TestUnknownTenant:
    @pytest.mark.parametrize(
        "request_",
        [
            promo("m1", tenant="nobody"),
            {"v": 1, "op": "cancel", "id": "m1", "tenant": "nobody"},
            {"v": 1, "op": "event", "id": "m1", "tenant": "nobody", "kind": "opened"},
            {
                "v": 1,
                "op": "consent",
                "tenant": "nobody",
                "recipient_id": "r1",
                "kind": "advertising",
                "action": "grant",
                "source": "crm",
            },
            {"v": 1, "op": "status", "id": "m1", "tenant": "nobody"},
        ],
        ids=["send", "cancel", "event", "consent", "status"],
    )
    async def test_every_op_says_unknown_tenant(
        self, harness: Harness, request_: dict[str, Any]
    ) -> None:
        result = await answer(harness, request_)
        assert ("rejected", "unknown_tenant") == (result.status, result.reason)
        assert result.detail == "tenant 'nobody' is not configured"


class TestTimesFromOutside:
    """Times the gateway did not make: never in the future, never able to crash it."""

    async def test_the_same_instant_with_another_offset_is_a_duplicate(
        self, harness: Harness
    ) -> None:
        await answer(harness, promo("m1", send_at="2026-11-23T15:00:00+03:00"))
        same = await answer(harness, promo("m1", send_at="2026-11-23T12:00:00.000Z"))
        assert "duplicate" == same.status

    async def test_a_consent_from_the_future_is_refused(self, harness: Harness) -> None:
        grant = await answer(harness, consent("grant", at="2099-01-01T00:00:00Z"))
        assert ("rejected", "invalid") == (grant.status, grant.reason)
        assert grant.detail is not None
        assert "in the future" in grant.detail

    async def test_a_slightly_early_clock_cannot_outrank_a_later_withdrawal(
        self, harness: Harness, mock_clock: trio.testing.MockClock
    ) -> None:
        """A grant stamped 4 minutes ahead (within the skew allowed) counts from now, so a
        withdrawal received a minute later wins."""
        ahead = datetime.fromtimestamp(harness.now + 240, UTC).isoformat()
        assert "ok" == (await answer(harness, consent("grant", at=ahead))).status
        mock_clock.jump(60)
        assert "ok" == (await answer(harness, consent("withdraw"))).status
        refused = await answer(harness, promo("m1", recipient_id="r1"))
        assert ("rejected", "no_consent") == (refused.status, refused.reason)

    async def test_a_provider_timestamp_in_year_10000_is_taken_as_now(
        self, harness: Harness
    ) -> None:
        await answer(harness, promo("m1", channels=["email"]))
        await harness.commit()
        for job in harness.take_jobs():
            record = harness.claim(job)
            assert record is not None
            harness.router.feedback.send_succeeded(
                job, provider="email1", price=0.0, now=harness.now
            )
        receipt = ProviderReceipt(
            ReceiptKind.DELIVERED, 253402300800.0, message_key="acme:m1", event_id="e1"
        )
        harness.inbound(WebhookReceipts("email1", [receipt]))
        await harness.commit()
        delivered = [event for event in harness.published if event.kind == "delivered"]
        assert 1 == len(delivered)
        assert abs(harness.now - delivered[0].at.timestamp()) < 1e-3  # microseconds


def consent(action: str, *, at: str | None = None) -> dict[str, Any]:
    request: dict[str, Any] = {
        "v": 1,
        "op": "consent",
        "tenant": "acme",
        "recipient_id": "r1",
        "kind": "advertising",
        "action": action,
        "source": "crm",
    }
    if at is not None:
        request["at"] = at
    return request
