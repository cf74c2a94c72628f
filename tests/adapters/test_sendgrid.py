"""SendGrid: Mail Send shaping and error mapping, the Signed Event Webhook, and the simulator."""

from __future__ import annotations

import base64
import email.utils
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import hypercorn.config
import hypercorn.trio
import msgspec
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from adapters import Outgoing, ProviderReceipt, ReceiptKind, WebhookRejected
from adapters._http import make_client
from adapters._transport import HttpResponse
from adapters.sendgrid import (
    CHANNEL,
    KIND,
    SendgridAdapter,
    SendgridSettings,
    build_request,
    error_fields,
    load_public_key,
    parse_response,
    parse_webhook,
    sign_events,
    verify_webhook,
    with_open_pixel,
)
from adapters.simulators._base import Scripted
from adapters.simulators.sendgrid import SendgridSimulator, default_error, tracked_link
from gateway.clock import wall_time
from gateway.config import Secret, SenderConfig, SimulatorConfig
from gateway.core.errors import (
    AuthRejected,
    ConfigError,
    InvalidRecipient,
    InvalidRequest,
    ProviderError,
    ProviderUnavailable,
    RateLimited,
)
from gateway.core.model import Category, Channel
from gateway.protocol import EmailContent, PushContent
from tests.adapters.local_http import answer as fixed_answer
from tests.adapters.local_http import local_server
from tests.adapters.settling import Outbound, marker_behaviour

NOW = 1_795_435_200.0
# one POST per message (batching off): these tests prove their posts settled with a marker
# mail whose events come last; batching across messages has its own tests
# (tests/test_sendgrid_batching.py)
FAST = SimulatorConfig(
    latency_seconds=0,
    receipt_delay_seconds=0.01,
    read_delay_seconds=0.02,
    sendgrid_batch_seconds=0.0,
)
PIXEL = "https://gw.example/t/o/px.gif"
UNSUB = "https://gw.example/t/u/tok"
HTML = "<html><body><p>Sale <a href='https://gw.example/t/c/tok1'>shop</a></p></body></html>"

_SIGNING_KEY = ec.generate_private_key(ec.SECP256R1())
_PUBLIC_KEY = base64.b64encode(
    _SIGNING_KEY.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
).decode()
_OTHER_KEY = ec.generate_private_key(ec.SECP256R1())


def sendgrid_config(**fields: Any) -> SendgridSettings:
    fields.setdefault("api_key", Secret("SG.test.key"))
    fields.setdefault("webhook_public_key", _PUBLIC_KEY)
    return SendgridSettings(**fields)


def mail(
    address: str = "ann+read@example.com",
    *,
    key: str = "acme:m1",
    category: Category = Category.PROMO,
    html: str | None = HTML,
    text: str | None = "Sale https://gw.example/t/c/tok1",
    marketing_links: bool = True,
    sender: SenderConfig | None = None,
    campaign: str | None = "black-friday",
    recipient_id: str | None = None,
    topic: str | None = None,
) -> Outgoing:
    return Outgoing(
        message_key=key,
        tenant=key.partition(":")[0],
        channel=Channel.EMAIL,
        category=category,
        address=address,
        content=EmailContent(subject="Sale", html=html, text=text),
        brand="Acme",
        sender=sender or SenderConfig(email_from="news@acme.example", email_name="Acme News"),
        status_callback_url="https://gw.example/webhooks/email1",
        link_url="https://gw.example/t/c/tok1",
        unsubscribe_url=UNSUB if marketing_links else None,
        open_pixel_url=PIXEL if marketing_links else None,
        campaign=campaign,
        recipient_id=recipient_id,
        topic=topic,
    )


def response(
    status: int, body: object = None, headers: dict[str, str] | None = None
) -> HttpResponse:
    content = (
        b"" if body is None else body if isinstance(body, bytes) else msgspec.json.encode(body)
    )
    return HttpResponse(status, headers or {}, content)


def errors(*fields: str | None) -> dict[str, Any]:
    return {"errors": [{"message": "nope", "field": f, "help": None} for f in fields]}


def signed(
    events: list[dict[str, Any]] | bytes,
    *,
    timestamp: float = NOW,
    key: ec.EllipticCurvePrivateKey = _SIGNING_KEY,
) -> tuple[dict[str, str], bytes]:
    body = events if isinstance(events, bytes) else msgspec.json.encode(events)
    stamp = str(int(timestamp))
    return {
        "X-Twilio-Email-Event-Webhook-Signature": sign_events(key, timestamp=stamp, body=body),
        "X-Twilio-Email-Event-Webhook-Timestamp": stamp,
    }, body


class TestModule:
    """The registry's view of the module."""

    def test_kind_and_channel(self) -> None:
        assert ("sendgrid", Channel.EMAIL) == (KIND, CHANNEL)


