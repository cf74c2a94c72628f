"""The ``cascadegw`` command line.

Failures an operator can fix (a port in use, a bad config value, a missing journal, an
unwritable data directory) end in one line naming the cause and the key or flag to change, and
exit code 2; ``--debug`` shows the traceback instead. Ctrl-C stops any command quietly, and
so does a reader that closes standard output early (``cascadegw report ... | head``: exit 1).
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import shlex
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import msgspec

from gateway import __version__
from gateway.config import (
    DEFAULT_CONFIG,
    GatewayConfig,
    default_config_bytes,
    header_safe,
    load_config,
)
from gateway.core.errors import ConfigError
from gateway.store.base import JournalError

_CONFIG_ENV = "CASCADEGW_CONFIG"


def _load(path: str | None, *, serving: bool = True) -> GatewayConfig:
    if path is None:
        return load_config(default_config_bytes(), os.environ, serving=serving)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        named = (
            f"{_CONFIG_ENV}={path}" if os.environ.get(_CONFIG_ENV) == path else f"--config {path}"
        )
        raise ConfigError(f"{named}: cannot read it ({exc.strerror})") from exc
    return load_config(data, os.environ, serving=serving)


def _config_file(args: argparse.Namespace) -> str:
    """A file path for processes that read the config themselves (workers, webhooks)."""
    if args.config is not None:
        return str(args.config)
    return str(resources.files("gateway.defaults").joinpath("gateway.toml"))


def _cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args.config)
    tenants = ", ".join(sorted(config.tenants)) or "none"
    providers = ", ".join(f"{n} ({p.kind})" for n, p in sorted(config.providers.items()))
    print(f"{args.config or DEFAULT_CONFIG}: ok")
    print(
        f"  store: {config.store.backend} at {config.store.path} (synchronous={config.store.synchronous})"
    )
    print(f"  tenants: {tenants}")
    print(f"  providers: {providers or 'none'}")
    for name, tenant in sorted(config.tenants.items()):
        for experiment_name, experiment in sorted(tenant.experiments.items()):
            variants = ", ".join(f"{v.name} ({v.weight:g})" for v in experiment.variants)
            print(f"  experiment {name}/{experiment_name}: {variants}")
    return 0


def _cmd_init(args: argparse.Namespace) -> int:
    import trio

    from gateway.config import tracking_secrets
    from gateway.runtime.keyfile import KEY_FILE, link_secrets
    from gateway.store.sqlite import SqliteJournal

    config = _load(args.config)
    path = Path(config.store.path)
    if path.exists():
        key = path.parent / KEY_FILE
        if tracking_secrets(config.tracking) or key.exists():
            print(f"{path}: a journal exists already; nothing to do")
            return 0
        link_secrets(config, journal_is_new=True)
        print(f"{key}: a new tracking key (links signed with a lost one no longer work)")
        return 0

    async def create() -> None:
        journal = SqliteJournal(path, synchronous=config.store.synchronous.value)
        await journal.open(create=True)
        await journal.aclose()

    trio.run(create)
    link_secrets(config, journal_is_new=True)  # the tracking key beside it, unless configured
    print(f"{path}: a new, empty journal")
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    import zmq

    public, secret = zmq.curve_keypair()
    if args.env:
        print(f"public={public.decode()}")
        print(f"secret={secret.decode()}")
    else:
        print(f"public key: {public.decode()}")
        print(f"secret key: {secret.decode()}")
        print(
            "The gateway's own pair: set the secret key as CASCADEGW__INGEST__CURVE_SECRET_KEY and "
            "give clients the public key. A client's pair: list its public key in its tenant's "
            "client_keys and give the client both."
        )
    return 0


def _cmd_journal_check(args: argparse.Namespace) -> int:
    from gateway.clock import wall_time
    from gateway.store.sqlite import check_journal

    config = _load(args.config)
    problems = check_journal(config.store.path, now=wall_time(), quarantine=args.quarantine)
    for problem in problems:
        print(f"{problem.table}[{problem.row}]: {problem.detail}")
        if problem.table == "consents" and args.quarantine:
            print(
                "  in its place, the recipient's advertising consent is withdrawn on every "
                "channel (the safe side) until the CRM grants it again"
            )
    if not problems:
        print(f"{config.store.path}: ok")
        return 0
    verb = "moved to the quarantine table" if args.quarantine else "found"
    print(f"{config.store.path}: {len(problems)} unreadable rows {verb}")
    return 0 if args.quarantine else 1


def _admin_url(config: GatewayConfig) -> str:
    """Where the configured gateway's admin HTTP server answers, from this machine."""
    host, _, port = config.http.bind.rpartition(":")
    if host in ("0.0.0.0", "", "*"):  # noqa: S104 - reaching a wildcard bind, not binding
        host = "127.0.0.1"
    elif host in ("::", "[::]"):
        host = "[::1]"
    return f"http://{host}:{port}"


