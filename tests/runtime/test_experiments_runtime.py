"""Experiments at admission: assignment, what a variant changes, the timeline, the metrics."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from starlette.applications import Starlette

from gateway import reports
from gateway.app import check_experiments
from gateway.clock import Clock
from gateway.config import GatewayConfig
from gateway.core.errors import ConfigError
from gateway.demo import render_experiment
from gateway.http.admin import admin_routes
from gateway.store.memory import MemoryJournal, MemoryStore
from tests.runtime.harness import Harness
from tests.support import NOON_UTC, make_config, promo

EXPERIMENT = """
[tenants.acme.experiments.cascades]
salt = "t1"
[[tenants.acme.experiments.cascades.variants]]
name = "long"
channels = ["push", "email", "sms"]
[[tenants.acme.experiments.cascades.variants]]
name = "short"
channels = ["push", "sms"]
step_timeout_seconds = { push = 60 }
send_windows = [{ start = 00:00:00, end = 23:59:00 }]
"""


def config_with(tmp_path: Path, extra: str = "", experiment: str = EXPERIMENT) -> GatewayConfig:
    return make_config(tmp_path, extra=extra, tenant_extra=experiment)


@pytest.fixture
async def harness(tmp_path: Path, mock_clock: trio.testing.MockClock) -> Harness:
    return await Harness.start(config_with(tmp_path), MemoryStore(), Clock(NOON_UTC))


class TestAssignmentAtAdmission:
    """A send naming an experiment gets its recipient's variant, on the record and timeline."""

    async def test_the_variant_sets_the_plan_and_the_timeouts(self, harness: Harness) -> None:
        results = harness.requests(
            [promo(f"m{i}", recipient_id=f"r{i}", experiment="cascades") for i in range(40)]
        )
        await harness.commit()
        plans = {}
        for index, result in enumerate(results):
            assert "accepted" == result.status
            record = harness.state.records[f"acme:m{index}"]
            plans[record.variant] = (tuple(result.channels or ()), record.cascade.timeouts[0])
            assert record.envelope.variant == record.variant
        assert {
            "cascades/long": (("push", "email", "sms"), 300.0),
            "cascades/short": (("push", "sms"), 60.0),
        } == plans
        accepted = [e for e in harness.published if e.kind == "accepted"]
        assert {"variant cascades/long", "variant cascades/short"} == {e.detail for e in accepted}
        registry = harness.registry
        counted = [
            registry.get_sample_value(
                "gateway_experiment_assignments_total",
                {"tenant": "acme", "experiment": "cascades", "variant": name},
            )
            for name in ("long", "short")
        ]
        assert 40.0 == sum(c or 0.0 for c in counted)

    async def test_sticky_per_recipient(self, harness: Harness) -> None:
        harness.requests(
            [promo(f"m{i}", recipient_id="same", experiment="cascades") for i in range(2)]
        )
        first, second = (harness.state.records[f"acme:m{i}"].variant for i in range(2))
        assert first == second

    @pytest.mark.parametrize(
        ("fields", "detail"),
        [
            (
                {"experiment": "nope"},
                "tenant 'acme' has no experiment 'nope' - at `$.experiment`",
            ),
            (
                {"experiment": "cascades", "variant": "B"},
                "variant is assigned by the experiment; leave it out when naming one - at "
                "`$.variant`",
            ),
        ],
    )
    async def test_bad_requests_are_invalid(
        self, harness: Harness, fields: dict[str, str], detail: str
    ) -> None:
        (result,) = harness.requests([promo("m1", **fields)])
        assert ("rejected", "invalid", detail) == (result.status, result.reason, result.detail)

    async def test_the_control_group_stays_outside(
        self, tmp_path: Path, mock_clock: trio.testing.MockClock
    ) -> None:
        config = config_with(tmp_path, extra="[policy.control_group]\npercent = 100.0")
        harness = await Harness.start(config, MemoryStore(), Clock(NOON_UTC))
        (result,) = harness.requests([promo("m1", experiment="cascades")])
        assert "holdout" == result.reason
        await harness.commit()
        (row,) = harness.store._messages.values()
        assert None is row.variant
        samples = [
            s.value
            for metric in harness.registry.collect()
            if metric.name == "gateway_experiment_assignments"
            for s in metric.samples
            if s.name.endswith("_total")
        ]
        assert [0.0, 0.0] == samples

    async def test_a_crm_variant_label_is_never_a_metric_label(self, harness: Harness) -> None:
        harness.requests([promo("m1", variant="crm-label-42")])
        await harness.commit()
        labels = {
            value
            for metric in harness.registry.collect()
            for sample in metric.samples
            for value in sample.labels.values()
        }
        assert "crm-label-42" not in labels

    async def test_a_crm_label_in_an_experiments_name_space_is_invalid(
        self, harness: Harness
    ) -> None:
        """A label ``cascades/...`` would be counted in the experiment's report (its rows are
        found by that prefix) though the gateway never assigned it; other labels with a slash
        are the CRM's own."""
        spoofed, own = harness.requests(
            [promo("m1", variant="cascades/short"), promo("m2", variant="spring/A")]
        )
        assert ("rejected", "invalid") == (spoofed.status, spoofed.reason)
        assert spoofed.detail == (
            "variant labels starting 'cascades/' belong to the tenant's experiment 'cascades': "
            "name it in `experiment` and the gateway assigns the variant - at `$.variant`"
        )
        assert "accepted" == own.status

    async def test_service_messages_stay_out_of_experiments(self, harness: Harness) -> None:
        """The control group holds out marketing only: a service message in an experiment
        would bring held-out recipients into it."""
        (result,) = harness.requests([promo("m1", category="service", experiment="cascades")])
        assert ("rejected", "invalid") == (result.status, result.reason)
        assert "experiments are for marketing messages" in (result.detail or "")

    async def test_a_send_its_variant_cannot_make_is_refused_and_counted(
        self, tmp_path: Path, mock_clock: trio.testing.MockClock
    ) -> None:
        """An arm whose channels reach fewer recipients loses those sends at admission: the
        report counts accepted messages, so the refusals are counted by arm and reason, and
        the refusal names the variant."""
        sms_only = """
[tenants.acme.experiments.sms_only]
[[tenants.acme.experiments.sms_only.variants]]
name = "a"
channels = ["sms"]
[[tenants.acme.experiments.sms_only.variants]]
name = "b"
channels = ["sms"]
"""
        config = config_with(tmp_path, experiment=sms_only)
        harness = await Harness.start(config, MemoryStore(), Clock(NOON_UTC))
        (result,) = harness.requests(
            [promo("m1", experiment="sms_only", recipient={"phone": None})]
        )
        assert ("rejected", "no_channel") == (result.status, result.reason)
        variant = (result.detail or "").rpartition("(in variant sms_only/")[2].rstrip(")")
        assert variant in ("a", "b"), result.detail
        labels = {"tenant": "acme", "experiment": "sms_only", "variant": variant}
        assert 1.0 == harness.registry.get_sample_value(
            "gateway_experiment_refusals_total", {**labels, "reason": "no_channel"}
        )
        assert 0.0 == harness.registry.get_sample_value(
            "gateway_experiment_assignments_total", labels
        )

    async def test_a_held_out_recipient_refused_earlier_is_in_no_arm(
        self, tmp_path: Path, mock_clock: trio.testing.MockClock
    ) -> None:
        """decide checks addresses and personal-data consent before the control group: a
        held-out recipient refused for those is neither counted for an arm nor told one."""
        config = config_with(tmp_path, extra="[policy.control_group]\npercent = 100.0")
        harness = await Harness.start(config, MemoryStore(), Clock(NOON_UTC))
        no_address: dict[str, object] = {
            "push_tokens": [],
            "email": None,
            "viber_id": None,
            "phone": None,
        }
        (result,) = harness.requests([promo("m1", experiment="cascades", recipient=no_address)])
        assert ("rejected", "no_channel") == (result.status, result.reason)
        assert "variant" not in (result.detail or "")
        refusals = [
            sample
            for metric in harness.registry.collect()
            if metric.name == "gateway_experiment_refusals"
            for sample in metric.samples
            if sample.name.endswith("_total")
        ]
        assert [] == refusals


