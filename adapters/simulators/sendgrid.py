"""A SendGrid v3 Mail Send server that posts Signed Event Webhooks back, as SendGrid does.

The API side checks what SendGrid checks: the bearer API key, the JSON body (personalizations
with valid ``to`` addresses, a valid ``from``, a subject, non-empty content with text/plain
before text/html, string ``headers`` and ``custom_args``), answering 401/400/413 with
SendGrid's ``{"errors": [{"message", "field", "help"}]}`` and 429 with its rate-limit headers.

Accepted mail gets a ``202`` and an ``X-Message-Id``; then, per the address's fate, the
simulator posts events to ``webhook_url``: ``processed`` + ``delivered`` (or ``bounce``), later
``open`` and ``click`` (the first link to the gateway's click tracker, only when the request
left the account's open/click tracking on), or ``unsubscribe``. Every POST is a JSON array of
events, each carrying its request's ``custom_args`` as top-level keys and a fresh
``sg_event_id``, signed with the simulator's P-256 key over ``timestamp + body`` exactly like
SendGrid's Signed Event Webhook (``replay`` re-posts the last POST unchanged, as SendGrid's
retries do).

Like SendGrid, which batches its Event Webhook (a POST every so often or when the batch is
full, with events of many messages), the simulator collects the events of all messages for up
to ``[simulator] sendgrid_batch_seconds`` or ``sendgrid_batch_max_events`` events, then posts
them as one array. With ``sendgrid_batch_seconds = 0`` each message's events go out as they fall
due, a POST per message.
"""

from __future__ import annotations

import base64
import re
import secrets
import uuid
from functools import partial
from typing import Any, Final
from urllib.parse import urlsplit

import msgspec
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from adapters.sendgrid import sign_events
from adapters.simulators._base import Fate, Simulator
from gateway.httpserver import Request, Response, Route, json_response
from gateway.settings import Secret, SimulatorConfig

MAX_PAYLOAD_BYTES: Final = 30 * 1024 * 1024  # Mail Send's documented total message size
HELP: Final = "http://sendgrid.com/docs/API_Reference/Web_API_v3/Mail/errors.html"
_EMAIL: Final = re.compile(r"^[^@\s<>\"]+@[^@\s<>\"]+\.[^@\s<>\"]+$")
_LINK: Final = re.compile(r"""https?://[^\s"'<>]+""")
_RATE_LIMIT: Final = 600


def sendgrid_errors(*errors: tuple[str | None, str]) -> dict[str, Any]:
    """SendGrid's error body from ``(field, message)`` pairs."""
    return {
        "errors": [
            {
                "message": message,
                "field": field,
                "help": f"{HELP}#message.{field}" if field else None,
            }
            for field, message in errors
        ]
    }


def default_error(status: int) -> dict[str, Any]:
    """The body SendGrid sends with a bare status (scripted failures that name no body)."""
    match status:
        case 401:
            return sendgrid_errors(
                (None, "The provided authorization grant is invalid, expired, or revoked")
            )
        case 403:
            return sendgrid_errors((None, "access forbidden"))
        case 413:
            return sendgrid_errors((None, "Payload Too Large"))
        case 429:
            return sendgrid_errors((None, "too many requests"))
        case _ if status >= 500:
            return sendgrid_errors((None, "Internal server error"))
        case _:
            return sendgrid_errors((None, "Bad Request"))


def event_id() -> str:
    """An ``sg_event_id``: "a UUIDv4 string that is Base64url encoded" (Event Webhook
    troubleshooting); SendGrid sends the same one again when it retries the batch."""
    return base64.urlsafe_b64encode(str(uuid.uuid4()).encode()).decode().rstrip("=")


def tracked_link(html: str) -> str | None:
    """The first link to a click tracker (path ``/t/c/...``) in the html, as sent."""
    for match in _LINK.finditer(html):
        if urlsplit(match.group()).path.startswith("/t/c/"):
            return match.group()
    return None