class TestBuildRequest:
    """One Mail Send request per email, with the brand's identity and our tracking."""

    def test_marketing_shape(self) -> None:
        request = build_request(
            mail(), config=sendgrid_config(), base_url="https://api.sendgrid.com/", api_key="SG.k"
        )
        assert "POST" == request.method
        assert "https://api.sendgrid.com/v3/mail/send" == str(request.url)
        assert "Bearer SG.k" == request.headers["authorization"]
        assert "application/json" == request.headers["content-type"]
        pixel = f'<img src="{PIXEL}" width="1" height="1" alt="">'
        assert {
            "personalizations": [
                {"to": [{"email": "ann+read@example.com"}], "custom_args": {"cgw_key": "acme:m1"}}
            ],
            "from": {"email": "news@acme.example", "name": "Acme News"},
            "subject": "Sale",
            "content": [
                {"type": "text/plain", "value": "Sale https://gw.example/t/c/tok1"},
                {
                    "type": "text/html",
                    "value": "<html><body><p>Sale <a href='https://gw.example/t/c/tok1'>shop</a>"
                    f"</p>{pixel}</body></html>",
                },
            ],
            "headers": {
                "List-Unsubscribe": f"<{UNSUB}>",
                "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
            },
            "categories": ["black-friday"],
        } == msgspec.json.decode(request.body)

    @pytest.mark.parametrize(
        ("recipient_id", "topic", "custom_args"),
        [
            ("cust-1", "promo", {"cgw_key": "acme:m1", "cgw_rcpt": "cust-1", "cgw_topic": "promo"}),
            ("cust-1", None, {"cgw_key": "acme:m1", "cgw_rcpt": "cust-1"}),
            (None, "promo", {"cgw_key": "acme:m1", "cgw_topic": "promo"}),
        ],
    )
    def test_recipient_and_topic_ride_in_custom_args(
        self, recipient_id: str | None, topic: str | None, custom_args: dict[str, str]
    ) -> None:
        request = build_request(
            mail(recipient_id=recipient_id, topic=topic),
            config=sendgrid_config(),
            base_url="https://api.sendgrid.com",
            api_key="SG.k",
        )
        (personalization,) = msgspec.json.decode(request.body)["personalizations"]
        assert custom_args == personalization["custom_args"]

    def test_service_mail_has_no_unsubscribe_headers(self) -> None:
        outgoing = mail(category=Category.SERVICE, marketing_links=False, campaign=None)
        body = msgspec.json.decode(
            build_request(outgoing, config=sendgrid_config(), base_url="http://x", api_key="k").body
        )
        assert "headers" not in body
        assert "categories" not in body
        assert HTML == body["content"][1]["value"]  # no pixel without a pixel URL

    @pytest.mark.parametrize(
        ("sender", "expected"),
        [
            (
                SenderConfig(email_from="a@acme.example", email_name="Acme Deals"),
                {"email": "a@acme.example", "name": "Acme Deals"},
            ),
            (
                SenderConfig(email_from="a@acme.example"),
                {"email": "a@acme.example", "name": "Acme"},
            ),
        ],
    )
    def test_sender_identity(self, sender: SenderConfig, expected: dict[str, str]) -> None:
        request = build_request(
            mail(sender=sender), config=sendgrid_config(), base_url="http://x", api_key="k"
        )
        assert expected == msgspec.json.decode(request.body)["from"]

    def test_no_name_at_all(self) -> None:
        outgoing = msgspec.structs.replace(
            mail(sender=SenderConfig(email_from="a@b.example")), brand=""
        )
        request = build_request(
            outgoing, config=sendgrid_config(), base_url="http://x", api_key="k"
        )
        assert {"email": "a@b.example"} == msgspec.json.decode(request.body)["from"]

    @pytest.mark.parametrize(
        ("html", "text", "types"),
        [
            ("<p>x</p>", None, ["text/html"]),
            (None, "x", ["text/plain"]),
            ("<p>x</p>", "x", ["text/plain", "text/html"]),
        ],
    )
    def test_content_order(self, html: str | None, text: str | None, types: list[str]) -> None:
        request = build_request(
            mail(html=html, text=text), config=sendgrid_config(), base_url="http://x", api_key="k"
        )
        assert types == [c["type"] for c in msgspec.json.decode(request.body)["content"]]

    def test_no_content_is_refused(self) -> None:
        with pytest.raises(InvalidRequest):
            build_request(
                mail(html=None, text=None),
                config=sendgrid_config(),
                base_url="http://x",
                api_key="k",
            )

    def test_refuses_other_content(self) -> None:
        outgoing = msgspec.structs.replace(mail(), content=PushContent(title="t", body="b"))
        with pytest.raises(TypeError):
            build_request(outgoing, config=sendgrid_config(), base_url="http://x", api_key="k")


class TestOpenPixel:
    """The pixel goes inside the body, escaped, even in sloppy html."""

    @pytest.mark.parametrize(
        ("html", "expected"),
        [
            ("<p>x</p>", "<p>x</p>PIXEL"),
            ("<BODY>x</Body >", "<BODY>xPIXEL</Body >"),
            ("<body>a</body><body>b</body>", "<body>a</body><body>bPIXEL</body>"),
        ],
    )
    def test_placement(self, html: str, expected: str) -> None:
        pixel = '<img src="https://p/x.gif?a=1&amp;b=&quot;" width="1" height="1" alt="">'
        assert expected.replace("PIXEL", pixel) == with_open_pixel(html, 'https://p/x.gif?a=1&b="')


