"""What every provider simulator shares: fates, failure injection, recording, signed receipts.

A simulator is a real HTTP server (the gateway's lean server, ``gateway.httpserver``, so a
benchmark measures the gateway rather than the simulators) that accepts exactly its provider's
API, then, like the provider, calls the gateway's webhook URL later with receipts
signed the provider's way. Each subclass supplies the routes and the receipt bodies; this module
decides what happens to a message and when.

What happens to a message (its *fate*) is decided per address, so tests are deterministic:
a tag in the address forces a fate, and untagged addresses draw from the configured
probabilities (``[simulator]`` in the config) with a seeded RNG.

| tag in the address (case-insensitive) | fate |
|---|---|
| ``read`` (email ``x+read@``, token ``tok-read-1``, viber ``vb-read-1``) | delivered, then read |
| ``click`` | delivered, read, then the tracked link is clicked |
| ``ignore`` | delivered, never read |
| ``bounce`` | accepted, then a bounce / undelivered / failed receipt |
| ``unsub`` | delivered, then the recipient unsubscribes with the provider |
| ``invalid`` | the API rejects the request as a permanent error (bad token, bad number) |
| ``fail`` | the API answers 5xx (transient) every time |
| ``throttle`` | the API answers 429 with ``Retry-After: 1`` the first time, then accepts |

Phones carry no letters, so a phone's last four digits select the same fates:

| phone ends in | fate |
|---|---|
| ``0001`` | delivered, read, the tracked link clicked |
| ``0002`` | ignore |
| ``0003`` | bounce (undelivered) |
| ``0004`` | invalid |
| ``0005`` | fail |
| ``0006`` | throttle |
| ``0007`` | delivered, then the recipient texts STOP (Twilio: an inbound message to the webhook) |

Other phones are delivered.

Tests can also queue exact answers: ``script.append(Scripted(status=503, ...))`` makes the next
API request get that answer, whatever the address. ``replay(times)`` (or ``POST /_sim/replay``
with ``{"times": N}``) posts the last webhook again, byte for byte, as a provider retrying it
would.
"""

from __future__ import annotations

import enum
import random
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Any

import msgspec
import trio

from adapters._transport import ConnectionPool, HttpRequest, TransportError
from gateway.clock import wall_time
from gateway.core.model import Channel
from gateway.core.timers import Deadlines
from gateway.httpserver import Limits, Request, Response, Route, Router, Server, json_response
from gateway.settings import SimulatorConfig

_MAX_BODY_BYTES = 32 * 1024 * 1024
_WEBHOOK_TIMEOUT_SECONDS = 10.0
"""Larger than any request the real APIs take (SendGrid's is 30 MB), so a simulator refuses
what its provider would not have refused only at a size no test sends."""


class Fate(enum.Enum):
    READ = "read"
    CLICK = "click"
    IGNORE = "ignore"
    BOUNCE = "bounce"
    UNSUBSCRIBE = "unsub"
    INVALID = "invalid"
    FAIL = "fail"
    THROTTLE = "throttle"
    STOP_REPLY = "stop-reply"  # phones only (0007): delivered, then the recipient texts STOP
    DELIVER = "deliver"  # delivered; read/click drawn from probabilities


_TAGS = (
    Fate.READ,
    Fate.CLICK,
    Fate.IGNORE,
    Fate.BOUNCE,
    Fate.UNSUBSCRIBE,
    Fate.INVALID,
    Fate.FAIL,
    Fate.THROTTLE,
)
_PHONE_SUFFIXES = {
    "0001": Fate.CLICK,
    "0002": Fate.IGNORE,
    "0003": Fate.BOUNCE,
    "0004": Fate.INVALID,
    "0005": Fate.FAIL,
    "0006": Fate.THROTTLE,
    "0007": Fate.STOP_REPLY,
}


class Scripted(msgspec.Struct):
    """An exact answer for the next API request."""

    status: int
    body: dict[str, Any] = {}
    headers: dict[str, str] = {}


class _Replay(msgspec.Struct):
    times: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 1


