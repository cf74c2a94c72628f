"""The Twilio adapter (adapters/twilio.py) against its pure contract and the real simulator."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final
from urllib.parse import parse_qs, parse_qsl, urlencode

import httpx
import msgspec
import pytest
import trio

from adapters import Outgoing, ProviderReceipt, ReceiptKind, SendReceipt, WebhookRejected, twilio
from adapters._http import make_client
from adapters._transport import HttpResponse
from adapters.simulators._base import Scripted
from adapters.simulators.twilio import TwilioSimulator
from adapters.twilio import TwilioSettings
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
from gateway.protocol import SmsContent, ViberContent
from tests.adapters.fake_gateway import FakeGateway, Hit
from tests.adapters.settling import Outbound, marker_behaviour

SID = "AC" + "0123456789abcdef" * 2
AUTH = "f" * 32
SHARED_KEY = "sk-" + "e" * 40
CONFIG = TwilioSettings(
    account_sid=SID, auth_token=Secret(AUTH), webhook_shared_key=Secret(SHARED_KEY)
)
INBOUND_URL = "https://gw.example/webhooks/sms1"
CALLBACK = "https://gw.example/webhooks/sms1?m=acme%2Fmsg-1"
FAST = SimulatorConfig(receipt_delay_seconds=0.01, read_delay_seconds=0.02, latency_seconds=0)
NOW = 1_795_435_200.0


def outgoing(
    *,
    phone: str = "+79160000002",
    text: str = "Your code is 1234",
    sms_from: str = "ACME",
    callback: str = CALLBACK,
) -> Outgoing:
    return Outgoing(
        message_key="acme/msg-1",
        tenant="acme",
        channel=Channel.SMS,
        category=Category.SERVICE,
        address=phone,
        content=SmsContent(text=text),
        brand="Acme",
        sender=SenderConfig(sms_from=sms_from),
        status_callback_url=callback,
    )


def reference_signature(
    url: str, params: list[tuple[str, str]], auth: str, digest: str = "sha1"
) -> str:
    """Twilio's documented scheme, written out independently of the adapter: sorted names,
    each name's distinct values sorted (twilio-python's ``RequestValidator``)."""
    data = url
    for name in sorted({name for name, _ in params}):
        for value in sorted({value for n, value in params if n == name}):
            data += name + value
    return base64.b64encode(hmac.new(auth.encode(), data.encode(), digest).digest()).decode()


def inbound_form(body: str, **extra: str) -> list[tuple[str, str]]:
    """An incoming message as Twilio posts it to the number's messaging webhook."""
    sid = "SM" + "7" * 32
    params = [
        ("AccountSid", SID),
        ("ApiVersion", "2010-04-01"),
        ("Body", body),
        ("From", "+79161234567"),
        ("FromCountry", "RU"),
        ("MessageSid", sid),
        ("NumMedia", "0"),
        ("NumSegments", "1"),
        ("SmsMessageSid", sid),
        ("SmsSid", sid),
        ("SmsStatus", "received"),
        ("To", "+15005550006"),
    ]
    return params + list(extra.items())


def status_form(status: str, **extra: str) -> list[tuple[str, str]]:
    params = [
        ("AccountSid", SID),
        ("ApiVersion", "2010-04-01"),
        ("From", "ACME"),
        ("MessageSid", "SM" + "1" * 32),
        ("MessageStatus", status),
        ("SmsSid", "SM" + "1" * 32),
        ("SmsStatus", status),
        ("To", "+79160000002"),
    ]
    return params + list(extra.items())


def failure(status: int, code: int | None, headers: dict[str, str] | None = None) -> HttpResponse:
    body = {"code": code, "message": "The 'To' number +79160000002 is not valid", "status": status}
    return HttpResponse(status, headers or {}, msgspec.json.encode(body))


# ---------------------------------------------------------------- pure functions
class TestBuildRequest:
    """build_request makes exactly Twilio's Messages.json request."""

    def test_shape(self) -> None:
        request = twilio.build_request(
            outgoing(), config=CONFIG, base_url="https://api.twilio.com/", auth_token=AUTH
        )
        assert request.method == "POST"
        assert str(request.url) == f"https://api.twilio.com/2010-04-01/Accounts/{SID}/Messages.json"
        expected_auth = base64.b64encode(f"{SID}:{AUTH}".encode()).decode()
        assert request.headers["authorization"] == f"Basic {expected_auth}"
        assert request.headers["content-type"] == "application/x-www-form-urlencoded"
        assert parse_qsl(request.body.decode(), strict_parsing=True) == [
            ("To", "+79160000002"),
            ("From", "ACME"),
            ("Body", "Your code is 1234"),
            ("StatusCallback", CALLBACK),
        ]

    def test_without_a_callback_url_asks_for_no_callbacks(self) -> None:
        assert "StatusCallback" not in twilio.form_fields(outgoing(callback=""))

    def test_needs_an_account_sid(self) -> None:
        config = TwilioSettings(auth_token=Secret(AUTH))
        with pytest.raises(ConfigError):
            twilio.build_request(outgoing(), config=config, base_url="http://x", auth_token=AUTH)

    def test_refuses_other_content(self) -> None:
        wrong = msgspec.structs.replace(outgoing(), content=ViberContent(text="hi"))
        with pytest.raises(TypeError):
            twilio.form_fields(wrong)

    def test_a_messaging_service_replaces_from(self) -> None:
        service = "MG" + "a" * 32
        config = msgspec.structs.replace(CONFIG, messaging_service_sid=service)
        request = twilio.build_request(
            outgoing(), config=config, base_url="https://api.twilio.com", auth_token=AUTH
        )
        assert parse_qsl(request.body.decode(), strict_parsing=True) == [
            ("To", "+79160000002"),
            ("MessagingServiceSid", service),
            ("Body", "Your code is 1234"),
            ("StatusCallback", CALLBACK),
        ]


