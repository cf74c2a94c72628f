"""SIGKILL while people unsubscribe: whoever was told "You are unsubscribed." stays so.

Each round starts the real process, has 60 people post their one-click unsubscribe within
200 ms, and kills the gateway at a random moment shortly after the first success page. After a
restart, every person who got the success page must have the withdrawal in the journal;
the others may or may not (they were not told anything, or told to try again).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import httpx
import pytest
import trio

from gateway.core.model import Channel
from gateway.tracking import LinkSigner
from tests.e2e.processes import GatewayProcess, standalone_config

# real processes, crashes, minutes of load: `make test` runs them, `make unit` does not
pytestmark = pytest.mark.slow

ROUNDS = 10
PEOPLE = 60
SECRET = "crash-test-tracking-secret-0123456789"  # noqa: S105 - a test's own key


async def unsubscribe_all(
    http: httpx.AsyncClient,
    links: list[tuple[str, str, float]],
    told: dict[str, bool],
    first_told: trio.Event,
) -> None:
    async def one(recipient: str, url: str, delay_seconds: float) -> None:
        await trio.sleep(delay_seconds)
        try:
            response = await http.post(url, data={"List-Unsubscribe": "One-Click"})
        except httpx.HTTPError:
            told[recipient] = False  # the gateway died under the request: nothing promised
            return
        told[recipient] = response.status_code == 200 and "You are unsubscribed." in response.text
        if told[recipient]:
            first_told.set()

    async with trio.open_nursery() as nursery:
        for recipient, url, delay_seconds in links:
            nursery.start_soon(one, recipient, url, delay_seconds)


async def test_an_answered_unsubscribe_survives_sigkill(tmp_path: Path) -> None:
    config, http_url, _, public_url = standalone_config(tmp_path, store_extra="create = true")
    # fsync per commit: the slower the commit, the wider the window a kill can land in
    config.write_text(config.read_text().replace('synchronous = "normal"', 'synchronous = "full"'))
    environ = {"CASCADEGW__TRACKING__SECRET": SECRET}
    signer = LinkSigner([SECRET.encode()], public_url)
    process = GatewayProcess(config, environ, http_url)
    rng = random.Random(20261205)
    told: dict[str, bool] = {}
    for round_index in range(ROUNDS):
        links = [
            (
                f"r{round_index}-{n}",
                signer.unsubscribe_url(
                    f"acme:m{round_index}-{n}",
                    Channel.EMAIL,
                    recipient_id=f"r{round_index}-{n}",
                    topic="promo",
                    now=time.time(),
                ),
                rng.uniform(0.0, 0.2),  # people arrive over 200 ms: many commits, not one
            )
            for n in range(PEOPLE)
        ]
        await process.start()
        async with httpx.AsyncClient(timeout=30) as http, trio.open_nursery() as nursery:
            first_told = trio.Event()
            nursery.start_soon(unsubscribe_all, http, links, told, first_told)
            # kill just after the first person of the round was told: the others are then in
            # every stage, from connecting to staged-but-not-yet-committed
            with trio.fail_after(60):
                await first_told.wait()
            await trio.sleep(rng.uniform(0.0, 0.05))
            await process.kill()
    await process.start()
    async with httpx.AsyncClient(base_url=http_url, timeout=30) as http:
        lost = []
        for recipient, success in sorted(told.items()):
            consents = (await http.get(f"/v1/recipients/acme/{recipient}/consents")).json()
            withdrawn = any(
                c["action"] == "withdraw" and c["channel"] == "email" and c["topic"] == "promo"
                for c in consents["effective"]
            )
            if success and not withdrawn:
                lost.append(recipient)
    await process.stop()
    assert [] == lost
    # the kills landed among the requests: some people were told, others were cut off
    assert 0 < sum(told.values()) < len(told)
