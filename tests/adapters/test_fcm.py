"""FCM HTTP v1: request shaping, error mapping, the JWT grant and token cache, and the simulator."""

# the keys and tokens here are generated fakes
# ruff: noqa: S106, S107

from __future__ import annotations

import email.utils
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import hypercorn.config
import hypercorn.trio
import msgpack
import msgspec
import pytest
import trio
import trio.testing
import zmq
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from adapters import Outgoing, WebhookRejected
from adapters._http import make_client
from adapters._transport import HttpRequest, HttpResponse
from adapters.fcm import (
    CHANNEL,
    JWT_BEARER_GRANT,
    KIND,
    SCOPE,
    AccessToken,
    FcmAdapter,
    FcmSettings,
    ServiceAccount,
    build_request,
    build_token_request,
    decode_jwt,
    encode_jwt,
    load_private_key,
    load_service_account,
    parse_google_error,
    parse_response,
    parse_token_response,
    parse_webhook,
    project_id,
    verify_webhook,
)
from adapters.simulators._base import Scripted
from adapters.simulators.fcm import FcmSimulator, default_error, google_error
from gateway.clock import wall_time
from gateway.config import Secret, SenderConfig, SimulatorConfig
from gateway.core.errors import (
    AuthRejected,
    ConfigError,
    InvalidRecipient,
    InvalidRequest,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
)
from gateway.core.model import Category, Channel
from gateway.protocol import EmailContent, PushContent, reserved_data_keys
from gateway.runtime import zmqio
from tests.adapters.local_http import Call, local_server
from tests.adapters.settling import Outbound, marker_behaviour

NOW = 1_795_435_200.0
FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"
FAST = SimulatorConfig(latency_seconds=0, receipt_delay_seconds=0.01, read_delay_seconds=0.02)

_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def account_json(
    key: rsa.RSAPrivateKey = _KEY,
    *,
    token_uri: str = "https://oauth2.example/token",
    project: str = "acme-app",
    **overrides: str,
) -> str:
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode()
    document = {
        "type": "service_account",
        "project_id": project,
        "private_key_id": "kid-1",
        "private_key": pem,
        "client_email": "gw@acme-app.iam.gserviceaccount.com",
        "token_uri": token_uri,
        **overrides,
    }
    return msgspec.json.encode(document).decode()


def fcm_config(**fields: Any) -> FcmSettings:
    fields.setdefault("service_account_json", Secret(account_json()))
    return FcmSettings(**fields)


def push(
    address: str = "tok-read-1",
    *,
    key: str = "acme:m1",
    category: Category = Category.PROMO,
    link_url: str | None = "https://gw.example/t/c/abc",
    data: dict[str, str] | None = None,
) -> Outgoing:
    return Outgoing(
        message_key=key,
        tenant=key.partition(":")[0],
        channel=Channel.PUSH,
        category=category,
        address=address,
        content=PushContent(title="Sale", body="Up to 50% off", data=data or {}),
        brand="Acme",
        sender=SenderConfig(),
        status_callback_url="https://gw.example/webhooks/push1",
        link_url=link_url,
    )


def response(
    status: int, body: object = None, headers: dict[str, str] | None = None
) -> HttpResponse:
    content = (
        b"" if body is None else body if isinstance(body, bytes) else msgspec.json.encode(body)
    )
    return HttpResponse(status, headers or {}, content)


async def fetch(request: HttpRequest) -> HttpResponse:
    """Send one request the adapters' way."""
    async with make_client(timeout_seconds=5.0) as client:
        return await client.send(request)


def google(
    code: int,
    status: str,
    fcm_code: str | None = None,
    *,
    field: str | None = None,
    message: str = "Request contains an invalid argument.",
) -> dict[str, Any]:
    details: list[dict[str, Any]] = []
    if fcm_code:
        details.append({"@type": FCM_ERROR, "errorCode": fcm_code})
    if field:
        details.append({"@type": BAD_REQUEST, "fieldViolations": [{"field": field}]})
    return {"error": {"code": code, "message": message, "status": status, "details": details}}


class TestModule:
    """The registry's view of the module."""

    def test_kind_and_channel(self) -> None:
        assert ("fcm", Channel.PUSH) == (KIND, CHANNEL)