class TestParseResponse:
    """Every Mail Send answer maps to a receipt or to the ProviderError that says what to do."""

    @pytest.mark.parametrize("status", [200, 202])
    def test_accepted(self, status: int) -> None:
        receipt = parse_response(
            response(status, headers={"X-Message-Id": "abc_DEF-1"}), provider="p"
        )
        assert "abc_DEF-1" == receipt.provider_message_id

    @pytest.mark.parametrize(
        ("status", "body", "headers", "error", "code", "retry_after"),
        [
            (
                400,
                errors("personalizations.0.to.0.email"),
                {},
                InvalidRecipient,
                "personalizations.0.to.0.email",
                None,
            ),
            (
                400,
                errors("subject", "personalizations.0.to"),
                {},
                InvalidRecipient,
                "personalizations.0.to",
                None,
            ),
            (
                400,
                errors("personalizations.1.to.2"),
                {},
                InvalidRecipient,
                "personalizations.1.to.2",
                None,
            ),
            (400, errors("from.email"), {}, InvalidRequest, "from.email", None),
            (
                400,
                errors("personalizations.0.cc.0.email"),
                {},
                InvalidRequest,
                "personalizations.0.cc.0.email",
                None,
            ),
            (400, errors(None), {}, InvalidRequest, None, None),
            (400, b"<html>", {}, InvalidRequest, None, None),
            (400, b'{"errors": "x"}', {}, InvalidRequest, None, None),
            (401, errors(None), {}, AuthRejected, None, None),
            (403, errors("from"), {}, AuthRejected, "from", None),
            (413, errors(None), {}, InvalidRequest, None, None),
            (404, b"", {}, InvalidRequest, None, None),
            (429, errors(None), {"Retry-After": "12"}, RateLimited, None, 12.0),
            (429, errors(None), {"X-RateLimit-Reset": str(int(NOW) + 30)}, RateLimited, None, 30.0),
            (429, errors(None), {"X-RateLimit-Reset": str(int(NOW) - 5)}, RateLimited, None, 0.0),
            (429, errors(None), {"X-RateLimit-Reset": "soon"}, RateLimited, None, None),
            (
                429,
                errors(None),
                {"Retry-After": "3", "X-RateLimit-Reset": str(int(NOW) + 30)},
                RateLimited,
                None,
                3.0,
            ),
            (429, b"", {}, RateLimited, None, None),
            (500, b"", {}, ProviderUnavailable, None, None),
            (503, errors(None), {"Retry-After": "4"}, ProviderUnavailable, None, 4.0),
        ],
    )
    def test_errors(
        self,
        status: int,
        body: object,
        headers: dict[str, str],
        error: type[ProviderError],
        code: str | None,
        retry_after: float | None,
    ) -> None:
        with pytest.raises(error) as caught:
            parse_response(response(status, body, headers), provider="email1", now=NOW)
        failure = caught.value
        assert type(failure) is error
        assert ("email1", status, code, retry_after) == (
            failure.provider,
            failure.status_code,
            failure.code,
            failure.retry_after_seconds,
        )

    def test_reset_needs_now(self) -> None:
        headers = {"X-RateLimit-Reset": str(int(NOW) + 30)}
        with pytest.raises(RateLimited) as caught:
            parse_response(response(429, errors(None), headers), provider="p")
        assert caught.value.retry_after_seconds is None

    @pytest.mark.parametrize(
        "headers",
        [{"X-RateLimit-Reset": "1e999"}, {"X-RateLimit-Reset": "nan"}, {"Retry-After": "inf"}],
    )
    def test_a_delay_that_is_not_finite_is_no_delay(self, headers: dict[str, str]) -> None:
        with pytest.raises(RateLimited) as caught:
            parse_response(response(429, errors(None), headers), provider="p", now=NOW)
        assert caught.value.retry_after_seconds is None

    def test_retry_after_as_http_date(self) -> None:
        headers = {"Retry-After": email.utils.formatdate(NOW + 45, usegmt=True)}
        with pytest.raises(RateLimited) as caught:
            parse_response(response(429, b"", headers), provider="p", now=NOW)
        assert 45.0 == caught.value.retry_after_seconds

    def test_messages_never_quote_addresses(self) -> None:
        body = {"errors": [{"message": "duplicate ann@example.com", "field": "personalizations.0"}]}
        with pytest.raises(InvalidRequest) as caught:
            parse_response(response(400, body), provider="p")
        assert "ann@" not in str(caught.value)
        assert ["personalizations.0"] == error_fields(msgspec.json.encode(body))


# ---------------------------------------------------------------- event webhook
EVENT = {
    "email": "ann@example.com",
    "timestamp": int(NOW) - 5,
    "smtp-id": "<x@sim>",
    "sg_event_id": "e1",
    "sg_message_id": "MSGID.filterdrecv-1-0",
    "cgw_key": "acme:m1",
}


