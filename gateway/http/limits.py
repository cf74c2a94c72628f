"""Bounds on every admin HTTP request: body size, read time, requests at once.

An ASGI middleware in front of the admin server (hypercorn + Starlette); the public server
(webhooks, tracking links) is ``gateway.httpserver``, which enforces the same bounds itself.

It reads the request body itself, before any route sees it: a declared ``Content-Length`` over
the limit is answered 413 without reading a byte, a body that grows past it is answered 413
while it is read (a 300 MB PUT costs a buffer, not 300 MB), and a body that stalls is answered 408
after ``http.read_timeout_seconds``. Past ``http.max_concurrent_requests`` requests being
read or worked on, a request is answered 503 at once, except the health checks, which are cheap
and must answer most when the server is busiest. A request gives its slot back when its
response starts: a client that never reads its response (hypercorn shields the write, so it
cannot be timed out from here) then holds its own connection, not everyone's capacity. Routes
read ``request.body()`` as usual, from memory.

Headers that stall are hypercorn's to time out (``read_timeout``, set from the same key).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import trio

from gateway.config import HttpConfig

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def _answer(send: Send, status: int, text: str) -> None:
    body = text.encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


_HEALTH = frozenset({"/healthz", "/readyz"})


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class Limits:
    """The middleware. ``body_limit(path)`` is the largest body the route at ``path`` takes."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        body_limit: Callable[[str], int],
        read_timeout_seconds: float,
        max_concurrent_requests: int,
    ) -> None:
        self.app = app
        self.body_limit = body_limit
        self.read_timeout_seconds = read_timeout_seconds
        self.max_concurrent_requests = max_concurrent_requests
        self.active = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] in _HEALTH:
            await self.app(scope, receive, send)
            return
        if self.active >= self.max_concurrent_requests:
            await _answer(send, 503, "too many requests at once, retry later")
            return
        self.active += 1
        holding = True

        def release() -> None:
            nonlocal holding
            if holding:
                holding = False
                self.active -= 1

        async def send_releasing(message: Message) -> None:
            if message["type"] == "http.response.start":
                release()
            await send(message)

        try:
            await self._bounded(scope, receive, send_releasing)
        finally:
            release()

    async def _bounded(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.body_limit(scope["path"])
        declared = _declared_length(scope)
        if declared is not None and declared > limit:
            await _answer(send, 413, f"body over the {limit}-byte limit")
            return
        chunks: list[bytes] = []
        size = 0
        with trio.move_on_after(self.read_timeout_seconds) as reading:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    await _answer(send, 413, f"body over the {limit}-byte limit")
                    return
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
        if reading.cancelled_caught:
            await _answer(send, 408, "the request body did not arrive in time")
            return
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def route_body_limit(config: HttpConfig) -> Callable[[str], int]:
    """Every admin route takes small bodies (provider webhooks are the public server's)."""

    def limit(_: str) -> int:
        return config.admin_max_body_bytes

    return limit


def bounded(app: ASGIApp, config: HttpConfig) -> Limits:
    """``app`` behind the configured limits."""
    return Limits(
        app,
        body_limit=route_body_limit(config),
        read_timeout_seconds=config.read_timeout_seconds,
        max_concurrent_requests=config.max_concurrent_requests,
    )
