"""The SendGrid simulator batches its Event Webhook across messages, as SendGrid does.

Against a webhook endpoint on the lean server, on virtual time: the events of several messages
arrive in one signed POST, a full batch goes out at once, and ``replay`` re-posts the last POST
byte for byte.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import msgspec
import pytest
import trio
import trio.testing

from adapters.sendgrid import SendgridSettings, parse_webhook, verify_webhook
from adapters.simulators.sendgrid import SendgridSimulator
from gateway.httpserver import Request, Response, Route, Router, Server
from gateway.settings import Secret, SimulatorConfig
from tests.support import wait_for

BATCHING = SimulatorConfig(
    latency_seconds=0,
    receipt_delay_seconds=0.5,  # due between 0.25 and 0.75 s after the send (jitter)
    read_delay_seconds=100.0,
    sendgrid_batch_seconds=1.0,
)


@pytest.fixture
def clock() -> trio.testing.MockClock:
    # local sockets deliver in microseconds: 10 ms of real idleness means everyone waits on time
    return trio.testing.MockClock(autojump_threshold=0.01)


class Inbox:
    """The gateway's webhook endpoint as SendGrid sees it: records every POST, answers 200."""

    def __init__(self) -> None:
        self.posts: list[tuple[dict[str, str], bytes]] = []

    async def receive(self, request: Request) -> Response:
        self.posts.append((dict(request.headers), request.body))
        return Response(200)


@asynccontextmanager
async def simulated(behaviour: SimulatorConfig) -> AsyncIterator[tuple[SendgridSimulator, Inbox]]:
    inbox = Inbox()
    server = Server(Router([Route("POST", "/webhooks/email1", inbox.receive)]))
    sim = SendgridSimulator(name="email1", behaviour=behaviour, seed=5)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(server.serve, "127.0.0.1:0")
        sim.webhook_url = f"{url}/webhooks/email1"
        await nursery.start(sim.serve)
        yield sim, inbox
        nursery.cancel_scope.cancel()


def mail(index: int) -> dict[str, Any]:
    return {
        "personalizations": [
            {
                "to": [{"email": f"p{index}+ignore@example.com"}],
                "custom_args": {"cgw_key": f"acme:m{index}"},
            }
        ],
        "from": {"email": "news@acme.example"},
        "subject": "Sale",
        "content": [{"type": "text/plain", "value": "Sale"}],
    }


async def send(sim: SendgridSimulator, count: int) -> None:
    async with httpx.AsyncClient(base_url=sim.url, timeout=1e6) as http:
        for index in range(count):
            accepted = await http.post(
                "/v3/mail/send",
                json=mail(index),
                headers={"Authorization": f"Bearer {sim.api_key}"},
            )
            assert 202 == accepted.status_code


def settings(sim: SendgridSimulator) -> SendgridSettings:
    return SendgridSettings(
        url=sim.url, api_key=Secret(sim.api_key), webhook_public_key=sim.public_key
    )


async def test_events_of_many_messages_arrive_in_one_signed_post(
    clock: trio.testing.MockClock,
) -> None:
    async with simulated(BATCHING) as (sim, inbox):
        await send(sim, 5)
        await wait_for(sim.quiet)  # everything due has been posted and answered
        config = settings(sim)
    (headers, body), *more = inbox.posts
    assert [] == more
    verify_webhook(
        url=sim.webhook_url, headers=headers, body=body, config=config, now=sim.wall_now()
    )
    events = msgspec.json.decode(body)
    assert 10 == len(events)  # processed + delivered, five messages
    assert {f"acme:m{i}" for i in range(5)} == {e["cgw_key"] for e in events}
    receipts = parse_webhook(url=sim.webhook_url, headers=headers, body=body)
    assert {f"acme:m{i}" for i in range(5)} == {r.message_key for r in receipts}


async def test_a_full_batch_goes_out_before_its_window_ends(clock: trio.testing.MockClock) -> None:
    behaviour = msgspec.structs.replace(BATCHING, sendgrid_batch_max_events=4)
    async with simulated(behaviour) as (sim, inbox):
        started = trio.current_time()
        await send(sim, 5)
        await wait_for(lambda: bool(inbox.posts))
        first_seconds = trio.current_time() - started
        await wait_for(lambda: 10 == sum(len(msgspec.json.decode(b)) for _, b in inbox.posts))
    sizes = [len(msgspec.json.decode(body)) for _, body in inbox.posts]
    assert [4, 4, 2] == sizes
    # all ten events fall due within 0.75 s: the full batches did not wait for the 1 s window
    assert first_seconds < 1.0


async def test_replay_reposts_the_last_batch_byte_for_byte(clock: trio.testing.MockClock) -> None:
    async with simulated(BATCHING) as (sim, inbox):
        await send(sim, 3)
        await wait_for(lambda: bool(inbox.posts))
        assert [200, 200] == await sim.replay(2)
    first, *retries = inbox.posts
    assert 2 == len(retries)
    signature = "x-twilio-email-event-webhook-signature"
    for headers, body in retries:
        assert (first[1], first[0][signature]) == (body, headers[signature])


async def test_without_a_window_each_message_posts_its_own(clock: trio.testing.MockClock) -> None:
    behaviour = msgspec.structs.replace(BATCHING, sendgrid_batch_seconds=0.0)
    async with simulated(behaviour) as (sim, inbox):
        await send(sim, 3)
        await wait_for(lambda: 3 == len(inbox.posts))
    keys = [{e["cgw_key"] for e in msgspec.json.decode(body)} for _, body in inbox.posts]
    assert sorted([{"acme:m0"}, {"acme:m1"}, {"acme:m2"}], key=str) == sorted(keys, key=str)
