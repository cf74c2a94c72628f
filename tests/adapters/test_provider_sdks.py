"""Provider contracts, judged by the providers' official SDKs (test-only dependencies).

twilio (``RequestValidator``, the REST client), sendgrid (``EventWebhook``, ``Mail``),
firebase-admin with google-auth (the JWT grant, ``messaging.send``) and viberbot (``Api``) are the
judges: an SDK signs and the adapter must verify, the adapter signs and the SDK must verify, and
what the adapter sends must be what the SDK sends for the same message. The SDKs' own HTTP is
captured at its transport (``requests``, ``urllib``, twilio's ``HttpClient``): nothing leaves the
machine. The simulators' signing code is not used here.

Retries: a provider that retries a callback sends the same bytes (SendGrid, Viber: with the
first timestamp) and so the same event ids; verification accepts each retry inside the
provider's documented retry window, and the gateway's receipt store applies the event id once.
"""

# the keys and tokens here are generated fakes
# ruff: noqa: S105, S106

from __future__ import annotations

import ast
import base64
import datetime
import hashlib
import json
import warnings
from collections.abc import Callable, Iterator, Mapping
from itertools import product
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode

import firebase_admin  # type: ignore[import-untyped]
import google.auth._helpers
import google.auth.jwt
import google.auth.transport.requests
import msgspec
import pytest
import python_http_client.client  # type: ignore[import-untyped]
import requests
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from firebase_admin import messaging
from google.oauth2 import service_account
from sendgrid import SendGridAPIClient  # type: ignore[import-untyped]
from sendgrid.helpers.eventwebhook import EventWebhook  # type: ignore[import-untyped]
from sendgrid.helpers.mail import (  # type: ignore[import-untyped]
    Category as SendgridCategory,
)
from sendgrid.helpers.mail import (
    CustomArg,
    From,
    Header,
    Mail,
    To,
)
from twilio.http import HttpClient  # type: ignore[import-untyped]
from twilio.http.response import Response as TwilioResponse  # type: ignore[import-untyped]
from twilio.request_validator import (  # type: ignore[import-untyped]
    RequestValidator,
    get_signature_algorithm,
)
from twilio.rest import Client as TwilioClient  # type: ignore[import-untyped]
from viberbot import Api as ViberApi  # type: ignore[import-untyped]
from viberbot.api.bot_configuration import BotConfiguration  # type: ignore[import-untyped]
from viberbot.api.event_type import EventType  # type: ignore[import-untyped]
from viberbot.api.messages.picture_message import PictureMessage  # type: ignore[import-untyped]
from viberbot.api.messages.text_message import TextMessage  # type: ignore[import-untyped]

from adapters import (
    Outgoing,
    ProviderReceipt,
    ReceiptKind,
    WebhookRejected,
    fcm,
    sendgrid,
    twilio,
    viber,
)
from adapters.fcm import FcmSettings
from adapters.sendgrid import SendgridSettings
from adapters.twilio import TwilioSettings
from adapters.viber import ViberSettings
from gateway.config import Secret, SenderConfig
from gateway.core.model import Category, Channel
from gateway.protocol import EmailContent, PushContent, SmsContent, ViberContent

ROOT: Final = Path(__file__).resolve().parents[2]
SDK_MODULES: Final = (
    "twilio",
    "sendgrid",
    "python_http_client",
    "firebase_admin",
    "google",
    "viberbot",
    "requests",
)
NOW: Final = 1_795_435_200.0
MINUTES: Final = 60.0
HOURS: Final = 3600.0


def test_the_sdks_stay_test_only() -> None:
    """They are dev dependencies: the gateway and its adapters must run without them."""
    imported = []
    for package in ("adapters", "gateway"):
        for source in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(source.read_text(), filename=str(source))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                imported += [(str(source.relative_to(ROOT)), name) for name in names]
    assert ("adapters/_transport.py", "trio") in imported  # the scan sees imports at all
    assert [] == [(where, name) for where, name in imported if name.split(".")[0] in SDK_MODULES]


# ---------------------------------------------------------------- capturing SDK traffic
class Captured:
    """``requests`` traffic of an SDK, answered locally: ``answer(request) -> (status, json)``."""

    def __init__(self, answer: Callable[[Any], tuple[int, object]]) -> None:
        self.answer = answer
        self.requests: list[Any] = []

    def send(self, request: Any) -> Any:
        self.requests.append(request)
        status, body = self.answer(request)
        response = requests.Response()
        response.status_code = status
        response.headers["Content-Type"] = "application/json"
        response._content = json.dumps(body).encode()
        response.url = request.url
        response.request = request
        return response