class TestParseResponse:
    """parse_response maps Twilio's answers to receipts or precise errors."""

    def test_created_returns_the_sid(self) -> None:
        response = HttpResponse(
            201, {}, msgspec.json.encode({"sid": "SM" + "a" * 32, "status": "queued"})
        )
        assert twilio.parse_response(response, provider="sms1") == SendReceipt("SM" + "a" * 32)

    @pytest.mark.parametrize("content", [b"", b"<html/>", b'{"status": "queued"}'])
    def test_unreadable_success_is_transient(self, content: bytes) -> None:
        with pytest.raises(ProviderUnavailable):
            twilio.parse_response(HttpResponse(201, {}, content), provider="sms1")

    @pytest.mark.parametrize(
        ("status", "code", "error"),
        [
            (400, 21211, InvalidRecipient),
            (400, 21614, InvalidRecipient),
            (400, 21610, InvalidRecipient),
            (400, 21408, InvalidRecipient),
            (400, 21612, InvalidRecipient),
            (401, 20003, AuthRejected),
            (400, 21606, InvalidRequest),
            (400, 21212, InvalidRequest),
            (400, 21602, InvalidRequest),
            (400, 21603, InvalidRequest),
            (400, 21604, InvalidRequest),
            (400, 21617, InvalidRequest),
            (400, 21701, InvalidRequest),
            (400, 21705, InvalidRequest),
            (400, 99999, InvalidRequest),
            (404, 20404, InvalidRequest),
            (403, 99999, AuthRejected),
            (500, 20500, ProviderUnavailable),
            (503, 20503, ProviderUnavailable),
        ],
    )
    def test_code_table(self, status: int, code: int, error: type[ProviderError]) -> None:
        with pytest.raises(ProviderError) as caught:
            twilio.parse_response(failure(status, code), provider="sms1")
        assert type(caught.value) is error
        assert (caught.value.code, caught.value.status_code, caught.value.provider) == (
            str(code),
            status,
            "sms1",
        )
        assert "+79160000002" not in str(caught.value)  # Twilio's message quotes the phone

    def test_429_is_rate_limited_with_retry_after(self) -> None:
        with pytest.raises(RateLimited) as caught:
            twilio.parse_response(failure(429, 20429, {"Retry-After": "3"}), provider="sms1")
        assert (caught.value.code, caught.value.retry_after_seconds) == ("20429", 3.0)

    def test_20429_is_rate_limited_whatever_the_status(self) -> None:
        with pytest.raises(RateLimited) as caught:
            twilio.parse_response(failure(400, 20429, {"Retry-After": "2"}), provider="sms1")
        assert caught.value.retry_after_seconds == 2.0

    @pytest.mark.parametrize(
        ("status", "error"),
        [
            (401, AuthRejected),
            (502, ProviderUnavailable),
            (429, RateLimited),
            (400, InvalidRequest),
        ],
    )
    def test_without_a_twilio_body_the_status_decides(
        self, status: int, error: type[ProviderError]
    ) -> None:
        with pytest.raises(error) as caught:
            twilio.parse_response(HttpResponse(status, {}, b"<html/>"), provider="sms1")
        assert caught.value.code is None


class TestSignature:
    """X-Twilio-Signature: base64 HMAC-SHA1 over the URL with its query + sorted params."""

    def test_twilio_documented_example(self) -> None:
        # twilio.com/docs/usage/webhooks/webhooks-security (helper-library samples)
        params = [
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+14158675310"),
            ("Digits", "1234"),
            ("From", "+14158675310"),
            ("To", "+18005551212"),
        ]
        url = "https://mycompany.com/myapp.php?foo=1&bar=2"
        assert twilio.signature(url, params, "12345") == "GvWf1cFY/Q7PnoempGyD5oXAezc="

    def test_our_callback_url_and_unsorted_params(self) -> None:
        params = [("To", "+7916"), ("MessageStatus", "delivered"), ("AccountSid", SID)]
        signed = f"{CALLBACK}AccountSid{SID}MessageStatusdeliveredTo+7916"
        expected = base64.b64encode(
            hmac.new(AUTH.encode(), signed.encode(), hashlib.sha1).digest()
        ).decode()
        assert twilio.signature(CALLBACK, params, AUTH) == expected

    def test_repeated_names_sort_by_value(self) -> None:
        params = [("b", "2"), ("a", "z"), ("a", "y")]
        assert twilio.signature("u", params, AUTH) == reference_signature("u", params, AUTH)

    def test_an_identical_repeated_pair_is_signed_once(self) -> None:
        once = twilio.signature("u", [("a", "1"), ("b", "2")], AUTH)
        assert once == twilio.signature("u", [("a", "1"), ("b", "2"), ("a", "1")], AUTH)
        assert once != twilio.signature("u", [("a", "1"), ("b", "2"), ("a", "0")], AUTH)

    def test_hmac_sha256(self) -> None:
        params = status_form("delivered")
        assert reference_signature(CALLBACK, params, SHARED_KEY, "sha256") == twilio.signature(
            CALLBACK, params, SHARED_KEY, algorithm="HMAC_SHA256"
        )
        with pytest.raises(ValueError, match="HMAC_MD5"):
            twilio.signature(CALLBACK, params, SHARED_KEY, algorithm="HMAC_MD5")

    @pytest.mark.parametrize(
        ("settings", "algorithm"),
        [
            (None, "HMAC_SHA1"),
            ("", "HMAC_SHA1"),
            ("key=webhooks_sharedkey_01abc", "HMAC_SHA1"),
            ("key=webhooks_sharedkey_01abc,algorithm=HMAC_SHA256", "HMAC_SHA256"),
            (" algorithm = HMAC_SHA256 , key=k", "HMAC_SHA256"),
            ("algorithm=", "HMAC_SHA1"),
        ],
    )
    def test_the_settings_header_names_the_algorithm(
        self, settings: str | None, algorithm: str
    ) -> None:
        assert algorithm == twilio.signature_algorithm(settings)


