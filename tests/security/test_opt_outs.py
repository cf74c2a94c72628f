"""No opt-out is ever lost: a person who unsubscribes gets no more advertising on that channel.

Tried from the outside, in the states a real person reaches them: the message they act on has
finished (read, delivered, exhausted), the gateway has restarted since the link was sent, the
message has been pruned from the journal. Through the real simulators over HTTP, with the links
and callbacks the providers would deliver.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import msgspec
import pytest
import trio
import trio.testing

from adapters.simulators._base import Simulator
from adapters.simulators.sendgrid import SendgridSimulator
from gateway.client import AsyncClient
from gateway.config import GatewayConfig
from gateway.core.model import MessageKey
from gateway.embedded import Embedded
from tests.e2e.simulated import (
    HOUR,
    LONG,
    api_requests,
    e2e_config,
    gateway_with_simulators,
    outcome,
    promo,
)
from tests.support import NOON_UTC

_LINK = re.compile(r"<(https?://[^>]+/t/u/[^>]+)>")
# HTTP timeouts here run on the MockClock, which jumps to the next deadline whenever every task
# has waited 10 ms: httpx's default 5 s could pass in one jump with the request in flight. LONG,
# as for the ZeroMQ client (tests/e2e/simulated.py).


def unsubscribe_link(simulator: Simulator) -> str:
    """The List-Unsubscribe URL of the last email the SendGrid simulator took."""
    mail = json.loads(api_requests(simulator)[-1].body)
    match = _LINK.search(mail["headers"]["List-Unsubscribe"])
    assert match is not None
    return match.group(1)


async def until(
    condition: Callable[[], Awaitable[bool]], *, step_seconds: float = 1.0, limit: int = 10_000
) -> None:
    """Wait (in virtual time) until ``condition`` holds; fail after ``limit`` steps."""
    for _ in range(limit):
        if await condition():
            return
        await trio.sleep(step_seconds)
    raise AssertionError("condition never held")


async def pruned(embedded: Embedded, key: str) -> None:
    """Wait (in virtual time, minutes at a step) until the hourly prune has forgotten ``key``;
    fail if it has not within three hours."""

    async def gone() -> bool:
        return await embedded.gateway.journal.message(MessageKey(key)) is None

    await until(gone, step_seconds=60.0, limit=int(3 * HOUR / 60))


async def finished(client: AsyncClient, message_id: str) -> dict[str, Any]:
    async def done() -> bool:
        return bool((await outcome(client, message_id))["state"] == "finished")

    await until(done)
    return await outcome(client, message_id)


async def click(embedded: Embedded, link: str) -> httpx.Response:
    """POST the RFC 8058 one-click form to the link's path on the running gateway."""
    url = embedded.gateway.public_http_url + urlsplit(link).path
    async with httpx.AsyncClient(timeout=LONG) as http:
        return await http.post(url, data={"List-Unsubscribe": "One-Click"})


async def next_promo(client: AsyncClient, message_id: str, channel: str, **fields: Any) -> Any:
    return await client.send(promo(message_id, recipient_id="r1", channels=[channel], **fields))


def config_for(tmp_path: Path, *, retention_seconds: float = 7 * 86400.0) -> GatewayConfig:
    config = e2e_config(tmp_path)
    store = msgspec.structs.replace(config.store, idempotency_retention_seconds=retention_seconds)
    return msgspec.structs.replace(config, store=store)


