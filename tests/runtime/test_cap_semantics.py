"""Deferring and rejecting caps together, through the router (issue #15, item 4).

The default config's caps: promos at most three per week (reject), marketing at most two per
day (defer). Five promos to one recipient in one day used to be deferred, all five past the
second, to the same instant a day later (deferred messages took no slot), and ``capped`` was
never answered although the weekly cap could not let more than one of them through.
"""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from gateway.clock import Clock
from gateway.store.memory import MemoryStore
from tests.runtime.harness import Harness
from tests.support import NOON_UTC, make_config, promo

DAY_SECONDS = 86400.0

DEMO_CAPS = """
[[policy.caps]]
name = "promo_weekly"
max_count = 3
window_seconds = 604800
categories = ["promo"]
action = "reject"

[[policy.caps]]
name = "marketing_daily"
max_count = 2
window_seconds = 86400
action = "defer"
"""


class TestDeferringAndRejectingCaps:
    """A burst is spread over the slots that free up, and what cannot fit is capped at once."""

    async def test_five_promos_in_a_day_to_one_recipient(
        self, tmp_path: Path, mock_clock: trio.testing.MockClock
    ) -> None:
        config = make_config(tmp_path, extra=DEMO_CAPS)
        harness = await Harness.start(config, MemoryStore(), Clock(NOON_UTC))
        answers = []
        for index in range(5):
            (result,) = harness.requests([promo(f"m{index}", recipient_id="r1")])
            answers.append(result)
            await harness.commit()
            mock_clock.jump(60.0)
        assert ["accepted", "accepted", "accepted", "rejected", "rejected"] == [
            a.status for a in answers
        ]
        assert [None, None, None, "capped", "capped"] == [a.reason for a in answers]
        # the third waits for the first's slot of the daily cap to free up, to the second
        deferred = answers[2].deferred_until
        assert deferred is not None
        assert NOON_UTC + DAY_SECONDS == deferred.timestamp()

    async def test_deferrals_spread_over_the_slots_that_free_up(
        self, tmp_path: Path, mock_clock: trio.testing.MockClock
    ) -> None:
        # no weekly cap: five promos go two a day, each deferral to its own slot
        daily_only = DEMO_CAPS.split("[[policy.caps]]")[2]
        config = make_config(tmp_path, extra="[[policy.caps]]" + daily_only)
        harness = await Harness.start(config, MemoryStore(), Clock(NOON_UTC))
        until = []
        for index in range(5):
            (result,) = harness.requests([promo(f"m{index}", recipient_id="r1")])
            assert "accepted" == result.status
            until.append(
                None if result.deferred_until is None else result.deferred_until.timestamp()
            )
            await harness.commit()
            mock_clock.jump(60.0)
        assert [
            None,
            None,
            NOON_UTC + DAY_SECONDS,
            NOON_UTC + 60.0 + DAY_SECONDS,
            NOON_UTC + 2 * DAY_SECONDS,
        ] == until
