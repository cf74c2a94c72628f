"""A dropping quiet rule on the first channel skips it and keeps the plan (issue #15, item 5).

A push-only ``drop`` rule used to refuse a push -> email promo at night, although email was
allowed; now the cascade starts, the pre-send check skips push (``skipped``, ``quiet_hours``)
and the email goes, exactly as for a per-channel cap.
"""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from gateway.clock import Clock
from gateway.core.model import Channel
from gateway.store.memory import MemoryStore
from tests.runtime.harness import Harness
from tests.support import NOON_UTC, make_config, promo

PUSH_DROP_AT_NIGHT = """
[[policy.quiet_hours]]
start = 21:00:00
end = 09:00:00
channels = ["push"]
action = "drop"
"""
MIDNIGHT_UTC = NOON_UTC + 12 * 3600.0


class TestQuietDropOnTheFirstChannel:
    """Push is skipped at night; the email goes; only an all-push plan is refused."""

    async def test_a_push_email_promo_at_night_goes_by_email(
        self, tmp_path: Path, mock_clock: trio.testing.MockClock
    ) -> None:
        config = make_config(tmp_path, extra=PUSH_DROP_AT_NIGHT, cascade=("push", "email"))
        harness = await Harness.start(config, MemoryStore(), Clock(MIDNIGHT_UTC))
        (result,) = harness.requests([promo("m1")])
        assert ("accepted", ["push", "email"]) == (result.status, result.channels)
        await harness.commit()
        (push,) = harness.take_jobs()
        assert Channel.PUSH is push.channel
        assert None is harness.claim(push)  # the pre-send check skips push
        await harness.commit()
        (email,) = harness.take_jobs()
        assert Channel.EMAIL is email.channel
        assert None is not harness.claim(email)
        skipped = [e for e in harness.published if e.kind == "skipped"]
        assert [(Channel.PUSH, "quiet_hours")] == [(e.channel, e.detail) for e in skipped]

    async def test_a_push_only_promo_at_night_is_refused(
        self, tmp_path: Path, mock_clock: trio.testing.MockClock
    ) -> None:
        config = make_config(tmp_path, extra=PUSH_DROP_AT_NIGHT, cascade=("push",))
        harness = await Harness.start(config, MemoryStore(), Clock(MIDNIGHT_UTC))
        (result,) = harness.requests([promo("m1")])
        assert ("rejected", "quiet_hours") == (result.status, result.reason)


AFTERNOON_WINDOW = """
[[policy.send_windows]]
categories = ["promo"]
windows = [{ start = 15:00:00, end = 17:00:00 }]
"""


class TestSendWindowsAtTheEdge:
    """A promo outside its window waits for the next start; a later step waits too."""

    async def test_deferred_to_the_window_then_a_late_step_waits_for_the_next_one(
        self, tmp_path: Path, mock_clock: trio.testing.MockClock
    ) -> None:
        config = make_config(tmp_path, extra=AFTERNOON_WINDOW, cascade=("push", "email"))
        harness = await Harness.start(config, MemoryStore(), Clock(NOON_UTC))
        (result,) = harness.requests([promo("m1"), promo("otp", category="service")])[:1]
        assert result.deferred_until is not None
        assert NOON_UTC + 3 * 3600.0 == result.deferred_until.timestamp()
        await harness.commit()
        (service,) = harness.take_jobs()  # the service message ignores the window
        assert "acme:otp" == service.key
        mock_clock.jump(3 * 3600.0)
        assert 1 == harness.fire_timers()
        await harness.commit()
        (push,) = harness.take_jobs()
        assert None is not harness.claim(push)
        harness.router.feedback.send_succeeded(push, provider="push1", price=0.0, now=harness.now)
        await harness.commit()
        # push stays unread past 17:00: the email step waits for tomorrow's 15:00
        mock_clock.jump(2 * 3600.0)
        harness.fire_timers()
        await harness.commit()
        (email,) = harness.take_jobs()
        assert None is harness.claim(email)
        await harness.commit()
        deferred = [e for e in harness.published if e.kind == "deferred" and e.id == "m1"]
        assert ["send_window", "send_window"] == [e.detail for e in deferred]
        record = harness.state.records["acme:m1"]
        assert NOON_UTC + 27 * 3600.0 == record.step_due