@pytest.fixture
def capture(
    monkeypatch: pytest.MonkeyPatch,
) -> Callable[[Callable[[Any], tuple[int, object]]], Captured]:
    def install(answer: Callable[[Any], tuple[int, object]]) -> Captured:
        captured = Captured(answer)

        def send(session: Any, request: Any, **_: Any) -> Any:
            del session
            return captured.send(request)

        monkeypatch.setattr(requests.Session, "send", send)
        return captured

    return install


@pytest.fixture
def frozen_google_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """google-auth reads its clock through ``_helpers.utcnow`` (naive UTC)."""
    moment = datetime.datetime.fromtimestamp(NOW, tz=datetime.UTC).replace(tzinfo=None)
    monkeypatch.setattr(google.auth._helpers, "utcnow", lambda: moment)


# ================================================================ Twilio
TWILIO_SID: Final = "AC" + "0123456789abcdef" * 2
TWILIO_AUTH: Final = "f" * 32
TWILIO_SHARED_KEY: Final = "webhooks-shared-key-secret-" + "9" * 20
TWILIO_CONFIG: Final = TwilioSettings(
    account_sid=TWILIO_SID,
    auth_token=Secret(TWILIO_AUTH),
    webhook_shared_key=Secret(TWILIO_SHARED_KEY),
)
SHARED_KEY_SETTINGS: Final = "key=webhooks_sharedkey_01j8x,algorithm=HMAC_SHA256"


