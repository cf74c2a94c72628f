"""The gateway as users run it: real adapters, plus simulators for ``simulated = true`` providers.

Simulators start first (the adapters need their addresses and the credentials they issued), then
the gateway; then each simulator learns where to send receipts: the gateway's webhook URL, and,
for the FCM simulator's pretend app, the ingest socket for ``event`` ops.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import structlog
import trio

from adapters import Adapter
from adapters.registry import SPECS, build_adapters
from adapters.simulators._base import Simulator
from adapters.simulators.fcm import FcmSimulator
from adapters.viber import ViberAdapter
from gateway.app import EdgeLink, Gateway, open_gateway
from gateway.clock import Clock
from gateway.config import ENV_PREFIX, GatewayConfig, Secret
from gateway.core.errors import ConfigError, ProviderError
from gateway.orphans import REPORT_FD_ENV, SERVING
from gateway.runtime import edge as edge_process
from gateway.runtime.keyfile import link_secrets
from gateway.runtime.workers import (
    ProcessKind,
    ProcessRestarts,
    ReportPipe,
    Supervisor,
    open_worker_pool,
)
from gateway.store.base import JournalError

log = structlog.get_logger("gateway.embedded")


async def _register_webhooks(adapters: Mapping[str, Adapter], gateway: Gateway) -> None:
    """Tell providers that register webhooks by API (Viber's set_webhook) where to call,
    with every event kind the gateway needs (``unsubscribed`` included: an opt-out). A
    failure is logged, not fatal: the provider may be unreachable now and the operator can
    restart once it is (Viber also refuses a URL it cannot reach over HTTPS)."""
    for name, adapter in adapters.items():
        if not isinstance(adapter, ViberAdapter):
            continue
        url = gateway.links.webhook_url(name)
        try:
            await adapter.set_webhook(url)
        except ProviderError as exc:
            log.warning("webhook_not_registered", provider=name, error=str(exc))
        else:
            log.info("webhook_registered", provider=name)


@dataclass
class Embedded:
    gateway: Gateway
    simulators: dict[str, Simulator] = field(default_factory=dict)
    webhooks: Supervisor | None = None
    """The webhook processes (``http.webhook_processes``), when they serve the public surface."""
    _readiness_scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    async def shutdown(self, *, grace_seconds: float = 10.0) -> None:
        """``Gateway.shutdown``, after which returning webhook processes no longer make the
        gateway report ready."""
        self._readiness_scope.cancel()
        await self.gateway.shutdown(grace_seconds=grace_seconds)


async def _track_readiness(
    gateway: Gateway,
    supervisors: list[Supervisor],
    scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Not ready while fewer child processes serve than configured (webhook processes: the
    public surface, delivery receipts and opt-outs, is short; the ZeroMQ edge: no CRM can
    reach the gateway). Ready again once they all serve; it only restores what it lowered, and
    ``Embedded.shutdown`` stops it first."""
    lowered = False
    with scope:
        while True:
            short = [s for s in supervisors if s.serving() < len(s.children)]
            if short and gateway.ready:
                gateway.ready, lowered = False, True
                for supervisor in short:
                    log.warning(
                        "not_ready_child_processes",
                        process=supervisor.kind.value,
                        serving=supervisor.serving(),
                        configured=len(supervisor.children),
                    )
            elif not short and lowered:
                gateway.ready, lowered = True, False
                log.info("ready_child_processes")
            task_status.started()
            task_status = trio.TASK_STATUS_IGNORED
            async with trio.open_nursery() as waiting:  # until any of them changes
                for supervisor in supervisors:
                    waiting.start_soon(_cancel_when_changed, supervisor, waiting.cancel_scope)


async def _cancel_when_changed(supervisor: Supervisor, scope: trio.CancelScope) -> None:
    await supervisor.wait_changed()
    scope.cancel()


def _raise_failure(supervisor: Supervisor) -> None:
    """A child that could not start says why in one line (e.g. its bind is in use): the
    gateway does not start either (the CLI exits 2 with that line)."""
    failures = [child.failure for child in supervisor.children if child.failure]
    if failures:
        raise ConfigError(failures[0])


async def _run_dir(config: GatewayConfig) -> Path:
    """The directory of the child processes' ipc sockets, beside the journal; made here, so
    that an unusable data directory fails like the journal would. Private (0700) whatever
    directory the journal is in: whoever can connect to the edge's socket could name any
    client key, and to the events socket forge any receipt."""
    run_dir = Path(config.store.path).parent / "run"
    try:
        await trio.Path(run_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
        await trio.Path(run_dir).chmod(0o700)
        await trio.to_thread.run_sync(_remove_stale_sockets, run_dir)
    except OSError as exc:
        raise JournalError(
            f"journal {config.store.path}: cannot open it ({exc.strerror or exc}); make its "
            "directory writable for this user, or set store.data_dir / store.path"
        ) from exc
    return run_dir


def _remove_stale_sockets(run_dir: Path) -> None:
    """Remove the ipc sockets of routers that are gone (``ingest-<pid>`` and the like): one
    killed outright leaves its files behind."""
    for path in run_dir.iterdir():
        _, _, pid = path.name.rpartition("-")
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
        except PermissionError:
            pass  # a live process of another user (a shared directory): not ours to touch


async def start_edge(
    nursery: trio.Nursery,
    config: GatewayConfig,
    *,
    config_path: str,
    environ: dict[str, str],
    restarts: ProcessRestarts,
) -> tuple[Supervisor, Supervisor, EdgeLink]:
    """Start the ZeroMQ edge processes (``gateway.runtime.edge``), requests and status, and
    wait until each listens."""
    run_dir = await _run_dir(config)
    requests_endpoint = f"ipc://{run_dir}/ingest-{os.getpid()}"
    status_endpoint = f"ipc://{run_dir}/status-{os.getpid()}"
    child_environ = {
        **environ,
        "CASCADEGW_CONFIG": config_path,
        edge_process.REQUESTS_ENV: requests_endpoint,
        edge_process.STATUS_ENV: status_endpoint,
        # each malloc arena reserves 64 MiB of address space, some only at a thread's
        # first allocation, after the cap is set: two arenas keep that off the cap
        "MALLOC_ARENA_MAX": "2",
    }
    supervisors = []
    announced = []
    for kind, role in (
        (ProcessKind.ZEROMQ_EDGE, edge_process.REQUESTS),
        (ProcessKind.ZEROMQ_STATUS, edge_process.STATUS),
    ):
        supervisor = Supervisor(
            kind,
            [sys.executable, "-m", "gateway.runtime.edge", role],
            child_environ,
            count=1,
            restarts=restarts,
            report=ReportPipe(REPORT_FD_ENV, SERVING),
            # an edge that dies was most likely made to run out of memory by a client: back
            # within two seconds, not thirty, whatever the attacker does next
            max_restart_delay_seconds=2.0,
        )
        await nursery.start(supervisor.run)
        _raise_failure(supervisor)
        (child,) = supervisor.children
        if not child.serving or not child.announced:
            raise ConfigError(
                f"the ZeroMQ {role} edge process exited before it served; its log says why"
            )
        supervisors.append(supervisor)
        announced.append(child.announced)
    link = EdgeLink(requests_endpoint, status_endpoint, announced[0], announced[1])
    return supervisors[0], supervisors[1], link


def simulated_env(config: GatewayConfig) -> dict[str, str]:
    """Environment overrides that point worker processes at the running simulators."""
    environ: dict[str, str] = {}
    for name, provider in config.providers.items():
        if not provider.simulated:
            continue
        for key in (
            "url",
            "project_id",
            "account_sid",
            "webhook_public_key",
            "api_key",
            "auth_token",
            "service_account_json",
        ):
            value = getattr(provider, key, None)  # each provider kind has some of these keys
            if value is None or value == "":
                continue
            variable = f"{ENV_PREFIX}PROVIDERS__{name.upper()}__{key.upper()}"
            environ[variable] = value.reveal() if isinstance(value, Secret) else json.dumps(value)
    return environ


@asynccontextmanager
async def open_embedded(
    config: GatewayConfig,
    *,
    wall_at_start: float | None = None,
    workers: int | None = None,
    config_path: str | None = None,
    environ: Mapping[str, str] | None = None,
    simulator_seed: int | None = None,
    edge: bool = False,
) -> AsyncIterator[Embedded]:
    """Run simulators (if any provider is simulated), adapters and the gateway together;
    with ``edge``, behind the ZeroMQ edge process (``cascadegw run``; needs ``config_path``)."""
    workers = config.dispatch.workers if workers is None else workers
    async with AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        # unwinds last: simulators keep answering until the gateway has shut down
        stack.callback(nursery.cancel_scope.cancel)
        clock = Clock(wall_at_start)  # one wall clock for gateway, adapters and simulators
        simulators: dict[str, Simulator] = {}
        providers = dict(config.providers)
        for index, (name, provider) in enumerate(config.providers.items()):
            if not provider.simulated:
                continue
            seed = None if simulator_seed is None else simulator_seed + index
            simulator = SPECS[provider.kind].simulator(
                name=name, behaviour=config.simulator, seed=seed, wall_offset=clock.offset
            )
            await nursery.start(simulator.serve)
            simulators[name] = simulator
            providers[name] = msgspec.structs.replace(provider, **simulator.credentials())
        config = msgspec.structs.replace(config, providers=providers)

        adapters, clients = build_adapters(config.providers, wall_clock=clock.now)
        for client in clients:
            await stack.enter_async_context(client)
        executor = None
        restarts = ProcessRestarts()
        if workers:
            if config_path is None:
                raise ValueError("worker processes need the config file path")
            worker_environ = {
                **(environ if environ is not None else os.environ),
                **simulated_env(config),
            }
            executor = await stack.enter_async_context(
                open_worker_pool(
                    workers=workers,
                    config_path=config_path,
                    environ=worker_environ,
                    run_dir=await _run_dir(config),
                    restarts=restarts,
                )
            )

        supervisors: list[Supervisor] = []  # the gateway is ready only while all serve
        events_endpoint = None
        webhooks: Supervisor | None = None
        link_keys: list[bytes] | None = None  # open_gateway's own, after the journal opened
        if config.http.webhook_processes:
            journal_is_new = not await trio.Path(config.store.path).exists()
            link_keys = link_secrets(config, journal_is_new=journal_is_new)
            if config_path is None:
                raise ValueError("webhook processes need the config file path")
            run_dir = await _run_dir(config)
            events_endpoint = f"ipc://{run_dir}/events-{os.getpid()}"
            if not config.http.public_url:
                http = msgspec.structs.replace(
                    config.http, public_url=f"http://{config.http.webhook_bind}"
                )
                config = msgspec.structs.replace(config, http=http)
            webhook_environ = {
                **(environ if environ is not None else os.environ),
                **simulated_env(config),
                "CASCADEGW_CONFIG": config_path,
                "CASCADEGW_EVENTS": events_endpoint,
                # the same secrets as the router: links it issues verify in every process
                f"{ENV_PREFIX}TRACKING__SECRET": link_keys[0].decode(),
                f"{ENV_PREFIX}TRACKING__PREVIOUS_SECRETS": ",".join(
                    key.decode() for key in link_keys[1:]
                ),
                f"{ENV_PREFIX}HTTP__PUBLIC_URL": json.dumps(config.http.public_url),
            }
            webhooks = Supervisor(
                ProcessKind.WEBHOOK,
                [sys.executable, "-m", "gateway.http.webhook_app"],
                webhook_environ,
                count=config.http.webhook_processes,
                restarts=restarts,
                report=ReportPipe(REPORT_FD_ENV, SERVING),
            )
            # each has bound (or failed to) before the router binds its own sockets
            await nursery.start(webhooks.run)
            _raise_failure(webhooks)
            supervisors.append(webhooks)

        edge_link: EdgeLink | None = None
        if edge:
            if config_path is None:
                raise ValueError("the ZeroMQ edge process needs the config file path")
            edge_supervisor, _, edge_link = await start_edge(
                nursery,
                config,
                config_path=config_path,
                environ={**(environ if environ is not None else os.environ)},
                restarts=restarts,
            )
            # not ready without the requests edge; the status edge's restarts are counted, but
            # requests are still taken while it is away
            supervisors.append(edge_supervisor)

        gateway = await stack.enter_async_context(
            open_gateway(
                config,
                adapters=adapters if executor is None else None,
                executor=executor,
                clock=clock,
                tracking_secrets=link_keys,
                events_endpoint=events_endpoint,
                edge=edge_link,
            )
        )
        # the one late binding: each side's address exists only once it listens, and the
        # gateway needs the simulators' to start, so the simulators learn the gateway's now
        for name, simulator in simulators.items():
            simulator.webhook_url = gateway.links.webhook_url(name)
            if isinstance(simulator, FcmSimulator):
                simulator.ingest_endpoint = gateway.ingest_endpoint
        gateway.registry.register(restarts)
        embedded = Embedded(gateway, simulators, webhooks)
        if supervisors:
            await nursery.start(_track_readiness, gateway, supervisors, embedded._readiness_scope)
        await _register_webhooks(adapters, gateway)
        yield embedded
