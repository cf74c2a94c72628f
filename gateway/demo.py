"""``cascadegw demo``: the embedded gateway, the simulators, a small campaign, a live funnel.

Everything real: the gateway on its default config (SQLite journal, simulated providers
speaking the real APIs over HTTP, signed receipts), a CRM pushing through the Python client over
ZeroMQ, and the funnel built from the status events published on the PUB socket.

Step timeouts are shortened per message (the ``step_timeout_seconds`` field of ``send``) so the
cascade plays out in seconds; everything else is the default configuration, including quiet
hours (recipients where it is night are deferred to their morning), caps and the control group.

The promo takes part in the default config's experiment ``cascade_order`` (push -> email -> SMS
against push -> SMS). The demo plays the CRM too: customers who read the message buy with
probability 0.4, the others (and the control group) with 0.03, and the CRM reports purchases
with the ``event`` op; at the end the experiment report shows each variant's conversion, cost
and the difference with its confidence interval, and the campaign report the control group's
lift. A couple of hundred messages make wide intervals: that is the honest answer.
"""

from __future__ import annotations

import random
import sys
import tempfile
from collections import Counter
from datetime import UTC, datetime, time
from pathlib import Path
from typing import Any, TextIO
from zoneinfo import ZoneInfo

import msgspec
import trio

from gateway import reports
from gateway.app import Gateway
from gateway.client import (
    AsyncClient,
    consent_request,
    event_request,
    open_client,
    open_subscription,
    send_request,
)
from gateway.config import GatewayConfig
from gateway.core.model import Channel
from gateway.embedded import open_embedded

_ZONES = (
    "Europe/Kaliningrad",
    "Europe/Moscow",
    "Asia/Yekaterinburg",
    "Asia/Novosibirsk",
    "Asia/Vladivostok",
    "Europe/London",
    "America/New_York",
    "Asia/Tokyo",
    "Asia/Dubai",
    "America/Los_Angeles",
    "Australia/Sydney",
)
_DEMO_TIMEOUTS = {"push": 4.0, "email": 6.0, "viber": 5.0, "sms": 8.0}
_EXPERIMENT = "cascade_order"
_BUY_AFTER_READ = 0.4
_BUY_ANYWAY = 0.03
_CHANNELS = [channel.value for channel in Channel]


def _daytime(zone: str, now: float) -> bool:
    local = datetime.fromtimestamp(now, ZoneInfo(zone)).time()
    return time(9) <= local < time(21)