class MultiDict:
    """A form with repeated names, as twilio-python reads one (Flask's ``getall``)."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self.pairs = pairs

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys(name for name, _ in self.pairs))

    def __bool__(self) -> bool:
        return bool(self.pairs)

    def getall(self, name: str) -> list[str]:
        return [value for n, value in self.pairs if n == name]


def status_callback(status: str = "delivered", **extra: str) -> list[tuple[str, str]]:
    sid = "SM" + "1" * 32
    return [
        ("AccountSid", TWILIO_SID),
        ("ApiVersion", "2010-04-01"),
        ("From", "ACME"),
        ("MessageSid", sid),
        ("MessageStatus", status),
        ("SmsSid", sid),
        ("SmsStatus", status),
        ("To", "+79160000002"),
        *extra.items(),
    ]


def twilio_verifies(
    url: str,
    params: list[tuple[str, str]],
    signature: str,
    *,
    settings: str | None = None,
    body: bytes | None = None,
) -> bool:
    headers = {"X-Twilio-Signature": signature}
    if settings is not None:
        headers["X-Twilio-Webhooks-Signature-Settings"] = settings
    try:
        twilio.verify_webhook(
            url=url,
            headers=headers,
            body=urlencode(params).encode() if body is None else body,
            config=TWILIO_CONFIG,
            now=NOW,
        )
    except WebhookRejected:
        return False
    return True


class TestTwilioRequestValidator:
    """verify_webhook accepts exactly what twilio-python's RequestValidator accepts."""

    URLS: Final = (
        "https://gw.example/webhooks/sms1?m=acme%2Fmsg-1",
        "https://gw.example:443/webhooks/sms1?m=acme%2Fmsg-1",
        "https://gw.example:8443/webhooks/sms1?m=acme%2Fmsg-1",
        "https://gw.example/webhooks/sms1?m=acme%2Fmsg-2",
        "https://gw.example/webhooks/sms1",
        "http://gw.example/webhooks/sms1",
        "http://gw.example:80/webhooks/sms1",
        "http://gw.example:8080/webhooks/sms1",
    )

    def test_every_url_shape_agrees_with_the_sdk(self) -> None:
        params = status_callback()
        validator = RequestValidator(TWILIO_AUTH)
        verdicts = []
        for signed_url, given_url in product(self.URLS, repeat=2):
            signature = validator.compute_signature(signed_url, MultiDict(params))
            sdk = validator.validate(given_url, MultiDict(params), signature)
            ours = twilio_verifies(given_url, params, signature)
            assert sdk == ours, (signed_url, given_url)
            verdicts.append(ours)
        # both answers occur: the grid tells ports and paths apart, it does not accept everything
        assert {True, False} == set(verdicts)

    @pytest.mark.parametrize(
        "params",
        [
            status_callback(),
            status_callback("undelivered", ErrorCode="30003"),
            [("a", "1"), ("b", "2"), ("a", "1")],  # an identical pair, repeated
            [("a", "2"), ("a", "1"), ("a", "2"), ("b", "")],
            [("Body", "Привет, STOP? ü"), ("From", "+79160000002")],
        ],
    )
    @pytest.mark.parametrize("url", [URLS[0], URLS[2], URLS[6]])
    def test_sdk_signs_adapter_verifies_and_back(
        self, params: list[tuple[str, str]], url: str
    ) -> None:
        validator = RequestValidator(TWILIO_AUTH)
        assert twilio_verifies(url, params, validator.compute_signature(url, MultiDict(params)))
        ours = twilio.signature(url, params, TWILIO_AUTH)
        assert validator.validate(url, MultiDict(params), ours)

    def test_a_tampered_form_fails_both(self) -> None:
        url = self.URLS[0]
        validator = RequestValidator(TWILIO_AUTH)
        signature = validator.compute_signature(url, MultiDict(status_callback()))
        tampered = status_callback("failed", ErrorCode="30003")
        assert not validator.validate(url, MultiDict(tampered), signature)
        assert not twilio_verifies(url, tampered, signature)

    def test_a_shared_key_hmac_sha256_callback_is_accepted(self) -> None:
        url, params = self.URLS[0], status_callback()
        algorithm = get_signature_algorithm(SHARED_KEY_SETTINGS)
        assert "HMAC_SHA256" == algorithm
        validator = RequestValidator(TWILIO_SHARED_KEY)
        signature = validator.compute_signature(url, MultiDict(params), algorithm)
        assert twilio_verifies(url, params, signature, settings=SHARED_KEY_SETTINGS)
        ours = twilio.signature(url, params, TWILIO_SHARED_KEY, algorithm=algorithm)
        assert validator.validate(url, MultiDict(params), ours, algorithm)
        # the same signature without the settings header is an auth-token one, and wrong
        assert not twilio_verifies(url, params, signature)
        assert not RequestValidator(TWILIO_AUTH).validate(url, MultiDict(params), signature)

    def test_json_bodies_are_signed_through_body_sha256(self) -> None:
        body = json.dumps({"MessageSid": "SM1", "MessageStatus": "delivered"})
        url = (
            "https://gw.example/webhooks/sms1?bodySHA256="
            + hashlib.sha256(body.encode()).hexdigest()
        )
        validator = RequestValidator(TWILIO_AUTH)
        signature = validator.compute_signature(url, {})
        assert validator.validate(url, body, signature)
        assert twilio_verifies(url, [], signature, body=body.encode())
        assert validator.validate(url, body, twilio.signature(url, [], TWILIO_AUTH))
        assert not validator.validate(url, body + " ", signature)
        assert not twilio_verifies(url, [], signature, body=body.encode() + b" ")

    def test_an_inbound_stop_signed_by_the_sdk_is_an_opt_out(self) -> None:
        url = "https://gw.example/webhooks/sms1"
        sid = "SM" + "5" * 32
        params = [
            ("AccountSid", TWILIO_SID),
            ("Body", "Stop"),
            ("From", "+79161234567"),
            ("MessageSid", sid),
            ("NumMedia", "0"),
            ("SmsMessageSid", sid),
            ("SmsSid", sid),
            ("SmsStatus", "received"),
            ("To", "+15005550006"),
        ]
        signature = RequestValidator(TWILIO_AUTH).compute_signature(url, MultiDict(params))
        assert twilio_verifies(url, params, signature)
        receipts = twilio.parse_webhook(url=url, headers={}, body=urlencode(params).encode())
        assert [
            ProviderReceipt(
                ReceiptKind.UNSUBSCRIBED, 0.0, detail="+79161234567", event_id=f"{sid}:received"
            )
        ] == receipts

    def test_retries_are_the_same_event(self) -> None:
        # Twilio signs no time, so a retry verifies whenever it comes; its id is what repeats
        url, params = self.URLS[0], status_callback()
        signature = RequestValidator(TWILIO_AUTH).compute_signature(url, MultiDict(params))
        body = urlencode(params).encode()
        ids = []
        for _ in range(3):
            assert twilio_verifies(url, params, signature)
            (receipt,) = twilio.parse_webhook(url=url, headers={}, body=body)
            ids.append(receipt.event_id)
        assert ["SM" + "1" * 32 + ":delivered"] * 3 == ids


class CapturingTwilioHttp(HttpClient):  # type: ignore[misc]
    """twilio-python's pluggable HTTP client: records the request, answers 201."""

    def __init__(self) -> None:
        super().__init__(None, False, None)
        self.calls: list[dict[str, Any]] = []

    def request(
        self,
        method: str,
        uri: str,
        params: object = None,
        data: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,
        allow_redirects: bool = False,
    ) -> Any:
        self.calls.append({"method": method, "uri": uri, "data": data, "auth": auth})
        return TwilioResponse(201, json.dumps({"sid": "SM" + "a" * 32, "status": "queued"}))