class TestBuildRequest:
    """One messages:send request per push, shaped exactly as FCM HTTP v1 expects."""

    def test_shape(self) -> None:
        request = build_request(
            push(data={"screen": "sale"}),
            config=fcm_config(),
            base_url="https://fcm.googleapis.com/",
            access_token="ya29.tok",
        )
        assert "POST" == request.method
        assert "https://fcm.googleapis.com/v1/projects/acme-app/messages:send" == str(request.url)
        assert "Bearer ya29.tok" == request.headers["authorization"]
        assert "application/json" == request.headers["content-type"]
        assert {
            "message": {
                "token": "tok-read-1",
                "notification": {"title": "Sale", "body": "Up to 50% off"},
                "data": {
                    "screen": "sale",
                    "cgw_key": "acme:m1",
                    "link": "https://gw.example/t/c/abc",
                },
                "android": {"priority": "NORMAL"},
            }
        } == msgspec.json.decode(request.body)

    def test_no_link_no_link_key_and_service_is_high_priority(self) -> None:
        request = build_request(
            push(link_url=None, category=Category.SERVICE),
            config=fcm_config(),
            base_url="https://fcm.googleapis.com",
            access_token="t",
        )
        message = msgspec.json.decode(request.body)["message"]
        assert {"cgw_key": "acme:m1"} == message["data"]
        assert {"priority": "HIGH"} == message["android"]

    def test_our_data_keys_win(self) -> None:
        request = build_request(
            push(data={"cgw_key": "forged", "link": "https://evil.example"}),
            config=fcm_config(),
            base_url="https://fcm.googleapis.com",
            access_token="t",
        )
        data = msgspec.json.decode(request.body)["message"]["data"]
        assert {"cgw_key": "acme:m1", "link": "https://gw.example/t/c/abc"} == data

    def test_configured_project_overrides_the_account(self) -> None:
        request = build_request(
            push(),
            config=fcm_config(project_id="other"),
            base_url="http://sim:1",
            access_token="t",
        )
        assert "http://sim:1/v1/projects/other/messages:send" == str(request.url)

    def test_refuses_other_content(self) -> None:
        email = msgspec.structs.replace(push(), content=EmailContent(subject="s", text="t"))
        with pytest.raises(TypeError):
            build_request(email, config=fcm_config(), base_url="http://x", access_token="t")

    def test_refuses_reserved_data_keys(self) -> None:
        with pytest.raises(InvalidRequest, match="message_type"):
            build_request(
                push(data={"message_type": "x", "screen": "sale"}),
                config=fcm_config(),
                base_url="http://x",
                access_token="t",
            )


class TestReservedDataKeys:
    """FCM refuses a whole push whose data uses its reserved keys: they are found before that."""

    @pytest.mark.parametrize(
        ("data", "reserved"),
        [
            ({}, []),
            ({"screen": "sale", "fromage": "brie", "message": "x", "agcm": "1"}, []),
            ({"from": "x"}, ["from"]),
            ({"message_type": "x"}, ["message_type"]),
            (
                {"google.c.a.e": "1", "gcm.notification.title": "t"},
                ["gcm.notification.title", "google.c.a.e"],
            ),
            ({"googleId": "1", "gcmx": "1", "screen": "s"}, ["gcmx", "googleId"]),
            (
                {"From": "x", "Google.x": "1", "MESSAGE_TYPE": "y"},
                ["From", "Google.x", "MESSAGE_TYPE"],
            ),
        ],
    )
    def test_found(self, data: dict[str, str], reserved: list[str]) -> None:
        assert reserved == reserved_data_keys(data)

    async def test_the_adapter_refuses_them_before_any_request(self) -> None:
        fake = FakeFcm()
        async with fake_adapter(fake, lambda: NOW) as adapter:
            with pytest.raises(InvalidRequest) as caught:
                await adapter.send(push(data={"from": "crm"}))
        assert "push1: data uses reserved keys from" == str(caught.value)
        assert (0, []) == (fake.token_calls, fake.send_tokens)


class TestServiceAccount:
    """The key file is parsed once, at adapter construction, and its problems are ConfigErrors."""

    def test_fields(self) -> None:
        account = load_service_account(fcm_config())
        assert ("gw@acme-app.iam.gserviceaccount.com", "kid-1", "acme-app") == (
            account.client_email,
            account.private_key_id,
            account.project_id,
        )
        assert isinstance(load_private_key(account), rsa.RSAPrivateKey)

    @pytest.mark.parametrize(
        "secret",
        [None, "not json", '{"type": "service_account"}', account_json(type="authorized_user")],
    )
    def test_unusable_account(self, secret: str | None) -> None:
        config = FcmSettings(service_account_json=Secret(secret) if secret is not None else None)
        with pytest.raises(ConfigError) as caught:
            load_service_account(config)
        assert "BEGIN" not in str(caught.value)  # never echo the key

    def test_bad_pem(self) -> None:
        account = load_service_account(
            fcm_config(service_account_json=Secret(account_json(private_key="x")))
        )
        with pytest.raises(ConfigError):
            load_private_key(account)

    def test_non_rsa_key(self) -> None:
        from cryptography.hazmat.primitives.asymmetric import ec

        pem = (
            ec.generate_private_key(ec.SECP256R1())
            .private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
            .decode()
        )
        account = load_service_account(
            fcm_config(service_account_json=Secret(account_json(private_key=pem)))
        )
        with pytest.raises(ConfigError):
            load_private_key(account)

    def test_project_id_needed_somewhere(self) -> None:
        assert "acme-app" == project_id(fcm_config())
        assert "cfg" == project_id(fcm_config(project_id="cfg"))
        with pytest.raises(ConfigError):
            project_id(fcm_config(service_account_json=Secret(account_json(project=""))))


