"""A live gateway for contract tests: the shipped default config (tenant ``demo``, the four
provider simulators) on ephemeral ports and a fresh journal, on the real clock, with the control
group off: it holds out 5% of recipients, drawn anew each 90 days, so a test's recipient would
be refused ("holdout") on some dates and not others (the Node CRM's, named after the time it
runs, in about one run in twenty)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import trio

from gateway.config import default_config_bytes, load_config
from gateway.embedded import Embedded, open_embedded

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "config" / "schema" / "cascadegw.schema.json"


@asynccontextmanager
async def live_gateway(tmp_path: Path) -> AsyncIterator[Embedded]:
    config = load_config(default_config_bytes(), {"CASCADEGW__POLICY__CONTROL_GROUP__PERCENT": "0"})
    config = msgspec.structs.replace(
        config,
        ingest=msgspec.structs.replace(
            config.ingest, bind="tcp://127.0.0.1:*", status_bind="tcp://127.0.0.1:*"
        ),
        http=msgspec.structs.replace(config.http, bind="127.0.0.1:0", public_url=""),
        store=msgspec.structs.replace(config.store, path=str(tmp_path / "journal.db"), create=True),
    )
    async with open_embedded(config) as embedded:
        yield embedded


def subscriptions_taken(embedded: Embedded) -> float:
    """How many status subscriptions the gateway has taken (applied to its XPUB socket)."""
    registry = embedded.gateway.registry
    taken = registry.get_sample_value("gateway_status_subscriptions_total", {"verdict": "accepted"})
    return taken or 0.0


async def subscribed(embedded: Embedded, count: int = 1) -> None:
    """Return once the gateway has taken ``count`` status subscriptions: they travel
    asynchronously, and an event published before a subscriber's is taken never reaches it."""
    with trio.fail_after(30):
        while subscriptions_taken(embedded) < count:  # noqa: ASYNC110 - a metric, no event
            await trio.sleep(0.01)