def sms(
    *, sms_from: str = "ACME", callback: str = "https://gw.example/webhooks/sms1?m=acme%2Fm1"
) -> Outgoing:
    return Outgoing(
        message_key="acme/m1",
        tenant="acme",
        channel=Channel.SMS,
        category=Category.PROMO,
        address="+79160000002",
        content=SmsContent(text="Sale -50% https://gw.example/t/c/x"),
        brand="Acme",
        sender=SenderConfig(sms_from=sms_from),
        status_callback_url=callback,
    )


class TestTwilioMessagesCreate:
    """build_request sends what twilio-python's ``messages.create`` sends."""

    @pytest.mark.parametrize("service", [None, "MG" + "abcdef0123456789" * 2])
    @pytest.mark.parametrize("callback", ["https://gw.example/webhooks/sms1?m=acme%2Fm1", ""])
    def test_same_request(self, service: str | None, callback: str) -> None:
        outgoing = sms(callback=callback)
        http = CapturingTwilioHttp()
        client = TwilioClient(TWILIO_SID, TWILIO_AUTH, http_client=http)
        sender: dict[str, str] = (
            {"messaging_service_sid": service} if service else {"from_": outgoing.sender.sms_from}
        )
        if callback:
            sender["status_callback"] = callback
        assert isinstance(outgoing.content, SmsContent)
        client.messages.create(to=outgoing.address, body=outgoing.content.text, **sender)
        (sdk,) = http.calls
        config = msgspec.structs.replace(TWILIO_CONFIG, messaging_service_sid=service)
        ours = twilio.build_request(
            outgoing, config=config, base_url=twilio.DEFAULT_URL, auth_token=TWILIO_AUTH
        )
        assert (sdk["method"], sdk["uri"]) == (ours.method, str(ours.url))
        assert sdk["data"] == dict(parse_qsl(ours.body.decode(), strict_parsing=True))
        user, password = sdk["auth"]
        basic = base64.b64encode(f"{user}:{password}".encode()).decode()
        assert f"Basic {basic}" == ours.headers["authorization"]


# ================================================================ SendGrid
SENDGRID_KEY: Final = ec.generate_private_key(ec.SECP256R1())
SENDGRID_PUBLIC_KEY: Final = base64.b64encode(
    SENDGRID_KEY.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
).decode()
SENDGRID_CONFIG: Final = SendgridSettings(
    api_key=Secret("SG.test.key"), webhook_public_key=SENDGRID_PUBLIC_KEY
)


def sendgrid_batch(*, at: float, name: str = "unsubscribe") -> bytes:
    return json.dumps(
        [
            {
                "email": "ann@example.com",
                "timestamp": int(at),
                "event": name,
                "sg_event_id": "ZGVsaXZlcmVkLTAtMjQ0NTg3NjYtMTY",
                "sg_message_id": "14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.0",
                "cgw_key": "acme:m1",
                "cgw_rcpt": "cust-1",
                "cgw_topic": "promo",
            }
        ]
    ).encode()


def sendgrid_signs(body: bytes, timestamp: str) -> str:
    """SendGrid's scheme (the SDK only verifies): base64 DER ECDSA P-256/SHA-256 over
    ``timestamp + payload``; EventWebhook.verify_signature is the judge that it is right."""
    return base64.b64encode(
        SENDGRID_KEY.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    ).decode()


def sendgrid_verify(body: bytes, signature: str, timestamp: str, *, now: float) -> None:
    sendgrid.verify_webhook(
        url="https://gw.example/webhooks/email1",
        headers={
            "X-Twilio-Email-Event-Webhook-Signature": signature,
            "X-Twilio-Email-Event-Webhook-Timestamp": timestamp,
        },
        body=body,
        config=SENDGRID_CONFIG,
        now=now,
    )