class TestJwt:
    """RS256 compact JWS: header with kid, Google's claim set, verifiable with the public key."""

    def test_round_trip_and_claims(self) -> None:
        account = load_service_account(fcm_config())
        request = build_token_request(account, private_key=_KEY, now=NOW + 0.7)
        assert "POST" == request.method
        assert "https://oauth2.example/token" == str(request.url)
        assert "application/x-www-form-urlencoded" == request.headers["content-type"]
        form = parse_qs(request.body.decode())
        assert [JWT_BEARER_GRANT] == form["grant_type"]
        header, claims = decode_jwt(form["assertion"][0], public_key=_KEY.public_key())
        assert {"alg": "RS256", "typ": "JWT", "kid": "kid-1"} == header
        assert {
            "iss": "gw@acme-app.iam.gserviceaccount.com",
            "scope": SCOPE,
            "aud": "https://oauth2.googleapis.com/token",
            "iat": int(NOW),
            "exp": int(NOW) + 3600,
        } == claims

    def test_a_legacy_token_uri_is_posted_to_but_not_the_audience(self) -> None:
        legacy = "https://accounts.google.com/o/oauth2/token"
        account = load_service_account(
            fcm_config(service_account_json=Secret(account_json(token_uri=legacy)))
        )
        request = build_token_request(account, private_key=_KEY, now=NOW)
        assert legacy == str(request.url)
        assertion = parse_qs(request.body.decode())["assertion"][0]
        _, claims = decode_jwt(assertion, public_key=_KEY.public_key())
        assert "https://oauth2.googleapis.com/token" == claims["aud"]

    def test_wrong_key_fails(self) -> None:
        token = encode_jwt({"a": 1}, private_key=_KEY, key_id="k")
        with pytest.raises(ValueError, match="signature"):
            decode_jwt(token, public_key=_OTHER_KEY.public_key())

    def test_tampered_claims_fail(self) -> None:
        header, _, signature = encode_jwt({"a": 1}, private_key=_KEY, key_id="k").split(".")
        forged = encode_jwt({"a": 2}, private_key=_KEY, key_id="k").split(".")[1]
        with pytest.raises(ValueError, match="signature"):
            decode_jwt(f"{header}.{forged}.{signature}", public_key=_KEY.public_key())

    @pytest.mark.parametrize(
        "token",
        [
            "a.b",
            "!!!.e30.e30",
            "WyJhIl0.e30.e30",  # header is a list
            "eyJhbGciOiJub25lIn0.e30.",  # alg none
        ],
    )
    def test_malformed(self, token: str) -> None:
        with pytest.raises(ValueError):
            decode_jwt(token, public_key=_KEY.public_key())


class TestTokenResponse:
    """The token endpoint's answers: a token, or why not."""

    def test_token(self) -> None:
        body = {"access_token": "ya29.x", "expires_in": 3599, "token_type": "Bearer"}
        assert AccessToken("ya29.x", 3599.0) == parse_token_response(
            response(200, body), provider="p"
        )

    @pytest.mark.parametrize(
        ("status", "body", "error", "code"),
        [
            (
                400,
                {"error": "invalid_grant", "error_description": "Invalid JWT Signature."},
                AuthRejected,
                "invalid_grant",
            ),
            (401, {"error": "invalid_client"}, AuthRejected, "invalid_client"),
            (403, b"<html>", AuthRejected, None),
            (429, {"error": "rate_limit_exceeded"}, RateLimited, "rate_limit_exceeded"),
            (503, b"", ProviderUnavailable, None),
            (200, b"{}", ProviderUnavailable, None),
            (200, b"nope", ProviderUnavailable, None),
        ],
    )
    def test_refusals(
        self, status: int, body: object, error: type[ProviderError], code: str | None
    ) -> None:
        with pytest.raises(error) as caught:
            parse_token_response(response(status, body), provider="p")
        assert (status, code) == (caught.value.status_code, caught.value.code)
        assert type(caught.value) is error


