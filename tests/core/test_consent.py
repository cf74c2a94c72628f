"""Consent records and what they allow (gateway/core/consent.py)."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from gateway.core.consent import (
    ConsentAction,
    ConsentDefaults,
    ConsentKind,
    ConsentRecord,
    ConsentState,
    advertising_mask,
    allowed_mask,
)
from gateway.core.model import ALL_CHANNELS, ALL_CHANNELS_MASK, Channel
from tests.core.masks import channel_mask

AD = ConsentKind.ADVERTISING
PD = ConsentKind.PERSONAL_DATA
GRANT = ConsentAction.GRANT
WITHDRAW = ConsentAction.WITHDRAW
TOPICS = ("promo", "news", "recipes")
OPT_IN = ConsentDefaults(personal_data=True, advertising=False)


def ad(
    action: ConsentAction, at: float, channel: Channel | None = None, topic: str | None = None
) -> ConsentRecord:
    return ConsentRecord(AD, action, at, "crm", channel=channel, topic=topic)


def pd(action: ConsentAction, at: float) -> ConsentRecord:
    return ConsentRecord(PD, action, at, "crm")


def state_of(*records: ConsentRecord) -> ConsentState:
    state = ConsentState()
    for record in records:
        state = state.with_record(record)
    return state


def email_in_mask(state: ConsentState) -> bool:
    """The one-pass mask must agree with the per-channel answer (``advertising_mask``)."""
    mask = advertising_mask(state, topic="promo", defaults=OPT_IN)
    return bool(mask & Channel.EMAIL.bit)


def oracle(
    applied: list[ConsentRecord],
    kind: ConsentKind,
    channel: Channel,
    topic: str,
    default: bool,
) -> bool:
    """Brute force over every record ever applied: the maximum by precedence decides."""
    covering = [
        r
        for r in applied
        if r.kind is kind
        and (kind is PD or ((r.channel in (None, channel)) and (r.topic in (None, topic))))
    ]
    if not covering:
        return default
    best = max(covering, key=lambda r: (r.at, r.specificity, r.action is WITHDRAW))
    return best.action is GRANT


records = st.builds(
    ConsentRecord,
    kind=st.sampled_from(ConsentKind),
    action=st.sampled_from(ConsentAction),
    at=st.integers(0, 6).map(float),  # few distinct times: ties are the interesting part
    source=st.sampled_from(["crm", "web", "one-click"]),
    channel=st.none() | st.sampled_from(Channel),
    topic=st.none() | st.sampled_from(TOPICS),
).map(
    # personal-data consent is never narrowed (ConsentRecord docstring)
    lambda r: msgspec.structs.replace(r, channel=None, topic=None) if r.kind is PD else r
)
defaults = st.builds(ConsentDefaults, personal_data=st.booleans(), advertising=st.booleans())


class TestPrecedence:
    """The latest covering record wins; then the narrower scope; then withdrawal."""

    @pytest.mark.parametrize(
        ("sequence", "expected"),
        [
            ([ad(GRANT, 1), ad(WITHDRAW, 2)], False),
            ([ad(WITHDRAW, 1), ad(GRANT, 2)], True),
            # arrival order does not matter, only `at`
            ([ad(WITHDRAW, 2), ad(GRANT, 1)], False),
            ([ad(GRANT, 2), ad(WITHDRAW, 1)], True),
            # a later narrow grant re-opens what a broad withdrawal closed
            ([ad(WITHDRAW, 1), ad(GRANT, 2, Channel.EMAIL, "promo")], True),
            # a later broad withdrawal closes a narrow grant
            ([ad(GRANT, 1, Channel.EMAIL, "promo"), ad(WITHDRAW, 2)], False),
            ([ad(GRANT, 2, Channel.EMAIL, "promo"), ad(WITHDRAW, 1)], True),
        ],
    )
    def test_latest_wins(self, sequence: list[ConsentRecord], expected: bool) -> None:
        assert expected == state_of(*sequence).advertising(Channel.EMAIL, "promo", OPT_IN)
        assert expected == email_in_mask(state_of(*sequence))

    @pytest.mark.parametrize(
        ("narrow", "broad", "expected"),
        [
            (ad(GRANT, 5, Channel.EMAIL, "promo"), ad(WITHDRAW, 5), True),
            (ad(WITHDRAW, 5, Channel.EMAIL, "promo"), ad(GRANT, 5), False),
            (ad(GRANT, 5, Channel.EMAIL), ad(WITHDRAW, 5), True),
            (ad(GRANT, 5, topic="promo"), ad(WITHDRAW, 5), True),
            (ad(GRANT, 5, Channel.EMAIL, "promo"), ad(WITHDRAW, 5, Channel.EMAIL), True),
            (ad(WITHDRAW, 5, Channel.EMAIL, "promo"), ad(GRANT, 5, topic="promo"), False),
        ],
    )
    def test_equal_time_narrower_wins(
        self, narrow: ConsentRecord, broad: ConsentRecord, expected: bool
    ) -> None:
        assert expected == state_of(narrow, broad).advertising(Channel.EMAIL, "promo", OPT_IN)
        assert expected == state_of(broad, narrow).advertising(Channel.EMAIL, "promo", OPT_IN)
        assert expected == email_in_mask(state_of(narrow, broad))
        assert expected == email_in_mask(state_of(broad, narrow))

    def test_narrow_record_does_not_leak_to_other_scopes(self) -> None:
        state = state_of(ad(WITHDRAW, 5), ad(GRANT, 5, Channel.EMAIL, "promo"))
        assert state.advertising(Channel.EMAIL, "promo", OPT_IN)
        assert not state.advertising(Channel.SMS, "promo", OPT_IN)
        assert not state.advertising(Channel.EMAIL, "news", OPT_IN)

    @pytest.mark.parametrize(
        ("channel", "topic"),
        [(None, None), (Channel.SMS, None), (None, "promo"), (Channel.SMS, "promo")],
    )
    def test_full_tie_withdraw_wins(self, channel: Channel | None, topic: str | None) -> None:
        grant, withdraw = ad(GRANT, 3, channel, topic), ad(WITHDRAW, 3, channel, topic)
        assert not state_of(grant, withdraw).advertising(Channel.SMS, "promo", OPT_IN)
        assert not state_of(withdraw, grant).advertising(Channel.SMS, "promo", OPT_IN)
        assert 0 == advertising_mask(state_of(grant, withdraw), topic="promo", defaults=OPT_IN)

    def test_tie_between_two_equally_narrow_scopes_withdraw_wins(self) -> None:
        by_channel, by_topic = ad(GRANT, 3, Channel.SMS), ad(WITHDRAW, 3, topic="promo")
        assert not state_of(by_channel, by_topic).advertising(Channel.SMS, "promo", OPT_IN)
        assert not state_of(by_topic, by_channel).advertising(Channel.SMS, "promo", OPT_IN)
        assert state_of(by_topic, by_channel).advertising(Channel.SMS, "news", OPT_IN)
        for state in (state_of(by_channel, by_topic), state_of(by_topic, by_channel)):
            assert 0 == advertising_mask(state, topic="promo", defaults=OPT_IN)
            assert Channel.SMS.bit == advertising_mask(state, topic="news", defaults=OPT_IN)


class TestBroadWithdrawal:
    """A broad withdrawal at t overrides narrower grants before t, not after."""

    def test_overrides_earlier_narrow_grants(self) -> None:
        state = state_of(
            ad(GRANT, 1, Channel.EMAIL, "promo"),
            ad(GRANT, 2, Channel.SMS),
            ad(GRANT, 3, topic="news"),
            ad(WITHDRAW, 10),
        )
        for channel in ALL_CHANNELS:
            for topic in TOPICS:
                assert not state.advertising(channel, topic, OPT_IN)

    def test_drops_the_superseded_narrow_records(self) -> None:
        state = state_of(ad(GRANT, 1, Channel.EMAIL, "promo"), ad(GRANT, 2, Channel.SMS))
        withdrawn = state.with_record(ad(WITHDRAW, 10))
        assert (ad(WITHDRAW, 10),) == withdrawn.records

    def test_an_old_narrow_grant_arriving_late_does_not_undo_it(self) -> None:
        state = state_of(ad(WITHDRAW, 10), ad(GRANT, 1, Channel.EMAIL, "promo"))
        assert not state.advertising(Channel.EMAIL, "promo", OPT_IN)

    def test_does_not_override_later_narrow_grants(self) -> None:
        state = state_of(ad(WITHDRAW, 10), ad(GRANT, 11, Channel.EMAIL, "promo"))
        assert state.advertising(Channel.EMAIL, "promo", OPT_IN)
        assert not state.advertising(Channel.PUSH, "promo", OPT_IN)
        # arriving before the withdrawal it post-dates changes nothing either
        reordered = state_of(ad(GRANT, 11, Channel.EMAIL, "promo"), ad(WITHDRAW, 10))
        assert reordered.advertising(Channel.EMAIL, "promo", OPT_IN)

    def test_channel_wide_withdrawal_keeps_other_channels(self) -> None:
        state = state_of(ad(GRANT, 1), ad(WITHDRAW, 2, Channel.SMS))
        assert not state.advertising(Channel.SMS, "promo", OPT_IN)
        assert state.advertising(Channel.EMAIL, "promo", OPT_IN)


class TestWithRecord:
    """``with_record`` keeps the latest record per scope."""

    @pytest.mark.parametrize(
        ("existing", "older"),
        [
            (ad(WITHDRAW, 5, Channel.EMAIL, "promo"), ad(GRANT, 4, Channel.EMAIL, "promo")),
            (ad(GRANT, 5), ad(WITHDRAW, 4)),
            # an exact duplicate or the weaker half of a full tie changes nothing either
            (ad(GRANT, 5), ad(GRANT, 5)),
            (ad(WITHDRAW, 5, Channel.SMS), ad(GRANT, 5, Channel.SMS)),
            (pd(WITHDRAW, 5), pd(GRANT, 1)),
        ],
    )
    def test_ignores_an_older_record_for_the_same_scope(
        self, existing: ConsentRecord, older: ConsentRecord
    ) -> None:
        state = state_of(existing)
        assert state is state.with_record(older)

    def test_replaces_an_older_record_for_the_same_scope(self) -> None:
        state = state_of(ad(GRANT, 4, Channel.EMAIL), ad(WITHDRAW, 5, Channel.EMAIL))
        assert (ad(WITHDRAW, 5, Channel.EMAIL),) == state.records

    def test_keeps_other_kinds(self) -> None:
        state = state_of(pd(GRANT, 1), ad(WITHDRAW, 2))
        assert (pd(GRANT, 1), ad(WITHDRAW, 2)) == state.records

    def test_round_trips_through_msgpack(self) -> None:
        state = state_of(
            pd(GRANT, 1),
            ad(GRANT, 2, Channel.EMAIL, "promo"),
            ConsentRecord(AD, WITHDRAW, 3.5, "one-click", Channel.SMS, None, "too many"),
        )
        decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(state), type=ConsentState)
        assert state == decoded
        assert decoded.advertising(Channel.EMAIL, "promo", OPT_IN)


class TestAllowedMask:
    """Service needs personal data only; marketing needs both consents."""

    @pytest.mark.parametrize("marketing", [False, True])
    def test_personal_data_withdrawal_stops_everything(self, marketing: bool) -> None:
        state = state_of(ad(GRANT, 1), pd(GRANT, 1), pd(WITHDRAW, 2))
        assert 0 == allowed_mask(state, marketing=marketing, topic="promo", defaults=OPT_IN)

    def test_service_needs_only_personal_data(self) -> None:
        state = state_of(ad(WITHDRAW, 1))
        assert ALL_CHANNELS_MASK == allowed_mask(
            state, marketing=False, topic="promo", defaults=OPT_IN
        )
        assert 0 == allowed_mask(state, marketing=True, topic="promo", defaults=OPT_IN)

    def test_marketing_mask_follows_advertising_per_channel(self) -> None:
        state = state_of(ad(GRANT, 1, Channel.EMAIL), ad(GRANT, 1, Channel.SMS, "promo"))
        assert channel_mask([Channel.EMAIL, Channel.SMS]) == allowed_mask(
            state, marketing=True, topic="promo", defaults=OPT_IN
        )
        assert channel_mask([Channel.EMAIL]) == allowed_mask(
            state, marketing=True, topic="news", defaults=OPT_IN
        )

    @pytest.mark.parametrize(
        ("defaults", "service", "marketing"),
        [
            (ConsentDefaults(), True, False),
            (ConsentDefaults(personal_data=True, advertising=True), True, True),
            (ConsentDefaults(personal_data=False, advertising=True), False, False),
            (ConsentDefaults(personal_data=False, advertising=False), False, False),
        ],
    )
    def test_defaults_apply_when_nothing_is_known(
        self, defaults: ConsentDefaults, service: bool, marketing: bool
    ) -> None:
        state = ConsentState()
        assert (ALL_CHANNELS_MASK if service else 0) == allowed_mask(
            state, marketing=False, topic="promo", defaults=defaults
        )
        assert (ALL_CHANNELS_MASK if marketing else 0) == allowed_mask(
            state, marketing=True, topic="promo", defaults=defaults
        )

    @pytest.mark.parametrize("advertising", [False, True])
    def test_masks_with_nothing_known(self, advertising: bool) -> None:
        defaults = ConsentDefaults(personal_data=True, advertising=advertising)
        expected = ALL_CHANNELS_MASK if advertising else 0
        assert expected == advertising_mask(ConsentState(), topic="promo", defaults=defaults)
        assert expected == allowed_mask(
            ConsentState(), marketing=True, topic="promo", defaults=defaults
        )

    def test_defaults_apply_only_to_uncovered_questions(self) -> None:
        opt_out = ConsentDefaults(personal_data=True, advertising=True)
        state = state_of(ad(WITHDRAW, 1, Channel.SMS))
        assert not state.advertising(Channel.SMS, "promo", opt_out)
        assert state.advertising(Channel.EMAIL, "promo", opt_out)


class TestAgainstOracle:
    """After any sequence of records, every answer equals a scan of all records ever applied."""

    @settings(max_examples=300, deadline=None)
    @given(sequence=st.lists(records, max_size=14), known=defaults)
    def test_matches_brute_force(
        self, sequence: list[ConsentRecord], known: ConsentDefaults
    ) -> None:
        state = ConsentState()
        applied: list[ConsentRecord] = []
        self.check(state, applied, known)
        for record in sequence:
            state = state.with_record(record)
            applied.append(record)
            self.check(state, applied, known)
        # the kept state is small: one record per scope at most
        assert len({r.scope for r in state.records}) == len(state.records)
        if len(state.records) < len({r.scope for r in applied}):
            event("a broad record superseded narrower ones")

    @staticmethod
    def check(state: ConsentState, applied: list[ConsentRecord], known: ConsentDefaults) -> None:
        personal = oracle(applied, PD, Channel.SMS, "", known.personal_data)
        assert personal == state.personal_data(known)
        for topic in (*TOPICS, "unseen"):
            advertised = [
                channel
                for channel in ALL_CHANNELS
                if oracle(applied, AD, channel, topic, known.advertising)
            ]
            for channel in ALL_CHANNELS:
                expected = channel in advertised
                assert expected == state.advertising(channel, topic, known)
            # the one-pass masks agree with the per-channel answers
            assert channel_mask(advertised) == advertising_mask(state, topic=topic, defaults=known)
            assert (channel_mask(advertised) if personal else 0) == allowed_mask(
                state, marketing=True, topic=topic, defaults=known
            )
            # service needs the personal-data consent only
            assert (ALL_CHANNELS_MASK if personal else 0) == allowed_mask(
                state, marketing=False, topic=topic, defaults=known
            )

    @settings(max_examples=200)
    @given(sequence=st.lists(records, max_size=10), data=st.data())
    def test_order_of_arrival_does_not_matter(
        self, sequence: list[ConsentRecord], data: st.DataObject
    ) -> None:
        shuffled = data.draw(st.permutations(sequence))
        forward, other = state_of(*sequence), state_of(*shuffled)
        for channel in ALL_CHANNELS:
            for topic in TOPICS:
                assert forward.advertising(channel, topic, OPT_IN) == other.advertising(
                    channel, topic, OPT_IN
                )
        assert forward.personal_data(OPT_IN) == other.personal_data(OPT_IN)