class TestVerifyWebhook:
    """verify_webhook accepts only callbacks Twilio signed for exactly this URL and body."""

    def verify(self, body: bytes, headers: dict[str, str], *, url: str = CALLBACK) -> None:
        twilio.verify_webhook(url=url, headers=headers, body=body, config=CONFIG, now=NOW)

    def signed(self, params: list[tuple[str, str]], *, url: str = CALLBACK) -> dict[str, str]:
        return {"X-Twilio-Signature": reference_signature(url, params, AUTH)}

    @pytest.mark.parametrize("header", ["X-Twilio-Signature", "x-twilio-signature"])
    def test_genuine_passes(self, header: str) -> None:
        params = status_form("delivered")
        self.verify(
            urlencode(params).encode(), {header: reference_signature(CALLBACK, params, AUTH)}
        )

    def test_no_timestamp_means_no_staleness(self) -> None:
        params = status_form("delivered")
        body = urlencode(params).encode()
        twilio.verify_webhook(
            url=CALLBACK, headers=self.signed(params), body=body, config=CONFIG, now=0.0
        )

    def test_tampered_body(self) -> None:
        params = status_form("delivered")
        body = urlencode(status_form("undelivered", ErrorCode="30003")).encode()
        with pytest.raises(WebhookRejected) as caught:
            self.verify(body, self.signed(params))
        assert caught.value.verdict == "bad_signature"

    def test_other_message_key_in_the_url(self) -> None:
        params = status_form("delivered")
        with pytest.raises(WebhookRejected) as caught:
            self.verify(
                urlencode(params).encode(),
                self.signed(params),
                url=CALLBACK.replace("msg-1", "msg-2"),
            )
        assert caught.value.verdict == "bad_signature"

    def test_wrong_token(self) -> None:
        params = status_form("delivered")
        headers = {"X-Twilio-Signature": reference_signature(CALLBACK, params, "0" * 32)}
        with pytest.raises(WebhookRejected) as caught:
            self.verify(urlencode(params).encode(), headers)
        assert caught.value.verdict == "bad_signature"

    def test_missing_header(self) -> None:
        with pytest.raises(WebhookRejected) as caught:
            self.verify(urlencode(status_form("delivered")).encode(), {})
        assert caught.value.verdict == "bad_signature"

    def test_without_a_token_nothing_verifies(self) -> None:
        params = status_form("delivered")
        with pytest.raises(WebhookRejected) as caught:
            twilio.verify_webhook(
                url=CALLBACK,
                headers=self.signed(params),
                body=urlencode(params).encode(),
                config=TwilioSettings(account_sid=SID),
                now=NOW,
            )
        assert caught.value.verdict == "bad_signature"

    @pytest.mark.parametrize("body", [b"\xff\xfe", b"garbage", b"a=1&&b"])
    def test_garbage_is_malformed(self, body: bytes) -> None:
        with pytest.raises(WebhookRejected) as caught:
            self.verify(body, {"X-Twilio-Signature": "x"})
        assert caught.value.verdict == "malformed"

    @pytest.mark.parametrize(
        ("signed_url", "given_url"),
        [
            ("https://gw.example:443/webhooks/sms1?m=k", "https://gw.example/webhooks/sms1?m=k"),
            ("https://gw.example/webhooks/sms1?m=k", "https://gw.example:443/webhooks/sms1?m=k"),
            ("http://gw.example/webhooks/sms1?m=k", "http://gw.example:80/webhooks/sms1?m=k"),
            ("https://[::1]:443/webhooks/sms1", "https://[::1]/webhooks/sms1"),
            ("https://GW.example/webhooks/sms1", "https://GW.example:443/webhooks/sms1"),
            # twilio-python also accepts the URL without its port, whatever the port
            ("https://gw.example/webhooks/sms1", "https://gw.example:8443/webhooks/sms1"),
        ],
    )
    def test_port_either_way(self, signed_url: str, given_url: str) -> None:
        params = status_form("delivered")
        self.verify(urlencode(params).encode(), self.signed(params, url=signed_url), url=given_url)

    @pytest.mark.parametrize(
        ("signed_url", "given_url"),
        [
            ("https://gw.example:8443/webhooks/sms1", "https://gw.example/webhooks/sms1"),
            ("https://gw.example:80/webhooks/sms1", "https://gw.example/webhooks/sms1"),
            ("https://gw.example/webhooks/sms1", "https://gw.example:bad/webhooks/sms1"),
            ("https://gw.example/webhooks/sms1", "ftp://gw.example/webhooks/sms1"),
            ("https://gw.example/webhooks/sms1", "https://u:p@gw.example/webhooks/sms1"),
        ],
    )
    def test_other_urls_do_not_verify(self, signed_url: str, given_url: str) -> None:
        params = status_form("delivered")
        with pytest.raises(WebhookRejected) as caught:
            self.verify(
                urlencode(params).encode(), self.signed(params, url=signed_url), url=given_url
            )
        assert caught.value.verdict == "bad_signature"