class SendgridSimulator(Simulator):
    """SendGrid Mail Send and the Signed Event Webhook, for one generated API key."""

    kind = "sendgrid"

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
        # SendGrid keys look like SG.<22 chars>.<43 chars>
        self.api_key = f"SG.{secrets.token_urlsafe(16)}.{secrets.token_urlsafe(32)}"
        self.signing_key = ec.generate_private_key(ec.SECP256R1())
        self.public_key = base64.b64encode(
            self.signing_key.public_key().public_bytes(
                Encoding.DER, PublicFormat.SubjectPublicKeyInfo
            )
        ).decode("ascii")
        """The "Verification Key" SendGrid shows in its settings: base64 DER."""
        self.events_posted: list[list[dict[str, Any]]] = []
        """Every POST's events, in posting order."""
        self.max_payload_bytes = MAX_PAYLOAD_BYTES
        self._batch: list[dict[str, Any]] | None = None
        """Events collected for the next POST (``sendgrid_batch_seconds`` > 0)."""

    def credentials(self) -> dict[str, object]:
        return {
            "url": self.url,
            "api_key": Secret(self.api_key),
            "webhook_public_key": self.public_key,
        }

    def routes(self) -> list[Route]:
        return [Route("POST", "/v3/mail/send", self._send)]

    # ------------------------------------------------------------ mail send
    async def _send(self, request: Request) -> Response:
        body = await self.record(request)
        await self.delay()
        authorization = request.headers.get("authorization")
        if authorization is None:
            return json_response(sendgrid_errors((None, "authorization required")), status=401)
        if authorization != f"Bearer {self.api_key}":
            return json_response(default_error(401), status=401)
        if len(body) > self.max_payload_bytes:
            return json_response(default_error(413), status=413)
        try:
            mail = msgspec.json.decode(body)
        except msgspec.DecodeError:
            return json_response(sendgrid_errors((None, "Bad Request")), status=400)
        if not isinstance(mail, dict):
            return json_response(sendgrid_errors((None, "Bad Request")), status=400)
        errors = _validate(mail)
        if errors:
            return json_response(sendgrid_errors(*errors), status=400)
        address: str = mail["personalizations"][0]["to"][0]["email"]
        failure = self.api_failure(address)
        if failure is not None:
            headers = dict(failure.headers)
            if failure.status == 429:
                headers.setdefault("X-RateLimit-Limit", str(_RATE_LIMIT))
                headers.setdefault("X-RateLimit-Remaining", "0")
                headers.setdefault("X-RateLimit-Reset", str(int(self.wall_now()) + 1))
            return json_response(
                failure.body or default_error(failure.status),
                status=failure.status,
                headers=headers,
            )
        if self.fate(address) is Fate.INVALID:
            return json_response(
                sendgrid_errors(
                    ("personalizations.0.to.0.email", "Does not contain a valid address.")
                ),
                status=400,
            )
        message_id = secrets.token_urlsafe(16)
        if not _sandboxed(mail):
            self._schedule_events(mail, message_id)
        return Response(
            status=200 if _sandboxed(mail) else 202,
            headers={"X-Message-Id": message_id},
        )

    # ------------------------------------------------------------ event webhook
    def _schedule_events(self, mail: dict[str, Any], message_id: str) -> None:
        personalization: dict[str, Any] = mail["personalizations"][0]
        address: str = personalization["to"][0]["email"]
        delivered, read, clicked, bounced, unsubscribed = self.engagement(address)
        if not self.webhook_url:
            return
        args = {**mail.get("custom_args", {}), **personalization.get("custom_args", {})}
        tracking = mail.get("tracking_settings") or {}
        opens_tracked = _enabled(tracking, "open_tracking")
        clicks_tracked = _enabled(tracking, "click_tracking")
        html = next((c["value"] for c in mail["content"] if c["type"] == "text/html"), "")
        link = tracked_link(html) if html else None
        base = {
            "email": address,
            "smtp-id": f"<{message_id}@sim.sendgrid.net>",
            "sg_message_id": f"{message_id}.filterdrecv-sim-{self.random.randrange(1000)}-0",
            **args,
        }
        if "categories" in mail:
            base["category"] = mail["categories"]

        def event(name: str, **fields: Any) -> dict[str, Any]:
            return {
                **base,
                "event": name,
                "timestamp": int(self.wall_now()),
                "sg_event_id": event_id(),
                **fields,
            }

        first = self.jitter(self.behaviour.receipt_delay_seconds)
        if bounced:
            self.later(
                first,
                lambda: self._report_events(
                    [
                        event("processed"),
                        event(
                            "bounce",
                            type="bounce",
                            status="5.1.1",
                            reason="550 5.1.1 The email account that you tried to reach does not exist.",
                            bounce_classification="Invalid Address",
                        ),
                    ]
                ),
            )
            return
        if not delivered:
            self.later(first, lambda: self._report_events([event("processed")]))
            return
        self.later(
            first,
            lambda: self._report_events(
                [event("processed"), event("delivered", response="250 2.0.0 OK", ip="127.0.0.1")]
            ),
        )
        later = first + self.jitter(self.behaviour.read_delay_seconds)
        engaged: list[tuple[str, dict[str, Any]]] = []
        if read and opens_tracked:
            engaged.append(("open", {"useragent": "Mozilla/5.0", "ip": "127.0.0.1"}))
        if clicked and clicks_tracked and link is not None:
            engaged.append(
                (
                    "click",
                    {"url": link, "url_offset": {"index": 0, "type": "html"}, "ip": "127.0.0.1"},
                )
            )
        if unsubscribed:
            engaged.append(("unsubscribe", {}))
        if engaged:
            self.later(
                later,
                lambda: self._report_events([event(name, **fields) for name, fields in engaged]),
            )

    async def _report_events(self, events: list[dict[str, Any]]) -> None:
        """Post events as they fall due: now, or in the batch being collected."""
        window_seconds = self.behaviour.sendgrid_batch_seconds
        if not window_seconds:
            await self._post_events(events)
            return
        for event in events:
            batch = self._batch
            if batch is None:
                batch = self._batch = []
                self.later(window_seconds, partial(self._flush, batch))
            batch.append(event)
            if len(batch) >= self.behaviour.sendgrid_batch_max_events:
                await self._flush(batch)

    def quiet(self) -> bool:
        return super().quiet() and self._batch is None

    async def _flush(self, batch: list[dict[str, Any]]) -> None:
        """Post ``batch`` unless it went out already (full before its window ended)."""
        if self._batch is not batch:
            return
        self._batch = None
        await self._post_events(batch)

    async def _post_events(self, events: list[dict[str, Any]]) -> None:
        """Sign ``events`` and post them now, as one array."""
        body = msgspec.json.encode(events)
        timestamp = str(int(self.wall_now()))
        self.events_posted.append(events)
        await self.post_webhook(
            self.webhook_url,
            content=body,
            headers={
                "Content-Type": "application/json",
                "User-Agent": "SendGrid Event API",
                "X-Twilio-Email-Event-Webhook-Signature": sign_events(
                    self.signing_key, timestamp=timestamp, body=body
                ),
                "X-Twilio-Email-Event-Webhook-Timestamp": timestamp,
            },
        )


