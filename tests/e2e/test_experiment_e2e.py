"""A two-variant experiment end to end, measured against what the simulators are known to do.

Push -> email -> SMS against push -> SMS, through the four provider simulators over real HTTP,
with a 20 % control group. The simulators read a push with probability 0.2 and an email with
0.5 (SMS has no read signal; delivery ends the cascade), drawn per address from the seed, so a
run does not depend on the order requests arrive in. The test plays the CRM: a customer who
read the message buys with probability 0.5, anyone else (unread, or held out) with 0.05, and
the CRM reports the purchases with the ``event`` op.

The true conversion rates follow: with email, 0.05 + 0.45 * (1 - 0.8 * 0.5) = 0.32; without,
0.05 + 0.45 * 0.2 = 0.14; so the variants differ by -0.18, and the treated (half each) convert
0.23 against the control group's 0.05: a lift of 0.18. The report's intervals must contain
both. Assignment, fates and purchases are all deterministic (hashes and seeded per-address
draws), so the run is the same every time: the intervals are checked on one fixed sample.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import httpx
import msgspec
import trio.testing

from gateway.cli import main
from gateway.core.model import Channel
from tests.e2e.simulated import HOUR, e2e_config, gateway_with_simulators, promo, wait_until

RECIPIENTS = 600
PUSH_READ, EMAIL_READ = 0.2, 0.5
BUY_AFTER_READ, BUY_ANYWAY = 0.5, 0.05
WITH_EMAIL = BUY_ANYWAY + (BUY_AFTER_READ - BUY_ANYWAY) * (1 - (1 - PUSH_READ) * (1 - EMAIL_READ))
WITHOUT_EMAIL = BUY_ANYWAY + (BUY_AFTER_READ - BUY_ANYWAY) * PUSH_READ
TRUE_DIFFERENCE = WITHOUT_EMAIL - WITH_EMAIL  # -0.18
TRUE_LIFT = (WITH_EMAIL + WITHOUT_EMAIL) / 2 - BUY_ANYWAY  # 0.18 (equal weights)

EXPERIMENT = """
[policy.control_group]
percent = 20.0
salt = "e2e"
[tenants.acme.experiments.cascades]
[[tenants.acme.experiments.cascades.variants]]
name = "with_email"
channels = ["push", "email", "sms"]
[[tenants.acme.experiments.cascades.variants]]
name = "without_email"
channels = ["push", "sms"]
"""


def buys(message_id: str, read: bool) -> bool:
    """The CRM's customer: a fixed uniform draw per message against the buying probability."""
    digest = hashlib.blake2b(message_id.encode(), digest_size=8).digest()
    draw = int.from_bytes(digest, "big") / 2**64
    return draw < (BUY_AFTER_READ if read else BUY_ANYWAY)


def inside(interval: list[float], value: float) -> bool:
    return interval[0] <= value <= interval[1]


async def test_the_reported_differences_contain_the_true_ones(
    tmp_path: Path, jumping_clock: trio.testing.MockClock
) -> None:
    config = e2e_config(tmp_path, extra=EXPERIMENT)
    simulator = msgspec.structs.replace(
        config.simulator,
        # receipts and API answers at once: every jittered delay would be one more jump of the
        # virtual clock, and each jump waits for 10 ms of real idleness (~20 s in all)
        receipt_delay_seconds=0.0,
        read_delay_seconds=0.0,
        latency_seconds=0.0,
        read_probability_by_channel={
            Channel.PUSH: PUSH_READ,
            Channel.EMAIL: EMAIL_READ,
            Channel.SMS: 0.0,
        },
    )
    config = msgspec.structs.replace(config, simulator=simulator)
    ids = [f"m{index:04d}" for index in range(RECIPIENTS)]
    async with gateway_with_simulators(config) as (embedded, client):
        sends = [
            promo(
                message_id,
                push="tok",
                email=f"shopper-{message_id}@example.com",
                viber=None,
                experiment="cascades",
                campaign="spring",
            )
            for message_id in ids
        ]
        answers: list[dict[str, Any]] = []
        for start in range(0, RECIPIENTS, 100):
            answers.extend(await client.send_batch(sends[start : start + 100]))
        held_out = {i for i, a in zip(ids, answers, strict=True) if a.get("reason") == "holdout"}
        assert all(
            a["status"] == "accepted"
            for i, a in zip(ids, answers, strict=True)
            if i not in held_out
        )
        # push 300 s, email 1 h, then SMS delivery: every cascade has ended after 3 hours
        await wait_until(embedded, 3 * HOUR)
        statuses = []
        for start in range(0, RECIPIENTS, 100):
            statuses.extend(
                await client.send_batch(
                    [
                        {"v": 1, "op": "status", "id": i, "tenant": "acme"}
                        for i in ids[start : start + 100]
                    ]
                )
            )
        read = {}
        for message_id, status in zip(ids, statuses, strict=True):
            message = status["message"]
            assert "finished" == message["state"], message
            read[message_id] = message["outcome"] in ("read", "clicked")
        purchases = [
            {"v": 1, "op": "event", "id": i, "tenant": "acme", "kind": "converted"}
            for i in ids
            if buys(i, read[i])
        ]
        for start in range(0, len(purchases), 100):
            replies = await client.send_batch(purchases[start : start + 100])
            assert all(r["status"] == "ok" for r in replies)
        gateway = embedded.gateway
        async with httpx.AsyncClient(base_url=gateway.http_url) as http:
            experiment = (await http.get("/v1/reports/acme/experiments/cascades")).json()
            campaign = (await http.get("/v1/reports/acme/campaigns/spring")).json()
        printed = await trio.to_thread.run_sync(
            lambda: main(["report", "experiment", "acme", "cascades", "--url", gateway.http_url])
        )

    assert 0 == printed
    with_email = experiment["variants"]["with_email"]
    without_email = experiment["variants"]["without_email"]
    assert "with_email" == experiment["baseline"]
    assert RECIPIENTS - len(held_out) == with_email["messages"] + without_email["messages"]
    assert None is with_email["difference"]
    difference = without_email["difference"]
    assert inside(difference["interval"], TRUE_DIFFERENCE), difference
    assert difference["p_value"] < 0.01  # 300 a side detect 18 points
    assert inside(with_email["conversion_interval"], WITH_EMAIL)
    assert inside(without_email["conversion_interval"], WITHOUT_EMAIL)
    # the funnel: the arm without email never sent one
    assert "email" not in without_email["channels"]
    assert with_email["channels"]["email"]["sent"] > 0
    assert with_email["cost_per_conversion"] == round(
        with_email["cost"] / with_email["converted"], 6
    )
    # the control group: held out, never sent, converting at the base rate
    lift = campaign["total"]["lift"]
    assert len(held_out) == campaign["total"]["control"]["size"]
    assert inside(lift["interval"], TRUE_LIFT), lift
