"""Experiment assignment: deterministic, sticky, weighted, independent of the control group."""

from __future__ import annotations

import math
from datetime import time

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.control_group import ControlGroup
from gateway.core.experiments import Experiment, Variant, shares
from gateway.core.model import Channel
from gateway.core.send_windows import send_windows

RECIPIENTS = 100_000
INDEPENDENCE_RECIPIENTS = 20_000

TENANTS = st.from_regex(r"[a-z0-9][a-z0-9_]{0,15}", fullmatch=True)
RECIPIENT_IDS = st.text(min_size=1, max_size=24)
SALTS = st.text(max_size=12)
PERCENTS = st.floats(0.0, 100.0)


@st.composite
def experiments(draw: st.DrawFn, max_variants: int = 4, *, fractional: bool = True) -> Experiment:
    """A definition with 2..max_variants variants; weights 1..20, or any the config allows
    when ``fractional`` (then a share may be far too small to count in a sample)."""
    weight = st.integers(1, 20).map(float)
    if fractional:
        weight = st.one_of(weight, st.floats(0.05, 1_000_000.0))
    weights = draw(st.lists(weight, min_size=2, max_size=max_variants))
    name = draw(st.from_regex(r"[a-z][a-z0-9_]{0,11}", fullmatch=True))
    return Experiment(
        name, tuple(Variant(f"v{i}", w) for i, w in enumerate(weights)), salt=draw(SALTS)
    )


def control_groups(percent: st.SearchStrategy[float] = PERCENTS) -> st.SearchStrategy[ControlGroup]:
    return st.builds(
        ControlGroup,
        percent=percent,
        period_seconds=st.floats(1.0, 400 * 86400.0),
        salt=SALTS,
    )


def rebuilt(experiment: Experiment) -> Experiment:
    """An equal definition made of new objects, as another router or a restart builds it."""
    return Experiment(
        str(experiment.name),
        tuple(Variant(str(v.name), float(v.weight)) for v in experiment.variants),
        salt=str(experiment.salt),
    )


