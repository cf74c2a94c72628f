"""A Viber REST Bot API simulator: ``/pa/send_message``, ``/pa/set_webhook`` and signed callbacks.

It answers like chatapi.viber.com: always HTTP 200 with a ``status`` (0 ok, 2 invalidAuthToken,
3 badData, 4 missingData, 5 receiverNotRegistered, 12 tooManyRequests, ...), except for the
HTTP-level failures its front ends produce (``fail`` fate: 503). Later it posts callbacks to the
registered webhook, each signed with ``X-Viber-Content-Signature`` (hex HMAC-SHA256 of the body
keyed with the bot's auth token): ``delivered``, then ``seen`` when the recipient reads it,
``failed`` for a bounce, ``unsubscribed`` when the recipient leaves the bot. Viber reports no
clicks; for a click fate the simulated recipient opens the tracked link, as a phone would.

Validation, like the real API:
- ``X-Viber-Auth-Token`` missing or wrong -> status 2;
- a body that is not a JSON object, or fields of the wrong type -> status 3 (badData);
- ``receiver``, ``type``, ``sender.name``, ``text`` (text, picture) or ``media`` (picture)
  missing -> status 4 (missingData);
- ``sender.name`` over 28 characters, ``text`` over 7000 (768 for a picture caption),
  ``tracking_data`` over 4000, an unsupported ``type``, a picture whose ``media`` URL does not
  end its last path segment in .jpeg, .png or .gif (Viber's documented requirement; the real
  service fails such a picture, the simulator refuses it at once) -> status 3.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Final
from urllib.parse import urlsplit

import msgspec

from adapters.simulators._base import Fate, Scripted, Simulator
from gateway.httpserver import Request, Response, Route, json_response
from gateway.settings import Secret, SimulatorConfig

CHAT_HOSTNAME: Final = "SN-CHAT-01_"
EVENT_TYPES: Final = frozenset(
    {"delivered", "seen", "failed", "subscribed", "conversation_started"}
)
"""Callbacks ``set_webhook`` can filter; ``message``, ``subscribed`` and ``unsubscribed`` always
come (Viber's set_webhook docs)."""
_TRACKED_LINK: Final = re.compile(r"https?://[^\s]+/t/c/[^\s]+")
_PICTURE_TYPES: Final = (".jpeg", ".png", ".gif")
_STATUS_NAMES: Final = {
    0: "ok",
    1: "invalidUrl",
    2: "invalidAuthToken",
    3: "badData",
    4: "missingData",
    5: "receiverNotRegistered",
    12: "tooManyRequests",
}


def _status(status: int) -> Response:
    return json_response(
        {"status": status, "status_message": _STATUS_NAMES[status], "chat_hostname": CHAT_HOSTNAME}
    )


def _check_message(body: object) -> int:
    """0 when ``body`` is a send_message request Viber would take, else its error status."""
    if not isinstance(body, dict):
        return 3
    receiver = body.get("receiver")
    kind = body.get("type")
    sender = body.get("sender")
    if receiver is None or kind is None or sender is None:
        return 4
    if not isinstance(receiver, str) or not isinstance(kind, str) or not isinstance(sender, dict):
        return 3
    name = sender.get("name")
    if name is None:
        return 4
    if not isinstance(name, str) or not 0 < len(name) <= 28:
        return 3
    version = body.get("min_api_version", 1)
    tracking = body.get("tracking_data", "")
    if not isinstance(version, int) or not isinstance(tracking, str) or len(tracking) > 4000:
        return 3
    text = body.get("text")
    match kind:
        case "text":
            if text is None:
                return 4
            if not isinstance(text, str) or not 0 < len(text) <= 7000:
                return 3
        case "picture":
            media = body.get("media")
            if text is None or media is None:
                return 4
            if not isinstance(text, str) or len(text) > 768:
                return 3
            if not isinstance(media, str) or not media.startswith(("http://", "https://")):
                return 3
            if not urlsplit(media).path.rsplit("/", 1)[-1].lower().endswith(_PICTURE_TYPES):
                return 3
        case _:
            return 3
    return 0


class ViberSimulator(Simulator):
    """A Viber bot account: one auth token, one webhook."""

    kind = "viber"

    def __init__(
        self,
        *,
        name: str,
        behaviour: SimulatorConfig,
        webhook_url: str = "",
        seed: int | None = None,
        wall_offset: float | None = None,
    ) -> None:
        super().__init__(
            name=name,
            behaviour=behaviour,
            webhook_url=webhook_url,
            seed=seed,
            wall_offset=wall_offset,
        )
        self.auth_token = "-".join(secrets.token_hex(8) for _ in range(3))
        self.event_types: frozenset[str] = EVENT_TYPES
        """Wall time minus ``trio.current_time()``; fixed when serving starts unless given, so
        callbacks carry real epoch timestamps even under a MockClock."""
        """HTTP status of every tracked link the simulated recipients opened."""

    def credentials(self) -> dict[str, object]:
        return {"url": self.url, "auth_token": Secret(self.auth_token)}

    def routes(self) -> list[Route]:
        return [
            Route("POST", "/pa/send_message", self._send_message),
            Route("POST", "/pa/set_webhook", self._set_webhook),
        ]

    # ------------------------------------------------------------ API
    def _authorised(self, request: Request) -> bool:
        given = request.headers.get("x-viber-auth-token", "")
        return hmac.compare_digest(given.encode(), self.auth_token.encode())

    async def _json(self, request: Request) -> tuple[object, bool]:
        body = await self.record(request)
        try:
            return msgspec.json.decode(body), True
        except msgspec.DecodeError:
            return None, False

    async def _send_message(self, request: Request) -> Response:
        body, parsed = await self._json(request)
        await self.delay()
        if not self._authorised(request):
            return _status(2)
        status = _check_message(body) if parsed else 3
        if status:
            return _status(status)
        assert isinstance(body, dict)
        receiver: str = body["receiver"]
        failure = self.api_failure(receiver)
        if failure is not None:
            return self._failure(failure)
        if self.fate(receiver) is Fate.INVALID:
            return _status(5)
        token = self.random.getrandbits(63) or 1
        self._schedule_callbacks(receiver, token, str(body.get("text", "")))
        return json_response(
            {
                "status": 0,
                "status_message": "ok",
                "message_token": token,
                "chat_hostname": CHAT_HOSTNAME,
            }
        )

    def _failure(self, failure: Scripted) -> Response:
        """A scripted answer with a body goes out exactly; a bare 429 is Viber's status 12
        (Viber signals rate control in the body, not with HTTP 429); other statuses are HTTP
        errors of Viber's front ends."""
        if failure.body:
            return json_response(failure.body, status=failure.status, headers=failure.headers)
        if failure.status == 429:
            return _status(12)
        return json_response(
            {"status": "error", "status_message": "service unavailable"},
            status=failure.status,
            headers=failure.headers,
        )

    async def _set_webhook(self, request: Request) -> Response:
        body, parsed = await self._json(request)
        if not self._authorised(request):
            return _status(2)
        if not parsed or not isinstance(body, dict):
            return _status(3)
        url = body.get("url")
        if url is None:
            return _status(4)
        event_types = body.get("event_types", sorted(EVENT_TYPES))
        if (
            not isinstance(url, str)
            or not isinstance(event_types, list)
            or not all(isinstance(e, str) for e in event_types)
        ):
            return _status(3)
        if url:
            # Viber calls the new webhook once and refuses it unless it answers 200.
            check = {
                "event": "webhook",
                "timestamp": self._timestamp_ms(),
                "chat_hostname": CHAT_HOSTNAME,
                "message_token": self.random.getrandbits(63),
            }
            if await self._post(url, check) != 200:
                return _status(1)
        self.webhook_url = url
        self.event_types = frozenset(event_types) & EVENT_TYPES
        return json_response(
            {
                "status": 0,
                "status_message": "ok",
                "chat_hostname": CHAT_HOSTNAME,
                "event_types": sorted(self.event_types),
            }
        )

    # ------------------------------------------------------------ callbacks
    def _timestamp_ms(self) -> int:
        return round(self.wall_now() * 1000)

    def sign(self, body: bytes) -> str:
        return hmac.new(self.auth_token.encode(), body, hashlib.sha256).hexdigest()

    async def _post(self, url: str, event: dict[str, Any]) -> int:
        content = msgspec.json.encode(event)
        headers = {
            "Content-Type": "application/json",
            "X-Viber-Content-Signature": self.sign(content),
        }
        return await self.post_webhook(url, content=content, headers=headers)

    def _event(
        self, event: str, token: int, receiver: str, **extra: object
    ) -> Callable[[], Awaitable[None]]:
        async def send() -> None:
            if not self.webhook_url:
                return
            if event in EVENT_TYPES and event not in self.event_types:
                return
            body: dict[str, Any] = {
                "event": event,
                "timestamp": self._timestamp_ms(),
                "message_token": token,
                "user_id": receiver,
                **extra,
            }
            await self._post(self.webhook_url, body)

        return send

    def _schedule_callbacks(self, receiver: str, token: int, text: str) -> None:
        delivered, read, clicked, bounced, unsubscribed = self.engagement(receiver)
        b = self.behaviour
        at = self.jitter(b.receipt_delay_seconds)
        if bounced:
            self.later(at, self._event("failed", token, receiver, desc="message expired"))
            return
        if not delivered:
            return
        self.later(at, self._event("delivered", token, receiver))
        if read:
            at += self.jitter(b.read_delay_seconds)
            self.later(at, self._event("seen", token, receiver))
            if clicked:
                link = _TRACKED_LINK.search(text)
                if link is not None:
                    at += self.jitter(b.read_delay_seconds)
                    self.later(at, partial(self.tap, link.group(0)))
        if unsubscribed:
            at += self.jitter(b.read_delay_seconds)
            # The callback's message_token identifies the event itself, not a sent message.
            self.later(at, self._event("unsubscribed", self.random.getrandbits(63), receiver))
