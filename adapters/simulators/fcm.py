"""A Firebase Cloud Messaging HTTP v1 server, its OAuth2 token endpoint, and the app on the phone.

The API side checks what Google checks: the JWT bearer grant (RS256 signature with the service
account's public key, ``kid``, ``iss``, ``aud``, ``scope``, a lifetime of at most an hour), the
bearer token on ``messages:send``, the project, and the message (exactly one target, string data
values, no reserved data keys, the 4 KB payload limit), answering with Google's JSON errors.

FCM itself reports nothing back. The simulated *app* does what a real one would: when the user
opens the notification it reports the open through the gateway's ZeroMQ ``event`` op, using the
``cgw_key`` the adapter put in ``data``, and when the user taps the link it opens ``data["link"]``
(the gateway's click tracker) without following the redirect.
"""

from __future__ import annotations

import secrets
from typing import Any, Final
from urllib.parse import parse_qs

import msgspec
import trio
import zmq
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from adapters.fcm import (
    ASSERTION_LIFETIME_SECONDS,
    BAD_REQUEST_TYPE,
    FCM_ERROR_TYPE,
    JWT_BEARER_GRANT,
    KEY_DATA,
    LINK_DATA,
    SCOPE,
    decode_jwt,
)
from adapters.simulators._base import Fate, Simulator
from gateway.client import AsyncClient, ClientError, open_client
from gateway.core.model import split_key
from gateway.httpserver import Request, Response, Route, json_response
from gateway.settings import Secret, SimulatorConfig

TOKEN_LIFETIME_SECONDS: Final = 3600
CLOCK_SKEW_SECONDS: Final = 60.0
MAX_PAYLOAD_BYTES: Final = 4096  # notification + data, keys and values (FCM limit)
GOOGLE_TOKEN_AUDIENCE: Final = "https://oauth2.googleapis.com/token"  # noqa: S105 (a URL)
_RESERVED_DATA_KEYS: Final = frozenset({"from", "message_type"})  # and "google"/"gcm" prefixes
_MESSAGE_FIELDS: Final = frozenset(
    {
        "name",
        "data",
        "notification",
        "android",
        "webpush",
        "apns",
        "fcm_options",
        "token",
        "topic",
        "condition",
    }
)
_STATUS_BY_CODE: Final = {
    400: ("INVALID_ARGUMENT", "INVALID_ARGUMENT", "Request contains an invalid argument."),
    401: ("UNAUTHENTICATED", "THIRD_PARTY_AUTH_ERROR", "Auth error from APNS or Web Push Service"),
    403: ("PERMISSION_DENIED", "SENDER_ID_MISMATCH", "SenderId mismatch"),
    404: ("NOT_FOUND", "UNREGISTERED", "Requested entity was not found."),
    429: ("RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED", "Quota exceeded for quota metric."),
    500: ("INTERNAL", "INTERNAL", "Internal error encountered."),
    503: ("UNAVAILABLE", "UNAVAILABLE", "The service is currently unavailable."),
}


def google_error(
    code: int,
    status: str,
    message: str,
    *,
    fcm_code: str | None = None,
    field: str | None = None,
) -> dict[str, Any]:
    """A Google JSON error body, with the FcmError and BadRequest details FCM adds."""
    details: list[dict[str, Any]] = []
    if fcm_code is not None:
        details.append({"@type": FCM_ERROR_TYPE, "errorCode": fcm_code})
    if field is not None:
        details.append(
            {
                "@type": BAD_REQUEST_TYPE,
                "fieldViolations": [{"field": field, "description": message}],
            }
        )
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        error["details"] = details
    return {"error": error}


def default_error(code: int) -> dict[str, Any]:
    """The body FCM sends with a bare status (scripted failures that name no body)."""
    status, fcm_code, message = _STATUS_BY_CODE.get(code, ("UNKNOWN", "UNSPECIFIED_ERROR", "Error"))
    return google_error(code, status, message, fcm_code=fcm_code)


