"""A Node.js CRM integrates from the schema alone (tests/contract/node/contract.mjs).

It validates, with ajv in strict mode, every request it builds from the schema's examples and
every reply and status event the live gateway sends back. ``make test`` installs its packages
(npm ci); under ``CI=true`` a missing node or npm is a failure, elsewhere a skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from functools import partial
from pathlib import Path

import pytest
import trio

from gateway.embedded import Embedded
from tests.contract.live import SCHEMA, live_gateway, subscriptions_taken
from tests.contract.test_schema_agreement import validator

EVENTS = validator("StatusEventMessage")

NODE_DIR = Path(__file__).parent / "node"


def node_or_skip() -> str:
    node = shutil.which("node")
    installed = (NODE_DIR / "node_modules" / "zeromq").is_dir()
    if node is not None and installed:
        return node
    why = "node is not installed" if node is None else "run `make test` (npm ci) first"
    if os.environ.get("CI") == "true":
        pytest.fail(f"the Node contract test cannot run: {why}")
    pytest.skip(why)


async def run_contract(node: str, embedded: Embedded) -> tuple[int, str, str]:
    """Run contract.mjs against the gateway; tell it (a line on its stdin) once the gateway
    has taken its subscription. Its exit status, stdout and stderr."""
    gateway = embedded.gateway
    command = [
        node,
        str(NODE_DIR / "contract.mjs"),
        str(SCHEMA),
        gateway.ingest_endpoint,
        gateway.status_endpoint,
        "demo",
    ]
    out, err = bytearray(), bytearray()

    async def collect(stream: trio.abc.ReceiveStream | None, into: bytearray) -> None:
        assert stream is not None
        async for chunk in stream:
            into += chunk

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            process: trio.Process = await nursery.start(
                partial(
                    trio.run_process,
                    command,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    check=False,
                )
            )
            nursery.start_soon(collect, process.stdout, out)
            nursery.start_soon(collect, process.stderr, err)
            assert process.stdin is not None
            # until the gateway has taken the subscription, or node has failed before that
            while subscriptions_taken(embedded) < 1 and process.poll() is None:  # noqa: ASYNC110
                await trio.sleep(0.01)
            with contextlib.suppress(trio.BrokenResourceError):
                await process.stdin.send_all(b"subscribed\n")
            await process.stdin.aclose()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_a_node_crm_validates_everything_against_the_schema(tmp_path: Path) -> None:
    node = node_or_skip()
    async with live_gateway(tmp_path) as embedded:
        returncode, stdout, stderr = await run_contract(node, embedded)
    assert 0 == returncode, stderr + stdout
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["ok"] is True
    assert summary["requests"] >= 5
    assert summary["replies"] >= 10
    assert summary["events"] >= 2
    assert summary["refusedBySchemaAndGateway"] >= 6


def documented_example() -> str:
    text = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    after = text.split("<!-- example:node -->", 1)[1]
    return after.split("```js\n", 1)[1].split("```", 1)[0]


def test_the_documented_example_is_the_one_tested() -> None:
    assert (NODE_DIR / "example.mjs").read_text() == documented_example()


async def test_the_documented_example_works(tmp_path: Path) -> None:
    node = node_or_skip()
    async with live_gateway(tmp_path) as embedded:
        gateway = embedded.gateway
        with trio.fail_after(60):
            done = await trio.run_process(
                [
                    node,
                    str(NODE_DIR / "example.mjs"),
                    gateway.ingest_endpoint,
                    gateway.status_endpoint,
                    "demo",
                ],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    assert 0 == done.returncode, done.stderr.decode()
    lines = [json.loads(line) for line in done.stdout.decode().splitlines()]
    assert "accepted" == lines[0]["result"]["status"]
    kinds = [line["event"]["kind"] for line in lines[1:]]
    assert "sent" in kinds
    assert validator("ReplyFrame").is_valid(lines[0]["result"])
    assert all(EVENTS.is_valid([line["event"]]) for line in lines[1:])
