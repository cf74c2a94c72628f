"""The composition root: open the journal, recover, start every service in one nursery.

The one module that wires the runtime (state, engine, sockets) to the HTTP surface; the two
never import each other (``gateway.inbound`` is what crosses between them).

Single-process mode (the default) wires the dispatcher to in-process adapters. The same router,
committer, timer service and ingest run in every mode; ``--workers N`` only swaps the executor
(``gateway.runtime.workers``) and the webhook processes only add an event socket.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import hypercorn.config
import hypercorn.trio
import structlog
import trio
import zmq
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.routing import BaseRoute

from adapters import Adapter
from gateway import httpserver
from gateway.clock import Clock
from gateway.config import GatewayConfig, bind_error, bind_holder
from gateway.core.caps import horizon_seconds
from gateway.core.consent import ConsentRecord
from gateway.core.errors import ConfigError
from gateway.core.model import RecipientKey
from gateway.http.admin import admin_routes
from gateway.http.limits import bounded
from gateway.http.ops import ops_routes
from gateway.http.public import health_routes, public_limits, public_routes
from gateway.protocol import ConsentRequest, MessageState, Result
from gateway.runtime import curve, zmqio
from gateway.runtime import edge as edge_link
from gateway.runtime.committer import Committer
from gateway.runtime.cpu import CpuAccounting
from gateway.runtime.dispatch import Dispatcher, Executor, InProcessExecutor
from gateway.runtime.experiments import fingerprints as experiment_fingerprints
from gateway.runtime.inbox import Inbox, serve_events
from gateway.runtime.ingest import Ingest
from gateway.runtime.keyfile import link_secrets
from gateway.runtime.metrics import Metrics
from gateway.runtime.publisher import Publisher
from gateway.runtime.queues import DispatchQueues
from gateway.runtime.router import Router
from gateway.runtime.timers import TimerAlarm, TimerService
from gateway.store.base import Journal
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
    inbox: Inbox
    metrics: Metrics
    registry: CollectorRegistry
    links: LinkSigner
    ingest_endpoint: str = ""
    status_endpoint: str = ""
    http_url: str = ""
    """The admin server (metrics, health, admin API)."""
    public_http_url: str = ""
    """Where webhooks and tracking links are served (``http.public_bind``, or the webhook
    processes' ``http.webhook_bind``)."""
    ready: bool = False
    """Recovered and serving; ``accepting`` also needs the journal to be writable."""
    resent_at_start: int = 0
    _ingest_scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    def accepting(self) -> bool:
        """What /readyz reports: a load balancer should send traffic elsewhere while the
        journal cannot commit (every send would be refused as overloaded)."""
        return self.ready and self.committer.unavailable is None

    async def shutdown(self, *, grace_seconds: float = 10.0) -> None:
        """Stop taking requests, let in-flight provider requests finish, commit what is staged."""
        self.ready = False
        self._ingest_scope.cancel()
        with trio.move_on_after(grace_seconds):
            await self.dispatcher.wait_idle()
        await self.committer.drain()


class _AdminPort:
    """The running gateway as the admin API sees it (``gateway.http.admin.AdminPort``)."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.now = gateway.clock.now

    async def message_state(self, key: str) -> MessageState | None:
        return await self.gateway.router.queries.message_state(key)

    def record_consent(self, request: ConsentRequest, now: float) -> Result:
        return self.gateway.router.admission.consent(request, now)

    async def durable(self) -> None:
        await self.gateway.inbox.durable()

    async def consents(self, recipient: str) -> tuple[list[ConsentRecord], list[ConsentRecord]]:
        return await self.gateway.router.queries.consents(RecipientKey(recipient))

    async def campaign_rows(
        self, tenant: str, campaign: str
    ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        return await self.gateway.journal.campaign_rows(tenant, campaign)

    async def experiment_rows(
        self, tenant: str, experiment: str
    ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        return await self.gateway.journal.experiment_rows(tenant, experiment)


async def check_experiments(journal: Journal, config: GatewayConfig) -> None:
    """Pin each experiment's definition in the journal; refuse a changed one under its name.

    An experiment runs from the first start of a gateway whose config has it: its
    assignments are comparable only under one definition (variants, weights, channels, unread
    timeouts, send windows, salt). The journal keeps only the definition's fingerprint, so
    the refusal cannot say which part changed, and does not guess.

    Raises:
        ConfigError: an experiment's definition differs from the one the journal first ran.
    """
    now = experiment_fingerprints(config)
    changed = await journal.pin_experiments(now)
    if changed:
        key = min(changed)
        tenant, _, name = key.removeprefix("experiment:").partition("/")
        raise ConfigError(
            f"tenants.{tenant}.experiments.{name}: its definition (variants, weights, "
            "channels or the tenant cascade they run on, unread timeouts, send windows, salt) "
            "differs from the one this journal "
            f"first ran it with (fingerprint {changed[key]}, now {now[key]}); assignments "
            "would no longer be comparable: restore the definition or give the changed "
            "experiment a new name"
        )


@dataclass(frozen=True)
class EdgeLink:
    """The ZeroMQ edge process in front of the router (``gateway.runtime.edge``): the internal
    endpoints the router binds for it, and the public ones it serves to clients."""

    requests_endpoint: str
    status_endpoint: str
    public_ingest_endpoint: str
    public_status_endpoint: str


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
    serve_http: bool = True,
    tracking_secrets: list[bytes] | None = None,
    events_endpoint: str | None = None,
    edge: EdgeLink | None = None,
) -> AsyncIterator[Gateway]:
    """Run a gateway for the duration of the ``async with`` block.

    Args:
        adapters: provider name -> adapter, for in-process dispatch.
        executor: instead of ``adapters``, e.g. a worker pool.
        wall_at_start: pretend wall time (tests); defaults to the real clock.
        clock: the clock to use (shared with simulators and adapters); overrides wall_at_start.
        serve_http: serve the admin API, metrics, webhooks and tracking links.
        tracking_secrets: sign and verify tracking links; the configured (or kept) ones if None.
        events_endpoint: bind a ROUTER socket here for webhook processes' events.
        edge: the ZeroMQ edge process serves clients; the router binds only its link to it.

    Raises:
        gateway.store.base.JournalError: the journal is missing (and ``store.create`` is off)
            or a row cannot be read.
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
    await journal.open(create=config.store.create)
    try:
        await check_experiments(journal, config)
    except BaseException:
        await journal.aclose()
        raise
    cpu = None
    if config.diagnostics.cpu_breakdown:
        cpu = CpuAccounting(lambda: journal.thread_cpu_seconds)
        registry.register(cpu)
    state = State(horizon_seconds=policy_horizon(config))
    committer = Committer(journal, metrics)
    links = LinkSigner(
        tracking_secrets
        if tracking_secrets is not None
        else link_secrets(config, journal_is_new=journal.created),
        config.http.public_url,
        click_ttl_seconds=config.tracking.click_ttl_seconds,
        unsubscribe_ttl_seconds=config.tracking.unsubscribe_ttl_seconds,
    )
    principals = curve.principals(config)
    secret_key = config.ingest.curve_secret_key
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        async with AsyncExitStack() as sockets:
            zap_sock = None
            if principals is not None and edge is None:
                zap_sock = curve.open_zap_socket(context)
                sockets.callback(zmqio.close, zap_sock)
            if edge is None:
                router_options: dict[int, int] = {
                    zmq.ROUTER_MANDATORY: 1,  # else replies to vanished peers vanish silently
                    # per client: frames waiting to be read, replies waiting to be taken
                    # (a client that stops reading loses replies past this, counted)
                    zmq.RCVHWM: 1_000,
                    zmq.SNDHWM: 1_000,
                    # bytes per part: bigger frames up to this get an `invalid` reply; past
                    # it libzmq drops the connection (it cannot answer what it refused)
                    zmq.MAXMSGSIZE: 8 * config.ingest.max_frame_bytes,
                }
            else:  # the edge's link: it bounded every frame before sending it
                router_options = {
                    zmq.ROUTER_MANDATORY: 1,
                    zmq.RCVHWM: edge_link.INTERNAL_HWM,
                    zmq.SNDHWM: edge_link.REPLY_HWM,
                }
            router_sock = await sockets.enter_async_context(
                zmqio.open_socket(context, zmq.ROUTER, options=router_options)
            )
            pub_sock = await sockets.enter_async_context(
                zmqio.open_socket(
                    context,
                    zmq.XPUB,
                    options={zmq.SNDHWM: 100_000, zmq.XPUB_MANUAL: 1, zmq.MAXMSGSIZE: 4096},
                )
            )
            if edge is None:
                if secret_key is not None:
                    curve.make_server(router_sock, secret_key.reveal())
                    curve.make_server(pub_sock, secret_key.reveal())
                _bind(config, router_sock, "ingest.bind", config.ingest.bind)
                _bind(config, pub_sock, "ingest.status_bind", config.ingest.status_bind)
                ingest_endpoint = zmqio.bound_endpoint(router_sock)
                status_endpoint = zmqio.bound_endpoint(pub_sock)
            else:
                router_sock.bind(edge.requests_endpoint)
                pub_sock.bind(edge.status_endpoint)
                ingest_endpoint = edge.public_ingest_endpoint
                status_endpoint = edge.public_status_endpoint
            # behind the edge, it applies each subscriber's allowed tenants
            publisher = Publisher(
                pub_sock,
                metrics,
                principals=principals if edge is None else None,
                # behind the edge, its own link topic (its sign of life) is allowed too
                tenants=frozenset(config.tenants)
                if edge is None
                else frozenset((*config.tenants, edge_link.LINK_TOPIC.decode())),
                count_subscriptions=edge is None,
            )
            queues = DispatchQueues(config)
            alarm = TimerAlarm()
            router = Router(
                config=config,
                state=state,
                journal=journal,
                committer=committer,
                metrics=metrics,
                clock=clock,
                publish=publisher.publish,
                dispatch=queues,
                alarm=alarm,
            )
            dispatcher = Dispatcher(
                config=config,
                queues=queues,
                feedback=router.feedback,
                executor=executor,
                journal=journal,
                clock=clock,
                metrics=metrics,
                links=links,
                seed=config.simulator.seed,
            )
            timers = TimerService(state, clock, alarm, router.engine.fire_timers)
            inbox = Inbox(
                router=router,
                journal=journal,
                committer=committer,
                metrics=metrics,
                durable_wait_seconds=config.http.durable_wait_seconds,
            )
            gateway = Gateway(
                config=config,
                clock=clock,
                state=state,
                router=router,
                committer=committer,
                dispatcher=dispatcher,
                journal=journal,
                inbox=inbox,
                metrics=metrics,
                registry=registry,
                links=links,
                ingest_endpoint=ingest_endpoint,
                status_endpoint=status_endpoint,
            )
            gateway.resent_at_start = await router.recover(now=clock.now())
            metrics.watch(
                queue_depth=queues.depth,
                inflight=dispatcher.inflight,
                timers=state.pending_timers,
                active=lambda: len(state.records),
                deferred=state.deferred,
            )
            ingest = Ingest(
                router_sock,
                router=router,
                committer=committer,
                metrics=metrics,
                config=config.ingest,
                principals=principals,
                behind_edge=edge is not None,
            )
            if cpu is not None:
                trio.lowlevel.add_instrument(cpu)
                sockets.callback(trio.lowlevel.remove_instrument, cpu)
            async with trio.open_nursery() as nursery:
                if zap_sock is not None and principals is not None:
                    await nursery.start(curve.serve_zap, zap_sock, principals)
                await nursery.start(committer.serve)
                await nursery.start(publisher.serve)
                if edge is not None:
                    # the edge's link: until it subscribes, status events would go nowhere
                    await _wait_for_edge(publisher)
                await nursery.start(dispatcher.serve)
                await nursery.start(timers.serve)
                nursery.start_soon(_housekeeping, gateway)
                if serve_http:
                    await _serve_http(nursery, gateway)
                if events_endpoint is not None:
                    events_sock = await sockets.enter_async_context(
                        zmqio.open_socket(
                            context,
                            zmq.ROUTER,
                            bind=events_endpoint,
                            options={zmq.RCVHWM: 100_000, zmq.ROUTER_MANDATORY: 1},
                        )
                    )
                    await nursery.start(serve_events, events_sock, inbox)
                await nursery.start(_serve_ingest, ingest, gateway._ingest_scope)
                gateway.ready = True
                log.info(
                    "gateway_started",
                    ingest=gateway.ingest_endpoint,
                    status=gateway.status_endpoint,
                    http=gateway.http_url,
                    public_http=gateway.public_http_url,
                    curve=principals is not None,
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


async def _serve_http(nursery: trio.Nursery, gateway: Gateway) -> None:
    """The admin server (ops + admin API, hypercorn + Starlette) and the public one (webhooks,
    tracking links and a health check, on the lean server), each on its own address. With
    webhook processes (``http.webhook_processes``) those are the public surface instead."""
    config = gateway.config
    admin: list[BaseRoute] = [
        *ops_routes(gateway.registry, gateway.accepting),
        *admin_routes(config, _AdminPort(gateway)),
    ]
    gateway.http_url = await _serve(nursery, config, admin)
    if config.http.webhook_processes:
        gateway.public_http_url = f"http://{config.http.webhook_bind}"
    else:
        gateway.public_http_url = await _serve_public(nursery, gateway)
    if not config.http.public_url:
        gateway.links.public_url = gateway.public_http_url


async def _serve_public(nursery: trio.Nursery, gateway: Gateway) -> str:
    config = gateway.config
    routes = [
        *public_routes(
            config=config, links=gateway.links, sink=gateway.inbox, now=gateway.clock.now
        ),
        # a load balancer health-checks the public side too; nothing else of ops is there
        *health_routes(gateway.accepting),
    ]
    server = httpserver.Server(httpserver.Router(routes), public_limits(config.http), name="public")
    bind = config.http.public_bind
    try:
        url: str = await nursery.start(server.serve, bind)
    except OSError as exc:
        holder = bind_holder(config, "http.public_bind", bind)
        reason = exc.strerror or str(exc)
        raise bind_error("http.public_bind", bind, exc.errno, reason, holder=holder) from exc
    return url


def _first_leaf(group: BaseException) -> BaseException:
    while isinstance(group, BaseExceptionGroup):
        group = group.exceptions[0]
    return group


def _bind(config: GatewayConfig, sock: zmq.Socket[bytes], key: str, address: str) -> None:
    try:
        sock.bind(address)
    except zmq.ZMQError as exc:
        holder = bind_holder(config, key, address)
        raise bind_error(key, address, exc.errno, exc.strerror, holder=holder) from exc


async def _serve(nursery: trio.Nursery, config: GatewayConfig, routes: list[BaseRoute]) -> str:
    key = "http.bind"
    bind = config.http.bind
    hypercorn_config = hypercorn.config.Config()
    hypercorn_config.bind = [bind]
    hypercorn_config.accesslog = None
    hypercorn_config.errorlog = None
    # a connection that stalls in its headers, or idles between requests, is closed as soon
    # as one whose body stalls (gateway.http.limits)
    hypercorn_config.read_timeout = int(max(1, config.http.read_timeout_seconds))
    hypercorn_config.keep_alive_timeout = config.http.read_timeout_seconds
    app = bounded(Starlette(routes=routes), config.http)
    try:
        binds: list[str] = await nursery.start(hypercorn.trio.serve, app, hypercorn_config)
    except* OSError as failed:  # hypercorn binds inside nurseries of its own
        exc = _first_leaf(failed)
        reason = getattr(exc, "strerror", None) or str(exc)
        holder = bind_holder(config, key, bind)
        raise bind_error(key, bind, getattr(exc, "errno", None), reason, holder=holder) from exc
    return binds[0]


async def _wait_for_edge(publisher: Publisher) -> None:
    with trio.move_on_after(5.0):
        await publisher.subscribed.wait()
        return
    log.warning("waiting_for_zeromq_edge")
    await publisher.subscribed.wait()


async def _serve_ingest(
    ingest: Ingest,
    scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    with scope:
        await ingest.serve(task_status=task_status)


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
                now=now,
                retention_seconds=retention,
                horizon_seconds=state.horizon_seconds,
                receipt_retention_seconds=gateway.config.store.receipt_retention_seconds,
            )
            log.info("journal_pruned", messages=pruned)
            next_prune = now + _PRUNE_INTERVAL_SECONDS
        oldest = state.oldest_finished()
        wake = next_prune if oldest is None else min(next_prune, oldest + retention)
        await trio.sleep_until(clock.trio_deadline(max(wake, now + 1.0)))
