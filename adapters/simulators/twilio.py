"""A Twilio Messages API simulator: ``POST /2010-04-01/Accounts/{sid}/Messages.json`` and
signed status callbacks.

It answers like api.twilio.com: ``201`` with the Message resource (``sid`` ``SM...``, ``status``
``queued``), or an error ``{"code", "message", "more_info", "status"}``:
- basic auth missing or wrong, or the URL's AccountSid not the caller's -> 401, 20003;
- ``To`` missing -> 400, 21604; ``To`` not E.164 -> 400, 21211 (also the ``invalid`` fate);
- neither ``From`` nor ``MessagingServiceSid`` -> 400, 21603; ``From`` neither E.164 nor an
  alphanumeric sender id (1-11 letters, digits or spaces, at least one letter) -> 400, 21212;
  ``MessagingServiceSid`` not ``MG`` + 32 hex digits -> 400, 21705 (the service sends from
  ``number``);
- ``Body`` missing or empty -> 400, 21602; over 1600 characters -> 400, 21617;
- ``StatusCallback`` not an http(s) URL -> 400, 21609;
- a recipient who unsubscribed (replied STOP) -> 400, 21610;
- ``throttle`` fate / scripted 429 -> 429, 20429 with ``Retry-After``; ``fail`` -> 503, 20503.

Later it POSTs form-encoded status callbacks to the message's ``StatusCallback``: ``sent``,
then ``delivered`` or, for a bounce, ``undelivered`` with ``ErrorCode`` 30003 (unreachable
handset) or 30005 (unknown handset). Each carries ``X-Twilio-Signature`` computed exactly as
Twilio does: base64(HMAC-SHA1(auth token, the callback URL with its query string + each
parameter's name and value, sorted by name, then value)). SMS has no read receipts; for a
click fate the simulated recipient opens the tracked link in the body.

An unsubscribe (the ``0007`` phones, or ``unsubscribe_probability``) is the recipient texting
STOP: Twilio posts that inbound message (``SmsStatus=received``, ``From`` = the recipient,
``Body=STOP``), signed the same way, to the number's messaging webhook, which is the
simulator's ``webhook_url``, and refuses later messages to that number with 21610. ``POST
/_sim/inbound`` with ``{"from": "+7...", "body": "STOP"}`` (optional ``"opt_out_type"``, as
Advanced Opt-Out adds it) posts such an inbound message on demand and answers the gateway's
HTTP status; START/UNSTOP opt the number back in.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from functools import partial
from typing import Final, Literal
from urllib.parse import parse_qsl, urlencode

import msgspec

from adapters.simulators._base import Fate, Scripted, Simulator
from gateway.httpserver import Request, Response, Route, json_response
from gateway.settings import Secret, SimulatorConfig

API_VERSION: Final = "2010-04-01"
_E164: Final = re.compile(r"^\+[1-9][0-9]{6,14}$")
_SERVICE_SID: Final = re.compile(r"^MG[0-9a-f]{32}$")
OPT_OUT_KEYWORDS: Final = frozenset(
    {"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "OPTOUT", "REVOKE"}
)
"""Twilio's default opt-out keywords (the simulator's own copy, like ``signature``)."""
OPT_IN_KEYWORDS: Final = frozenset({"START", "YES", "UNSTOP"})
_ALPHANUMERIC_SENDER: Final = re.compile(r"^(?=.*[A-Za-z])[A-Za-z0-9 ]{1,11}$")
_TRACKED_LINK: Final = re.compile(r"https?://[^\s]+/t/c/[^\s]+")
_MESSAGES: Final = {
    20003: "Authenticate",
    20429: "Too Many Requests",
    20500: "Internal Server Error",
    20503: "Service Unavailable",
    21211: "Invalid 'To' Phone Number",
    21212: "Invalid 'From' Phone Number",
    21602: "Message body is required.",
    21603: "A 'From' or 'MessagingServiceSid' parameter is required to send a message.",
    21604: "A 'To' phone number is required.",
    21609: "Invalid StatusCallback url",
    21610: "Attempt to send to unsubscribed recipient",
    21617: "The concatenated message body exceeds the 1600 character limit.",
    21705: "The Messaging Service is invalid",
}


def _error(status: int, code: int, headers: dict[str, str] | None = None) -> Response:
    return json_response(
        {
            "code": code,
            "message": _MESSAGES.get(code, "Error"),
            "more_info": f"https://www.twilio.com/docs/errors/{code}",
            "status": status,
        },
        status=status,
        headers=headers,
    )


def _check_message(fields: dict[str, str]) -> int:
    """0 when Twilio would accept these form fields, else its error code (all HTTP 400)."""
    to = fields.get("To")
    if not to:
        return 21604
    if not _E164.match(to):
        return 21211
    sender = fields.get("From")
    service = fields.get("MessagingServiceSid")
    if not sender and not service:
        return 21603
    if sender and not (_E164.match(sender) or _ALPHANUMERIC_SENDER.match(sender)):
        return 21212
    if not sender and service and not _SERVICE_SID.match(service):
        return 21705
    body = fields.get("Body")
    if not body:
        return 21602
    if len(body) > 1600:
        return 21617
    callback = fields.get("StatusCallback")
    if callback is not None and not callback.startswith(("http://", "https://")):
        return 21609
    return 0


def signature(url: str, params: list[tuple[str, str]], auth_token: str) -> str:
    """Twilio's request signature (the simulator's own copy, so a bug in the adapter's
    verification can't hide behind shared code); an identical pair counts once, as in
    twilio-python's ``RequestValidator``."""
    data = url + "".join(name + value for name, value in sorted(set(params)))
    return base64.b64encode(
        hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()
    ).decode()


