"""The README's client example runs against the gateway's default configuration."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import msgspec
import trio

from gateway.config import default_config_bytes, load_config
from gateway.embedded import open_embedded
from tests.support import NOON_UTC

ROOT = Path(__file__).resolve().parents[2]


def readme_example() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Sending messages", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None, "README.md lost its client example"
    return match.group(1)


async def test_the_readme_example_works(tmp_path: Path) -> None:
    config = load_config(default_config_bytes(), {})
    ports = msgspec.structs.replace(
        config.ingest, bind="tcp://127.0.0.1:*", status_bind="tcp://127.0.0.1:*"
    )
    http = msgspec.structs.replace(config.http, bind="127.0.0.1:0", public_url="")
    store = msgspec.structs.replace(config.store, path=str(tmp_path / "journal.db"), create=True)
    config = msgspec.structs.replace(config, ingest=ports, http=http, store=store)
    # at noon UTC (15:00 in the example's Moscow): run in Moscow's evening quiet hours, the
    # promo would be deferred to the morning and the reply would say so
    async with open_embedded(config, wall_at_start=NOON_UTC) as embedded:
        gateway = embedded.gateway
        code = readme_example().replace("tcp://127.0.0.1:5555", gateway.ingest_endpoint)
        namespace: dict[str, Any] = {}
        await trio.to_thread.run_sync(exec, compile(code, "README.md", "exec"), namespace)
        held_out = config.policy_rules("demo").control_group.holds_out(
            "demo", "customer-1", now=gateway.clock.now()
        )
    result = namespace["result"]
    if held_out:  # the default config holds 5% out; the example's reply says which
        assert ("rejected", "holdout") == (result["status"], result["reason"])
    else:
        assert {
            "status": "accepted",
            "id": "order-42-promo",
            "channels": ["push", "email", "sms"],
        } == result
