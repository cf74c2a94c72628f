"""Multi-process mode: dispatch in worker processes and webhooks in webhook processes,
the same cascade as single-process mode, and one scrape of the router sees every series."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from bench.harness import Metrics, descendants
from gateway.client import Client, send_request
from tests.e2e.processes import GatewayProcess, free_port, wait_finished

pytestmark = pytest.mark.slow


def config_text(
    tmp_path: Path, http_port: int, webhook_port: int, ingest_port: int, status_port: int
) -> str:
    return f"""
[ingest]
bind = "tcp://127.0.0.1:{ingest_port}"
status_bind = "tcp://127.0.0.1:{status_port}"
[http]
bind = "127.0.0.1:{http_port}"
public_url = ""
webhook_processes = 2
webhook_bind = "127.0.0.1:{webhook_port}"
[store]
create = true
path = "{tmp_path / "journal.db"}"
synchronous = "normal"
[dispatch]
workers = 2
[simulator]
latency_seconds = 0.005
receipt_delay_seconds = 0.1
read_delay_seconds = 0.3
deliver_probability = 1.0
bounce_probability = 0.0
read_probability = 0.0
unsubscribe_probability = 0.0
[policy.consent]
unknown_advertising = "grant"
[providers.fcm1]
kind = "fcm"
simulated = true
[providers.email1]
kind = "sendgrid"
simulated = true
[providers.viber1]
kind = "viber"
simulated = true
[providers.sms1]
kind = "twilio"
simulated = true
[tenants.acme]
brand = "Acme"
providers = {{ push = ["fcm1"], email = ["email1"], viber = ["viber1"], sms = ["sms1"] }}
"""


# which channel reads the message: email (SendGrid webhook), Viber ("seen" callback), or none,
# so SMS delivers (Twilio status callback); every receipt goes through the webhook processes
READER = ("email", "viber", "none")


def message(index: int) -> dict[str, Any]:
    reader = READER[index % len(READER)]
    return send_request(
        f"m{index}",
        "acme",
        recipient={
            "id": f"r{index}",
            "push_tokens": [f"tok-ignore-{index}"],
            "email": "x+read@example.com" if reader == "email" else "x+ignore@example.com",
            "viber_id": f"vb-read-{index}" if reader == "viber" else f"vb-ignore-{index}",
            "phone": f"+7916{index:06d}9",
        },
        category="promo",
        step_timeout_seconds={"push": 0.5, "email": 1.5, "viber": 1.5, "sms": 5},
        content={
            "push": {"title": "Sale", "body": "Sale"},
            "email": {"subject": "Sale", "text": "Sale {link}"},
            "viber": {"text": "Sale"},
            "sms": {"text": "Sale"},
            "link_url": "https://shop.example/",
        },
    )


def run_campaign(endpoint: str) -> dict[str, Any]:
    with Client(endpoint, timeout_seconds=30) as client:
        accepted = client.send_batch([message(i) for i in range(30)])
    assert {"accepted"} == {r["status"] for r in accepted}
    return wait_finished(endpoint, "acme", [f"m{i}" for i in range(30)], timeout_seconds=60)


async def test_workers_and_webhook_processes_run_the_same_cascade(tmp_path: Path) -> None:
    http_port, webhook_port, ingest_port, status_port = (free_port() for _ in range(4))
    config_path = tmp_path / "gateway.toml"
    config_path.write_text(config_text(tmp_path, http_port, webhook_port, ingest_port, status_port))
    gateway = GatewayProcess(config_path, {}, f"http://127.0.0.1:{http_port}")
    await gateway.start()
    try:
        outcomes = await trio.to_thread.run_sync(run_campaign, f"tcp://127.0.0.1:{ingest_port}")
        async with httpx.AsyncClient() as http:
            metrics = Metrics.parse((await http.get(f"http://127.0.0.1:{http_port}/metrics")).text)
            webhook_health = (
                await http.get(f"http://127.0.0.1:{webhook_port}/healthz")
            ).status_code
    finally:
        exit_code = await gateway.stop()
    assert 0 == exit_code
    assert 200 == webhook_health
    finals = {
        message_id: (state.get("outcome"), state["timeline"][-1].get("channel"))
        for message_id, state in outcomes.items()
    }
    expected = {
        f"m{i}": {
            "email": ("read", "email"),
            "viber": ("read", "viber"),
            "none": ("delivered", "sms"),
        }[READER[i % 3]]
        for i in range(30)
    }
    assert expected == finals
    # one scrape of the router sees what happened in the worker and webhook processes
    webhooks = "gateway_webhook_requests_total"
    assert (metrics.sample(webhooks, provider="email1", verdict="accepted") or 0) > 0
    assert (metrics.sample(webhooks, provider="viber1", verdict="accepted") or 0) > 0
    durations = metrics.sample(
        "gateway_provider_request_duration_seconds_count", channel="email", provider="email1"
    )
    assert (durations or 0) >= 30
    assert 30 == metrics.sample("gateway_sends_total", channel="push", provider="fcm1", result="ok")


def webhook_pids(gateway: GatewayProcess) -> list[int]:
    """The gateway's webhook processes (``python -m gateway.http.webhook_app``)."""
    assert gateway.process is not None
    found = []
    for pid in descendants(gateway.process.pid):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # exited meanwhile
        if b"gateway.http.webhook_app" in command:
            found.append(pid)
    return found


