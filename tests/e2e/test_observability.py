"""Observability checked against a real Prometheus: the series a campaign implies exist with
the right values, the rules and every dashboard expression evaluate, promtool is satisfied,
and no log line carries personal data."""

from __future__ import annotations

import json
import subprocess
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from gateway.client import Client, send_request
from gateway.config import load_config
from gateway.embedded import open_embedded
from tests.e2e.processes import GatewayProcess, free_port, wait_finished
from tests.e2e.prometheus import PROMTOOL, ensure_prometheus, running_prometheus

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "config" / "prometheus" / "cascadegw.rules.yml"
DASHBOARD = ROOT / "config" / "grafana" / "cascadegw.dashboard.json"
WITH_PUSH = 24
WITHOUT_PUSH = 8


def campaign_config(tmp_path: Path, http_port: int) -> str:
    return f"""
[ingest]
bind = "tcp://127.0.0.1:*"
status_bind = "tcp://127.0.0.1:*"
[http]
bind = "127.0.0.1:{http_port}"
public_bind = "127.0.0.1:0"
public_url = ""
[store]
create = true
path = "{tmp_path / "journal.db"}"
synchronous = "normal"
[simulator]
latency_seconds = 0.002
receipt_delay_seconds = 0.05
read_delay_seconds = 0.2
deliver_probability = 1.0
bounce_probability = 0.0
unsubscribe_probability = 0.0
[policy.consent]
unknown_advertising = "grant"
[providers.fcm1]
kind = "fcm"
simulated = true
[providers.email1]
kind = "sendgrid"
simulated = true
price = 0.05
[providers.viber1]
kind = "viber"
simulated = true
price = 0.9
[providers.sms1]
kind = "twilio"
simulated = true
price = 3.5
[tenants.acme]
brand = "Acme"
providers = {{ push = ["fcm1"], email = ["email1"], viber = ["viber1"], sms = ["sms1"] }}
"""


def message(index: int) -> dict[str, Any]:
    recipient: dict[str, Any] = {
        "id": f"r{index}",
        "email": f"customer{index}+ignore@example.com",
        "phone": f"+7916{index:06d}9",
    }
    if index < WITH_PUSH:
        recipient["push_tokens"] = [f"tok-read-{index}" if index % 2 else f"tok-ignore-{index}"]
    return send_request(
        f"m{index}",
        "acme",
        recipient=recipient,
        category="promo",
        step_timeout_seconds={"push": 0.5, "email": 0.5, "sms": 2.0},
        content={
            "push": {"title": "Sale", "body": "Sale"},
            "email": {"subject": "Sale", "text": "Sale"},
            "sms": {"text": "Sale"},
        },
    )


PUSH_ONLY = 6


def push_only(index: int) -> dict[str, Any]:
    """A push-only campaign: FCM never confirms delivery, so nothing may call it undelivered."""
    return send_request(
        f"p{index}",
        "acme",
        recipient={"id": f"p{index}", "push_tokens": [f"tok-ignore-p{index}"]},
        category="promo",
        campaign="push-only",
        step_timeout_seconds={"push": 0.5},
        content={"push": {"title": "Sale", "body": "Sale"}},
    )


def run_campaign(endpoint: str) -> list[Any]:
    with Client(endpoint, timeout_seconds=30) as client:
        requests = [message(i) for i in range(WITH_PUSH + WITHOUT_PUSH)]
        requests += [push_only(i) for i in range(PUSH_ONLY)]
        return client.send_batch(requests)


async def query(client: httpx.AsyncClient, prometheus: str, expr: str) -> dict[str, Any]:
    response = await client.get(f"{prometheus}/api/v1/query", params={"query": expr})
    body: dict[str, Any] = response.json()
    return body


