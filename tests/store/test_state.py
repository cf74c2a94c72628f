"""The router's live state keeps one copy of the values a million waiting cascades repeat,
and a compact value per known recipient that answers exactly as the objects did."""

from __future__ import annotations

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.caps import CapHistory, SendEntry
from gateway.core.consent import ConsentAction, ConsentKind, ConsentRecord, ConsentState
from gateway.core.model import Category, Channel
from gateway.core.policy import RecipientState
from gateway.store.base import MessageRecord
from gateway.store.state import _SHARED_LIMIT, State
from tests.core.test_caps import reference_with_entry
from tests.store.test_journal import record
from tests.store.test_packed import consent_records, send_entries

_codec = msgspec.msgpack.Decoder(MessageRecord)


def recovered(key: str) -> MessageRecord:
    """A record as the journal returns it at restart: every string and tuple its own copy."""
    return _codec.decode(msgspec.msgpack.encode(record(key)))


class TestSharing:
    def test_records_decoded_from_the_journal_share_their_repeated_values(self) -> None:
        state = State(horizon_seconds=0)
        first, second = recovered("m1"), recovered("m2")
        assert first.envelope.tenant is not second.envelope.tenant  # the premise: copies
        state.restore(first)
        state.restore(second)

        for a, b in (
            (first.envelope.tenant, second.envelope.tenant),
            (first.envelope.topic, second.envelope.topic),
            (first.envelope.channels, second.envelope.channels),
            (first.cascade.plan, second.cascade.plan),
            (first.cascade.timeouts, second.cascade.timeouts),
            (first.tz, second.tz),
        ):
            assert a is b

    def test_sharing_changes_no_value(self) -> None:
        state = State(horizon_seconds=0)
        state.restore(recovered("m0"))
        fresh = recovered("m1")
        expected = msgspec.msgpack.encode(fresh)
        state.restore(fresh)
        assert expected == msgspec.msgpack.encode(state.records["acme:m1"])

    def test_the_table_stops_growing_at_its_limit(self) -> None:
        state = State(horizon_seconds=0)
        for index in range(_SHARED_LIMIT + 100):
            assert f"topic-{index}" == state.share(f"topic-{index}")
        late = "".join(["late", "-topic"])
        assert state.share(late) is late
        assert state.share("".join(["late", "-topic"])) is not late  # not remembered
        assert _SHARED_LIMIT == len(state._shared)


# ---------------------------------------------------------------- known recipients
class OldState:
    """The recipients part of ``State`` as it was before values were packed: a dict of
    ``ConsentState``, a dict of ``SendEntry`` tuples, and ref -> tuple of recipient keys."""

    def __init__(self, horizon_seconds: float) -> None:
        self.horizon_seconds = horizon_seconds
        self.consents: dict[str, ConsentState] = {}
        self.histories: dict[str, tuple[SendEntry, ...]] = {}
        self.by_address: dict[str, tuple[str, ...]] = {}

    def apply_consent(self, rkey: str, record: ConsentRecord) -> ConsentState:
        state = self.consents.get(rkey, ConsentState()).with_record(record)
        self.consents[rkey] = state
        return state

    def record_send(self, rkey: str, entry: SendEntry) -> None:
        self.histories[rkey] = reference_with_entry(
            self.histories.get(rkey, ()), entry, self.horizon_seconds
        )

    def remember_address(self, ref: str, rkey: str) -> bool:
        known = self.by_address.get(ref, ())
        if rkey in known:
            return False
        self.by_address[ref] = (*known, rkey)
        return True


RKEYS = ["acme:r1", "acme:r2", "beta:r1", "acme:\u0436"]  # a non-ASCII key
ADDRESSES = [(Channel.SMS, "+79990000001"), (Channel.VIBER, "viber-7"), (Channel.SMS, "+1")]
KEY = b"k" * 32


def keyed_state(horizon_seconds: float) -> State:
    state = State(horizon_seconds=horizon_seconds)
    state.address_key = KEY
    return state


REFS = [
    *(
        ref
        for channel, address in ADDRESSES
        for ref in keyed_state(0.0).address_refs(channel, address)
    ),
    "not hex",
    "0x" + "0" * 22,  # int() reads it, but it is no ref the gateway makes
    "ABCDEF0123456789ABCDEF01",  # upper case: equal to no lower-case ref
    "abcdef0123456789abcdef01",
    "00abcdef0123456789abcdef01",
    "",
]
ops = st.one_of(
    st.tuples(st.just("consent"), st.sampled_from(RKEYS), consent_records),
    st.tuples(st.just("send"), st.sampled_from(RKEYS), send_entries),
    st.tuples(st.just("address"), st.sampled_from(RKEYS), st.sampled_from(REFS)),
)


