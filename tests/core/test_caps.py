"""Frequency caps over a recipient's send history (gateway/core/caps.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import msgspec
import pytest
from hypothesis import event, given, settings, target
from hypothesis import strategies as st

from gateway.core import caps
from gateway.core.caps import CapAction, CapHistory, Capped, CapRule, SendEntry
from gateway.core.model import Category, Channel

DAY = 86400.0
PROMO, INFO, CONTENT, SERVICE = (
    Category.PROMO,
    Category.INFORMATIONAL,
    Category.CONTENT,
    Category.SERVICE,
)
PUSH, EMAIL, VIBER, SMS = Channel.PUSH, Channel.EMAIL, Channel.VIBER, Channel.SMS
MARKETING = [category for category in Category if category.is_marketing]


def history(*entries: tuple[float, str, Category, Channel]) -> CapHistory:
    return CapHistory.of(SendEntry(*entry) for entry in entries)


def check(
    hist: CapHistory,
    rules: tuple[CapRule, ...],
    *,
    message: str = "new",
    category: Category = PROMO,
    channel: Channel = EMAIL,
    now: float,
) -> Capped | None:
    return caps.check(hist, rules, message=message, category=category, channel=channel, now=now)


PROMO_3_PER_WEEK = CapRule("promo-week", 3, 7 * DAY, categories=frozenset({PROMO}))
ONE_PER_DAY = CapRule("daily", 1, DAY)


def in_scope(rule: CapRule, category: Category, channel: Channel) -> bool:
    """The test's own reading of a rule's scope: marketing only, its categories, its channels."""
    return (
        category.is_marketing
        and (not rule.categories or category in rule.categories)
        and (not rule.channels or channel in rule.channels)
    )


def counts(rule: CapRule, entry: SendEntry) -> bool:
    return in_scope(rule, entry.category, entry.channel)


class TestCapRule:
    """A rule counts marketing messages of its categories on its channels, and limits only those."""

    @pytest.mark.parametrize(
        ("rule", "category", "expected"),
        [
            (ONE_PER_DAY, PROMO, True),
            (ONE_PER_DAY, CONTENT, True),
            (ONE_PER_DAY, SERVICE, False),
            (PROMO_3_PER_WEEK, PROMO, True),
            (PROMO_3_PER_WEEK, INFO, False),
            (CapRule("svc", 1, DAY, categories=frozenset({SERVICE})), SERVICE, False),
        ],
    )
    def test_categories(self, rule: CapRule, category: Category, expected: bool) -> None:
        # a rule full of sends of `category` limits one more of `category` iff it applies to it
        one = msgspec.structs.replace(rule, max_count=1)
        hist = history((0.0, "old", category, EMAIL))
        assert expected == (check(hist, (one,), category=category, now=1.0) is not None)

    @pytest.mark.parametrize(
        ("channels", "channel", "expected"),
        [
            (frozenset(), SMS, True),
            (frozenset({SMS}), SMS, True),
            (frozenset({SMS}), PUSH, False),
            (frozenset({PUSH, EMAIL}), EMAIL, True),
        ],
    )
    def test_channels(self, channels: frozenset[Channel], channel: Channel, expected: bool) -> None:
        rule = CapRule("r", 1, DAY, channels=channels)
        hist = history((0.0, "m", PROMO, channel))
        assert expected == (check(hist, (rule,), channel=channel, now=1.0) is not None)

    @settings(max_examples=300)
    @given(
        rule=st.builds(
            CapRule,
            name=st.just("one"),
            max_count=st.just(1),
            window_seconds=st.just(DAY),
            categories=st.frozensets(st.sampled_from(Category), max_size=3),
            channels=st.frozensets(st.sampled_from(Channel), max_size=3),
            action=st.sampled_from(CapAction),
        ),
        earlier=st.builds(
            SendEntry,
            at=st.just(0.0),
            message=st.just("old"),
            category=st.sampled_from(Category),
            channel=st.sampled_from(Channel),
        ),
        category=st.sampled_from(Category),
        channel=st.sampled_from(Channel),
    )
    def test_a_one_slot_rule_is_full_iff_it_sees_both_sends(
        self, rule: CapRule, earlier: SendEntry, category: Category, channel: Channel
    ) -> None:
        """One send earlier in the window fills a one-slot rule for the next message exactly
        when the rule counts that send and its scope covers the next one."""
        verdict = check(
            CapHistory.of((earlier,)), (rule,), category=category, channel=channel, now=1.0
        )
        expected = counts(rule, earlier) and in_scope(rule, category, channel)
        assert (Capped(rule, DAY) if expected else None) == verdict
        event("full" if expected else "fits")


class TestCheck:
    """``check`` says whether one more send fits every rule, and until when it does not."""

    def test_fits_under_the_cap(self) -> None:
        hist = history((0.0, "a", PROMO, EMAIL), (1.0, "b", PROMO, SMS))
        assert None is check(hist, (PROMO_3_PER_WEEK,), now=2.0)

    def test_full_window_rejects_until_the_oldest_leaves(self) -> None:
        hist = history((0.0, "a", PROMO, EMAIL), (10.0, "b", PROMO, SMS), (20.0, "c", PROMO, PUSH))
        assert Capped(PROMO_3_PER_WEEK, 7 * DAY) == check(hist, (PROMO_3_PER_WEEK,), now=30.0)

    @pytest.mark.parametrize(
        ("now", "expected"),
        [(DAY - 1.0, Capped(ONE_PER_DAY, DAY)), (DAY, None), (DAY + 1.0, None)],
    )
    def test_window_is_half_open(self, now: float, expected: Capped | None) -> None:
        hist = history((0.0, "a", PROMO, EMAIL))
        assert expected == check(hist, (ONE_PER_DAY,), now=now)

    def test_service_is_never_capped(self) -> None:
        hist = history(*((float(i), f"m{i}", cat, EMAIL) for i, cat in enumerate(Category)))
        rules = (ONE_PER_DAY, CapRule("all-svc", 1, DAY, categories=frozenset({SERVICE})))
        assert None is check(hist, rules, category=SERVICE, now=11.0)

    def test_no_rules_no_cap(self) -> None:
        hist = history((0.0, "a", PROMO, EMAIL))
        assert None is check(hist, (), now=1.0)

    def test_other_categories_do_not_count(self) -> None:
        hist = history(*((float(i), f"m{i}", INFO, EMAIL) for i in range(5)))
        assert None is check(hist, (PROMO_3_PER_WEEK,), now=6.0)

    def test_service_history_does_not_count(self) -> None:
        hist = history((0.0, "otp", SERVICE, SMS))
        assert None is check(hist, (ONE_PER_DAY,), now=1.0)

    def test_channel_rule_counts_only_its_channels(self) -> None:
        sms_daily = CapRule("sms", 1, DAY, channels=frozenset({SMS}))
        hist = history((0.0, "a", PROMO, EMAIL))
        assert None is check(hist, (sms_daily,), channel=SMS, now=1.0)
        hist = history((0.0, "a", PROMO, SMS))
        assert Capped(sms_daily, DAY) == check(hist, (sms_daily,), channel=SMS, now=1.0)
        # the rule does not look at sends on other channels at all
        assert None is check(hist, (sms_daily,), channel=EMAIL, now=1.0)

    def test_later_step_of_the_same_message_passes(self) -> None:
        hist = history((0.0, "a", PROMO, PUSH))
        assert None is check(hist, (ONE_PER_DAY,), message="a", channel=SMS, now=300.0)
        assert Capped(ONE_PER_DAY, DAY) == check(hist, (ONE_PER_DAY,), message="b", now=300.0)

    def test_same_message_outside_the_window_counts_again(self) -> None:
        hist = history((0.0, "a", PROMO, PUSH), (10.0, "b", PROMO, PUSH), (20.0, "c", PROMO, SMS))
        two = CapRule("two", 2, 100.0)
        assert None is check(hist, (two,), message="b", now=100.0)
        assert Capped(two, 110.0) == check(hist, (two,), message="a", now=100.0)

    def test_a_message_counts_once_at_its_latest_step(self) -> None:
        # "a" went out on push at 0 and on SMS at 50: it occupies the window until 50 + W
        hist = history((0.0, "a", PROMO, PUSH), (50.0, "a", PROMO, SMS))
        rule = CapRule("one", 1, 100.0)
        assert Capped(rule, 150.0) == check(hist, (rule,), message="b", now=120.0)
        two = CapRule("two", 2, 100.0)
        assert None is check(hist, (two,), message="b", now=60.0)

    def test_until_frees_enough_slots(self) -> None:
        # four messages in the window, room for two: the second oldest must leave first
        hist = history(
            (0.0, "a", PROMO, EMAIL),
            (10.0, "b", PROMO, EMAIL),
            (20.0, "c", PROMO, EMAIL),
            (30.0, "d", PROMO, EMAIL),
        )
        two = CapRule("two", 2, 100.0, action=CapAction.DEFER)
        capped = check(hist, (two,), now=40.0)
        assert Capped(two, 120.0) == capped
        assert None is check(hist, (two,), now=120.0)

    def test_a_rejecting_rule_that_frees_up_before_the_deferral_lets_it_through(self) -> None:
        # the deferring rule holds the send until 1000; the rejecting one is free by then
        hist = history((0.0, "a", PROMO, EMAIL))
        defer = CapRule("defer", 1, 1000.0, action=CapAction.DEFER)
        reject = CapRule("reject", 1, 10.0)
        assert Capped(defer, 1000.0) == check(hist, (defer, reject), now=1.0)
        assert Capped(defer, 1000.0) == check(hist, (reject, defer), now=1.0)

    def test_a_rejecting_rule_still_full_at_the_deferral_rejects_at_once(self) -> None:
        hist = history((0.0, "a", PROMO, EMAIL))
        defer = CapRule("defer", 1, 10.0, action=CapAction.DEFER)
        reject = CapRule("reject", 1, 1000.0)
        assert Capped(reject, 1000.0) == check(hist, (defer, reject), now=1.0)
        assert Capped(reject, 1000.0) == check(hist, (reject, defer), now=1.0)

    def test_among_deferring_rules_the_latest_decides(self) -> None:
        hist = history((0.0, "a", PROMO, EMAIL))
        short = CapRule("short", 1, 10.0, action=CapAction.DEFER)
        long = CapRule("long", 1, 1000.0, action=CapAction.DEFER)
        assert Capped(long, 1000.0) == check(hist, (short, long), now=1.0)
        assert Capped(long, 1000.0) == check(hist, (long, short), now=1.0)

    def test_a_planned_send_takes_its_slot(self) -> None:
        # two per day, two sent: the first deferred message is planned for when the oldest
        # leaves (86400); the next one waits for the second slot, not for the same instant
        daily = CapRule("daily", 2, DAY, action=CapAction.DEFER)
        made = history((0.0, "a", PROMO, EMAIL), (10.0, "b", PROMO, EMAIL))
        assert Capped(daily, DAY) == check(made, (daily,), now=20.0)
        planned = made.with_planned([SendEntry(DAY, "c", PROMO, EMAIL)])
        assert Capped(daily, DAY + 10.0) == check(planned, (daily,), now=20.0)

    def test_a_planned_send_is_rechecked_against_the_later_ones(self) -> None:
        # "c" waits for 86400, "d" was planned for 86410 around it: "c" still fits its slot
        daily = CapRule("daily", 2, DAY, action=CapAction.DEFER)
        made = history((0.0, "a", PROMO, EMAIL), (10.0, "b", PROMO, EMAIL))
        planned = made.with_planned([SendEntry(DAY + 10.0, "d", PROMO, EMAIL)])
        assert None is check(planned, (daily,), message="c", now=DAY)

    def test_a_send_planned_far_ahead_takes_no_slot_now(self) -> None:
        # a send_at thirty days ahead does not fill today's window
        daily = CapRule("daily", 1, DAY)
        planned = CapHistory().with_planned([SendEntry(30 * DAY, "later", PROMO, EMAIL)])
        assert None is check(planned, (daily,), now=0.0)
        assert Capped(daily, 31 * DAY) == check(planned, (daily,), now=29.5 * DAY)

    def test_the_rejecting_cap_counts_the_planned_sends(self) -> None:
        # issue #15: five promos in a day, two per day (defer) and three per week (reject):
        # the third is deferred a day, the fourth and fifth are capped at once
        daily = CapRule("daily", 2, DAY, action=CapAction.DEFER)
        weekly = CapRule("weekly", 3, 7 * DAY)
        made = history((0.0, "m1", PROMO, EMAIL), (10.0, "m2", PROMO, EMAIL))
        assert Capped(daily, DAY) == check(made, (daily, weekly), message="m3", now=20.0)
        planned = made.with_planned([SendEntry(DAY, "m3", PROMO, EMAIL)])
        capped = check(planned, (daily, weekly), message="m4", now=30.0)
        assert capped is not None
        assert weekly == capped.rule

    def test_with_planned_of_nothing_is_the_history(self) -> None:
        made = history((0.0, "a", PROMO, EMAIL))
        assert made is made.with_planned([])

    def test_among_rejecting_rules_a_message_wide_one_wins(self) -> None:
        # the policy gate skips one channel for a per-channel rule but stops the message for
        # a message-wide one; when both are full the message must stop
        hist = history((0.0, "a", PROMO, EMAIL))
        wide = CapRule("wide", 1, 10.0)
        per_channel = CapRule("email", 1, 1000.0, channels=frozenset({EMAIL}))
        assert Capped(wide, 10.0) == check(hist, (per_channel, wide), now=1.0)
        assert Capped(wide, 10.0) == check(hist, (wide, per_channel), now=1.0)

    def test_capped_action_is_the_rules(self) -> None:
        rule = CapRule("d", 1, 1.0, action=CapAction.DEFER)
        assert CapAction.DEFER == Capped(rule, 1.0).action


class TestHistory:
    """A history stays time-ordered and forgets what no rule can see."""

    @pytest.mark.parametrize(
        ("rules", "expected"),
        [
            ((), 0.0),
            ((ONE_PER_DAY,), DAY),
            ((ONE_PER_DAY, PROMO_3_PER_WEEK), 7 * DAY),
        ],
    )
    def test_horizon_is_the_longest_window(
        self, rules: tuple[CapRule, ...], expected: float
    ) -> None:
        assert expected == caps.horizon_seconds(rules)

    def test_with_entry_drops_entries_beyond_the_horizon(self) -> None:
        hist = history((0.0, "a", PROMO, EMAIL), (5.0, "b", PROMO, EMAIL))
        after = hist.with_entry(SendEntry(5.0 + 5.0, "c", PROMO, EMAIL), horizon_seconds=10.0)
        # an entry exactly one horizon old can no longer be inside any window
        assert history((5.0, "b", PROMO, EMAIL), (10.0, "c", PROMO, EMAIL)) == after

    def test_with_entry_keeps_order_for_a_late_caller(self) -> None:
        hist = history((0.0, "a", PROMO, EMAIL), (5.0, "b", PROMO, EMAIL))
        after = hist.with_entry(SendEntry(3.0, "c", PROMO, EMAIL), horizon_seconds=100.0)
        assert [0.0, 3.0, 5.0] == [at for at, *_ in after.sends()]

    def test_with_entry_returns_a_new_value(self) -> None:
        hist = CapHistory()
        after = hist.with_entry(SendEntry(1.0, "a", PROMO, EMAIL), horizon_seconds=10.0)
        assert [] == hist.sends()
        assert history((1.0, "a", PROMO, EMAIL)) == after


# ---------------------------------------------------------------- properties
@dataclass(frozen=True)
class Attempt:
    delay: float
    message: str
    category: Category
    channel: Channel


def rule_strategy(window: st.SearchStrategy[float]) -> st.SearchStrategy[CapRule]:
    # half the rules count everything: narrowed rules alone would rarely be full
    return st.builds(
        CapRule,
        name=st.sampled_from(["a", "b", "c"]),
        max_count=st.integers(1, 3),
        window_seconds=window,
        categories=st.just(frozenset()) | st.frozensets(st.sampled_from(Category), max_size=2),
        channels=st.just(frozenset()) | st.frozensets(st.sampled_from(Channel), max_size=2),
        action=st.sampled_from(CapAction),
    )


def attempt_strategy(delay: st.SearchStrategy[float]) -> st.SearchStrategy[Attempt]:
    return st.builds(
        Attempt,
        delay=delay,
        message=st.sampled_from([f"m{i}" for i in range(6)]),
        category=st.sampled_from(Category),
        channel=st.sampled_from(Channel),
    )


def probe(
    hist: CapHistory, rules: tuple[CapRule, ...], attempt: Attempt, now: float
) -> Capped | None:
    return caps.check(
        hist,
        rules,
        message=attempt.message,
        category=attempt.category,
        channel=attempt.channel,
        now=now,
    )


def max_distinct_in_any_window(log: list[SendEntry], rule: CapRule) -> int:
    """The most distinct messages counted by ``rule`` in any ``[a, a + W)``.

    The busiest window can always be slid right until it starts at a counted send, so trying
    every send time as ``a`` is exhaustive.
    """
    counted = [entry for entry in log if counts(rule, entry)]
    best = 0
    for start in counted:
        inside = {e.message for e in counted if start.at <= e.at < start.at + rule.window_seconds}
        best = max(best, len(inside))
    return best


class TestCapProperties:
    """No window of a rule ever holds more than ``max_count`` messages; deferrals are exact."""

    @settings(max_examples=200)
    @given(
        rules=st.lists(rule_strategy(st.floats(min_value=1.0, max_value=30 * DAY)), max_size=4),
        entries=st.lists(
            st.builds(
                SendEntry,
                at=st.floats(min_value=0.0, max_value=1000.0),
                message=st.sampled_from(["a", "b", "c", "new"]),
                category=st.sampled_from(Category),
                channel=st.sampled_from(Channel),
            ),
            max_size=30,
        ),
        channel=st.sampled_from(Channel),
        now=st.floats(min_value=0.0, max_value=2000.0),
    )
    def test_service_is_never_capped(
        self, rules: list[CapRule], entries: list[SendEntry], channel: Channel, now: float
    ) -> None:
        hist = CapHistory.of(sorted(entries, key=lambda entry: entry.at))
        assert None is check(hist, tuple(rules), category=SERVICE, channel=channel, now=now)

    @settings(max_examples=150, deadline=None)
    @given(
        rules=st.lists(rule_strategy(st.integers(1, 20).map(float)), min_size=1, max_size=3),
        attempts=st.lists(attempt_strategy(st.integers(0, 6).map(float)), max_size=40),
    )
    def test_no_window_exceeds_its_cap(self, rules: list[CapRule], attempts: list[Attempt]) -> None:
        # whole seconds keep `at + W > now` exact, so the oracle's arithmetic is the real one
        ruleset = tuple(rules)
        horizon = caps.horizon_seconds(ruleset)
        hist = CapHistory()
        log: list[SendEntry] = []
        now = 0.0
        refused = 0
        for attempt in attempts:
            now += attempt.delay
            verdict = probe(hist, ruleset, attempt, now)
            # trimming to the horizon never changes a verdict
            assert verdict == probe(CapHistory.of(log), ruleset, attempt, now)
            if attempt.category is SERVICE:
                assert verdict is None
            if verdict is not None:
                refused += 1
                assert verdict.rule in ruleset
                assert verdict.until > now
                continue
            entry = SendEntry(now, attempt.message, attempt.category, attempt.channel)
            hist = hist.with_entry(entry, horizon_seconds=horizon)
            log.append(entry)
        for rule in ruleset:
            assert max_distinct_in_any_window(log, rule) <= rule.max_count, rule
        target(float(refused), label="refused sends")
        if refused:
            event("some sends were capped")

    @settings(max_examples=300, deadline=None)
    @given(
        rules=st.lists(rule_strategy(st.integers(1, 20).map(float)), min_size=1, max_size=4),
        entries=st.lists(
            st.builds(
                SendEntry,
                at=st.integers(80, 100).map(float),
                message=st.sampled_from([f"m{i}" for i in range(6)]),
                category=st.sampled_from(MARKETING),
                channel=st.sampled_from(Channel),
            ),
            max_size=12,
        ),
        attempt=st.builds(
            Attempt,
            delay=st.just(0.0),
            message=st.sampled_from(["new", "m0", "m1"]),
            category=st.sampled_from(MARKETING),
            channel=st.sampled_from(Channel),
        ),
        now=st.integers(100, 110).map(float),
        narrowed_twin=st.booleans(),
    )
    def test_verdict_combines_the_rules(
        self,
        rules: list[CapRule],
        entries: list[SendEntry],
        attempt: Attempt,
        now: float,
        narrowed_twin: bool,
    ) -> None:
        """Any history, even one over its caps: deferring rules decide when, rejecting ones
        whether (issue #15).

        The verdict is None iff every rule fits now. A deferral lands where every rule fits
        (deferring and rejecting alike), and not one ulp earlier for the deferring ones. A
        rejecting verdict names a rule that is still full where the deferring rules would
        let the send go, message-wide rules first.
        """
        hist = CapHistory.of(sorted(entries, key=lambda entry: entry.at))
        if narrowed_twin:
            # the same limit, narrowed to this channel and looking further back: full together
            rule = rules[0]
            twin = CapRule(
                "twin",
                rule.max_count,
                rule.window_seconds * 2,
                rule.categories,
                frozenset({attempt.channel}),
                CapAction.REJECT,
            )
            rules = [
                msgspec.structs.replace(rule, action=CapAction.REJECT, channels=frozenset()),
                twin,
                *rules[1:],
            ]
        ruleset = tuple(rules)
        single = {rule: probe(hist, (rule,), attempt, now) for rule in ruleset}
        full = [capped for capped in single.values() if capped is not None]
        # a later step of a message a rule already counts inside its window passes that rule
        step = SendEntry(now, attempt.message, attempt.category, attempt.channel)
        for rule in ruleset:
            counted = any(
                e.message == attempt.message
                and counts(rule, e)
                and e.at + rule.window_seconds > now
                for e in entries
            )
            if counted and counts(rule, step):
                assert None is single[rule]
                event("a later step of a counted message")
        verdict = probe(hist, ruleset, attempt, now)
        if not full:
            assert None is verdict
            return
        assert verdict is not None
        deferring = tuple(rule for rule in ruleset if rule.action is CapAction.DEFER)
        if verdict.action is CapAction.DEFER:
            assert verdict.until > now
            assert None is probe(hist, ruleset, attempt, verdict.until)
            before = math.nextafter(verdict.until, 0.0)
            assert None is not probe(hist, deferring, attempt, before)
            event("deferred")
            return
        # rejected: the deferring rules alone would have let it go at `at`, where it is full
        alone = probe(hist, deferring, attempt, now)
        at = now if alone is None else alone.until
        assert None is not probe(hist, (verdict.rule,), attempt, at)
        still_full = [
            rule
            for rule in ruleset
            if rule.action is CapAction.REJECT and probe(hist, (rule,), attempt, at) is not None
        ]
        if any(not rule.channels for rule in still_full):
            assert not verdict.rule.channels
            event("a message-wide rejecting rule is full")

    @settings(max_examples=300, deadline=None)
    @given(
        rules=st.lists(
            rule_strategy(st.floats(min_value=1e-3, max_value=30 * DAY)),
            min_size=1,
            max_size=3,
        ),
        start=st.floats(min_value=0.0, max_value=4e9),
        attempts=st.lists(
            attempt_strategy(st.floats(min_value=0.0, max_value=2 * DAY)), min_size=1, max_size=30
        ),
    )
    def test_until_is_exact(
        self, rules: list[CapRule], start: float, attempts: list[Attempt]
    ) -> None:
        ruleset = tuple(rules)
        horizon = caps.horizon_seconds(ruleset)
        hist = CapHistory()
        now = start
        checked = 0
        for attempt in attempts:
            now += attempt.delay
            verdict = probe(hist, ruleset, attempt, now)
            if verdict is None:
                entry = SendEntry(now, attempt.message, attempt.category, attempt.channel)
                hist = hist.with_entry(entry, horizon_seconds=horizon)
                continue
            # the rule that decided lets the send through at `until`, not one ulp earlier
            only = (verdict.rule,)
            assert None is probe(hist, only, attempt, verdict.until)
            assert None is not probe(hist, only, attempt, math.nextafter(verdict.until, -math.inf))
            checked += 1
        if checked:
            event("a cap verdict was re-checked at its until")


# ---------------------------------------------------------------- the packed history
def reference_check(
    entries: tuple[SendEntry, ...],
    rules: tuple[CapRule, ...],
    *,
    message: str,
    category: Category,
    channel: Channel,
    now: float,
) -> Capped | None:
    """``check`` over a tuple of ``SendEntry`` with full message keys, spelled out plainly (the
    reference the packed history must agree with, verdict for verdict)."""
    if category is Category.SERVICE or not rules or not entries:
        return None
    full: list[tuple[CapRule, list[float], float | None]] = []
    for rule in rules:
        categories, channels, window = rule.categories, rule.channels, rule.window_seconds
        if (categories and category not in categories) or (channels and channel not in channels):
            continue
        latest: dict[str, float] = {}
        for entry in entries:
            if (
                entry.at + window > now
                and entry.category is not Category.SERVICE
                and (not categories or entry.category in categories)
                and (not channels or entry.channel in channels)
            ):
                latest[entry.message] = entry.at
        own = latest.pop(message, None)
        if own is not None and len(latest) < rule.max_count:
            continue
        full.append((rule, sorted(latest.values()), own))

    def fits(rule: CapRule, times: list[float], at: float, own: float | None) -> bool:
        window = rule.window_seconds
        if own is not None and own + window > at:
            return True
        ends = [at] + [t for t in times if at < t < at + window]
        return all(
            len([t for t in times if t <= x and t + window > x]) < rule.max_count for x in ends
        )

    def earliest(pairs: list[tuple[CapRule, list[float], float | None]], start: float) -> float:
        leaves = [t + rule.window_seconds for rule, times, _ in pairs for t in times]
        for candidate in sorted({start, *(c for c in leaves if c > start)}):
            if all(fits(rule, times, candidate, own) for rule, times, own in pairs):
                return candidate
        raise AssertionError("no instant fits")

    deferring = [entry for entry in full if entry[0].action is CapAction.DEFER]
    at = earliest(deferring, now)
    verdict: Capped | None = None
    for rule, times, own in full:
        if rule.action is CapAction.REJECT and not fits(rule, times, at, own):
            capped = Capped(rule, earliest([(rule, times, own)], at))
            if verdict is None or caps._worse(capped, verdict):
                verdict = capped
    if verdict is not None or at == now:
        return verdict
    binding = max(deferring, key=lambda entry: earliest([entry], now))[0]
    return Capped(binding, at)


def reference_with_entry(
    entries: tuple[SendEntry, ...], entry: SendEntry, horizon_seconds: float
) -> tuple[SendEntry, ...]:
    cutoff = entry.at - horizon_seconds
    kept = tuple(e for e in entries if e.at > cutoff)
    if kept and kept[-1].at > entry.at:
        return tuple(sorted((*kept, entry), key=lambda e: e.at))
    return (*kept, entry)


MESSAGES = st.sampled_from(["a", "b", "c", "acme:m-1", "acme:m-2", "", "\udcff", "ключ"])
TIMES = st.integers(0, 40).map(float) | st.floats(min_value=-1e10, max_value=1e10)
send_entries = st.builds(
    SendEntry,
    at=TIMES,
    message=MESSAGES,
    category=st.sampled_from(Category),
    channel=st.sampled_from(Channel),
)
any_rules = st.lists(
    rule_strategy(st.integers(1, 30).map(float) | st.floats(min_value=1e-3, max_value=1e9)),
    max_size=4,
).map(tuple)


class TestPackedHistory:
    """The packed history gives exactly the verdicts the tuple of ``SendEntry`` gave."""

    @settings(max_examples=500, deadline=None)
    @given(
        entries=st.lists(send_entries, max_size=12),
        rules=any_rules,
        message=MESSAGES,
        category=st.sampled_from(Category),
        channel=st.sampled_from(Channel),
        now=TIMES,
    )
    def test_check_agrees_with_the_reference_for_any_history(
        self,
        entries: list[SendEntry],
        rules: tuple[CapRule, ...],
        message: str,
        category: Category,
        channel: Channel,
        now: float,
    ) -> None:
        """Any order, even one no caller produces: ``of`` keeps it, and so does the verdict."""
        expected = reference_check(
            tuple(entries), rules, message=message, category=category, channel=channel, now=now
        )
        got = caps.check(
            CapHistory.of(entries),
            rules,
            message=message,
            category=category,
            channel=channel,
            now=now,
        )
        assert expected == got
        event("capped" if got is not None else "fits")

    @settings(max_examples=300, deadline=None)
    @given(
        sends=st.lists(send_entries, max_size=15),
        horizon=st.integers(0, 30).map(float) | st.floats(min_value=0.0, max_value=1e9),
        rules=any_rules,
        attempt=st.tuples(MESSAGES, st.sampled_from(Category), st.sampled_from(Channel)),
        now=TIMES,
    )
    def test_with_entry_keeps_what_the_tuple_kept(
        self,
        sends: list[SendEntry],
        horizon: float,
        rules: tuple[CapRule, ...],
        attempt: tuple[str, Category, Channel],
        now: float,
    ) -> None:
        """Sends recorded in any order (late ones included): the packed history holds the same
        entries in the same order as the tuple would, and every verdict agrees."""
        reference: tuple[SendEntry, ...] = ()
        hist = CapHistory()
        message, category, channel = attempt
        for entry in sends:
            reference = reference_with_entry(reference, entry, horizon)
            hist = hist.with_entry(entry, horizon_seconds=horizon)
            assert CapHistory.of(reference) == hist
            expected = reference_check(
                reference, rules, message=message, category=category, channel=channel, now=now
            )
            assert expected == caps.check(
                hist, rules, message=message, category=category, channel=channel, now=now
            )

    @settings(max_examples=200)
    @given(
        entries=st.lists(send_entries, max_size=8),
        message=MESSAGES,
        channel=st.sampled_from(Channel),
    )
    def test_counted_is_the_key_and_channel_lookup(
        self, entries: list[SendEntry], message: str, channel: Channel
    ) -> None:
        expected = any(e.message == message and e.channel is channel for e in entries)
        assert expected == CapHistory.of(entries).counted(message, channel)

    @given(entries=st.lists(send_entries, max_size=8))
    def test_sends_unpack_what_was_packed(self, entries: list[SendEntry]) -> None:
        expected = [(e.at, caps.message_digest(e.message), e.category, e.channel) for e in entries]
        assert expected == CapHistory.of(entries).sends()
        assert len(entries) * caps.ENTRY_BYTES == len(CapHistory.of(entries).packed)

    def test_a_message_is_known_by_a_stable_64_bit_digest(self) -> None:
        digest = caps.message_digest("acme:m1")
        assert digest == caps.message_digest("".join(["acme:", "m1"]))
        assert 0 <= digest < 2**64
        assert digest != caps.message_digest("acme:m2")