def deviation(share: float, n: int) -> float:
    """The standard deviation of a share observed over n independent draws."""
    return math.sqrt(share * (1 - share) / n)


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

    @settings(max_examples=50, deadline=None)
    @given(
        experiment=experiments(),
        tenant=TENANTS,
        recipients=st.lists(RECIPIENT_IDS, min_size=1, max_size=40, unique=True),
        data=st.data(),
    )
    def test_deterministic(
        self, experiment: Experiment, tenant: str, recipients: list[str], data: st.DataObject
    ) -> None:
        """A recipient's variant is a function of the definition, the tenant and the recipient
        alone: not of the order recipients are asked in, not of which object asks (another
        router, a restart), not of what else was asked in between."""
        first = {recipient: experiment.assign(tenant, recipient) for recipient in recipients}
        copy = rebuilt(experiment)  # equal, but not the same objects
        order = data.draw(st.permutations(recipients), label="order")
        others = data.draw(experiments(), label="another experiment")
        again: dict[str, Variant] = {}
        for recipient in order:
            others.assign(tenant, recipient)  # other draws in between change nothing
            experiment.assign(f"{tenant}x", recipient)
            again[recipient] = copy.assign(tenant, recipient)
        assert first == again

    @settings(max_examples=50, deadline=None)
    @given(
        experiment=experiments(),
        tenant=TENANTS,
        recipients=st.lists(RECIPIENT_IDS, min_size=1, max_size=10, unique=True),
        data=st.data(),
        control=control_groups(),
    )
    def test_sticky(
        self,
        experiment: Experiment,
        tenant: str,
        recipients: list[str],
        data: st.DataObject,
        control: ControlGroup,
    ) -> None:
        """Every message to a recipient, over any time, gets the recipient's first variant:
        through restarts (the definition decoded again), control-group period roll-overs and
        any interleaving with other recipients."""
        messages = data.draw(st.lists(st.sampled_from(recipients), min_size=1, max_size=60))
        times = data.draw(
            st.lists(st.floats(0, 4e9), min_size=len(messages), max_size=len(messages))
        )
        restarted = msgspec.json.decode(msgspec.json.encode(experiment), type=Experiment)
        seen: dict[str, Variant] = {}
        for index, (recipient, now) in enumerate(zip(messages, sorted(times), strict=True)):
            control.holds_out(tenant, recipient, now=now)  # the router asks it first
            current = restarted if index % 2 else experiment
            variant = current.assign(tenant, recipient)
            assert seen.setdefault(recipient, variant) == variant, (recipient, index)

    def test_the_hash_is_pinned(self) -> None:
        """Upgrading the gateway keeps every running experiment's assignments: these are the
        variants of the first recipients under today's hash (2 bits each)."""
        pinned = Experiment("pinned", tuple(Variant(n, 1.0) for n in "abcd"), salt="2026q4")
        assert "cacacbdcbcdbbabbdadcdbbddbddbcbd" == "".join(
            pinned.assign("shop", f"r{i}").name for i in range(32)
        )
        assert "addbcccdabbcccbcbcdbdacbdbadcdcc" == "".join(
            pinned.assign("acme", f"+7999000{i:04d}").name for i in range(32)
        )

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
        tenant=TENANTS,
    )
    def test_within_one_point_of_the_weights_over_100k_recipients(
        self, weights: list[int], salt: str, tenant: str
    ) -> None:
        """A share over 100k draws has a standard deviation of at most 0.0016 (at p = 1/2):
        1 pp is over six of them, a chance failure about 2e-9 per comparison."""
        experiment = Experiment(
            "split",
            tuple(Variant(f"v{i}", float(w)) for i, w in enumerate(weights)),
            salt=salt,
        )
        tally = counts(experiment, range(RECIPIENTS), tenant)
        for variant, share in zip(experiment.variants, shares(experiment), strict=True):
            assert abs(tally[variant.name] / RECIPIENTS - share) < 0.01, (variant, tally)

    @settings(max_examples=12, deadline=None)
    @given(
        experiment=experiments(max_variants=3, fractional=False),
        tenant=TENANTS,
        control=control_groups(percent=st.floats(10.0, 90.0)),
        now=st.floats(0, 4e9),
        prefix=st.text(max_size=4),
    )
    def test_independent_of_the_control_group(
        self, experiment: Experiment, tenant: str, control: ControlGroup, now: float, prefix: str
    ) -> None:
        """Among the held-out recipients and among the others alike, each variant's share is
        its weight's: the control group's draw does not predict the experiment's (which it
        would if they shared a hash, or if one were drawn from what the other left).

        Tolerances: a group of n recipients holds a variant of share p about n*p times, with
        a standard deviation of sqrt(p(1-p)/n) in the share (binomial; n >= 1,500 here, since
        the control group holds 10-90 % of 20,000, and p >= 1/41 with weights 1..20, so n*p is
        at least 36 and the normal approximation holds out to six deviations). Six standard deviations fail by chance with
        probability about 2e-9 per comparison; at most 3 variants x 2 groups x 12 examples
        per run, a chance failure is one in millions of runs. The difference of the two
        groups' shares is held to six deviations of a difference likewise. Held to that, a
        shared hash (the held-out all in the first variant) fails by tens of deviations.
        """
        held: dict[str, int] = {variant.name: 0 for variant in experiment.variants}
        others = dict(held)
        for index in range(INDEPENDENCE_RECIPIENTS):
            recipient = f"{prefix}{index}"
            group = held if control.holds_out(tenant, recipient, now=now) else others
            group[experiment.assign(tenant, recipient).name] += 1
        held_n, others_n = sum(held.values()), sum(others.values())
        for n in (held_n, others_n):  # the control group's own share, within six deviations
            share = control.percent / 100 if n == held_n else 1 - control.percent / 100
            assert abs(n / INDEPENDENCE_RECIPIENTS - share) <= 6 * deviation(
                share, INDEPENDENCE_RECIPIENTS
            )
        for variant, share in zip(experiment.variants, shares(experiment), strict=True):
            in_held, in_others = held[variant.name] / held_n, others[variant.name] / others_n
            assert abs(in_held - share) <= 6 * deviation(share, held_n), (variant, held)
            assert abs(in_others - share) <= 6 * deviation(share, others_n), (variant, others)
            both = math.sqrt(share * (1 - share) * (1 / held_n + 1 / others_n))
            assert abs(in_held - in_others) <= 6 * both, (variant, held, others)

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
