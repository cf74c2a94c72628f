"""The campaign report matches a hand-computed expectation for a scripted campaign.

Script (cascade push -> email -> sms; prices push 0, email 0.05, sms 3.5; campaign "spring"):

variant A: t0 push read, then converted (reported on push)
           t1 push unread -> email delivered, read, then clicked (after the read ended it)
           t2 push unread -> email delivered, unread -> sms delivered
           c0 held out (control group), converted
variant B: t3 no push token -> email bounced -> sms delivered, then converted (no channel)
           t4 push unread -> email delivered, unsubscribed by the one-click link
           t5 push read
           c1 held out, no purchase

By hand, variant A: push sent 3 (t0 t1 t2), opened 1, converted 1; email sent 2, delivered 2,
opened 1, clicked 1, cost 0.10; sms sent 1, delivered 1, cost 3.50; treated 3 with 1
conversion (1/3), control 1 with 1 (1.0): incremental -2/3; cost 3.60 vs SMS 3 x 3.5 = 10.50.
Variant B: push sent 2, opened 1; email sent 2, delivered 1, failed 1, unsubscribed 1, cost 0.10;
sms sent 1, delivered 1, cost 3.50; treated 3 with 1 conversion, control 1 with 0: +1/3.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import trio
import trio.testing

from gateway.app import Gateway, open_gateway
from gateway.client import open_client
from gateway.core.control_group import ControlGroup
from gateway.core.model import Channel
from gateway.core.receipts import Fact
from gateway.inbound import OptOut
from gateway.runtime.receipts import Receipt
from tests.support import NOON_UTC, in_test_providers, make_config, promo

SALT = "report-test"
PERCENT = 30.0


def pick_recipients() -> tuple[list[str], list[str]]:
    """Six treated and two held-out recipient ids, by the control group's own hash."""
    group = ControlGroup(percent=PERCENT, salt=SALT)
    treated: list[str] = []
    held: list[str] = []
    index = 0
    while len(treated) < 6 or len(held) < 2:
        rid = f"person{index}"
        index += 1
        (held if group.holds_out("acme", rid, now=NOON_UTC) else treated).append(rid)
    return treated[:6], held[:2]


def fact(
    gateway: Gateway,
    key: str,
    kind: Fact,
    channel: Channel | None,
    provider: str | None = None,
) -> None:
    now = gateway.clock.now()
    gateway.router.receipts.apply(
        Receipt(f"acme:{key}", kind, channel=channel, at=now, provider=provider), now=now
    )