class TestOneClickUnsubscribe:
    """The List-Unsubscribe link of an email whose cascade has finished."""

    @pytest.mark.parametrize(
        "when",
        ["finished", "restart_before_click", "restart_after_click", "pruned_and_restarted"],
    )
    async def test_the_next_promo_is_refused(
        self, when: str, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        retention = 60.0 if when == "pruned_and_restarted" else 7 * 86400.0
        config = config_for(tmp_path, retention_seconds=retention)
        wall = NOON_UTC
        async with gateway_with_simulators(config, wall=wall) as (embedded, client):
            accepted = await next_promo(client, "m1", "email", email="shopper+read@example.com")
            assert "accepted" == accepted["status"]
            assert "read" == (await finished(client, "m1"))["outcome"]
            link = unsubscribe_link(embedded.simulators["email1"])
            if when == "pruned_and_restarted":
                # the hourly prune forgets the finished message past its retention
                await pruned(embedded, "acme:m1")
            clicked = None
            if when in ("finished", "restart_after_click"):
                clicked = await click(embedded, link)
            wall = embedded.gateway.clock.now()
        if when != "finished":
            # a new process: new state, new router; the tracking key was kept beside the journal
            async with gateway_with_simulators(config, wall=wall + 60) as (embedded, client):
                if clicked is None:
                    clicked = await click(embedded, link)
                refused = await next_promo(client, "m2", "email")
        else:
            async with gateway_with_simulators(config, wall=wall) as (embedded, client):
                refused = await next_promo(client, "m2", "email")
        assert clicked is not None
        assert 200 == clicked.status_code
        assert "You are unsubscribed." in clicked.text
        assert ("rejected", "no_consent") == (refused["status"], refused.get("reason"))

    async def test_the_finished_message_tells_the_crm(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        async with gateway_with_simulators(config_for(tmp_path)) as (embedded, client):
            await next_promo(client, "m1", "email", email="shopper+read@example.com")
            await finished(client, "m1")
            response = await click(embedded, unsubscribe_link(embedded.simulators["email1"]))
            message = await outcome(client, "m1")
            service = await client.send(
                promo("m2", recipient_id="r1", channels=["email"], category="service")
            )
        assert 200 == response.status_code
        assert "read" == message["outcome"]  # the outcome stays what it was
        assert ("unsubscribed", "one_click") == (
            message["timeline"][-1]["kind"],
            message["timeline"][-1]["detail"],
        )
        # an opt-out from promotions keeps order updates (service needs no advertising consent)
        assert "accepted" == service["status"]

    async def test_a_forged_or_foreign_link_unsubscribes_nobody(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        async with gateway_with_simulators(config_for(tmp_path)) as (embedded, client):
            await next_promo(client, "m1", "email", email="shopper+read@example.com")
            await finished(client, "m1")
            link = unsubscribe_link(embedded.simulators["email1"])
            signature = link.rpartition(".")[2]
            forged = link.replace(signature, ("A" if signature[0] != "A" else "B") + signature[1:])
            response = await click(embedded, forged)
            allowed = await next_promo(client, "m2", "email")
        assert 404 == response.status_code
        assert "accepted" == allowed["status"]


class TestProviderOptOuts:
    """The provider tells us the person opted out, after the message's cascade finished."""

    @pytest.mark.parametrize(
        ("channel", "address"),
        [
            ("email", {"email": "unsub@example.com"}),
            ("viber", {"viber": "vb-unsub"}),
            ("sms", {"phone": "+79161230007"}),  # the simulated person replies STOP
        ],
        ids=["sendgrid-unsubscribe", "viber-unsubscribed", "twilio-stop"],
    )
    async def test_the_next_promo_on_that_channel_is_refused(
        self,
        channel: str,
        address: dict[str, str],
        tmp_path: Path,
        jumping_clock: trio.testing.MockClock,
    ) -> None:
        async with gateway_with_simulators(config_for(tmp_path)) as (embedded, client):
            # a short unread timeout: the cascade is over (exhausted) long before the person
            # opts out with the provider (tens of seconds after delivery, in the simulators)
            await next_promo(client, "m1", channel, step_timeout_seconds={channel: 3}, **address)
            # SMS ends on delivery; the others stay unread past the timeout
            assert (await finished(client, "m1"))["outcome"] in ("exhausted", "delivered")
            http = httpx.AsyncClient(base_url=embedded.gateway.http_url, timeout=LONG)

            async def withdrawn() -> bool:
                consents = (await http.get("/v1/recipients/acme/r1/consents")).json()
                return any(
                    c["action"] == "withdraw" and c["channel"] == channel
                    for c in consents["effective"]
                )

            await until(withdrawn)
            await http.aclose()
            refused = await next_promo(client, "m2", channel, **address)
            other = "email" if channel == "sms" else "sms"
            still = await next_promo(client, "m3", other, **address)
        assert ("rejected", "no_consent") == (refused["status"], refused.get("reason"))
        # the opt-out is per channel: the other channel's consent is untouched
        assert "accepted" == still["status"]

    async def test_a_late_sendgrid_unsubscribe_for_a_pruned_message_still_counts(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        """SendGrid echoes the recipient in custom_args: no journal row is needed."""
        config = config_for(tmp_path, retention_seconds=60.0)
        async with gateway_with_simulators(config) as (embedded, client):
            await next_promo(client, "m1", "email", email="shopper+read@example.com")
            await finished(client, "m1")
            simulator = embedded.simulators["email1"]
            assert isinstance(simulator, SendgridSimulator)
            sent = json.loads(api_requests(simulator)[-1].body)
            await pruned(embedded, "acme:m1")
            args = sent["personalizations"][0]["custom_args"]
            event = {
                "email": "shopper+read@example.com",
                "event": "unsubscribe",
                "timestamp": int(embedded.gateway.clock.now()),
                "sg_event_id": "late-unsubscribe-1",
                **args,
            }
            await simulator._post_events([event])  # signed with the simulator's key
            refused = await next_promo(client, "m2", "email")
        assert 200 == simulator.webhook_statuses[-1]
        assert ("rejected", "no_consent") == (refused["status"], refused.get("reason"))
