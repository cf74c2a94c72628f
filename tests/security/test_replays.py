"""A provider callback applied once, however often it arrives: retried by the provider, or
replayed verbatim by anyone who captured it (signatures without a timestamp, like Twilio's,
cannot be told apart from the original)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from adapters.simulators._base import Simulator
from tests.e2e.simulated import e2e_config, gateway_with_simulators, outcome, promo

REPLAYS = 5


class Recorded:
    """Every webhook request a simulator posts, as sent (URL, body, headers)."""

    def __init__(self, simulator: Simulator) -> None:
        self.posts: list[tuple[str, bytes, dict[str, str]]] = []
        original = simulator.post_webhook

        async def recording(url: str, *, content: bytes, headers: Mapping[str, str]) -> int:
            self.posts.append((url, content, dict(headers)))
            return await original(url, content=content, headers=headers)

        setattr(simulator, "post_webhook", recording)  # noqa: B010 - patching an instance


@pytest.mark.parametrize(
    ("provider", "channel", "address", "delivered"),
    [
        ("email1", "email", {"email": "ignore@example.com"}, b'"delivered"'),
        ("sms1", "sms", {}, b"MessageStatus=delivered"),
        ("viber1", "viber", {"viber": "vb-ignore"}, b'"delivered"'),
    ],
    ids=["sendgrid", "twilio", "viber"],
)
async def test_a_callback_replayed_five_times_is_stored_once(
    provider: str,
    channel: str,
    address: dict[str, Any],
    delivered: bytes,
    tmp_path: Path,
    jumping_clock: trio.testing.MockClock,
) -> None:
    async with gateway_with_simulators(e2e_config(tmp_path)) as (embedded, client):
        recorder = Recorded(embedded.simulators[provider])
        await client.send(promo("m1", channels=[channel], **address))
        for _ in range(600):  # virtual seconds: the receipt comes after ~1 s
            if any(delivered in body for _, body, _ in recorder.posts):
                break
            await trio.sleep(1)
        url, body, headers = next(p for p in recorder.posts if delivered in p[1])
        async with httpx.AsyncClient() as http:
            answers = [
                (await http.post(url, content=body, headers=headers)).status_code
                for _ in range(REPLAYS)
            ]
        message = await outcome(client, "m1")
        duplicates = embedded.gateway.registry.get_sample_value(
            "gateway_receipt_duplicates_total", {"provider": provider}
        )
    assert [200] * REPLAYS == answers  # acknowledged, so the provider stops retrying
    kinds = [event["kind"] for event in message["timeline"]]
    assert 1 == kinds.count("delivered")
    assert REPLAYS == duplicates
