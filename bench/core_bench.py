"""Pure-core throughput on one core: policy decisions/s and cascade transitions/s.

    python bench/core_bench.py [--seconds 3]

Goal (issue 2): >= 100,000 policy decisions/s. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import zoneinfo
from collections.abc import Callable

from gateway.core.caps import CapAction, CapHistory, CapRule, SendEntry
from gateway.core.cascade import Cascade, Read, SendSucceeded, TimerFired
from gateway.core.consent import ConsentAction, ConsentKind, ConsentRecord, ConsentState
from gateway.core.control_group import ControlGroup
from gateway.core.model import Category, Channel, Envelope, Lane, TimerKind
from gateway.core.policy import PolicyRules, QuietRule, RecipientState, decide, gate
from gateway.core.quiet_hours import QuietWindow

NOW = 1_795_435_200.0  # Monday 12:00 UTC
PLAN = (Channel.PUSH, Channel.EMAIL, Channel.VIBER, Channel.SMS)
TIMEOUTS = (300.0, 3600.0, 1800.0, 86400.0)


def rules() -> PolicyRules:
    """The default config's policy: quiet hours, two caps, a 5% control group."""
    from datetime import time as clock_time

    return PolicyRules(
        control_group=ControlGroup(percent=5.0, salt="bench"),
        caps=(
            CapRule(
                "promo_weekly", 3, 7 * 86400.0, frozenset({Category.PROMO}), action=CapAction.REJECT
            ),
            CapRule("marketing_daily", 2, 86400.0, action=CapAction.DEFER),
        ),
        quiet_hours=(
            QuietRule(
                QuietWindow(clock_time(21), clock_time(9)),
                categories=frozenset({Category.PROMO, Category.CONTENT, Category.INFORMATIONAL}),
            ),
        ),
    )


def recipients(count: int) -> list[RecipientState]:
    """Recipients with a realistic state: consents on three channels, one or two recent sends."""
    states = []
    for index in range(count):
        consents = ConsentState()
        for channel in (Channel.PUSH, Channel.EMAIL, Channel.SMS):
            consents = consents.with_record(
                ConsentRecord(
                    ConsentKind.ADVERTISING,
                    ConsentAction.GRANT,
                    NOW - 86400,
                    "form",
                    channel=channel,
                )
            )
        history = CapHistory()
        for sent in range(index % 3):
            history = history.with_entry(
                SendEntry(
                    NOW - 3600 * (sent + 1), f"acme:old{index}-{sent}", Category.PROMO, Channel.PUSH
                ),
                horizon_seconds=7 * 86400,
            )
        states.append(RecipientState(consents, history))
    return states


def measure(label: str, seconds: float, batch: Callable[[], int]) -> float:
    done = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        done += batch()
    elapsed = time.perf_counter() - started
    rate = done / elapsed
    print(f"{label:<44} {rate:>12,.0f} /s   ({elapsed / done * 1e6:6.2f} µs each)")
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {0})  # one core, as the goal is stated
    policy = rules()
    states = recipients(1000)
    zones = [
        zoneinfo.ZoneInfo(name)
        for name in ("Europe/Moscow", "Asia/Novosibirsk", "Europe/London", "America/New_York")
    ]
    envelopes = [
        Envelope(
            "acme",
            f"r{index}",
            Category.PROMO if index % 4 else Category.SERVICE,
            "promo",
            Lane.NORMAL,
            PLAN,
        )
        for index in range(1000)
    ]

    print(
        f"cascadegw core benchmark: {platform.python_implementation()} {platform.python_version()}, pinned to one core"
    )

    def decisions() -> int:
        for index in range(1000):
            decide(
                envelopes[index],
                states[index],
                policy,
                message=f"acme:m{index}",
                now=NOW,
                tz=zones[index & 3],
            )
        return 1000

    def gates() -> int:
        for index in range(1000):
            gate(
                envelopes[index],
                states[index],
                policy,
                message=f"acme:m{index}",
                channel=Channel.EMAIL,
                now=NOW,
                tz=zones[index & 3],
            )
        return 1000

    def transitions() -> int:
        # a full walk: send push, push accepted, unread timeout -> email, accepted, read: 4 transitions
        for _ in range(250):
            cascade, _ = Cascade.start(plan=PLAN, timeouts=TIMEOUTS, allowed=0b1111, now=NOW)
            cascade, _ = cascade.handle(SendSucceeded(Channel.PUSH), now=NOW)
            cascade, _ = cascade.handle(TimerFired(TimerKind.STEP), now=NOW + 300)
            cascade, _ = cascade.handle(SendSucceeded(Channel.EMAIL), now=NOW + 301)
            cascade, _ = cascade.handle(Read(Channel.EMAIL), now=NOW + 900)
        return 1000

    decided = measure("policy decisions (decide)", args.seconds, decisions)
    measure("pre-send checks (gate)", args.seconds, gates)
    measure("cascade transitions (start + handle)", args.seconds, transitions)
    goal = 100_000
    print(
        f"goal: >= {goal:,} decisions/s -> {'met' if decided >= goal else 'MISSED'} ({decided / goal:.0%} of goal)"
    )


if __name__ == "__main__":
    main()
