"""The endpoints providers and recipients reach: signed webhooks and tracking links.

- ``POST /webhooks/{provider}``: verified with the provider's own scheme (SendGrid ECDSA,
  Viber HMAC-SHA256, Twilio HMAC-SHA1); a missing, forged or stale signature gets 403 and
  nothing is processed; a body that verifies but cannot be parsed gets 400.
- ``GET /t/c/{token}``: click tracker; counts as read on any channel, then redirects.
- ``GET /t/o/{token}.gif``: the email open pixel.
- ``GET|POST /t/u/{token}``: unsubscribe; ``POST`` is RFC 8058 one-click
  (``List-Unsubscribe=One-Click``) and withdraws consent at once; ``GET`` shows a page whose
  button posts the same form, because mail scanners follow GET links and must not unsubscribe.

Everything verified is handed to an ``InboundSink`` (``gateway.http.inbound``).
"""

from __future__ import annotations

import base64
import html
from collections.abc import Callable

import structlog
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from adapters import WebhookRejected
from adapters.registry import PARSERS, VERIFIERS
from gateway.config import GatewayConfig
from gateway.core.model import split_key
from gateway.http.inbound import (
    HitKind,
    InboundSink,
    SinkFull,
    TrackingHit,
    WebhookReceipts,
    WebhookVerdict,
)
from gateway.tracking import LinkKind, LinkPayload, LinkSigner

log = structlog.get_logger("gateway.http")

_PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///ywAAAAAAQABAAACAUwAOw==")
_NO_CACHE = {"Cache-Control": "no-store, max-age=0"}


def public_routes(
    *,
    config: GatewayConfig,
    links: LinkSigner,
    sink: InboundSink,
    now: Callable[[], float],
) -> list[Route]:
    async def webhook(request: Request) -> Response:
        name = request.path_params["provider"]
        provider = config.providers.get(name)
        if provider is None:
            return Response("unknown provider", status_code=404)
        body = await request.body()
        headers = {key.lower(): value for key, value in request.headers.items()}
        # providers sign the URL they called, which is our public URL, not the socket address
        url = (
            links.public_url
            + request.url.path
            + (f"?{request.url.query}" if request.url.query else "")
        )
        try:
            VERIFIERS[provider.kind](
                url=url, headers=headers, body=body, config=provider, now=now()
            )
            receipts = PARSERS[provider.kind](url=url, headers=headers, body=body)
        except WebhookRejected as rejected:
            log.warning("webhook_rejected", provider=name, verdict=rejected.verdict)
            status = 400 if rejected.verdict == "malformed" else 403
            try:
                sink(WebhookVerdict(name, rejected.verdict))
            except SinkFull:
                log.warning("webhook_verdict_not_counted", provider=name)
            return Response(rejected.verdict, status_code=status)
        try:
            sink(WebhookReceipts(name, receipts, now()))
        except SinkFull:
            # not taken: the provider retries a 503, so the receipt is delayed, not lost
            return Response("busy, retry later", status_code=503, headers={"Retry-After": "5"})
        return Response("ok")

    def verified(kind: HitKind, link_kind: LinkKind, token: str) -> LinkPayload | None:
        """The link's payload, handed to the sink as a hit; None (and a bad-token hit) if forged."""
        payload = links.verify(token)
        hit = (
            TrackingHit(kind, now())
            if payload is None or payload.kind is not link_kind
            else TrackingHit(kind, now(), payload.key, payload.channel)
        )
        try:
            sink(hit)
        except SinkFull:
            # the person still gets their redirect or page; the hit is logged, not counted
            log.warning("tracking_hit_not_delivered", kind=kind.value)
        return payload if hit.key is not None else None

    async def click(request: Request) -> Response:
        payload = verified(HitKind.CLICK, LinkKind.CLICK, request.path_params["token"])
        if payload is None or payload.url is None:
            return Response("unknown link", status_code=404)
        return RedirectResponse(payload.url, status_code=302, headers=_NO_CACHE)

    async def open_pixel(request: Request) -> Response:
        verified(HitKind.OPEN, LinkKind.OPEN, request.path_params["token"])
        return Response(_PIXEL, media_type="image/gif", headers=_NO_CACHE)

    async def unsubscribe_page(request: Request) -> Response:
        token = request.path_params["token"]
        payload = links.verify(token)
        if payload is None or payload.kind is not LinkKind.UNSUBSCRIBE:
            return Response("unknown link", status_code=404)
        tenant = config.tenants.get(split_key(payload.key)[0])
        brand = html.escape(tenant.brand if tenant else "this sender")
        return HTMLResponse(
            f"<!doctype html><title>Unsubscribe</title><h1>Unsubscribe from {brand}</h1>"
            f"<p>Stop receiving {brand} marketing on {payload.channel.value}?</p>"
            f'<form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">'
            f'<button type="submit">Unsubscribe</button></form>',
            headers=_NO_CACHE,
        )

    async def unsubscribe(request: Request) -> Response:
        if (
            verified(HitKind.UNSUBSCRIBE, LinkKind.UNSUBSCRIBE, request.path_params["token"])
            is None
        ):
            return Response("unknown link", status_code=404)
        return HTMLResponse(
            "<!doctype html><title>Unsubscribed</title><h1>You are unsubscribed.</h1>"
        )

    return [
        Route("/webhooks/{provider}", webhook, methods=["POST"]),
        Route("/t/c/{token}", click, methods=["GET"]),
        Route("/t/o/{token}.gif", open_pixel, methods=["GET"]),
        Route("/t/u/{token}", unsubscribe_page, methods=["GET"]),
        Route("/t/u/{token}", unsubscribe, methods=["POST"]),
    ]
