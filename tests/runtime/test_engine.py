"""The router's services on the threadless harness, h11-style: events in, staged rows, jobs and
status events out. No ZeroMQ, no HTTP, no threads; time moves only when a test moves it.

Each test reads what a handler staged (``committer.peek()``) before the commit, and what left
the process (jobs for providers, published status events) after it: nothing may leave before
the batch that decided it is durable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from adapters import ProviderReceipt, ReceiptKind
from gateway.clock import Clock
from gateway.core.cascade import Status
from gateway.core.consent import ConsentAction, ConsentKind
from gateway.core.model import Channel, Outcome
from gateway.inbound import HitKind, OptOut, TrackingHit, WebhookReceipts
from gateway.protocol import StatusKind
from gateway.runtime.queues import Job
from gateway.store.memory import MemoryStore
from tests.runtime.harness import Harness
from tests.support import NOON_UTC, make_config, promo

PUSH_TIMEOUT_SECONDS = 300.0  # the default unread timeout of a push step


CAPPED = """
[[policy.caps]]
name = "promo_daily"
max_count = 5
window_seconds = 86400
"""


@pytest.fixture
async def harness(tmp_path: Path, mock_clock: trio.testing.MockClock) -> Harness:
    config = make_config(tmp_path, extra=CAPPED)
    return await Harness.start(config, MemoryStore(), Clock(NOON_UTC))


def kinds(harness: Harness, message_id: str) -> list[str]:
    return [e.kind.value for e in harness.published if e.id == message_id]


async def admitted(harness: Harness, message_id: str, **fields: Any) -> Job:
    """Send, commit, and return the first step's job."""
    (result,) = harness.requests([promo(message_id, **fields)])
    assert "accepted" == result.status, result
    await harness.commit()
    (job,) = harness.take_jobs()
    return job


async def sent(harness: Harness, message_id: str, **fields: Any) -> Job:
    """Admitted, claimed, and taken by the provider: the step awaits its read."""
    job = await admitted(harness, message_id, **fields)
    assert harness.claim(job) is not None
    harness.router.feedback.send_succeeded(
        job, provider=f"{job.channel}1", price=0.0, now=harness.now
    )
    await harness.commit()
    return job


class TestAdmission:
    async def test_a_send_is_staged_whole_and_leaves_only_once_durable(
        self, harness: Harness
    ) -> None:
        (result,) = harness.requests([promo("m1")])
        assert ("accepted", ["push", "email", "viber", "sms"]) == (result.status, result.channels)
        batch = harness.committer.peek()
        assert ["acme:m1"] == list(batch.inserts)  # the request, for later steps
        assert ["acme:m1"] == list(batch.dirty)  # the record, in the same row
        assert ["accepted"] == [e.kind for e in batch.opening["acme:m1"]]
        assert 1 == len(batch.sends)  # counted against the caps before the send goes
        assert 2 == batch.rows  # the message row and the send entry
        assert ([], []) == (harness.queues.jobs, harness.published)  # nothing left yet

        await harness.commit()
        (job,) = harness.take_jobs()
        assert ("acme:m1", Channel.PUSH, 0) == (job.key, job.channel, job.step)
        assert ["accepted"] == kinds(harness, "m1")
        assert not harness.committer.peek()

    async def test_a_refusal_stages_nothing(self, tmp_path: Path) -> None:
        config = make_config(tmp_path, unknown_advertising="deny")
        harness = await Harness.start(config, MemoryStore(), Clock(NOON_UTC))
        (result,) = harness.requests([promo("m1")])
        assert ("rejected", "no_consent") == (result.status, result.reason)
        assert not harness.committer.peek()

    async def test_a_cancel_finishes_the_cascade_and_the_late_send_still_counts(
        self, harness: Harness
    ) -> None:
        job = await admitted(harness, "m1")
        assert harness.claim(job) is not None  # the request is on its way
        (cancelled,) = harness.requests([{"v": 1, "op": "cancel", "id": "m1", "tenant": "acme"}])
        assert cancelled.message is not None
        assert ("finished", Outcome.CANCELLED) == (
            cancelled.message.state,
            cancelled.message.outcome,
        )
        harness.router.feedback.send_succeeded(job, provider="push1", price=0.0, now=harness.now)
        await harness.commit()
        # the provider took it after the cancel: the CRM hears it went out anyway
        assert ["accepted", "cancelled", "sent"] == kinds(harness, "m1")