class TestVerifyWebhook:
    """Only SendGrid's signature over timestamp + body, recently made, gets through."""

    def test_genuine(self) -> None:
        headers, body = signed([{**EVENT, "event": "delivered"}])
        verify_webhook(url="u", headers=headers, body=body, config=sendgrid_config(), now=NOW + 3)

    def test_header_case_does_not_matter(self) -> None:
        headers, body = signed([{**EVENT, "event": "delivered"}])
        lowered = {k.lower(): v for k, v in headers.items()}
        upper = {k.upper(): v for k, v in headers.items()}
        for variant in (lowered, upper):
            verify_webhook(url="u", headers=variant, body=body, config=sendgrid_config(), now=NOW)

    @pytest.mark.parametrize(
        "tamper",
        [
            "body",
            "timestamp",
            "wrong_key",
            "no_signature",
            "no_timestamp",
            "not_base64",
            "no_public_key",
            "garbage_public_key",
            "rsa_public_key",
        ],
    )
    def test_bad_signature(self, tamper: str) -> None:
        headers, body = signed([{**EVENT, "event": "delivered"}])
        config = sendgrid_config()
        signature = "X-Twilio-Email-Event-Webhook-Signature"
        timestamp = "X-Twilio-Email-Event-Webhook-Timestamp"
        match tamper:
            case "body":
                body = body.replace(b"delivered", b"bounce")
            case "timestamp":
                headers[timestamp] = str(int(NOW) + 1)
            case "wrong_key":
                headers, body = signed([{**EVENT, "event": "delivered"}], key=_OTHER_KEY)
            case "no_signature":
                del headers[signature]
            case "no_timestamp":
                del headers[timestamp]
            case "not_base64":
                headers[signature] = "%%%"
            case "no_public_key":
                config = sendgrid_config(webhook_public_key=None)
            case "garbage_public_key":
                config = sendgrid_config(webhook_public_key="bm90IGEga2V5")
            case "rsa_public_key":
                from cryptography.hazmat.primitives.asymmetric import rsa

                der = (
                    rsa.generate_private_key(public_exponent=65537, key_size=2048)
                    .public_key()
                    .public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
                )
                config = sendgrid_config(webhook_public_key=base64.b64encode(der).decode())
        with pytest.raises(WebhookRejected) as caught:
            verify_webhook(url="u", headers=headers, body=body, config=config, now=NOW)
        assert "bad_signature" == caught.value.verdict

    @pytest.mark.parametrize(
        "age_seconds",
        [
            50 * 60.0,  # an unsubscribe retried after a 50-minute outage
            24 * 3600.0,  # SendGrid's last retry
            25 * 3600.0,  # and the margin past it
            -600.0,  # a clock ten minutes ahead of ours
        ],
    )
    def test_late_retries_inside_sendgrids_retry_window_pass(self, age_seconds: float) -> None:
        events = [{**EVENT, "event": "unsubscribe", "timestamp": int(NOW - age_seconds)}]
        headers, body = signed(events, timestamp=NOW - age_seconds)
        verify_webhook(url="u", headers=headers, body=body, config=sendgrid_config(), now=NOW)

    @pytest.mark.parametrize("age_seconds", [25 * 3600.0 + 1, -601.0])
    def test_stale(self, age_seconds: float) -> None:
        headers, body = signed([{**EVENT, "event": "delivered"}], timestamp=NOW - age_seconds)
        with pytest.raises(WebhookRejected) as caught:
            verify_webhook(url="u", headers=headers, body=body, config=sendgrid_config(), now=NOW)
        assert "stale" == caught.value.verdict

    def test_tolerance_is_configurable(self) -> None:
        headers, body = signed([{**EVENT, "event": "delivered"}], timestamp=NOW - 100)
        config = sendgrid_config(webhook_tolerance_seconds=60.0)
        with pytest.raises(WebhookRejected) as caught:
            verify_webhook(url="u", headers=headers, body=body, config=config, now=NOW)
        assert "stale" == caught.value.verdict
        verify_webhook(url="u", headers=headers, body=body, config=sendgrid_config(), now=NOW)

    def test_a_short_tolerance_also_bounds_the_future(self) -> None:
        headers, body = signed([{**EVENT, "event": "delivered"}], timestamp=NOW + 100)
        config = sendgrid_config(webhook_tolerance_seconds=60.0)
        with pytest.raises(WebhookRejected) as caught:
            verify_webhook(url="u", headers=headers, body=body, config=config, now=NOW)
        assert "stale" == caught.value.verdict

    @pytest.mark.parametrize(
        "body", [b"not json", b'{"event": "delivered"}', b"[1, 2]", b'[{"a": 1}, "x"]']
    )
    def test_malformed(self, body: bytes) -> None:
        headers, body = signed(body)
        with pytest.raises(WebhookRejected) as caught:
            verify_webhook(url="u", headers=headers, body=body, config=sendgrid_config(), now=NOW)
        assert "malformed" == caught.value.verdict

    @pytest.mark.parametrize("timestamp", ["soon", "nan", "inf", "1" * 400])
    def test_signed_garbage_timestamp_is_malformed(self, timestamp: str) -> None:
        body = b"[]"
        headers = {
            "x-twilio-email-event-webhook-signature": sign_events(
                _SIGNING_KEY, timestamp=timestamp, body=body
            ),
            "x-twilio-email-event-webhook-timestamp": timestamp,
        }
        with pytest.raises(WebhookRejected) as caught:
            verify_webhook(url="u", headers=headers, body=body, config=sendgrid_config(), now=NOW)
        assert "malformed" == caught.value.verdict

    def test_public_key_loading(self) -> None:
        assert isinstance(load_public_key(_PUBLIC_KEY), ec.EllipticCurvePublicKey)
        with pytest.raises(ValueError):
            load_public_key("!!")


