"""Shared helpers for runtime and end-to-end tests: configs, in-test providers, request builders."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from adapters import Outgoing, SendReceipt
from gateway.client import send_request
from gateway.config import GatewayConfig, load_config
from gateway.core.errors import ProviderError
from gateway.core.model import Channel

# A fixed Monday noon, UTC, so quiet hours and caps are deterministic in runtime tests.
NOON_UTC = 1_795_435_200.0  # 2026-11-23T12:00:00Z (a Monday)

PROVIDER_KINDS = {
    Channel.PUSH: "fcm",
    Channel.EMAIL: "sendgrid",
    Channel.VIBER: "viber",
    Channel.SMS: "twilio",
}


def make_config(
    tmp_path: Path,
    *,
    extra: str = "",
    tenant_extra: str = "",
    providers_per_channel: int = 1,
    cascade: tuple[str, ...] = ("push", "email", "viber", "sms"),
    unknown_advertising: str = "grant",
    provider_options: str = "",
    environ: dict[str, str] | None = None,
    write_to: Path | None = None,
) -> GatewayConfig:
    """A gateway config on ephemeral ports and a fresh SQLite file, tenant ``acme``; also
    written to ``write_to`` for processes that read it themselves (the ZeroMQ edge).

    Providers are named ``{channel}{n}`` (push1, email1, email2, ...) and point nowhere: tests
    give the gateway in-test adapters for them.
    """
    provider_blocks: list[str] = []
    tenant_providers = []
    for channel, kind in PROVIDER_KINDS.items():
        names = [f"{channel.value}{n}" for n in range(1, providers_per_channel + 1)]
        tenant_providers.append(f"{channel.value} = [{', '.join(repr(n) for n in names)}]")
        provider_blocks.extend(
            f'[providers.{name}]\nkind = "{kind}"\nurl = "http://provider.invalid"\n'
            f"price = {_PRICES[channel]}\nrate_per_second = 1000\nburst = 100\nconcurrency = 64\n"
            f"{provider_options}\n"
            for name in names
        )
    text = f"""
[ingest]
bind = "tcp://127.0.0.1:*"
status_bind = "tcp://127.0.0.1:*"
[http]
bind = "127.0.0.1:0"
public_bind = "127.0.0.1:0"
public_url = "http://gateway.test"
[store]
path = "{tmp_path / "journal.db"}"
synchronous = "normal"
create = true
[policy.consent]
unknown_advertising = "{unknown_advertising}"
{extra}
{"".join(provider_blocks)}
[tenants.acme]
brand = "Acme"
cascade = [{", ".join(repr(c) for c in cascade)}]
providers = {{ {", ".join(tenant_providers)} }}
sender = {{ email_from = "news@acme.example", email_name = "Acme", sms_from = "ACME", viber_name = "Acme" }}
{tenant_extra}
"""
    if write_to is not None:
        write_to.write_text(text)
    return load_config(text.encode(), environ or {})


_PRICES = {Channel.PUSH: 0.0, Channel.EMAIL: 0.05, Channel.VIBER: 0.9, Channel.SMS: 3.5}


class InTestProvider:
    """A provider adapter living inside the test: records requests, answers as scripted.

    ``answer(outgoing)`` may return a SendReceipt or raise a ProviderError; the default accepts.
    ``delay_seconds`` makes it slow (trio time, so MockClock-driven).
    """

    def __init__(self, name: str, channel: Channel, *, delay_seconds: float = 0.0) -> None:
        self.name = name
        self.channel = channel
        self.delay_seconds = delay_seconds
        self.sent: list[Outgoing] = []
        self.answer: Callable[[Outgoing], SendReceipt] | None = None
        self.errors: list[ProviderError] = []
        """Raised, in order, for the next requests before answering normally."""
        self.calls = 0

    async def send(self, outgoing: Outgoing) -> SendReceipt:
        self.calls += 1
        if self.delay_seconds:
            await trio.sleep(self.delay_seconds)
        if self.errors:
            raise self.errors.pop(0)
        if self.answer is not None:
            receipt = self.answer(outgoing)
        else:
            receipt = SendReceipt(f"{self.name}-{self.calls}")
        self.sent.append(outgoing)
        return receipt

    async def aclose(self) -> None:
        return None

    def keys(self) -> list[str]:
        return [o.message_key for o in self.sent]


def in_test_providers(
    config: GatewayConfig, *, delay_seconds: float = 0.0
) -> dict[str, InTestProvider]:
    return {
        name: InTestProvider(name, provider.channel, delay_seconds=delay_seconds)
        for name, provider in config.providers.items()
    }


def promo(message_id: str, recipient_id: str | None = None, **fields: Any) -> dict[str, Any]:
    """A promo for every channel, to a recipient with every address."""
    recipient = {
        "id": recipient_id or f"r-{message_id}",
        "tz": "UTC",
        "push_tokens": [f"token-{message_id}"],
        "email": f"{message_id}@example.com",
        "viber_id": f"viber-{message_id}",
        "phone": "+79160000000",
    }
    recipient.update(fields.pop("recipient", {}))
    return send_request(
        message_id,
        fields.pop("tenant", "acme"),
        recipient=recipient,
        category=fields.pop("category", "promo"),
        content=fields.pop(
            "content",
            {
                "push": {"title": "Sale", "body": "Up to 50% off {link}"},
                "email": {
                    "subject": "Sale",
                    "html": "<p>Sale <a href='{link}'>shop</a></p>",
                    "text": "Sale {link}",
                },
                "viber": {"text": "Sale {link}"},
                "sms": {"text": "Sale {link}"},
                "link_url": "https://shop.example/sale",
            },
        ),
        **fields,
    )


async def wait_for(
    condition: Callable[[], bool], *, timeout_seconds: float = 60.0, what: str = ""
) -> None:
    """Return as soon as ``condition()`` holds; fail after ``timeout_seconds`` of trio time
    (virtual under a MockClock). Tests wait for outcomes this way, never for a fixed time.

    The poll interval grows from 10 ms to 1 s: under an autojumping clock each poll costs the
    jump threshold in real time, so a long virtual wait must not poll every 10 ms. To reach a
    moment in virtual time, sleep until it first; then wait for what it causes.
    """
    interval = 0.01
    with trio.move_on_after(timeout_seconds):
        while not condition():
            await trio.sleep(interval)
            interval = min(interval * 1.5, 1.0)
        return
    raise AssertionError(f"not true within {timeout_seconds} s: {what or condition}")


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc)."""
    with open(f"/proc/{os.getpid()}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")