class TestReceipts:
    async def test_a_read_ends_the_cascade_with_the_read_as_final_event(
        self, harness: Harness
    ) -> None:
        await sent(harness, "m1")
        read = ProviderReceipt(ReceiptKind.READ, harness.now, message_key="acme:m1")
        harness.inbound(WebhookReceipts("push1", [read]))
        staged = harness.committer.peek()
        assert [("read", True)] == [(e.kind.value, e.final) for e in staged.events]
        await harness.commit()
        assert ["accepted", "sent", "read"] == kinds(harness, "m1")
        assert Outcome.READ == harness.state.finished["acme:m1"]
        assert [] == harness.take_jobs()  # no next step

    async def test_a_bounce_moves_on_and_is_counted_as_a_bounce(self, harness: Harness) -> None:
        job = await sent(harness, "m1")
        assert Channel.PUSH == job.channel
        bounced = ProviderReceipt(ReceiptKind.BOUNCED, harness.now, message_key="acme:m1")
        harness.inbound(WebhookReceipts("push1", [bounced]))
        await harness.commit()
        (next_job,) = harness.take_jobs()
        assert Channel.EMAIL == next_job.channel
        assert ["accepted", "sent", "failed"] == kinds(harness, "m1")
        sample = harness.registry.get_sample_value
        assert 1 == sample("gateway_receipts_total", {"channel": "push", "kind": "bounced"})

    async def test_a_repeated_click_is_counted_not_journalled(self, harness: Harness) -> None:
        await sent(harness, "m1")
        hit = TrackingHit(HitKind.CLICK, harness.now, key="acme:m1", channel=Channel.PUSH)
        harness.inbound(hit)
        await harness.commit()
        harness.inbound(hit)
        assert not harness.committer.peek()
        sample = harness.registry.get_sample_value
        labels = {"kind": "click", "verdict": "repeat"}
        assert 1 == sample("gateway_tracking_requests_total", labels)
        assert ["accepted", "sent", "clicked"] == kinds(harness, "m1")


class TestTimers:
    async def test_an_unread_step_times_out_into_the_next_channel(
        self, harness: Harness, mock_clock: trio.testing.MockClock
    ) -> None:
        await sent(harness, "m1")
        mock_clock.jump(PUSH_TIMEOUT_SECONDS - 1)
        assert 0 == harness.fire_timers()
        mock_clock.jump(1)
        assert 1 == harness.fire_timers()
        await harness.commit()
        (job,) = harness.take_jobs()
        assert (Channel.EMAIL, 1) == (job.channel, job.step)
        assert ["accepted", "sent", "step_timeout"] == kinds(harness, "m1")