class AppReport(msgspec.Struct, frozen=True):
    """What the simulated app told the gateway (``reply`` is the gateway's answer, or None)."""

    kind: str
    message_key: str
    reply: Any = None


class FcmSimulator(Simulator):
    """FCM HTTP v1 plus Google's token endpoint, for one generated service account."""

    kind = "fcm"

    def __init__(
        self,
        *,
        name: str,
        behaviour: SimulatorConfig,
        webhook_url: str = "",
        seed: int | None = None,
        wall_offset: float | None = None,
        project_id: str = "cascadegw-sim",
    ) -> None:
        super().__init__(
            name=name,
            behaviour=behaviour,
            webhook_url=webhook_url,
            seed=seed,
            wall_offset=wall_offset,
        )
        self.project_id = project_id
        self.ingest_endpoint = ""
        """The gateway's ZeroMQ ingest, where the app reports opens; empty: no reports."""
        self.app_timeout_seconds = 10.0
        """How long the app waits for the gateway's answer to a report."""
        self.private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.public_key = self.private_key.public_key()
        self.private_key_id = secrets.token_hex(20)
        self.client_email = f"{name.replace('_', '-')}@{project_id}.iam.gserviceaccount.com"
        self._tokens: dict[str, float] = {}
        """Issued access token -> wall-clock expiry."""
        self.app_reports: list[AppReport] = []
        """HTTP status of every tracked-link GET (a redirect, 302/307, expected; 0 = no answer)."""
        self._nursery: trio.Nursery | None = None
        self._app_client: AsyncClient | None = None
        self._app_lock = trio.Lock()

    # ------------------------------------------------------------ credentials
    @property
    def token_uri(self) -> str:
        return f"{self.url}/token"

    def service_account(self) -> dict[str, str]:
        """A service-account key file, as the Firebase console hands it out."""
        pem = self.private_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        return {
            "type": "service_account",
            "project_id": self.project_id,
            "private_key_id": self.private_key_id,
            "private_key": pem.decode(),
            "client_email": self.client_email,
            "client_id": str(self.random.getrandbits(64)),
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": self.token_uri,
        }

    def credentials(self) -> dict[str, object]:
        return {
            "url": self.url,
            "project_id": self.project_id,
            "service_account_json": Secret(msgspec.json.encode(self.service_account()).decode()),
        }

    # ------------------------------------------------------------ serving
    async def serve(
        self,
        bind: str = "127.0.0.1:0",
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            url = await nursery.start(super().serve, bind)
            task_status.started(url)

    def routes(self) -> list[Route]:
        return [
            Route("POST", "/token", self._token),
            Route("POST", "/v1/projects/{project_id}/messages:send", self._send),
        ]

    # ------------------------------------------------------------ OAuth2 token endpoint
    async def _token(self, request: Request) -> Response:
        body = await self.record(request)
        await self.delay()
        form = parse_qs(body.decode(errors="replace"))
        grant_type = form.get("grant_type", [""])[0]
        assertion = form.get("assertion", [""])[0]
        if grant_type != JWT_BEARER_GRANT:
            return _oauth_error("unsupported_grant_type", f"Invalid grant_type: {grant_type}")
        if not assertion:
            return _oauth_error("invalid_request", "Missing required parameter: assertion")
        try:
            header, claims = decode_jwt(assertion, public_key=self.public_key)
        except ValueError:
            return _oauth_error("invalid_grant", "Invalid JWT Signature.")
        if header.get("kid") != self.private_key_id:
            return _oauth_error("invalid_grant", "Invalid JWT Signature.")
        if claims.get("iss") != self.client_email:
            return _oauth_error("invalid_grant", "Invalid grant: account not found")
        # Google's token endpoint wants its own current URL as the audience, whichever URL
        # the grant was posted to (google-auth always sends that one)
        if claims.get("aud") != GOOGLE_TOKEN_AUDIENCE:
            return _oauth_error("invalid_grant", "Invalid JWT: audience mismatch.")
        if SCOPE not in str(claims.get("scope", "")).split():
            return _oauth_error("invalid_scope", "Invalid OAuth scope or ID token audience.")
        now = self.wall_now()
        issued, expires = claims.get("iat"), claims.get("exp")
        if (
            not isinstance(issued, int)
            or not isinstance(expires, int)
            or issued > now + CLOCK_SKEW_SECONDS
            or expires < now - CLOCK_SKEW_SECONDS
            or expires - issued > ASSERTION_LIFETIME_SECONDS
        ):
            return _oauth_error(
                "invalid_grant",
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a "
                "reasonable timeframe. Check your iat and exp values in the JWT claim.",
            )
        self._tokens = {t: at for t, at in self._tokens.items() if at > now}
        token = f"ya29.sim-{secrets.token_urlsafe(32)}"
        self._tokens[token] = now + TOKEN_LIFETIME_SECONDS
        return json_response(
            {"access_token": token, "expires_in": TOKEN_LIFETIME_SECONDS, "token_type": "Bearer"}
        )

    def revoke_tokens(self) -> None:
        """Forget every issued access token (as if revoked): the next send gets a 401."""
        self._tokens.clear()

    # ------------------------------------------------------------ messages:send
    def _authorised(self, request: Request) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        expiry = self._tokens.get(token)
        return scheme.lower() == "bearer" and expiry is not None and expiry > self.wall_now()

    async def _send(self, request: Request) -> Response:
        body = await self.record(request)
        await self.delay()
        if not self._authorised(request):
            return json_response(
                google_error(
                    401,
                    "UNAUTHENTICATED",
                    "Request had invalid authentication credentials. Expected OAuth 2 access "
                    "token, login cookie or other valid authentication credential.",
                ),
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/"'},
            )
        if request.params["project_id"] != self.project_id:
            return json_response(
                google_error(
                    403,
                    "PERMISSION_DENIED",
                    "Permission 'cloudmessaging.messages.create' denied on resource.",
                ),
                status=403,
            )
        document, problem = _validate(body)
        if problem is not None:
            return json_response(problem, status=400)
        assert document is not None
        message: dict[str, Any] = document["message"]
        token = message.get("token")
        if not isinstance(token, str):
            # topics and conditions fan out to devices we do not simulate: accepted, no app
            return self._accepted()
        failure = self.api_failure(token)
        if failure is not None:
            return json_response(
                failure.body or default_error(failure.status),
                status=failure.status,
                headers=failure.headers,
            )
        if self.fate(token) is Fate.INVALID:
            return json_response(
                google_error(
                    404, "NOT_FOUND", "Requested entity was not found.", fcm_code="UNREGISTERED"
                ),
                status=404,
            )
        if document.get("validate_only") is True:
            return json_response({"name": f"projects/{self.project_id}/messages/fake_message_id"})
        self._engage(token, message.get("data") or {})
        return self._accepted()

    def _accepted(self) -> Response:
        message_id = f"0:{int(self.wall_now() * 1000)}%{secrets.token_hex(8)}"
        return json_response({"name": f"projects/{self.project_id}/messages/{message_id}"})

    # ------------------------------------------------------------ the app on the phone
    def _engage(self, token: str, data: dict[str, str]) -> None:
        _, read, clicked, _, _ = self.engagement(token)
        key = data.get(KEY_DATA)
        link = data.get(LINK_DATA)
        if not read or key is None:
            return

        async def opened() -> None:
            await self._report_open(key)
            if clicked and link is not None:
                await self.tap(link)

        self.later(self.jitter(self.behaviour.read_delay_seconds), opened)

    async def _report_open(self, key: str) -> None:
        if not self.ingest_endpoint:
            return
        tenant, message_id = split_key(key)
        try:
            client = await self._app()
            reply = await client.event(message_id, tenant, kind="opened", channel="push")
        except (ClientError, zmq.ZMQError):
            reply = None
        self.app_reports.append(AppReport("opened", key, reply))

    async def _app(self) -> AsyncClient:
        """One long-lived DEALER for every report (a socket per open would cost a handshake)."""
        async with self._app_lock:
            if self._app_client is None:
                nursery = self._nursery
                assert nursery is not None, "the simulator is not serving"
                self._app_client = await nursery.start(self._run_app_client)
            return self._app_client

    async def _run_app_client(
        self, *, task_status: trio.TaskStatus[AsyncClient] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            async with open_client(
                self.ingest_endpoint, timeout_seconds=self.app_timeout_seconds
            ) as client:
                task_status.started(client)
                await trio.sleep_forever()
        finally:
            self._app_client = None


def _oauth_error(error: str, description: str) -> Response:
    """RFC 6749 section 5.2, as Google's token endpoint answers."""
    return json_response({"error": error, "error_description": description}, status=400)


def _invalid(message: str, field: str | None = None) -> dict[str, Any]:
    return google_error(400, "INVALID_ARGUMENT", message, fcm_code="INVALID_ARGUMENT", field=field)


def _validate(body: bytes) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """``(document, None)`` when FCM would accept the body, else ``(None, error body)``."""
    try:
        document = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return None, google_error(400, "INVALID_ARGUMENT", "Invalid JSON payload received.")
    if not isinstance(document, dict) or not isinstance(document.get("message"), dict):
        return None, _invalid("Invalid JSON payload received. 'message' is required.", "message")
    unknown = set(document) - {"message", "validate_only"}
    message: dict[str, Any] = document["message"]
    unknown |= set(message) - _MESSAGE_FIELDS
    if unknown:
        name = sorted(unknown)[0]
        return None, google_error(
            400, "INVALID_ARGUMENT", f'Invalid JSON payload received. Unknown name "{name}"'
        )
    targets = [t for t in ("token", "topic", "condition") if message.get(t)]
    if not targets:
        return None, _invalid("Recipient of the message is not set.", "message")
    if len(targets) > 1:
        return None, _invalid("Exactly one of token, topic or condition must be set.", "message")
    if "token" in targets and not isinstance(message["token"], str):
        return None, _invalid("Invalid registration token", "message.token")
    notification = message.get("notification", {})
    if not isinstance(notification, dict) or not all(
        isinstance(notification.get(f, ""), str) for f in ("title", "body", "image")
    ):
        return None, _invalid("Invalid value at 'message.notification'", "message.notification")
    data = message.get("data", {})
    if not isinstance(data, dict):
        return None, _invalid("Invalid value at 'message.data'", "message.data")
    for index, (key, value) in enumerate(data.items()):
        if not isinstance(value, str):
            field = f"message.data[{index}].value"
            return None, _invalid(f"Invalid value at '{field}' (TYPE_STRING)", field)
        if key in _RESERVED_DATA_KEYS or key.startswith(("google", "gcm")):
            return None, _invalid(f"Invalid data payload key: {key}", "message.data")
    android = message.get("android", {})
    # the published enum is NORMAL/HIGH; firebase-admin sends "normal"/"high" and FCM takes both
    priority = android.get("priority", "NORMAL") if isinstance(android, dict) else None
    if not isinstance(priority, str) or priority.upper() not in ("NORMAL", "HIGH"):
        return None, _invalid(
            "Invalid value at 'message.android.priority'", "message.android.priority"
        )
    size = len(msgspec.json.encode(notification)) + len(msgspec.json.encode(data))
    if size > MAX_PAYLOAD_BYTES:
        return None, google_error(400, "INVALID_ARGUMENT", "Request contains an invalid argument.")
    return document, None
