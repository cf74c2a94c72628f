"""The cascade driven end to end inside the router: timers on trio's MockClock, real sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import trio
import trio.testing

from gateway.app import Gateway, open_gateway
from gateway.client import AsyncClient, open_client, open_subscription, rfc3339
from gateway.config import GatewayConfig
from gateway.core.cascade import Status
from gateway.core.errors import InvalidRecipient, ProviderUnavailable, RateLimited
from gateway.core.model import Channel
from gateway.core.receipts import Fact
from gateway.runtime.receipts import Receipt
from tests.support import (
    NOON_UTC,
    InTestProvider,
    in_test_providers,
    make_config,
    promo,
    wait_for,
)

LONG = 1e6


@asynccontextmanager
async def running(
    config: GatewayConfig, providers: dict[str, InTestProvider], *, wall: float = NOON_UTC
) -> AsyncIterator[tuple[Gateway, AsyncClient]]:
    async with (
        open_gateway(config, adapters=providers, wall_at_start=wall) as gateway,
        open_client(gateway.ingest_endpoint, timeout_seconds=LONG) as client,
    ):
        yield gateway, client


def sent_channels(providers: dict[str, InTestProvider], key: str) -> list[str]:
    """Which channels a message reached, in the order the providers took it."""
    order = [
        (provider.sent.index(outgoing), provider.channel.value)
        for provider in providers.values()
        for outgoing in provider.sent
        if outgoing.message_key == key
    ]
    return [channel for _, channel in sorted(order, key=lambda item: item[0])]


def at_clock(gateway: Gateway, seconds: float) -> float:
    """Trio deadline for wall time ``NOON_UTC + seconds``."""
    return gateway.clock.trio_deadline(NOON_UTC + seconds)


class TestEscalation:
    """Push -> email -> Viber -> SMS, moving on only when a step stays unread past its timeout."""

    async def test_unread_push_escalates_to_email_after_the_push_timeout(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        config = make_config(tmp_path)
        providers = in_test_providers(config)
        async with running(config, providers) as (gateway, client):
            assert "accepted" == (await client.send(promo("m1")))["status"]
            await trio.sleep_until(at_clock(gateway, 299))
            assert ["acme:m1"] == providers["push1"].keys()
            assert [] == providers["email1"].sent
            await trio.sleep_until(at_clock(gateway, 301))
            assert ["acme:m1"] == providers["email1"].keys()
            assert [] == providers["viber1"].sent

    async def test_nothing_read_walks_every_channel_and_sms_delivery_ends_it(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        config = make_config(tmp_path)
        providers = in_test_providers(config)
        async with running(config, providers) as (gateway, client):
            await client.send(promo("m1"))
            # push 300 s + email 3600 s + viber 1800 s, then SMS
            await trio.sleep_until(at_clock(gateway, 300 + 3600 + 1800 + 5))
            assert ["acme:m1"] == providers["sms1"].keys()
            gateway.router.receipts.apply(
                Receipt("acme:m1", Fact.DELIVERED, channel=Channel.SMS, at=gateway.clock.now()),
                now=gateway.clock.now(),
            )
            status = await client.status("m1", "acme")
        message = status["message"]
        assert "finished" == message["state"]
        assert "delivered" == message["outcome"]
        kinds = [event["kind"] for event in message["timeline"]]
        assert [
            "accepted",
            "sent",
            "step_timeout",
            "sent",
            "step_timeout",
            "sent",
            "step_timeout",
            "sent",
            "delivered",
        ] == kinds
        assert message["timeline"][-1]["final"] is True

    async def test_a_read_push_stops_the_cascade_for_good(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        config = make_config(tmp_path)
        providers = in_test_providers(config)
        async with running(config, providers) as (gateway, client):
            await client.send(promo("m1"))
            await trio.sleep_until(at_clock(gateway, 60))
            assert "ok" == (await client.event("m1", "acme", kind="opened"))["status"]
            await trio.sleep_until(at_clock(gateway, 86400))
        assert ["acme:m1"] == providers["push1"].keys()
        for name in ("email1", "viber1", "sms1"):
            assert [] == providers[name].sent

    async def test_cancel_mid_cascade_stops_it(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        config = make_config(tmp_path)
        providers = in_test_providers(config)
        async with running(config, providers) as (gateway, client):
            await client.send(promo("m1"))
            await trio.sleep_until(at_clock(gateway, 400))  # now on email
            reply = await client.cancel("m1", "acme", reason="bought")
            await trio.sleep_until(at_clock(gateway, 86400))
        assert "finished" == reply["message"]["state"]
        assert "cancelled" == reply["message"]["outcome"]
        assert [] == providers["viber1"].sent


class TestConsent:
    """Consent is re-checked at every step; a withdrawal reaches a running cascade at once."""

    async def test_withdrawal_of_the_current_channel_stops_the_cascade(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        config = make_config(tmp_path)
        providers = in_test_providers(config)
        async with running(config, providers) as (gateway, client):
            await client.send(promo("m1", recipient_id="r1"))
            await trio.sleep_until(at_clock(gateway, 400))  # email is the current step
            await client.consent(
                "acme", "r1", kind="advertising", action="withdraw", channel="email", source="crm"
            )
            await trio.sleep_until(at_clock(gateway, 86400))
            status = await client.status("m1", "acme")
        assert "unsubscribed" == status["message"]["outcome"]
        assert [] == providers["viber1"].sent
        assert [] == providers["sms1"].sent

    async def test_a_channel_without_consent_is_skipped_never_called(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        config = make_config(tmp_path, unknown_advertising="deny")
        providers = in_test_providers(config)
        async with running(config, providers) as (gateway, client):
            for channel in ("push", "email", "sms"):
                await client.consent(
                    "acme", "r1", kind="advertising", action="grant", channel=channel, source="form"
                )
            reply = await client.send(promo("m1", recipient_id="r1"))
            await trio.sleep_until(at_clock(gateway, 300 + 3600 + 5))
        assert ["push", "email", "sms"] == reply["channels"]
        assert [] == providers["viber1"].sent
        assert ["acme:m1"] == providers["sms1"].keys()

    async def test_no_consent_at_all_is_rejected(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        config = make_config(tmp_path, unknown_advertising="deny")
        async with running(config, in_test_providers(config)) as (_, client):
            reply = await client.send(promo("m1"))
            service = await client.send(promo("m2", category="service"))
        assert ("rejected", "no_consent") == (reply["status"], reply["reason"])
        assert "accepted" == service["status"]


class TestTiming:
    """Deferrals (send_at, quiet hours) hold the message; TTL expires it; all on the mock clock."""

    async def test_send_at_defers_the_first_step(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        config = make_config(tmp_path)
        providers = in_test_providers(config)
        send_at = datetime.fromtimestamp(NOON_UTC + 3600, UTC)
        async with running(config, providers) as (gateway, client):
            reply = await client.send(promo("m1", send_at=send_at))
            await trio.sleep_until(at_clock(gateway, 3599))
            assert [] == providers["push1"].sent
            await trio.sleep_until(at_clock(gateway, 3601))
            assert ["acme:m1"] == providers["push1"].keys()
        assert "2026-11-23T13:00:00Z" == reply["deferred_until"]  # times are RFC 3339 strings

    async def test_quiet_hours_defer_to_the_recipients_morning(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        config = make_config(
            tmp_path,
            extra='[[policy.quiet_hours]]\nstart = 21:00:00\nend = 09:00:00\ncategories = ["promo"]\n',
        )
        providers = in_test_providers(config)
        # 20:30 UTC is 23:30 in Moscow (UTC+3): the promo waits for 09:00 Moscow = 06:00 UTC
        evening = NOON_UTC + 8.5 * 3600
        morning = NOON_UTC + 18 * 3600
        async with running(config, providers, wall=evening) as (gateway, client):
            reply = await client.send(promo("m1", recipient={"tz": "Europe/Moscow"}))
            otp = await client.send(
                promo(
                    "otp",
                    recipient={"tz": "Europe/Moscow"},
                    category="service",
                    priority="critical",
                )
            )
            await trio.sleep_until(gateway.clock.trio_deadline(morning - 1))
            assert ["acme:otp"] == providers["push1"].keys()
            await trio.sleep_until(gateway.clock.trio_deadline(morning + 1))
            assert ["acme:otp", "acme:m1"] == providers["push1"].keys()
        assert rfc3339(datetime.fromtimestamp(morning, UTC)) == reply["deferred_until"]
        assert "deferred_until" not in otp

    async def test_expiry_ends_a_cascade(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        config = make_config(tmp_path)
        providers = in_test_providers(config)
        expires = datetime.fromtimestamp(NOON_UTC + 600, UTC)
        async with running(config, providers) as (gateway, client):
            await client.send(promo("m1", expires_at=expires))
            await trio.sleep_until(at_clock(gateway, 86400))
            status = await client.status("m1", "acme")
        assert "expired" == status["message"]["outcome"]
        assert [] == providers["viber1"].sent


class TestRetries:
    """Transient errors retry (honouring Retry-After), then fail over, then the cascade moves on."""

    async def test_retry_after_is_honoured(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        config = make_config(tmp_path)
        providers = in_test_providers(config)
        providers["push1"].errors.append(
            RateLimited("429", provider="push1", retry_after_seconds=30)
        )
        async with running(config, providers) as (gateway, client):
            await client.send(promo("m1"))
            await trio.sleep_until(at_clock(gateway, 29))
            assert [] == providers["push1"].sent
            assert 1 == providers["push1"].calls
            await trio.sleep_until(at_clock(gateway, 31))
            assert ["acme:m1"] == providers["push1"].keys()

    async def test_5xx_fails_over_to_the_next_provider_then_the_next_step(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        config = make_config(tmp_path, providers_per_channel=2)
        providers = in_test_providers(config)
        attempts = config.dispatch.retry.attempts_per_provider
        for name in ("push1", "push2"):
            providers[name].errors.extend(
                ProviderUnavailable("503", provider=name) for _ in range(attempts)
            )
        async with running(config, providers) as (gateway, client):
            await client.send(promo("m1"))
            await trio.sleep_until(at_clock(gateway, 200))
            timeline = (await client.status("m1", "acme"))["message"]["timeline"]
        assert attempts == providers["push1"].calls
        assert attempts == providers["push2"].calls
        assert ["acme:m1"] == providers["email1"].keys()
        details = [e.get("detail", "") for e in timeline if e["kind"] == "retrying"]
        assert any("failover to push2" in detail for detail in details)

    async def test_a_permanent_error_moves_on_at_once(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        config = make_config(tmp_path, providers_per_channel=2)
        providers = in_test_providers(config)
        providers["push1"].errors.append(InvalidRecipient("UNREGISTERED", provider="push1"))
        async with running(config, providers) as (gateway, client):
            await client.send(promo("m1"))
            await trio.sleep_until(at_clock(gateway, 1))
        assert 1 == providers["push1"].calls
        assert 0 == providers["push2"].calls
        assert ["acme:m1"] == providers["email1"].keys()


class TestPriorityLanes:
    """Under a bulk backlog, critical messages go to the provider first."""

    async def test_critical_overtakes_a_bulk_backlog(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        config = make_config(tmp_path, provider_options="", extra="")
        providers = in_test_providers(config, delay_seconds=1.0)
        async with running(config, providers) as (gateway, client):
            gateway.dispatcher.queues.by_provider[
                "push1"
            ].concurrency = 1  # one slow request at a time
            await client.send_batch([promo(f"bulk{i}", priority="bulk") for i in range(50)])
            await wait_for(lambda: providers["push1"].calls >= 1, what="the backlog started")
            await client.send(promo("otp", category="service", priority="critical"))
            await client.send(promo("news", priority="normal"))
            await wait_for(lambda: len(providers["push1"].sent) == 52, timeout_seconds=600)
        order = providers["push1"].keys()
        assert 52 == len(order)
        # at most the one bulk request already in flight goes before the OTP
        assert order.index("acme:otp") <= 1
        assert order.index("acme:news") == order.index("acme:otp") + 1


class TestRecovery:
    """Timers and in-flight sends survive a restart from the journal."""

    async def test_timers_continue_after_a_restart(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        config = make_config(tmp_path)
        providers = in_test_providers(config)
        async with running(config, providers) as (gateway, client):
            await client.send(promo("awaiting"))
            await client.send(promo("later", send_at=datetime.fromtimestamp(NOON_UTC + 1000, UTC)))
            await wait_for(lambda: providers["push1"].keys() == ["acme:awaiting"])
            await wait_for(
                lambda: gateway.state.records["acme:awaiting"].cascade.status is Status.AWAITING
            )
        async with running(config, providers, wall=NOON_UTC + 20) as (gateway, client):
            assert 2 == len(gateway.state.records)
            # the push step times out at +300 s (email), "later" is due at +1000 s (push)
            await trio.sleep_until(gateway.clock.trio_deadline(NOON_UTC + 1001))
            await wait_for(lambda: len(providers["push1"].sent) == 2)
            await wait_for(lambda: bool(providers["email1"].sent))
        assert ["acme:awaiting"] == providers["email1"].keys()
        assert ["acme:awaiting", "acme:later"] == providers["push1"].keys()

    async def test_a_send_in_flight_at_shutdown_is_sent_again(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        config = make_config(tmp_path)
        slow = in_test_providers(config, delay_seconds=3600)
        async with running(config, slow) as (gateway, client):
            await client.send(promo("m1"))
            await wait_for(lambda: slow["push1"].calls == 1, what="the request is in flight")
        providers = in_test_providers(config)
        async with running(config, providers, wall=NOON_UTC + 100) as (gateway, _):
            assert 1 == gateway.resent_at_start
            await wait_for(lambda: bool(providers["push1"].sent))
        assert ["acme:m1"] == providers["push1"].keys()


class TestStatusEvents:
    """Every state change is published on PUB (topic = tenant) and kept for the timeline."""

    async def test_events_are_published_by_tenant(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        config = make_config(tmp_path)
        providers = in_test_providers(config)
        async with (
            running(config, providers) as (gateway, client),
            open_subscription(gateway.status_endpoint, "acme") as events,
        ):
            # a subscription counts once the publisher has it (ZeroMQ's slow joiner)
            subscribed = {"verdict": "accepted"}
            await wait_for(
                lambda: (
                    gateway.registry.get_sample_value(
                        "gateway_status_subscriptions_total", subscribed
                    )
                    == 1
                )
            )
            await client.send(promo("m1"))
            await client.event("m1", "acme", kind="opened")
            received: list[Any] = []
            with trio.move_on_after(5):
                while len(received) < 3:
                    received.append(await events.receive())
        assert ["accepted", "sent", "read"] == [e["kind"] for e in received]
        assert {"acme"} == {e["tenant"] for e in received}
        assert received[-1]["final"] is True


_ = timedelta
