"""The composition root: open the journal, recover, start every service in one nursery.

Single-process mode (the default) wires the dispatcher to in-process adapters. The same router,
committer, timer service and ingest run in every mode; ``--workers N`` only swaps the executor
(``gateway.runtime.workers``) and the webhook processes only add an event socket.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import hypercorn.config
import hypercorn.trio
import msgspec
import structlog
import trio
import zmq
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.routing import BaseRoute

from adapters import Adapter
from gateway.config import GatewayConfig
from gateway.core.caps import horizon_seconds
from gateway.http import inbound
from gateway.http.ops import ops_routes
from gateway.runtime import zmqio
from gateway.runtime.clock import Clock
from gateway.runtime.committer import Committer
from gateway.runtime.dispatch import Dispatcher, Executor, InProcessExecutor
from gateway.runtime.ingest import Ingest
from gateway.runtime.metrics import Metrics
from gateway.runtime.publisher import Publisher
from gateway.runtime.router import Router
from gateway.runtime.timers import TimerService
from gateway.store.base import active_pages
from gateway.store.sqlite import SqliteJournal
from gateway.store.state import State
from gateway.tracking import LinkSigner

log = structlog.get_logger("gateway.app")

_PRUNE_INTERVAL_SECONDS = 3600.0


@dataclass
class Gateway:
    """Handles on a running gateway (for the CLI, the HTTP app and tests)."""

    config: GatewayConfig
    clock: Clock
    state: State
    router: Router
    committer: Committer
    dispatcher: Dispatcher
    journal: SqliteJournal
    metrics: Metrics
    registry: CollectorRegistry
    links: LinkSigner
    ingest_endpoint: str = ""
    status_endpoint: str = ""
    http_url: str = ""
    ready: bool = False
    resent_at_start: int = 0
    _ingest_scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    async def shutdown(self, *, grace_seconds: float = 10.0) -> None:
        """Stop taking requests, let in-flight provider requests finish, commit what is staged."""
        self.ready = False
        self._ingest_scope.cancel()
        with trio.move_on_after(grace_seconds):
            await self.dispatcher.wait_idle()
        await self.committer.drain()


def policy_horizon(config: GatewayConfig) -> float:
    """How far back any cap rule of any tenant looks."""
    return max((horizon_seconds(config.policy_rules(t).caps) for t in config.tenants), default=0.0)


@asynccontextmanager
async def open_gateway(
    config: GatewayConfig,
    *,
    adapters: Mapping[str, Adapter] | None = None,
    executor: Executor | None = None,
    wall_at_start: float | None = None,
    clock: Clock | None = None,
    extra_routes: Callable[[Gateway], list[BaseRoute]] | None = None,
    serve_http: bool = True,
    tracking_secret: bytes | None = None,
    events_endpoint: str | None = None,
) -> AsyncIterator[Gateway]:
    """Run a gateway for the duration of the ``async with`` block.

    Args:
        adapters: provider name -> adapter, for in-process dispatch.
        executor: instead of ``adapters``, e.g. a worker pool.
        wall_at_start: pretend wall time (tests); defaults to the real clock.
        clock: the clock to use (shared with simulators and adapters); overrides wall_at_start.
        extra_routes: more HTTP routes (webhooks, tracking, admin), given the gateway.
        tracking_secret: signs tracking links; from the config or random when unset.
        events_endpoint: bind a PULL socket here for events from webhook processes.
    """
    if executor is None:
        if adapters is None:
            raise ValueError("open_gateway needs adapters or an executor")
        executor = InProcessExecutor(adapters)
    if clock is None:
        clock = Clock(wall_at_start)
    registry = CollectorRegistry()
    metrics = Metrics(registry, {name: p.channel for name, p in config.providers.items()})
    journal = SqliteJournal(config.store.path, synchronous=config.store.synchronous.value)
    await journal.open()
    state = State(horizon_seconds=policy_horizon(config))
    committer = Committer(journal, metrics)
    secret = tracking_secret
    if secret is None:
        configured = config.tracking_secret
        secret = configured.reveal().encode() if configured is not None else secrets.token_bytes(32)
    links = LinkSigner(secret, config.http.public_url)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        async with (
            zmqio.open_socket(
                context,
                zmq.ROUTER,
                bind=config.ingest.bind,
                options={
                    zmq.ROUTER_MANDATORY: 1,  # else replies to vanished peers vanish silently
                    zmq.RCVHWM: 10_000,
                    zmq.SNDHWM: 100_000,
                    zmq.MAXMSGSIZE: 4 * config.ingest.max_frame_bytes,
                },
            ) as router_sock,
            zmqio.open_socket(
                context, zmq.PUB, bind=config.ingest.status_bind, options={zmq.SNDHWM: 100_000}
            ) as pub_sock,
        ):
            publisher = Publisher(pub_sock, metrics)
            router = Router(
                config=config,
                state=state,
                journal=journal,
                committer=committer,
                metrics=metrics,
                clock=clock,
                publish=publisher.publish,
            )
            dispatcher = Dispatcher(
                config=config,
                router=router,
                executor=executor,
                journal=journal,
                clock=clock,
                metrics=metrics,
                links=links,
                seed=config.simulator.seed,
            )
            router.submit = dispatcher.submit
            router.queue_depth = dispatcher.depth
            timers = TimerService(router, state, clock)
            gateway = Gateway(
                config=config,
                clock=clock,
                state=state,
                router=router,
                committer=committer,
                dispatcher=dispatcher,
                journal=journal,
                metrics=metrics,
                registry=registry,
                links=links,
                ingest_endpoint=zmqio.bound_endpoint(router_sock),
                status_endpoint=zmqio.bound_endpoint(pub_sock),
            )
            await _recover(gateway)
            metrics.watch(
                queue_depth=dispatcher.depth,
                inflight=dispatcher.inflight,
                timers=state.pending_timers,
                active=lambda: len(state.records),
                deferred=lambda: state.deferred,
            )
            ingest = Ingest(
                router_sock,
                router=router,
                committer=committer,
                metrics=metrics,
                config=config.ingest,
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(committer.serve)
                await nursery.start(publisher.serve)
                await nursery.start(dispatcher.serve)
                await nursery.start(timers.serve)
                nursery.start_soon(_housekeeping, gateway)
                if serve_http:
                    routes: list[BaseRoute] = [*ops_routes(registry, lambda: gateway.ready)]
                    if extra_routes is not None:
                        routes = [*routes, *extra_routes(gateway)]
                    hypercorn_config = hypercorn.config.Config()
                    hypercorn_config.bind = [config.http.bind]
                    hypercorn_config.accesslog = None
                    hypercorn_config.errorlog = None
                    binds = await nursery.start(
                        hypercorn.trio.serve, Starlette(routes=routes), hypercorn_config
                    )
                    gateway.http_url = binds[0]
                    if not config.http.public_url:
                        links.public_url = gateway.http_url
                if events_endpoint is not None:
                    await nursery.start(_serve_events, context, events_endpoint, router)
                await nursery.start(_serve_ingest, ingest, gateway._ingest_scope)
                gateway.ready = True
                log.info(
                    "gateway_started",
                    ingest=gateway.ingest_endpoint,
                    status=gateway.status_endpoint,
                    http=gateway.http_url,
                    active=len(state.records),
                    resent=gateway.resent_at_start,
                )
                try:
                    yield gateway
                finally:
                    gateway.ready = False
                    nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await committer.drain()
            await journal.aclose()
        context.term()


async def _serve_ingest(
    ingest: Ingest,
    scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    with scope:
        await ingest.serve(task_status=task_status)


async def _serve_events(
    context: zmq.Context[zmq.Socket[bytes]],
    endpoint: str,
    router: Router,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Receipts, verdicts and tracking hits from webhook processes, applied by the router."""
    async with zmqio.open_socket(
        context, zmq.PULL, bind=endpoint, options={zmq.RCVHWM: 100_000}
    ) as sock:
        task_status.started()
        while True:
            while zmqio.readable(sock):
                frame = sock.recv(zmq.NOBLOCK)
                try:
                    item = inbound.decoder.decode(frame)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    log.error("inbound_event_undecodable", size=len(frame))
                    continue
                router.inbound(item)
            await zmqio.wait_readable(sock)