class TestChangedDefinitions:
    """A changed experiment under its old name is refused at start; a new name is fine."""

    @pytest.mark.parametrize(
        ("before", "after"),
        [
            ('name = "long"', 'name = "long"\nweight = 3'),
            ('salt = "t1"', 'salt = "t2"'),
            ("end = 23:59:00", "end = 23:58:00"),
            ("push = 60", "push = 61"),
            ('channels = ["push", "sms"]', 'channels = ["sms"]'),
        ],
        ids=["weight", "salt", "window", "timeout", "channels"],
    )
    async def test_refused_with_the_key_named(
        self, before: str, after: str, tmp_path: Path
    ) -> None:
        """Whatever part changed, the refusal names the key and what a definition covers,
        without claiming which part it was (the journal keeps only a fingerprint)."""
        store = MemoryStore()
        journal = MemoryJournal(store)
        await journal.open(create=True)
        await check_experiments(journal, config_with(tmp_path))
        await check_experiments(journal, config_with(tmp_path))  # unchanged: fine
        assert before in EXPERIMENT
        changed = EXPERIMENT.replace(before, after, 1)
        with pytest.raises(ConfigError) as refused:
            await check_experiments(journal, config_with(tmp_path, experiment=changed))
        assert re.fullmatch(
            r"tenants\.acme\.experiments\.cascades: its definition \(variants, weights, "
            r"channels or the tenant cascade they run on, unread timeouts, send windows, salt\) "
            r"differs from the one this journal "
            r"first ran it with \(fingerprint [0-9a-f]{16}, now [0-9a-f]{16}\); assignments "
            r"would no longer be comparable: restore the definition or give the changed "
            r"experiment a new name",
            str(refused.value),
        ), refused.value
        renamed = changed.replace("experiments.cascades", "experiments.cascades_2")
        await check_experiments(journal, config_with(tmp_path, experiment=renamed))

    async def test_a_variant_on_the_tenants_cascade_changes_with_it(self, tmp_path: Path) -> None:
        """A variant without channels of its own runs on the tenant's cascade: changing the
        cascade changes the arm, so it is refused like a changed weight."""
        on_cascade = EXPERIMENT.replace('channels = ["push", "email", "sms"]\n', "")
        journal = MemoryJournal(MemoryStore())
        await journal.open(create=True)
        await check_experiments(journal, config_with(tmp_path, experiment=on_cascade))
        reordered = make_config(
            tmp_path, tenant_extra=on_cascade, cascade=("email", "push", "viber", "sms")
        )
        with pytest.raises(ConfigError, match=r"^tenants\.acme\.experiments\.cascades: "):
            await check_experiments(journal, reordered)

    @pytest.mark.parametrize(
        "inherited",
        [
            "[channels.push]\nunread_timeout_seconds = 300\n"
            "[channels.email]\nunread_timeout_seconds = 900\n"
            "[channels.viber]\nunread_timeout_seconds = 1800\n"
            "[channels.sms]\nunread_timeout_seconds = 86400",
            '[[policy.send_windows]]\ncategories = ["promo"]\n'
            "windows = [{ start = 09:00:00, end = 11:00:00 }]",
        ],
        ids=["a configured unread timeout", "the tenant's send windows"],
    )
    async def test_what_a_variant_inherits_is_pinned(self, tmp_path: Path, inherited: str) -> None:
        """The long variant sets no email timeout and no windows: it runs on the configured
        ones, so changing them changes the arm."""
        journal = MemoryJournal(MemoryStore())
        await journal.open(create=True)
        await check_experiments(journal, config_with(tmp_path))
        with pytest.raises(ConfigError, match=r"^tenants\.acme\.experiments\.cascades: "):
            await check_experiments(journal, config_with(tmp_path, extra=inherited))

    def test_the_fingerprint_is_the_same_in_every_process(self, tmp_path: Path) -> None:
        """Pinned in one process, checked in the next: nothing in it may depend on the hash
        seed (a frozenset's order does)."""
        config = tmp_path / "gateway.toml"
        make_config(
            tmp_path,
            extra='[[policy.send_windows]]\ncategories = ["promo", "informational", "content"]\n'
            "windows = [{ start = 09:00:00, end = 11:00:00 }]",
            tenant_extra=EXPERIMENT.replace(
                "send_windows = [{ start = 00:00:00, end = 23:59:00 }]\n", ""
            ),
            write_to=config,
        )
        script = (
            "import sys; from gateway.config import load_config; "
            "from gateway.runtime.experiments import fingerprints; "
            "print(fingerprints(load_config(open(sys.argv[1], 'rb').read(), {})))"
        )
        printed = {
            subprocess.run(
                [sys.executable, "-c", script, str(config)],
                env={**os.environ, "PYTHONHASHSEED": str(seed)},
                capture_output=True,
                check=True,
                text=True,
            ).stdout
            for seed in range(6)
        }
        assert 1 == len(printed), printed