class TestRecipients:
    """Packed, the recipients' consents, sends and addresses behave exactly as the dicts did."""

    @settings(max_examples=300, deadline=None)
    @given(
        steps=st.lists(ops, max_size=25),
        horizon=st.sampled_from([0.0, 10.0, 1e12]),
    )
    def test_the_same_answers_as_the_dicts_of_objects(
        self, steps: list[tuple[str, str, object]], horizon: float
    ) -> None:
        state, old = keyed_state(horizon), OldState(horizon)
        for op, rkey, arg in steps:
            fresh = "".join(list(rkey))  # the runtime hands a new string every time
            if op == "consent":
                assert isinstance(arg, ConsentRecord)
                assert old.apply_consent(rkey, arg) == state.apply_consent(fresh, arg)
            elif op == "send":
                assert isinstance(arg, SendEntry)
                old.record_send(rkey, arg)
                state.record_send(fresh, arg)
            else:
                assert isinstance(arg, str)
                assert old.remember_address(arg, rkey) == state.remember_address(arg, fresh)
        for rkey in RKEYS:
            consents = old.consents.get(rkey)
            history = CapHistory.of(old.histories.get(rkey, ()))
            assert consents == state.consents_of(rkey)
            assert RecipientState(consents or ConsentState(), history) == state.recipient(rkey)
            assert history == state.history(rkey)
        for channel, address in ADDRESSES:
            keyed, legacy = state.address_refs(channel, address)
            found = old.by_address.get(keyed, ())
            expected = found + tuple(r for r in old.by_address.get(legacy, ()) if r not in found)
            assert expected == state.recipients_of(channel, address)
        for ref in REFS:
            assert old.by_address.get(ref, ()) == state._indexed(ref)

    def test_the_address_index_names_a_recipient_by_its_key_object(self) -> None:
        """One recipient key string per recipient, however many calls handed a copy of it."""
        state = keyed_state(0.0)
        entry = SendEntry(1.0, "acme:m1", Category.PROMO, Channel.SMS)
        state.record_send("".join(["acme:", "r1"]), entry)
        ref = state.address_refs(Channel.SMS, "+79990000001")[0]
        assert state.remember_address(ref, "".join(["acme:", "r1"]))
        assert not state.remember_address(ref, "".join(["acme:", "r1"]))
        (key,) = state._recipients
        (indexed,) = state._by_address.values()
        assert key is indexed
        assert 12 * 8 >= int(ref, 16).bit_length()  # the ref's digest is the index key
        assert [int(ref, 16)] == list(state._by_address)
        assert CapHistory.of([entry]) == state.history("acme:r1")

    def test_an_address_of_several_recipients_keeps_them_in_order(self) -> None:
        state = keyed_state(0.0)
        ref = state.address_refs(Channel.VIBER, "viber-7")[0]
        for rkey in ("acme:r2", "acme:r1", "beta:r1"):
            assert state.remember_address(ref, rkey)
        assert not state.remember_address(ref, "acme:r1")
        assert ("acme:r2", "acme:r1", "beta:r1") == state.recipients_of(Channel.VIBER, "viber-7")

    def test_an_unknown_recipient_has_nothing(self) -> None:
        state = keyed_state(0.0)
        assert state.consents_of("acme:nobody") is None
        assert RecipientState() == state.recipient("acme:nobody")
        assert CapHistory() == state.history("acme:nobody")
        assert () == state.recipients_of(Channel.SMS, "+1")

    def test_a_consent_that_changes_nothing_leaves_the_value(self) -> None:
        state = keyed_state(0.0)
        newer = ConsentRecord(ConsentKind.ADVERTISING, ConsentAction.WITHDRAW, 2.0, "crm")
        state.apply_consent("acme:r1", newer)
        value = state._recipients["acme:r1"]
        older = ConsentRecord(ConsentKind.ADVERTISING, ConsentAction.GRANT, 1.0, "crm")
        assert ConsentState((newer,)) == state.apply_consent("acme:r1", older)
        assert value is state._recipients["acme:r1"]
