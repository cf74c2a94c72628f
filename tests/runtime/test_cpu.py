"""``gateway_cpu_seconds_total{part}``: the router's CPU time by what it did (opt-in).

Real time and a real gateway: the parts are read from the registry as Prometheus would, after
work of one kind, so a task counted under the wrong part shows as a part that did not move.
"""

from __future__ import annotations

from pathlib import Path

import trio
from prometheus_client import CollectorRegistry

from gateway.app import open_gateway
from gateway.client import open_client
from gateway.runtime.cpu import CpuPart, part_of
from tests.support import NOON_UTC, in_test_providers, make_config, promo

BREAKDOWN = "[diagnostics]\ncpu_breakdown = true\n"


def parts(registry: CollectorRegistry) -> dict[str, float]:
    return {
        part.value: registry.get_sample_value("gateway_cpu_seconds_total", {"part": part.value})
        or 0.0
        for part in CpuPart
    }


def test_tasks_count_toward_the_part_of_their_module() -> None:
    assert CpuPart.ADMISSION == part_of("gateway.app._serve_ingest")
    assert CpuPart.ADMISSION == part_of("gateway.runtime.ingest.Ingest._answer")
    assert CpuPart.DISPATCH == part_of("gateway.runtime.dispatch.Dispatcher._send")
    assert CpuPart.WEBHOOK_SERVER == part_of("gateway.httpserver.Server._serve_connection")
    assert CpuPart.JOURNAL == part_of("gateway.runtime.committer.Committer.serve")
    assert CpuPart.ADMIN == part_of("hypercorn.trio.run.worker_serve")
    assert CpuPart.OTHER == part_of("trio._core._run.init")


async def test_each_part_moves_with_its_own_work(tmp_path: Path) -> None:
    config = make_config(tmp_path, extra=BREAKDOWN, cascade=("email",))
    adapters = in_test_providers(config)
    async with (
        open_gateway(config, adapters=adapters, wall_at_start=NOON_UTC) as gateway,
        open_client(gateway.ingest_endpoint, timeout_seconds=30) as client,
    ):
        before = parts(gateway.registry)
        replies = await client.send_batch([promo(f"m{n}") for n in range(300)])
        with trio.fail_after(30):
            while True:
                if len(adapters["email1"].sent) == 300:
                    break
                await trio.sleep(0.01)
        after = parts(gateway.registry)
    assert {"accepted"} == {reply["status"] for reply in replies}
    grew = {part for part in after if after[part] > before[part]}
    assert {"admission", "dispatch", "journal"} <= grew
    assert "webhook_server" not in grew  # no webhook or link was requested


async def test_off_by_default(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    async with open_gateway(
        config, adapters=in_test_providers(config), wall_at_start=NOON_UTC
    ) as gateway:
        assert dict.fromkeys(parts(gateway.registry), 0.0) == parts(gateway.registry)
        assert (
            gateway.registry.get_sample_value("gateway_cpu_seconds_total", {"part": "other"})
            is None
        )
