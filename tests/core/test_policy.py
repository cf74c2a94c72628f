"""The policy engine: ``decide`` on arrival, ``gate`` before every step (core/policy.py)."""

from __future__ import annotations

import math
from datetime import UTC, datetime, time, tzinfo
from zoneinfo import ZoneInfo

import msgspec
import pytest
from hypothesis import assume, event, example, given, settings
from hypothesis import strategies as st

from gateway.core import caps, quiet_hours
from gateway.core.caps import CapAction, CapHistory, CapRule, SendEntry
from gateway.core.consent import (
    ConsentAction,
    ConsentDefaults,
    ConsentKind,
    ConsentRecord,
    ConsentState,
)
from gateway.core.control_group import ControlGroup
from gateway.core.errors import (
    AuthRejected,
    ConfigError,
    GatewayError,
    InvalidRecipient,
    InvalidRequest,
    PermanentProviderError,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
    TransientProviderError,
)
from gateway.core.model import (
    ALL_CHANNELS,
    ALL_CHANNELS_MASK,
    DEFAULT_CASCADE,
    LANES_BY_PRIORITY,
    Category,
    Channel,
    DeferReason,
    Envelope,
    Lane,
    RejectReason,
    message_key,
    recipient_key,
    split_key,
)
from gateway.core.policy import (
    _MAX_HOLD_ROUNDS,
    Admit,
    Decision,
    Defer,
    Go,
    Hold,
    PolicyRules,
    QuietAction,
    QuietRule,
    RecipientState,
    Reject,
    Skip,
    Stop,
    Verdict,
    WindowRule,
    decide,
    gate,
)
from gateway.core.quiet_hours import QuietWindow
from gateway.core.send_windows import SendWindows, send_windows

MOSCOW = ZoneInfo("Europe/Moscow")
PUSH, EMAIL, VIBER, SMS = Channel.PUSH, Channel.EMAIL, Channel.VIBER, Channel.SMS
PROMO, SERVICE = Category.PROMO, Category.SERVICE
HOUR = 3600.0
DAY = 86400.0


