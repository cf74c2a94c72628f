"""The router's live state keeps one copy of the values a million waiting cascades repeat."""

from __future__ import annotations

import msgspec

from gateway.store.base import MessageRecord
from gateway.store.state import _SHARED_LIMIT, State
from tests.store.test_journal import record

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