async def test_a_scripted_campaign_reports_what_happened(
    tmp_path: Path, jumping_clock: trio.testing.MockClock
) -> None:
    config = make_config(
        tmp_path,
        cascade=("push", "email", "sms"),
        extra=f'[policy.control_group]\npercent = {PERCENT}\nsalt = "{SALT}"\n',
    )
    treated, held = pick_recipients()
    variants = {
        "t0": "A",
        "t1": "A",
        "t2": "A",
        "c0": "A",
        "t3": "B",
        "t4": "B",
        "t5": "B",
        "c1": "B",
    }
    people = dict(zip(["t0", "t1", "t2", "t3", "t4", "t5"], treated, strict=True)) | dict(
        zip(["c0", "c1"], held, strict=True)
    )
    providers = in_test_providers(config)
    async with open_gateway(
        config,
        adapters=providers,
        wall_at_start=NOON_UTC,
    ) as gateway:
        clock = gateway.clock

        async def at(seconds: float) -> None:
            await trio.sleep_until(clock.trio_deadline(NOON_UTC + seconds))

        async with open_client(gateway.ingest_endpoint, timeout_seconds=1e6) as client:
            replies = {}
            for name, rid in people.items():
                request = promo(name, recipient_id=rid, campaign="spring", variant=variants[name])
                if name == "t3":
                    request["recipient"].pop("push_tokens")
                replies[name] = await client.send(request)
            await at(10)
            await client.event("t0", "acme", kind="opened", channel="push")
            await client.event("t0", "acme", kind="converted", channel="push")
            await client.event("t5", "acme", kind="opened", channel="push")
            fact(gateway, "t3", Fact.FAILED, Channel.EMAIL, "email1")  # bounced
            await at(20)
            fact(gateway, "t3", Fact.DELIVERED, Channel.SMS, "sms1")
            await at(30)
            await client.event("t3", "acme", kind="converted")
            await client.event("c0", "acme", kind="converted")
            await at(310)  # t1, t2, t4 moved on to email at 300 s
            for name in ("t1", "t2", "t4"):
                fact(gateway, name, Fact.DELIVERED, Channel.EMAIL, "email1")
            await at(320)
            fact(gateway, "t1", Fact.READ, Channel.EMAIL, "email1")
            gateway.router.inbound(
                OptOut(
                    "acme",
                    people["t4"],
                    Channel.EMAIL,
                    at=clock.now(),
                    source="one_click",
                    topic="promo",
                    key="acme:t4",
                )
            )
            await at(330)
            fact(gateway, "t1", Fact.CLICKED, Channel.EMAIL, "email1")
            await at(300 + 3600 + 5)  # t2's email timed out: SMS
            fact(gateway, "t2", Fact.DELIVERED, Channel.SMS, "sms1")
            await at(300 + 3600 + 10)
            await gateway.committer.flush()
            async with httpx.AsyncClient(base_url=gateway.http_url) as http:
                response = await http.get("/v1/reports/acme/campaigns/spring")
                missing = await http.get("/v1/reports/acme/campaigns/autumn")
    assert {"rejected"} == {replies[name]["status"] for name in ("c0", "c1")}
    assert {"holdout"} == {replies[name]["reason"] for name in ("c0", "c1")}
    assert 200 == response.status_code
    assert 404 == missing.status_code
    report = response.json()
    a, b = report["variants"]["A"], report["variants"]["B"]

    assert channel(3, None, 1, 0, 1, 0, 0, 0.0) == pick(a["channels"]["push"])  # unknown
    assert channel(2, 2, 1, 1, 0, 0, 0, 0.10) == pick(a["channels"]["email"])
    assert channel(1, 1, 0, 0, 0, 0, 0, 3.50) == pick(a["channels"]["sms"])
    assert {"size": 3, "converted": 1, "conversion_rate": 0.333333} == a["treated"]
    assert {"size": 1, "converted": 1, "conversion_rate": 1.0} == a["control"]
    assert -0.666667 == a["incremental_conversion"]
    assert (3.6, 10.5, 6.9) == (a["cost"], a["sms_equivalent_cost"], a["savings"])
    assert {
        "deliverability": 1.0,
        "open_rate": 0.5,
        "click_rate": 0.5,
        "conversion_rate": 0.0,
        "unsubscribe_rate": 0.0,
    } == rates(a["channels"]["email"])

    assert channel(2, None, 1, 0, 0, 0, 0, 0.0) == pick(b["channels"]["push"])
    assert channel(2, 1, 0, 0, 0, 1, 1, 0.10) == pick(b["channels"]["email"])
    assert channel(1, 1, 0, 0, 0, 0, 0, 3.50) == pick(b["channels"]["sms"])
    assert {"size": 3, "converted": 1, "conversion_rate": 0.333333} == b["treated"]
    assert {"size": 1, "converted": 0, "conversion_rate": 0.0} == b["control"]
    assert 0.333333 == b["incremental_conversion"]
    assert {
        "deliverability": 0.5,
        "open_rate": 0.0,
        "click_rate": 0.0,
        "conversion_rate": 0.0,
        "unsubscribe_rate": 1.0,
    } == rates(b["channels"]["email"])

    total = report["total"]
    assert {"size": 6, "converted": 2, "conversion_rate": 0.333333} == total["treated"]
    assert {"size": 2, "converted": 1, "conversion_rate": 0.5} == total["control"]
    assert (7.2, 21.0) == (total["cost"], total["sms_equivalent_cost"])
    assert "RUB" == report["currency"]


def channel(
    sent: int,
    delivered: int | None,
    opened: int,
    clicked: int,
    converted: int,
    unsubscribed: int,
    failed: int,
    cost: float,
) -> dict[str, Any]:
    return {
        "sent": sent,
        "delivered": delivered,
        "opened": opened,
        "clicked": clicked,
        "converted": converted,
        "unsubscribed": unsubscribed,
        "failed": failed,
        "cost": cost,
    }


def pick(figures: dict[str, Any]) -> dict[str, Any]:
    return {
        key: figures[key]
        for key in (
            "sent",
            "delivered",
            "opened",
            "clicked",
            "converted",
            "unsubscribed",
            "failed",
            "cost",
        )
    }


def rates(figures: dict[str, Any]) -> dict[str, Any]:
    return {
        key: figures[key]
        for key in (
            "deliverability",
            "open_rate",
            "click_rate",
            "conversion_rate",
            "unsubscribe_rate",
        )
    }
