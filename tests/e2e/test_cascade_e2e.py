"""The cascade end to end: a real ZeroMQ client, the gateway, the four provider simulators over
real HTTP, and receipts coming back as signed webhooks. Time is trio's MockClock throughout:
gateway, adapters and simulators share one virtual wall clock.

Simulator fates are chosen by address tags (adapters/simulators/_base.py): ``read``, ``click``,
``ignore``, ``bounce``, ``unsub``, ``invalid``, ``fail``, ``throttle``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs

import httpx
import trio
import trio.testing

from adapters.sendgrid import sign_events
from gateway.client import rfc3339
from gateway.core.model import RecipientKey
from tests.e2e.simulated import (
    HOUR,
    api_requests,
    e2e_config,
    gateway_with_simulators,
    keys_sent,
    outcome,
    promo,
    sims,
    wait_until,
)
from tests.support import NOON_UTC


class TestTheCascade:
    """Read-based escalation through real provider APIs."""

    async def test_an_opened_push_means_no_email_ever(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        async with gateway_with_simulators(e2e_config(tmp_path)) as (embedded, client):
            await client.send(promo("m1", push="tok-read"))
            await wait_until(embedded, 10 * HOUR)
            message = await outcome(client, "m1")
            fcm, email1, email2, viber, sms = sims(embedded)
        assert ["acme:m1"] == keys_sent(fcm)
        assert [] == keys_sent(email1) + keys_sent(email2) + keys_sent(viber) + keys_sent(sms)
        assert ("finished", "read") == (message["state"], message["outcome"])

    async def test_an_unread_push_escalates_to_email_after_its_timeout(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        async with gateway_with_simulators(e2e_config(tmp_path)) as (embedded, client):
            await client.send(promo("m1"))
            await wait_until(embedded, 299)
            _, email1, *_ = sims(embedded)
            assert [] == keys_sent(email1)
            await wait_until(embedded, 302)
            assert ["acme:m1"] == keys_sent(email1)

    async def test_an_opened_email_stops_the_chain(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        async with gateway_with_simulators(e2e_config(tmp_path)) as (embedded, client):
            await client.send(promo("m1", email="shopper+read@example.com"))
            await wait_until(embedded, 10 * HOUR)
            message = await outcome(client, "m1")
            _, email1, _, viber, sms = sims(embedded)
        assert ["acme:m1"] == keys_sent(email1)
        assert [] == keys_sent(viber) + keys_sent(sms)
        assert "read" == message["outcome"]
        assert "email" == message["timeline"][-1]["channel"]

    async def test_nothing_read_walks_to_viber_then_sms_and_delivery_ends_it(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        async with gateway_with_simulators(e2e_config(tmp_path)) as (embedded, client):
            await client.send(promo("m1"))
            await wait_until(embedded, 300 + HOUR + 1800 + 60)
            message = await outcome(client, "m1")
            fcm, email1, _, viber, sms = sims(embedded)
        assert [["acme:m1"]] * 4 == [keys_sent(s) for s in (fcm, email1, viber, sms)]
        assert ("finished", "delivered") == (message["state"], message["outcome"])
        sent = [e["channel"] for e in message["timeline"] if e["kind"] == "sent"]
        assert ["push", "email", "viber", "sms"] == sent


class TestConsentAndAddresses:
    """A step without consent or address is skipped; a withdrawal ends the chain."""

    async def test_no_viber_consent_or_no_viber_id_skips_viber(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        async with gateway_with_simulators(e2e_config(tmp_path, unknown_advertising="deny")) as (
            embedded,
            client,
        ):
            for channel in ("push", "email", "sms"):
                await client.consent(
                    "acme",
                    "r1",
                    kind="advertising",
                    action="grant",
                    channel=channel,
                    source="signup",
                )
                await client.consent(
                    "acme",
                    "r2",
                    kind="advertising",
                    action="grant",
                    channel=channel,
                    source="signup",
                )
            await client.consent(
                "acme", "r2", kind="advertising", action="grant", channel="viber", source="signup"
            )
            no_consent = await client.send(promo("m1", recipient_id="r1"))
            no_id = await client.send(promo("m2", recipient_id="r2", viber=None))
            await wait_until(embedded, 300 + HOUR + 60)
            _, _, _, viber, sms = sims(embedded)
        assert ["push", "email", "sms"] == no_consent["channels"]
        assert ["push", "email", "sms"] == no_id["channels"]
        assert [] == keys_sent(viber)
        assert ["acme:m1", "acme:m2"] == sorted(keys_sent(sms))

    async def test_withdrawal_by_api_mid_cascade_stops_it(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        async with gateway_with_simulators(e2e_config(tmp_path)) as (embedded, client):
            await client.send(promo("m1", recipient_id="r1"))
            await wait_until(embedded, 400)  # on email now
            await client.consent(
                "acme",
                "r1",
                kind="advertising",
                action="withdraw",
                source="crm",
                reason="asked by phone",
            )
            await wait_until(embedded, 10 * HOUR)
            message = await outcome(client, "m1")
            _, _, _, viber, sms = sims(embedded)
        assert "unsubscribed" == message["outcome"]
        assert [] == keys_sent(viber) + keys_sent(sms)

    async def test_one_click_unsubscribe_from_the_email_stops_it(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        async with gateway_with_simulators(e2e_config(tmp_path)) as (embedded, client):
            await client.send(promo("m1", recipient_id="r1"))
            await wait_until(embedded, 400)
            _, email1, _, viber, sms = sims(embedded)
            headers = json.loads(api_requests(email1)[0].body)["headers"]
            url = headers["List-Unsubscribe"].strip("<>")
            assert "List-Unsubscribe=One-Click" == headers["List-Unsubscribe-Post"]
            async with httpx.AsyncClient() as browser:
                page = await browser.get(url)  # a mail scanner's GET must not unsubscribe
                assert 200 == page.status_code
                assert (await outcome(client, "m1"))["state"] in ("awaiting", "sending")
                posted = await browser.post(url, data={"List-Unsubscribe": "One-Click"})
            await wait_until(embedded, 10 * HOUR)
            message = await outcome(client, "m1")
            consents = await embedded.gateway.journal.consent_history(RecipientKey("acme:r1"))
        assert 200 == posted.status_code
        assert "unsubscribed" == message["outcome"]
        assert [] == keys_sent(viber) + keys_sent(sms)
        assert [("withdraw", "email", "promo", "one_click")] == [
            (c.action.value, c.channel.value if c.channel else None, c.topic, c.source)
            for c in consents
        ]

    async def test_unsubscribing_from_an_earlier_step_still_ends_the_chain(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        """The email's link used while Viber is the current step: the person read the email and
        opted out, so SMS must not follow even though Viber consent is untouched."""
        async with gateway_with_simulators(e2e_config(tmp_path)) as (embedded, client):
            await client.send(promo("m1", recipient_id="r1"))
            await wait_until(embedded, 300 + HOUR + 60)  # Viber is the current step
            _, email1, _, viber, sms = sims(embedded)
            assert ["acme:m1"] == keys_sent(viber)
            url = json.loads(api_requests(email1)[0].body)["headers"]["List-Unsubscribe"].strip(
                "<>"
            )
            async with httpx.AsyncClient() as browser:
                await browser.post(url, data={"List-Unsubscribe": "One-Click"})
            await wait_until(embedded, 10 * HOUR)
            message = await outcome(client, "m1")
        assert "unsubscribed" == message["outcome"]
        assert [] == keys_sent(sms)


class TestPolicy:
    """Quiet hours, caps, the control group, duplicates and cancellation, end to end."""

    async def test_a_late_promo_waits_for_morning_but_an_otp_goes(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        quiet = '[[policy.quiet_hours]]\nstart = 21:00:00\nend = 09:00:00\ncategories = ["promo", "content", "informational"]\n'
        evening = NOON_UTC + 8.5 * HOUR  # 23:30 in Moscow
        morning = NOON_UTC + 18 * HOUR  # 09:00 in Moscow
        async with gateway_with_simulators(e2e_config(tmp_path, extra=quiet), wall=evening) as (
            embedded,
            client,
        ):
            promo_reply = await client.send(promo("m1", tz="Europe/Moscow"))
            otp_reply = await client.send(
                promo("otp", tz="Europe/Moscow", category="service", priority="critical")
            )
            await trio.sleep_until(embedded.gateway.clock.trio_deadline(morning - 60))
            fcm = embedded.simulators["fcm1"]
            assert ["acme:otp"] == keys_sent(fcm)
            await trio.sleep_until(embedded.gateway.clock.trio_deadline(morning + 60))
            assert ["acme:otp", "acme:m1"] == keys_sent(fcm)
        assert rfc3339(datetime.fromtimestamp(morning, UTC)) == promo_reply["deferred_until"]
        assert "accepted" == otp_reply["status"]
        assert "deferred_until" not in otp_reply

    async def test_caps_reject_or_defer_as_configured(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        caps = (
            '[[policy.caps]]\nname = "promo_daily"\nmax_count = 1\nwindow_seconds = 86400\ncategories = ["promo"]\naction = "reject"\n'
            '[[policy.caps]]\nname = "content_hourly"\nmax_count = 1\nwindow_seconds = 3600\ncategories = ["content"]\naction = "defer"\n'
        )
        async with gateway_with_simulators(e2e_config(tmp_path, extra=caps)) as (_, client):
            first = await client.send(promo("p1", recipient_id="r1"))
            second = await client.send(promo("p2", recipient_id="r1"))
            content1 = await client.send(promo("c1", recipient_id="r1", category="content"))
            content2 = await client.send(promo("c2", recipient_id="r1", category="content"))
        assert "accepted" == first["status"]
        assert ("rejected", "capped") == (second["status"], second["reason"])
        assert "accepted" == content1["status"]
        assert "accepted" == content2["status"]
        assert rfc3339(datetime.fromtimestamp(NOON_UTC + 3600, UTC)) == content2["deferred_until"]

    async def test_holdout_duplicate_and_cancel(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        control = '[policy.control_group]\npercent = 50.0\nperiod_days = 90\nsalt = "e2e"\n'
        async with gateway_with_simulators(e2e_config(tmp_path, extra=control)) as (
            embedded,
            client,
        ):
            replies = [
                await client.send(promo(f"h{i}", recipient_id=f"person{i}")) for i in range(12)
            ]
            held = [r for r in replies if r["status"] == "rejected"]
            kept = [r for r in replies if r["status"] == "accepted"]
            service = await client.send(
                promo("svc", recipient_id=f"person{replies.index(held[0])}", category="service")
            )
            first = kept[0]["id"]
            recipient = f"person{replies.index(kept[0])}"
            duplicate = await client.send(promo(first, recipient_id=recipient))
            conflict = await client.send(promo(first, recipient_id="whoever"))
            await client.cancel(kept[1]["id"], "acme", reason="bought already")
            await wait_until(embedded, 10 * HOUR)
            cancelled = await outcome(client, kept[1]["id"])
            fcm, email1, *_ = sims(embedded)
        assert held, "with 50% held out, some of 12 recipients are in the control group"
        assert {"holdout"} == {r["reason"] for r in held}
        assert "accepted" == service["status"]  # service messages are never held out
        assert "duplicate" == duplicate["status"]
        assert ("rejected", "conflict") == (conflict["status"], conflict["reason"])
        assert 1 == keys_sent(fcm).count(f"acme:{kept[0]['id']}")
        assert "cancelled" == cancelled["outcome"]
        assert f"acme:{kept[1]['id']}" not in keys_sent(email1)


class TestProviderFailures:
    """429 honours Retry-After; 5xx fails over, then moves on; permanent errors move on at once."""

    async def test_429_is_retried_after_retry_after(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        async with gateway_with_simulators(e2e_config(tmp_path)) as (embedded, client):
            await client.send(promo("m1", push="tok-throttle"))
            await wait_until(embedded, 60)
            fcm = embedded.simulators["fcm1"]
            calls = api_requests(fcm)
            timeline = (await outcome(client, "m1"))["timeline"]
        assert 2 == len(calls)
        assert calls[1].at - calls[0].at >= 1.0  # Retry-After: 1
        assert ["accepted", "retrying", "sent"] == [e["kind"] for e in timeline][:3]

    async def test_5xx_fails_over_then_moves_to_the_next_channel(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        async with gateway_with_simulators(e2e_config(tmp_path)) as (embedded, client):
            await client.send(promo("m1", email="always+fail@example.com"))
            await wait_until(embedded, 300 + 120)
            _, email1, email2, viber, _ = sims(embedded)
            message = await outcome(client, "m1")
        attempts = 3  # dispatch.retry.attempts_per_provider
        assert attempts == len(api_requests(email1))
        assert attempts == len(api_requests(email2))
        assert ["acme:m1"] == keys_sent(viber)
        assert "viber" == message["channel"]

    async def test_an_invalid_token_moves_on_at_once(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        async with gateway_with_simulators(e2e_config(tmp_path)) as (embedded, client):
            await client.send(promo("m1", push="tok-invalid"))
            await wait_until(embedded, 5)
            _, email1, *_ = sims(embedded)
            assert ["acme:m1"] == keys_sent(email1)

    async def test_a_bounced_email_moves_on_at_once(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        async with gateway_with_simulators(e2e_config(tmp_path)) as (embedded, client):
            await client.send(promo("m1", email="nobody+bounce@example.com"))
            await wait_until(embedded, 300 + 60)  # the bounce arrives ~1 s after the send
            _, _, _, viber, _ = sims(embedded)
            assert ["acme:m1"] == keys_sent(viber)
            sample = embedded.gateway.registry.get_sample_value
            assert 1.0 == sample("gateway_receipts_total", {"channel": "email", "kind": "bounced"})
            assert 0.0 == sample("gateway_receipts_total", {"channel": "email", "kind": "failed"})


class TestWebhookSecurity:
    """Forged or stale receipts are refused, counted, and change nothing."""

    async def test_forged_and_stale_receipts_are_rejected(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        async with gateway_with_simulators(e2e_config(tmp_path)) as (embedded, client):
            gateway = embedded.gateway
            await client.send(promo("m1", push="tok-invalid"))  # straight to email
            await wait_until(embedded, 5)
            body = json.dumps(
                [
                    {
                        "email": "ignore@example.com",
                        "event": "open",
                        "timestamp": int(NOON_UTC + 5),
                        "cgw_key": "acme:m1",
                    }
                ]
            ).encode()
            url = f"{gateway.public_http_url}/webhooks/email1"
            async with httpx.AsyncClient() as http:
                forged = await http.post(
                    url,
                    content=body,
                    headers={
                        "X-Twilio-Email-Event-Webhook-Signature": "MEUCIQDf",
                        "X-Twilio-Email-Event-Webhook-Timestamp": str(int(NOON_UTC + 5)),
                    },
                )
                unsigned = await http.post(url, content=body)
                viber = await http.post(
                    f"{gateway.public_http_url}/webhooks/viber1",
                    content=b'{"event":"seen"}',
                    headers={"X-Viber-Content-Signature": "00" * 32},
                )
                twilio = await http.post(
                    f"{gateway.public_http_url}/webhooks/sms1?m=acme:m1",
                    data={"MessageStatus": "delivered"},
                    headers={"X-Twilio-Signature": "bm90IGl0"},
                )
            # a receipt genuinely signed with the simulator's key, but signed longer ago than SendGrid retries (24 h + margin)
            simulator = embedded.simulators["email1"]
            old = str(int(gateway.clock.now() - 26 * HOUR))
            signature = sign_events(simulator.signing_key, timestamp=old, body=body)  # type: ignore[attr-defined]
            async with httpx.AsyncClient() as http:
                stale = await http.post(
                    url,
                    content=body,
                    headers={
                        "X-Twilio-Email-Event-Webhook-Signature": signature,
                        "X-Twilio-Email-Event-Webhook-Timestamp": old,
                    },
                )
            message = await outcome(client, "m1")
            metrics = gateway.registry
        assert [403, 403, 403, 403] == [r.status_code for r in (forged, unsigned, viber, twilio)]
        assert 403 == stale.status_code
        assert ("awaiting", "email") == (message["state"], message["channel"])  # nothing changed
        sample = metrics.get_sample_value
        assert 2.0 == sample(
            "gateway_webhook_requests_total", {"provider": "email1", "verdict": "bad_signature"}
        )
        assert 1.0 == sample(
            "gateway_webhook_requests_total", {"provider": "email1", "verdict": "stale"}
        )
        assert 1.0 == sample(
            "gateway_webhook_requests_total", {"provider": "viber1", "verdict": "bad_signature"}
        )
        assert 1.0 == sample(
            "gateway_webhook_requests_total", {"provider": "sms1", "verdict": "bad_signature"}
        )


class TestSenderIdentity:
    """What the providers receive names the brand and, for marketing email, how to unsubscribe."""

    async def test_requests_carry_the_tenants_sender_identity(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        async with gateway_with_simulators(e2e_config(tmp_path)) as (embedded, client):
            await client.send(
                promo("m1", push="tok-invalid", email="x+bounce@example.com", viber="vb-bounce")
            )
            await client.send(
                promo("svc", push="tok-invalid", category="service", email="y+read@example.com")
            )
            await wait_until(embedded, 120)
            _, email1, _, viber, sms = sims(embedded)
            mails = [json.loads(r.body) for r in api_requests(email1)]
            viber_body = json.loads(api_requests(viber)[0].body)
            sms_form = parse_qs(api_requests(sms)[0].body.decode())
        promo_mail, service_mail = sorted(
            mails, key=lambda m: m["personalizations"][0]["custom_args"]["cgw_key"]
        )
        assert {"email": "news@acme.example", "name": "Acme Shop"} == promo_mail["from"]
        assert promo_mail["headers"]["List-Unsubscribe"].startswith("<http")
        assert "List-Unsubscribe" not in service_mail.get(
            "headers", {}
        )  # service mail has no unsubscribe
        assert "Acme" == viber_body["sender"]["name"]
        assert ["ACME"] == sms_form["From"]
        assert "/t/c/" in sms_form["Body"][0]  # the link goes through the click tracker
