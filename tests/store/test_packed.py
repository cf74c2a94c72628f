"""The live state's packed recipient values (gateway/store/packed.py) give back equal values."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.caps import CapHistory, SendEntry
from gateway.core.consent import ConsentAction, ConsentKind, ConsentRecord, ConsentState
from gateway.core.model import Category, Channel
from gateway.store import packed

TEXT = st.text(max_size=3) | st.text(min_size=120, max_size=300) | st.just("crm")
consent_records = st.builds(
    ConsentRecord,
    kind=st.sampled_from(ConsentKind),
    action=st.sampled_from(ConsentAction),
    at=st.floats(allow_nan=False),
    source=TEXT,
    channel=st.none() | st.sampled_from(Channel),
    topic=st.none() | TEXT,
    reason=st.none() | TEXT,
)
send_entries = st.builds(
    SendEntry,
    at=st.floats(allow_nan=False),
    message=st.text(max_size=20),
    category=st.sampled_from(Category),
    channel=st.sampled_from(Channel),
)


class TestPacked:
    @settings(max_examples=300)
    @given(
        records=st.lists(consent_records, max_size=6),
        sends=st.lists(send_entries, max_size=3)
        | st.lists(send_entries, min_size=128, max_size=140),
    )
    def test_consents_and_sends_come_back_equal(
        self, records: list[ConsentRecord], sends: list[SendEntry]
    ) -> None:
        """Bit for bit: times, any text (lone surrogates too), every scope; and a count of
        sends or a text length past one varint byte."""
        consents, history = ConsentState(tuple(records)), CapHistory.of(sends)
        value = packed.pack(consents, history)
        assert consents == packed.consents(value)
        assert history == packed.history(value)

    @given(
        records=st.lists(consent_records, max_size=3),
        before=st.lists(send_entries, max_size=3),
        after=st.lists(send_entries, max_size=3),
    )
    def test_replacing_the_sends_keeps_the_consents(
        self, records: list[ConsentRecord], before: list[SendEntry], after: list[SendEntry]
    ) -> None:
        consents = ConsentState(tuple(records))
        value = packed.with_history(
            packed.pack(consents, CapHistory.of(before)), CapHistory.of(after)
        )
        assert consents == packed.consents(value)
        assert CapHistory.of(after) == packed.history(value)

    def test_nothing_packed_is_the_empty_state(self) -> None:
        assert packed.EMPTY_CONSENTS is packed.consents(b"")
        assert packed.EMPTY_HISTORY is packed.history(b"")
        assert b"" == packed.with_history(b"", CapHistory())[1:]

    def test_one_consent_and_three_sends_take_under_70_bytes(self) -> None:
        consent = ConsentRecord(ConsentKind.ADVERTISING, ConsentAction.GRANT, 1.7e9, "crm")
        sends = [
            SendEntry(1.7e9 + step, "acme:m1", Category.PROMO, channel)
            for step, channel in enumerate((Channel.PUSH, Channel.EMAIL, Channel.SMS))
        ]
        assert 65 == len(packed.pack(ConsentState((consent,)), CapHistory.of(sends)))