class TestParseWebhook:
    """Each event of ours becomes one receipt; everything else is skipped."""

    @pytest.mark.parametrize(
        ("event", "kind", "detail"),
        [
            ({"event": "delivered", "response": "250 OK"}, ReceiptKind.DELIVERED, "delivered"),
            ({"event": "open", "useragent": "x"}, ReceiptKind.READ, "open"),
            (
                {"event": "click", "url": "https://gw.example/t/c/tok1"},
                ReceiptKind.CLICKED,
                "https://gw.example/t/c/tok1",
            ),
            ({"event": "click"}, ReceiptKind.CLICKED, None),
            (
                {
                    "event": "bounce",
                    "type": "bounce",
                    "status": "5.1.1",
                    "reason": "550 ann@example.com",
                },
                ReceiptKind.BOUNCED,
                "bounce:5.1.1",
            ),
            ({"event": "bounce", "type": "blocked"}, ReceiptKind.BOUNCED, "blocked"),
            ({"event": "bounce"}, ReceiptKind.BOUNCED, None),
            ({"event": "dropped", "reason": "Bounced Address"}, ReceiptKind.BOUNCED, "dropped"),
            ({"event": "spamreport"}, ReceiptKind.SPAM_REPORT, "spamreport"),
            ({"event": "unsubscribe"}, ReceiptKind.UNSUBSCRIBED, "unsubscribe"),
            (
                {"event": "group_unsubscribe", "asm_group_id": 1},
                ReceiptKind.UNSUBSCRIBED,
                "group_unsubscribe",
            ),
        ],
    )
    def test_mapping(self, event: dict[str, Any], kind: ReceiptKind, detail: str | None) -> None:
        headers, body = signed([{**EVENT, **event}])
        assert [
            ProviderReceipt(
                kind=kind,
                at=NOW - 5,
                message_key="acme:m1",
                provider_message_id="MSGID",
                detail=detail,
                event_id="e1",
            )
        ] == parse_webhook(url="u", headers=headers, body=body)

    @pytest.mark.parametrize(
        ("event", "kind"),
        [
            ({"event": "unsubscribe"}, ReceiptKind.UNSUBSCRIBED),
            ({"event": "group_unsubscribe", "asm_group_id": 7}, ReceiptKind.UNSUBSCRIBED),
            ({"event": "spamreport"}, ReceiptKind.SPAM_REPORT),
        ],
    )
    def test_opt_outs_name_the_recipient_and_topic(
        self, event: dict[str, Any], kind: ReceiptKind
    ) -> None:
        opt_out = {**EVENT, **event, "sg_event_id": "ZmFrZS1ldmVudA", "cgw_rcpt": "cust-1"}
        body = msgspec.json.encode([opt_out | {"cgw_topic": "promo"}])
        (receipt,) = parse_webhook(url="u", headers={}, body=body)
        assert (kind, "acme:m1", "ZmFrZS1ldmVudA", "cust-1", "promo") == (
            receipt.kind,
            receipt.message_key,
            receipt.event_id,
            receipt.recipient_id,
            receipt.topic,
        )

    def test_echoed_ids_are_none_when_absent_or_not_strings(self) -> None:
        events = [
            {**EVENT, "event": "delivered", "sg_event_id": 5, "cgw_rcpt": "", "cgw_topic": ["x"]},
            {k: v for k, v in EVENT.items() if k != "sg_event_id"} | {"event": "open"},
        ]
        receipts = parse_webhook(url="u", headers={}, body=msgspec.json.encode(events))
        assert [(None, None, None)] * 2 == [(r.event_id, r.recipient_id, r.topic) for r in receipts]

    def test_each_event_of_a_batch_has_its_own_id(self) -> None:
        events = [{**EVENT, "event": "delivered"}, {**EVENT, "event": "open", "sg_event_id": "e2"}]
        headers, body = signed(events)
        receipts = parse_webhook(url="u", headers=headers, body=body)
        assert ["e1", "e2"] == [r.event_id for r in receipts]

    def test_skips_what_is_not_ours_or_changes_nothing(self) -> None:
        events = [
            {**EVENT, "event": "processed"},
            {**EVENT, "event": "deferred"},
            {**EVENT, "event": "group_resubscribe"},
            {**EVENT, "event": 7},
            {k: v for k, v in EVENT.items() if k != "cgw_key"} | {"event": "delivered"},
            {**EVENT, "cgw_key": 5, "event": "delivered"},
            {**EVENT, "event": "open", "sg_message_id": ""},
        ]
        receipts = parse_webhook(url="u", headers={}, body=msgspec.json.encode(events))
        assert [(ReceiptKind.READ, None)] == [(r.kind, r.provider_message_id) for r in receipts]

    @pytest.mark.parametrize(
        ("timestamp", "header", "at"),
        [
            ("1795435100", None, 1795435100.0),
            (1795435100.5, None, 1795435100.5),
            (None, "1795435000", 1795435000.0),
            (True, "1795435000", 1795435000.0),
            ("soon", "1795435000", 1795435000.0),
            ([1], None, None),
            # not a finite number of seconds: the header's time, never an exception (a 500
            # would make SendGrid hold back the whole batch, opt-outs included)
            (10**400, "1795435000", 1795435000.0),
            ("nan", "1795435000", 1795435000.0),
            ("-inf", None, None),
        ],
    )
    def test_timestamps(self, timestamp: object, header: str | None, at: float | None) -> None:
        event = {**EVENT, "event": "delivered", "timestamp": timestamp}
        if timestamp is None:
            del event["timestamp"]
        headers = {"X-Twilio-Email-Event-Webhook-Timestamp": header} if header else {}
        receipts = parse_webhook(url="u", headers=headers, body=msgspec.json.encode([event]))
        assert ([at] if at is not None else []) == [r.at for r in receipts]

    def test_malformed(self) -> None:
        with pytest.raises(WebhookRejected) as caught:
            parse_webhook(url="u", headers={}, body=b"{}")
        assert "malformed" == caught.value.verdict


# ---------------------------------------------------------------- adapter (local server)
class TestAdapter:
    """send() builds, posts and parses; the config is checked when the adapter is made."""

    async def test_send(self) -> None:
        handler = fixed_answer(202, b"", {"X-Message-Id": "m-1"})
        async with local_server(handler) as server, make_client(timeout_seconds=5) as client:
            config = sendgrid_config(url=server.url)
            adapter = SendgridAdapter("email1", config, client, wall_clock=wall_time)
            assert ("email1", Channel.EMAIL) == (adapter.name, adapter.channel)
            assert "m-1" == (await adapter.send(mail())).provider_message_id
            await adapter.aclose()
        seen = [call.request for call in server.calls]
        assert [f"{server.url}/v3/mail/send"] == [str(r.url) for r in seen]
        assert "Bearer SG.test.key" == seen[0].headers["authorization"]

    async def test_rate_limit_reset_uses_the_wall_clock(self) -> None:
        limited = response(429, errors(None), {"X-RateLimit-Reset": str(int(NOW) + 20)})
        handler = fixed_answer(429, limited.content, dict(limited.headers))
        async with local_server(handler) as server, make_client(timeout_seconds=5) as client:
            config = sendgrid_config(url=server.url)
            adapter = SendgridAdapter("email1", config, client, wall_clock=lambda: NOW)
            with pytest.raises(RateLimited) as caught:
                await adapter.send(mail())
        assert 20.0 == caught.value.retry_after_seconds

    async def test_empty_mail_names_the_adapter(self) -> None:
        async with make_client(timeout_seconds=5) as client:
            adapter = SendgridAdapter("email1", sendgrid_config(), client, wall_clock=wall_time)
            with pytest.raises(InvalidRequest) as caught:
                await adapter.send(mail(html=None, text=None))
        assert "email1" == caught.value.provider

    async def test_transport_errors_are_mapped(self) -> None:
        with trio.socket.socket() as probe:
            await probe.bind(("127.0.0.1", 0))
            closed_port = probe.getsockname()[1]
        # nothing listens there now: the connection is refused
        config = sendgrid_config(url=f"http://127.0.0.1:{closed_port}")
        async with make_client(timeout_seconds=5) as client:
            with pytest.raises(ProviderUnavailable):
                await SendgridAdapter("email1", config, client, wall_clock=wall_time).send(mail())

    def test_needs_an_api_key(self) -> None:
        with pytest.raises(ConfigError):
            SendgridAdapter(
                "email1", SendgridSettings(), make_client(timeout_seconds=5), wall_clock=wall_time
            )


