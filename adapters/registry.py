"""Which module speaks which provider kind: one ``ProviderSpec`` per provider, by kind.

A spec gathers what the gateway needs of one provider's module: its settings type (the tagged
struct a ``[providers.<name>]`` table with its ``kind`` is read into), the adapter that sends,
the webhook verifier and parser, and the simulator that stands in for the provider. Adding a
provider is one module, one simulator and one entry here (and a member of ``ProviderSettings``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Generic, Protocol, TypeVar, get_args

from adapters import Adapter, ProviderReceipt, fcm, sendgrid, twilio, viber
from adapters._http import make_client
from adapters._transport import ConnectionPool, HttpClient
from adapters.simulators._base import Simulator
from adapters.simulators.fcm import FcmSimulator
from adapters.simulators.sendgrid import SendgridSimulator
from adapters.simulators.twilio import TwilioSimulator
from adapters.simulators.viber import ViberSimulator
from gateway.core.model import Channel
from gateway.settings import ProviderSettingsBase

ProviderSettings = (
    fcm.FcmSettings | sendgrid.SendgridSettings | viber.ViberSettings | twilio.TwilioSettings
)
"""Any provider's settings: msgspec reads a provider table into the member its ``kind`` tags."""

WallClock = Callable[[], float]
"""POSIX seconds: the gateway's clock (``gateway.clock.Clock.now``), passed in."""

S = TypeVar("S", bound=ProviderSettingsBase)
S_contra = TypeVar("S_contra", bound=ProviderSettingsBase, contravariant=True)


class AdapterFactory(Protocol[S_contra]):
    def __call__(
        self, name: str, settings: S_contra, client: HttpClient, /, *, wall_clock: WallClock
    ) -> Adapter: ...


class Verifier(Protocol[S_contra]):
    def __call__(
        self, *, url: str, headers: Mapping[str, str], body: bytes, config: S_contra, now: float
    ) -> None: ...


class Parser(Protocol):
    def __call__(
        self, *, url: str, headers: Mapping[str, str], body: bytes
    ) -> list[ProviderReceipt]: ...


@dataclass(frozen=True, slots=True)
class ProviderSpec(Generic[S]):
    """Everything the gateway knows about one provider kind."""

    settings: type[S]
    adapter: AdapterFactory[S]
    verify_webhook: Verifier[S]
    parse_webhook: Parser
    simulator: type[Simulator]

    @property
    def kind(self) -> str:
        tag = self.settings.__struct_config__.tag
        assert isinstance(tag, str), f"{self.settings.__name__} has no kind tag"
        return tag

    @property
    def channel(self) -> Channel:
        return self.settings.channel


def _viber(
    name: str, settings: viber.ViberSettings, client: HttpClient, /, *, wall_clock: WallClock
) -> Adapter:
    del wall_clock  # Viber's adapter reads no wall time (its webhook verifier is given `now`)
    return viber.ViberAdapter(name, settings, client)


def _twilio(
    name: str,
    settings: twilio.TwilioSettings,
    client: HttpClient,
    /,
    *,
    wall_clock: WallClock,
) -> Adapter:
    del wall_clock  # Twilio's adapter reads no wall time
    return twilio.TwilioAdapter(name, settings, client)


_SPECS: Final[tuple[ProviderSpec[Any], ...]] = (
    ProviderSpec(
        settings=fcm.FcmSettings,
        adapter=fcm.FcmAdapter,
        verify_webhook=fcm.verify_webhook,
        parse_webhook=fcm.parse_webhook,
        simulator=FcmSimulator,
    ),
    ProviderSpec(
        settings=sendgrid.SendgridSettings,
        adapter=sendgrid.SendgridAdapter,
        verify_webhook=sendgrid.verify_webhook,
        parse_webhook=sendgrid.parse_webhook,
        simulator=SendgridSimulator,
    ),
    ProviderSpec(
        settings=viber.ViberSettings,
        adapter=_viber,
        verify_webhook=viber.verify_webhook,
        parse_webhook=viber.parse_webhook,
        simulator=ViberSimulator,
    ),
    ProviderSpec(
        settings=twilio.TwilioSettings,
        adapter=_twilio,
        verify_webhook=twilio.verify_webhook,
        parse_webhook=twilio.parse_webhook,
        simulator=TwilioSimulator,
    ),
)
SPECS: Final[Mapping[str, ProviderSpec[Any]]] = {spec.kind: spec for spec in _SPECS}
"""Provider kind -> its spec."""

# the union is spelled out for type checkers; it must name exactly the specs' settings types
assert set(get_args(ProviderSettings)) == {spec.settings for spec in _SPECS}, (
    "ProviderSettings and the provider specs list different settings types"
)


def build_adapters(
    providers: Mapping[str, ProviderSettings], *, wall_clock: WallClock
) -> tuple[dict[str, Adapter], list[ConnectionPool]]:
    """One adapter (and one connection pool) per configured provider account.

    Args:
        providers: provider name -> settings (``GatewayConfig.providers``).
        wall_clock: the gateway's clock, for adapters that read wall time (JWT lifetimes,
            rate-limit reset epochs).
    """
    adapters: dict[str, Adapter] = {}
    clients: list[ConnectionPool] = []
    for name, settings in providers.items():
        client = make_client(
            timeout_seconds=settings.timeout_seconds, max_connections=settings.concurrency
        )
        clients.append(client)
        adapters[name] = SPECS[settings.kind].adapter(name, settings, client, wall_clock=wall_clock)
    return adapters, clients
