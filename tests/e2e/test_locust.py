"""The locustfile drives a live gateway: both user classes, headless, from the bench virtualenv.

Locust must never be imported here (it gevent-patches the process and trio stops working), so
it runs as a subprocess of the separate virtualenv `make bench-env` builds (`make test` builds
it too).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio

from adapters.viber import ViberSettings
from bench.harness import LOCUST, locust_command, locust_environment
from gateway.config import load_config
from gateway.embedded import open_embedded
from tests.e2e.test_observability import campaign_config

pytestmark = pytest.mark.slow


async def run_locust(
    environ: dict[str, str], *, users: int, seconds: int, user_classes: list[str], cwd: Path
) -> subprocess.CompletedProcess[bytes]:
    """Locust headless from the bench virtualenv; its JSON stats on stdout."""
    return await trio.run_process(
        locust_command(
            users=users,
            run_time_seconds=seconds,
            stop_timeout_seconds=5,
            user_classes=user_classes,
        ),
        env=environ,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        cwd=cwd,
    )


async def test_the_locustfile_loads_a_live_gateway(tmp_path: Path) -> None:
    assert LOCUST.exists(), "the locust virtualenv is missing: `make bench-env` builds it"
    config = load_config(campaign_config(tmp_path, 0).encode(), {})
    async with open_embedded(config) as embedded:
        gateway = embedded.gateway
        viber = gateway.config.providers["viber1"]
        assert isinstance(viber, ViberSettings)
        viber_token = viber.auth_token
        assert viber_token is not None
        environ = {
            **locust_environment(gateway.ingest_endpoint, "acme", batch=10),
            "CASCADEGW_WEBHOOK_URL": f"{gateway.public_http_url}/webhooks/viber1",
            "CASCADEGW_VIBER_TOKEN": viber_token.reveal(),
        }
        completed = await run_locust(
            environ, users=4, seconds=4, user_classes=["CrmUser", "WebhookUser"], cwd=tmp_path
        )
        accepted = gateway.metrics.registry.get_sample_value(
            "gateway_admissions_total", {"outcome": "admitted", "reason": "none"}
        )
        webhooks = gateway.metrics.registry.get_sample_value(
            "gateway_webhook_requests_total", {"provider": "viber1", "verdict": "accepted"}
        )
    stats: dict[str, Any] = {entry["name"]: entry for entry in json.loads(completed.stdout)}
    sends, receipts = stats["send x10 (normal)"], stats["webhook viber"]
    assert sends["num_requests"] > 10, completed.stderr.decode()[-2000:]
    assert 0 == sends["num_failures"]
    assert receipts["num_requests"] > 10
    assert 0 == receipts["num_failures"]
    # the gateway saw what locust says it sent
    assert accepted == sends["num_requests"] * 10
    # plus the one callback Viber makes to check the webhook the gateway registers at start
    assert webhooks == receipts["num_requests"] + 1


async def test_scheduled_sends_are_deferred_not_refused(tmp_path: Path) -> None:
    """``CASCADEGW_SEND_AT`` (the bench's pending scenario): sends a day ahead are accepted and
    wait; the locustfile once sent `send_at` as a msgpack timestamp, which raised in locust."""
    config = load_config(campaign_config(tmp_path, 0).encode(), {})
    async with open_embedded(config) as embedded:
        gateway = embedded.gateway
        environ = {
            **locust_environment(gateway.ingest_endpoint, "acme", batch=10),
            "CASCADEGW_SEND_AT": "86400",
            "CASCADEGW_MAX_MESSAGES": "200",
        }
        completed = await run_locust(
            environ, users=2, seconds=10, user_classes=["CrmUser"], cwd=tmp_path
        )
        deferred = gateway.metrics.registry.get_sample_value(
            "gateway_admissions_total", {"outcome": "deferred", "reason": "send_at"}
        )
    sends = {entry["name"]: entry for entry in json.loads(completed.stdout)}["send x10 (normal)"]
    assert sends["num_requests"] >= 20, completed.stderr.decode()[-2000:]
    assert 0 == sends["num_failures"]
    assert deferred == sends["num_requests"] * 10