# ---------------------------------------------------------------- against the simulator
async def eventually(predicate: Callable[[], bool]) -> None:
    """Wait for a fact recorded in a plain list (bounded by the test's fail_after)."""
    while not predicate():  # noqa: ASYNC110 - the lists have no event to wait on
        await trio.sleep(0.005)


class WebhookInbox:
    """The gateway's webhook endpoint, as far as SendGrid can tell: records and answers 200."""

    def __init__(self) -> None:
        self.posts: list[tuple[dict[str, str], bytes]] = []
        self.url = ""

    def app(self) -> Starlette:
        async def receive(request: Request) -> Response:
            self.posts.append((dict(request.headers), await request.body()))
            return Response(status_code=200)

        return Starlette(routes=[Route("/webhooks/email1", receive, methods=["POST"])])

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        config = hypercorn.config.Config()
        config.bind = ["127.0.0.1:0"]
        config.accesslog = None
        config.errorlog = None
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(hypercorn.trio.serve, self.app(), config)
            self.url = f"{binds[0]}/webhooks/email1"
            task_status.started(self.url)


def simulator() -> SendgridSimulator:
    return SendgridSimulator(name="email1", behaviour=FAST, seed=3)


MARKER_KEY = "acme:marker"


def not_the_marker(events: list[dict[str, Any]]) -> bool:
    return all(event.get("cgw_key") != MARKER_KEY for event in events)


async def settled(
    sim: SendgridSimulator, outbound: Outbound, inbox: WebhookInbox, adapter: SendgridAdapter
) -> list[tuple[dict[str, str], bytes]]:
    """The inbox's posts once everything sent so far has been reported, the marker's left out.

    Proven rather than waited for (tests/adapters/settling.py): a marker mail whose first event
    batch falls due after every batch scheduled so far, then every post the simulator started.
    """
    behaviour = sim.behaviour
    sim.behaviour = marker_behaviour(behaviour)
    try:
        await adapter.send(mail("marker+ignore@example.com", key=MARKER_KEY))
    finally:
        sim.behaviour = behaviour
    with trio.fail_after(10):
        await eventually(
            lambda: any(not not_the_marker(msgspec.json.decode(b)) for _, b in inbox.posts)
        )
        await outbound.drained()
    return [(h, b) for h, b in inbox.posts if not_the_marker(msgspec.json.decode(b))]


@asynccontextmanager
async def serving(
    sim: SendgridSimulator, inbox: WebhookInbox | None = None
) -> AsyncIterator[tuple[SendgridAdapter, SendgridSettings]]:
    async with trio.open_nursery() as nursery:
        if inbox is not None:
            sim.webhook_url = await nursery.start(inbox.serve)
        await nursery.start(sim.serve)
        config = SendgridSettings(**sim.credentials())  # type: ignore[arg-type]
        async with make_client(timeout_seconds=5.0) as client:
            yield SendgridAdapter("email1", config, client, wall_clock=wall_time), config
        nursery.cancel_scope.cancel()


