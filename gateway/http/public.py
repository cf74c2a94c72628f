"""The endpoints providers and recipients reach: signed webhooks and tracking links.

- ``POST /webhooks/{provider}``: verified with the provider's own scheme (SendGrid ECDSA,
  Viber HMAC-SHA256, Twilio HMAC-SHA1/SHA-256); a missing, forged or stale signature gets 403
  and nothing is processed; a body that verifies but cannot be parsed gets 400. A 200 means
  the receipts are applied and durable (a provider retries anything else; a retried event is
  applied once). Twilio's inbound messages arrive here too: a STOP withdraws SMS consent.
- ``GET /t/c/{token}``: click tracker; counts as read on any channel, then redirects.
- ``GET /t/o/{token}.gif``: the email open pixel.
- ``HEAD`` on any tracking link answers as ``GET`` would (status, headers, no body) and records
  nothing, not even a refused token: link scanners send HEAD, and RFC 9110 makes it safe.
- ``GET|POST /t/u/{token}``: unsubscribe; ``POST`` is RFC 8058 one-click
  (``List-Unsubscribe=One-Click``) and withdraws consent at once; ``GET`` shows a page whose
  button posts the same form, because mail scanners follow GET links and must not unsubscribe.
  "You are unsubscribed." is only said once the withdrawal is durable.

Everything verified is handed to an ``InboundSink`` (``gateway.inbound``). The routes run on the
lean server (``gateway.httpserver``), not Starlette: they are the gateway's hottest HTTP path.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Callable

import structlog

from adapters import WebhookRejected
from adapters.registry import SPECS
from gateway.config import GatewayConfig, HttpConfig
from gateway.httpserver import (
    Limits,
    Request,
    Response,
    Route,
    fit_connections_to_fd_limit,
    html_response,
    json_response,
    redirect,
    text_response,
)
from gateway.inbound import (
    HitKind,
    InboundSink,
    OptOut,
    SinkFull,
    TrackingHit,
    TrackingVerdict,
    WebhookOutcome,
    WebhookReceipts,
    WebhookVerdict,
)
from gateway.tracking import LinkKind, LinkPayload, LinkRejection, LinkSigner

log = structlog.get_logger("gateway.http")

_PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///ywAAAAAAQABAAACAUwAOw==")
_NO_CACHE = {"Cache-Control": "no-store, max-age=0"}
_HIT_KINDS = {
    LinkKind.CLICK: HitKind.CLICK,
    LinkKind.OPEN: HitKind.OPEN,
    LinkKind.UNSUBSCRIBE: HitKind.UNSUBSCRIBE,
}


def public_routes(
    *,
    config: GatewayConfig,
    links: LinkSigner,
    sink: InboundSink,
    now: Callable[[], float],
) -> list[Route]:
    async def webhook(request: Request) -> Response:
        name = request.params["provider"]
        provider = config.providers.get(name)
        if provider is None:
            return text_response("unknown provider", 404)
        body = request.body
        headers = dict(request.headers)
        # providers sign the URL they called, which is our public URL, not the socket address
        url = links.public_url + request.path + (f"?{request.query}" if request.query else "")
        spec = SPECS[provider.kind]
        try:
            spec.verify_webhook(url=url, headers=headers, body=body, config=provider, now=now())
            receipts = spec.parse_webhook(url=url, headers=headers, body=body)
        except WebhookRejected as rejected:
            log.warning("webhook_rejected", provider=name, verdict=rejected.verdict)
            status = 400 if rejected.verdict == "malformed" else 403
            try:
                sink.notify(WebhookVerdict(name, WebhookOutcome(rejected.verdict)))
            except SinkFull:
                log.warning("webhook_verdict_not_counted", provider=name)
            return text_response(rejected.verdict, status)
        try:
            await sink.deliver(WebhookReceipts(name, receipts))
        except SinkFull:
            # not taken or not yet durable: the provider retries a 503, and a retried event
            # is applied once, so the receipt is delayed, never lost nor doubled
            return text_response("busy, retry later", 503, {"Retry-After": "5"})
        return text_response("ok")

    def verified(link_kind: LinkKind, request: Request) -> LinkPayload | LinkRejection:
        """The link's payload if genuine, unexpired and of this kind; refusals are counted,
        except on HEAD, which records nothing."""
        verdict = links.verify(request.params["token"], now=now())
        if isinstance(verdict, LinkPayload) and verdict.kind is not link_kind:
            verdict = LinkRejection.BAD_TOKEN
        if isinstance(verdict, LinkRejection) and request.method != "HEAD":
            notify(
                TrackingHit(_HIT_KINDS[link_kind], now(), verdict=TrackingVerdict(verdict.value))
            )
        return verdict

    def notify(hit: TrackingHit) -> None:
        try:
            sink.notify(hit)
        except SinkFull:
            # the person still gets their redirect or page; the hit is logged, not counted
            log.warning("tracking_hit_not_delivered", kind=hit.kind.value)

    def refused(verdict: LinkRejection) -> Response:
        if verdict is LinkRejection.EXPIRED:
            return text_response("this link has expired", 410, _NO_CACHE)
        return text_response("unknown link", 404, _NO_CACHE)

    async def click(request: Request) -> Response:
        payload = verified(LinkKind.CLICK, request)
        if isinstance(payload, LinkRejection):
            return refused(payload)
        if request.method != "HEAD":
            notify(TrackingHit(HitKind.CLICK, now(), key=payload.key, channel=payload.channel))
        if payload.url is None:
            return text_response("unknown link", 404)
        return redirect(payload.url, 302, _NO_CACHE)

    async def open_pixel(request: Request) -> Response:
        payload = verified(LinkKind.OPEN, request)
        if isinstance(payload, LinkPayload) and request.method != "HEAD":
            notify(TrackingHit(HitKind.OPEN, now(), key=payload.key, channel=payload.channel))
        return Response(200, _PIXEL, {"content-type": "image/gif", **_NO_CACHE})

    async def unsubscribe_page(request: Request) -> Response:
        payload = verified(LinkKind.UNSUBSCRIBE, request)
        if isinstance(payload, LinkRejection):
            return refused(payload)
        tenant = config.tenants.get(payload.tenant)
        brand = html.escape(tenant.brand if tenant else "this sender")
        return html_response(
            f"<!doctype html><title>Unsubscribe</title><h1>Unsubscribe from {brand}</h1>"
            f"<p>Stop receiving {brand} marketing on {payload.channel.value}?</p>"
            f'<form method="post"><input type="hidden" name="List-Unsubscribe" value="One-Click">'
            f'<button type="submit">Unsubscribe</button></form>',
            headers=_NO_CACHE,
        )

    async def unsubscribe(request: Request) -> Response:
        payload = verified(LinkKind.UNSUBSCRIBE, request)
        if isinstance(payload, LinkRejection):
            return refused(payload)
        if payload.recipient_id is None or payload.tenant not in config.tenants:
            notify(TrackingHit(HitKind.UNSUBSCRIBE, now(), verdict=TrackingVerdict.BAD_TOKEN))
            return refused(LinkRejection.BAD_TOKEN)
        opt_out = OptOut(
            tenant=payload.tenant,
            recipient_id=payload.recipient_id,
            channel=payload.channel,
            at=now(),
            source="one_click",
            topic=payload.topic,
            key=payload.key,
        )
        try:
            await sink.deliver(opt_out)
        except SinkFull:
            # never "You are unsubscribed." before it is true: the person tries again
            return html_response(
                "<!doctype html><title>Try again</title><h1>We could not record that just now."
                "</h1><p>Please try again in a minute.</p>",
                503,
                {"Retry-After": "30", **_NO_CACHE},
            )
        return html_response(
            "<!doctype html><title>Unsubscribed</title><h1>You are unsubscribed.</h1>",
            headers=_NO_CACHE,
        )

    return [
        # provider webhooks may be large (SendGrid batches events); everything else is small
        Route(
            "POST",
            "/webhooks/{provider}",
            webhook,
            max_body_bytes=config.http.webhook_max_body_bytes,
        ),
        Route("GET", "/t/c/{token}", click),
        Route("GET", "/t/o/{token}.gif", open_pixel),
        Route("GET", "/t/u/{token}", unsubscribe_page),
        Route("POST", "/t/u/{token}", unsubscribe),
    ]


def health_routes(ready: Callable[[], bool]) -> list[Route]:
    """``/healthz`` (alive) and ``/readyz`` (recovered, serving) for a load balancer in front of
    the public server: the same answers as the admin server's (``gateway.http.ops``)."""

    async def healthz(_: Request) -> Response:
        return json_response({"status": "ok"})

    async def readyz(_: Request) -> Response:
        if ready():
            return json_response({"status": "ready"})
        return json_response({"status": "starting"}, 503)

    return [Route("GET", "/healthz", healthz), Route("GET", "/readyz", readyz)]


def public_limits(config: HttpConfig) -> Limits:
    """The public server's bounds (``[http]``); the webhook route raises its own body limit.

    Called where the public server starts (the gateway, each webhook process): it raises the
    process's soft descriptor limit as far as ``http.max_connections`` needs, and serves with a
    lower cap, with one warning, when the hard limit is too low for it
    (``gateway.httpserver.fit_connections_to_fd_limit``)."""
    return Limits(
        max_body_bytes=config.admin_max_body_bytes,
        read_timeout_seconds=config.read_timeout_seconds,
        max_concurrent_requests=config.max_concurrent_requests,
        max_connections=fit_connections_to_fd_limit(config.max_connections, name="public"),
    )