class TestVariantChannels:
    async def test_a_variant_channel_without_provider_is_refused(self, tmp_path: Path) -> None:
        bad = EXPERIMENT.replace('["push", "sms"]', '["push", "sms", "sms"]')
        with pytest.raises(
            ConfigError, match=r"variants\[1\]\.channels: a channel is listed twice"
        ):
            config_with(tmp_path, experiment=bad)


class FakeRows:
    """The admin API's port, answering only the report rows (nothing else is asked here)."""

    def __init__(self, rows: tuple[list[Any], list[Any]]) -> None:
        self.rows = rows

    async def experiment_rows(self, tenant: str, experiment: str) -> tuple[list[Any], list[Any]]:
        return self.rows


class TestExperimentReportApi:
    """GET /v1/reports/{tenant}/experiments/{experiment}."""

    async def report(self, tmp_path: Path, path: str, rows: Any = ([], [])) -> httpx.Response:
        app = Starlette(routes=admin_routes(config_with(tmp_path), FakeRows(rows)))  # type: ignore[arg-type]
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://admin"
        ) as http:
            return await http.get(path)

    async def test_an_unknown_experiment_is_404(self, tmp_path: Path) -> None:
        answer = await self.report(tmp_path, "/v1/reports/acme/experiments/nope")
        assert 404 == answer.status_code

    async def test_the_arms_side_by_side(self, tmp_path: Path) -> None:
        rows = (
            [("cascades/long", "read", 100), ("cascades/short", "delivered", 100)],
            [
                ("cascades/long", 0, "push", "sent", "push1", 100, 100),
                ("cascades/long", 0, None, "converted", None, 30, 30),
                ("cascades/short", 0, "sms", "sent", "sms1", 100, 100),
                ("cascades/short", 0, None, "converted", None, 45, 45),
            ],
        )
        answer = await self.report(tmp_path, "/v1/reports/acme/experiments/cascades", rows)
        report = answer.json()
        long, short = report["variants"]["long"], report["variants"]["short"]
        assert ("long", 100, 30, None) == (
            report["baseline"],
            long["messages"],
            long["converted"],
            long["difference"],
        )
        # the hand-derived figures of tests/core/test_stats.py: 45/100 against 30/100
        assert {"estimate": 0.15, "interval": [0.01585, 0.27683], "p_value": 0.02846} == {
            "estimate": short["difference"]["estimate"],
            "interval": [round(v, 5) for v in short["difference"]["interval"]],
            "p_value": round(short["difference"]["p_value"], 5),
        }
        assert round(350.0 / 45, 6) == short["cost_per_conversion"]  # 100 SMS at 3.5
        assert "Wilson" in report["method"]["interval"]


class TestDemoTable:
    """The demo's closing table names every variant and says when a comparison is rough."""

    def test_render(self) -> None:
        rows = (
            [("cascades/long", "read", 40), ("cascades/short", "delivered", 40)],
            [
                ("cascades/long", 0, None, "converted", None, 12, 12),
                ("cascades/short", 0, None, "converted", None, 3, 3),
            ],
        )
        report = reports.build_experiment(
            tenant="acme",
            experiment="cascades",
            variants=["long", "short"],
            currency="RUB",
            message_rows=rows[0],
            event_rows=rows[1],
            prices={},
            sms_price=3.5,
        )
        campaign = reports.build(
            tenant="acme",
            campaign="c",
            currency="RUB",
            message_rows=[(None, "read", 80), (None, "holdout", 8)],
            event_rows=[(None, 0, None, "converted", None, 15, 15)],
            prices={},
            sms_price=3.5,
        )
        table = render_experiment(report, campaign=campaign.total)
        assert "(baseline)" in table
        assert "short" in table
        assert "rough" in table  # three conversions in the short arm, none held out
        assert "treated (80) against the control group (8)" in table
