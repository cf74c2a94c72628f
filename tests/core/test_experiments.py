"""Experiment assignment: deterministic, sticky, weighted, independent of the control group."""

from __future__ import annotations

from datetime import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.control_group import ControlGroup
from gateway.core.experiments import Experiment, Variant, shares
from gateway.core.model import Channel
from gateway.core.send_windows import send_windows

RECIPIENTS = 100_000
CASCADES = Experiment(
    "cascades",
    (
        Variant("long", 1.0, (Channel.PUSH, Channel.EMAIL, Channel.SMS)),
        Variant("short", 1.0, (Channel.PUSH, Channel.SMS)),
    ),
)


def counts(experiment: Experiment, recipients: range, tenant: str = "acme") -> dict[str, int]:
    tally = {variant.name: 0 for variant in experiment.variants}
    for index in recipients:
        tally[experiment.assign(tenant, f"r{index}").name] += 1
    return tally


class TestAssignment:
    """Every recipient gets one variant, the same each time, in the proportions of the weights."""

    def test_deterministic_and_sticky(self) -> None:
        first = [CASCADES.assign("acme", f"r{i}") for i in range(1000)]
        again = [CASCADES.assign("acme", f"r{i}") for i in range(1000)]
        assert first == again
        # a copy of the definition (another router, a restart) assigns the same
        copy = Experiment("cascades", CASCADES.variants)
        assert first == [copy.assign("acme", f"r{i}") for i in range(1000)]

    def test_the_salt_and_the_name_redraw(self) -> None:
        salted = Experiment("cascades", CASCADES.variants, salt="2027")
        renamed = Experiment("cascades_2", CASCADES.variants)
        base = [CASCADES.assign("acme", f"r{i}").name for i in range(1000)]
        assert base != [salted.assign("acme", f"r{i}").name for i in range(1000)]
        assert base != [renamed.assign("acme", f"r{i}").name for i in range(1000)]

    @settings(max_examples=5, deadline=None)
    @given(
        weights=st.lists(st.integers(1, 20), min_size=2, max_size=4),
        salt=st.text(max_size=8),
    )
    def test_within_one_point_of_the_weights_over_100k_recipients(
        self, weights: list[int], salt: str
    ) -> None:
        experiment = Experiment(
            "split",
            tuple(Variant(f"v{i}", float(w)) for i, w in enumerate(weights)),
            salt=salt,
        )
        tally = counts(experiment, range(RECIPIENTS))
        for variant, share in zip(experiment.variants, shares(experiment), strict=True):
            assert abs(tally[variant.name] / RECIPIENTS - share) < 0.01, (variant, tally)

    def test_independent_of_the_control_group(self) -> None:
        """Within the control group and outside it, the split is the same (within 1 pp): the
        two draws do not share a hash, so neither predicts the other."""
        control = ControlGroup(percent=20.0, salt="cascadegw")
        inside = {"long": 0, "short": 0}
        outside = {"long": 0, "short": 0}
        for index in range(RECIPIENTS):
            recipient = f"r{index}"
            tally = inside if control.holds_out("acme", recipient, now=0.0) else outside
            tally[CASCADES.assign("acme", recipient).name] += 1
        held = sum(inside.values())
        assert abs(held / RECIPIENTS - 0.20) < 0.01
        assert abs(inside["long"] / held - outside["long"] / (RECIPIENTS - held)) < 0.01

    def test_the_key_names_experiment_and_variant(self) -> None:
        assert "cascades/short" == CASCADES.key(CASCADES.variants[1])


class TestDefinition:
    """A definition is valid or refused; its fingerprint follows who gets what."""

    @pytest.mark.parametrize(
        ("variants", "message"),
        [
            ((), "at least one variant"),
            ((Variant("a", 1.0), Variant("a", 2.0)), "unique"),
            ((Variant("a", 0.0),), "positive and finite"),
            ((Variant("a", float("nan")),), "positive and finite"),
            ((Variant("a", float("inf")),), "positive and finite"),
        ],
    )
    def test_refused(self, variants: tuple[Variant, ...], message: str) -> None:
        with pytest.raises(ValueError, match=message):
            Experiment("x", variants)

    def test_fingerprint_changes_with_weights_variants_and_salt(self) -> None:
        base = CASCADES.fingerprint()
        assert base == Experiment("cascades", CASCADES.variants).fingerprint()
        heavier = (Variant("long", 2.0, CASCADES.variants[0].channels), CASCADES.variants[1])
        evening = Variant(
            "short", 1.0, (Channel.PUSH, Channel.SMS), windows=send_windows([(time(20), time(22))])
        )
        timed = Variant(
            "short", 1.0, (Channel.PUSH, Channel.SMS), step_timeout_seconds=((Channel.PUSH, 60.0),)
        )
        others = {
            Experiment("cascades", heavier).fingerprint(),
            Experiment("cascades", (CASCADES.variants[0], evening)).fingerprint(),
            Experiment("cascades", (CASCADES.variants[0], timed)).fingerprint(),
            Experiment("cascades", CASCADES.variants, salt="s").fingerprint(),
            Experiment("cascades", CASCADES.variants[:1]).fingerprint(),
        }
        assert base not in others
        assert 5 == len(others)
