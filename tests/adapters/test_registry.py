"""adapters/registry.py: one spec per provider kind, and adapters built with the clock given."""

from __future__ import annotations

from typing import get_args

import msgspec
import pytest
import trio

from adapters import fcm, sendgrid, twilio, viber
from adapters.registry import SPECS, ProviderSettings, build_adapters
from adapters.simulators._base import Scripted
from adapters.simulators.sendgrid import SendgridSimulator
from gateway.core.errors import RateLimited
from gateway.settings import Secret, SimulatorConfig
from tests.adapters.test_fcm import account_json
from tests.adapters.test_sendgrid import mail

NOW = 1_000_000_000.0
"""September 2001: a reading of the real clock cannot pass for it."""
FAST = SimulatorConfig(latency_seconds=0)
MODULES = (fcm, sendgrid, viber, twilio)


class TestSpecs:
    """Each provider module is described once, by its own names."""

    def test_one_spec_per_provider_module(self) -> None:
        assert {
            module.KIND: (module.CHANNEL, module.verify_webhook, module.parse_webhook)
            for module in MODULES
        } == {
            kind: (spec.channel, spec.verify_webhook, spec.parse_webhook)
            for kind, spec in SPECS.items()
        }

    def test_settings_types_are_tagged_by_their_kind(self) -> None:
        assert {kind: kind for kind in SPECS} == {
            kind: spec.settings().kind for kind, spec in SPECS.items()
        }
        assert set(get_args(ProviderSettings)) == {spec.settings for spec in SPECS.values()}

    @pytest.mark.parametrize("kind", sorted(SPECS))
    def test_a_simulators_credentials_are_its_kinds_settings(self, kind: str) -> None:
        """The embedded gateway points a simulated provider at its simulator this way."""
        spec = SPECS[kind]
        simulator = spec.simulator(name="p", behaviour=FAST)
        credentials = simulator.credentials()

        settings = msgspec.structs.replace(spec.settings(), **credentials)

        assert credentials == {key: getattr(settings, key) for key in credentials}


class TestBuildAdapters:
    """One adapter per provider account, of its kind, reading the clock it is handed."""

    async def test_one_adapter_and_client_per_provider(self) -> None:
        providers: dict[str, ProviderSettings] = {
            "push": fcm.FcmSettings(service_account_json=Secret(account_json())),
            "mail": sendgrid.SendgridSettings(api_key=Secret("SG.test.key")),
            "chat": viber.ViberSettings(auth_token=Secret("bot-token")),
            "sms": twilio.TwilioSettings(account_sid="AC1", auth_token=Secret("auth-token")),
        }

        adapters, clients = build_adapters(providers, wall_clock=lambda: NOW)
        for client in clients:
            await client.aclose()

        assert {
            "push": (fcm.FcmAdapter, fcm.CHANNEL),
            "mail": (sendgrid.SendgridAdapter, sendgrid.CHANNEL),
            "chat": (viber.ViberAdapter, viber.CHANNEL),
            "sms": (twilio.TwilioAdapter, twilio.CHANNEL),
        } == {name: (type(adapter), adapter.channel) for name, adapter in adapters.items()}
        assert list(providers) == [adapter.name for adapter in adapters.values()]
        assert len(providers) == len({id(client) for client in clients})

    async def test_adapters_read_the_clock_they_are_given(self) -> None:
        """SendGrid's 429 names the epoch second its limit resets; the delay is counted from
        the given clock's now (the real clock would make it 0: NOW is long past)."""
        sim = SendgridSimulator(name="mail", behaviour=FAST, seed=1)
        sim.script.append(Scripted(status=429, headers={"X-RateLimit-Reset": str(int(NOW) + 30)}))
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(sim.serve)
                settings = sendgrid.SendgridSettings(**sim.credentials())  # type: ignore[arg-type]
                adapters, clients = build_adapters({"mail": settings}, wall_clock=lambda: NOW)
                try:
                    with pytest.raises(RateLimited) as caught:
                        await adapters["mail"].send(mail("ann+ignore@example.com"))
                finally:
                    for client in clients:
                        await client.aclose()
                nursery.cancel_scope.cancel()
        assert 30.0 == caught.value.retry_after_seconds