SETTINGS: Final = MappingProxyType(
    {"X-Twilio-Webhooks-Signature-Settings": "key=webhooks_sharedkey_01,algorithm=HMAC_SHA256"}
)


class TestSharedKeySignatures:
    """Webhooks a Twilio Webhooks rule matches are signed with its SharedKey, HMAC-SHA256."""

    def verify(
        self,
        headers: dict[str, str],
        params: list[tuple[str, str]],
        config: TwilioSettings = CONFIG,
    ) -> None:
        body = urlencode(params).encode()
        twilio.verify_webhook(url=CALLBACK, headers=headers, body=body, config=config, now=NOW)

    def test_signed_with_the_shared_key_passes(self) -> None:
        params = status_form("delivered")
        signature = reference_signature(CALLBACK, params, SHARED_KEY, "sha256")
        self.verify({**SETTINGS, "X-Twilio-Signature": signature}, params)

    def test_the_settings_header_may_name_sha1(self) -> None:
        params = status_form("delivered")
        signature = reference_signature(CALLBACK, params, SHARED_KEY)
        settings = {"x-twilio-webhooks-signature-settings": "key=k,algorithm=HMAC_SHA1"}
        self.verify({**settings, "X-Twilio-Signature": signature}, params)

    @pytest.mark.parametrize(
        ("key", "digest", "settings"),
        [
            (AUTH, "sha256", True),  # the auth token does not sign SharedKey webhooks
            (SHARED_KEY, "sha1", True),  # the header says SHA-256
            (SHARED_KEY, "sha256", False),  # without the header, the auth token and SHA-1
        ],
    )
    def test_anything_else_does_not_verify(self, key: str, digest: str, settings: bool) -> None:
        params = status_form("delivered")
        headers = {"X-Twilio-Signature": reference_signature(CALLBACK, params, key, digest)}
        if settings:
            headers.update(SETTINGS)
        with pytest.raises(WebhookRejected) as caught:
            self.verify(headers, params)
        assert "bad_signature" == caught.value.verdict

    def test_an_unknown_algorithm_does_not_verify(self) -> None:
        params = status_form("delivered")
        headers = {
            "X-Twilio-Signature": reference_signature(CALLBACK, params, SHARED_KEY, "sha512"),
            "X-Twilio-Webhooks-Signature-Settings": "key=k,algorithm=HMAC_SHA512",
        }
        with pytest.raises(WebhookRejected, match="HMAC_SHA512") as caught:
            self.verify(headers, params)
        assert "bad_signature" == caught.value.verdict

    def test_without_a_shared_key_configured_nothing_signed_with_one_verifies(self) -> None:
        params = status_form("delivered")
        signature = reference_signature(CALLBACK, params, SHARED_KEY, "sha256")
        config = msgspec.structs.replace(CONFIG, webhook_shared_key=None)
        with pytest.raises(WebhookRejected, match="webhook_shared_key") as caught:
            self.verify({**SETTINGS, "X-Twilio-Signature": signature}, params, config)
        assert "bad_signature" == caught.value.verdict


class TestJsonBodies:
    """A JSON webhook is signed over the URL alone; its body's SHA-256 is in ``bodySHA256``."""

    BODY = b'{"MessageSid": "SM1", "MessageStatus": "delivered"}'

    def url(self, body: bytes = BODY) -> str:
        return f"{INBOUND_URL}?bodySHA256={hashlib.sha256(body).hexdigest()}"

    def test_genuine_passes(self) -> None:
        headers = {"X-Twilio-Signature": reference_signature(self.url(), [], AUTH)}
        twilio.verify_webhook(
            url=self.url(), headers=headers, body=self.BODY, config=CONFIG, now=NOW
        )

    def test_another_body_does_not_verify(self) -> None:
        headers = {"X-Twilio-Signature": reference_signature(self.url(), [], AUTH)}
        with pytest.raises(WebhookRejected) as caught:
            twilio.verify_webhook(
                url=self.url(), headers=headers, body=self.BODY + b" ", config=CONFIG, now=NOW
            )
        assert "bad_signature" == caught.value.verdict


