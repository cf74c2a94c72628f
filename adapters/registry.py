"""Which module speaks which provider kind: adapters, webhook codecs and simulators by kind."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Final

import httpx

from adapters import Adapter, ProviderReceipt, fcm, sendgrid, twilio, viber
from adapters._http import make_client
from adapters.simulators._base import Simulator
from adapters.simulators.fcm import FcmSimulator
from adapters.simulators.sendgrid import SendgridSimulator
from adapters.simulators.twilio import TwilioSimulator
from adapters.simulators.viber import ViberSimulator
from gateway.config import GatewayConfig, ProviderConfig

Verifier = Callable[..., None]
Parser = Callable[..., list[ProviderReceipt]]

ADAPTERS: Final[Mapping[str, Callable[[str, ProviderConfig, httpx.AsyncClient], Adapter]]] = {
    "fcm": fcm.FcmAdapter,
    "sendgrid": sendgrid.SendgridAdapter,
    "viber": viber.ViberAdapter,
    "twilio": twilio.TwilioAdapter,
}
VERIFIERS: Final[Mapping[str, Verifier]] = {
    "fcm": fcm.verify_webhook,
    "sendgrid": sendgrid.verify_webhook,
    "viber": viber.verify_webhook,
    "twilio": twilio.verify_webhook,
}
PARSERS: Final[Mapping[str, Parser]] = {
    "fcm": fcm.parse_webhook,
    "sendgrid": sendgrid.parse_webhook,
    "viber": viber.parse_webhook,
    "twilio": twilio.parse_webhook,
}
SIMULATORS: Final[Mapping[str, type[Simulator]]] = {
    "fcm": FcmSimulator,
    "sendgrid": SendgridSimulator,
    "viber": ViberSimulator,
    "twilio": TwilioSimulator,
}


# adapters that read wall time (JWT lifetimes, rate-limit reset epochs) take the gateway's clock
_CLOCKED: Final = frozenset({"fcm", "sendgrid"})


def build_adapters(
    config: GatewayConfig, *, wall_clock: Callable[[], float] | None = None
) -> tuple[dict[str, Adapter], list[httpx.AsyncClient]]:
    """One adapter (and one connection pool) per configured provider account."""
    adapters: dict[str, Adapter] = {}
    clients: list[httpx.AsyncClient] = []
    for name, provider in config.providers.items():
        client = make_client(
            timeout_seconds=provider.timeout_seconds, max_connections=provider.concurrency
        )
        clients.append(client)
        if wall_clock is not None and provider.kind in _CLOCKED:
            adapters[name] = _clocked(provider.kind)(name, provider, client, wall_clock=wall_clock)
        else:
            adapters[name] = ADAPTERS[provider.kind](name, provider, client)
    return adapters, clients


def _clocked(kind: str) -> type[fcm.FcmAdapter] | type[sendgrid.SendgridAdapter]:
    return fcm.FcmAdapter if kind == "fcm" else sendgrid.SendgridAdapter
