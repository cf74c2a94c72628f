"""The admin API over real HTTP: consents in and out, message timelines, the bearer token."""

from __future__ import annotations

from pathlib import Path

import httpx
import trio
import trio.testing

from gateway.app import open_gateway
from gateway.client import open_client
from gateway.core.cascade import Status
from tests.support import NOON_UTC, in_test_providers, make_config, promo, wait_for


class TestConsents:
    """PUT records consents exactly like the ZeroMQ op (same validation); GET shows them."""

    async def test_put_then_get(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        config = make_config(tmp_path, unknown_advertising="deny")
        async with (
            open_gateway(
                config,
                adapters=in_test_providers(config),
                wall_at_start=NOON_UTC,
            ) as gateway,
            httpx.AsyncClient(base_url=gateway.http_url) as http,
        ):
            url = "/v1/recipients/acme/r1/consents"
            granted = await http.put(
                url,
                json=[
                    {"kind": "advertising", "action": "grant", "source": "form", "channel": "email"}
                ],
            )
            withdrawn = await http.put(
                url,
                json={
                    "kind": "advertising",
                    "action": "withdraw",
                    "source": "call",
                    "channel": "email",
                    "topic": "promo",
                    "reason": "too many",
                },
            )
            invalid = await http.put(
                url,
                json={
                    "kind": "personal_data",
                    "action": "grant",
                    "source": "form",
                    "channel": "sms",
                },
            )
            garbage = await http.put(url, content=b"{not json")
            unknown = await http.put("/v1/recipients/nobody/r1/consents", json=[])
            shown = (await http.get(url)).json()
            async with open_client(gateway.ingest_endpoint, timeout_seconds=1e6) as client:
                promo_reply = await client.send(promo("m1", recipient_id="r1"))
                news_reply = await client.send(promo("m2", recipient_id="r1", topic="news"))
        assert (200, {"recorded": 1}) == (granted.status_code, granted.json())
        assert 200 == withdrawn.status_code
        assert (400, "invalid") == (invalid.status_code, invalid.json()["reason"])
        assert "personal-data consent is not per channel" in invalid.json()["detail"]
        assert 400 == garbage.status_code
        assert 404 == unknown.status_code
        assert ["grant", "withdraw"] == [record["action"] for record in shown["history"]]
        # email/promo withdrawn, email/news still granted: the API's consents drive admission
        assert ("rejected", "no_consent") == (promo_reply["status"], promo_reply["reason"])
        assert ["email"] == news_reply["channels"]


class TestMessages:
    """A message's state and timeline by id; unknown ids and tenants are 404."""

    async def test_timeline(self, tmp_path: Path, jumping_clock: trio.testing.MockClock) -> None:
        config = make_config(tmp_path)
        providers = in_test_providers(config)
        async with (
            open_gateway(config, adapters=providers, wall_at_start=NOON_UTC) as gateway,
            open_client(gateway.ingest_endpoint, timeout_seconds=1e6) as client,
            httpx.AsyncClient(base_url=gateway.http_url) as http,
        ):
            await client.send(promo("m1"))
            await wait_for(lambda: bool(providers["push1"].sent), what="push sent")
            await wait_for(
                lambda: gateway.state.records["acme:m1"].cascade.status is Status.AWAITING
            )
            found = await http.get("/v1/messages/acme/m1")
            missing = await http.get("/v1/messages/acme/nope")
            other = await http.get("/v1/messages/nobody/m1")
        assert 200 == found.status_code
        body = found.json()
        assert ("awaiting", "push") == (body["state"], body["channel"])
        assert ["accepted", "sent"] == [event["kind"] for event in body["timeline"]]
        assert (404, 404) == (missing.status_code, other.status_code)


class TestAuthorization:
    """With an admin token configured (from the environment), every call needs it."""

    async def test_bearer_token(
        self, tmp_path: Path, jumping_clock: trio.testing.MockClock
    ) -> None:
        config = make_config(
            tmp_path, environ={"CASCADEGW__HTTP__ADMIN_TOKEN": "s3cret-admin-token"}
        )
        async with (
            open_gateway(
                config,
                adapters=in_test_providers(config),
                wall_at_start=NOON_UTC,
            ) as gateway,
            httpx.AsyncClient(base_url=gateway.http_url) as http,
        ):
            anonymous = await http.get("/v1/recipients/acme/r1/consents")
            wrong = await http.get(
                "/v1/recipients/acme/r1/consents", headers={"Authorization": "Bearer nope"}
            )
            right = await http.get(
                "/v1/recipients/acme/r1/consents",
                headers={"Authorization": "Bearer s3cret-admin-token"},
            )
        assert (401, 401, 200) == (anonymous.status_code, wrong.status_code, right.status_code)
        assert "s3cret-admin-token" not in repr(config)