class TestParseWebhook:
    """parse_webhook maps MessageStatus to receipts keyed by the URL's message key."""

    def parse(self, params: list[tuple[str, str]], url: str = CALLBACK) -> list[ProviderReceipt]:
        return twilio.parse_webhook(url=url, headers={}, body=urlencode(params).encode())

    def test_delivered(self) -> None:
        assert self.parse(status_form("delivered")) == [
            ProviderReceipt(
                ReceiptKind.DELIVERED,
                0.0,
                message_key="acme/msg-1",
                provider_message_id="SM" + "1" * 32,
                event_id="SM" + "1" * 32 + ":delivered",
            )
        ]

    def test_the_event_id_is_the_sid_and_the_status(self) -> None:
        (failed,) = self.parse(status_form("failed", ErrorCode="30005"))
        (legacy,) = self.parse([("SmsSid", "SM9"), ("SmsStatus", "read")])
        assert ["SM" + "1" * 32 + ":failed", "SM9:read"] == [failed.event_id, legacy.event_id]

    @pytest.mark.parametrize("status", ["undelivered", "failed"])
    def test_failures_carry_the_error_code(self, status: str) -> None:
        (receipt,) = self.parse(status_form(status, ErrorCode="30003"))
        assert (receipt.kind, receipt.detail, receipt.message_key) == (
            ReceiptKind.FAILED,
            "30003",
            "acme/msg-1",
        )

    def test_read(self) -> None:
        (receipt,) = self.parse(status_form("read"))
        assert (receipt.kind, receipt.detail) == (ReceiptKind.READ, None)

    @pytest.mark.parametrize("status", ["queued", "accepted", "sending", "sent", "scheduled"])
    def test_progress_is_no_receipt(self, status: str) -> None:
        assert self.parse(status_form(status)) == []

    def test_without_a_key_the_sid_remains(self) -> None:
        (receipt,) = self.parse(status_form("delivered"), url="https://gw.example/webhooks/sms1")
        assert (receipt.message_key, receipt.provider_message_id) == (None, "SM" + "1" * 32)

    def test_legacy_sms_fields(self) -> None:
        (receipt,) = self.parse([("SmsSid", "SM9"), ("SmsStatus", "delivered")])
        assert (receipt.kind, receipt.provider_message_id) == (ReceiptKind.DELIVERED, "SM9")

    @pytest.mark.parametrize(
        "body", [b"MessageSid=SM1", b"", b"\xff", b"SmsStatus=received&Body=STOP&MessageSid=SM1"]
    )
    def test_malformed(self, body: bytes) -> None:
        with pytest.raises(WebhookRejected) as caught:
            twilio.parse_webhook(url=CALLBACK, headers={}, body=body)
        assert caught.value.verdict == "malformed"


class TestInboundStop:
    """An inbound STOP (the same webhook endpoint as status callbacks) is the sender's opt-out."""

    def parse(self, params: list[tuple[str, str]]) -> list[ProviderReceipt]:
        return twilio.parse_webhook(url=INBOUND_URL, headers={}, body=urlencode(params).encode())

    @pytest.mark.parametrize(
        "body",
        [
            "STOP",
            "stop",
            "  Stop \n",
            "STOPALL",
            "UNSUBSCRIBE",
            "cancel",
            "End",
            "QUIT",
            "OPTOUT",
            "revoke",
        ],
    )
    def test_the_default_keywords(self, body: str) -> None:
        assert [
            ProviderReceipt(
                ReceiptKind.UNSUBSCRIBED,
                0.0,
                detail="+79161234567",
                event_id="SM" + "7" * 32 + ":received",
            )
        ] == self.parse(inbound_form(body))

    @pytest.mark.parametrize(
        "body", ["STOP please", "please stop", "STOP ALL", "START", "UNSTOP", "HELP", "Hi!", ""]
    )
    def test_anything_else_is_no_receipt(self, body: str) -> None:
        assert [] == self.parse(inbound_form(body))

    @pytest.mark.parametrize(
        ("opt_out_type", "body", "opted_out"),
        [
            ("STOP", "STOP", True),
            ("STOP", "BASTA", True),  # a custom Advanced Opt-Out keyword
            ("START", "START", False),
            ("HELP", "HELP", False),
            ("START", "STOP", False),  # Twilio's classification wins over the body
        ],
    )
    def test_advanced_opt_out_decides_when_present(
        self, opt_out_type: str, body: str, opted_out: bool
    ) -> None:
        receipts = self.parse(inbound_form(body, OptOutType=opt_out_type))
        assert opted_out == ([ReceiptKind.UNSUBSCRIBED] == [r.kind for r in receipts]), receipts

    def test_an_inbound_stop_without_message_status_is_still_found(self) -> None:
        params = [p for p in inbound_form("STOP") if p[0] not in ("SmsStatus",)]
        params.append(("MessageStatus", "received"))
        (receipt,) = self.parse(params)
        assert ("+79161234567", None, None) == (
            receipt.detail,
            receipt.message_key,
            receipt.provider_message_id,
        )

    def test_signed_by_twilio_it_verifies_at_the_same_endpoint(self) -> None:
        params = inbound_form("STOP")
        headers = {"X-Twilio-Signature": reference_signature(INBOUND_URL, params, AUTH)}
        body = urlencode(params).encode()
        twilio.verify_webhook(url=INBOUND_URL, headers=headers, body=body, config=CONFIG, now=NOW)
        (receipt,) = twilio.parse_webhook(url=INBOUND_URL, headers=headers, body=body)
        assert ReceiptKind.UNSUBSCRIBED is receipt.kind


