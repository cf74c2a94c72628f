"""The gateway's public side as a provider simulator sees it: records webhooks and taps.

The Twilio and Viber simulator tests point their simulator here instead of at a gateway, and
read back every callback and tracked-link tap it made (``hits``, ``until``, ``received``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import hypercorn.config
import hypercorn.trio
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route


@dataclass(frozen=True)
class Hit:
    """One request that reached the test's stand-in for the gateway."""

    kind: str  # "webhook" | "click"
    url: str
    headers: dict[str, str]
    body: bytes


class FakeGateway:
    """Records webhooks (answered ``webhook_status``) and tracked-link clicks (302)."""

    def __init__(self) -> None:
        self.url = ""
        self._send, self._receive = trio.open_memory_channel[Hit](math.inf)
        self.webhook_status = 200

    def app(self) -> Starlette:
        async def webhook(request: Request) -> Response:
            body = await request.body()
            self._send.send_nowait(Hit("webhook", str(request.url), dict(request.headers), body))
            return Response(status_code=self.webhook_status)

        async def click(request: Request) -> Response:
            self._send.send_nowait(Hit("click", str(request.url), dict(request.headers), b""))
            return RedirectResponse("https://shop.test/landing", status_code=302)

        return Starlette(
            routes=[
                Route("/webhooks/{provider}", webhook, methods=["POST"]),
                Route("/t/c/{token}", click, methods=["GET"]),
            ]
        )

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on a free loopback port (``url``) until cancelled."""
        config = hypercorn.config.Config()
        config.bind = ["127.0.0.1:0"]
        config.accesslog = None
        config.errorlog = None
        async with trio.open_nursery() as nursery:
            (self.url,) = await nursery.start(hypercorn.trio.serve, self.app(), config)
            task_status.started()

    async def hits(self, count: int) -> list[Hit]:
        with trio.fail_after(5):
            return [await self._receive.receive() for _ in range(count)]

    async def until(self, last: Callable[[Hit], bool]) -> list[Hit]:
        """Every hit up to and including the first that ``last`` picks (bounded by the caller)."""
        hits = [await self._receive.receive()]
        while not last(hits[-1]):
            hits.append(await self._receive.receive())
        return hits

    def received(self) -> list[Hit]:
        """The hits that have arrived and were not taken yet."""
        hits = []
        while True:
            try:
                hits.append(self._receive.receive_nowait())
            except trio.WouldBlock:
                return hits