async def scalar(client: httpx.AsyncClient, prometheus: str, expr: str) -> float | None:
    result = (await query(client, prometheus, expr))["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def dashboard_expressions() -> list[str]:
    """Every PromQL expression of the dashboard's panels."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel.get("targets", [])]


@pytest.mark.slow
async def test_prometheus_sees_what_the_campaign_did(tmp_path: Path) -> None:
    http_port = free_port()
    config = load_config(campaign_config(tmp_path, http_port).encode(), {})
    async with open_embedded(config) as embedded:
        gateway = embedded.gateway
        replies = await trio.to_thread.run_sync(run_campaign, gateway.ingest_endpoint)
        async with (
            running_prometheus(
                tmp_path, target=f"127.0.0.1:{http_port}", rules=RULES
            ) as prometheus,
            httpx.AsyncClient() as client,
        ):
            accepted = sum(1 for r in replies if r["status"] == "accepted")
            # wait for the cascades to finish and Prometheus to scrape the final counts
            with trio.fail_after(60):
                while True:
                    finished = await scalar(
                        client, prometheus, "sum(gateway_cascade_outcomes_total)"
                    )
                    if finished == accepted:
                        break
                    await trio.sleep(0.5)
            push_sends = await scalar(
                client, prometheus, 'sum(gateway_sends_total{channel="push", result="ok"})'
            )
            admitted = await scalar(
                client, prometheus, 'sum(gateway_admissions_total{outcome="admitted"})'
            )
            push_reads = await scalar(
                client, prometheus, 'sum(gateway_receipts_total{channel="push", kind="read"})'
            )
            up = await scalar(client, prometheus, 'up{job="cascadegw"}')
            recorded = None
            with trio.move_on_after(60):  # the rule groups' first evaluations
                while recorded is None:
                    await trio.sleep(0.5)
                    recorded = await scalar(client, prometheus, "count(cascadegw:sends:rate5m)")
            rules = (await client.get(f"{prometheus}/api/v1/rules")).json()["data"]["groups"]
            # every rule as Prometheus loaded it, and every dashboard panel, evaluated
            expressions = [
                rule["query"] for group in rules for rule in group["rules"]
            ] + dashboard_expressions()
            failures = {}
            for expr in expressions:
                body = await query(client, prometheus, expr)
                if body.get("status") != "success":
                    failures[expr] = body.get("error")
            metrics_text = (await client.get(f"{gateway.http_url}/metrics")).text
            # push delivery is never reported: unknown in the rules, no alert, none in reports
            push_deliverability = await query(
                client, prometheus, 'cascadegw:deliverability:ratio1h{channel="push"}'
            )
            alert_condition = await query(
                client, prometheus, 'cascadegw:deliverability:ratio1h{channel="push"} < 0.80'
            )
            # the other channels have the series (its value is NaN here: Prometheus starts
            # scraping after the campaign, and increase() counts nothing it did not see grow)
            email_deliverability = await query(
                client, prometheus, 'cascadegw:deliverability:ratio1h{channel="email"}'
            )
            report = (
                await client.get(f"{gateway.http_url}/v1/reports/acme/campaigns/push-only")
            ).json()
    assert WITH_PUSH + WITHOUT_PUSH + PUSH_ONLY == accepted
    assert [] == push_deliverability["data"]["result"]
    assert [] == alert_condition["data"]["result"]
    assert 'gateway_receipts_total{channel="push",kind="delivered"}' not in metrics_text
    assert 1 == len(email_deliverability["data"]["result"])
    figures = report["total"]["channels"]["push"]
    assert (PUSH_ONLY, None) == (figures["sent"], figures["deliverability"])
    assert report["total"]["total"]["deliverability"] is None
    assert float(WITH_PUSH + PUSH_ONLY) == push_sends  # one push per message with a push address
    assert float(accepted) == admitted
    assert float(WITH_PUSH // 2) == push_reads  # the "read" tokens' app reported the open
    assert 1.0 == up
    health = {
        r.get("name"): (r.get("health"), r.get("lastError"))
        for g in rules
        for r in g["rules"]
        if r.get("type") == "recording"
    }
    assert recorded is not None, health
    assert recorded > 0
    assert {} == failures
    assert 21 + len(dashboard_expressions()) == len(expressions)
    assert len(dashboard_expressions()) >= 30
    assert {"cascadegw.rates", "cascadegw.alerts"} == {group["name"] for group in rules}
    lint = await trio.run_process(
        [PROMTOOL, "check", "metrics"],
        stdin=metrics_text.encode(),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert 0 == lint.returncode, lint.stdout.decode() + lint.stderr.decode()


@pytest.mark.slow
def test_promtool_accepts_the_rules() -> None:
    ensure_prometheus()
    checked = subprocess.run(
        [PROMTOOL, "check", "rules", str(RULES)], capture_output=True, check=False
    )
    assert 0 == checked.returncode, checked.stdout.decode() + checked.stderr.decode()
    assert b"SUCCESS: 21 rules found" in checked.stdout


@pytest.mark.slow
async def test_logs_carry_no_personal_data(tmp_path: Path) -> None:
    """Run a real gateway process at debug level through a whole campaign and scan its log."""
    http_port, ingest_port = free_port(), free_port()
    text = campaign_config(tmp_path, http_port).replace(
        'bind = "tcp://127.0.0.1:*"', f'bind = "tcp://127.0.0.1:{ingest_port}"', 1
    )
    config_path = tmp_path / "gateway.toml"
    config_path.write_text(text)
    gateway = GatewayProcess(config_path, {}, f"http://127.0.0.1:{http_port}")
    gateway.log_level = "debug"
    await gateway.start()
    try:
        secrets = []
        with Client(f"tcp://127.0.0.1:{ingest_port}") as client:
            requests = [message(i) for i in range(12)]
            for index, request in enumerate(requests):
                request["content"]["sms"]["text"] = f"Secret offer code PII{index:04d}X"
                secrets += [
                    request["recipient"]["email"],
                    request["recipient"]["phone"],
                    request["content"]["sms"]["text"],
                ]
                secrets += request["recipient"].get("push_tokens", [])
            await trio.to_thread.run_sync(client.send_batch, requests)
        states = await trio.to_thread.run_sync(
            partial(
                wait_finished,
                f"tcp://127.0.0.1:{ingest_port}",
                "acme",
                [request["id"] for request in requests],
                timeout_seconds=60,
            )
        )
    finally:
        await gateway.stop()
    log = gateway.log_path.read_text()
    assert {"finished"} == {state.get("state") for state in states.values()}
    assert "dispatch_finished" in log  # the log really covers the cascades
    leaked = [secret for secret in secrets if secret in log]
    assert [] == leaked


def test_every_alert_has_a_summary_and_a_runbook_in_the_operations_guide() -> None:
    rules = RULES.read_text()
    guide = (ROOT / "docs" / "operations.md").read_text()
    alerts = [
        line.split(":", 1)[1].strip()
        for line in rules.splitlines()
        if line.strip().startswith("- alert:")
    ]
    assert 8 == len(alerts)
    for alert in alerts:
        assert f"### {alert}\n" in guide, alert
        assert f'runbook: "docs/operations.md#{alert.lower()}"' in rules, alert
    assert rules.count("summary:") == len(alerts)