_RECOVERY_PAGE = 10_000


async def _recover(gateway: Gateway) -> None:
    config = gateway.config
    state = gateway.state
    now = gateway.clock.now()
    recovered = await gateway.journal.recover(
        now=now,
        retention_seconds=config.store.idempotency_retention_seconds,
        horizon_seconds=state.horizon_seconds,
    )
    state.finished.update(recovered.finished)
    for rkey, record in recovered.consents:
        state.apply_consent(rkey, record)
    for rkey, entry in recovered.sends:
        state.record_send(rkey, entry)
    state.recipients_by_address.update(recovered.addresses)
    active = resent = 0
    # page by page: each page's copies are freed before the next page is decoded
    async for records in active_pages(gateway.journal, limit=_RECOVERY_PAGE):
        active += len(records)
        resent += len(gateway.router.restore(records, now=now))
    gateway.resent_at_start = resent
    if active or recovered.finished:
        log.info(
            "journal_recovered",
            active=active,
            finished=len(recovered.finished),
            resent=resent,
        )


async def _housekeeping(gateway: Gateway) -> None:
    """Forget idempotency keys past retention; prune the journal hourly.

    Sleeps until the next thing is due rather than polling, so a day of virtual time in a test
    costs a handful of wake-ups.
    """
    clock = gateway.clock
    state = gateway.state
    retention = gateway.config.store.idempotency_retention_seconds
    next_prune = clock.now() + _PRUNE_INTERVAL_SECONDS
    while True:
        now = clock.now()
        state.forget_finished(older_than=now - retention)
        if now >= next_prune:
            pruned = await gateway.journal.prune(
                now=now, retention_seconds=retention, horizon_seconds=state.horizon_seconds
            )
            log.info("journal_pruned", messages=pruned)
            next_prune = now + _PRUNE_INTERVAL_SECONDS
        oldest = state.oldest_finished()
        wake = next_prune if oldest is None else min(next_prune, oldest + retention)
        await trio.sleep_until(clock.trio_deadline(max(wake, now + 1.0)))