def moscow(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> float:
    return datetime(year, month, day, hour, minute, tzinfo=MOSCOW).timestamp()


NOON = moscow(2024, 3, 14, 12, 0)
LATE = moscow(2024, 3, 14, 23, 30)
MORNING = moscow(2024, 3, 15, 9, 0)
NIGHT = QuietWindow(time(21), time(9))
MESSAGE = "shop:m1"

PD_GRANT = ConsentRecord(ConsentKind.PERSONAL_DATA, ConsentAction.GRANT, 0.0, "crm")
PD_WITHDRAW = ConsentRecord(ConsentKind.PERSONAL_DATA, ConsentAction.WITHDRAW, 1.0, "crm")
AD_GRANT = ConsentRecord(ConsentKind.ADVERTISING, ConsentAction.GRANT, 0.0, "crm")


def ad_withdraw(channel: Channel | None = None, at: float = 1.0) -> ConsentRecord:
    return ConsentRecord(ConsentKind.ADVERTISING, ConsentAction.WITHDRAW, at, "crm", channel)


def consents(*records: ConsentRecord) -> ConsentState:
    state = ConsentState()
    for record in records:
        state = state.with_record(record)
    return state


OPTED_IN = RecipientState(consents=consents(PD_GRANT, AD_GRANT))
NO_RULES = PolicyRules()


def envelope(
    category: Category = PROMO,
    *,
    lane: Lane = Lane.NORMAL,
    channels: tuple[Channel, ...] = (PUSH, EMAIL, VIBER, SMS),
    send_at: float | None = None,
    expires_at: float | None = None,
    topic: str = "promo",
) -> Envelope:
    return Envelope("shop", "r1", category, topic, lane, channels, send_at, expires_at)


def sent(*entries: tuple[float, str, Channel]) -> CapHistory:
    return CapHistory.of(SendEntry(at, message, PROMO, channel) for at, message, channel in entries)


def run_decide(
    env: Envelope,
    recipient: RecipientState = OPTED_IN,
    rules: PolicyRules = NO_RULES,
    *,
    now: float = NOON,
    tz: tzinfo = MOSCOW,
) -> Decision:
    return decide(env, recipient, rules, message=MESSAGE, now=now, tz=tz)


def run_gate(
    env: Envelope,
    recipient: RecipientState = OPTED_IN,
    rules: PolicyRules = NO_RULES,
    *,
    channel: Channel = PUSH,
    now: float = NOON,
    tz: tzinfo = MOSCOW,
) -> Verdict:
    return gate(env, recipient, rules, message=MESSAGE, channel=channel, now=now, tz=tz)


def reason(decision: Decision) -> RejectReason | None:
    return decision.reason if isinstance(decision, Reject) else None


NIGHT_DEFER = PolicyRules(quiet_hours=(QuietRule(NIGHT),))
ALL_HELD_OUT = PolicyRules(control_group=ControlGroup(percent=100.0))
DEFER_CAP = CapRule("daily", 1, DAY, action=CapAction.DEFER)
REJECT_CAP = CapRule("daily", 1, DAY)
EMAIL_REJECT_CAP = CapRule("email-daily", 1, DAY, channels=frozenset({EMAIL}))


class TestDecideRefusals:
    """``decide`` refuses, in order: expired, no address, no consent, holdout."""

    @pytest.mark.parametrize(
        ("env", "recipient", "rules", "expected"),
        [
            pytest.param(
                envelope(expires_at=NOON),
                OPTED_IN,
                PolicyRules(),
                RejectReason.EXPIRED,
                id="expires now",
            ),
            pytest.param(
                envelope(expires_at=NOON - 1),
                OPTED_IN,
                PolicyRules(),
                RejectReason.EXPIRED,
                id="expired",
            ),
            pytest.param(
                envelope(channels=()),
                OPTED_IN,
                PolicyRules(),
                RejectReason.NO_CHANNEL,
                id="no address",
            ),
            pytest.param(
                envelope(channels=(), expires_at=NOON),
                OPTED_IN,
                PolicyRules(),
                RejectReason.EXPIRED,
                id="expiry is checked first",
            ),
            pytest.param(
                envelope(),
                RecipientState(consents=consents(PD_GRANT, AD_GRANT, PD_WITHDRAW)),
                PolicyRules(),
                RejectReason.NO_CONSENT,
                id="personal data withdrawn, promo",
            ),
            pytest.param(
                envelope(SERVICE, lane=Lane.CRITICAL),
                RecipientState(consents=consents(PD_GRANT, AD_GRANT, PD_WITHDRAW)),
                PolicyRules(),
                RejectReason.NO_CONSENT,
                id="personal data withdrawn, service",
            ),
            pytest.param(
                envelope(),
                RecipientState(),
                PolicyRules(
                    consent_defaults=ConsentDefaults(personal_data=False, advertising=True)
                ),
                RejectReason.NO_CONSENT,
                id="personal data off by default",
            ),
            pytest.param(
                envelope(),
                RecipientState(),
                PolicyRules(),
                RejectReason.NO_CONSENT,
                id="no advertising consent by default",
            ),
            pytest.param(
                envelope(),
                RecipientState(consents=consents(PD_GRANT, AD_GRANT, ad_withdraw())),
                PolicyRules(),
                RejectReason.NO_CONSENT,
                id="advertising withdrawn everywhere",
            ),
            pytest.param(
                envelope(channels=(SMS,)),
                RecipientState(consents=consents(PD_GRANT, AD_GRANT, ad_withdraw(SMS))),
                PolicyRules(),
                RejectReason.NO_CONSENT,
                id="advertising withdrawn on the only channel",
            ),
            pytest.param(
                envelope(), OPTED_IN, ALL_HELD_OUT, RejectReason.HOLDOUT, id="control group"
            ),
            pytest.param(
                envelope(Category.CONTENT),
                OPTED_IN,
                ALL_HELD_OUT,
                RejectReason.HOLDOUT,
                id="content held out",
            ),
        ],
    )
    def test_rejects(
        self, env: Envelope, recipient: RecipientState, rules: PolicyRules, expected: RejectReason
    ) -> None:
        decision = run_decide(env, recipient, rules)
        assert expected == reason(decision)
        assert isinstance(decision, Reject)
        assert decision.detail

    def test_service_is_never_held_out(self) -> None:
        decision = run_decide(envelope(SERVICE), RecipientState(), ALL_HELD_OUT)
        assert Admit((PUSH, EMAIL, VIBER, SMS), 0b1111) == decision

    def test_service_needs_no_advertising_consent(self) -> None:
        recipient = RecipientState(consents=consents(PD_GRANT, ad_withdraw()))
        decision = run_decide(envelope(SERVICE), recipient)
        assert Admit((PUSH, EMAIL, VIBER, SMS), 0b1111) == decision

    def test_withdrawn_channel_is_left_out_of_the_plan(self) -> None:
        recipient = RecipientState(consents=consents(PD_GRANT, AD_GRANT, ad_withdraw(PUSH)))
        decision = run_decide(envelope(), recipient)
        assert isinstance(decision, Admit)
        assert (PUSH, EMAIL, VIBER, SMS) == decision.plan
        assert (EMAIL, VIBER, SMS) == decision.channels


class TestDecideTiming:
    """Quiet hours, ``send_at`` and caps decide when the first step goes."""

    @pytest.mark.parametrize(
        ("env", "rules", "now", "expected"),
        [
            pytest.param(envelope(), NIGHT_DEFER, NOON, None, id="daytime promo goes now"),
            pytest.param(
                envelope(),
                NIGHT_DEFER,
                LATE,
                (MORNING, DeferReason.QUIET_HOURS),
                id="23:30 Moscow promo waits for 09:00",
            ),
            pytest.param(
                envelope(SERVICE, lane=Lane.CRITICAL),
                NIGHT_DEFER,
                LATE,
                None,
                id="critical service goes through",
            ),
            pytest.param(
                envelope(SERVICE),
                NIGHT_DEFER,
                LATE,
                (MORNING, DeferReason.QUIET_HOURS),
                id="normal-lane service waits",
            ),
            pytest.param(
                envelope(lane=Lane.CRITICAL),
                NIGHT_DEFER,
                LATE,
                (MORNING, DeferReason.QUIET_HOURS),
                id="critical lane alone does not bypass",
            ),
            pytest.param(
                envelope(SERVICE, lane=Lane.CRITICAL),
                msgspec.structs.replace(NIGHT_DEFER, critical_service_bypasses_quiet_hours=False),
                LATE,
                (MORNING, DeferReason.QUIET_HOURS),
                id="bypass switched off",
            ),
            pytest.param(
                envelope(),
                PolicyRules(quiet_hours=(QuietRule(NIGHT, QuietAction.BYPASS),)),
                LATE,
                None,
                id="bypass rule",
            ),
            pytest.param(
                envelope(),
                PolicyRules(quiet_hours=(QuietRule(NIGHT, channels=frozenset({SMS})),)),
                LATE,
                None,
                id="rule for another channel",
            ),
            pytest.param(
                envelope(),
                PolicyRules(quiet_hours=(QuietRule(NIGHT, categories=frozenset({SERVICE})),)),
                LATE,
                None,
                id="rule for another category",
            ),
            pytest.param(
                envelope(),
                PolicyRules(
                    quiet_hours=(
                        QuietRule(NIGHT, QuietAction.BYPASS, categories=frozenset({PROMO})),
                        QuietRule(NIGHT),
                    )
                ),
                LATE,
                None,
                id="the first matching rule wins",
            ),
            pytest.param(
                envelope(send_at=NOON + HOUR),
                PolicyRules(),
                NOON,
                (NOON + HOUR, DeferReason.SEND_AT),
                id="send_at in the future",
            ),
            pytest.param(
                envelope(send_at=NOON - HOUR), PolicyRules(), NOON, None, id="send_at in the past"
            ),
            pytest.param(
                envelope(send_at=LATE),
                NIGHT_DEFER,
                NOON,
                (MORNING, DeferReason.QUIET_HOURS),
                id="send_at inside quiet hours waits for the opening",
            ),
            pytest.param(
                envelope(expires_at=MORNING - 1),
                NIGHT_DEFER,
                LATE,
                RejectReason.EXPIRED,
                id="deferral past expiry expires",
            ),
            pytest.param(
                envelope(expires_at=MORNING),
                NIGHT_DEFER,
                LATE,
                RejectReason.EXPIRED,
                id="deferral to the expiry instant expires",
            ),
            pytest.param(
                envelope(expires_at=MORNING + 1),
                NIGHT_DEFER,
                LATE,
                (MORNING, DeferReason.QUIET_HOURS),
                id="deferral within the TTL",
            ),
            pytest.param(
                envelope(send_at=NOON + HOUR, expires_at=NOON + HOUR),
                PolicyRules(),
                NOON,
                RejectReason.EXPIRED,
                id="send_at at expiry",
            ),
            pytest.param(
                envelope(),
                PolicyRules(quiet_hours=(QuietRule(NIGHT, QuietAction.DROP),)),
                LATE,
                RejectReason.QUIET_HOURS,
                id="drop rule",
            ),
            pytest.param(
                envelope(),
                PolicyRules(quiet_hours=(QuietRule(NIGHT, QuietAction.DROP),)),
                NOON,
                None,
                id="drop rule outside quiet hours",
            ),
        ],
    )
    def test_timing(
        self,
        env: Envelope,
        rules: PolicyRules,
        now: float,
        expected: tuple[float, DeferReason] | RejectReason | None,
    ) -> None:
        decision = run_decide(env, OPTED_IN, rules, now=now)
        plan, mask = env.channels, 0b1111
        if expected is None:
            assert Admit(plan, mask) == decision
        elif isinstance(expected, tuple):
            assert Defer(plan, mask, *expected) == decision
        else:
            assert expected == reason(decision)


class TestDecideCaps:
    """Caps reject, defer to the exact instant a slot frees, or skip one channel."""

    def test_deferring_cap_defers_to_the_exact_instant(self) -> None:
        recipient = RecipientState(OPTED_IN.consents, sent((NOON - 5 * HOUR + 0.1, "old", SMS)))
        rules = PolicyRules(caps=(DEFER_CAP,))
        decision = run_decide(envelope(), recipient, rules)
        until = NOON - 5 * HOUR + 0.1 + DAY
        assert Defer((PUSH, EMAIL, VIBER, SMS), 0b1111, until, DeferReason.CAPPED) == decision
        assert Go() == run_gate(envelope(), recipient, rules, now=until)

    def test_cap_then_quiet_hours(self) -> None:
        # the cap frees at 22:00, inside quiet hours: the send waits for 09:00
        recipient = RecipientState(
            OPTED_IN.consents, sent((moscow(2024, 3, 13, 22, 0), "old", SMS))
        )
        rules = PolicyRules(caps=(DEFER_CAP,), quiet_hours=(QuietRule(NIGHT),))
        decision = run_decide(envelope(), recipient, rules)
        assert (
            Defer((PUSH, EMAIL, VIBER, SMS), 0b1111, MORNING, DeferReason.QUIET_HOURS) == decision
        )

    def test_deferring_cap_past_expiry_expires(self) -> None:
        recipient = RecipientState(OPTED_IN.consents, sent((NOON - HOUR, "old", SMS)))
        rules = PolicyRules(caps=(DEFER_CAP,))
        decision = run_decide(envelope(expires_at=NOON + HOUR), recipient, rules)
        assert RejectReason.EXPIRED == reason(decision)

    def test_rejecting_message_wide_cap_rejects(self) -> None:
        recipient = RecipientState(OPTED_IN.consents, sent((NOON - HOUR, "old", SMS)))
        decision = run_decide(envelope(), recipient, PolicyRules(caps=(REJECT_CAP,)))
        assert RejectReason.CAPPED == reason(decision)

    def test_rejecting_per_channel_cap_on_the_first_channel_admits(self) -> None:
        recipient = RecipientState(OPTED_IN.consents, sent((NOON - HOUR, "old", EMAIL)))
        rules = PolicyRules(caps=(EMAIL_REJECT_CAP,))
        env = envelope(channels=(EMAIL, SMS))
        assert Admit((EMAIL, SMS), 0b1111) == run_decide(env, recipient, rules)
        assert Skip(RejectReason.CAPPED) == run_gate(env, recipient, rules, channel=EMAIL)
        assert Go() == run_gate(env, recipient, rules, channel=SMS)

    def test_full_message_wide_cap_beats_a_full_per_channel_cap(self) -> None:
        # the per-channel rule frees up later, but the message-wide one still refuses the message
        recipient = RecipientState(OPTED_IN.consents, sent((NOON - HOUR, "old", EMAIL)))
        long_email = CapRule("email-weekly", 1, 7 * DAY, channels=frozenset({EMAIL}))
        rules = PolicyRules(caps=(long_email, REJECT_CAP))
        env = envelope(channels=(EMAIL, SMS))
        assert RejectReason.CAPPED == reason(run_decide(env, recipient, rules))
        assert Stop(RejectReason.CAPPED) == run_gate(env, recipient, rules, channel=EMAIL)

    def test_service_is_never_capped(self) -> None:
        recipient = RecipientState(OPTED_IN.consents, sent((NOON - HOUR, "old", SMS)))
        rules = PolicyRules(caps=(REJECT_CAP, DEFER_CAP))
        assert Admit((PUSH, EMAIL, VIBER, SMS), 0b1111) == run_decide(
            envelope(SERVICE), recipient, rules
        )

    def test_later_step_of_the_same_message_is_not_capped(self) -> None:
        recipient = RecipientState(OPTED_IN.consents, sent((NOON - HOUR, MESSAGE, PUSH)))
        rules = PolicyRules(caps=(REJECT_CAP,))
        assert Go() == run_gate(envelope(), recipient, rules, channel=EMAIL)

    @settings(max_examples=50, deadline=None)
    @example(rules_count=_MAX_HOLD_ROUNDS + 4, step_seconds=3600)  # longer than decide follows
    @given(rules_count=st.integers(1, 2 * _MAX_HOLD_ROUNDS), step_seconds=st.integers(1, 6 * 3600))
    def test_a_chain_of_caps_is_followed_then_left_to_the_gate(
        self, rules_count: int, step_seconds: int
    ) -> None:
        """Holds chain: each cap frees exactly when the next one fills. ``caps.check`` asks
        every deferring rule at once, so ``decide`` lands on the opening in one hold however
        long the chain (a chain of holds it stops following is left to the gate, which holds
        on to the same opening: the first step never goes out before every cap allows it).

        The message went out on push an hour ago and "other" ``step`` later. Rule ``i`` has one
        slot and looks back ``DAY + i * step``: the later step of the same message passes it
        while the message is inside its window; then "other" fills it until "other" leaves,
        the very instant the message leaves rule ``i + 1``. (Whole seconds keep that exact.)
        """
        step = float(step_seconds)
        sent_at = NOON - HOUR
        rules = PolicyRules(
            caps=tuple(
                CapRule(f"r{i}", 1, DAY + i * step, action=CapAction.DEFER)
                for i in range(rules_count)
            )
        )
        recipient = RecipientState(
            OPTED_IN.consents, sent((sent_at, MESSAGE, PUSH), (sent_at + step, "other", PUSH))
        )
        env = envelope(send_at=sent_at + DAY)  # when the message leaves the first rule's window
        opening = sent_at + step + rules.caps[-1].window_seconds  # "other" leaves the last one

        decision = run_decide(env, recipient, rules)

        assert isinstance(decision, Defer)
        assert DeferReason.CAPPED is decision.why
        assert (PUSH, EMAIL, VIBER, SMS) == decision.channels
        assert NOON < decision.until <= opening
        if rules_count < _MAX_HOLD_ROUNDS:
            assert opening == decision.until
        # the edge's re-check: hold after hold, to the same opening and never past it
        at, hops = decision.until, 0
        while isinstance(verdict := run_gate(env, recipient, rules, now=at), Hold):
            assert DeferReason.CAPPED is verdict.why
            assert at < verdict.until <= opening
            at, hops = verdict.until, hops + 1
        assert Go() == verdict
        assert opening == at
        event("decide found the opening" if hops == 0 else "the gate held on past decide")


class TestDecideSkips:
    """A channel ruled out on arrival is skipped, and the rest of the plan goes (issue #15)."""

    PUSH_DROP = PolicyRules(quiet_hours=(QuietRule(NIGHT, QuietAction.DROP, frozenset({PUSH})),))

    def test_a_push_only_drop_rule_admits_a_push_email_promo_at_night(self) -> None:
        env = envelope(channels=(PUSH, EMAIL))
        assert Admit((PUSH, EMAIL), 0b1111) == run_decide(env, rules=self.PUSH_DROP, now=LATE)
        # the cascade starts on push; the pre-send check skips it and email goes
        assert Skip(RejectReason.QUIET_HOURS) == run_gate(env, rules=self.PUSH_DROP, now=LATE)
        assert Go() == run_gate(env, rules=self.PUSH_DROP, channel=EMAIL, now=LATE)

    def test_every_channel_dropped_is_refused_with_the_reason(self) -> None:
        decision = run_decide(envelope(channels=(PUSH,)), rules=self.PUSH_DROP, now=LATE)
        assert Reject(RejectReason.QUIET_HOURS, "quiet hours drop promo messages on push") == (
            decision
        )

    def test_the_next_channel_may_be_deferred(self) -> None:
        # push dropped at night, email deferred to the morning: at 09:00 push is open again,
        # so the message waits for the morning and starts on push, as the cascade will
        rules = PolicyRules(
            quiet_hours=(
                QuietRule(NIGHT, QuietAction.DROP, frozenset({PUSH})),
                QuietRule(NIGHT),
            )
        )
        env = envelope(channels=(PUSH, EMAIL))
        assert Defer((PUSH, EMAIL), 0b1111, MORNING, DeferReason.QUIET_HOURS) == run_decide(
            env, rules=rules, now=LATE
        )

    def test_a_dropped_channel_that_opens_first_ends_the_wait(self) -> None:
        """Email dropped until 00:30, push deferred to 09:00: at 00:30 email may go, so the
        message waits for 00:30, not for push's morning (the earliest instant the cascade's
        first step can go; Hypothesis found the longer wait)."""
        half_past_midnight = moscow(2024, 3, 15, 0, 30)
        rules = PolicyRules(
            quiet_hours=(
                QuietRule(NIGHT, channels=frozenset({PUSH})),
                QuietRule(QuietWindow(time(23), time(0, 30)), QuietAction.DROP),
            )
        )
        env = envelope(channels=(EMAIL, PUSH))
        decision = run_decide(env, rules=rules, now=moscow(2024, 3, 14, 23, 30))
        assert Defer((EMAIL, PUSH), 0b1111, half_past_midnight, DeferReason.QUIET_HOURS) == (
            decision
        )
        assert Go() == run_gate(env, rules=rules, channel=EMAIL, now=half_past_midnight)

    def test_every_channel_capped_is_refused_capped(self) -> None:
        recipient = RecipientState(OPTED_IN.consents, sent((NOON - HOUR, "old", EMAIL)))
        rules = PolicyRules(caps=(EMAIL_REJECT_CAP,))
        decision = run_decide(envelope(channels=(EMAIL,)), recipient, rules)
        assert (
            Reject(RejectReason.CAPPED, "a frequency cap for this recipient is full on email")
            == decision
        )


ARTICLE_WINDOWS = send_windows([(time(9), time(11)), (time(15), time(17)), (time(20), time(22))])
EVENING = send_windows([(time(20), time(22))])
PROMO_WINDOWS = PolicyRules(send_windows=(WindowRule(ARTICLE_WINDOWS, frozenset({PROMO})),))


def in_window(windows: SendWindows, at: float, tz: tzinfo = MOSCOW) -> bool:
    wall = datetime.fromtimestamp(at, tz).time()
    return any(span.contains(wall) for span in windows.spans)


class TestSendWindows:
    """Outside its windows a message waits for the next window start (issue #15, item 2)."""

    def test_outside_the_windows_waits_for_the_next_start(self) -> None:
        # noon in Moscow: the next window opens at 15:00
        decision = run_decide(envelope(), rules=PROMO_WINDOWS)
        until = moscow(2024, 3, 14, 15)
        assert Defer(DEFAULT_CASCADE, 0b1111, until, DeferReason.SEND_WINDOW) == decision
        assert Go() == run_gate(envelope(), rules=PROMO_WINDOWS, now=until)

    def test_inside_a_window_goes_now(self) -> None:
        at = moscow(2024, 3, 14, 10)
        assert Admit(DEFAULT_CASCADE, 0b1111) == run_decide(envelope(), rules=PROMO_WINDOWS, now=at)

    def test_service_ignores_windows(self) -> None:
        rules = PolicyRules(send_windows=(WindowRule(ARTICLE_WINDOWS),))
        assert Admit(DEFAULT_CASCADE, 0b1111) == run_decide(envelope(SERVICE), rules=rules)

    def test_other_categories_ignore_a_promo_window(self) -> None:
        env = envelope(Category.CONTENT)
        assert Admit(DEFAULT_CASCADE, 0b1111) == run_decide(env, rules=PROMO_WINDOWS)

    def test_a_variant_window_replaces_the_categorys(self) -> None:
        rules = msgspec.structs.replace(PROMO_WINDOWS, variant_windows=(("exp/late", EVENING),))
        env = msgspec.structs.replace(envelope(), variant="exp/late")
        at = moscow(2024, 3, 14, 10)  # inside the category's window, not the variant's
        decision = run_decide(env, rules=rules, now=at)
        assert Defer(DEFAULT_CASCADE, 0b1111, moscow(2024, 3, 14, 20), DeferReason.SEND_WINDOW) == (
            decision
        )
        # a variant without a window of its own keeps the category's
        other = msgspec.structs.replace(envelope(), variant="exp/plain")
        assert Admit(DEFAULT_CASCADE, 0b1111) == run_decide(other, rules=rules, now=at)

    def test_a_window_start_in_quiet_hours_waits_for_the_morning(self) -> None:
        # the evening window 20:00-22:00 starts inside quiet hours from 19:00: nothing of it
        # is allowed, so the message goes at 09:00 the next morning (the morning window)
        rules = PolicyRules(
            quiet_hours=(QuietRule(QuietWindow(time(19), time(9))),),
            send_windows=(WindowRule(ARTICLE_WINDOWS),),
        )
        decision = run_decide(envelope(), rules=rules, now=moscow(2024, 3, 14, 18))
        assert isinstance(decision, Defer)
        assert moscow(2024, 3, 15, 9) == decision.until

    def test_a_window_start_over_a_cap_moves_on(self) -> None:
        # the cap frees up at 16:00, inside the 15-17 window
        recipient = RecipientState(OPTED_IN.consents, sent((moscow(2024, 3, 13, 16), "old", SMS)))
        rules = msgspec.structs.replace(PROMO_WINDOWS, caps=(DEFER_CAP,))
        decision = run_decide(envelope(), recipient, rules)
        assert Defer(DEFAULT_CASCADE, 0b1111, moscow(2024, 3, 14, 16), DeferReason.CAPPED) == (
            decision
        )

    def test_a_window_wholly_in_quiet_hours_never_sends(self) -> None:
        """The config refuses such windows; the core still never sends into quiet hours: its
        holds alternate until ``decide`` stops following them and defers, and the gate at the
        deferral holds again."""
        rules = PolicyRules(
            quiet_hours=(QuietRule(NIGHT),),
            send_windows=(WindowRule(send_windows([(time(22), time(23))])),),
        )
        decision = run_decide(envelope(), rules=rules)
        assert isinstance(decision, Defer)
        assert isinstance(run_gate(envelope(), rules=rules, now=decision.until), Hold)

    def test_a_window_past_expiry_expires(self) -> None:
        decision = run_decide(envelope(expires_at=NOON + HOUR), rules=PROMO_WINDOWS)
        assert RejectReason.EXPIRED == reason(decision)

    @settings(max_examples=300, deadline=None)
    @given(
        spans=st.lists(
            st.tuples(st.integers(0, 47), st.integers(1, 12))
            .map(lambda p: (time(p[0] // 2, 30 * (p[0] % 2)), time((p[0] // 2 + p[1]) % 24)))
            .filter(lambda pair: pair[0] != pair[1]),
            min_size=1,
            max_size=3,
        ),
        quiet=st.sampled_from([None, NIGHT, QuietWindow(time(23), time(7))]),
        cap_windows=st.lists(st.sampled_from([HOUR, 6 * HOUR, DAY]), max_size=2),
        made=st.lists(st.integers(1, 48).map(lambda h: NOON - h * HOUR / 2), max_size=4),
        planned=st.lists(st.integers(0, 96).map(lambda h: NOON + h * HOUR / 2), max_size=3),
        hours=st.integers(0, 47),
        tz=st.sampled_from([MOSCOW, ZoneInfo("America/New_York"), ZoneInfo("Australia/Lord_Howe")]),
    )
    def test_nothing_goes_outside_its_window_in_quiet_hours_or_over_a_cap(
        self,
        spans: list[tuple[time, time]],
        quiet: QuietWindow | None,
        cap_windows: list[float],
        made: list[float],
        planned: list[float],
        hours: int,
        tz: tzinfo,
    ) -> None:
        """Where ``decide`` lets the first step go (now or at the deferral), the recipient's
        clock is inside a window and outside quiet hours, and every cap has room."""
        windows = send_windows(spans)
        # a window wholly inside quiet hours can never be used (the config refuses that)
        minutes = [time(m // 60, m % 60) for m in range(0, 24 * 60, 30)]
        assume(
            any(
                in_span and (quiet is None or not quiet.contains(m))
                for m in minutes
                for in_span in [any(span.contains(m) for span in windows.spans)]
            )
        )
        rules = PolicyRules(
            caps=tuple(
                CapRule(f"c{i}", 1 + i, w, action=CapAction.DEFER)
                for i, w in enumerate(cap_windows)
            ),
            quiet_hours=(QuietRule(quiet),) if quiet is not None else (),
            send_windows=(WindowRule(windows),),
        )
        history = CapHistory.of(
            SendEntry(at, f"made{i}", PROMO, SMS) for i, at in enumerate(sorted(made))
        ).with_planned(SendEntry(at, f"planned{i}", PROMO, PUSH) for i, at in enumerate(planned))
        recipient = RecipientState(OPTED_IN.consents, history)
        now = NOON + hours * HOUR / 2
        decision = run_decide(envelope(), recipient, rules, now=now, tz=tz)
        if isinstance(decision, Reject):
            raise AssertionError(decision)
        at = decision.until if isinstance(decision, Defer) else now
        assert Go() == run_gate(envelope(), recipient, rules, now=at, tz=tz)
        assert in_window(windows, at, tz)
        if quiet is not None:
            assert not quiet_hours.is_quiet(quiet, at, tz)
        assert None is caps.check(
            history, rules.caps, message=MESSAGE, category=PROMO, channel=PUSH, now=at
        )
        event(type(decision).__name__ + (f" {decision.why}" if isinstance(decision, Defer) else ""))


class TestDecideCapProperties:
    """Deferring and rejecting caps together, over sends made and sends planned (issue #15)."""

    @settings(max_examples=300, deadline=None)
    @given(
        rules=st.lists(
            st.builds(
                CapRule,
                name=st.sampled_from(["a", "b", "c"]),
                max_count=st.integers(1, 3),
                window_seconds=st.sampled_from([HOUR, 6 * HOUR, DAY, 3 * DAY, 7 * DAY]),
                action=st.sampled_from(CapAction),
            ),
            min_size=1,
            max_size=3,
        ),
        made=st.lists(st.integers(1, 7 * 24).map(lambda h: NOON - h * HOUR), max_size=6),
        planned=st.lists(st.integers(0, 10 * 24).map(lambda h: NOON + h * HOUR), max_size=4),
        quiet=st.booleans(),
    )
    def test_no_deferral_lands_over_any_cap(
        self, rules: list[CapRule], made: list[float], planned: list[float], quiet: bool
    ) -> None:
        """A deferred message goes where every cap, rejecting ones included, lets it through
        (and outside quiet hours); an admitted one fits every cap now."""
        history = CapHistory.of(
            SendEntry(at, f"made{i}", PROMO, SMS) for i, at in enumerate(sorted(made))
        ).with_planned(SendEntry(at, f"planned{i}", PROMO, PUSH) for i, at in enumerate(planned))
        recipient = RecipientState(OPTED_IN.consents, history)
        policy = PolicyRules(caps=tuple(rules), quiet_hours=(QuietRule(NIGHT),) if quiet else ())
        decision = run_decide(envelope(), recipient, policy)
        at = decision.until if isinstance(decision, Defer) else NOON
        if isinstance(decision, Reject):
            assert RejectReason.CAPPED == decision.reason
            event("capped at once")
            return
        fits = caps.check(
            history, policy.caps, message=MESSAGE, category=PROMO, channel=PUSH, now=at
        )
        assert None is fits
        if quiet:
            assert not quiet_hours.is_quiet(NIGHT, at, MOSCOW)
        assert Go() == run_gate(envelope(), recipient, policy, now=at)
        event("deferred" if isinstance(decision, Defer) else "admitted")


class TestGate:
    """``gate`` re-checks one step: Go, Hold, Skip this channel, or Stop the message."""

    @pytest.mark.parametrize(
        ("env", "recipient", "rules", "channel", "now", "expected"),
        [
            pytest.param(envelope(), OPTED_IN, PolicyRules(), PUSH, NOON, Go(), id="go"),
            pytest.param(
                envelope(expires_at=NOON),
                OPTED_IN,
                PolicyRules(),
                PUSH,
                NOON,
                Stop(RejectReason.EXPIRED),
                id="expired",
            ),
            pytest.param(
                envelope(SERVICE),
                RecipientState(consents=consents(PD_GRANT, PD_WITHDRAW)),
                PolicyRules(),
                PUSH,
                NOON,
                Stop(RejectReason.NO_CONSENT),
                id="personal data withdrawn",
            ),
            pytest.param(
                envelope(),
                RecipientState(consents=consents(PD_GRANT, AD_GRANT, ad_withdraw(PUSH))),
                PolicyRules(),
                PUSH,
                NOON,
                Stop(RejectReason.NO_CONSENT),
                id="advertising withdrawn on this channel",
            ),
            pytest.param(
                envelope(),
                RecipientState(consents=consents(PD_GRANT, AD_GRANT, ad_withdraw(PUSH))),
                PolicyRules(),
                EMAIL,
                NOON,
                Go(),
                id="advertising withdrawn on another channel",
            ),
            pytest.param(
                envelope(SERVICE),
                RecipientState(consents=consents(PD_GRANT, ad_withdraw())),
                PolicyRules(),
                PUSH,
                NOON,
                Go(),
                id="service ignores advertising consent",
            ),
            pytest.param(
                envelope(),
                RecipientState(OPTED_IN.consents, sent((NOON - HOUR, "old", SMS))),
                PolicyRules(caps=(REJECT_CAP,)),
                PUSH,
                NOON,
                Stop(RejectReason.CAPPED),
                id="message-wide cap",
            ),
            pytest.param(
                envelope(),
                RecipientState(OPTED_IN.consents, sent((NOON - HOUR, "old", EMAIL))),
                PolicyRules(caps=(EMAIL_REJECT_CAP,)),
                EMAIL,
                NOON,
                Skip(RejectReason.CAPPED),
                id="per-channel cap",
            ),
            pytest.param(
                envelope(),
                RecipientState(OPTED_IN.consents, sent((NOON - HOUR, "old", SMS))),
                PolicyRules(caps=(DEFER_CAP,)),
                PUSH,
                NOON,
                Hold(NOON - HOUR + DAY, DeferReason.CAPPED),
                id="deferring cap",
            ),
            pytest.param(
                envelope(expires_at=NOON + HOUR),
                RecipientState(OPTED_IN.consents, sent((NOON - HOUR, "old", SMS))),
                PolicyRules(caps=(DEFER_CAP,)),
                PUSH,
                NOON,
                Stop(RejectReason.EXPIRED),
                id="deferring cap past expiry",
            ),
            pytest.param(
                envelope(),
                OPTED_IN,
                NIGHT_DEFER,
                PUSH,
                LATE,
                Hold(MORNING, DeferReason.QUIET_HOURS),
                id="quiet hours",
            ),
            pytest.param(
                envelope(expires_at=MORNING),
                OPTED_IN,
                NIGHT_DEFER,
                PUSH,
                LATE,
                Stop(RejectReason.EXPIRED),
                id="quiet hours past expiry",
            ),
            pytest.param(
                envelope(),
                OPTED_IN,
                PolicyRules(
                    quiet_hours=(QuietRule(NIGHT, QuietAction.DROP, channels=frozenset({SMS})),)
                ),
                SMS,
                LATE,
                Skip(RejectReason.QUIET_HOURS),
                id="drop rule skips the channel",
            ),
            pytest.param(
                envelope(),
                OPTED_IN,
                PolicyRules(
                    quiet_hours=(QuietRule(NIGHT, QuietAction.DROP, channels=frozenset({SMS})),)
                ),
                EMAIL,
                LATE,
                Go(),
                id="drop rule for another channel",
            ),
        ],
    )
    def test_verdicts(
        self,
        env: Envelope,
        recipient: RecipientState,
        rules: PolicyRules,
        channel: Channel,
        now: float,
        expected: Verdict,
    ) -> None:
        assert expected == run_gate(env, recipient, rules, channel=channel, now=now)


class TestPolicyRules:
    """Rules pick the first quiet rule that covers a channel and category."""

    def test_quiet_rule_lookup(self) -> None:
        sms_only = QuietRule(NIGHT, QuietAction.DROP, channels=frozenset({SMS}))
        catch_all = QuietRule(NIGHT)
        rules = PolicyRules(quiet_hours=(sms_only, catch_all))
        assert sms_only is rules.quiet_rule(SMS, PROMO)
        assert catch_all is rules.quiet_rule(EMAIL, PROMO)
        assert None is PolicyRules().quiet_rule(EMAIL, PROMO)


class TestModel:
    """Keys, channel masks and the envelope: the vocabulary the policy speaks."""

    @pytest.mark.parametrize(
        ("tenant", "ident"), [("shop", "m1"), ("shop", "order:42:confirm"), ("a", "")]
    )
    def test_keys_split_back(self, tenant: str, ident: str) -> None:
        assert f"{tenant}:{ident}" == message_key(tenant, ident)
        assert (tenant, ident) == split_key(message_key(tenant, ident))
        assert (tenant, ident) == split_key(recipient_key(tenant, ident))

    def test_channels_are_declared_cheapest_first(self) -> None:
        assert (PUSH, EMAIL, VIBER, SMS) == ALL_CHANNELS == DEFAULT_CASCADE
        assert [1, 2, 4, 8] == [channel.bit for channel in ALL_CHANNELS]
        assert 0b1111 == ALL_CHANNELS_MASK

    @pytest.mark.parametrize(
        ("channel", "expected"), [(PUSH, True), (EMAIL, True), (VIBER, True), (SMS, False)]
    )
    def test_read_signal(self, channel: Channel, expected: bool) -> None:
        assert expected == channel.has_read_signal

    @pytest.mark.parametrize(
        ("channel", "expected"), [(PUSH, False), (EMAIL, True), (VIBER, True), (SMS, True)]
    )
    def test_delivery_reports(self, channel: Channel, expected: bool) -> None:
        # FCM never confirms delivery: push's delivery rate must not be read as zero
        assert expected == channel.reports_delivery

    @pytest.mark.parametrize(
        ("category", "expected"),
        [
            (SERVICE, False),
            (Category.INFORMATIONAL, True),
            (Category.CONTENT, True),
            (PROMO, True),
        ],
    )
    def test_only_service_is_not_marketing(self, category: Category, expected: bool) -> None:
        assert expected == category.is_marketing

    def test_lanes_by_priority(self) -> None:
        assert (Lane.CRITICAL, Lane.NORMAL, Lane.BULK) == LANES_BY_PRIORITY

    def test_envelope_round_trips_through_msgpack(self) -> None:
        env = envelope(send_at=NOON + 0.5, expires_at=NOON + DAY)
        assert env == msgspec.msgpack.decode(msgspec.msgpack.encode(env), type=Envelope)


class TestErrors:
    """Provider errors say whether retrying can help."""

    @pytest.mark.parametrize(
        ("error", "permanent", "kind", "base"),
        [
            (ProviderTimeout("slow", provider="fcm"), False, "timeout", TransientProviderError),
            (
                ProviderUnavailable("503", provider="fcm", status_code=503),
                False,
                "unavailable",
                TransientProviderError,
            ),
            (
                RateLimited("429", provider="twilio", retry_after_seconds=3.0),
                False,
                "rate_limited",
                TransientProviderError,
            ),
            (
                InvalidRecipient("bad number", provider="twilio"),
                True,
                "invalid_recipient",
                PermanentProviderError,
            ),
            (
                InvalidRequest("bad body", provider="sendgrid"),
                True,
                "invalid_request",
                PermanentProviderError,
            ),
            (
                AuthRejected("401", provider="viber", status_code=401),
                True,
                "auth_rejected",
                PermanentProviderError,
            ),
        ],
    )
    def test_classification(
        self, error: ProviderError, permanent: bool, kind: str, base: type[ProviderError]
    ) -> None:
        assert (permanent, kind) == (error.permanent, error.kind)
        assert isinstance(error, base)
        assert isinstance(error, GatewayError)

    def test_attributes(self) -> None:
        error = RateLimited(
            "429", provider="twilio", status_code=429, code="20429", retry_after_seconds=3.0
        )
        assert ("twilio", 429, "20429", 3.0) == (
            error.provider,
            error.status_code,
            error.code,
            error.retry_after_seconds,
        )
        assert "429" == str(error)

    def test_config_error_is_a_gateway_error(self) -> None:
        assert issubclass(ConfigError, GatewayError)
        assert not issubclass(ConfigError, ProviderError)


# ---------------------------------------------------------------- properties
ZONES = tuple(
    ZoneInfo(key) for key in ("Europe/Moscow", "America/New_York", "Australia/Lord_Howe", "UTC")
)
START = datetime(2024, 1, 1, tzinfo=UTC).timestamp()
TOPICS = ("promo", "news")

instants = st.integers(int(START), int(START) + 366 * int(DAY)).map(float) | st.floats(
    min_value=START, max_value=START + 366 * DAY
)
consent_records = st.builds(
    ConsentRecord,
    kind=st.sampled_from(ConsentKind),
    action=st.sampled_from(ConsentAction),
    at=st.integers(0, 5).map(float),
    source=st.just("crm"),
    channel=st.none() | st.sampled_from(Channel),
    topic=st.none() | st.sampled_from(TOPICS),
).map(
    lambda r: (
        msgspec.structs.replace(r, channel=None, topic=None)
        if r.kind is ConsentKind.PERSONAL_DATA
        else r
    )
)
quiet_windows = st.builds(
    QuietWindow,
    start=st.builds(time, st.integers(0, 23), st.sampled_from([0, 30])),
    end=st.builds(time, st.integers(0, 23), st.sampled_from([15, 45])),  # never equal to start
) | st.just(QuietWindow(time(21), time(9)))
# filters are empty half the time: narrow rules alone would rarely apply
channel_filters = st.just(frozenset[Channel]()) | st.frozensets(
    st.sampled_from(Channel), max_size=2
)
category_filters = st.just(frozenset[Category]()) | st.frozensets(
    st.sampled_from(Category), max_size=2
)
quiet_rules = st.builds(
    QuietRule,
    window=quiet_windows,
    action=st.sampled_from(QuietAction),
    channels=channel_filters,
    categories=category_filters,
)
cap_rules = st.builds(
    CapRule,
    name=st.just("cap"),
    max_count=st.integers(1, 2),
    window_seconds=st.sampled_from([HOUR, 6 * HOUR, DAY, 7 * DAY]),
    categories=category_filters,
    channels=channel_filters,
    action=st.sampled_from(CapAction),
)
policy_rules = st.builds(
    PolicyRules,
    consent_defaults=st.builds(
        ConsentDefaults,
        personal_data=st.sampled_from([True, True, True, True, True, False]),
        advertising=st.booleans(),
    ),
    control_group=st.sampled_from([0.0, 0.0, 0.0, 0.0, 0.0, 30.0, 100.0]).map(
        lambda p: ControlGroup(percent=p)
    ),
    caps=st.lists(cap_rules, max_size=3).map(tuple),
    quiet_hours=st.lists(quiet_rules, max_size=2).map(tuple),
    critical_service_bypasses_quiet_hours=st.booleans(),
)
ahead = st.floats(min_value=1.0, max_value=3 * DAY) | st.sampled_from([HOUR, DAY])
behind = st.floats(min_value=0.0, max_value=DAY)


def timing_rules(draw: st.DrawFn, first: Channel) -> PolicyRules:
    """Rules for a message that passes every refusal: only caps and quiet hours remain.

    Caps lean to deferring, and some are narrowed to the message's first channel.
    """
    deferring = cap_rules.map(lambda rule: msgspec.structs.replace(rule, action=CapAction.DEFER))
    on_first = cap_rules.map(
        lambda rule: msgspec.structs.replace(rule, channels=frozenset({first}))
    )
    return PolicyRules(
        consent_defaults=ConsentDefaults(personal_data=True, advertising=False),
        caps=tuple(draw(st.lists(deferring | on_first | cap_rules, min_size=1, max_size=3))),
        quiet_hours=tuple(draw(st.lists(quiet_rules, min_size=1, max_size=2))),
        critical_service_bypasses_quiet_hours=draw(st.booleans()),
    )


@st.composite
def situations(
    draw: st.DrawFn, *, focused: bool = False
) -> tuple[Envelope, RecipientState, PolicyRules, float, tzinfo]:
    """A message arriving for a recipient with some consents and history, under some rules.

    ``focused`` draws a consenting recipient with an address under caps and quiet hours, so
    the timing rules are exercised as often as the refusals.
    """
    now = draw(instants)
    send_at = draw(st.none() | ahead.map(lambda d: now + d) | behind.map(lambda d: now - d))
    # mostly a TTL in the future: expired messages are refused before anything interesting
    expires_at = draw(
        st.sampled_from(["none"] * (6 if focused else 2) + ["ahead", "ahead", "behind"]).flatmap(
            lambda kind: (
                st.none()
                if kind == "none"
                else ahead.map(lambda d: now + d)
                if kind == "ahead"
                else behind.map(lambda d: now - d)
            )
        )
    )
    env = Envelope(
        tenant="shop",
        recipient_id=draw(st.sampled_from(["r1", "r2", "r3", "r4"])),
        category=draw(st.sampled_from(Category)),
        topic=draw(st.sampled_from(TOPICS)),
        lane=draw(st.sampled_from(Lane)),
        channels=tuple(
            draw(
                st.lists(
                    st.sampled_from(Channel),
                    unique=True,
                    min_size=1 if focused else draw(st.sampled_from([0, 1, 1, 1])),
                    max_size=4,
                )
            )
        ),
        send_at=send_at,
        expires_at=expires_at,
    )
    # usually a customer who once agreed to everything, then changed their mind here and there
    records = draw(st.sampled_from([[], [PD_GRANT], [PD_GRANT, AD_GRANT], [PD_GRANT, AD_GRANT]]))
    records = records + draw(st.lists(consent_records, max_size=4))
    if focused:
        records = [PD_GRANT, AD_GRANT]
    entries = sorted(
        draw(
            st.lists(
                st.builds(
                    SendEntry,
                    at=st.floats(min_value=0.0, max_value=DAY).map(lambda d: now - d),
                    message=st.sampled_from(["a", "b", "c", MESSAGE]),
                    category=st.sampled_from(Category),
                    channel=st.sampled_from(env.channels or ALL_CHANNELS)
                    | st.sampled_from(Channel),
                ),
                max_size=5,
            )
        ),
        key=lambda entry: entry.at,
    )
    rules = timing_rules(draw, env.channels[0]) if focused else draw(policy_rules)
    # the history the gateway would have recorded under these caps: only sends that fitted
    history = CapHistory()
    recorded: list[SendEntry] = []
    for entry in entries:
        fits = caps.check(
            history,
            rules.caps,
            message=entry.message,
            category=entry.category,
            channel=entry.channel,
            now=entry.at,
        )
        if fits is None:
            recorded.append(entry)
            history = CapHistory.of(recorded)
    recipient = RecipientState(consents(*records), history)
    return env, recipient, rules, now, draw(st.sampled_from(ZONES))


Situation = tuple[Envelope, RecipientState, PolicyRules, float, tzinfo]


def allowed_now(
    recipient: RecipientState, rules: PolicyRules, env: Envelope, channel: Channel
) -> bool:
    defaults = rules.consent_defaults
    if not recipient.consents.personal_data(defaults):
        return False
    return not env.category.is_marketing or recipient.consents.advertising(
        channel, env.topic, defaults
    )


class TestPolicyProperties:
    """Whatever the inputs, the hard rules hold."""

    @settings(max_examples=300, deadline=None)
    @given(situation=situations() | situations(focused=True))
    def test_decide_respects_every_rule(self, situation: Situation) -> None:
        env, recipient, rules, now, tz = situation
        decision = decide(env, recipient, rules, message=MESSAGE, now=now, tz=tz)
        detail = decision.reason if isinstance(decision, Reject) else getattr(decision, "why", "")
        event(f"{type(decision).__name__} {detail}")
        marketing = env.category.is_marketing
        expired = env.expires_at is not None and env.expires_at <= now

        # same inputs, same decision, also after a trip through the wire format
        copy = msgspec.msgpack.decode(msgspec.msgpack.encode(env), type=Envelope)
        assert decision == decide(copy, recipient, rules, message=MESSAGE, now=now, tz=tz)

        if expired:
            assert RejectReason.EXPIRED == reason(decision)
            return
        if not env.channels:
            assert RejectReason.NO_CHANNEL == reason(decision)
            return
        if not recipient.consents.personal_data(rules.consent_defaults):
            assert RejectReason.NO_CONSENT == reason(decision)
            return
        held_out = marketing and rules.control_group.holds_out(
            env.tenant, env.recipient_id, now=now
        )
        assert held_out == (RejectReason.HOLDOUT == reason(decision))

        if not marketing:
            assert reason(decision) != RejectReason.CAPPED
            assert not (isinstance(decision, Defer) and decision.why is DeferReason.CAPPED)
        start = now if env.send_at is None else max(now, env.send_at)
        usable = [c for c in env.channels if allowed_now(recipient, rules, env, c)]
        if RejectReason.CAPPED == reason(decision):
            # a full message-wide rejecting rule, or per-channel ones on every channel left;
            # rules only free up as time passes, so one is already full when the message came
            assert any(
                caps.check(
                    recipient.history,
                    rules.caps,
                    message=MESSAGE,
                    category=env.category,
                    channel=channel,
                    now=start,
                )
                is not None
                for channel in usable
            )
            event("a cap refused the message")
        if RejectReason.QUIET_HOURS == reason(decision):
            # every channel was skipped, the last one by a dropping quiet rule
            dropping = [rules.quiet_rule(c, env.category) for c in usable]
            assert any(r is not None and QuietAction.DROP is r.action for r in dropping)
        if isinstance(decision, Reject):
            return

        # a channel without consent is never planned
        assert decision.plan == env.channels
        for channel in ALL_CHANNELS:
            if channel in decision.channels:
                assert allowed_now(recipient, rules, env, channel)
            elif channel in env.channels:
                assert not allowed_now(recipient, rules, env, channel)
        first = decision.channels[0]
        quiet = rules.quiet_rule(first, env.category)
        bypass = (
            rules.critical_service_bypasses_quiet_hours
            and env.lane is Lane.CRITICAL
            and env.category is SERVICE
        )

        def walk(at: float) -> Verdict | None:
            """The cascade's first step at ``at``: skipped channels pass to the next one."""
            for channel in decision.channels:
                verdict = gate(
                    env, recipient, rules, message=MESSAGE, channel=channel, now=at, tz=tz
                )
                if not isinstance(verdict, Skip):
                    return verdict
            return None

        if isinstance(decision, Admit):
            assert start == now
            assert Go() == walk(now)
            passing = gate(env, recipient, rules, message=MESSAGE, channel=first, now=now, tz=tz)
            assert passing in (Go(), Skip(RejectReason.CAPPED), Skip(RejectReason.QUIET_HOURS))
            # a first step that goes now goes outside quiet hours, unless a rule lets it through
            # (one a per-channel cap skips is re-gated on the next channel by the cascade)
            quiet_now = quiet is not None and quiet_hours.is_quiet(quiet.window, now, tz)
            if passing == Go() and quiet_now and not bypass:
                assert quiet is not None
                assert QuietAction.BYPASS is quiet.action
            return
        # a deferral: later than now and send_at, inside the TTL, and the re-check then passes
        assert decision.until > now
        assert decision.until >= start
        if env.expires_at is not None:
            assert decision.until < env.expires_at
        assert Go() == walk(decision.until)
        # and no earlier instant would have passed
        if decision.until > start:
            for i in range(12):
                sample = start + (decision.until - start) * i / 12
                early = walk(sample)
                assert Go() != early, (sample, early)
        first = next(
            c
            for c in decision.channels
            if not isinstance(
                gate(env, recipient, rules, message=MESSAGE, channel=c, now=decision.until, tz=tz),
                Skip,
            )
        )
        quiet = rules.quiet_rule(first, env.category)
        # the reason names what the send waited for last, and the wait ends exactly then
        just_before = math.nextafter(decision.until, -math.inf)
        if decision.why is DeferReason.SEND_AT:
            assert env.send_at == decision.until
        elif decision.why is DeferReason.CAPPED:

            def capped(at: float) -> bool:
                verdict = caps.check(
                    recipient.history,
                    rules.caps,
                    message=MESSAGE,
                    category=env.category,
                    channel=first,
                    now=at,
                )
                return verdict is not None

            assert not capped(decision.until)
            assert capped(just_before)
        else:
            # quiet hours held it, and the send lands where a quiet window of one of its
            # channels opens: a deferring rule's, or a dropping one's (that channel goes then)
            assert not bypass
            opening = [
                rule
                for channel in decision.channels
                if (rule := rules.quiet_rule(channel, env.category)) is not None
                and rule.action is not QuietAction.BYPASS
                and not quiet_hours.is_quiet(rule.window, decision.until, tz)
                and quiet_hours.is_quiet(rule.window, decision.until - 2e-6, tz)
            ]
            assert opening, decision
            assert any(QuietAction.DEFER is rule.action for rule in rules.quiet_hours)

    @settings(max_examples=200, deadline=None)
    @given(situation=situations(focused=True))
    def test_quiet_hours_decide_the_first_step(self, situation: Situation) -> None:
        """Without caps, the first channel's quiet rule alone decides when the message starts."""
        env, recipient, rules, now, tz = situation
        rules = msgspec.structs.replace(rules, caps=())
        decision = decide(env, recipient, rules, message=MESSAGE, now=now, tz=tz)
        start = now if env.send_at is None else max(now, env.send_at)
        first = env.channels[0]
        rule = rules.quiet_rule(first, env.category)
        bypass = (
            rules.critical_service_bypasses_quiet_hours
            and env.lane is Lane.CRITICAL
            and env.category is SERVICE
        )
        quiet = rule is not None and quiet_hours.is_quiet(rule.window, start, tz)
        if env.expires_at is not None and env.expires_at <= start:
            assert RejectReason.EXPIRED == reason(decision)
            return
        if not quiet or bypass or (rule is not None and rule.action is QuietAction.BYPASS):
            expected: Decision = Admit(env.channels, 0b1111)
            if start > now:
                expected = Defer(env.channels, 0b1111, start, DeferReason.SEND_AT)
            assert expected == decision
            event("goes at the start" + (" (bypass)" if quiet else ""))
            return
        assert rule is not None
        if rule.action is QuietAction.DROP:
            # the first channel is skipped; the message is refused only if every one is
            def dropped(channel: Channel) -> bool:
                other = rules.quiet_rule(channel, env.category)
                return (
                    other is not None
                    and other.action is QuietAction.DROP
                    and quiet_hours.is_quiet(other.window, start, tz)
                )

            if all(dropped(channel) for channel in env.channels):
                assert RejectReason.QUIET_HOURS == reason(decision)
                event("dropped")
            else:
                assert RejectReason.QUIET_HOURS != reason(decision)
                event("first channel skipped, the rest of the plan goes")
            return
        opening = quiet_hours.next_open(rule.window, start, tz)
        if env.expires_at is not None and env.expires_at <= opening:
            assert RejectReason.EXPIRED == reason(decision)
            return
        assert Defer(env.channels, 0b1111, opening, DeferReason.QUIET_HOURS) == decision
        event("held until the window opens")

    @settings(max_examples=150, deadline=None)
    @given(situation=situations(), channel=st.sampled_from(Channel))
    def test_gate_respects_every_rule(self, situation: Situation, channel: Channel) -> None:
        env, recipient, rules, now, tz = situation
        verdict = gate(env, recipient, rules, message=MESSAGE, channel=channel, now=now, tz=tz)
        event(type(verdict).__name__)
        assert verdict == gate(
            env, recipient, rules, message=MESSAGE, channel=channel, now=now, tz=tz
        )
        if env.expires_at is not None and now >= env.expires_at:
            assert Stop(RejectReason.EXPIRED) == verdict
            return
        if not recipient.consents.personal_data(rules.consent_defaults):
            assert Stop(RejectReason.NO_CONSENT) == verdict
            return
        if not allowed_now(recipient, rules, env, channel):
            assert Stop(RejectReason.NO_CONSENT) == verdict
        if not env.category.is_marketing:
            assert verdict not in (Skip(RejectReason.CAPPED), Stop(RejectReason.CAPPED))
            assert not (isinstance(verdict, Hold) and verdict.why is DeferReason.CAPPED)
        if isinstance(verdict, Hold):
            assert verdict.until > now
            if env.expires_at is not None:
                assert verdict.until < env.expires_at

    @settings(max_examples=200, deadline=None)
    @given(
        situation=situations() | situations(focused=True),
        data=st.data(),
        at=st.floats(min_value=0.0, max_value=HOUR),
    )
    def test_a_revoked_consent_is_never_used(
        self, situation: Situation, data: st.DataObject, at: float
    ) -> None:
        env, recipient, rules, now, tz = situation
        # everywhere, any channel, or (most telling) a later channel of this message's plan
        channel = data.draw(
            st.none() | st.sampled_from(Channel) | st.sampled_from(env.channels[1:] or ALL_CHANNELS)
        )
        # the withdrawal is the newest record, so it wins over everything before it
        withdrawal = ConsentRecord(
            ConsentKind.ADVERTISING,
            ConsentAction.WITHDRAW,
            100.0 + at,
            "one-click",
            channel,
            env.topic,
        )
        revoked = RecipientState(recipient.consents.with_record(withdrawal), recipient.history)
        decision = decide(env, revoked, rules, message=MESSAGE, now=now, tz=tz)
        closed = [c for c in ALL_CHANNELS if channel is None or c is channel]
        if env.category.is_marketing:
            if isinstance(decision, Admit | Defer):
                assert not set(closed) & set(decision.channels)
                event("admitted on the other channels")
            for c in closed:
                verdict = gate(env, revoked, rules, message=MESSAGE, channel=c, now=now, tz=tz)
                assert verdict in (Stop(RejectReason.NO_CONSENT), Stop(RejectReason.EXPIRED))

    @settings(max_examples=100, deadline=None)
    @given(situation=situations())
    def test_personal_data_withdrawal_stops_everything(self, situation: Situation) -> None:
        env, recipient, rules, now, tz = situation
        withdrawal = ConsentRecord(ConsentKind.PERSONAL_DATA, ConsentAction.WITHDRAW, 100.0, "crm")
        revoked = RecipientState(recipient.consents.with_record(withdrawal), recipient.history)
        decision = decide(env, revoked, rules, message=MESSAGE, now=now, tz=tz)
        expired = env.expires_at is not None and env.expires_at <= now
        if not expired and env.channels:
            assert RejectReason.NO_CONSENT == reason(decision)
        for channel in ALL_CHANNELS:
            verdict = gate(env, revoked, rules, message=MESSAGE, channel=channel, now=now, tz=tz)
            assert (
                Stop(RejectReason.EXPIRED) if expired else Stop(RejectReason.NO_CONSENT)
            ) == verdict
