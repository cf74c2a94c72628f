"""A Node.js CRM integrates from the schema alone (tests/contract/node/contract.mjs).

It validates, with ajv in strict mode, every request it builds from the schema's examples and
every reply and status event the live gateway sends back. ``make test`` installs its packages
(npm ci); under ``CI=true`` a missing node or npm is a failure, elsewhere a skip.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import trio

from tests.contract.live import SCHEMA, live_gateway
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


async def test_a_node_crm_validates_everything_against_the_schema(tmp_path: Path) -> None:
    node = node_or_skip()
    async with live_gateway(tmp_path) as embedded:
        gateway = embedded.gateway
        with trio.fail_after(120):
            done = await trio.run_process(
                [
                    node,
                    str(NODE_DIR / "contract.mjs"),
                    str(SCHEMA),
                    gateway.ingest_endpoint,
                    gateway.status_endpoint,
                    "demo",
                ],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    assert 0 == done.returncode, done.stderr.decode() + done.stdout.decode()
    summary = json.loads(done.stdout.decode().strip().splitlines()[-1])
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