class TestSendgridEventWebhook:
    """verify_webhook and sendgrid's EventWebhook agree on every signature."""

    def test_the_sdk_verifies_what_the_adapter_signs(self) -> None:
        body, timestamp = sendgrid_batch(at=NOW), str(int(NOW))
        signature = sendgrid.sign_events(SENDGRID_KEY, timestamp=timestamp, body=body)
        assert EventWebhook(SENDGRID_PUBLIC_KEY).verify_signature(
            body.decode(), signature, timestamp
        )

    def test_the_adapter_verifies_what_the_sdk_accepts(self) -> None:
        body, timestamp = sendgrid_batch(at=NOW), str(int(NOW))
        signature = sendgrid_signs(body, timestamp)
        assert EventWebhook(SENDGRID_PUBLIC_KEY).verify_signature(
            body.decode(), signature, timestamp
        )
        sendgrid_verify(body, signature, timestamp, now=NOW)

    def test_both_refuse_a_tampered_batch(self) -> None:
        body, timestamp = sendgrid_batch(at=NOW), str(int(NOW))
        signature = sendgrid_signs(body, timestamp)
        tampered = body.replace(b"unsubscribe", b"delivered")
        assert not EventWebhook(SENDGRID_PUBLIC_KEY).verify_signature(
            tampered.decode(), signature, timestamp
        )
        with pytest.raises(WebhookRejected) as caught:
            sendgrid_verify(tampered, signature, timestamp, now=NOW)
        assert "bad_signature" == caught.value.verdict

    def test_the_sdk_reads_the_key_the_adapter_reads(self) -> None:
        sdk = EventWebhook().convert_public_key_to_ecdsa(SENDGRID_PUBLIC_KEY)
        ours = sendgrid.load_public_key(SENDGRID_PUBLIC_KEY)
        assert sdk.public_numbers() == ours.public_numbers()

    @pytest.mark.parametrize(
        "late_seconds", [0.0, 10 * MINUTES, 50 * MINUTES, 4 * HOURS, 23 * HOURS, 24 * HOURS]
    )
    def test_an_unsubscribe_retried_inside_the_24_hours_is_accepted_as_one_event(
        self, late_seconds: float
    ) -> None:
        body, timestamp = sendgrid_batch(at=NOW), str(int(NOW))
        signature = sendgrid_signs(body, timestamp)
        sendgrid_verify(body, signature, timestamp, now=NOW + late_seconds)
        (receipt,) = sendgrid.parse_webhook(url="", headers={}, body=body)
        assert (ReceiptKind.UNSUBSCRIBED, "ZGVsaXZlcmVkLTAtMjQ0NTg3NjYtMTY", "cust-1", "promo") == (
            receipt.kind,
            receipt.event_id,
            receipt.recipient_id,
            receipt.topic,
        )

    def test_past_the_retry_window_it_is_stale(self) -> None:
        body, timestamp = sendgrid_batch(at=NOW), str(int(NOW))
        with pytest.raises(WebhookRejected) as caught:
            sendgrid_verify(body, sendgrid_signs(body, timestamp), timestamp, now=NOW + 26 * HOURS)
        assert "stale" == caught.value.verdict


class UrllibResponse:
    def getcode(self) -> int:
        return 202

    def read(self) -> bytes:
        return b""

    def info(self) -> dict[str, str]:
        return {"X-Message-Id": "sdk-message-id"}


def email(
    *,
    html: str | None = "<html><body><a href='https://gw.example/t/c/1'>shop</a></body></html>",
    text: str | None = "Sale https://gw.example/t/c/1",
    marketing: bool = True,
    recipient_id: str | None = "cust-1",
    topic: str | None = "promo",
    campaign: str | None = "black-friday",
) -> Outgoing:
    return Outgoing(
        message_key="acme:m1",
        tenant="acme",
        channel=Channel.EMAIL,
        category=Category.PROMO if marketing else Category.SERVICE,
        address="ann@example.com",
        content=EmailContent(subject="Sale", html=html, text=text),
        brand="Acme",
        sender=SenderConfig(email_from="news@acme.example", email_name="Acme News"),
        status_callback_url="https://gw.example/webhooks/email1",
        unsubscribe_url="https://gw.example/t/u/tok" if marketing else None,
        open_pixel_url="https://gw.example/t/o/px.gif" if marketing else None,
        campaign=campaign,
        recipient_id=recipient_id,
        topic=topic,
    )