class TestAdapterConstruction:
    @pytest.mark.parametrize(
        "config",
        [
            TwilioSettings(account_sid=SID),
            TwilioSettings(auth_token=Secret(AUTH)),
        ],
    )
    def test_needs_credentials(self, config: TwilioSettings) -> None:
        with pytest.raises(ConfigError):
            twilio.TwilioAdapter("sms1", config, make_client(timeout_seconds=5))

    async def test_defaults_to_twilio_and_closes_nothing(self) -> None:
        async with make_client(timeout_seconds=5) as client:
            adapter = twilio.TwilioAdapter("sms1", CONFIG, client)
            assert (adapter.name, adapter.channel, twilio.KIND, twilio.CHANNEL) == (
                "sms1",
                Channel.SMS,
                "twilio",
                Channel.SMS,
            )
            assert adapter._base_url == "https://api.twilio.com"
            await adapter.aclose()
            assert not client.is_closed


# ---------------------------------------------------------------- against the simulator
@dataclass
class Rig:
    sim: TwilioSimulator
    gateway: FakeGateway
    config: TwilioSettings
    adapter: twilio.TwilioAdapter
    outbound: Outbound

    async def settled(self) -> list[Hit]:
        """The hits not taken yet, once everything sent so far has been called back.

        Proven rather than waited for (tests/adapters/settling.py): a marker message (no
        status callbacks) whose recipient taps a link after every callback scheduled so far
        falls due, then every post and tap the simulator started. The marker's tap is left out.
        """
        behaviour = self.sim.behaviour
        self.sim.behaviour = marker_behaviour(behaviour)
        try:
            await self.adapter.send(
                outgoing(
                    phone="+79169990001",  # 0001: delivered, then the link is tapped
                    text=f"Marker {self.gateway.url}/t/c/marker",
                    callback="",
                )
            )
        finally:
            self.sim.behaviour = behaviour
        with trio.fail_after(10):
            hits = await self.gateway.until(
                lambda hit: hit.kind == "click" and hit.url.endswith("/t/c/marker")
            )
            await self.outbound.drained()
        return hits[:-1] + self.gateway.received()

    def callback_url(self, key: str = "acme/msg-1") -> str:
        return f"{self.gateway.url}/webhooks/sms1?m={key.replace('/', '%2F')}"

    def inbound_url(self) -> str:
        return f"{self.gateway.url}/webhooks/sms1"

    def verified(self, hit: Hit, *, url: str | None = None) -> list[ProviderReceipt]:
        """Verify against the URL the gateway handed to Twilio, as the webhook route will."""
        url = url or hit.url
        twilio.verify_webhook(
            url=url, headers=hit.headers, body=hit.body, config=self.config, now=0
        )
        return twilio.parse_webhook(url=url, headers=hit.headers, body=hit.body)


@asynccontextmanager
async def rig(behaviour: SimulatorConfig = FAST) -> AsyncIterator[Rig]:
    sim = TwilioSimulator(name="sms1", behaviour=behaviour, seed=11)
    outbound = Outbound(sim)
    gateway = FakeGateway()
    async with trio.open_nursery() as nursery:
        await nursery.start(sim.serve)
        await nursery.start(gateway.serve)
        provider = msgspec.structs.replace(TwilioSettings(), **sim.credentials())
        async with make_client(timeout_seconds=5) as client:
            adapter = twilio.TwilioAdapter("sms1", provider, client)
            yield Rig(sim, gateway, provider, adapter, outbound)
        nursery.cancel_scope.cancel()