def _enabled(tracking: dict[str, Any], setting: str) -> bool:
    """Tracking is the account's default (on, here) unless the request turns it off."""
    value = tracking.get(setting)
    return not (isinstance(value, dict) and value.get("enable") is False)


def _sandboxed(mail: dict[str, Any]) -> bool:
    sandbox = (mail.get("mail_settings") or {}).get("sandbox_mode")
    return isinstance(sandbox, dict) and sandbox.get("enable") is True


def _valid_email(value: object) -> bool:
    return isinstance(value, str) and _EMAIL.match(value) is not None


def _string_map(value: object) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    )


def _validate(mail: dict[str, Any]) -> list[tuple[str | None, str]]:
    """Every ``(field, message)`` SendGrid would refuse, in its wording."""
    errors: list[tuple[str | None, str]] = []
    personalizations = mail.get("personalizations")
    if not isinstance(personalizations, list) or not personalizations:
        errors.append(("personalizations", "You must have at least one personalization."))
        personalizations = []
    all_have_subject = bool(personalizations)
    for p_index, personalization in enumerate(personalizations):
        where = f"personalizations.{p_index}"
        if not isinstance(personalization, dict):
            errors.append((where, "Invalid type. Expected: object"))
            all_have_subject = False
            continue
        all_have_subject = all_have_subject and isinstance(personalization.get("subject"), str)
        to = personalization.get("to")
        if not isinstance(to, list) or not to:
            errors.append(
                (
                    f"{where}.to",
                    "The to array is required for all personalization objects, and must have at "
                    "least one email object with a valid email address.",
                )
            )
            continue
        for t_index, recipient in enumerate(to):
            if not isinstance(recipient, dict) or not _valid_email(recipient.get("email")):
                errors.append((f"{where}.to.{t_index}.email", "Does not contain a valid address."))
        if "custom_args" in personalization and not _string_map(personalization["custom_args"]):
            errors.append((f"{where}.custom_args", "Invalid type. Expected: object of strings"))
    sender = mail.get("from")
    if not isinstance(sender, dict) or not _valid_email(sender.get("email")):
        errors.append(("from.email", "The from email does not contain a valid address."))
    elif "name" in sender and not isinstance(sender["name"], str):
        errors.append(("from.name", "Invalid type. Expected: string"))
    subject = mail.get("subject")
    if not all_have_subject and (not isinstance(subject, str) or not subject):
        errors.append(
            (
                "subject",
                "The subject is required. You can get around this requirement if you use a "
                "template with a subject defined or if every personalization has a subject defined.",
            )
        )
    content = mail.get("content")
    if not isinstance(content, list) or not content:
        errors.append(
            (
                "content",
                "Unless a valid template_id is provided, the content parameter is required. There must be at least one defined content block. We typically suggest both text/plain and text/html blocks are included, but only one block is required.",
            )
        )
    else:
        types = []
        for c_index, block in enumerate(content):
            if not isinstance(block, dict) or not isinstance(block.get("type"), str):
                errors.append((f"content.{c_index}.type", "Content types must be strings."))
                continue
            value = block.get("value")
            if not isinstance(value, str) or not value:
                errors.append(
                    (
                        f"content.{c_index}.value",
                        "The content value must be a string at least one character in length.",
                    )
                )
            types.append(block["type"])
        known = [t for t in types if t in ("text/plain", "text/html")]
        if types[: len(known)] != known or known not in (
            ["text/plain"],
            ["text/html"],
            ["text/plain", "text/html"],
        ):
            errors.append(
                (
                    "content",
                    "If present, text/plain and text/html may only be provided in this order, "
                    "before any other content.",
                )
            )
    if "headers" in mail and not _string_map(mail["headers"]):
        errors.append(("headers", "Invalid type. Expected: object of strings"))
    if "custom_args" in mail and not _string_map(mail["custom_args"]):
        errors.append(("custom_args", "Invalid type. Expected: object of strings"))
    categories = mail.get("categories")
    if categories is not None and (
        not isinstance(categories, list)
        or len(categories) > 10
        or not all(isinstance(c, str) and len(c) <= 255 for c in categories)
    ):
        errors.append(("categories", "Too many categories, or a category is not a string."))
    return errors