class TestSendgridMailSend:
    """build_request sends what sendgrid's ``SendGridAPIClient.send(Mail(...))`` sends."""

    @pytest.mark.parametrize(
        "outgoing",
        [
            email(),
            email(marketing=False, campaign=None, recipient_id=None, topic=None),
            email(html=None),
            email(text=None, recipient_id=None),
        ],
    )
    def test_same_request(self, outgoing: Outgoing, monkeypatch: pytest.MonkeyPatch) -> None:
        sent: list[Any] = []

        def make_request(client: Any, opener: Any, request: Any, timeout: Any = None) -> Any:
            del client, opener, timeout
            sent.append(request)
            return UrllibResponse()

        monkeypatch.setattr(python_http_client.client.Client, "_make_request", make_request)
        ours = sendgrid.build_request(
            outgoing,
            config=SENDGRID_CONFIG,
            base_url=sendgrid.DEFAULT_BASE_URL,
            api_key="SG.test.key",
        )
        document = msgspec.json.decode(ours.body)
        content = outgoing.content
        assert isinstance(content, EmailContent)
        # the same message: the html as sent, open pixel included
        html = next((c["value"] for c in document["content"] if c["type"] == "text/html"), None)
        mail = Mail(
            from_email=From(outgoing.sender.email_from, outgoing.sender.email_name),
            to_emails=To(outgoing.address),
            subject=content.subject,
            plain_text_content=content.text,
            html_content=html,
        )
        custom = {
            "cgw_key": outgoing.message_key,
            "cgw_rcpt": outgoing.recipient_id,
            "cgw_topic": outgoing.topic,
        }
        mail.custom_arg = [CustomArg(k, v, p=0) for k, v in custom.items() if v is not None]
        if outgoing.unsubscribe_url is not None:
            mail.header = [
                Header("List-Unsubscribe", f"<{outgoing.unsubscribe_url}>"),
                Header("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
            ]
        if outgoing.campaign:
            mail.category = SendgridCategory(outgoing.campaign)
        SendGridAPIClient("SG.test.key").send(mail)
        (request,) = sent
        assert (request.get_method(), request.full_url) == (ours.method, str(ours.url))
        assert request.headers["Authorization"] == ours.headers["authorization"]
        assert json.loads(request.data) == document


# ================================================================ FCM (google-auth, firebase-admin)
FCM_KEY: Final = rsa.generate_private_key(public_exponent=65537, key_size=2048)
FCM_PEM: Final = FCM_KEY.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode()
LEGACY_TOKEN_URI: Final = "https://accounts.google.com/o/oauth2/token"


def key_file(token_uri: str = fcm.DEFAULT_TOKEN_URI) -> dict[str, str]:
    return {
        "type": "service_account",
        "project_id": "acme-app",
        "private_key_id": "kid-1",
        "private_key": FCM_PEM,
        "client_email": "gw@acme-app.iam.gserviceaccount.com",
        "client_id": "1234567890",
        "token_uri": token_uri,
    }


def fcm_config(token_uri: str = fcm.DEFAULT_TOKEN_URI) -> FcmSettings:
    return FcmSettings(service_account_json=Secret(json.dumps(key_file(token_uri))))


def google_token(request: Any) -> tuple[int, object]:
    if request.url.startswith("https://fcm.googleapis.com/"):
        return 200, {"name": "projects/acme-app/messages/0:1"}
    return 200, {"access_token": "ya29.sdk-token", "expires_in": 3600, "token_type": "Bearer"}


@pytest.mark.usefixtures("frozen_google_clock")
class TestFcmJwtGrant:
    """build_token_request makes the grant google-auth makes for the same key file."""

    @pytest.mark.parametrize("token_uri", [fcm.DEFAULT_TOKEN_URI, LEGACY_TOKEN_URI])
    def test_same_grant(
        self, token_uri: str, capture: Callable[[Callable[[Any], tuple[int, object]]], Captured]
    ) -> None:
        captured = capture(google_token)
        credentials = service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
            key_file(token_uri), scopes=[fcm.SCOPE]
        )
        credentials.refresh(google.auth.transport.requests.Request())
        (sdk,) = captured.requests
        account = fcm.load_service_account(fcm_config(token_uri))
        ours = fcm.build_token_request(account, private_key=FCM_KEY, now=NOW)
        assert (sdk.method, sdk.url) == (ours.method, str(ours.url))
        sdk_form = dict(parse_qsl(sdk.body.decode() if isinstance(sdk.body, bytes) else sdk.body))
        our_form = dict(parse_qsl(ours.body.decode()))
        assert sdk_form.keys() == our_form.keys()
        assert sdk_form["grant_type"] == our_form["grant_type"]
        public_key = FCM_KEY.public_key()
        assert fcm.decode_jwt(sdk_form["assertion"], public_key=public_key) == fcm.decode_jwt(
            our_form["assertion"], public_key=public_key
        )

    def test_google_auth_verifies_our_assertion(self) -> None:
        account = fcm.load_service_account(fcm_config(LEGACY_TOKEN_URI))
        ours = fcm.build_token_request(account, private_key=FCM_KEY, now=NOW)
        assertion = dict(parse_qsl(ours.body.decode()))["assertion"]
        public_pem = FCM_KEY.public_key().public_bytes(
            Encoding.PEM, PublicFormat.SubjectPublicKeyInfo
        )
        claims = google.auth.jwt.decode(  # type: ignore[no-untyped-call]
            assertion, certs=public_pem, audience="https://oauth2.googleapis.com/token"
        )
        assert "gw@acme-app.iam.gserviceaccount.com" == claims["iss"]


