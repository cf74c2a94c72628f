"""The one table from a fact about a sent message to the event its cascade gets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.cascade import (
    Cascade,
    Clicked,
    Converted,
    Delivered,
    Read,
    SendFailed,
    SendSucceeded,
    Status,
)
from gateway.core.model import ALL_CHANNELS, Channel, Outcome
from gateway.core.receipts import (
    OPT_OUTS,
    PROVIDER_FACTS,
    Fact,
    ReceiptKind,
    cascade_event,
)

EMAIL = Channel.EMAIL


@pytest.mark.parametrize(
    ("fact", "channel", "expected"),
    [
        (Fact.DELIVERED, EMAIL, Delivered(EMAIL)),
        (Fact.READ, EMAIL, Read(EMAIL)),
        (Fact.CLICKED, EMAIL, Clicked(EMAIL)),
        (Fact.FAILED, EMAIL, SendFailed(EMAIL, permanent=True)),
        (Fact.CONVERTED, EMAIL, Converted()),
        (Fact.CONVERTED, None, Converted()),
        (Fact.DELIVERED, None, None),
        (Fact.READ, None, None),
        (Fact.CLICKED, None, None),
        (Fact.FAILED, None, None),
    ],
)
def test_each_fact_is_one_event(fact: Fact, channel: Channel | None, expected: object) -> None:
    assert expected == cascade_event(fact, channel)


def test_every_provider_receipt_is_a_fact_or_an_opt_out() -> None:
    assert set(ReceiptKind) == set(PROVIDER_FACTS) | OPT_OUTS
    assert not set(PROVIDER_FACTS) & OPT_OUTS
    assert Fact.FAILED == PROVIDER_FACTS[ReceiptKind.BOUNCED]  # for the cascade a failed step


def awaiting(channel: Channel) -> Cascade:
    """A cascade whose step on ``channel`` the provider took."""
    plan = (channel, *(c for c in ALL_CHANNELS if c is not channel))
    cascade, _ = Cascade.start(plan=plan, timeouts=(60.0,) * len(plan), allowed=0b1111, now=0.0)
    cascade, _ = cascade.handle(SendSucceeded(channel), now=1.0)
    assert Status.AWAITING == cascade.status
    return cascade


@given(fact=st.sampled_from(Fact), channel=st.sampled_from(ALL_CHANNELS))
def test_what_each_fact_does_to_a_waiting_step(fact: Fact, channel: Channel) -> None:
    """Engagement ends the cascade where it happened; a failure moves on; delivery ends it
    only on SMS, which has no read signal."""
    event = cascade_event(fact, channel)
    assert event is not None
    after, _ = awaiting(channel).handle(event, now=2.0)
    if fact in (Fact.READ, Fact.CLICKED, Fact.CONVERTED):
        expected = {
            Fact.READ: Outcome.READ,
            Fact.CLICKED: Outcome.CLICKED,
            Fact.CONVERTED: Outcome.CONVERTED,
        }
        assert expected[fact] == after.outcome
    elif fact is Fact.FAILED:
        assert after.finished or after.channel is not channel
    elif channel is Channel.SMS:
        assert Outcome.DELIVERED == after.outcome
    else:
        assert not after.finished
