"""The webhook and tracking server as its own processes (``http.webhook_processes = N``).

The router starts N of ``python -m gateway.http.webhook_app``, all listening on one port. Each
serves exactly the router's public routes (``gateway.http.public``, on the lean server) but
hands what it verifies to a ZeroMQ DEALER
connected to the router's event socket, so several processes can verify signatures in
parallel while the router stays the only owner of state. ``deliver`` waits for the router's
answer, which comes once the journal made the event durable; a router that does not answer in
time gets the webhook answered 503: providers retry, nothing is lost or applied twice.

The process learns its wiring from the environment the router starts it with:
``CASCADEGW_CONFIG`` (config path), ``CASCADEGW_EVENTS`` (the router's event endpoint),
``CASCADEGW__TRACKING__SECRET`` and the providers' secrets. The router supervises the processes
(``gateway.runtime.workers.Supervisor``): each writes ``serving`` on the descriptor named by
``CASCADEGW_REPORT_FD`` once it listens, or the one-line reason it cannot bind (and exits 2).
"""

from __future__ import annotations

import os
from functools import partial

import trio
import zmq

from gateway import inbound
from gateway.client import AsyncClient, ClientError, open_client
from gateway.clock import wall_time
from gateway.config import bind_error, bind_holder, load_config, tracking_secrets
from gateway.http.public import health_routes, public_limits, public_routes
from gateway.httpserver import Router, Server, open_listeners, split_bind
from gateway.inbound import Inbound, SinkFull
from gateway.orphans import SERVING, guarded, report_to_router
from gateway.tracking import LinkSigner


class RemoteSink:
    """An ``InboundSink`` whose other end is the router's event socket."""

    def __init__(self) -> None:
        self.client: AsyncClient | None = None
        """Connected for as long as the app's lifespan runs."""

    def notify(self, item: Inbound) -> None:
        client = self._client()
        try:
            # an empty correlation frame: the router applies it and does not answer
            client.sock.send_multipart([b"", inbound.encoder.encode(item)], zmq.NOBLOCK)
        except zmq.Again as exc:
            raise SinkFull("the router's event socket is full") from exc
        client.wake_reader()

    async def deliver(self, item: Inbound) -> None:
        client = self._client()
        try:
            answer = await client.request_raw(inbound.encoder.encode(item))
        except ClientError as exc:
            raise SinkFull("the router did not answer in time") from exc
        if answer != "ok":
            raise SinkFull("the router could not make it durable in time")

    def _client(self) -> AsyncClient:
        if self.client is None:
            raise SinkFull("not connected to the router yet")
        return self.client


async def serve() -> None:
    """One webhook process: the public routes on ``http.webhook_bind``, shared with the other
    processes (``SO_REUSEPORT``: the kernel spreads connections among them)."""
    raw = await trio.Path(os.environ["CASCADEGW_CONFIG"]).read_bytes()
    config = load_config(raw, os.environ)
    secrets = tracking_secrets(config.tracking)
    if not secrets:
        raise RuntimeError(
            "webhook processes need CASCADEGW__TRACKING__SECRET (the router sets it)"
        )
    links = LinkSigner(
        secrets,
        config.http.public_url,
        click_ttl_seconds=config.tracking.click_ttl_seconds,
        unsubscribe_ttl_seconds=config.tracking.unsubscribe_ttl_seconds,
    )
    bind = config.http.webhook_bind
    try:  # first: a process that cannot listen says why and exits, connected to nothing
        listeners = await open_listeners(bind, reuse_port=True)
    except OSError as exc:
        error = bind_error(
            "http.webhook_bind",
            bind,
            exc.errno,
            exc.strerror or str(exc),
            holder=bind_holder(config, "http.webhook_bind", bind),
        )
        report_to_router(str(error))  # the router fails its start with this line
        raise SystemExit(2) from exc
    host, port = split_bind(bind)
    url = f"http://{host}:{listeners[0].socket.getsockname()[1] if port == 0 else port}"
    sink = RemoteSink()
    # a little over the router's own wait, so its "busy" arrives before our timeout
    timeout_seconds = config.http.durable_wait_seconds + 2.0
    async with open_client(
        os.environ["CASCADEGW_EVENTS"], timeout_seconds=timeout_seconds
    ) as client:
        sink.client = client
        routes = [
            *public_routes(config=config, links=links, sink=sink, now=wall_time),
            # alive, not ready: readiness is the router's (its admin server's /readyz)
            *[route for route in health_routes(lambda: True) if route.pattern == "/healthz"],
        ]
        server = Server(Router(routes), public_limits(config.http), name="webhooks")
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(server.serve_listeners, listeners, url=url))
            report_to_router(SERVING)


def main() -> None:
    trio.run(guarded, serve)  # an orphan would share the port, feeding a router that is gone


if __name__ == "__main__":
    main()