def push(
    *, category: Category = Category.PROMO, link: str | None = "https://gw.example/t/c/1"
) -> Outgoing:
    return Outgoing(
        message_key="acme:m1",
        tenant="acme",
        channel=Channel.PUSH,
        category=category,
        address="fcm-registration-token-1",
        content=PushContent(title="Sale", body="Up to 50% off", data={"screen": "sale"}),
        brand="Acme",
        sender=SenderConfig(),
        status_callback_url="",
        link_url=link,
    )


@pytest.fixture
def firebase_app() -> Iterator[Any]:
    app = firebase_admin.initialize_app(
        firebase_admin.credentials.Certificate(key_file()), name="cascadegw-contract"
    )
    try:
        yield app
    finally:
        firebase_admin.delete_app(app)


@pytest.mark.usefixtures("frozen_google_clock")
class TestFcmMessagesSend:
    """build_request sends what firebase-admin's ``messaging.send`` sends."""

    @pytest.mark.parametrize("outgoing", [push(), push(category=Category.SERVICE, link=None)])
    def test_same_request(
        self,
        outgoing: Outgoing,
        firebase_app: Any,
        capture: Callable[[Callable[[Any], tuple[int, object]]], Captured],
    ) -> None:
        captured = capture(google_token)
        ours = fcm.build_request(
            outgoing,
            config=fcm_config(),
            base_url=fcm.DEFAULT_BASE_URL,
            access_token="ya29.sdk-token",
        )
        message = msgspec.json.decode(ours.body)["message"]
        with warnings.catch_warnings():
            # firebase-admin 7.7 deprecates ``token`` for Firebase installation ids ("fid");
            # the CRMs hand the gateway registration tokens, which FCM v1 still takes as token
            warnings.simplefilter("ignore", DeprecationWarning)
            sdk_message = messaging.Message(
                token=outgoing.address,
                notification=messaging.Notification(
                    title=message["notification"]["title"], body=message["notification"]["body"]
                ),
                data=message["data"],
                android=messaging.AndroidConfig(priority=message["android"]["priority"].lower()),
            )
        messaging.send(sdk_message, app=firebase_app)
        sdk = captured.requests[-1]
        assert (sdk.method, sdk.url) == (ours.method, str(ours.url))
        assert sdk.headers["authorization"] == ours.headers["authorization"]
        sent = json.loads(sdk.body)
        # firebase-admin lowercases AndroidConfig.priority; FCM's published enum (and what the
        # adapter sends) is NORMAL/HIGH, and FCM takes either
        sent["message"]["android"]["priority"] = sent["message"]["android"]["priority"].upper()
        assert sent == msgspec.json.decode(ours.body)


# ================================================================ Viber
VIBER_TOKEN: Final = "445da6az1s345z78-dazcczb2542zv51a-e0vc5fva17480im9"
VIBER_CONFIG: Final = ViberSettings(auth_token=Secret(VIBER_TOKEN))


def viber_api(name: str = "Acme") -> Any:
    return ViberApi(BotConfiguration(name=name, avatar=None, auth_token=VIBER_TOKEN))


def viber_callback(event: str, fields: Mapping[str, object], *, at: float = NOW) -> bytes:
    return json.dumps({"event": event, "timestamp": int(at * 1000), **fields}).encode()


def viber_verify(body: bytes, signature: str, *, now: float = NOW) -> None:
    viber.verify_webhook(
        url="https://gw.example/webhooks/viber1",
        headers={"X-Viber-Content-Signature": signature},
        body=body,
        config=VIBER_CONFIG,
        now=now,
    )


CALLBACKS: Final = (
    ("delivered", {"message_token": 4912661846655238145, "user_id": "01234567890A="}),
    ("seen", {"message_token": 4912661846655238145, "user_id": "01234567890A="}),
    (
        "failed",
        {"message_token": 4912661846655238145, "user_id": "01234567890A=", "desc": "failure"},
    ),
    ("unsubscribed", {"message_token": 4912661846655238146, "user_id": "01234567890A="}),
)