class TestOptOuts:
    async def test_on_an_active_message_it_ends_it_and_every_cascade_of_the_recipient(
        self, harness: Harness
    ) -> None:
        await sent(harness, "m1", recipient_id="ann")
        await sent(harness, "m2", recipient_id="ann")
        opt_out = OptOut(
            "acme", "ann", Channel.PUSH, at=harness.now, source="one_click", key="acme:m1"
        )
        harness.inbound(opt_out)
        staged = harness.committer.peek()
        ((rkey, consent),) = staged.consents
        assert ("acme:ann", ConsentKind.ADVERTISING, ConsentAction.WITHDRAW, Channel.PUSH) == (
            rkey,
            consent.kind,
            consent.action,
            consent.channel,
        )
        await harness.commit()
        # both were waiting on push, which the recipient has just closed
        assert Outcome.UNSUBSCRIBED == harness.state.finished["acme:m1"]
        assert Outcome.UNSUBSCRIBED == harness.state.finished["acme:m2"]
        assert [] == harness.take_jobs()

    @pytest.mark.parametrize("after", ["finished", "restarted", "pruned"])
    async def test_on_a_message_that_is_over_it_still_withdraws(
        self, harness: Harness, mock_clock: trio.testing.MockClock, after: str
    ) -> None:
        """The first release answered "You are unsubscribed." here and did nothing."""
        await sent(harness, "m1", recipient_id="ann")
        read = ProviderReceipt(ReceiptKind.READ, harness.now, message_key="acme:m1")
        harness.inbound(WebhookReceipts("push1", [read]))
        await harness.commit()
        if after in ("restarted", "pruned"):
            harness = await harness.restart()
        if after == "pruned":
            mock_clock.jump(harness.config.store.idempotency_retention_seconds + 1)
            assert 1 == await harness.prune()
            harness = await harness.restart()
        harness.published.clear()
        opt_out = OptOut(
            "acme", "ann", Channel.PUSH, at=harness.now, source="one_click", key="acme:m1"
        )
        harness.inbound(opt_out)
        await harness.commit()
        # the CRM hears of it on the message's timeline while the message is remembered
        expected = ["unsubscribed"] if after != "pruned" else []
        assert expected == kinds(harness, "m1")

        (result,) = harness.requests([promo("m2", recipient_id="ann")])
        assert "accepted" == result.status
        assert result.channels is not None
        assert "push" not in result.channels

    async def test_a_provider_opt_out_naming_only_the_address_finds_the_recipient(
        self, harness: Harness
    ) -> None:
        """A Viber user leaving is reported by user id alone; the address index, rebuilt at
        restart, knows who was sent to it."""
        job = await admitted(harness, "m1", recipient_id="ann", channels=["viber"])
        record = harness.claim(job)
        assert record is not None
        harness.router.feedback.remember_address(record, Channel.VIBER, "viber-m1")
        harness.router.feedback.send_succeeded(job, provider="viber1", price=0.9, now=harness.now)
        await harness.commit()
        harness = await harness.restart()
        left = ProviderReceipt(ReceiptKind.UNSUBSCRIBED, harness.now, detail="viber-m1")
        harness.inbound(WebhookReceipts("viber1", [left]))
        await harness.commit()
        consents = harness.state.recipient("acme:ann").consents
        assert not consents.advertising(
            Channel.VIBER, "promo", harness.router.engine.rules["acme"].consent_defaults
        )


class TestRecovery:
    async def test_a_step_caught_mid_send_is_sent_again(self, harness: Harness) -> None:
        job = await admitted(harness, "m1")
        assert harness.claim(job) is not None  # in flight when the process dies
        harness = await harness.restart()
        assert [] == harness.take_jobs()  # queued once the recovery's batch is committed
        await harness.commit()
        (again,) = harness.take_jobs()
        assert (job.key, job.channel, job.step) == (again.key, again.channel, again.step)

    async def test_timers_and_caps_survive_a_restart(
        self, harness: Harness, mock_clock: trio.testing.MockClock
    ) -> None:
        await sent(harness, "m1")
        harness = await harness.restart()
        record = harness.state.records["acme:m1"]
        assert Status.AWAITING == record.cascade.status
        assert record.step_due == pytest.approx(NOON_UTC + PUSH_TIMEOUT_SECONDS)
        assert harness.state.history("acme:r-m1").sends()  # the send still counts
        mock_clock.jump(PUSH_TIMEOUT_SECONDS)
        assert 1 == harness.fire_timers()
        await harness.commit()
        (job,) = harness.take_jobs()
        assert Channel.EMAIL == job.channel

    async def test_what_was_staged_but_not_committed_is_gone(self, harness: Harness) -> None:
        harness.requests([promo("m1")])
        harness = await harness.restart()
        assert "acme:m1" not in harness.state.records
        (status,) = harness.requests([{"v": 1, "op": "status", "id": "m1", "tenant": "acme"}])
        assert ("rejected", "not_found") == (status.status, status.reason)


def test_status_kinds_of_facts_match() -> None:
    """The timeline names a fact by the same word as the core's table."""
    from gateway.core.receipts import Fact

    assert {f.value for f in Fact} <= {k.value for k in StatusKind}