def answers(url: str) -> int | None:
    """The status of a GET of ``url`` now; None while nothing listens."""
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return None


async def poll_until(condition: Callable[[], bool], what: str, timeout_seconds: float = 30) -> None:
    """Until ``condition()`` (a blocking probe, run in a thread) holds. Polls every 20 ms: the
    window it must catch (a restart's backoff) is half a second."""
    with trio.fail_after(timeout_seconds):
        while not await trio.to_thread.run_sync(condition):  # noqa: ASYNC110 - another process
            await trio.sleep(0.02)
    assert condition(), what


async def test_a_killed_webhook_process_is_restarted_and_readiness_follows(
    tmp_path: Path,
) -> None:
    """kill -9 the only webhook process: /readyz says not ready until a new one serves the
    public port again; the restart is counted."""
    http_port, webhook_port, ingest_port, status_port = (free_port() for _ in range(4))
    config_path = tmp_path / "gateway.toml"
    config_path.write_text(
        config_text(tmp_path, http_port, webhook_port, ingest_port, status_port)
        .replace("webhook_processes = 2", "webhook_processes = 1")
        .replace("workers = 2", "workers = 0")
    )
    admin = f"http://127.0.0.1:{http_port}"
    public = f"http://127.0.0.1:{webhook_port}/healthz"
    gateway = GatewayProcess(config_path, {}, admin)
    await gateway.start()
    try:
        assert 200 == answers(public)
        (first,) = webhook_pids(gateway)
        os.kill(first, signal.SIGKILL)
        await poll_until(lambda: answers(f"{admin}/readyz") == 503, "not ready once it died")
        await poll_until(lambda: answers(public) == 200, "the public port answers again")
        await poll_until(lambda: answers(f"{admin}/readyz") == 200, "ready again")
        (second,) = webhook_pids(gateway)
        async with httpx.AsyncClient() as http:
            metrics = Metrics.parse((await http.get(f"{admin}/metrics")).text)
    finally:
        exit_code = await gateway.stop()
    assert 0 == exit_code
    assert first != second
    assert 1 == metrics.sample("gateway_process_restarts_total", process="webhook")
    assert 0 == metrics.sample("gateway_process_restarts_total", process="dispatch_worker")
    exits = [
        json.loads(line)
        for line in gateway.log_path.read_text().splitlines()
        if "child_process_exited" in line
    ]
    assert [("webhook", first, -9)] == [(e["process"], e["pid"], e["returncode"]) for e in exits]
