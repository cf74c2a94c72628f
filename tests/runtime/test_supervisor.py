"""Supervised child processes (dispatch workers, webhook processes): one that exits is logged
with its exit code, counted and started again, later each time while it keeps dying young."""

from __future__ import annotations

import sys

import pytest
import structlog
import trio
from prometheus_client import CollectorRegistry

from gateway.runtime.workers import (
    ProcessKind,
    ProcessRestarts,
    ReportPipe,
    Supervisor,
    restart_delay,
)
from tests.support import wait_for


def test_the_restart_delay_doubles_while_a_process_dies_young() -> None:
    delays = [restart_delay(None, 0.1)]
    for _ in range(8):
        delays.append(restart_delay(delays[-1], 0.1))
    assert [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0] == delays
    # one that ran a while starts from the beginning again
    assert 0.5 == restart_delay(30.0, 60.0)


@pytest.mark.slow
async def test_a_process_that_exits_at_once_is_restarted_with_a_growing_delay() -> None:
    restarts = ProcessRestarts()
    registry = CollectorRegistry()
    registry.register(restarts)
    supervisor = Supervisor(
        ProcessKind.WEBHOOK,
        [sys.executable, "-c", "raise SystemExit(3)"],
        {},
        count=1,
        restarts=restarts,
    )
    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.run)
            await wait_for(lambda: supervisor.children[0].exits >= 3, timeout_seconds=30)
            nursery.cancel_scope.cancel()
    exits = [entry for entry in logs if entry["event"] == "child_process_exited"]
    assert {3} == {entry["returncode"] for entry in exits}
    assert {"webhook"} == {entry["process"] for entry in exits}
    assert [0.5, 1.0, 2.0] == [entry["restart_in_seconds"] for entry in exits[:3]]
    assert 0 == supervisor.serving()
    assert registry.get_sample_value(
        "gateway_process_restarts_total", {"process": "webhook"}
    ) == float(restarts.counts[ProcessKind.WEBHOOK])
    assert restarts.counts[ProcessKind.WEBHOOK] >= 2
    assert 0 == registry.get_sample_value(
        "gateway_process_restarts_total", {"process": "dispatch_worker"}
    )


@pytest.mark.slow
async def test_a_child_reports_serving_and_failures_on_its_descriptor() -> None:
    script = (
        "import os, sys, time\n"
        "fd = int(os.environ['REPORT_FD'])\n"
        "os.write(fd, b'cannot bind: in use\\n')\n"
        "os.write(fd, b'up\\n')\n"
        "time.sleep(60)\n"
    )
    supervisor = Supervisor(
        ProcessKind.WEBHOOK,
        [sys.executable, "-c", script],
        {},
        count=2,
        restarts=ProcessRestarts(),
        report=ReportPipe("REPORT_FD", "up"),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        await wait_for(lambda: supervisor.serving() == 2, timeout_seconds=30)
        assert [None, None] == [child.failure for child in supervisor.children]
        nursery.cancel_scope.cancel()
    assert 0 == supervisor.serving()