class TestViberCallbacks:
    """verify_webhook and parse_webhook agree with viberbot's Api on signatures and fields."""

    @pytest.mark.parametrize(("event", "fields"), CALLBACKS)
    def test_sdk_signs_adapter_verifies_and_back(
        self, event: str, fields: dict[str, object]
    ) -> None:
        body = viber_callback(event, fields)
        api = viber_api()
        viber_verify(body, api._calculate_message_signature(body))
        assert api.verify_signature(body, viber.signature(body, VIBER_TOKEN))
        assert not api.verify_signature(body + b" ", viber.signature(body, VIBER_TOKEN))

    @pytest.mark.parametrize(("event", "fields"), CALLBACKS)
    def test_the_adapter_reads_what_the_sdk_reads(
        self, event: str, fields: dict[str, object]
    ) -> None:
        body = viber_callback(event, fields)
        sdk = viber_api().parse_request(body)
        (receipt,) = viber.parse_webhook(url="", headers={}, body=body)
        assert sdk.timestamp == round(receipt.at * 1000)
        if event == "unsubscribed":
            assert (ReceiptKind.UNSUBSCRIBED, sdk.user_id) == (receipt.kind, receipt.detail)
        else:
            assert str(sdk.message_token) == receipt.provider_message_id
        if event == "failed":
            assert sdk.desc == receipt.detail

    @pytest.mark.parametrize("late_seconds", [0.0, 11 * MINUTES, 50 * MINUTES, 1 * HOURS])
    def test_an_unsubscribed_retried_inside_the_hour_is_accepted_as_one_event(
        self, late_seconds: float
    ) -> None:
        event, fields = CALLBACKS[-1]
        body = viber_callback(event, fields)
        viber_verify(body, viber_api()._calculate_message_signature(body), now=NOW + late_seconds)
        (receipt,) = viber.parse_webhook(url="", headers={}, body=body)
        assert (
            ReceiptKind.UNSUBSCRIBED,
            f"4912661846655238146:unsubscribed:{int(NOW * 1000)}",
        ) == (
            receipt.kind,
            receipt.event_id,
        )


class TestViberSendMessage:
    """build_request sends what viberbot's ``Api.send_messages`` sends.

    viberbot puts the token in the body (``auth_token``) and an empty ``sender.avatar``;
    the adapter sends the token in ``X-Viber-Auth-Token`` (Viber's current docs) and no
    avatar: both are compared out, everything else must be equal.
    """

    @pytest.mark.parametrize(
        ("content", "link"),
        [
            (ViberContent(text="Sale -50%"), None),
            (ViberContent(text="Sale -50%", button_text="Shop"), "https://gw.example/t/c/1"),
            (ViberContent(text="Sale", image_url="https://cdn.example/sale.png"), None),
        ],
    )
    def test_same_request(
        self,
        content: ViberContent,
        link: str | None,
        capture: Callable[[Callable[[Any], tuple[int, object]]], Captured],
    ) -> None:
        outgoing = Outgoing(
            message_key="acme/m1",
            tenant="acme",
            channel=Channel.VIBER,
            category=Category.PROMO,
            address="01234567890A=",
            content=content,
            brand="Acme",
            sender=SenderConfig(viber_name="Acme"),
            status_callback_url="",
            link_url=link,
        )
        ours = viber.build_request(
            outgoing, config=VIBER_CONFIG, base_url=viber.DEFAULT_URL, auth_token=VIBER_TOKEN
        )
        body = msgspec.json.decode(ours.body)
        captured = capture(
            lambda _: (200, {"status": 0, "status_message": "ok", "message_token": 5})
        )
        common = {
            "tracking_data": body["tracking_data"],
            "min_api_version": body["min_api_version"],
        }
        message = (
            PictureMessage(text=body["text"], media=body["media"], **common)
            if body["type"] == "picture"
            else TextMessage(text=body["text"], **common)
        )
        assert [5] == viber_api(body["sender"]["name"]).send_messages(outgoing.address, [message])
        (sdk,) = captured.requests
        assert (sdk.method, sdk.url) == (ours.method, str(ours.url))
        sent = json.loads(sdk.body)
        assert VIBER_TOKEN == sent.pop("auth_token") == ours.headers["x-viber-auth-token"]
        assert sent["sender"].pop("avatar") is None
        assert sent == body

    def test_set_webhook_asks_for_events_the_sdk_knows_including_unsubscribed(
        self, capture: Callable[[Callable[[Any], tuple[int, object]]], Captured]
    ) -> None:
        ours = viber.build_set_webhook_request(
            base_url=viber.DEFAULT_URL,
            auth_token=VIBER_TOKEN,
            url="https://gw.example/webhooks/viber1",
        )
        body = msgspec.json.decode(ours.body)
        known = {v for k, v in vars(EventType).items() if not k.startswith("_")}
        assert set(body["event_types"]) <= known
        assert EventType.UNSUBSCRIBED in body["event_types"]
        captured = capture(
            lambda _: (200, {"status": 0, "status_message": "ok", "event_types": []})
        )
        viber_api().set_webhook(body["url"], webhook_events=body["event_types"])
        (sdk,) = captured.requests
        sent = json.loads(sdk.body)
        assert (sdk.url, sent["url"], sent["event_types"]) == (
            str(ours.url),
            body["url"],
            body["event_types"],
        )