class TestAgainstSimulator:
    """The adapter and the simulator speak the same Messages API over real HTTP."""

    async def test_send_returns_the_sid(self) -> None:
        async with rig() as r:
            receipt = await r.adapter.send(outgoing(callback=""))
            assert receipt.provider_message_id is not None
            assert receipt.provider_message_id.startswith("SM")
            assert len(receipt.provider_message_id) == 34
            (recorded,) = r.sim.requests
            assert recorded.path == f"/2010-04-01/Accounts/{r.sim.account_sid}/Messages.json"
            assert parse_qs(recorded.body.decode())["To"] == ["+79160000002"]

    @pytest.mark.parametrize(
        ("phone", "error", "code", "status_code"),
        [
            ("+79160000004", InvalidRecipient, "21211", 400),
            ("+79160000005", ProviderUnavailable, "20503", 503),
        ],
    )
    async def test_tagged_failures(
        self, phone: str, error: type[ProviderError], code: str, status_code: int
    ) -> None:
        async with rig() as r:
            with pytest.raises(error) as caught:
                await r.adapter.send(outgoing(phone=phone))
            assert (caught.value.code, caught.value.status_code) == (code, status_code)

    async def test_throttle_is_429_with_retry_after_then_accepted(self) -> None:
        async with rig() as r:
            with pytest.raises(RateLimited) as caught:
                await r.adapter.send(outgoing(phone="+79160000006", callback=""))
            assert (caught.value.code, caught.value.retry_after_seconds) == ("20429", 1.0)
            await r.adapter.send(outgoing(phone="+79160000006", callback=""))

    async def test_scripted_answer_goes_out_exactly(self) -> None:
        async with rig() as r:
            r.sim.script.append(Scripted(status=400, body={"code": 21408, "status": 400}))
            with pytest.raises(InvalidRecipient) as caught:
                await r.adapter.send(outgoing())
            assert caught.value.code == "21408"

    async def test_opted_out_recipient(self) -> None:
        async with rig() as r:
            r.sim.opted_out.add("+79160000002")
            with pytest.raises(InvalidRecipient) as caught:
                await r.adapter.send(outgoing())
            assert caught.value.code == "21610"

    @pytest.mark.parametrize(
        "change",
        [
            {"auth_token": Secret("0" * 32)},
            {"account_sid": "AC" + "9" * 32},
        ],
    )
    async def test_wrong_credentials_are_auth_rejected(self, change: dict[str, object]) -> None:
        async with rig() as r, make_client(timeout_seconds=5) as client:
            adapter = twilio.TwilioAdapter(
                "sms1", msgspec.structs.replace(r.config, **change), client
            )
            with pytest.raises(AuthRejected) as caught:
                await adapter.send(outgoing())
            assert (caught.value.code, caught.value.status_code) == ("20003", 401)

    async def test_a_messaging_service_sends_from_its_own_number(self) -> None:
        async with rig() as r, make_client(timeout_seconds=5) as client:
            service = "MG" + "0123456789abcdef" * 2
            config = msgspec.structs.replace(r.config, messaging_service_sid=service)
            await twilio.TwilioAdapter("sms1", config, client).send(outgoing(callback=""))
            (recorded,) = r.sim.requests
            form = parse_qs(recorded.body.decode())
            assert ([service], None) == (form["MessagingServiceSid"], form.get("From"))

    async def test_invalid_sender_is_invalid_request(self) -> None:
        async with rig() as r:
            with pytest.raises(InvalidRequest) as caught:
                await r.adapter.send(outgoing(sms_from="Far Too Long Sender"))
            assert caught.value.code == "21212"

    @pytest.mark.parametrize(
        ("fields", "code"),
        [
            ({"From": "ACME", "Body": "hi"}, 21604),
            ({"To": "89160000002", "From": "ACME", "Body": "hi"}, 21211),
            ({"To": "+79160000002", "Body": "hi"}, 21603),
            ({"To": "+79160000002", "From": "1234", "Body": "hi"}, 21212),
            ({"To": "+79160000002", "From": "+15005550006"}, 21602),
            ({"To": "+79160000002", "From": "ACME", "Body": "x" * 1601}, 21617),
            ({"To": "+79160000002", "From": "ACME", "Body": "hi", "StatusCallback": "gw"}, 21609),
            ({"To": "+79160000002", "MessagingServiceSid": "MG12", "Body": "hi"}, 21705),
        ],
    )
    async def test_request_validation(self, fields: dict[str, str], code: int) -> None:
        async with rig() as r, httpx.AsyncClient() as client:
            response = await client.post(
                f"{r.sim.url}/2010-04-01/Accounts/{r.sim.account_sid}/Messages.json",
                data=fields,
                auth=(r.sim.account_sid, r.sim.auth_token),
            )
            assert (response.status_code, response.json()["code"]) == (400, code)

    @pytest.mark.parametrize(
        "authorization",
        [None, "Bearer x", "Basic !!!", "Basic " + base64.b64encode(b"\xff").decode()],
    )
    async def test_garbled_auth_is_20003(self, authorization: str | None) -> None:
        async with rig() as r, httpx.AsyncClient() as client:
            headers = {} if authorization is None else {"Authorization": authorization}
            response = await client.post(
                f"{r.sim.url}/2010-04-01/Accounts/{r.sim.account_sid}/Messages.json",
                data={"To": "+79160000002", "From": "ACME", "Body": "hi"},
                headers=headers,
            )
            assert (response.status_code, response.json()["code"]) == (401, 20003)


