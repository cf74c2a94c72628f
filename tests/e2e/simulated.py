"""The embedded gateway with its four provider simulators, for end-to-end and security tests.

A real ZeroMQ client, the gateway, the simulators over real HTTP, and receipts coming back as
signed webhooks; time is trio's MockClock throughout (gateway, adapters and simulators share
one virtual wall clock). Simulator fates are chosen by address tags
(adapters/simulators/_base.py): ``read``, ``click``, ``ignore``, ``bounce``, ``unsub``, ...
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import trio

from adapters.simulators._base import Simulator
from gateway.client import AsyncClient, open_client, send_request
from gateway.config import GatewayConfig, load_config
from gateway.embedded import Embedded, open_embedded
from tests.support import NOON_UTC

LONG = 1e6
HOUR = 3600.0


def e2e_config(
    tmp_path: Path, *, extra: str = "", unknown_advertising: str = "grant"
) -> GatewayConfig:
    text = f"""
[ingest]
bind = "tcp://127.0.0.1:*"
status_bind = "tcp://127.0.0.1:*"
[http]
bind = "127.0.0.1:0"
public_bind = "127.0.0.1:0"
public_url = ""
[store]
create = true
path = "{tmp_path / "journal.db"}"
synchronous = "normal"
[simulator]
latency_seconds = 0.01
sendgrid_batch_seconds = 1.0
deliver_probability = 1.0
read_probability = 0.0
click_probability = 0.0
bounce_probability = 0.0
unsubscribe_probability = 0.0
receipt_delay_seconds = 1.0
read_delay_seconds = 20.0
seed = 7
[policy.consent]
unknown_advertising = "{unknown_advertising}"
{extra}
[providers.fcm1]
kind = "fcm"
simulated = true
[providers.email1]
kind = "sendgrid"
simulated = true
price = 0.05
[providers.email2]
kind = "sendgrid"
simulated = true
price = 0.06
[providers.viber1]
kind = "viber"
simulated = true
price = 0.9
[providers.sms1]
kind = "twilio"
simulated = true
price = 3.5
[tenants.acme]
brand = "Acme"
cascade = ["push", "email", "viber", "sms"]
providers = {{ push = ["fcm1"], email = ["email1", "email2"], viber = ["viber1"], sms = ["sms1"] }}
sender = {{ email_from = "news@acme.example", email_name = "Acme Shop", sms_from = "ACME", viber_name = "Acme" }}
"""
    return load_config(text.encode(), {})


def promo(
    message_id: str,
    *,
    push: str = "tok-ignore",
    email: str = "ignore@example.com",
    viber: str | None = "vb-ignore",
    phone: str | None = "+79161230000",
    **fields: Any,
) -> dict[str, Any]:
    recipient: dict[str, Any] = {
        "id": fields.pop("recipient_id", f"r-{message_id}"),
        "tz": fields.pop("tz", "UTC"),
    }
    recipient["push_tokens"] = [f"{push}-{message_id}"]
    recipient["email"] = email
    if viber is not None:
        recipient["viber_id"] = f"{viber}-{message_id}"
    if phone is not None:
        recipient["phone"] = phone
    return send_request(
        message_id,
        "acme",
        recipient=recipient,
        category=fields.pop("category", "promo"),
        content={
            "push": {"title": "Sale", "body": "Up to 50% off"},
            "email": {
                "subject": "Sale",
                "html": "<p>Sale: <a href='{link}'>shop now</a></p>",
                "text": "Sale {link}",
            },
            "viber": {"text": "Sale {link}"},
            "sms": {"text": "Sale {link}"},
            "link_url": "https://shop.example/sale",
        },
        **fields,
    )


@asynccontextmanager
async def gateway_with_simulators(
    config: GatewayConfig, *, wall: float = NOON_UTC
) -> AsyncIterator[tuple[Embedded, AsyncClient]]:
    async with (
        open_embedded(config, wall_at_start=wall) as embedded,
        open_client(embedded.gateway.ingest_endpoint, timeout_seconds=LONG) as client,
    ):
        yield embedded, client


def api_requests(simulator: Simulator) -> list[Any]:
    """The provider API requests (not token or webhook registration calls) a simulator took."""
    paths = ("messages:send", "/v3/mail/send", "/pa/send_message", "/Messages.json")
    return [recorded for recorded in simulator.requests if recorded.path.endswith(paths)]


def keys_sent(simulator: Simulator) -> list[str]:
    """Message keys of the API requests a simulator took, in order."""
    keys = []
    for recorded in api_requests(simulator):
        if recorded.path.endswith("messages:send"):
            keys.append(json.loads(recorded.body)["message"]["data"]["cgw_key"])
        elif recorded.path.endswith("/v3/mail/send"):
            keys.append(json.loads(recorded.body)["personalizations"][0]["custom_args"]["cgw_key"])
        elif recorded.path.endswith("/pa/send_message"):
            keys.append(json.loads(recorded.body)["tracking_data"])
        else:
            callback = parse_qs(recorded.body.decode())["StatusCallback"][0]
            keys.append(parse_qs(callback.split("?", 1)[1])["m"][0])
    return keys


async def wait_until(embedded: Embedded, seconds: float) -> None:
    """Sleep until wall time NOON_UTC + seconds on the gateway's clock."""
    await trio.sleep_until(embedded.gateway.clock.trio_deadline(NOON_UTC + seconds))


async def outcome(client: AsyncClient, message_id: str) -> dict[str, Any]:
    reply = await client.status(message_id, "acme")
    message: dict[str, Any] = reply["message"]
    return message


def sims(embedded: Embedded) -> tuple[Simulator, Simulator, Simulator, Simulator, Simulator]:
    s = embedded.simulators
    return s["fcm1"], s["email1"], s["email2"], s["viber1"], s["sms1"]
