"""Typed, frozen configuration: ``load_config(toml_bytes, environ) -> GatewayConfig``.

Loading is pure: the caller reads the file and passes the environment. Environment variables
named ``CASCADEGW__SECTION__KEY`` (nested with ``__``, case-insensitive) override the file;
their values are parsed as TOML values when they parse (``10``, ``true``, ``["a", "b"]``) and
taken as strings otherwise. Secrets (provider API keys and tokens) come only from the
environment: a secret in the file is an error, and ``Secret`` never shows its value in a repr.

Unknown keys are errors (hypercorn's ``from_mapping`` silently drops them; we don't), and so are
impossible values. Every error names the key, e.g.
``tenants.acme.providers.email[1]: unknown provider 'sendgrid-2'``.

A ``[providers.<name>]`` table is read into the settings type of the provider module its
``kind`` names (``adapters/fcm.py``'s ``FcmSettings``, ...; the union is ``ProviderSettings``
in ``adapters/registry.py``): the common keys and only that provider's own. So this module
imports the adapters; ``Secret`` and the sections adapters are handed live in
``gateway.settings``, which both import, and are re-exported here.
"""

from __future__ import annotations

import enum
import errno as errno_codes
import ipaddress
import itertools
import re
import tomllib
from collections.abc import Mapping
from datetime import time
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Final, Literal, cast

import msgspec

from adapters.registry import SPECS
from adapters.registry import ProviderSettings as ProviderSettings
from gateway.core.caps import CapAction, CapRule
from gateway.core.consent import ConsentDefaults
from gateway.core.control_group import ControlGroup
from gateway.core.errors import ConfigError
from gateway.core.experiments import Experiment, Variant
from gateway.core.model import DEFAULT_CASCADE, Category, Channel, Lane
from gateway.core.policy import PolicyRules, QuietAction, QuietRule, WindowRule
from gateway.core.quiet_hours import QuietWindow
from gateway.core.retry import RetryPolicy
from gateway.core.send_windows import SendWindows, send_windows
from gateway.settings import Positive, PositiveInt
from gateway.settings import Secret as Secret
from gateway.settings import SenderConfig as SenderConfig
from gateway.settings import SimulatorConfig as SimulatorConfig

ENV_PREFIX: Final = "CASCADEGW__"