def campaign(
    size: int, *, now: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Consents and send requests for a promo to ``size`` recipients, plus two OTPs."""
    rng = random.Random(seed)
    run = datetime.fromtimestamp(now, UTC).strftime("%H%M%S")
    day = [z for z in _ZONES if _daytime(z, now)] or list(_ZONES)
    night = [z for z in _ZONES if not _daytime(z, now)]
    consents: list[dict[str, Any]] = []
    sends: list[dict[str, Any]] = []
    for index in range(size):
        recipient_id = f"customer-{index:04d}"
        zone = rng.choice(night) if night and index % 10 == 9 else rng.choice(day)
        recipient: dict[str, Any] = {
            "id": recipient_id,
            "tz": zone,
            "email": f"{recipient_id}@example.com",
            "phone": f"+7916{index:06d}9",
        }
        if rng.random() < 0.7:
            recipient["push_tokens"] = [f"fcm-token-{index}"]
        if rng.random() < 0.6:
            recipient["viber_id"] = f"viber-{index}"
        consents.extend(
            consent_request(
                "demo",
                recipient_id,
                kind="advertising",
                action="grant",
                channel=channel,
                source="demo-signup",
            )
            for channel in _CHANNELS
            if rng.random() < (0.6 if channel == "viber" else 0.9)
        )
        sends.append(
            send_request(
                f"sale-{run}-{index:04d}",
                "demo",
                recipient=recipient,
                category="promo",
                campaign="winter-sale",
                experiment=_EXPERIMENT,
                step_timeout_seconds=_DEMO_TIMEOUTS,
                content={
                    "push": {"title": "Winter sale", "body": "Up to 50% off today {link}"},
                    "email": {
                        "subject": "Winter sale at Demo Shop",
                        "html": "<h1>Winter sale</h1><p><a href='{link}'>Shop now</a></p>",
                        "text": "Winter sale: {link}",
                    },
                    "viber": {"text": "Winter sale at Demo Shop: {link}"},
                    "sms": {"text": "Demo Shop: winter sale -50% {link}"},
                    "link_url": "https://demo-shop.example/winter",
                },
            )
        )
    # one-time codes are critical service messages: they go out even where it is night
    sends.extend(
        send_request(
            f"otp-{run}-{index}",
            "demo",
            recipient={
                "id": f"customer-{index:04d}",
                "tz": night[0] if night else day[0],
                "phone": f"+7916{index:06d}9",
            },
            category="service",
            priority="critical",
            channels=["sms"],
            step_timeout_seconds={"sms": _DEMO_TIMEOUTS["sms"]},
            content={"sms": {"text": f"Your code is {rng.randint(1000, 9999)}"}},
        )
        for index in range(2)
    )
    return consents, sends


class Funnel:
    """Counts from the status events, per channel."""

    def __init__(self, prices: dict[str, float], sms_price: float) -> None:
        self.prices = prices
        self.sms_price = sms_price
        self.kinds: dict[str, Counter[str]] = {channel: Counter() for channel in _CHANNELS}
        self.outcomes: Counter[str] = Counter()
        self.admissions: Counter[str] = Counter()
        self.accepted: set[str] = set()
        self.read: set[str] = set()
        self.cost = 0.0

    def event(self, event: dict[str, Any]) -> None:
        kind, channel = event["kind"], event.get("channel")
        if kind == "accepted":
            self.accepted.add(event["id"])
        if channel is not None:
            self.kinds[channel][kind] += 1
            if kind == "sent":
                self.cost += self.prices.get(event.get("provider", ""), 0.0)
        if event.get("final") and kind != "holdout":  # held-out messages were never sent
            self.outcomes[kind] += 1
            if kind in ("read", "clicked"):
                self.read.add(event["id"])

    @property
    def finished(self) -> int:
        return sum(self.outcomes.values())

    def progress(self, out: TextIO, *, elapsed: float) -> None:
        """One compact line (for a log or a pipe, where redrawing the table makes noise)."""
        sent = sum(self.kinds[channel]["sent"] for channel in _CHANNELS)
        out.write(
            f"demo {elapsed:5.1f} s: {len(self.accepted)} accepted, {sent} sent, "
            f"{self.finished} finished, cost {self.cost:.2f}\n"
        )
        out.flush()

    def render(self, out: TextIO, *, elapsed: float, clear: bool) -> None:
        lines = []
        if clear:
            lines.append("\x1b[2J\x1b[H")
        lines.append(f"cascadegw demo: winter-sale campaign, {elapsed:5.1f} s")
        lines.append(
            "admission: " + ", ".join(f"{k} {v}" for k, v in sorted(self.admissions.items()))
        )
        lines.append("")
        lines.append(
            f"{'channel':8} {'sent':>6} {'delivered':>10} {'read':>6} {'clicked':>8} {'moved on':>9} {'failed':>7} {'skipped':>8}"
        )
        for channel in _CHANNELS:
            k = self.kinds[channel]
            lines.append(
                f"{channel:8} {k['sent']:>6} {_delivered(channel, k['delivered']):>10} "
                f"{k['read']:>6} {k['clicked']:>8} "
                f"{k['step_timeout']:>9} {k['failed']:>7} {k['skipped']:>8}"
            )
        lines.append("")
        lines.append(
            f"finished {self.finished} of {len(self.accepted)} accepted: "
            + ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items()))
        )
        baseline = len(self.accepted) * self.sms_price
        saved = baseline - self.cost
        lines.append(
            f"cost {self.cost:8.2f}   SMS-to-everyone {baseline:8.2f}   saved {saved:8.2f}"
            + (f" ({saved / baseline:.0%})" if baseline else "")
        )
        out.write("\n".join(lines) + "\n")
        out.flush()


async def run_demo(
    config: GatewayConfig, *, messages: int, max_seconds: float, out: TextIO = sys.stdout
) -> Funnel:
    with tempfile.TemporaryDirectory(prefix="cascadegw-demo-") as scratch:
        # a fresh journal per run: the demo's recipients would otherwise hit their weekly caps
        store = msgspec.structs.replace(
            config.store, path=str(Path(scratch) / "demo.db"), create=True
        )
        # ephemeral ports: the demo runs beside a `cascadegw run` on the default ones
        ingest = msgspec.structs.replace(
            config.ingest, bind="tcp://127.0.0.1:*", status_bind="tcp://127.0.0.1:*"
        )
        http = msgspec.structs.replace(
            config.http, bind="127.0.0.1:0", public_bind="127.0.0.1:0", public_url=""
        )
        config = msgspec.structs.replace(config, store=store, ingest=ingest, http=http)
        funnel = Funnel(config.provider_prices(), config.sms_price("demo"))
        async with open_embedded(config) as embedded:
            gateway = embedded.gateway
            out.write(
                f"gateway up: ZeroMQ {gateway.ingest_endpoint}, status PUB {gateway.status_endpoint}, "
                f"HTTP admin {gateway.http_url} (try {gateway.http_url}/metrics), "
                f"HTTP public (webhooks, links) {gateway.public_http_url}\n"
            )
            async with (
                open_subscription(gateway.status_endpoint, "demo") as events,
                open_client(gateway.ingest_endpoint) as client,
            ):
                await trio.sleep(0.3)  # let the subscription connect (ZeroMQ slow joiner)
                consents, sends = campaign(messages, now=gateway.clock.now(), seed=2026)
                await _push(client, consents, sends, funnel)
                started = trio.current_time()
                live = out.isatty()  # a terminal redraws the table; anything else gets lines
                with trio.move_on_after(max_seconds):
                    # deferred messages wait for their recipients' morning; the rest play out now
                    while funnel.finished < funnel.admissions["admitted"]:
                        with trio.move_on_after(0.5 if live else 1.0):
                            while True:
                                funnel.event(await events.receive())
                        elapsed = trio.current_time() - started
                        if live:
                            funnel.render(out, elapsed=elapsed, clear=True)
                        else:
                            funnel.progress(out, elapsed=elapsed)
                funnel.render(out, elapsed=trio.current_time() - started, clear=False)
                await _purchases(client, sends, funnel, seed=2026)
            await _experiment_result(embedded.gateway, config, out)
            out.write(
                "\nDeferred messages wait for 09:00 in their recipients' time zones (quiet hours); "
                "`cascadegw run` keeps a gateway running.\n"
            )
        return funnel


async def _push(
    client: AsyncClient, consents: list[dict[str, Any]], sends: list[dict[str, Any]], funnel: Funnel
) -> None:
    for start in range(0, len(consents), 200):
        await client.send_batch(consents[start : start + 200])
    for start in range(0, len(sends), 50):
        for result in await client.send_batch(sends[start : start + 50]):
            if result["status"] == "accepted":
                funnel.admissions["deferred" if "deferred_until" in result else "admitted"] += 1
            else:
                funnel.admissions[result.get("reason", result["status"])] += 1


async def _purchases(
    client: AsyncClient, sends: list[dict[str, Any]], funnel: Funnel, *, seed: int
) -> None:
    """The CRM's part: report the purchases (more likely after a read), held-out customers'
    included, so the reports can compare conversion."""
    rng = random.Random(seed)
    events = [
        event_request(send["id"], "demo", kind="converted")
        for send in sends
        if send.get("experiment") == _EXPERIMENT
        and rng.random() < (_BUY_AFTER_READ if send["id"] in funnel.read else _BUY_ANYWAY)
    ]
    for start in range(0, len(events), 100):
        await client.send_batch(events[start : start + 100])


async def _experiment_result(gateway: Gateway, config: GatewayConfig, out: TextIO) -> None:
    """The per-variant result of the experiment, and the control group's lift."""
    tenant = config.tenants["demo"]
    experiment = tenant.experiments.get(_EXPERIMENT)
    if experiment is None:  # a config without the demo's experiment
        return
    prices = config.provider_prices()
    message_rows, event_rows = await gateway.journal.experiment_rows("demo", _EXPERIMENT)
    report = reports.build_experiment(
        tenant="demo",
        experiment=_EXPERIMENT,
        variants=[variant.name for variant in experiment.variants],
        currency=config.currency,
        message_rows=message_rows,
        event_rows=event_rows,
        prices=prices,
        sms_price=config.sms_price("demo"),
    )
    campaign_rows = await gateway.journal.campaign_rows("demo", "winter-sale")
    campaign = reports.build(
        tenant="demo",
        campaign="winter-sale",
        currency=config.currency,
        message_rows=campaign_rows[0],
        event_rows=campaign_rows[1],
        prices=prices,
        sms_price=config.sms_price("demo"),
    )
    out.write("\n" + render_experiment(report, campaign=campaign.total) + "\n")
    out.flush()


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _rough(*groups: tuple[int, int]) -> str:
    """A warning when the p-value's normal approximation is rough: under 5 conversions or
    non-conversions in an arm."""
    if any(min(converted, size - converted) < 5 for converted, size in groups):
        return " (rough: under 5 conversions or non-conversions in an arm)"
    return ""


def render_experiment(report: reports.ExperimentReport, *, campaign: reports.VariantReport) -> str:
    """The experiment report as a small table (conversion = converted / messages assigned)."""
    lines = [
        f"experiment {report.experiment}: conversion with 95% Wilson interval; difference to "
        f"{report.baseline} with its 95% interval (Newcombe) and p (two-proportion z-test)",
        f"{'variant':16} {'messages':>8} {'sent p/e/s':>11} {'converted':>9} {'rate':>6} "
        f"{'95% interval':>15} {'cost':>8} {'per conv.':>9}  difference",
    ]
    for name, arm in report.variants.items():
        sent = "/".join(
            str(arm.channels[c].sent if c in arm.channels else 0) for c in ("push", "email", "sms")
        )
        interval = arm.conversion_interval
        shown = "-" if interval is None else f"{_percent(interval[0])}-{_percent(interval[1])}"
        per = "-" if arm.cost_per_conversion is None else f"{arm.cost_per_conversion:.2f}"
        difference = "(baseline)"
        if arm.difference is not None:
            low, high = arm.difference.interval
            baseline = report.variants[report.baseline]
            difference = (
                f"{arm.difference.estimate * 100:+.1f} pp [{low * 100:+.1f}, {high * 100:+.1f}] "
                f"p={arm.difference.p_value:.3f}"
                + _rough((arm.converted, arm.messages), (baseline.converted, baseline.messages))
            )
        lines.append(
            f"{name:16} {arm.messages:>8} {sent:>11} {arm.converted:>9} "
            f"{_percent(arm.conversion_rate):>6} {shown:>15} {arm.cost:>8.2f} {per:>9}  {difference}"
        )
    control = campaign.lift
    if control is not None:
        low, high = control.interval
        treated, held = campaign.treated, campaign.control
        lines.append(
            f"treated ({treated.size}) against the control group ({held.size}): "
            f"{control.estimate * 100:+.1f} pp [{low * 100:+.1f}, {high * 100:+.1f}] "
            f"p={control.p_value:.3f}"
            + _rough((treated.converted, treated.size), (held.converted, held.size))
        )
    lines.append(
        "A difference whose interval spans 0 is not shown to be real; decide the sample size "
        "before looking, and look once (docs/experiments.md)."
    )
    return "\n".join(lines)


def _delivered(channel: str, count: int) -> str:
    """A delivery count, or "-" where providers never report one (push): unknown, not 0."""
    return str(count) if Channel(channel).reports_delivery else "-"