def _cmd_healthcheck(args: argparse.Namespace) -> int:
    """Exit 0 when the gateway configured here answers /healthz (a container's HEALTHCHECK)."""
    import urllib.request

    try:
        config = _load(args.config)
    except ConfigError as exc:  # a healthcheck answers 0 or 1: Docker reserves 2
        print(f"cascadegw: {exc}", file=sys.stderr)
        return 1
    url = f"{_admin_url(config)}/{'readyz' if args.ready else 'healthz'}"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout_seconds) as answer:  # noqa: S310 - http:// built by _admin_url
            healthy = answer.status == 200
    except OSError as exc:
        print(f"cascadegw: {url}: {exc}", file=sys.stderr)
        return 1
    return 0 if healthy else 1


def _cmd_report(args: argparse.Namespace) -> int:
    """Print a campaign or experiment report of the running gateway (its admin API), as JSON."""
    import urllib.error
    import urllib.parse
    import urllib.request

    config = _load(args.config, serving=False)
    section = "experiments" if args.kind == "experiment" else "campaigns"
    quoted = [urllib.parse.quote(part, safe="") for part in (args.tenant, args.name)]
    url = f"{args.url or _admin_url(config)}/v1/reports/{quoted[0]}/{section}/{quoted[1]}"
    request = urllib.request.Request(url)  # noqa: S310 - --url or http:// from _admin_url
    token = _report_token(args.token, config)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=args.timeout_seconds) as answer:  # noqa: S310 - as above
            report = json.load(answer)
    except urllib.error.HTTPError as exc:
        print(
            f"cascadegw: {url}: {exc.code} {exc.read().decode(errors='replace')}", file=sys.stderr
        )
        return 1
    except OSError as exc:
        print(f"cascadegw: {url}: {exc}; is the gateway running (--url)?", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0


def _report_token(given: str | None, config: GatewayConfig) -> str | None:
    """``--token`` (``-``: the first line of standard input, kept out of ``ps`` and shell
    history), else the configured ``http.admin_token``, else none."""
    if given == "-":
        # a token file saved by a Windows editor may start with a byte-order mark
        token = sys.stdin.readline().strip().removeprefix("\ufeff").strip()
        if not token:
            raise ConfigError("--token -: standard input gave no token")
        return _header_safe(token, "--token -")
    if given is not None:
        return _header_safe(given, "--token")
    configured = config.http.admin_token
    return None if configured is None else _header_safe(configured.reveal(), "http.admin_token")


def _header_safe(token: str, source: str) -> str:
    """A bearer token goes in an HTTP header (``gateway.config.header_safe``); the token itself
    is never quoted."""
    if not header_safe(token):
        raise ConfigError(f"{source}: a token is visible ASCII characters without spaces")
    return token


def _cmd_schema(_: argparse.Namespace) -> int:
    from gateway.protocol import json_schema

    print(json.dumps(json_schema(), indent=2, sort_keys=True))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    import signal

    import trio

    from gateway.embedded import open_embedded
    from gateway.runtime import edge as edge_process
    from gateway.runtime.logging import configure_logging

    config = _load(args.config)
    configure_logging(level=args.log_level)
    tune_gc()

    async def serve() -> None:
        # Listen for SIGINT/SIGTERM before starting: one that arrives while the journal is
        # recovered or the sockets bind waits here and drains the gateway once it is up,
        # instead of killing it half-started (the default action of SIGTERM).
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with open_embedded(
                config,
                workers=args.workers,
                config_path=_config_file(args),
                environ={**os.environ, edge_process.LOG_LEVEL_ENV: args.log_level},
                edge=config.ingest.edge_process,
            ) as embedded:
                gateway = embedded.gateway
                # what recovery loaded (possibly a million cascades) lives for the process: keep
                # the cyclic collector from re-scanning it on every full collection
                gc.freeze()
                http = config.http
                lines = [
                    f"cascadegw {__version__} listening",
                    f"  requests (ZeroMQ ROUTER): {_where(gateway.ingest_endpoint)}",
                    f"  status events (ZeroMQ XPUB): {_where(gateway.status_endpoint)}",
                ]
                lines.append(f"  HTTP admin (metrics, health, /v1 API): {_where(gateway.http_url)}")
                if http.webhook_processes:
                    lines.append(
                        f"  HTTP public (webhooks, tracking links, /healthz) in "
                        f"{http.webhook_processes} webhook processes: {_where(gateway.public_http_url)}"
                    )
                else:
                    lines.append(
                        "  HTTP public (webhooks, tracking links, /healthz): "
                        f"{_where(gateway.public_http_url)}"
                    )
                dispatch = f"{args.workers} worker processes" if args.workers else "in-process"
                lines += [
                    f"  links and webhooks are addressed to: {gateway.links.public_url}",
                    f"  journal: {config.store.path} (synchronous={config.store.synchronous})",
                    f"  dispatch: {dispatch}",
                    f"  ZeroMQ authentication: {'CURVE' if config.ingest.curve_secret_key else 'none (loopback)'}",
                ]
                for name, simulator in sorted(embedded.simulators.items()):
                    lines.append(
                        f"  simulated {simulator.kind} provider {name}: {simulator.url} "
                        f"(scripted answers: POST {simulator.url}/_sim/script, "
                        f"requests seen: GET {simulator.url}/_sim/requests)"
                    )
                print("\n".join(lines), flush=True)
                async for _ in signals:
                    break
                _announce(
                    "cascadegw: shutting down (finishing in-flight requests and journal writes)"
                )
                await embedded.shutdown(grace_seconds=args.grace_seconds)

    trio.run(serve)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import trio

    from gateway.demo import run_demo
    from gateway.runtime.logging import configure_logging

    config = _load(args.config)
    configure_logging(level="error")  # the demo's own output is the show
    trio.run(lambda: run_demo(config, messages=args.messages, max_seconds=args.seconds))
    return 0


def tune_gc() -> None:
    """Collect the young generation every 50,000 allocations instead of 700.

    Admitting one message allocates dozens of short-lived, acyclic objects (decoded Structs,
    events, closures); with the default threshold the collector ran every few messages and,
    in profiles under load, showed up as a tenth of the CPU at allocation sites.
    """
    gc.set_threshold(50_000, 20, 100)
    _return_large_frees()


def _return_large_frees() -> None:
    """Give memory of large blocks back to the system as soon as they are freed.

    glibc raises its mmap threshold after each large free, so after one burst of big
    ZeroMQ messages (a hostile client's many-part message, held whole by libzmq) later blocks
    of that size come from the heap and stay resident. A fixed threshold keeps the burst's
    memory returnable. Nothing happens on a C library without ``mallopt``.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return
    libc = ctypes.CDLL(name)
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, 256 * 1024)


_M_MMAP_THRESHOLD = -3


def _cmd_worker(args: argparse.Namespace) -> int:
    import trio

    from adapters.registry import build_adapters
    from gateway.clock import Clock
    from gateway.orphans import guarded
    from gateway.runtime.logging import configure_logging
    from gateway.runtime.workers import serve_worker

    config = _load(args.config)
    configure_logging(level=args.log_level)
    tune_gc()

    async def serve() -> None:
        # the worker's own clock: real wall time (a worker process is never under a MockClock)
        adapters, clients = build_adapters(config.providers, wall_clock=Clock().now)
        try:
            await serve_worker(
                adapters=adapters,
                jobs_endpoint=args.jobs,
                results_endpoint=args.results,
                concurrency=args.concurrency,
            )
        finally:
            for client in clients:
                await client.aclose()

    trio.run(guarded, serve)  # an orphan would wait forever for jobs from a router that is gone
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    import trio

    from adapters.registry import SPECS
    from adapters.simulators.fcm import FcmSimulator
    from gateway.embedded import simulated_env
    from gateway.runtime.logging import configure_logging

    config = _load(args.config, serving=False)  # the simulators bind none of the gateway's
    configure_logging(level=args.log_level)
    base_port = args.port

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            overrides: dict[str, dict[str, object]] = {}
            for offset, (name, provider) in enumerate(sorted(config.providers.items())):
                simulator = SPECS[provider.kind].simulator(name=name, behaviour=config.simulator)
                if args.webhook_base:
                    simulator.webhook_url = args.webhook_base.rstrip("/") + f"/webhooks/{name}"
                if isinstance(simulator, FcmSimulator):
                    simulator.ingest_endpoint = args.ingest
                bind = f"{args.host}:{base_port + offset if base_port else 0}"
                url = await nursery.start(simulator.serve, bind)
                values = simulator.credentials()
                if args.advertise:  # what other hosts call it (a container's service name)
                    port = url.rsplit(":", 1)[1]
                    values["url"] = f"{args.advertise.rstrip('/')}:{port}"
                overrides[name] = values
                print(f"{name} ({provider.kind}) simulator at {url}", flush=True)
            if args.env_out:
                # what a gateway needs to talk to these simulators, as CASCADEGW__ variables
                providers = {
                    name: msgspec.structs.replace(config.providers[name], simulated=True, **values)
                    for name, values in overrides.items()
                }
                environ = simulated_env(msgspec.structs.replace(config, providers=providers))
                if args.env_out.endswith(".env"):  # for a shell to source: KEY='value' lines
                    text = "".join(
                        f"export {key}={shlex.quote(value)}\n" for key, value in environ.items()
                    )
                else:
                    text = json.dumps(environ, indent=2)
                await trio.Path(args.env_out).write_text(text)
                print(f"credentials for the gateway written to {args.env_out}", flush=True)

    trio.run(serve)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cascadegw", description=__doc__)
    parser.add_argument(
        "--config",
        default=os.environ.get(_CONFIG_ENV) or None,
        help="TOML config file (default: $CASCADEGW_CONFIG, else the built-in one)",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks instead of one-line errors"
    )
    parser.add_argument("--version", action="version", version=f"cascadegw {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    check_config = commands.add_parser("check-config", help="validate the config and summarise it")
    check_config.set_defaults(func=_cmd_check_config)
    schema = commands.add_parser("schema", help="print the wire protocol's JSON Schema")
    schema.set_defaults(func=_cmd_schema)

    report = commands.add_parser(
        "report", help="print a campaign or experiment report of the running gateway (JSON)"
    )
    report.add_argument("kind", choices=["campaign", "experiment"])
    report.add_argument("tenant")
    report.add_argument("name", help="the campaign's or the experiment's name")
    report.add_argument("--url", help="the admin API's base URL (default: from http.bind)")
    report.add_argument(
        "--token",
        help="the bearer token to send: the operator's or a tenant's own admin_token (which "
        "reads only that tenant's reports); `-` reads it from standard input, out of `ps` and "
        "shell history (default: http.admin_token of the config)",
    )
    report.add_argument("--timeout-seconds", type=float, default=10.0)
    report.set_defaults(func=_cmd_report)

    init = commands.add_parser("init", help="create a new, empty journal (store.path)")
    init.set_defaults(func=_cmd_init)

    health = commands.add_parser(
        "healthcheck", help="exit 0 if the configured gateway answers (for containers)"
    )
    health.add_argument("--ready", action="store_true", help="ask /readyz instead of /healthz")
    health.add_argument("--timeout-seconds", type=float, default=3.0)
    health.set_defaults(func=_cmd_healthcheck)

    keys = commands.add_parser("keys", help="CURVE keys for ZeroMQ clients and the gateway")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    generate = key_commands.add_parser("generate", help="print a new CURVE keypair (z85)")
    generate.add_argument("--env", action="store_true", help="print as public=... secret=...")
    generate.set_defaults(func=_cmd_keys)

    journal = commands.add_parser("journal", help="inspect the journal (gateway stopped)")
    journal_commands = journal.add_subparsers(dest="journal_command", required=True)
    check = journal_commands.add_parser("check", help="report unreadable rows by key")
    check.add_argument(
        "--quarantine",
        action="store_true",
        help="move unreadable rows to the quarantine table so the gateway can start",
    )
    check.set_defaults(func=_cmd_journal_check)

    run = commands.add_parser(
        "run", help="run the gateway (and the simulators of simulated providers)"
    )
    run.add_argument(
        "--workers", type=int, default=None, help="dispatch worker processes (0 = in-process)"
    )
    run.add_argument(
        "--grace-seconds",
        type=float,
        default=10.0,
        help="time to finish in-flight sends on shutdown",
    )
    run.add_argument("--log-level", default="info")
    run.set_defaults(func=_cmd_run)

    demo = commands.add_parser(
        "demo", help="run the gateway with simulators and show a campaign's cascade live"
    )
    demo.add_argument("--messages", type=int, default=200)
    demo.add_argument("--seconds", type=float, default=60.0, help="stop showing after this long")
    demo.set_defaults(func=_cmd_demo)

    worker = commands.add_parser(
        "worker", help="a dispatch worker process (started by `run --workers N`)"
    )
    worker.add_argument("--jobs", required=True)
    worker.add_argument("--results", required=True)
    worker.add_argument("--concurrency", type=int, default=256)
    worker.add_argument("--log-level", default="warning")
    worker.set_defaults(func=_cmd_worker)

    simulate = commands.add_parser("simulate", help="run the provider simulators standalone")
    simulate.add_argument("--host", default="127.0.0.1")
    simulate.add_argument(
        "--port", type=int, default=0, help="first port (one per provider); 0 = any"
    )
    simulate.add_argument(
        "--webhook-base", default="", help="the gateway's public URL for receipts"
    )
    simulate.add_argument(
        "--ingest",
        default="",
        help="the gateway's ZeroMQ endpoint (the FCM simulator's app reports opens there)",
    )
    simulate.add_argument(
        "--env-out",
        default="",
        help="write the CASCADEGW__ variables a gateway needs to reach them (JSON; a path "
        "ending in .env gets shell `export` lines)",
    )
    simulate.add_argument(
        "--advertise",
        default="",
        help="the base URL others reach the simulators at, e.g. http://simulators",
    )
    simulate.add_argument("--log-level", default="info")
    simulate.set_defaults(func=_cmd_simulate)
    return parser


def _where(url: str) -> str:
    """A listening address as people read it: a wildcard host is every interface."""
    for wildcard in ("0.0.0.0", "[::]"):  # noqa: S104 - naming a bind, not binding
        if f"//{wildcard}:" in url:
            return f"{url} (all interfaces)"
    return url


def _operator_error(exc: BaseException) -> str | None:
    """The one line to show for a failure an operator can fix, or None (a bug: traceback).

    trio wraps what a task raised in ExceptionGroups; a lone fixable cause inside is unwrapped.
    """
    if isinstance(exc, BaseExceptionGroup):
        found = [_operator_error(inner) for inner in exc.exceptions]
        lines = [line for line in found if line is not None]
        return lines[0] if len(lines) == len(found) == 1 else None
    if isinstance(exc, ConfigError | JournalError):
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        return f"{exc.filename}: no such file"
    return None


def _interrupted(exc: BaseException) -> bool:
    """Ctrl-C, however deep in a nursery it was raised."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_interrupted(inner) for inner in exc.exceptions)
    return isinstance(exc, KeyboardInterrupt)


def _broken_pipe(exc: BaseException) -> bool:
    """Standard output was closed by its reader (``cascadegw report ... | head``), however deep
    in a nursery the write was."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_broken_pipe(inner) for inner in exc.exceptions)
    return isinstance(exc, BrokenPipeError)


class _Discard(io.TextIOBase):
    """Standard output once its reader is gone: every later write goes nowhere."""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        return len(text)


def _stdout_closed() -> None:
    """Send what is still buffered for standard output, and anything later, nowhere: Python
    flushes ``sys.stdout`` at exit, which would raise the ``BrokenPipeError`` again (as the
    Python docs' note on SIGPIPE says, in the ``signal`` module)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError, io.UnsupportedOperation):  # no file descriptor behind it
        sys.stdout = _Discard()


def _announce(line: str) -> None:
    """Print a line a long-running command shows along the way: a reader that went away
    (``cascadegw run | head -3``) must not stop what the command does next (draining)."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        _stdout_closed()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # the journal, its WAL and the tracking key hold personal data and secrets: whatever the
    # gateway creates is for its own user only
    os.umask(0o077)
    try:
        result: int = args.func(args)
        sys.stdout.flush()  # here, not at exit: a reader that went away is answered below
    except BaseException as exc:
        if _interrupted(exc):
            print("cascadegw: interrupted", file=sys.stderr)
            return 130
        if _broken_pipe(exc) and not args.debug:
            # the reader has all it wanted (`| head`): exit quietly, as Python's docs advise
            # for SIGPIPE, with 1 (what Python itself exits with on EPIPE)
            _stdout_closed()
            return 1
        line = _operator_error(exc)
        if line is None or args.debug:
            raise
        print(f"cascadegw: {line} (--debug shows the traceback)", file=sys.stderr)
        return 2
    return result