class TestCallbacksFromSimulator:
    """Status callbacks arrive signed so that verify_webhook accepts them for our URL."""

    async def test_sent_then_delivered_with_the_message_key(self) -> None:
        async with rig() as r:
            url = r.callback_url()
            receipt = await r.adapter.send(outgoing(phone="+79160000002", callback=url))
            hits = await r.gateway.hits(2)
            assert {hit.url for hit in hits} == {url}
            statuses = sorted(parse_qs(hit.body.decode())["MessageStatus"][0] for hit in hits)
            assert statuses == ["delivered", "sent"]
            receipts = [x for hit in hits for x in r.verified(hit, url=url)]
            assert receipts == [
                ProviderReceipt(
                    ReceiptKind.DELIVERED,
                    0.0,
                    message_key="acme/msg-1",
                    provider_message_id=receipt.provider_message_id,
                    event_id=f"{receipt.provider_message_id}:delivered",
                )
            ]
            assert [] == await r.settled()

    async def test_bounce_is_undelivered_with_a_carrier_code(self) -> None:
        async with rig() as r:
            url = r.callback_url()
            await r.adapter.send(outgoing(phone="+79160000003", callback=url))
            receipts = [x for hit in await r.gateway.hits(2) for x in r.verified(hit, url=url)]
            (failed,) = receipts
            assert failed.kind is ReceiptKind.FAILED
            assert failed.detail in {"30003", "30005"}

    async def test_click_fate_opens_the_tracked_link(self) -> None:
        async with rig() as r:
            url = r.callback_url()
            text = f"Sale! {r.gateway.url}/t/c/abc.def STOP: reply STOP"
            await r.adapter.send(outgoing(phone="+79160000001", text=text, callback=url))
            hits = await r.gateway.hits(3)
            assert sorted(hit.kind for hit in hits) == ["click", "webhook", "webhook"]
            (click,) = [hit for hit in hits if hit.kind == "click"]
            assert click.url == f"{r.gateway.url}/t/c/abc.def"
            with trio.fail_after(5):
                await r.outbound.drained()  # the tap has had the redirect
            assert r.sim.clicks == [302]
            assert [] == await r.settled()

    async def test_a_forged_callback_url_does_not_verify(self) -> None:
        async with rig() as r:
            await r.adapter.send(outgoing(callback=r.callback_url("acme/msg-1")))
            (hit, *_) = await r.gateway.hits(2)
            with pytest.raises(WebhookRejected):
                r.verified(hit, url=r.callback_url("acme/msg-2"))

    async def test_an_unsubscribe_is_an_inbound_stop_then_21610(self) -> None:
        behaviour = msgspec.structs.replace(
            FAST,
            deliver_probability=1.0,
            read_probability=0.0,
            unsubscribe_probability=1.0,
            bounce_probability=0.0,
        )
        async with rig(behaviour) as r:
            r.sim.webhook_url = r.inbound_url()
            await r.adapter.send(
                outgoing(phone="+79161234567", callback="", sms_from="+15551230000")
            )
            (hit,) = await r.gateway.hits(1)
            (stop,) = r.verified(hit)
            assert (ReceiptKind.UNSUBSCRIBED, "+79161234567") == (stop.kind, stop.detail)
            assert "+15551230000" == parse_qs(hit.body.decode())["To"][0]  # a reply to our number
            with pytest.raises(InvalidRecipient) as caught:
                await r.adapter.send(outgoing(phone="+79161234567", callback=""))
            assert caught.value.code == "21610"

    async def test_0007_phones_text_stop_after_delivery(self) -> None:
        async with rig() as r:
            r.sim.webhook_url = r.inbound_url()
            url = r.callback_url()
            await r.adapter.send(outgoing(phone="+79160000007", callback=url))
            hits = await r.gateway.hits(3)
            inbound = [h for h in hits if "SmsStatus=received" in h.body.decode()]
            status = [h for h in hits if h not in inbound]
            receipts = [x for hit in status for x in r.verified(hit, url=url)]
            receipts += [x for hit in inbound for x in r.verified(hit, url=r.inbound_url())]
            assert sorted([ReceiptKind.DELIVERED, ReceiptKind.UNSUBSCRIBED]) == sorted(
                x.kind for x in receipts
            )
            (stop,) = [x for x in receipts if x.kind is ReceiptKind.UNSUBSCRIBED]
            assert ("+79160000007", None) == (stop.detail, stop.message_key)
            (stop_hit,) = inbound
            assert stop_hit.url == r.inbound_url()  # the messaging webhook, not StatusCallback
            assert [] == await r.settled()

    async def test_inbound_on_demand(self) -> None:
        async with rig() as r, httpx.AsyncClient() as http:
            r.sim.webhook_url = r.inbound_url()
            answer = await http.post(
                f"{r.sim.url}/_sim/inbound", json={"from": "+79165550101", "body": "Stop"}
            )
            assert {"status": 200} == answer.json()
            (hit,) = await r.gateway.hits(1)
            (stop,) = r.verified(hit)
            assert (ReceiptKind.UNSUBSCRIBED, "+79165550101") == (stop.kind, stop.detail)
            assert "+79165550101" in r.sim.opted_out
            # Advanced Opt-Out's classification rides along when asked for
            await http.post(
                f"{r.sim.url}/_sim/inbound",
                json={"from": "+79165550101", "body": "START", "opt_out_type": "START"},
            )
            (start,) = await r.gateway.hits(1)
            assert ["START"] == parse_qs(start.body.decode())["OptOutType"]
            assert [] == r.verified(start)
            assert "+79165550101" not in r.sim.opted_out
            refused = await http.post(f"{r.sim.url}/_sim/inbound", json={"body": "STOP"})
            assert 400 == refused.status_code

    async def test_a_replayed_stop_is_the_same_event(self) -> None:
        async with rig() as r, httpx.AsyncClient() as http:
            r.sim.webhook_url = r.inbound_url()
            assert 200 == await r.sim.inbound("+79165550101", "STOP")
            answer = await http.post(f"{r.sim.url}/_sim/replay", json={"times": 2})
            assert {"statuses": [200, 200]} == answer.json()
            first, *retries = await r.gateway.hits(3)
        receipts = [r.verified(hit) for hit in (first, *retries)]
        assert all(hit.body == first.body for hit in retries)
        assert [1, 1, 1] == [len(batch) for batch in receipts]
        (event_id,) = {x.event_id for batch in receipts for x in batch}
        sid = parse_qs(first.body.decode())["MessageSid"][0]
        assert f"{sid}:received" == event_id

    async def test_no_callback_url_no_callbacks(self) -> None:
        async with rig() as r:
            await r.adapter.send(outgoing(callback=""))
            await r.adapter.send(outgoing(phone="+79160000003", callback=""))  # a bounce
            assert [] == await r.settled()
            assert r.sim.webhook_statuses == []
