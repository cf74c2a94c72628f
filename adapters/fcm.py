"""Push through Firebase Cloud Messaging, HTTP v1 API, with service-account OAuth2.

Wire format (https://firebase.google.com/docs/reference/fcm/rest/v1/projects.messages/send)::

    POST {base}/v1/projects/{project_id}/messages:send
    Authorization: Bearer <access token>
    {"message": {"token": "<registration token>",
                 "notification": {"title": "...", "body": "..."},
                 "data": {"cgw_key": "<tenant>:<id>", "link": "<tracked url>", ...},
                 "android": {"priority": "HIGH" | "NORMAL"}}}
    -> 200 {"name": "projects/{project_id}/messages/{message_id}"}

Errors are Google JSON errors; the FCM reason is in ``details[]`` as an ``FcmError`` entry
(https://firebase.google.com/docs/reference/fcm/rest/v1/ErrorCode)::

    {"error": {"code": 404, "message": "...", "status": "NOT_FOUND",
               "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                            "errorCode": "UNREGISTERED"}]}}

The access token comes from the OAuth2 JWT bearer grant (RFC 7523; Google's "Using OAuth 2.0
for server to server applications"): an RS256 JWT signed with the service account's key is
exchanged at ``token_uri`` for a bearer token valid about an hour, cached until 60 s before
it expires and fetched again once when the API answers 401. The JWT's ``aud`` is always
Google's current token endpoint, whatever ``token_uri`` a key file names (older files name
``https://accounts.google.com/o/oauth2/token``), as google-auth does.

``data`` must not use the keys FCM reserves (``from``, ``message_type``, anything starting with
``google`` or ``gcm``): FCM refuses the whole push with INVALID_ARGUMENT. Admission refuses
them (``gateway.protocol.reserved_data_keys``); ``build_request`` refuses them too, should one
get this far.

FCM sends no webhooks and no delivery receipts: opens come from the app (the ``event`` op) or
from the tracked link in ``data["link"]``.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Final

import msgspec
import trio
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from adapters import Outgoing, ProviderReceipt, SendReceipt, WebhookRejected
from adapters._http import error_for_status, map_transport_errors, retry_after_seconds
from adapters._transport import HttpClient, HttpRequest, HttpResponse
from gateway.core.errors import (
    AuthRejected,
    ConfigError,
    InvalidRecipient,
    InvalidRequest,
    ProviderUnavailable,
    RateLimited,
)
from gateway.core.model import Category, Channel
from gateway.protocol import PushContent, reserved_data_keys
from gateway.settings import ProviderSettingsBase, Secret

KIND: Final = "fcm"
CHANNEL: Final = Channel.PUSH
DEFAULT_BASE_URL: Final = "https://fcm.googleapis.com"
DEFAULT_TOKEN_URI: Final = "https://oauth2.googleapis.com/token"  # noqa: S105 (a URL)
TOKEN_AUDIENCE: Final = DEFAULT_TOKEN_URI
"""The assertion's ``aud``: google-auth always uses the current endpoint here, also when the
key file's ``token_uri`` is a legacy one (the POST still goes to ``token_uri``)."""
SCOPE: Final = "https://www.googleapis.com/auth/firebase.messaging"
JWT_BEARER_GRANT: Final = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ASSERTION_LIFETIME_SECONDS: Final = 3600  # Google accepts at most one hour
TOKEN_REFRESH_MARGIN_SECONDS: Final = 60.0
FCM_ERROR_TYPE: Final = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST_TYPE: Final = "type.googleapis.com/google.rpc.BadRequest"

KEY_DATA: Final = "cgw_key"
"""``data`` key carrying the message key, so the app can report the open with the ``event`` op."""
LINK_DATA: Final = "link"
"""``data`` key carrying the tracked click URL (the gateway's click tracker)."""


class FcmSettings(ProviderSettingsBase, frozen=True, tag=KIND):
    """A ``kind = "fcm"`` provider: one Firebase project's service account."""

    channel: ClassVar[Channel] = CHANNEL

    project_id: str | None = None
    """The Firebase project; unset: the service account's ``project_id``."""
    service_account_json: Secret | None = None
    """The service account's key file (JSON), from the environment."""