class TestAgainstTheSimulator:
    """Real requests over HTTP: message ids, tagged failures, credentials, rate limits."""

    async def test_accepted(self) -> None:
        sim = simulator()
        with trio.fail_after(10):
            async with serving(sim) as (adapter, _):
                receipt = await adapter.send(mail("ann+ignore@example.com"))
        assert receipt.provider_message_id is not None
        assert 22 == len(receipt.provider_message_id)
        assert ["/v3/mail/send"] == [r.path for r in sim.requests]
        sent = msgspec.json.decode(sim.requests[0].body)
        assert {"cgw_key": "acme:m1"} == sent["personalizations"][0]["custom_args"]

    @pytest.mark.parametrize(
        ("address", "error", "status", "code"),
        [
            ("ann+invalid@example.com", InvalidRecipient, 400, "personalizations.0.to.0.email"),
            ("ann+fail@example.com", ProviderUnavailable, 503, None),
        ],
    )
    async def test_tagged_failures(
        self, address: str, error: type[ProviderError], status: int, code: str | None
    ) -> None:
        with trio.fail_after(10):
            async with serving(simulator()) as (adapter, _):
                with pytest.raises(error) as caught:
                    await adapter.send(mail(address))
        assert (status, code) == (caught.value.status_code, caught.value.code)

    async def test_throttle_then_accept(self) -> None:
        with trio.fail_after(10):
            async with serving(simulator()) as (adapter, _):
                with pytest.raises(RateLimited) as caught:
                    await adapter.send(mail("ann+throttle@example.com"))
                assert 1.0 == caught.value.retry_after_seconds
                assert (await adapter.send(mail("ann+throttle@example.com"))).provider_message_id

    async def test_scripted_429_with_only_a_reset(self) -> None:
        sim = simulator()
        sim.script.append(
            Scripted(status=429, headers={"X-RateLimit-Reset": str(int(wall_time()) + 30)})
        )
        with trio.fail_after(10):
            async with serving(sim) as (adapter, _):
                with pytest.raises(RateLimited) as caught:
                    await adapter.send(mail("ann+ignore@example.com"))
        assert caught.value.retry_after_seconds is not None
        assert 28.0 <= caught.value.retry_after_seconds <= 30.0

    async def test_wrong_api_key(self) -> None:
        sim = simulator()
        with trio.fail_after(10):
            async with serving(sim) as (_, config):
                forged = msgspec.structs.replace(config, api_key=Secret("SG.forged.key"))
                async with make_client(timeout_seconds=5.0) as client:
                    with pytest.raises(AuthRejected) as caught:
                        await SendgridAdapter("email1", forged, client, wall_clock=wall_time).send(
                            mail()
                        )
        assert 401 == caught.value.status_code

    async def test_validation(self) -> None:
        sim = simulator()
        good = msgspec.json.decode(
            build_request(mail(), config=sendgrid_config(), base_url="http://x", api_key="k").body
        )
        cases: list[tuple[object, list[str | None]]] = [
            (b"{", [None]),
            (b"[]", [None]),
            ({**good, "personalizations": []}, ["personalizations"]),
            ({**good, "personalizations": ["x"]}, ["personalizations.0"]),
            ({**good, "personalizations": [{"to": []}]}, ["personalizations.0.to"]),
            (
                {**good, "personalizations": [{"to": [{"email": "nope"}]}]},
                ["personalizations.0.to.0.email"],
            ),
            (
                {
                    **good,
                    "personalizations": [{"to": [{"email": "a@b.c"}], "custom_args": {"n": 1}}],
                },
                ["personalizations.0.custom_args"],
            ),
            ({**good, "from": {"email": "x"}}, ["from.email"]),
            ({**good, "from": {"email": "a@b.c", "name": 1}}, ["from.name"]),
            ({k: v for k, v in good.items() if k != "subject"}, ["subject"]),
            ({**good, "content": []}, ["content"]),
            (
                {
                    **good,
                    "content": [
                        {"type": "text/html", "value": "x"},
                        {"type": "text/plain", "value": "x"},
                    ],
                },
                ["content"],
            ),
            ({**good, "content": [{"type": "text/plain", "value": ""}]}, ["content.0.value"]),
            ({**good, "content": [{"value": "x"}]}, ["content.0.type", "content"]),
            ({**good, "headers": {"X-N": 1}}, ["headers"]),
            ({**good, "custom_args": []}, ["custom_args"]),
            ({**good, "categories": ["x"] * 11}, ["categories"]),
        ]
        with trio.fail_after(10):
            async with serving(sim) as (_, config), httpx.AsyncClient(base_url=sim.url) as http:
                assert 401 == (await http.post("/v3/mail/send", json=good)).status_code
                auth = {"Authorization": f"Bearer {sim.api_key}"}
                for body, fields in cases:
                    content = body if isinstance(body, bytes) else msgspec.json.encode(body)
                    answer = await http.post("/v3/mail/send", content=content, headers=auth)
                    assert 400 == answer.status_code, body
                    assert fields == [e["field"] for e in answer.json()["errors"]], body
                subject_per_person = {
                    **{k: v for k, v in good.items() if k != "subject"},
                    "personalizations": [{"to": [{"email": "a@b.example"}], "subject": "Hi"}],
                }
                accepted = await http.post("/v3/mail/send", json=subject_per_person, headers=auth)
                assert 202 == accepted.status_code
                sandbox = {**good, "mail_settings": {"sandbox_mode": {"enable": True}}}
                sandboxed = await http.post("/v3/mail/send", json=sandbox, headers=auth)
                assert 200 == sandboxed.status_code
                sim.max_payload_bytes = 100
                too_large = await http.post("/v3/mail/send", json=good, headers=auth)
                assert 413 == too_large.status_code
                assert [None] == [e["field"] for e in too_large.json()["errors"]]
        assert config.api_key is not None

    def test_default_errors_have_sendgrids_shape(self) -> None:
        for status in (401, 403, 413, 429, 500, 418):
            body = default_error(status)
            assert [None] == [e["field"] for e in body["errors"]]

    def test_tracked_link(self) -> None:
        html = '<a href="https://shop.example/t">x</a><a href="http://gw.test/t/c/AB.cd">y</a>'
        assert "http://gw.test/t/c/AB.cd" == tracked_link(html)
        assert tracked_link("<p>no links</p>") is None


