"""The admin API: message timelines, consents and their history, campaign reports.

``GET  /v1/messages/{tenant}/{id}``                    state and whole timeline of a message
``PUT  /v1/recipients/{tenant}/{recipient}/consents``  record consents (JSON list or object)
``GET  /v1/recipients/{tenant}/{recipient}/consents``  effective consents and full history
``GET  /v1/reports/{tenant}/campaigns/{campaign}``     the campaign's funnel and control group
``GET  /v1/reports/{tenant}/experiments/{experiment}`` an experiment's variants side by side

Authorization is by bearer token (``Authorization: Bearer <token>``): ``http.admin_token`` is
the operator's and reaches every tenant; ``tenants.<name>.admin_token`` reaches only that
tenant (403 elsewhere). With no token configured at all the API is open, which the config only
allows on a loopback address.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated, Any, Protocol

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway import reports
from gateway.config import GatewayConfig, Secret
from gateway.core.consent import ConsentAction, ConsentKind, ConsentRecord
from gateway.core.model import Channel, message_key, recipient_key
from gateway.inbound import SinkFull
from gateway.protocol import (
    PROTOCOL_VERSION,
    ConsentRequest,
    Label,
    MessageState,
    Result,
    Timestamp,
    future_time,
    utc,
    validate,
)


class AdminPort(Protocol):
    """What the admin API needs of a running gateway (``gateway.app`` provides it)."""

    def now(self) -> float: ...

    async def message_state(self, key: str) -> MessageState | None: ...

    def record_consent(self, request: ConsentRequest, now: float) -> Result: ...

    async def durable(self) -> None:
        """Return once everything recorded so far is durable.

        Raises:
            SinkFull: not durable within the configured wait.
        """
        ...

    async def consents(self, recipient: str) -> tuple[list[ConsentRecord], list[ConsentRecord]]:
        """The recipient's effective consent records, and the whole history."""
        ...

    async def campaign_rows(
        self, tenant: str, campaign: str
    ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]: ...

    async def experiment_rows(
        self, tenant: str, experiment: str
    ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]: ...


_json = msgspec.json.Encoder()
_MAX_UPDATES = 1000


class ConsentUpdate(msgspec.Struct, forbid_unknown_fields=True):
    kind: ConsentKind
    action: ConsentAction
    source: Label
    channel: Channel | None = None
    topic: Label | None = None
    reason: Annotated[str, msgspec.Meta(max_length=1000)] | None = None
    at: Timestamp | None = None


_updates = msgspec.json.Decoder(list[ConsentUpdate] | ConsentUpdate)


class ConsentView(msgspec.Struct, frozen=True, omit_defaults=True):
    """One consent record as the API shows it: labelled, with an RFC 3339 time."""

    kind: ConsentKind
    action: ConsentAction
    at: datetime
    source: str
    channel: Channel | None = None
    topic: str | None = None
    reason: str | None = None


def _view(record: ConsentRecord) -> ConsentView:
    return ConsentView(
        kind=record.kind,
        action=record.action,
        at=utc(record.at),
        source=record.source,
        channel=record.channel,
        topic=record.topic,
        reason=record.reason,
    )


def _respond(value: object, status: int = 200) -> Response:
    return Response(_json.encode(value), status_code=status, media_type="application/json")


def _problem(status: int, reason: str, detail: str) -> Response:
    return _respond({"reason": reason, "detail": detail}, status)


Handler = Callable[[Request], Awaitable[Response]]


def _bearer(token: Secret | None) -> bytes | None:
    return None if token is None else f"Bearer {token.reveal()}".encode()