class TestParseResponse:
    """Every FCM answer maps to a receipt or to the ProviderError that says what to do next."""

    def test_success(self) -> None:
        body = {"name": "projects/acme-app/messages/0:1%abc"}
        assert (
            "projects/acme-app/messages/0:1%abc"
            == parse_response(response(200, body), provider="p").provider_message_id
        )

    @pytest.mark.parametrize("body", [b"", b"[]", b'{"name": 5}'])
    def test_success_without_a_name_is_still_sent(self, body: bytes) -> None:
        assert parse_response(response(200, body), provider="p").provider_message_id is None

    @pytest.mark.parametrize(
        ("status", "body", "headers", "error", "code", "retry_after"),
        [
            (
                404,
                google(404, "NOT_FOUND", "UNREGISTERED"),
                {},
                InvalidRecipient,
                "UNREGISTERED",
                None,
            ),
            (
                403,
                google(403, "PERMISSION_DENIED", "SENDER_ID_MISMATCH"),
                {},
                InvalidRecipient,
                "SENDER_ID_MISMATCH",
                None,
            ),
            (
                400,
                google(400, "INVALID_ARGUMENT", "INVALID_ARGUMENT", field="message.token"),
                {},
                InvalidRecipient,
                "INVALID_ARGUMENT",
                None,
            ),
            (
                400,
                google(
                    400,
                    "INVALID_ARGUMENT",
                    "INVALID_ARGUMENT",
                    message="The registration token is not a valid FCM registration token",
                ),
                {},
                InvalidRecipient,
                "INVALID_ARGUMENT",
                None,
            ),
            (
                400,
                google(400, "INVALID_ARGUMENT", None, field="message.token"),
                {},
                InvalidRecipient,
                "INVALID_ARGUMENT",
                None,
            ),
            (
                400,
                google(400, "INVALID_ARGUMENT", "INVALID_ARGUMENT", field="message.data[0].value"),
                {},
                InvalidRequest,
                "INVALID_ARGUMENT",
                None,
            ),
            (400, google(400, "INVALID_ARGUMENT"), {}, InvalidRequest, "INVALID_ARGUMENT", None),
            (400, b"not json", {}, InvalidRequest, None, None),
            (404, google(404, "NOT_FOUND"), {}, InvalidRequest, "NOT_FOUND", None),
            (
                401,
                google(401, "UNAUTHENTICATED", "THIRD_PARTY_AUTH_ERROR"),
                {},
                AuthRejected,
                "THIRD_PARTY_AUTH_ERROR",
                None,
            ),
            (401, google(401, "UNAUTHENTICATED"), {}, AuthRejected, "UNAUTHENTICATED", None),
            (403, google(403, "PERMISSION_DENIED"), {}, AuthRejected, "PERMISSION_DENIED", None),
            (
                429,
                google(429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED"),
                {"Retry-After": "30"},
                RateLimited,
                "QUOTA_EXCEEDED",
                30.0,
            ),
            (429, b"", {}, RateLimited, None, None),
            (
                503,
                google(503, "UNAVAILABLE", "UNAVAILABLE"),
                {"Retry-After": "5"},
                ProviderUnavailable,
                "UNAVAILABLE",
                5.0,
            ),
            (500, google(500, "INTERNAL", "INTERNAL"), {}, ProviderUnavailable, "INTERNAL", None),
            (
                502,
                b"<!DOCTYPE html><title>Error 502</title>",
                {"Retry-After": "30"},
                ProviderUnavailable,
                None,
                30.0,
            ),
            (400, b'{"error": "flat"}', {}, InvalidRequest, None, None),
            (
                400,
                b'{"error": {"details": [1, {"@type": "x"}], "status": 7}}',
                {},
                InvalidRequest,
                None,
                None,
            ),
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
            parse_response(response(status, body, headers), provider="push1")
        failure = caught.value
        assert type(failure) is error
        assert ("push1", status, code, retry_after) == (
            failure.provider,
            failure.status_code,
            failure.code,
            failure.retry_after_seconds,
        )

    def test_quota_retry_after_as_http_date(self) -> None:
        headers = {"Retry-After": email.utils.formatdate(NOW + 90, usegmt=True)}
        with pytest.raises(RateLimited) as caught:
            parse_response(
                response(429, google(429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED"), headers),
                provider="p",
                now=NOW,
            )
        assert 90.0 == caught.value.retry_after_seconds

    def test_messages_never_quote_googles_text(self) -> None:
        body = google(400, "INVALID_ARGUMENT", "INVALID_ARGUMENT", message="secret text 12")
        with pytest.raises(InvalidRequest) as caught:
            parse_response(response(400, body), provider="p")
        assert "secret" not in str(caught.value)

    def test_google_error_fields(self) -> None:
        body = google(400, "INVALID_ARGUMENT", "INVALID_ARGUMENT", field="message.token")
        parsed = parse_google_error(msgspec.json.encode(body))
        assert ("INVALID_ARGUMENT", "INVALID_ARGUMENT", ("message.token",)) == (
            parsed.status,
            parsed.fcm_code,
            parsed.fields,
        )


class TestWebhooks:
    """FCM calls no webhooks: anything claiming to be one is refused."""

    def test_refused(self) -> None:
        with pytest.raises(WebhookRejected) as caught:
            verify_webhook(url="u", headers={}, body=b"[]", config=fcm_config(), now=NOW)
        assert "bad_signature" == caught.value.verdict
        assert [] == parse_webhook(url="u", headers={}, body=b"[]")


# ---------------------------------------------------------------- token cache (local server)
class FakeFcm:
    """Just enough FCM and token endpoint to count token fetches and script 401s."""

    def __init__(self) -> None:
        self.token_calls = 0
        self.send_tokens: list[str] = []
        self.unauthorised: list[dict[str, Any]] = []
        self.token_status = 200

    async def __call__(self, call: Call) -> HttpResponse:
        request = call.request
        if urlsplit(request.url).path == "/token":
            self.token_calls += 1
            if self.token_status != 200:
                return response(self.token_status, {"error": "invalid_grant"})
            body = {"access_token": f"t{self.token_calls}", "expires_in": 3600}
            return response(200, body)
        self.send_tokens.append(request.headers["authorization"])
        if self.unauthorised:
            return response(401, self.unauthorised.pop(0))
        return response(200, {"name": f"projects/acme-app/messages/{len(self.send_tokens)}"})


@asynccontextmanager
async def fake_adapter(fake: FakeFcm, clock: Callable[[], float]) -> AsyncIterator[FcmAdapter]:
    async with local_server(fake) as server, make_client(timeout_seconds=5.0) as client:
        config = fcm_config(
            url=server.url,
            service_account_json=Secret(account_json(token_uri=f"{server.url}/token")),
        )
        adapter = FcmAdapter("push1", config, client, wall_clock=clock)
        yield adapter
        await adapter.aclose()


class TestTokenCache:
    """One token per hour, renewed 60 s early, and once more when FCM says 401."""

    async def test_cached_until_just_before_expiry(self) -> None:
        fake, now = FakeFcm(), [NOW]
        async with fake_adapter(fake, lambda: now[0]) as adapter:
            assert (adapter.name, adapter.channel) == ("push1", Channel.PUSH)
            await adapter.send(push())
            now[0] += 3600 - 61
            await adapter.send(push())
            assert 1 == fake.token_calls
            now[0] += 2  # inside the 60 s margin
            await adapter.send(push())
        assert 2 == fake.token_calls
        assert ["Bearer t1", "Bearer t1", "Bearer t2"] == fake.send_tokens

    async def test_concurrent_sends_share_one_fetch(self) -> None:
        fake = FakeFcm()
        async with fake_adapter(fake, lambda: NOW) as adapter, trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(adapter.send, push())
        assert 1 == fake.token_calls

    async def test_401_refetches_once(self) -> None:
        fake = FakeFcm()
        fake.unauthorised.append(google(401, "UNAUTHENTICATED"))
        async with fake_adapter(fake, lambda: NOW) as adapter:
            receipt = await adapter.send(push())
        assert "projects/acme-app/messages/2" == receipt.provider_message_id
        assert ["Bearer t1", "Bearer t2"] == fake.send_tokens

    async def test_a_late_401_keeps_the_fresh_token(self) -> None:
        fake = FakeFcm()
        both_sent, t2_in_use = trio.Event(), trio.Event()
        late: list[str] = []

        async def handler(call: Call) -> HttpResponse:
            authorization = call.request.headers.get("authorization")
            if authorization == "Bearer t1":
                late.append("401")
                if len(late) == 1:
                    await both_sent.wait()  # both sends hold t1 before either hears its 401
                else:
                    both_sent.set()
                    await t2_in_use.wait()  # ... and this one hears it once t2 is cached
                return response(401, google(401, "UNAUTHENTICATED"))
            if authorization == "Bearer t2":
                t2_in_use.set()
            return await fake(call)

        async with local_server(handler) as server, make_client(timeout_seconds=5.0) as client:
            config = fcm_config(
                url=server.url,
                service_account_json=Secret(account_json(token_uri=f"{server.url}/token")),
            )
            adapter = FcmAdapter("push1", config, client, wall_clock=lambda: NOW)
            with trio.fail_after(5):
                async with trio.open_nursery() as nursery:
                    for _ in range(2):
                        nursery.start_soon(adapter.send, push())
        # both sends met t1's 401; the one answered after t2 was issued must not drop t2
        assert (2, ["401", "401"]) == (fake.token_calls, late)
        assert ["Bearer t2", "Bearer t2"] == fake.send_tokens

    async def test_401_twice_is_auth_rejected(self) -> None:
        fake = FakeFcm()
        fake.unauthorised += [google(401, "UNAUTHENTICATED")] * 2
        async with fake_adapter(fake, lambda: NOW) as adapter:
            with pytest.raises(AuthRejected):
                await adapter.send(push())
        assert 2 == fake.token_calls

    async def test_third_party_auth_error_is_not_retried(self) -> None:
        fake = FakeFcm()
        fake.unauthorised.append(google(401, "UNAUTHENTICATED", "THIRD_PARTY_AUTH_ERROR"))
        async with fake_adapter(fake, lambda: NOW) as adapter:
            with pytest.raises(AuthRejected) as caught:
                await adapter.send(push())
        assert "THIRD_PARTY_AUTH_ERROR" == caught.value.code
        assert (1, 1) == (fake.token_calls, len(fake.send_tokens))

    async def test_refused_grant_is_auth_rejected(self) -> None:
        fake = FakeFcm()
        fake.token_status = 400
        async with fake_adapter(fake, lambda: NOW) as adapter:
            with pytest.raises(AuthRejected) as caught:
                await adapter.send(push())
        assert "invalid_grant" == caught.value.code
        assert [] == fake.send_tokens

    async def test_transport_errors_are_mapped(self, mock_clock: trio.testing.MockClock) -> None:
        async def never(call: Call) -> HttpResponse:
            mock_clock.jump(6)  # past the client's 5 s while the token request waits
            await trio.sleep_forever()
            raise AssertionError("unreachable")

        async with local_server(never) as server, make_client(timeout_seconds=5.0) as client:
            config = fcm_config(
                url=server.url,
                service_account_json=Secret(account_json(token_uri=f"{server.url}/token")),
            )
            adapter = FcmAdapter("push1", config, client, wall_clock=wall_time)
            with pytest.raises(ProviderTimeout):
                await adapter.send(push())

    def test_bad_config_fails_at_construction(self) -> None:
        with pytest.raises(ConfigError):
            FcmAdapter("push1", FcmSettings(), make_client(timeout_seconds=5), wall_clock=wall_time)
        with pytest.raises(ConfigError):
            FcmAdapter(
                "push1",
                fcm_config(service_account_json=Secret(account_json(project=""))),
                make_client(timeout_seconds=5),
                wall_clock=wall_time,
            )


# ---------------------------------------------------------------- against the simulator
@asynccontextmanager
async def serving(sim: FcmSimulator) -> AsyncIterator[FcmAdapter]:
    async with trio.open_nursery() as nursery:
        await nursery.start(sim.serve)
        config = FcmSettings(**sim.credentials())  # type: ignore[arg-type]
        async with make_client(timeout_seconds=5.0) as client:
            yield FcmAdapter("push1", config, client, wall_clock=wall_time)
        nursery.cancel_scope.cancel()


async def eventually(predicate: Callable[[], bool]) -> None:
    """Wait for a fact the simulator records in a plain list (bounded by the test's fail_after)."""
    while not predicate():  # noqa: ASYNC110 - the lists have no event to wait on
        await trio.sleep(0.005)


def simulator(**behaviour: Any) -> FcmSimulator:
    return FcmSimulator(name="push1", behaviour=msgspec.structs.replace(FAST, **behaviour), seed=7)


class TestAgainstTheSimulator:
    """Real requests over HTTP to the simulator: tokens, successes and every tagged failure."""

    async def test_send_returns_the_message_name(self) -> None:
        sim = simulator()
        with trio.fail_after(10):
            async with serving(sim) as adapter:
                first = await adapter.send(push("tok-ignore-1"))
                second = await adapter.send(push("tok-ignore-2"))
        for receipt in (first, second):
            assert receipt.provider_message_id is not None
            assert receipt.provider_message_id.startswith("projects/cascadegw-sim/messages/0:")
        assert ["/token", *["/v1/projects/cascadegw-sim/messages:send"] * 2] == [
            r.path for r in sim.requests
        ]
        form = parse_qs(sim.requests[0].body.decode())
        _, claims = decode_jwt(form["assertion"][0], public_key=sim.public_key)
        assert abs(claims["iat"] - wall_time()) < 60
        assert sim.client_email == claims["iss"]
        sent = msgspec.json.decode(sim.requests[1].body)["message"]
        assert {"token": "tok-ignore-1", "cgw_key": "acme:m1"} == {
            "token": sent["token"],
            "cgw_key": sent["data"]["cgw_key"],
        }

    @pytest.mark.parametrize(
        ("address", "error", "status", "code"),
        [
            ("tok-invalid-1", InvalidRecipient, 404, "UNREGISTERED"),
            ("tok-fail-1", ProviderUnavailable, 503, "UNAVAILABLE"),
        ],
    )
    async def test_tagged_failures(
        self, address: str, error: type[ProviderError], status: int, code: str
    ) -> None:
        with trio.fail_after(10):
            async with serving(simulator()) as adapter:
                with pytest.raises(error) as caught:
                    await adapter.send(push(address))
        assert (status, code) == (caught.value.status_code, caught.value.code)

    async def test_throttle_then_accept(self) -> None:
        with trio.fail_after(10):
            async with serving(simulator()) as adapter:
                with pytest.raises(RateLimited) as caught:
                    await adapter.send(push("tok-throttle-1"))
                assert (429, "QUOTA_EXCEEDED", 1.0) == (
                    caught.value.status_code,
                    caught.value.code,
                    caught.value.retry_after_seconds,
                )
                assert (await adapter.send(push("tok-throttle-1"))).provider_message_id

    @pytest.mark.parametrize(
        ("scripted", "error", "retry_after"),
        [
            (Scripted(status=429, headers={"Retry-After": "7"}), RateLimited, 7.0),
            (Scripted(status=500), ProviderUnavailable, None),
            (Scripted(status=503, headers={"Retry-After": "2"}), ProviderUnavailable, 2.0),
            (Scripted(status=401), AuthRejected, None),  # THIRD_PARTY_AUTH_ERROR: no refetch
        ],
    )
    async def test_scripted(
        self, scripted: Scripted, error: type[ProviderError], retry_after: float | None
    ) -> None:
        sim = simulator()
        sim.script.append(scripted)
        with trio.fail_after(10):
            async with serving(sim) as adapter:
                with pytest.raises(error) as caught:
                    await adapter.send(push("tok-ignore-1"))
        assert retry_after == caught.value.retry_after_seconds

    async def test_wrong_key_is_auth_rejected(self) -> None:
        sim = simulator()
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(sim.serve)
                genuine = sim.service_account()
                forged = {
                    **genuine,
                    "private_key": _OTHER_KEY.private_bytes(
                        Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()
                    ).decode(),
                }
                config = FcmSettings(
                    url=sim.url,
                    service_account_json=Secret(msgspec.json.encode(forged).decode()),
                )
                async with make_client(timeout_seconds=5.0) as client:
                    with pytest.raises(AuthRejected) as caught:
                        await FcmAdapter("push1", config, client, wall_clock=wall_time).send(
                            push("tok-ignore-1")
                        )
                nursery.cancel_scope.cancel()
        assert (400, "invalid_grant") == (caught.value.status_code, caught.value.code)
        assert ["/token"] == [r.path for r in sim.requests]

    async def test_revoked_token_is_refetched(self) -> None:
        sim = simulator()
        with trio.fail_after(10):
            async with serving(sim) as adapter:
                await adapter.send(push("tok-ignore-1"))
                sim.revoke_tokens()
                assert (await adapter.send(push("tok-ignore-2"))).provider_message_id
        assert 2 == adapter.token_fetches
        # the revoked token's 401, a new grant, the same push again
        assert ["/token", "send", "send", "/token", "send"] == [
            "/token" if r.path == "/token" else "send" for r in sim.requests
        ]


class TestSimulatorValidates:
    """The simulator refuses what FCM and Google's token endpoint refuse, in their words."""

    async def test_api(self) -> None:
        sim = simulator()
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(sim.serve)
                async with httpx.AsyncClient(base_url=sim.url) as http:
                    send = "/v1/projects/cascadegw-sim/messages:send"
                    unauthenticated = await http.post(send, json={"message": {"token": "t"}})
                    assert 401 == unauthenticated.status_code
                    assert "UNAUTHENTICATED" == unauthenticated.json()["error"]["status"]
                    account = load_service_account(FcmSettings(**sim.credentials()))  # type: ignore[arg-type]
                    grant = build_token_request(
                        account, private_key=load_private_key(account), now=wall_time()
                    )
                    token = (await fetch(grant)).json()["access_token"]
                    auth = {"Authorization": f"Bearer {token}"}
                    other = await http.post(
                        "/v1/projects/nope/messages:send",
                        json={"message": {"token": "t"}},
                        headers=auth,
                    )
                    assert 403 == other.status_code
                    cases: list[tuple[object, str | None]] = [
                        (b"{", None),
                        ({}, "message"),
                        ({"message": {}}, "message"),
                        ({"message": {"token": "t", "topic": "x"}}, "message"),
                        ({"message": {"token": 5}}, "message.token"),
                        ({"message": {"token": "t", "bogus": 1}}, None),
                        ({"message": {"token": "t", "data": {"n": 12}}}, "message.data[0].value"),
                        ({"message": {"token": "t", "data": {"google.x": "1"}}}, "message.data"),
                        (
                            {"message": {"token": "t", "data": {"message_type": "1"}}},
                            "message.data",
                        ),
                        ({"message": {"token": "t", "data": []}}, "message.data"),
                        (
                            {"message": {"token": "t", "notification": {"title": 1}}},
                            "message.notification",
                        ),
                        (
                            {"message": {"token": "t", "android": {"priority": "URGENT"}}},
                            "message.android.priority",
                        ),
                        ({"message": {"token": "t", "data": {"k": "x" * 5000}}}, None),
                    ]
                    for body, field in cases:
                        content = body if isinstance(body, bytes) else msgspec.json.encode(body)
                        answer = await http.post(send, content=content, headers=auth)
                        assert 400 == answer.status_code, body
                        error = answer.json()["error"]
                        assert "INVALID_ARGUMENT" == error["status"]
                        fields = parse_google_error(answer.content).fields
                        assert (field,) == fields if field else () == fields, body
                    dry = await http.post(
                        send, json={"validate_only": True, "message": {"token": "t"}}, headers=auth
                    )
                    assert "projects/cascadegw-sim/messages/fake_message_id" == dry.json()["name"]
                    topic = await http.post(send, json={"message": {"topic": "news"}}, headers=auth)
                    assert 200 == topic.status_code
                nursery.cancel_scope.cancel()

    async def test_token_endpoint(self) -> None:
        sim = simulator()
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(sim.serve)
                account = ServiceAccount(
                    client_email=sim.client_email,
                    private_key="",
                    private_key_id=sim.private_key_id,
                    token_uri=sim.token_uri,
                )
                now = wall_time()
                good = {
                    "iss": sim.client_email,
                    "scope": SCOPE,
                    "aud": "https://oauth2.googleapis.com/token",
                    "iat": int(now),
                    "exp": int(now) + 3600,
                }
                cases: list[tuple[dict[str, str], str]] = [
                    ({"grant_type": "password"}, "unsupported_grant_type"),
                    ({"grant_type": JWT_BEARER_GRANT}, "invalid_request"),
                ]
                for claims, kid, key in [
                    ({**good, "iss": "x@y"}, sim.private_key_id, sim.private_key),
                    (
                        {**good, "aud": "https://elsewhere/token"},
                        sim.private_key_id,
                        sim.private_key,
                    ),
                    # the URL the grant went to is not the audience Google wants
                    ({**good, "aud": sim.token_uri}, sim.private_key_id, sim.private_key),
                    (
                        {**good, "iat": int(now) - 7200, "exp": int(now) - 3600},
                        sim.private_key_id,
                        sim.private_key,
                    ),
                    ({**good, "exp": int(now) + 7200}, sim.private_key_id, sim.private_key),
                    ({**good, "exp": "soon"}, sim.private_key_id, sim.private_key),
                    (good, "another-kid", sim.private_key),
                    (good, sim.private_key_id, _OTHER_KEY),
                ]:
                    assertion = encode_jwt(claims, private_key=key, key_id=kid)
                    cases.append(
                        ({"grant_type": JWT_BEARER_GRANT, "assertion": assertion}, "invalid_grant")
                    )
                no_scope = encode_jwt(
                    {**good, "scope": "email"},
                    private_key=sim.private_key,
                    key_id=sim.private_key_id,
                )
                cases.append(
                    ({"grant_type": JWT_BEARER_GRANT, "assertion": no_scope}, "invalid_scope")
                )
                async with httpx.AsyncClient() as http:
                    for form, error in cases:
                        answer = await http.post(sim.token_uri, data=form)
                        assert (400, error) == (answer.status_code, answer.json()["error"])
                    ok = await fetch(
                        build_token_request(account, private_key=sim.private_key, now=now)
                    )
                    assert 200 == ok.status_code
                    assert {"expires_in": 3600, "token_type": "Bearer"}.items() <= ok.json().items()
                assert all(r.path == "/token" for r in sim.requests)
                assert len(cases) + 1 == len(sim.requests)
                nursery.cancel_scope.cancel()

    def test_default_errors_have_googles_shape(self) -> None:
        body = default_error(429)
        assert "RESOURCE_EXHAUSTED" == body["error"]["status"]
        assert "QUOTA_EXCEEDED" == parse_google_error(msgspec.json.encode(body)).fcm_code
        assert "UNKNOWN" == default_error(418)["error"]["status"]
        assert "details" not in google_error(400, "INVALID_ARGUMENT", "m")["error"]


# ---------------------------------------------------------------- the app reports back
class FakeIngest:
    """A ZeroMQ ROUTER answering every request as the gateway would, recording the requests."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.endpoint = ""
        self.arrived = trio.Event()

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        try:
            async with zmqio.open_socket(context, zmq.ROUTER, bind="tcp://127.0.0.1:*") as sock:
                self.endpoint = zmqio.bound_endpoint(sock)
                task_status.started(self.endpoint)
                while True:
                    identity, correlation, frame = await zmqio.recv_multipart(sock)
                    self.requests.append(msgpack.unpackb(frame))
                    self.arrived.set()
                    reply = msgpack.packb({"status": "ok"})
                    await zmqio.send_multipart(sock, [identity, correlation, reply])
        finally:
            context.term()


class ClickTracker:
    """The gateway's click redirect, as far as the app can tell."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        self.clicked = trio.Event()
        self.url = ""

    def app(self) -> Starlette:
        async def click(request: Request) -> Response:
            self.hits.append(request.url.path)
            self.clicked.set()
            return RedirectResponse(f"{self.url}/shop", status_code=302)

        async def shop(request: Request) -> Response:
            self.hits.append(request.url.path)
            return Response("shop")

        return Starlette(routes=[Route("/t/c/{token}", click), Route("/shop", shop)])

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        config = hypercorn.config.Config()
        config.bind = ["127.0.0.1:0"]
        config.accesslog = None
        config.errorlog = None
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(hypercorn.trio.serve, self.app(), config)
            self.url = binds[0]
            task_status.started(self.url)


class TestTheApp:
    """Per the token's fate, the app reports the open over ZeroMQ and opens the tracked link."""

    async def test_read_reports_an_open(self) -> None:
        sim, ingest = simulator(), FakeIngest()
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                sim.ingest_endpoint = await nursery.start(ingest.serve)
                async with serving(sim) as adapter:
                    await adapter.send(push("tok-read-1", key="acme:m-7"))
                    await eventually(lambda: len(sim.app_reports) == 1)
                    await adapter.send(push("tok-read-2", key="acme:m-8"))  # the same app client
                    await eventually(lambda: len(sim.app_reports) == 2)
                nursery.cancel_scope.cancel()
        assert [
            {
                "v": 1,
                "op": "event",
                "id": "m-7",
                "tenant": "acme",
                "kind": "opened",
                "channel": "push",
            },
            {
                "v": 1,
                "op": "event",
                "id": "m-8",
                "tenant": "acme",
                "kind": "opened",
                "channel": "push",
            },
        ] == ingest.requests
        assert [
            ("opened", "acme:m-7", {"status": "ok"}),
            ("opened", "acme:m-8", {"status": "ok"}),
        ] == [(r.kind, r.message_key, r.reply) for r in sim.app_reports]
        assert [] == sim.clicks

    async def test_an_unanswered_report_is_recorded(self) -> None:
        sim = simulator()
        sim.ingest_endpoint = "tcp://127.0.0.1:1"  # nobody listens
        sim.app_timeout_seconds = 0.05
        with trio.fail_after(10):
            async with serving(sim) as adapter:
                await adapter.send(push("tok-read-1"))
                await eventually(lambda: bool(sim.app_reports))
        assert [("opened", "acme:m1", None)] == [
            (r.kind, r.message_key, r.reply) for r in sim.app_reports
        ]

    async def test_click_opens_the_tracked_link_without_following(self) -> None:
        sim, ingest, tracker = simulator(), FakeIngest(), ClickTracker()
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                sim.ingest_endpoint = await nursery.start(ingest.serve)
                base = await nursery.start(tracker.serve)
                async with serving(sim) as adapter:
                    await adapter.send(push("tok-click-1", link_url=f"{base}/t/c/tok123"))
                    await tracker.clicked.wait()
                    await eventually(lambda: bool(sim.clicks))
                nursery.cancel_scope.cancel()
        assert ["opened"] == [r["kind"] for r in ingest.requests]
        assert ["/t/c/tok123"] == tracker.hits  # the redirect to /shop was not followed
        assert [302] == sim.clicks

    async def test_ignored_and_unconfigured_report_nothing(self) -> None:
        sim, tracker = simulator(), ClickTracker()
        outbound = Outbound(sim)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                base = await nursery.start(tracker.serve)
                async with serving(sim) as adapter:
                    await adapter.send(push("tok-ignore-1"))
                    await adapter.send(push("tok-read-2"))  # no ingest endpoint: nobody to tell
                    # proof that both were handled (tests/adapters/settling.py): a marker whose
                    # link is tapped after anything scheduled for them fell due
                    sim.behaviour = marker_behaviour(sim.behaviour)
                    marker = push("tok-click-marker", key="acme:marker", link_url=f"{base}/t/c/m")
                    await adapter.send(marker)
                    await tracker.clicked.wait()
                    await outbound.drained()
                nursery.cancel_scope.cancel()
        assert [] == sim.app_reports
        assert (["/t/c/m"], [302]) == (tracker.hits, sim.clicks)  # the marker's tap only

    async def test_an_unreachable_tracker_is_recorded(self) -> None:
        sim = simulator()
        with trio.fail_after(10):
            async with serving(sim) as adapter:
                await adapter.send(push("tok-click-1", link_url="http://127.0.0.1:1/t/c/x"))
                await eventually(lambda: bool(sim.clicks))
        assert [0] == sim.clicks