class TestReceipts:
    """Accepted mail comes back as signed Event Webhook batches that our verifier accepts."""

    async def test_each_fate_reports_what_happened(self) -> None:
        sim, inbox = simulator(), WebhookInbox()
        outbound = Outbound(sim)
        addresses = {
            "acme:read": "ann+read@example.com",
            "acme:click": "bob+click@example.com",
            "acme:bounce": "cid+bounce@example.com",
            "acme:unsub": "dan+unsub@example.com",
            "acme:ignore": "eve+ignore@example.com",
        }
        with trio.fail_after(10):
            async with serving(sim, inbox) as (adapter, config):
                ids = {
                    key: await adapter.send(mail(address, key=key))
                    for key, address in addresses.items()
                }
                # read, click: delivered + engaged; unsub: delivered + unsubscribed; bounce, ignore: one
                posts = await settled(sim, outbound, inbox, adapter)
        assert 8 == len(posts)
        assert [200] * 9 == sim.webhook_statuses  # and the marker's
        kinds: dict[str, list[ReceiptKind]] = {key: [] for key in addresses}
        for headers, body in posts:
            assert "application/json" == headers["content-type"]
            verify_webhook(
                url=sim.webhook_url, headers=headers, body=body, config=config, now=wall_time()
            )
            for receipt in parse_webhook(url=sim.webhook_url, headers=headers, body=body):
                assert receipt.message_key is not None
                assert ids[receipt.message_key].provider_message_id == receipt.provider_message_id
                kinds[receipt.message_key].append(receipt.kind)
                if receipt.kind is ReceiptKind.CLICKED:
                    assert "https://gw.example/t/c/tok1" == receipt.detail
        assert {
            "acme:read": sorted([ReceiptKind.DELIVERED, ReceiptKind.READ]),
            "acme:click": sorted([ReceiptKind.DELIVERED, ReceiptKind.READ, ReceiptKind.CLICKED]),
            "acme:bounce": [ReceiptKind.BOUNCED],
            "acme:unsub": sorted([ReceiptKind.DELIVERED, ReceiptKind.UNSUBSCRIBED]),
            "acme:ignore": [ReceiptKind.DELIVERED],
        } == {key: sorted(found) for key, found in kinds.items()}  # batches may arrive out of order
        processed = [
            e
            for batch in filter(not_the_marker, sim.events_posted)
            for e in batch
            if e["event"] == "processed"
        ]
        assert 5 == len(processed)  # sent, and skipped by parse_webhook

    async def test_tracking_turned_off_reports_no_open_or_click(self) -> None:
        sim, inbox = simulator(), WebhookInbox()
        outbound = Outbound(sim)
        with trio.fail_after(10):
            async with serving(sim, inbox) as (adapter, config), httpx.AsyncClient() as http:
                body = msgspec.json.decode(
                    build_request(
                        mail("bob+click@example.com"),
                        config=config,
                        base_url=sim.url,
                        api_key=sim.api_key,
                    ).body
                )
                body["tracking_settings"] = {
                    "open_tracking": {"enable": False},
                    "click_tracking": {"enable": False},
                }
                answer = await http.post(
                    f"{sim.url}/v3/mail/send",
                    json=body,
                    headers={"Authorization": f"Bearer {sim.api_key}"},
                )
                assert 202 == answer.status_code
                posts = await settled(sim, outbound, inbox, adapter)
        events = [e["event"] for _, body in posts for e in msgspec.json.decode(body)]
        assert ["processed", "delivered"] == events  # bob+click: read and clicked, untracked

    async def test_undelivered_reports_only_processed(self) -> None:
        sim, inbox = simulator(), WebhookInbox()
        outbound = Outbound(sim)
        sim.behaviour = msgspec.structs.replace(
            FAST, deliver_probability=0.0, bounce_probability=0.0
        )
        with trio.fail_after(10):
            async with serving(sim, inbox) as (adapter, config):
                await adapter.send(mail("fay@example.com", campaign=None))
                posts = await settled(sim, outbound, inbox, adapter)
        batches = [msgspec.json.decode(body) for _, body in posts]
        assert [["processed"]] == [[e["event"] for e in batch] for batch in batches]
        assert "category" not in batches[0][0]
        headers, body = posts[0]
        verify_webhook(url="u", headers=headers, body=body, config=config, now=wall_time())
        assert [] == parse_webhook(url="u", headers=headers, body=body)

    async def test_categories_come_back(self) -> None:
        sim, inbox = simulator(), WebhookInbox()
        with trio.fail_after(10):
            async with serving(sim, inbox) as (adapter, _):
                await adapter.send(mail("ann+ignore@example.com"))
                await eventually(lambda: bool(inbox.posts))
        assert [["black-friday"]] * 2 == [e["category"] for e in sim.events_posted[0]]

    async def test_receipts_carry_event_ids_and_the_echoed_recipient(self) -> None:
        sim, inbox = simulator(), WebhookInbox()
        with trio.fail_after(10):
            async with serving(sim, inbox) as (adapter, config):
                await adapter.send(mail("dan+unsub@example.com", recipient_id="c-9", topic="promo"))
                await eventually(lambda: len(inbox.posts) >= 2)
        receipts = []
        for headers, body in inbox.posts:
            verify_webhook(url="u", headers=headers, body=body, config=config, now=wall_time())
            receipts += parse_webhook(url="u", headers=headers, body=body)
        assert sorted([ReceiptKind.DELIVERED, ReceiptKind.UNSUBSCRIBED]) == sorted(
            r.kind for r in receipts
        )
        assert {("c-9", "promo")} == {(r.recipient_id, r.topic) for r in receipts}
        event_ids = [r.event_id for r in receipts]
        assert len(set(event_ids)) == len(event_ids)
        for event_id in event_ids:
            # a Base64url-encoded UUIDv4, as SendGrid documents sg_event_id
            assert event_id is not None
            decoded = base64.urlsafe_b64decode(event_id + "=" * (-len(event_id) % 4))
            assert 4 == uuid.UUID(decoded.decode()).version

    async def test_replay_reposts_the_last_batch_unchanged(self) -> None:
        sim, inbox = simulator(), WebhookInbox()
        with trio.fail_after(10):
            async with serving(sim, inbox) as (adapter, config), httpx.AsyncClient() as http:
                await adapter.send(mail("eve+ignore@example.com"))
                await eventually(lambda: len(inbox.posts) == 1)
                assert [200, 200] == await sim.replay(2)
                answer = await http.post(f"{sim.url}/_sim/replay", json={"times": 3})
                assert {"statuses": [200] * 3} == answer.json()
                refused = await http.post(f"{sim.url}/_sim/replay", json={"times": 0})
                assert 400 == refused.status_code
        assert 6 == len(inbox.posts)
        (first_headers, first_body), *retries = inbox.posts
        signature = "x-twilio-email-event-webhook-signature"
        for headers, body in retries:
            assert (first_body, first_headers[signature]) == (body, headers[signature])
        receipts = [parse_webhook(url="u", headers=h, body=b) for h, b in inbox.posts]
        assert all(r == receipts[0] for r in receipts)
        # SendGrid's retries keep their first timestamp: 50 minutes later they still verify
        verify_webhook(
            url="u", headers=first_headers, body=first_body, config=config, now=wall_time() + 3000
        )

    async def test_nothing_to_replay_yet(self) -> None:
        sim = simulator()
        with trio.fail_after(10):
            async with serving(sim), httpx.AsyncClient() as http:
                answer = await http.post(f"{sim.url}/_sim/replay", json={"times": 1})
                assert 409 == answer.status_code
                with pytest.raises(LookupError):
                    await sim.replay()

    async def test_no_webhook_url_posts_nothing(self) -> None:
        sim, inbox = simulator(), WebhookInbox()
        outbound = Outbound(sim)
        with trio.fail_after(10):
            async with serving(sim, inbox) as (adapter, _):
                webhook_url, sim.webhook_url = sim.webhook_url, ""
                await adapter.send(mail("ann+read@example.com"))
                await adapter.send(mail("cid+bounce@example.com", key="acme:m2"))
                # the marker needs a webhook; anything scheduled above would now post too
                sim.webhook_url = webhook_url
                posts = await settled(sim, outbound, inbox, adapter)
        assert [] == posts
        assert [] == list(filter(not_the_marker, sim.events_posted))