Name = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9_]{0,63}$")]
CurveKey = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[0-9a-zA-Z.:+=^!/*?&<>()\[\]{}@%$#-]{40}$",
        description="a CURVE public key in z85 (40 characters)",
    ),
]


class _Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The gateway's own sections; the same rules as ``gateway.settings.Settings`` (declared
    here too, because ruff's RUF012 knows only a class it can see derives from Struct)."""


# ---------------------------------------------------------------- sections
class IngestConfig(_Config, frozen=True):
    bind: str = "tcp://127.0.0.1:5555"
    """ZeroMQ ROUTER endpoint CRMs connect their DEALER sockets to."""
    status_bind: str = "tcp://127.0.0.1:5556"
    """ZeroMQ PUB endpoint for status events (topic = tenant)."""
    curve_secret_key: Secret | None = None
    """The gateway's CURVE secret key (z85, from ``cascadegw keys generate``). Set, both
    sockets require CURVE and every client must present a key a tenant lists in
    ``client_keys``; unset, anyone who reaches the sockets may act for any tenant, which is
    only allowed on loopback."""
    max_frame_bytes: PositiveInt = 4 * 1024 * 1024
    max_batch: PositiveInt = 1000
    max_envelope_parts: PositiveInt = 8
    """Frames a client may put before the payload (correlation ids); a message with more is
    dropped unanswered, because answering means echoing them."""
    max_schedule_ahead_seconds: Positive = 30 * 86400.0
    """How far in the future ``send_at``/``expires_at`` may lie."""
    max_requests_per_wakeup: PositiveInt = 500
    """Requests handled per wake-up before yielding to timers, receipts and dispatch."""
    edge_process: bool = True
    """``cascadegw run`` serves both ZeroMQ sockets from a separate edge process
    (``gateway.runtime.edge``), so that no message a client sends can grow the router; off, the
    router binds them itself (as embedded and test gateways always do)."""
    edge_memory_bytes: Annotated[int, msgspec.Meta(ge=64 * 1024 * 1024)] = 512 * 1024 * 1024
    """Address space the edge process may use beyond what it maps once serving: the most one
    client's unread messages can occupy before libzmq drops its connection."""


class HttpConfig(_Config, frozen=True):
    bind: str = "127.0.0.1:8080"
    """Metrics, health and the admin API (hypercorn + Starlette)."""
    public_bind: str = "127.0.0.1:8081"
    """Webhooks, tracking links and a health check, on the lean server
    (``gateway.httpserver``): the address providers and recipients reach, usually through a
    reverse proxy. Always its own address, never the admin API's."""
    public_url: str = "http://127.0.0.1:8081"
    """Base URL providers and recipients reach the gateway at (webhooks, links, pixel);
    empty means the address the public HTTP server bound."""
    admin_token: Secret | None = None
    """The operator's bearer token: reads and writes every tenant under ``/v1/``. Tenants'
    own tokens are ``tenants.<name>.admin_token``. With no token at all the admin API is open,
    which is only allowed on a loopback ``bind``."""
    webhook_max_body_bytes: PositiveInt = 1024 * 1024
    """Largest provider webhook body; a bigger one is refused with 413 while it is read."""
    admin_max_body_bytes: PositiveInt = 64 * 1024
    """Largest admin API body (and tracking form)."""
    read_timeout_seconds: Positive = 10.0
    """A request whose headers or body do not arrive within this is closed (408)."""
    max_concurrent_requests: PositiveInt = 1000
    """Requests served at once per HTTP server; more are answered 503 at once."""
    max_connections: PositiveInt = 2000
    """Connections open at once on the public server (idle keep-alive ones included; each
    holds a descriptor and buffers); a new one past it is answered 503 and closed."""
    durable_wait_seconds: Positive = 10.0
    """How long an unsubscribe or webhook waits for its journal commit before answering 503
    (never a success that is not yet durable)."""
    webhook_processes: Annotated[int, msgspec.Meta(ge=0)] = 0
    """0 serves webhooks and tracking links in the router process (on ``public_bind``); N runs
    them in N processes sharing ``webhook_bind`` instead, forwarding to the router over ZeroMQ
    (the router then serves no public surface itself)."""
    webhook_bind: str = "127.0.0.1:8081"


class Synchronous(enum.StrEnum):
    NORMAL = "normal"  # survives a process crash; the last commits may be lost on power loss
    FULL = "full"  # survives power loss too


class StoreConfig(_Config, frozen=True):
    backend: Literal["sqlite"] = "sqlite"
    data_dir: str = ""
    """Where the journal and the tracking key live. Empty: ``$STATE_DIRECTORY`` (systemd's
    ``StateDirectory``), else ``$XDG_STATE_HOME/cascadegw``, else ``~/.local/state/cascadegw``.
    Never the directory a command happens to be started in."""
    path: str = "cascadegw.db"
    """The journal file; a relative path is inside ``data_dir``. After loading it is absolute."""
    synchronous: Synchronous = Synchronous.FULL
    create: bool = False
    """Create the journal when the file does not exist. Off, a missing journal refuses to
    start (``cascadegw init`` creates one): an empty journal forgets every withdrawn consent."""
    idempotency_retention_seconds: Positive = 7 * 86400.0
    receipt_retention_seconds: Positive = 7 * 86400.0
    """How long a provider event id is remembered: a callback the provider retries within it
    is applied once. Keep it above every provider's retry window."""
    max_pending_rows: PositiveInt = 200_000
    """Staged-but-uncommitted journal rows beyond which ingest answers ``overloaded``."""


class LaneLimits(_Config, frozen=True):
    critical: PositiveInt = 100_000
    normal: PositiveInt = 500_000
    bulk: PositiveInt = 1_000_000

    def limit(self, lane: Lane) -> int:
        limit: int = getattr(self, lane.value)
        return limit


class RetryConfig(RetryPolicy, frozen=True, forbid_unknown_fields=True):
    """The core's ``RetryPolicy``, refusing unknown keys like every other section."""


class DispatchConfig(_Config, frozen=True):
    workers: Annotated[int, msgspec.Meta(ge=0)] = 0
    """0 dispatches in the router process; N uses N worker processes over ipc sockets."""
    max_queued: LaneLimits = LaneLimits()
    """Queued and deferred sends per lane beyond which ingest answers ``overloaded``."""
    retry: RetryConfig = RetryConfig()


class ChannelConfig(_Config, frozen=True):
    unread_timeout_seconds: Positive
    """How long a step waits for read (SMS: for delivery) before the cascade moves on."""


def _default_channels() -> dict[Channel, ChannelConfig]:
    return {
        Channel.PUSH: ChannelConfig(unread_timeout_seconds=300.0),
        Channel.EMAIL: ChannelConfig(unread_timeout_seconds=3600.0),
        Channel.VIBER: ChannelConfig(unread_timeout_seconds=1800.0),
        Channel.SMS: ChannelConfig(unread_timeout_seconds=86400.0),
    }


LocalTime = Annotated[time, msgspec.Meta(tz=False)]
"""Quiet hours are the recipient's wall-clock times: an offset would be meaningless."""


class QuietHoursConfig(_Config, frozen=True):
    start: LocalTime
    end: LocalTime
    action: QuietAction = QuietAction.DEFER
    channels: frozenset[Channel] = frozenset()
    categories: frozenset[Category] = frozenset()


class WindowConfig(_Config, frozen=True):
    """One local-time window ``[start, end)``; wraps midnight when ``start > end``."""

    start: LocalTime
    end: LocalTime


class SendWindowsConfig(_Config, frozen=True):
    """Preferred send windows for some marketing categories (empty: all of them). Outside
    them a message waits for the next window start in the recipient's zone (never into quiet
    hours); service messages ignore windows."""

    windows: tuple[WindowConfig, ...]
    categories: frozenset[Category] = frozenset()


class CapConfig(_Config, frozen=True):
    name: Name
    max_count: PositiveInt
    window_seconds: Positive
    categories: frozenset[Category] = frozenset()
    channels: frozenset[Channel] = frozenset()
    action: CapAction = CapAction.REJECT


class ControlGroupConfig(_Config, frozen=True):
    percent: Annotated[float, msgspec.Meta(ge=0, le=100)] = 0.0
    period_days: Positive = 90.0
    salt: str = "cascadegw"


class ConsentConfig(_Config, frozen=True):
    unknown_personal_data: Literal["grant", "deny"] = "grant"
    unknown_advertising: Literal["grant", "deny"] = "deny"


class PolicyConfig(_Config, frozen=True):
    """Policy rules; the top-level ones are the defaults every tenant may override."""

    quiet_hours: tuple[QuietHoursConfig, ...] = ()
    send_windows: tuple[SendWindowsConfig, ...] = ()
    """The first entry whose categories cover a message's category applies."""
    caps: tuple[CapConfig, ...] = ()
    control_group: ControlGroupConfig = ControlGroupConfig()
    consent: ConsentConfig = ConsentConfig()
    critical_service_bypasses_quiet_hours: bool = True


# every field typed `Secret`, in any section (tests/core/test_config.py checks that none is
# missing): such a key in the file is refused, and its environment value is never parsed as TOML
SECRET_KEYS: Final = frozenset(
    {
        "api_key",
        "auth_token",
        "service_account_json",
        "admin_token",
        "curve_secret_key",
        "secret",
        "previous_secrets",
        "webhook_shared_key",
    }
)


MAX_WEIGHT: Final = 1_000_000.0
"""The largest weight a variant may have: the weights' total stays finite (a weight of 1e308
twice would overflow to inf and send everyone to the last variant)."""
MIN_WEIGHT: Final = 1e-6
"""The smallest: weights near the smallest float round in the hash cut (5e-324 twice split
25/75, not 50/50); a millionth is far above that and below any share anyone means."""
Weight = Annotated[float, msgspec.Meta(ge=MIN_WEIGHT, le=MAX_WEIGHT)]


class VariantConfig(_Config, frozen=True):
    """One arm of an experiment; what it leaves unset, the request and the tenant decide."""

    name: Name
    weight: Weight = 1.0
    """Relative to the other variants' weights: from 0.000001 to 1,000,000."""
    channels: tuple[Channel, ...] | None = None
    """The cascade order for this arm (replaces the request's ``channels``)."""
    step_timeout_seconds: dict[Channel, Positive] = {}
    """Unread timeouts per channel (replace the request's and the configured ones)."""
    send_windows: tuple[WindowConfig, ...] = ()
    """Send windows for this arm (replace the category's); empty: the category's."""


class ExperimentConfig(_Config, frozen=True):
    """Variants tried on shares of the tenant's recipients, chosen per request by name.

    Assignment is sticky per recipient (a salted hash), independent of the control group,
    which stays outside every experiment. Changing the definition (variants, weights,
    channels, unread timeouts, send windows, salt) of an experiment the journal has run is
    refused at start: give the changed one a new name.
    """

    variants: tuple[VariantConfig, ...]
    salt: str = ""
    """Mixed into the hash: two experiments with the same variants still split differently."""


class TenantConfig(_Config, frozen=True):
    brand: str
    """Advertiser name; every advertising message must name it (38-FZ)."""
    sender: SenderConfig = SenderConfig()
    cascade: tuple[Channel, ...] = DEFAULT_CASCADE
    providers: dict[Channel, tuple[Name, ...]] = {}
    """Provider names per channel, in failover order."""
    policy: PolicyConfig | None = None
    """Overrides the top-level policy for this tenant (whole sections, not merged)."""
    client_keys: tuple[CurveKey, ...] = ()
    """CURVE public keys (z85) of the ZeroMQ clients that may act for this tenant (with
    ``ingest.curve_secret_key`` set). A key may be listed by several tenants."""
    admin_token: Secret | None = None
    """Bearer token that reads and writes only this tenant under ``/v1/``."""
    experiments: dict[Name, ExperimentConfig] = {}
    """Experiments a ``send`` may name in its ``experiment`` field."""


class TrackingConfig(_Config, frozen=True):
    """Signed links: click redirects, the open pixel and one-click unsubscribe."""

    secret: Secret | None = None
    """Signs the links (at least 16 bytes). Unset: generated once and kept beside the journal
    (``tracking.key``, mode 0600), so links survive restarts."""
    previous_secrets: Secret | None = None
    """Comma-separated secrets that signed links still in people's mailboxes: links they
    signed keep working after a rotation; new links use ``secret``."""
    click_ttl_seconds: Positive = 90 * 86400.0
    """How long click and open links work (90 days)."""
    unsubscribe_ttl_seconds: Annotated[float, msgspec.Meta(ge=365 * 86400.0)] = 400 * 86400.0
    """How long unsubscribe links work; at least a year, because a person may unsubscribe
    from an old message at any time."""


class DiagnosticsConfig(_Config, frozen=True):
    cpu_breakdown: bool = False
    """Count the router's CPU time by what it did (``gateway_cpu_seconds_total{part}``, as
    ``make bench`` reports it). Costs 1-3 µs per trio task step, a few percent of a send:
    for benchmarks and for finding a regression, not for every day."""


class GatewayConfig(_Config, frozen=True):
    currency: str = "RUB"
    ingest: IngestConfig = IngestConfig()
    http: HttpConfig = HttpConfig()
    store: StoreConfig = StoreConfig()
    dispatch: DispatchConfig = DispatchConfig()
    channels: dict[Channel, ChannelConfig] = msgspec.field(default_factory=_default_channels)
    policy: PolicyConfig = PolicyConfig()
    providers: dict[Name, ProviderSettings] = {}
    tenants: dict[Name, TenantConfig] = {}
    simulator: SimulatorConfig = SimulatorConfig()
    tracking: TrackingConfig = TrackingConfig()
    diagnostics: DiagnosticsConfig = DiagnosticsConfig()

    def tenant_policy(self, tenant: str) -> PolicyConfig:
        return self.tenants[tenant].policy or self.policy

    def policy_rules(self, tenant: str) -> PolicyRules:
        rules = policy_rules(self.tenant_policy(tenant))
        variant_windows = tuple(
            (experiment.key(variant), variant.windows)
            for experiment in self.experiments(tenant).values()
            for variant in experiment.variants
            if variant.windows is not None
        )
        if variant_windows:
            rules = msgspec.structs.replace(rules, variant_windows=variant_windows)
        return rules

    def experiments(self, tenant: str) -> dict[str, Experiment]:
        """The tenant's experiments, as the core needs them."""
        return {
            name: experiment_of(name, experiment)
            for name, experiment in self.tenants[tenant].experiments.items()
        }

    def step_timeouts(self) -> dict[Channel, float]:
        return {channel: c.unread_timeout_seconds for channel, c in self.channels.items()}

    def provider_prices(self) -> dict[str, float]:
        """What one request costs, per provider name (the reports' and the demo's costs)."""
        return {name: provider.price for name, provider in self.providers.items()}

    def sms_price(self, tenant: str) -> float:
        """What one SMS costs the tenant (its first SMS provider's price; 0 without one): the
        baseline of "SMS to everyone" that savings are measured against."""
        names = self.tenants[tenant].providers.get(Channel.SMS, ())
        return self.providers[names[0]].price if names else 0.0


def policy_rules(policy: PolicyConfig) -> PolicyRules:
    """The core's view of one policy section."""
    consent = policy.consent
    return PolicyRules(
        consent_defaults=ConsentDefaults(
            personal_data=consent.unknown_personal_data == "grant",
            advertising=consent.unknown_advertising == "grant",
        ),
        control_group=ControlGroup(
            percent=policy.control_group.percent,
            period_seconds=policy.control_group.period_days * 86400.0,
            salt=policy.control_group.salt,
        ),
        caps=tuple(
            CapRule(
                name=c.name,
                max_count=c.max_count,
                window_seconds=c.window_seconds,
                categories=c.categories,
                channels=c.channels,
                action=c.action,
            )
            for c in policy.caps
        ),
        quiet_hours=tuple(
            QuietRule(
                window=QuietWindow(q.start, q.end),
                action=q.action,
                channels=q.channels,
                categories=q.categories,
            )
            for q in policy.quiet_hours
        ),
        critical_service_bypasses_quiet_hours=policy.critical_service_bypasses_quiet_hours,
        send_windows=tuple(
            WindowRule(windows=windows_of(w.windows), categories=w.categories)
            for w in policy.send_windows
        ),
    )


def _closed_category(
    policy: PolicyConfig, spans: tuple[QuietWindow, ...], categories: frozenset[Category]
) -> Category | None:
    """A category whose every window instant is quiet on every channel (a message of it would
    wait forever), or None.

    Exact to the microsecond, whatever the windows' resolution (a window may be seconds
    long): every window, send or quiet, is ``[start, end)`` of the local day, so between two
    consecutive bounds (and midnight) nothing changes, and each such piece is asked at its
    first instant.
    """
    rules = policy_rules(policy)
    bounds = {time(0)}
    for window in (*spans, *(rule.window for rule in rules.quiet_hours)):
        bounds |= {window.start, window.end}
    open_instants = [t for t in sorted(bounds) if any(span.contains(t) for span in spans)]
    for category in sorted(categories or {c for c in Category if c.is_marketing}):
        if not any(
            rule is None or rule.action is QuietAction.BYPASS or not rule.window.contains(t)
            for channel in Channel
            for rule in [rules.quiet_rule(channel, category)]
            for t in open_instants
        ):
            return category
    return None


def experiment_of(name: str, experiment: ExperimentConfig) -> Experiment:
    """The core's experiment for a configured one (``ValueError`` names what is wrong)."""
    return Experiment(
        name=name,
        salt=experiment.salt,
        variants=tuple(
            Variant(
                name=variant.name,
                weight=variant.weight,
                channels=variant.channels,
                step_timeout_seconds=tuple(sorted(variant.step_timeout_seconds.items())),
                windows=windows_of(variant.send_windows) if variant.send_windows else None,
            )
            for variant in experiment.variants
        ),
    )


def windows_of(windows: tuple[WindowConfig, ...]) -> SendWindows:
    """The core's send windows for configured ones (``ValueError`` names what is wrong)."""
    return send_windows((w.start, w.end) for w in windows)


# ---------------------------------------------------------------- loading
def load_config(
    toml_bytes: bytes, environ: Mapping[str, str], *, serving: bool = True
) -> GatewayConfig:
    """Parse, overlay the environment, validate.

    ``serving=False`` is for commands that do not open the gateway's sockets (the simulators):
    they are not refused for binds that would need keys.

    Raises:
        ConfigError: naming the key and what is wrong with it (and the environment variable,
            when the value came from one).
    """
    try:
        data = tomllib.loads(toml_bytes.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config is not valid TOML: {exc}") from exc
    _refuse_file_secrets(data, ())
    from_env: dict[str, str] = {}
    for name, value in sorted(environ.items()):
        if name.upper().startswith(ENV_PREFIX):
            path = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
            if not all(path):
                raise ConfigError(f"{name}: empty path segment")
            secret = path[-1] in SECRET_KEYS
            _set_path(data, path, _env_value(value, secret=secret))
            from_env[".".join(path)] = name
    _refuse_foreign_provider_keys(data, from_env)
    try:
        config = msgspec.convert(data, GatewayConfig, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        line = _dotted(str(exc), data)
        raise ConfigError(f"config: {line}{_env_source(line, from_env)}") from exc
    config = _resolve_store(config, environ)
    _validate(config, serving=serving)
    return config


def _env_source(line: str, from_env: Mapping[str, str]) -> str:
    """ " (set by CASCADEGW__X)" when the bad key of ``line`` came from the environment."""
    key, _, text = line.partition(": ")
    for dotted, name in from_env.items():
        unknown = f"unknown field `{dotted.rsplit('.', 1)[-1]}`" in text
        if (
            key == dotted
            or key.startswith(f"{dotted}.")
            or dotted.startswith(f"{key}.")
            or (unknown and (dotted == key or dotted.rsplit(".", 1)[0] == key or "." not in dotted))
        ):
            return f" (set by {name})"
    return ""


def data_directory(configured: str, environ: Mapping[str, str]) -> Path:
    """The data directory: configured, else systemd's, else XDG's state directory."""
    if configured:
        return Path(configured).expanduser()
    # a relative value in these variables is invalid and ignored (the XDG base directory
    # specification says so; systemd never sets one)
    state = environ.get("STATE_DIRECTORY", "").split(":")[0]
    if state.startswith("/"):
        return Path(state)
    xdg = environ.get("XDG_STATE_HOME", "")
    if xdg.startswith("/"):
        return Path(xdg) / "cascadegw"
    home = environ.get("HOME", "")
    if home:
        return Path(home) / ".local" / "state" / "cascadegw"
    return Path("/var/lib/cascadegw")


def _resolve_store(config: GatewayConfig, environ: Mapping[str, str]) -> GatewayConfig:
    """Make ``store.path`` absolute, inside the data directory when it was relative."""
    store = config.store
    base = data_directory(store.data_dir, environ)
    if not base.is_absolute():
        raise ConfigError(
            f"store.data_dir = {store.data_dir!r}: must be an absolute path "
            f"(a relative one would depend on where the command is started)"
        )
    path = Path(store.path).expanduser()
    resolved = path if path.is_absolute() else base / path
    store = msgspec.structs.replace(store, data_dir=str(base), path=str(resolved))
    return msgspec.structs.replace(config, store=store)


def _refuse_file_secrets(node: object, path: tuple[str, ...]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in SECRET_KEYS:
                dotted = ".".join((*path, key))
                env = ENV_PREFIX + "__".join((*path, key)).upper()
                raise ConfigError(f"{dotted}: secrets come only from the environment; set {env}")
            _refuse_file_secrets(value, (*path, key))
    elif isinstance(node, list):
        for item in node:
            _refuse_file_secrets(item, path)


_PROVIDER_KEYS: Final[Mapping[str, frozenset[str]]] = {
    kind: frozenset(spec.settings.__struct_fields__) for kind, spec in SPECS.items()
}


def _refuse_foreign_provider_keys(data: dict[str, object], from_env: Mapping[str, str]) -> None:
    """Name the key when a provider table has a key of another provider kind (``account_sid``
    on a sendgrid provider): msgspec would only say the table has an unknown field."""
    providers = data.get("providers")
    if not isinstance(providers, dict):
        return
    for name, table in providers.items():
        kind = table.get("kind") if isinstance(table, dict) else None
        own = _PROVIDER_KEYS.get(kind) if isinstance(kind, str) else None
        if own is None:
            continue  # no table or no known kind: msgspec's error names what is wrong
        for key in table:
            owners = sorted(other for other, keys in _PROVIDER_KEYS.items() if key in keys)
            if key not in own and owners:
                line = (
                    f"providers.{name}.{key}: a setting of kind {' or '.join(owners)}, "
                    f"not of {kind}"
                )
                raise ConfigError(f"config: {line}{_env_source(line, from_env)}")


def _env_value(raw: str, *, secret: bool) -> object:
    if secret:
        return raw
    try:
        return tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        return raw


def _set_path(data: dict[str, object], path: list[str], value: object) -> None:
    node = data
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path)}: {part!r} is not a table")
        node = child
    node[path[-1]] = value


def _dec_hook(type_: type, value: object) -> object:
    if type_ is Secret:
        if isinstance(value, str):
            return Secret(value)
        # a TypeError becomes a ValidationError naming the key (NotImplementedError escapes)
        raise TypeError(f"Expected `str`, got `{type(value).__name__}`")
    raise NotImplementedError


_PATH_PART: Final = re.compile(r"\.([^.\[]+)|\[(\d+|\.\.\.)\]")


def _dotted(message: str, data: dict[str, object]) -> str:
    """msgspec says ``... - at `$.tenants[...].brand```; we say ``tenants.acme.brand: ...``.

    msgspec writes every table key as ``[...]`` (and a bad key as ``key` in `$.channels``), so
    each one is looked up in ``data``: the entry is the one that, left alone in its table,
    gives the same error.
    """
    text, sep, where = message.rpartition(" - at `")
    if not sep:
        return message
    bad_key = where.startswith("key` in `")
    where = where.removeprefix("key` in `").rstrip("`").removeprefix("$")
    parts: list[tuple[str, str]] = _PATH_PART.findall(where)
    if bad_key:
        parts.append(("", "..."))
    dotted, node = "", cast("Any", data)
    try:
        for name, index in parts:
            if name:
                dotted, node = f"{dotted}.{name}", node[name]
            elif index != "...":
                dotted, node = f"{dotted}[{index}]", node[int(index)]
            else:
                key = _culprit(data, node, message)
                dotted, node = f"{dotted}.{key}", node[key]
    except (KeyError, IndexError, TypeError, AttributeError):
        return f"{where.lstrip('.')}: {text}"
    return f"{dotted.lstrip('.')}: {text}"


def _culprit(data: dict[str, object], table: dict[str, object], message: str) -> str:
    """The key of ``table`` whose entry alone makes converting ``data`` fail with ``message``."""
    entries = dict(table)
    try:
        for key, value in entries.items():
            table.clear()
            table[key] = value
            try:
                msgspec.convert(data, GatewayConfig, dec_hook=_dec_hook)
            except msgspec.ValidationError as exc:
                if str(exc) == message:
                    return key
    finally:
        table.clear()
        table.update(entries)
    raise KeyError(message)


def is_loopback(address: str) -> bool:
    """Whether a bind address (``tcp://host:port``, ``host:port``, ``ipc://...``) is reachable
    only from this machine: ``localhost`` or a loopback IP, never a name that merely starts
    like one (``127.0.0.1.nip.io``)."""
    scheme, sep, rest = address.partition("://")
    if sep and scheme in ("ipc", "inproc"):
        return True
    host = (rest if sep else address).rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listening_binds(config: GatewayConfig) -> list[tuple[str, str]]:
    """The addresses the gateway listens on, by key: the public surface is ``public_bind``,
    or ``webhook_bind`` when webhook processes serve it (the other one is then unused)."""
    http = config.http
    public = ("http.webhook_bind", http.webhook_bind) if http.webhook_processes else None
    return [
        ("ingest.bind", config.ingest.bind),
        ("ingest.status_bind", config.ingest.status_bind),
        ("http.bind", http.bind),
        public or ("http.public_bind", http.public_bind),
    ]


_WILDCARD_HOSTS: Final = frozenset({"", "*", "0.0.0.0", "::"})  # noqa: S104 - naming, not binding
_LOCALHOST: Final = frozenset({ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")})


def _host_port(address: str) -> tuple[str, int]:
    """``tcp://host:port`` or ``host:port`` (``[::1]:8080``) as host and port; port 0 for
    any free port (``*``) and for what is no TCP address (``ipc://``)."""
    scheme, sep, rest = address.partition("://")
    host, _, port = (rest if sep else address).rpartition(":")
    if (sep and scheme != "tcp") or not port.isdigit():
        return "", 0
    return host.strip("[]"), int(port)


def _host_ips(host: str) -> frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address] | None:
    """The addresses a bind host stands for; None for a wildcard or a name we cannot tell."""
    if host == "localhost":
        return _LOCALHOST
    if host in _WILDCARD_HOSTS:
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None  # a host name or a ZeroMQ interface name: it may be any address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return frozenset({ip.ipv4_mapped})
    return frozenset({ip})


def binds_clash(first: str, second: str) -> bool:
    """Whether two of the gateway's listeners would take the same socket: the same port, and
    either host is a wildcard, or both name the same host (``localhost`` is ``127.0.0.1``; a
    host name may be any address). Port 0 (ZeroMQ: ``*``) asks for a free port: never."""
    (host_a, port_a), (host_b, port_b) = _host_port(first), _host_port(second)
    if port_a == 0 or port_a != port_b:
        return False
    ips_a, ips_b = _host_ips(host_a), _host_ips(host_b)
    return ips_a is None or ips_b is None or bool(ips_a & ips_b)


def bind_holder(config: GatewayConfig, key: str, address: str) -> str | None:
    """Which other of the gateway's own listeners takes ``address`` (``key``'s), if any."""
    for other, other_address in listening_binds(config):
        if other != key and binds_clash(address, other_address):
            return other
    return None


def bind_error(
    key: str, address: str, errno: int | None, reason: str, *, holder: str | None = None
) -> ConfigError:
    """One line naming a bind that failed, why, and the variable that moves it. ``holder`` is
    the gateway's own listener on that address, when it is one (not another process)."""
    env = f"{ENV_PREFIX}{key.upper().replace('.', '__')}"
    if errno == errno_codes.EADDRINUSE:
        who = f"this gateway's own {holder} takes it" if holder else "another process holds it"
        hint = f"{who}; {'give one of them another port' if holder else 'stop it'} or set {env}"
    elif errno == errno_codes.EACCES:
        hint = f"ports below 1024 need privileges; use another port: set {env}"
    else:
        hint = f"set {env}"
    return ConfigError(f"{key} = {address!r}: {reason.lower()} ({hint})")


def _validate_binds(config: GatewayConfig) -> None:
    """Every address the gateway binds has a host and a port from 0 to 65535, and no two of
    its listeners take the same socket."""
    binds = [
        ("ingest.bind", config.ingest.bind),
        ("ingest.status_bind", config.ingest.status_bind),
        ("http.bind", config.http.bind),
        ("http.public_bind", config.http.public_bind),
        ("http.webhook_bind", config.http.webhook_bind),
    ]
    for key, address in binds:
        scheme, sep, rest = address.partition("://")
        if sep and scheme in ("ipc", "inproc"):
            continue
        host, colon, port = (rest if sep else address).rpartition(":")
        if sep and port == "*":
            continue  # ZeroMQ: any free port
        if not colon or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            env = ENV_PREFIX + key.upper().replace(".", "__")
            raise ConfigError(
                f"{key} = {address!r}: expected host:port with a port from 0 to 65535"
                f"{' (tcp://host:port)' if key.startswith('ingest') else ''}; set it or {env}"
            )
    listening = listening_binds(config)
    for index, (key, address) in enumerate(listening):
        for earlier, earlier_address in listening[:index]:
            if binds_clash(address, earlier_address):
                env = ENV_PREFIX + key.upper().replace(".", "__")
                raise ConfigError(
                    f"{key} = {address!r} takes the same port as {earlier} = "
                    f"{earlier_address!r}: every listener needs its own port; set {env}"
                )


def _validate_exposure(config: GatewayConfig) -> None:
    """Refuse to expose an unauthenticated surface beyond loopback (one line, naming the key)."""
    ingest = config.ingest
    if ingest.curve_secret_key is None:
        for key, address in (("bind", ingest.bind), ("status_bind", ingest.status_bind)):
            if not is_loopback(address):
                raise ConfigError(
                    f"ingest.{key} = {address!r} is not loopback, but ZeroMQ clients are not "
                    f"authenticated: set {ENV_PREFIX}INGEST__CURVE_SECRET_KEY "
                    "(cascadegw keys generate) and tenants' client_keys"
                )
    named_tokens = [("http.admin_token", config.http.admin_token)] + [
        (f"tenants.{name}.admin_token", t.admin_token) for name, t in config.tenants.items()
    ]
    for key, token in named_tokens:
        if token is not None and len(token.reveal()) < _MIN_TOKEN_CHARS:
            raise ConfigError(
                f"{key}: at least {_MIN_TOKEN_CHARS} characters (a bearer token is guessed "
                "otherwise); e.g. `python3 -c 'import secrets; print(secrets.token_urlsafe())'`"
            )
        if token is not None and not header_safe(token.reveal()):
            # no HTTP client can send it: the admin API would be closed to everybody
            raise ConfigError(f"{key}: a token is visible ASCII characters without spaces")
    tokens = any(token is not None for _, token in named_tokens)
    if not tokens and not is_loopback(config.http.bind):
        raise ConfigError(
            f"http.bind = {config.http.bind!r} is not loopback, but the admin API has no token: "
            f"set {ENV_PREFIX}HTTP__ADMIN_TOKEN (or tenants' admin_token), or bind it to "
            "127.0.0.1 and serve webhooks on http.public_bind"
        )
    if ingest.curve_secret_key is not None and not _Z85_KEY.fullmatch(
        ingest.curve_secret_key.reveal()
    ):
        raise ConfigError(
            f"ingest.curve_secret_key: not a z85 CURVE key (40 characters); "
            f"make one with `cascadegw keys generate` and set {ENV_PREFIX}INGEST__CURVE_SECRET_KEY"
        )


_MIN_TOKEN_CHARS: Final = 16
_Z85_KEY: Final = re.compile(r"[0-9a-zA-Z.:+=^!/*?&<>()\[\]{}@%$#-]{40}")


def header_safe(token: str) -> bool:
    """Whether a bearer token can go in an HTTP header: visible ASCII, no spaces (a CR or LF
    would end the header)."""
    return token.isascii() and token.isprintable() and " " not in token and token != ""


def _validate(config: GatewayConfig, *, serving: bool) -> None:
    _validate_binds(config)
    if serving:
        _validate_exposure(config)
    tenant_names = sorted(config.tenants)
    for shorter, longer in itertools.pairwise(tenant_names):
        if longer.startswith(shorter):
            # ZeroMQ subscriptions match topics by prefix: a subscriber to "shop" would also
            # receive "shop-eu"'s status events
            raise ConfigError(
                f"tenants.{longer}: its name starts with tenant {shorter!r}; status-event "
                "topics match by prefix, so no tenant name may begin with another's"
            )
    tracking = config.tracking
    for secret in (tracking.secret, *_previous_secrets(tracking)):
        if secret is not None and len(secret.reveal().encode()) < 16:
            raise ConfigError("tracking.secret: needs at least 16 bytes")
    for channel in Channel:
        if channel not in config.channels:
            raise ConfigError(f"channels.{channel}: missing (every channel needs a timeout)")
    policies = [("policy", config.policy)] + [
        (f"tenants.{name}.policy", t.policy) for name, t in config.tenants.items() if t.policy
    ]
    for where, policy in policies:
        for index, quiet in enumerate(policy.quiet_hours):
            if quiet.start == quiet.end:
                raise ConfigError(f"{where}.quiet_hours[{index}]: start and end must differ")
        for index, windows in enumerate(policy.send_windows):
            if Category.SERVICE in windows.categories:
                raise ConfigError(
                    f"{where}.send_windows[{index}].categories: service messages ignore send "
                    "windows (a receipt or a code goes when it is due); leave service out"
                )
            try:
                windows_of(windows.windows)
            except ValueError as exc:
                raise ConfigError(f"{where}.send_windows[{index}].windows: {exc}") from exc
        for index, windows in enumerate(policy.send_windows):
            closed = _closed_category(policy, windows_of(windows.windows).spans, windows.categories)
            if closed is not None:
                raise ConfigError(
                    f"{where}.send_windows[{index}].windows: every window lies in the quiet "
                    f"hours of {closed} messages on every channel, so none could ever be sent; "
                    "move the windows or the quiet hours"
                )
        cap_names = [cap.name for cap in policy.caps]
        if len(set(cap_names)) != len(cap_names):
            raise ConfigError(f"{where}.caps: cap names must be unique")
        try:
            policy_rules(policy)  # the core's own checks (finite periods, valid windows)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
    for name, provider in config.providers.items():
        if not provider.simulated and not provider.url:
            raise ConfigError(f"providers.{name}.url: required unless simulated = true")
    for tenant_name, tenant in config.tenants.items():
        where = f"tenants.{tenant_name}"
        if not tenant.cascade:
            raise ConfigError(f"{where}.cascade: needs at least one channel")
        if len(set(tenant.cascade)) != len(tenant.cascade):
            raise ConfigError(f"{where}.cascade: a channel is listed twice")
        for channel, names in tenant.providers.items():
            for index, provider_name in enumerate(names):
                serving_provider = config.providers.get(provider_name)
                if serving_provider is None:
                    raise ConfigError(
                        f"{where}.providers.{channel}[{index}]: unknown provider {provider_name!r}"
                    )
                if serving_provider.channel is not channel:
                    raise ConfigError(
                        f"{where}.providers.{channel}[{index}]: {provider_name!r} is a "
                        f"{serving_provider.kind} provider, which serves {serving_provider.channel}, not {channel}"
                    )
        for channel in tenant.cascade:
            if not tenant.providers.get(channel):
                raise ConfigError(
                    f"{where}.providers.{channel}: the cascade uses {channel} but no provider serves it"
                )
        for name, experiment in tenant.experiments.items():
            _validate_experiment(
                f"{where}.experiments.{name}",
                name,
                experiment,
                tenant,
                config.tenant_policy(tenant_name),
            )


def _validate_experiment(
    where: str, name: str, experiment: ExperimentConfig, tenant: TenantConfig, policy: PolicyConfig
) -> None:
    if len(experiment.variants) < 2:
        raise ConfigError(f"{where}.variants: an experiment needs at least two variants")
    names = [variant.name for variant in experiment.variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}.variants: variant names must be unique")
    for index, variant in enumerate(experiment.variants):
        at = f"{where}.variants[{index}]"
        if variant.channels is not None:
            if not variant.channels:
                raise ConfigError(f"{at}.channels: needs at least one channel (or leave it out)")
            if len(set(variant.channels)) != len(variant.channels):
                raise ConfigError(f"{at}.channels: a channel is listed twice")
            for channel in variant.channels:
                if not tenant.providers.get(channel):
                    raise ConfigError(
                        f"{at}.channels: uses {channel} but no provider of the tenant serves it"
                    )
        if variant.send_windows:
            try:
                spans = windows_of(variant.send_windows).spans
            except ValueError as exc:
                raise ConfigError(f"{at}.send_windows: {exc}") from exc
            closed = _closed_category(policy, spans, frozenset())
            if closed is not None:
                raise ConfigError(
                    f"{at}.send_windows: every window lies in the quiet hours of {closed} "
                    "messages on every channel; move the windows or the quiet hours"
                )
    try:
        experiment_of(name, experiment)  # the core's own checks
    except ValueError as exc:  # what the checks above missed is still one line naming the key
        raise ConfigError(f"{where}: {exc}") from exc


def _previous_secrets(tracking: TrackingConfig) -> list[Secret]:
    if tracking.previous_secrets is None:
        return []
    return [
        Secret(part.strip())
        for part in tracking.previous_secrets.reveal().split(",")
        if part.strip()
    ]


def tracking_secrets(tracking: TrackingConfig) -> list[bytes]:
    """The configured secrets that verify links, the signing one first (none when unset)."""
    secrets = [] if tracking.secret is None else [tracking.secret.reveal().encode()]
    return secrets + [secret.reveal().encode() for secret in _previous_secrets(tracking)]


DEFAULT_CONFIG: Final = "the built-in default (gateway/defaults/gateway.toml)"


def default_config_bytes() -> bytes:
    """The embedded default config, shipped inside the package."""
    return resources.files("gateway.defaults").joinpath("gateway.toml").read_bytes()