class Recorded(msgspec.Struct):
    """An API request as the simulator received it (for assertions, and ``GET /_sim/requests``)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


_CHANNEL_OF_KIND = {
    "fcm": Channel.PUSH,
    "sendgrid": Channel.EMAIL,
    "viber": Channel.VIBER,
    "twilio": Channel.SMS,
}


class Simulator:
    """Base of the four simulators. Subclasses set ``kind`` and implement ``routes``."""

    kind = ""

    def __init__(
        self,
        *,
        name: str,
        behaviour: SimulatorConfig,
        webhook_url: str = "",
        seed: int | None = None,
        wall_offset: float | None = None,
    ) -> None:
        self.name = name
        self.wall_offset = wall_offset
        """POSIX time minus ``trio.current_time()``: receipts carry real-looking timestamps that
        follow trio's clock, so a MockClock-driven gateway does not find them stale. Taken from
        the real clock at ``serve`` unless given (the embedded gateway passes its own)."""
        self.behaviour = behaviour
        self.webhook_url = webhook_url
        self.random = random.Random(seed if seed is not None else behaviour.seed)
        self.requests: list[Recorded] = []
        self.script: deque[Scripted] = deque()
        self.webhook_statuses: list[int] = []
        """HTTP status of every receipt the gateway answered (200 expected)."""
        self.last_webhook: tuple[str, bytes, dict[str, str]] | None = None
        """``(url, body, headers)`` of the last webhook posted, for ``replay``."""
        self.clicks: list[int] = []
        """HTTP status the gateway's click tracker answered for every tapped link (0 = no answer)."""
        self._throttled: set[str] = set()
        self._due: Deadlines[int] = Deadlines()
        self._receipts: dict[int, Callable[[], Awaitable[None]]] = {}
        self._receipt_ids = 0
        self._posting = 0
        self._wake = trio.Event()
        self.url = ""
        self._client: ConnectionPool | None = None

    # ------------------------------------------------------------ subclass API
    def routes(self) -> list[Route]:
        raise NotImplementedError

    def credentials(self) -> dict[str, object]:
        """Provider settings the gateway needs to talk to this simulator (keys, secrets)."""
        return {}

    # ------------------------------------------------------------ fates
    def fate(self, address: str) -> Fate:
        lowered = address.lower()
        if lowered.startswith("+") and lowered[1:].isdigit():
            return _PHONE_SUFFIXES.get(lowered[-4:], Fate.DELIVER)
        for fate in _TAGS:
            if fate.value in lowered:
                return fate
        return Fate.DELIVER

    def api_failure(self, address: str) -> Scripted | None:
        """The failure the API should answer for this request, if any (before success)."""
        if self.script:
            return self.script.popleft()
        fate = self.fate(address)
        if fate is Fate.FAIL:
            return Scripted(status=503)
        if fate is Fate.THROTTLE and address not in self._throttled:
            self._throttled.add(address)
            return Scripted(status=429, headers={"Retry-After": "1"})
        roll = self.random.random()
        if roll < self.behaviour.error_rate:
            return Scripted(status=503)
        if roll < self.behaviour.error_rate + self.behaviour.rate_limit_rate:
            return Scripted(status=429, headers={"Retry-After": "1"})
        return None

    def engagement(self, address: str) -> tuple[bool, bool, bool, bool, bool]:
        """(delivered, read, clicked, bounced, unsubscribed) for an accepted message."""
        fate = self.fate(address)
        b = self.behaviour
        channel = _CHANNEL_OF_KIND.get(self.kind)
        read_probability = (
            b.read_probability
            if channel is None
            else b.read_probability_by_channel.get(channel, b.read_probability)
        )
        if b.seed is None:
            r = self.random.random
        else:
            # one generator per address: the fates do not depend on the order of requests
            r = random.Random(f"{b.seed}:{self.kind}:{address}").random
        match fate:
            case Fate.READ:
                return True, True, False, False, False
            case Fate.CLICK:
                return True, True, True, False, False
            case Fate.IGNORE:
                return True, False, False, False, False
            case Fate.BOUNCE:
                return False, False, False, True, False
            case Fate.UNSUBSCRIBE | Fate.STOP_REPLY:
                return True, False, False, False, True
            case _:
                if r() < b.bounce_probability:
                    return False, False, False, True, False
                delivered = r() < b.deliver_probability
                read = delivered and r() < read_probability
                clicked = read and r() < b.click_probability
                unsubscribed = delivered and not read and r() < b.unsubscribe_probability
                return delivered, read, clicked, False, unsubscribed

    async def delay(self) -> None:
        """The configured API latency."""
        if self.behaviour.latency_seconds:
            await trio.sleep(self.behaviour.latency_seconds)

    # ------------------------------------------------------------ recording
    async def record(self, request: Request) -> bytes:
        body = request.body
        self.requests.append(
            Recorded(request.method, request.path, dict(request.headers), body, trio.current_time())
        )
        return body

    # ------------------------------------------------------------ receipts
    def later(self, delay_seconds: float, send: Callable[[], Awaitable[None]]) -> None:
        """Run ``send`` (which posts a receipt) after ``delay_seconds``."""
        self._receipt_ids += 1
        self._receipts[self._receipt_ids] = send
        self._due.schedule(self._receipt_ids, trio.current_time() + delay_seconds)
        self._wake.set()

    def jitter(self, base_seconds: float) -> float:
        return base_seconds * (0.5 + self.random.random())

    async def post_webhook(self, url: str, *, content: bytes, headers: Mapping[str, str]) -> int:
        client = self._client
        assert client is not None, "the simulator is not serving"
        self.last_webhook = (url, content, dict(headers))
        self._posting += 1
        try:
            response = await client.send(HttpRequest("POST", url, headers, content))
        except (TransportError, ValueError):  # unreachable, or a URL that is not http(s)
            self.webhook_statuses.append(0)
            return 0
        finally:
            self._posting -= 1
        self.webhook_statuses.append(response.status_code)
        return response.status_code

    def quiet(self) -> bool:
        """Nothing scheduled and no webhook being posted: everything due so far was answered."""
        return not self._receipts and not self._posting

    async def replay(self, times: int = 1) -> list[int]:
        """Post the last webhook ``times`` more times, unchanged (same body, same signature),
        as a provider does when it retries a callback; the gateway's answers, in order.

        Raises:
            LookupError: nothing was posted yet.
        """
        if self.last_webhook is None:
            raise LookupError("no webhook posted yet")
        url, content, headers = self.last_webhook
        return [
            await self.post_webhook(url, content=content, headers=headers) for _ in range(times)
        ]

    async def tap(self, url: str) -> None:
        """The recipient taps a tracked link: a GET, redirects not followed (a browser would go
        on to the shop; the tracker has counted the click by then)."""
        client = self._client
        assert client is not None, "the simulator is not serving"
        try:
            response = await client.send(HttpRequest("GET", url))  # redirects are not followed
        except (TransportError, ValueError):
            self.clicks.append(0)
            return
        self.clicks.append(response.status_code)

    async def _deliver_receipts(self, nursery: trio.Nursery) -> None:
        while True:
            for receipt_id, _ in self._due.pop_due(trio.current_time()):
                nursery.start_soon(self._receipts.pop(receipt_id))
            deadline = self._due.next_deadline()
            self._wake = trio.Event()
            with trio.move_on_at(deadline if deadline is not None else float("inf")):
                await self._wake.wait()

    # ------------------------------------------------------------ serving
    def router(self) -> Router:
        async def recorded(_: Request) -> Response:
            return json_response(
                [
                    {
                        "method": r.method,
                        "path": r.path,
                        "headers": r.headers,
                        "body": r.body.decode(errors="replace"),
                    }
                    for r in self.requests
                ]
            )

        async def script(request: Request) -> Response:
            try:
                self.script.append(msgspec.convert(request.json(), Scripted))
            except (ValueError, msgspec.ValidationError):
                return json_response({"error": "expected a Scripted answer"}, 400)
            return json_response({"queued": len(self.script)})

        async def replay(request: Request) -> Response:
            try:
                times = msgspec.convert(request.json(), _Replay).times
            except (ValueError, msgspec.ValidationError):
                return json_response({"error": 'expected {"times": <1..1000>}'}, 400)
            try:
                return json_response({"statuses": await self.replay(times)})
            except LookupError:
                return json_response({"error": "no webhook posted yet"}, 409)

        return Router(
            [
                *self.routes(),
                Route("GET", "/_sim/requests", recorded),
                Route("POST", "/_sim/script", script),
                Route("POST", "/_sim/replay", replay),
            ]
        )

    def wall_now(self) -> float:
        """POSIX seconds on the simulator's clock (see ``wall_offset``)."""
        offset = self.wall_offset if self.wall_offset is not None else 0.0
        return offset + trio.current_time()

    async def serve(
        self,
        bind: str = "127.0.0.1:0",
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        if self.wall_offset is None:
            self.wall_offset = wall_time() - trio.current_time()
        # a provider API takes what the gateway sends; the limits only stop a runaway client
        limits = Limits(max_body_bytes=_MAX_BODY_BYTES, read_timeout_seconds=30.0)
        server = Server(self.router(), limits, name=f"simulator:{self.name}")
        # the same lean client the gateway's adapters use, so that a bench measures the gateway
        async with (
            ConnectionPool(timeout_seconds=_WEBHOOK_TIMEOUT_SECONDS) as client,
            trio.open_nursery() as nursery,
        ):
            self._client = client
            nursery.start_soon(self._deliver_receipts, nursery)
            self.url = await nursery.start(server.serve, bind)
            task_status.started(self.url)