class TwilioSimulator(Simulator):
    """A Twilio account: one AccountSid and auth token."""

    kind = "twilio"

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
        self.account_sid = "AC" + secrets.token_hex(16)
        self.auth_token = secrets.token_hex(16)
        self.number = "+15005550006"
        """The account's phone number: where inbound messages go when no message of ours
        names a sender to reply to (Twilio's magic test number)."""
        self.opted_out: set[str] = set()
        """Numbers that replied STOP: further messages to them get 21610."""

    def credentials(self) -> dict[str, object]:
        return {
            "url": self.url,
            "account_sid": self.account_sid,
            "auth_token": Secret(self.auth_token),
        }

    def routes(self) -> list[Route]:
        return [
            Route(
                "POST",
                f"/{API_VERSION}/Accounts/{{account_sid}}/Messages.json",
                self._create_message,
            ),
            Route("POST", "/_sim/inbound", self._inbound_route),
        ]

    # ------------------------------------------------------------ API
    def _authorised(self, request: Request) -> bool:
        scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        expected = f"{self.account_sid}:{self.auth_token}".encode()
        return (
            hmac.compare_digest(f"{user}:{password}".encode(), expected)
            and request.params["account_sid"] == self.account_sid
        )

    async def _create_message(self, request: Request) -> Response:
        raw = await self.record(request)
        await self.delay()
        if not self._authorised(request):
            return _error(401, 20003)
        try:
            fields = dict(parse_qsl(raw.decode(), keep_blank_values=True))
        except UnicodeDecodeError:
            return _error(400, 21604)
        code = _check_message(fields)
        if code:
            return _error(400, code)
        to = fields["To"]
        failure = self.api_failure(to)
        if failure is not None:
            return self._failure(failure)
        if self.fate(to) is Fate.INVALID:
            return _error(400, 21211)
        if to in self.opted_out:
            return _error(400, 21610)
        sid = "SM" + "".join(f"{self.random.getrandbits(4):x}" for _ in range(32))
        self._engage(sid, fields, fields.get("StatusCallback", ""))
        now = formatdate(self.wall_now(), usegmt=True)
        return json_response(
            {
                "account_sid": self.account_sid,
                "api_version": API_VERSION,
                "body": fields["Body"],
                "date_created": now,
                "date_sent": None,
                "date_updated": now,
                "direction": "outbound-api",
                "error_code": None,
                "error_message": None,
                "from": fields.get("From") or self.number,
                "messaging_service_sid": fields.get("MessagingServiceSid"),
                "num_media": "0",
                "num_segments": "1",
                "price": None,
                "price_unit": "USD",
                "sid": sid,
                "status": "queued",
                "subresource_uris": {
                    "media": f"/{API_VERSION}/Accounts/{self.account_sid}/Messages/{sid}/Media.json"
                },
                "to": to,
                "uri": f"/{API_VERSION}/Accounts/{self.account_sid}/Messages/{sid}.json",
            },
            status=201,
        )

    def _failure(self, failure: Scripted) -> Response:
        """A scripted answer with a body goes out exactly; a bare status gets Twilio's body."""
        if failure.body:
            return json_response(failure.body, status=failure.status, headers=failure.headers)
        code = {429: 20429, 500: 20500}.get(failure.status, 20503)
        return _error(failure.status, code, failure.headers)

    # ------------------------------------------------------------ status callbacks
    def _status(
        self, url: str, sid: str, fields: dict[str, str], status: str, error_code: str = ""
    ) -> Callable[[], Awaitable[None]]:
        async def send() -> None:
            params = [
                ("AccountSid", self.account_sid),
                ("ApiVersion", API_VERSION),
                ("From", fields.get("From") or self.number),
                ("MessageSid", sid),
                ("MessageStatus", status),
                ("SmsSid", sid),
                ("SmsStatus", status),
                ("To", fields["To"]),
            ]
            if error_code:
                params.append(("ErrorCode", error_code))
            headers = {
                "Content-Type": "application/x-www-form-urlencoded",
                "X-Twilio-Signature": signature(url, params, self.auth_token),
                "I-Twilio-Idempotency-Token": secrets.token_hex(16),
            }
            await self.post_webhook(url, content=urlencode(params).encode(), headers=headers)

        return send

    def _engage(self, sid: str, fields: dict[str, str], url: str) -> None:
        """What happens to an accepted message: status callbacks (when ``url`` asks for
        them), the recipient's click, a STOP reply."""
        to = fields["To"]
        delivered, read, clicked, bounced, unsubscribed = self.engagement(to)
        b = self.behaviour
        at = self.jitter(b.receipt_delay_seconds) / 2
        if url:
            self.later(at, self._status(url, sid, fields, "sent"))
        at += self.jitter(b.receipt_delay_seconds)
        if bounced:
            code = self.random.choice(("30003", "30005"))
            if url:
                self.later(at, self._status(url, sid, fields, "undelivered", code))
            return
        if not delivered:
            return  # some carriers never confirm: the message stays "sent"
        if url:
            self.later(at, self._status(url, sid, fields, "delivered"))
        if read and clicked:
            link = _TRACKED_LINK.search(fields["Body"])
            if link is not None:
                self.later(at + self.jitter(b.read_delay_seconds), partial(self.tap, link.group(0)))
        if unsubscribed:
            # the recipient texts STOP back to the number that wrote to them
            sender = fields.get("From", "")
            reply_to = sender if _E164.match(sender) else self.number
            at += self.jitter(b.read_delay_seconds)

            async def reply_stop() -> None:
                await self.inbound(to, "STOP", to_number=reply_to)

            self.later(at, reply_stop)

    # ------------------------------------------------------------ inbound messages
    async def inbound(
        self,
        phone: str,
        body: str,
        *,
        opt_out_type: str | None = None,
        to_number: str | None = None,
    ) -> int:
        """``phone`` texts ``body`` to the account: Twilio's opt-out bookkeeping, then the
        signed incoming-message webhook to ``webhook_url``; the gateway's HTTP status (0: no
        answer, or no webhook configured)."""
        keyword = body.strip().upper()
        if opt_out_type == "STOP" or (opt_out_type is None and keyword in OPT_OUT_KEYWORDS):
            self.opted_out.add(phone)
        elif opt_out_type == "START" or (opt_out_type is None and keyword in OPT_IN_KEYWORDS):
            self.opted_out.discard(phone)
        if not self.webhook_url:
            return 0
        sid = "SM" + secrets.token_hex(16)
        params = [
            ("AccountSid", self.account_sid),
            ("ApiVersion", API_VERSION),
            ("Body", body),
            ("From", phone),
            ("MessageSid", sid),
            ("NumMedia", "0"),
            ("NumSegments", "1"),
            ("SmsMessageSid", sid),
            ("SmsSid", sid),
            ("SmsStatus", "received"),
            ("To", to_number or self.number),
        ]
        if opt_out_type is not None:
            params.append(("OptOutType", opt_out_type))
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "X-Twilio-Signature": signature(self.webhook_url, params, self.auth_token),
            "I-Twilio-Idempotency-Token": secrets.token_hex(16),
        }
        return await self.post_webhook(
            self.webhook_url, content=urlencode(params).encode(), headers=headers
        )

    async def _inbound_route(self, request: Request) -> Response:
        try:
            wanted = msgspec.json.decode(request.body, type=_Inbound)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return json_response({"error": str(exc)}, status=400)
        status = await self.inbound(
            wanted.from_, wanted.body, opt_out_type=wanted.opt_out_type, to_number=wanted.to
        )
        return json_response({"status": status})


class _Inbound(msgspec.Struct):
    """``POST /_sim/inbound``: who texts what (``opt_out_type`` as Advanced Opt-Out adds it)."""

    from_: str = msgspec.field(name="from")
    body: str
    opt_out_type: Literal["STOP", "START", "HELP"] | None = None
    to: str | None = None