def admin_routes(config: GatewayConfig, gateway: AdminPort) -> list[BaseRoute]:
    operator = _bearer(config.http.admin_token)
    tenant_tokens = {
        name: bearer
        for name, tenant in config.tenants.items()
        if (bearer := _bearer(tenant.admin_token)) is not None
    }
    open_api = operator is None and not tenant_tokens

    def holder(given: bytes) -> str | None:
        """Whose token this is: "*" for the operator, a tenant name, or None."""
        found: str | None = None
        # every token is compared, in constant time each: no early exit to time
        if operator is not None and hmac.compare_digest(given, operator):
            found = "*"
        for name, bearer in tenant_tokens.items():
            if hmac.compare_digest(given, bearer) and found is None:
                found = name
        return found

    def guarded(handler: Handler) -> Handler:
        async def check(request: Request) -> Response:
            tenant = request.path_params.get("tenant")
            if not open_api:
                scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
                # the scheme is case-insensitive (RFC 9110 section 11.1)
                given = f"Bearer {credentials.strip()}" if scheme.lower() == "bearer" else ""
                who = holder(given.encode())
                if who is None:
                    return _problem(401, "unauthorized", "the admin API needs a bearer token")
                if who not in ("*", tenant):
                    return _problem(403, "forbidden", "this token is for another tenant")
            if tenant not in config.tenants:
                return _problem(404, "unknown_tenant", "tenant is not configured")
            return await handler(request)

        return check

    async def message(request: Request) -> Response:
        key = message_key(request.path_params["tenant"], request.path_params["id"])
        state = await gateway.message_state(key)
        if state is None:
            return _problem(404, "not_found", "no such message")
        return _respond(state)

    async def put_consents(request: Request) -> Response:
        try:
            decoded = _updates.decode(await request.body())
        except msgspec.ValidationError as exc:
            return _problem(400, "invalid", str(exc))
        except msgspec.DecodeError as exc:
            return _problem(400, "invalid", f"malformed JSON: {exc}")
        updates = decoded if isinstance(decoded, list) else [decoded]
        if len(updates) > _MAX_UPDATES:
            return _problem(400, "invalid", f"at most {_MAX_UPDATES} consent records per request")
        now = gateway.now()
        tenant, recipient = request.path_params["tenant"], request.path_params["recipient"]
        # the same request the ZeroMQ `consent` op carries, validated the same way (its
        # length limits included: building a Struct checks nothing, converting does)
        try:
            requests = [
                msgspec.convert(
                    {
                        "v": PROTOCOL_VERSION,
                        "op": "consent",
                        "tenant": tenant,
                        "recipient_id": recipient,
                        **msgspec.structs.asdict(update),
                    },
                    ConsentRequest,
                )
                for update in updates
            ]
        except msgspec.ValidationError as exc:
            return _problem(400, "invalid", str(exc)[:300])
        for consent in requests:
            problem = validate(consent) or future_time(consent.at, now)
            if problem is not None:
                return _problem(400, "invalid", problem)
        for consent in requests:
            result = gateway.record_consent(consent, now)
            assert result.reason is None, result  # everything it refuses was checked above
        try:
            await gateway.durable()  # durable before we say so
        except SinkFull:
            return _problem(503, "overloaded", "not yet durable (the journal is behind); retry")
        return _respond({"recorded": len(updates)})

    async def get_consents(request: Request) -> Response:
        rkey = recipient_key(request.path_params["tenant"], request.path_params["recipient"])
        effective, history = await gateway.consents(rkey)
        return _respond(
            {"effective": [_view(r) for r in effective], "history": [_view(r) for r in history]}
        )

    prices = config.provider_prices()

    async def campaign_report(request: Request) -> Response:
        tenant, campaign = request.path_params["tenant"], request.path_params["campaign"]
        message_rows, event_rows = await gateway.campaign_rows(tenant, campaign)
        if not message_rows:
            return _problem(404, "not_found", "no messages of this campaign")
        report = reports.build(
            tenant=tenant,
            campaign=campaign,
            currency=config.currency,
            message_rows=message_rows,
            event_rows=event_rows,
            prices=prices,
            sms_price=config.sms_price(tenant),
        )
        return _respond(report)

    async def experiment_report(request: Request) -> Response:
        tenant, name = request.path_params["tenant"], request.path_params["experiment"]
        experiment = config.tenants[tenant].experiments.get(name)
        if experiment is None:
            return _problem(404, "not_found", "the tenant has no experiment of this name")
        message_rows, event_rows = await gateway.experiment_rows(tenant, name)
        report = reports.build_experiment(
            tenant=tenant,
            experiment=name,
            variants=[variant.name for variant in experiment.variants],
            currency=config.currency,
            message_rows=message_rows,
            event_rows=event_rows,
            prices=prices,
            sms_price=config.sms_price(tenant),
        )
        return _respond(report)

    return [
        Route(
            "/v1/reports/{tenant}/campaigns/{campaign}", guarded(campaign_report), methods=["GET"]
        ),
        Route(
            "/v1/reports/{tenant}/experiments/{experiment}",
            guarded(experiment_report),
            methods=["GET"],
        ),
        Route("/v1/messages/{tenant}/{id}", guarded(message), methods=["GET"]),
        Route(
            "/v1/recipients/{tenant}/{recipient}/consents", guarded(put_consents), methods=["PUT"]
        ),
        Route(
            "/v1/recipients/{tenant}/{recipient}/consents", guarded(get_consents), methods=["GET"]
        ),
    ]