# ---------------------------------------------------------------- service account and JWT
class ServiceAccount(msgspec.Struct, frozen=True):
    """The fields of a Google service-account key file that the JWT grant needs."""

    client_email: str
    private_key: str
    private_key_id: str
    project_id: str = ""
    token_uri: str = DEFAULT_TOKEN_URI
    type: str = "service_account"


def load_service_account(config: FcmSettings) -> ServiceAccount:
    """Parse ``config.service_account_json``.

    Raises:
        ConfigError: missing, not JSON, or not a service-account key.
    """
    if config.service_account_json is None:
        raise ConfigError("fcm: service_account_json is required")
    try:
        account = msgspec.json.decode(config.service_account_json.reveal(), type=ServiceAccount)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        # the message names the field, never the value (it is a secret)
        raise ConfigError("fcm: service_account_json is not a service-account key") from exc
    if account.type != "service_account":
        raise ConfigError(f"fcm: service_account_json has type {account.type!r}")
    return account


def load_private_key(account: ServiceAccount) -> rsa.RSAPrivateKey:
    """The RSA key that signs assertions.

    Raises:
        ConfigError: the PEM does not hold an RSA private key.
    """
    try:
        key = serialization.load_pem_private_key(account.private_key.encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError("fcm: service_account_json.private_key is not a PEM key") from exc
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigError("fcm: service_account_json.private_key is not an RSA key")
    return key


def project_id(config: FcmSettings) -> str:
    """``config.project_id``, else the service account's project.

    Raises:
        ConfigError: neither names a project.
    """
    if config.project_id:
        return config.project_id
    project = load_service_account(config).project_id
    if not project:
        raise ConfigError("fcm: project_id is required (in the config or the service account)")
    return project


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode_jwt(claims: Mapping[str, object], *, private_key: rsa.RSAPrivateKey, key_id: str) -> str:
    """A compact RS256 JWS (RFC 7515 section 7.1; RFC 7518 section 3.3: PKCS#1 v1.5 + SHA-256)."""
    header = {"alg": "RS256", "typ": "JWT", "kid": key_id}
    signing_input = f"{_b64url(msgspec.json.encode(header))}.{_b64url(msgspec.json.encode(claims))}"
    signature = private_key.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{_b64url(signature)}"


def decode_jwt(
    token: str, *, public_key: rsa.RSAPublicKey
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Verify an RS256 JWT and return ``(header, claims)``; checks no claim.

    Raises:
        ValueError: malformed, not RS256, or the signature does not verify.
    """
    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError("a JWT has three parts")
    try:
        header = msgspec.json.decode(_unb64url(parts[0]))
        claims = msgspec.json.decode(_unb64url(parts[1]))
        signature = _unb64url(parts[2])
    except (ValueError, msgspec.DecodeError) as exc:
        raise ValueError("undecodable JWT") from exc
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise ValueError("JWT header and claims must be objects")
    if header.get("alg") != "RS256":
        raise ValueError("only RS256 is accepted")  # never "none" (RFC 8725 section 3.1)
    signing_input = f"{parts[0]}.{parts[1]}".encode("ascii")
    try:
        public_key.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature as exc:
        raise ValueError("bad JWT signature") from exc
    return header, claims


def assertion_claims(account: ServiceAccount, *, now: float) -> dict[str, object]:
    """The JWT claim set of Google's service-account grant."""
    issued_at = int(now)
    return {
        "iss": account.client_email,
        "scope": SCOPE,
        "aud": TOKEN_AUDIENCE,
        "iat": issued_at,
        "exp": issued_at + ASSERTION_LIFETIME_SECONDS,
    }


def build_token_request(
    account: ServiceAccount, *, private_key: rsa.RSAPrivateKey, now: float
) -> HttpRequest:
    """The JWT bearer grant (RFC 7523 section 2.1) as a form POST to ``token_uri``."""
    assertion = encode_jwt(
        assertion_claims(account, now=now), private_key=private_key, key_id=account.private_key_id
    )
    return HttpRequest.with_form(
        "POST", account.token_uri, {"grant_type": JWT_BEARER_GRANT, "assertion": assertion}
    )


class AccessToken(msgspec.Struct, frozen=True):
    access_token: str
    expires_in: float = 3600.0
    token_type: str = "Bearer"  # noqa: S105 (the scheme name, RFC 6750)


class _OAuthError(msgspec.Struct):
    error: str = ""


def parse_token_response(response: HttpResponse, *, provider: str) -> AccessToken:
    """The token endpoint's answer (RFC 6749 section 5).

    Raises:
        AuthRejected: 400/401/403 (``invalid_grant``: wrong key, clock skew, revoked account).
        RateLimited, ProviderUnavailable: 429, 5xx.
    """
    if response.status_code == 200:
        try:
            return msgspec.json.decode(response.content, type=AccessToken)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ProviderUnavailable(
                f"{provider}: unreadable token response", provider=provider, status_code=200
            ) from exc
    try:
        code = msgspec.json.decode(response.content, type=_OAuthError).error or None
    except (msgspec.DecodeError, msgspec.ValidationError):
        code = None
    if response.status_code in (400, 401, 403):
        # RFC 6749 section 5.2: a refused grant is 400 invalid_grant; retrying cannot help
        raise AuthRejected(
            f"{provider}: token request refused (HTTP {response.status_code}, {code})",
            provider=provider,
            status_code=response.status_code,
            code=code,
        )
    raise error_for_status(provider, response, code=code, detail="token endpoint")


# ---------------------------------------------------------------- messages:send
def refuse_reserved_data_keys(content: PushContent, *, provider: str) -> None:
    """Raise ``InvalidRequest`` when ``content.data`` uses keys FCM reserves."""
    reserved = reserved_data_keys(content.data)
    if reserved:
        # key names are the CRM's schema, not personal data
        raise InvalidRequest(
            f"{provider}: data uses reserved keys {', '.join(reserved)}", provider=provider
        )


def build_request(
    outgoing: Outgoing, *, config: FcmSettings, base_url: str, access_token: str
) -> HttpRequest:
    """The ``messages:send`` request for one push.

    Raises:
        ConfigError: no project id.
        InvalidRequest: ``data`` uses keys FCM reserves (``reserved_data_keys``); admission
            should have refused the message already.
        TypeError: ``outgoing.content`` is not push content.
    """
    content = outgoing.content
    if not isinstance(content, PushContent):
        raise TypeError(f"fcm sends push content, not {type(content).__name__}")
    refuse_reserved_data_keys(content, provider=KIND)
    # FCM data values must be strings (INVALID_ARGUMENT otherwise); ours win over the CRM's
    data = {**content.data, KEY_DATA: outgoing.message_key}
    if outgoing.link_url is not None:
        data[LINK_DATA] = outgoing.link_url
    message: dict[str, object] = {
        "token": outgoing.address,
        "notification": {"title": content.title, "body": content.body},
        "data": data,
        # HIGH wakes the device; Google asks to keep it for time-sensitive, user-visible
        # messages and may deprioritise apps that use it for promotions
        # https://firebase.google.com/docs/cloud-messaging/android/message-priority
        "android": {"priority": "HIGH" if outgoing.category is Category.SERVICE else "NORMAL"},
    }
    return HttpRequest.with_json(
        "POST",
        f"{base_url.rstrip('/')}/v1/projects/{project_id(config)}/messages:send",
        {"message": message},
        headers={"Authorization": f"Bearer {access_token}"},
    )


class GoogleError(msgspec.Struct, frozen=True):
    """What a Google JSON error says: canonical status, FCM code, offending fields, message."""

    status: str | None = None
    fcm_code: str | None = None
    fields: tuple[str, ...] = ()
    message: str = ""


def parse_google_error(content: bytes) -> GoogleError:
    """Read ``{"error": {"status", "message", "details": [...]}}``; tolerant of anything else."""
    try:
        document = msgspec.json.decode(content)
    except msgspec.DecodeError:
        return GoogleError()  # e.g. the HTML page of a 502 from Google's front end
    error = document.get("error") if isinstance(document, dict) else None
    if not isinstance(error, dict):
        return GoogleError()
    status = error.get("status")
    message = error.get("message")
    fcm_code: str | None = None
    fields: list[str] = []
    details = error.get("details")
    for detail in details if isinstance(details, list) else ():
        if not isinstance(detail, dict):
            continue
        if detail.get("@type") == FCM_ERROR_TYPE and isinstance(detail.get("errorCode"), str):
            fcm_code = detail["errorCode"]
        violations = detail.get("fieldViolations")
        if detail.get("@type") == BAD_REQUEST_TYPE and isinstance(violations, list):
            fields.extend(
                v["field"]
                for v in violations
                if isinstance(v, dict) and isinstance(v.get("field"), str)
            )
    return GoogleError(
        status=status if isinstance(status, str) else None,
        fcm_code=fcm_code,
        fields=tuple(fields),
        message=message if isinstance(message, str) else "",
    )


def _names_the_token(error: GoogleError) -> bool:
    """INVALID_ARGUMENT about the registration token, not about what we built."""
    return "message.token" in error.fields or "registration token" in error.message.lower()


def parse_response(
    response: HttpResponse, *, provider: str, now: float | None = None
) -> SendReceipt:
    """The receipt of a 200, or the ProviderError the answer means.

    ``now`` (POSIX seconds) lets an HTTP-date ``Retry-After`` count. Mapping
    (https://firebase.google.com/docs/reference/fcm/rest/v1/ErrorCode):

    - UNREGISTERED (404), SENDER_ID_MISMATCH (403), INVALID_ARGUMENT naming the token:
      ``InvalidRecipient``; any other INVALID_ARGUMENT (400): ``InvalidRequest``;
    - QUOTA_EXCEEDED / 429: ``RateLimited``; UNAVAILABLE (503), INTERNAL (500), other 5xx:
      ``ProviderUnavailable``; both with ``Retry-After`` when sent;
    - THIRD_PARTY_AUTH_ERROR (401, APNs/web-push credentials), UNAUTHENTICATED (401),
      PERMISSION_DENIED (403): ``AuthRejected``.

    Error messages carry the status and codes only: Google's ``message`` may quote content.
    """
    status = response.status_code
    if status == 200:
        try:
            name = msgspec.json.decode(response.content).get("name")
        except (msgspec.DecodeError, AttributeError):
            name = None
        # sent all the same: raising would retry and deliver the push twice
        return SendReceipt(provider_message_id=name if isinstance(name, str) else None)
    error = parse_google_error(response.content)
    code = error.fcm_code or error.status
    text = f"{provider}: HTTP {status} {code or ''}".rstrip()
    retry_after = retry_after_seconds(response.headers, now=now)
    match error.fcm_code:
        case "UNREGISTERED" | "SENDER_ID_MISMATCH":
            raise InvalidRecipient(text, provider=provider, status_code=status, code=code)
        case "INVALID_ARGUMENT" if _names_the_token(error):
            raise InvalidRecipient(text, provider=provider, status_code=status, code=code)
        case "THIRD_PARTY_AUTH_ERROR":
            raise AuthRejected(text, provider=provider, status_code=status, code=code)
        case "QUOTA_EXCEEDED":
            raise RateLimited(
                text,
                provider=provider,
                status_code=status,
                code=code,
                retry_after_seconds=retry_after,
            )
        case "UNAVAILABLE" | "INTERNAL":
            raise ProviderUnavailable(
                text,
                provider=provider,
                status_code=status,
                code=code,
                retry_after_seconds=retry_after,
            )
    if status == 400 and _names_the_token(error):
        raise InvalidRecipient(text, provider=provider, status_code=status, code=code)
    if status == 404 and error.status == "NOT_FOUND" and error.fcm_code is None:
        # a project or API that does not exist: our configuration, not the recipient
        raise InvalidRequest(text, provider=provider, status_code=status, code=code)
    raise error_for_status(provider, response, code=code)


# ---------------------------------------------------------------- webhooks (none)
def verify_webhook(
    *, url: str, headers: Mapping[str, str], body: bytes, config: FcmSettings, now: float
) -> None:
    """FCM calls no webhooks, so anything claiming to be one is refused.

    Raises:
        WebhookRejected: always, ``bad_signature``.
    """
    raise WebhookRejected("bad_signature", "fcm sends no webhooks")


def parse_webhook(*, url: str, headers: Mapping[str, str], body: bytes) -> list[ProviderReceipt]:
    """FCM has no receipts: opens arrive from the app instead."""
    return []


# ---------------------------------------------------------------- adapter
class FcmAdapter:
    """Sends pushes; owns the OAuth2 access token, not the HTTP client.

    Args:
        name: the configured provider name (metrics, errors).
        config: needs ``service_account_json``; ``project_id`` overrides the account's.
        client: shared, owned by the caller.
        wall_clock: POSIX seconds, for JWT ``iat``/``exp`` and token expiry.

    Raises:
        ConfigError: the service account or project id is unusable.
    """

    def __init__(
        self,
        name: str,
        config: FcmSettings,
        client: HttpClient,
        *,
        wall_clock: Callable[[], float],
    ) -> None:
        self.name = name
        self.channel = CHANNEL
        # resolved once: build_request would otherwise parse the key file for every push
        self.config = msgspec.structs.replace(config, project_id=project_id(config))
        self._client = client
        self._wall_clock = wall_clock
        self._account = load_service_account(config)
        self._private_key = load_private_key(self._account)
        self._base_url = config.url or DEFAULT_BASE_URL
        self._token: str | None = None
        self._token_expires_at = 0.0
        # one refresh at a time: a burst of sends after expiry must not fetch a token each
        self._token_lock = trio.Lock()
        self.token_fetches = 0

    async def _access_token(self) -> str:
        current = self._token
        if current is not None and self._wall_clock() < self._token_expires_at:
            return current  # the common case needs no lock
        async with self._token_lock:
            now = self._wall_clock()
            if self._token is not None and now < self._token_expires_at:
                return self._token
            request = build_token_request(self._account, private_key=self._private_key, now=now)
            with map_transport_errors(self.name):
                response = await self._client.send(request)
            token = parse_token_response(response, provider=self.name)
            self.token_fetches += 1
            self._token = token.access_token
            self._token_expires_at = now + token.expires_in - TOKEN_REFRESH_MARGIN_SECONDS
            return token.access_token

    def _forget(self, token: str) -> None:
        if self._token == token:  # another task may already hold a fresh one
            self._token = None

    async def send(self, outgoing: Outgoing) -> SendReceipt:
        """Send one push.

        Raises:
            gateway.core.errors.ProviderError: see ``parse_response``; ``AuthRejected`` when
                the token endpoint refuses the service account; ``InvalidRequest`` for
                reserved ``data`` keys, before any request.
        """
        if isinstance(outgoing.content, PushContent):
            refuse_reserved_data_keys(outgoing.content, provider=self.name)
        token = await self._access_token()
        response = await self._post(outgoing, token)
        if (
            response.status_code == 401
            and parse_google_error(response.content).fcm_code != "THIRD_PARTY_AUTH_ERROR"
        ):
            # revoked or expired early: fetch a new token once, then believe the 401
            self._forget(token)
            response = await self._post(outgoing, await self._access_token())
        return parse_response(response, provider=self.name, now=self._wall_clock())

    async def _post(self, outgoing: Outgoing, token: str) -> HttpResponse:
        request = build_request(
            outgoing, config=self.config, base_url=self._base_url, access_token=token
        )
        with map_transport_errors(self.name):
            return await self._client.send(request)

    async def aclose(self) -> None:
        """Nothing to release: the client belongs to the caller."""
