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
from tests.e2e.simulated import LONG, e2e_config, gateway_with_simulators, outcome, promo

REPLAYS = 5


class Recorded:
    """Every webhook request a simulator posts, as sent (URL, body, headers).

    ``held`` (a byte string) keeps matching requests from reaching the gateway, as if it were
    down when the provider first called: they are recorded, answered 503, and left for the
    test to deliver later.
    """

    def __init__(self, simulator: Simulator, *, held: bytes | None = None) -> None:
        self.posts: list[tuple[str, bytes, dict[str, str]]] = []
        original = simulator.post_webhook

        async def recording(url: str, *, content: bytes, headers: Mapping[str, str]) -> int:
            self.posts.append((url, content, dict(headers)))
            if held is not None and held in content:
                return 503
            return await original(url, content=content, headers=headers)

        setattr(simulator, "post_webhook", recording)  # noqa: B010 - patching an instance

    async def first(
        self, containing: bytes, *, within_seconds: int
    ) -> tuple[str, bytes, dict[str, str]]:
        """The first post whose body contains ``containing``, waiting for it in virtual time."""
        for _ in range(within_seconds):
            for post in self.posts:
                if containing in post[1]:
                    return post
            await trio.sleep(1)
        raise AssertionError(f"no {containing!r} posted in {within_seconds} s")


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
        # the receipt comes after ~1 s (virtual)
        url, body, headers = await recorder.first(delivered, within_seconds=600)
        async with httpx.AsyncClient(timeout=LONG) as http:  # not 5 s of a jumping clock
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


@pytest.mark.parametrize(
    ("provider", "channel", "address", "opt_out"),
    [
        ("email1", "email", {"email": "unsub@example.com"}, b'"unsubscribe"'),
        ("viber1", "viber", {"viber": "vb-unsub"}, b'"unsubscribed"'),
    ],
    ids=["sendgrid-unsubscribe", "viber-unsubscribed"],
)
async def test_an_opt_out_retried_50_minutes_late_is_applied_once(
    provider: str,
    channel: str,
    address: dict[str, Any],
    opt_out: bytes,
    tmp_path: Path,
    jumping_clock: trio.testing.MockClock,
) -> None:
    """The gateway was unreachable when the provider first called; the provider retries
    within its documented window (SendGrid 24 h, Viber 1 h), twice."""
    async with gateway_with_simulators(e2e_config(tmp_path)) as (embedded, client):
        recorder = Recorded(embedded.simulators[provider], held=opt_out)
        await client.send(promo("m1", recipient_id="r1", channels=[channel], **address))
        url, body, headers = await recorder.first(opt_out, within_seconds=3600)
        # the input, not a wait for anything: the provider's retry comes 50 minutes later
        await trio.sleep(50 * 60)
        async with httpx.AsyncClient(timeout=LONG) as http:  # not 5 s of a jumping clock
            answers = [
                (await http.post(url, content=body, headers=headers)).status_code for _ in range(2)
            ]
            consents = (
                await http.get(f"{embedded.gateway.http_url}/v1/recipients/acme/r1/consents")
            ).json()
        refused = await client.send(promo("m2", recipient_id="r1", channels=[channel], **address))
        duplicates = embedded.gateway.registry.get_sample_value(
            "gateway_receipt_duplicates_total", {"provider": provider}
        )
    assert [200, 200] == answers
    withdrawals = [c for c in consents["history"] if c["action"] == "withdraw"]
    assert 1 == len(withdrawals)
    assert channel == withdrawals[0]["channel"]
    assert 1 == duplicates
    assert ("rejected", "no_consent") == (refused["status"], refused["reason"])
