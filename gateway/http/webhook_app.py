"""The webhook and tracking server as its own processes (``http.webhook_processes = N``).

hypercorn runs ``create_app()`` in each of its worker processes. The app serves exactly the
router's public routes (``gateway.http.public``) but hands what it verifies to a ZeroMQ PUSH
socket connected to the router's event socket, so several processes can verify signatures in
parallel while the router stays the only owner of state. A full socket answers webhooks 503:
providers retry, nothing is lost.

The process learns its wiring from the environment the router starts it with:
``CASCADEGW_CONFIG`` (config path), ``CASCADEGW_EVENTS`` (the router's PULL endpoint),
``CASCADEGW__TRACKING_SECRET`` and the providers' secrets.
"""

from __future__ import annotations

import os
from pathlib import Path

import zmq
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.config import load_config
from gateway.http import inbound
from gateway.http.inbound import Inbound, SinkFull
from gateway.http.public import public_routes
from gateway.runtime.clock import wall_time
from gateway.tracking import LinkSigner


def create_app() -> Starlette:
    config = load_config(Path(os.environ["CASCADEGW_CONFIG"]).read_bytes(), os.environ)
    secret = config.tracking_secret
    if secret is None:
        raise RuntimeError("webhook processes need CASCADEGW__TRACKING_SECRET (the router sets it)")
    links = LinkSigner(secret.reveal().encode(), config.http.public_url)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock: zmq.Socket[bytes] = context.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 2000)  # let queued receipts reach the router on shutdown
    sock.setsockopt(zmq.SNDHWM, 10_000)
    sock.connect(os.environ["CASCADEGW_EVENTS"])

    def sink(item: Inbound) -> None:
        # send-only and non-blocking: no task ever waits on this socket's FD, so handlers on
        # many trio tasks may share it
        try:
            sock.send(inbound.encoder.encode(item), zmq.NOBLOCK)
        except zmq.Again as exc:
            raise SinkFull from exc

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    routes = [
        *public_routes(config=config, links=links, sink=sink, now=wall_time),
        Route("/healthz", healthz, methods=["GET"]),
    ]
    return Starlette(routes=routes)
