"""The cascade value: table-driven walks through the scenarios of docs/domain.md, and a state machine.

The examples pin the exact commands of each happy path. The state machine drives random plans
and random events (late, duplicate, for other channels, for channels outside the plan) and keeps
its own model of consent, the send in flight and the timers, so every rule of
``gateway/core/cascade.py`` is checked against facts the test derived itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from gateway.core.cascade import (
    Cancelled,
    CancelTimer,
    Cascade,
    CascadeEvent,
    Clicked,
    Command,
    ConsentChanged,
    Converted,
    Delivered,
    Dropped,
    Expired,
    Finish,
    Read,
    Send,
    SendFailed,
    SendSucceeded,
    StartTimer,
    Status,
    StepDeferred,
    StepSkipped,
    TimerFired,
    Unsubscribed,
)
from gateway.core.model import (
    ALL_CHANNELS,
    ALL_CHANNELS_MASK,
    DEFAULT_CASCADE,
    Channel,
    Outcome,
    TimerKind,
)
from tests.core.masks import channel_mask

PUSH, EMAIL, VIBER, SMS = Channel.PUSH, Channel.EMAIL, Channel.VIBER, Channel.SMS
STEP, EXPIRY = TimerKind.STEP, TimerKind.EXPIRY
TIMEOUTS = (
    300.0,
    3600.0,
    1800.0,
    86400.0,
)  # the default timeouts: push 5 min, email 1 h, Viber 30 min
ALL = ALL_CHANNELS_MASK

Step = tuple[float, CascadeEvent, list[Command]]
"""One row of a scenario: at ``now``, this event gives these commands."""


def start_default(
    *,
    allowed: int = ALL,
    expires_at: float | None = None,
    defer_until: float | None = None,
) -> tuple[Cascade, list[Command]]:
    return Cascade.start(
        plan=DEFAULT_CASCADE,
        timeouts=TIMEOUTS,
        allowed=allowed,
        now=0.0,
        expires_at=expires_at,
        defer_until=defer_until,
    )


def drive(cascade: Cascade, steps: list[Step]) -> tuple[Cascade, list[list[Command]]]:
    """Feed each row's event in order; returns the final value and each row's commands."""
    actual: list[list[Command]] = []
    for now, event, _ in steps:
        cascade, commands = cascade.handle(event, now=now)
        actual.append(commands)
    return cascade, actual


def cascade_of(
    *,
    step: int,
    status: Status,
    sent: tuple[Channel, ...] = (),
    outcome: Outcome | None = None,
    allowed: int = ALL,
    expires_at: float | None = None,
) -> Cascade:
    """A default-plan cascade value, for comparing whole states."""
    return Cascade(
        DEFAULT_CASCADE, TIMEOUTS, allowed, step, status, channel_mask(sent), outcome, expires_at
    )


# ---------------------------------------------------------------- examples (docs/domain.md)
SCENARIOS: dict[str, tuple[int, list[Step], Cascade]] = {
    "push opened: finished READ, no email": (
        ALL,
        [
            (1.0, SendSucceeded(PUSH), [StartTimer(STEP, 301.0)]),
            (60.0, Read(PUSH), [CancelTimer(STEP), Finish(Outcome.READ)]),
            (500.0, TimerFired(STEP), []),
        ],
        cascade_of(step=0, status=Status.FINISHED, sent=(PUSH,), outcome=Outcome.READ),
    ),
    "push unread: email after the push timeout, email opened stops": (
        ALL,
        [
            (1.0, SendSucceeded(PUSH), [StartTimer(STEP, 301.0)]),
            (301.0, TimerFired(STEP), [CancelTimer(STEP), Send(EMAIL, 1)]),
            (302.0, SendSucceeded(EMAIL), [StartTimer(STEP, 3902.0)]),
            (900.0, Read(EMAIL), [CancelTimer(STEP), Finish(Outcome.READ)]),
        ],
        cascade_of(step=1, status=Status.FINISHED, sent=(PUSH, EMAIL), outcome=Outcome.READ),
    ),
    "nothing read: viber, then SMS delivered": (
        ALL,
        [
            (1.0, SendSucceeded(PUSH), [StartTimer(STEP, 301.0)]),
            (301.0, TimerFired(STEP), [CancelTimer(STEP), Send(EMAIL, 1)]),
            (302.0, SendSucceeded(EMAIL), [StartTimer(STEP, 3902.0)]),
            (3902.0, TimerFired(STEP), [CancelTimer(STEP), Send(VIBER, 2)]),
            (3903.0, SendSucceeded(VIBER), [StartTimer(STEP, 5703.0)]),
            (5703.0, TimerFired(STEP), [CancelTimer(STEP), Send(SMS, 3)]),
            (5704.0, SendSucceeded(SMS), [StartTimer(STEP, 92104.0)]),
            (5710.0, Delivered(SMS), [CancelTimer(STEP), Finish(Outcome.DELIVERED)]),
        ],
        cascade_of(
            step=3,
            status=Status.FINISHED,
            sent=(PUSH, EMAIL, VIBER, SMS),
            outcome=Outcome.DELIVERED,
        ),
    ),
    "viber not allowed: straight from email to SMS": (
        channel_mask((PUSH, EMAIL, SMS)),
        [
            (1.0, SendFailed(PUSH, permanent=True), [Send(EMAIL, 1)]),
            (2.0, SendSucceeded(EMAIL), [StartTimer(STEP, 3602.0)]),
            (3602.0, TimerFired(STEP), [CancelTimer(STEP), Send(SMS, 3)]),
            (3603.0, SendSucceeded(SMS), [StartTimer(STEP, 90003.0)]),
            (90003.0, TimerFired(STEP), [CancelTimer(STEP), Finish(Outcome.EXHAUSTED)]),
        ],
        cascade_of(
            step=3,
            status=Status.FINISHED,
            sent=(EMAIL, SMS),
            outcome=Outcome.EXHAUSTED,
            allowed=channel_mask((PUSH, EMAIL, SMS)),
        ),
    ),
    "late read of an earlier channel after moving on still finishes READ": (
        ALL,
        [
            (1.0, SendSucceeded(PUSH), [StartTimer(STEP, 301.0)]),
            (301.0, TimerFired(STEP), [CancelTimer(STEP), Send(EMAIL, 1)]),
            (310.0, Read(PUSH), [Finish(Outcome.READ)]),
            (311.0, SendSucceeded(EMAIL), []),
        ],
        cascade_of(step=1, status=Status.FINISHED, sent=(PUSH,), outcome=Outcome.READ),
    ),
    "bounce while awaiting moves on at once": (
        ALL,
        [
            (1.0, SendSucceeded(PUSH), [StartTimer(STEP, 301.0)]),
            (5.0, SendFailed(PUSH, permanent=True), [CancelTimer(STEP), Send(EMAIL, 1)]),
            (6.0, StepSkipped(EMAIL, "capped"), [Send(VIBER, 2)]),
            (7.0, Clicked(VIBER), [Finish(Outcome.CLICKED)]),
        ],
        cascade_of(step=2, status=Status.FINISHED, sent=(PUSH, VIBER), outcome=Outcome.CLICKED),
    ),
    "withdrawal of the current channel stops the cascade": (
        ALL,
        [
            (1.0, SendSucceeded(PUSH), [StartTimer(STEP, 301.0)]),
            (
                2.0,
                ConsentChanged(channel_mask((EMAIL, SMS))),
                [CancelTimer(STEP), Finish(Outcome.UNSUBSCRIBED)],
            ),
        ],
        cascade_of(
            step=0,
            status=Status.FINISHED,
            sent=(PUSH,),
            outcome=Outcome.UNSUBSCRIBED,
            allowed=channel_mask((EMAIL, SMS)),
        ),
    ),
    "withdrawal of a later channel is remembered and skipped": (
        ALL,
        [
            (1.0, ConsentChanged(channel_mask((PUSH, SMS))), []),
            (2.0, SendFailed(PUSH, permanent=False), [Send(SMS, 3)]),
        ],
        cascade_of(step=3, status=Status.SENDING, allowed=channel_mask((PUSH, SMS))),
    ),
    "a deferred step is sent when its timer fires": (
        ALL,
        [
            (1.0, StepDeferred(until=7200.0), [StartTimer(STEP, 7200.0)]),
            (7200.0, TimerFired(STEP), [Send(PUSH, 0)]),
        ],
        cascade_of(step=0, status=Status.SENDING),
    ),
}


class TestCascadeScenarios:
    """The walks of docs/domain.md give exactly these commands and end in exactly these states."""

    @pytest.mark.parametrize(
        ("allowed", "steps", "expected_final"), SCENARIOS.values(), ids=SCENARIOS.keys()
    )
    def test_scenario(self, allowed: int, steps: list[Step], expected_final: Cascade) -> None:
        cascade, commands = start_default(allowed=allowed)
        first = next(i for i, c in enumerate(DEFAULT_CASCADE) if allowed & c.bit)

        final, actual = drive(cascade, steps)

        assert [Send(DEFAULT_CASCADE[first], first)] == commands
        assert [expected for _, _, expected in steps] == actual
        assert expected_final == final

    def test_push_opened_never_reaches_email(self) -> None:
        cascade, _ = start_default()
        steps: list[Step] = [
            (1.0, SendSucceeded(PUSH), [StartTimer(STEP, 301.0)]),
            (2.0, Read(PUSH), [CancelTimer(STEP), Finish(Outcome.READ)]),
        ]

        final, actual = drive(cascade, steps)

        assert [] == [c for commands in actual for c in commands if isinstance(c, Send)]
        assert (True, Outcome.READ, 1) == (final.finished, final.outcome, final.depth)

    def test_sms_delivery_finishes_delivered(self) -> None:
        cascade, commands = Cascade.start(plan=(SMS,), timeouts=(60.0,), allowed=ALL, now=0.0)

        final, actual = drive(
            cascade,
            [
                (1.0, SendSucceeded(SMS), [StartTimer(STEP, 61.0)]),
                (2.0, Delivered(SMS), [CancelTimer(STEP), Finish(Outcome.DELIVERED)]),
            ],
        )

        assert [Send(SMS, 0)] == commands
        assert [[StartTimer(STEP, 61.0)], [CancelTimer(STEP), Finish(Outcome.DELIVERED)]] == actual
        assert (Outcome.DELIVERED, SMS.bit) == (final.outcome, final.sent)

    @pytest.mark.parametrize("channel", [PUSH, EMAIL, VIBER])
    def test_delivery_on_a_channel_with_read_signal_does_not_finish(self, channel: Channel) -> None:
        cascade, _ = Cascade.start(plan=(channel, SMS), timeouts=(60.0, 60.0), allowed=ALL, now=0)
        awaiting, _ = cascade.handle(SendSucceeded(channel), now=1.0)

        actual = awaiting.handle(Delivered(channel), now=2.0)

        assert (awaiting, []) == actual

    def test_start_with_nothing_allowed_finishes_no_channel(self) -> None:
        expected = (
            cascade_of(step=0, status=Status.FINISHED, outcome=Outcome.NO_CHANNEL, allowed=0),
            [Finish(Outcome.NO_CHANNEL)],
        )

        actual = start_default(allowed=0, expires_at=100.0, defer_until=50.0)

        assert expected == actual

    def test_start_skips_channels_consent_does_not_allow(self) -> None:
        allowed = channel_mask((VIBER, SMS))
        expected = (cascade_of(step=2, status=Status.SENDING, allowed=allowed), [Send(VIBER, 2)])

        assert expected == start_default(allowed=allowed)

    def test_start_deferred_then_timer_sends(self) -> None:
        cascade, commands = start_default(defer_until=3600.0)

        sending, actual = cascade.handle(TimerFired(STEP), now=3600.0)

        assert [StartTimer(STEP, 3600.0)] == commands
        assert cascade_of(step=0, status=Status.DEFERRED) == cascade
        assert [Send(PUSH, 0)] == actual
        assert cascade_of(step=0, status=Status.SENDING) == sending

    def test_defer_until_in_the_past_sends_now(self) -> None:
        assert [Send(PUSH, 0)] == start_default(defer_until=0.0)[1]

    def test_expiry_timer_started_at_start_and_cancelled_on_finish(self) -> None:
        cascade, commands = start_default(expires_at=86400.0, defer_until=10.0)

        final, actual = cascade.handle(Cancelled(), now=5.0)

        assert [StartTimer(EXPIRY, 86400.0), StartTimer(STEP, 10.0)] == commands
        assert [CancelTimer(STEP), CancelTimer(EXPIRY), Finish(Outcome.CANCELLED)] == actual
        expected = cascade_of(
            step=0, status=Status.FINISHED, outcome=Outcome.CANCELLED, expires_at=86400.0
        )
        assert expected == final

    @pytest.mark.parametrize(
        ("event", "outcome"),
        [
            (Converted(), Outcome.CONVERTED),
            (Cancelled(), Outcome.CANCELLED),
            (Dropped("caps: marketing_daily"), Outcome.DROPPED),
            (Expired(), Outcome.EXPIRED),
            (TimerFired(EXPIRY), Outcome.EXPIRED),
            (ConsentChanged(0), Outcome.UNSUBSCRIBED),
            (Unsubscribed(), Outcome.UNSUBSCRIBED),
        ],
    )
    def test_stop_events_finish_with_their_outcome(
        self, event: CascadeEvent, outcome: Outcome
    ) -> None:
        cascade, _ = start_default()  # SENDING: no timer to cancel

        final, commands = cascade.handle(event, now=1.0)

        assert ([Finish(outcome)], Status.FINISHED, outcome) == (
            commands,
            final.status,
            final.outcome,
        )
        assert (final, []) == final.handle(TimerFired(STEP), now=2.0)

    def test_plan_and_timeouts_must_have_the_same_length(self) -> None:
        with pytest.raises(ValueError, match="same length"):
            Cascade.start(plan=(PUSH, EMAIL), timeouts=(300.0,), allowed=ALL, now=0.0)

    def test_queries(self) -> None:
        cascade, _ = start_default(allowed=channel_mask((EMAIL, SMS)))
        awaiting, _ = cascade.handle(SendSucceeded(EMAIL), now=1.0)

        assert (EMAIL, False, 1) == (awaiting.channel, awaiting.finished, awaiting.depth)


def _sending() -> Cascade:
    return start_default()[0]


def _awaiting() -> Cascade:
    return _sending().handle(SendSucceeded(PUSH), now=1.0)[0]


def _deferred() -> Cascade:
    return start_default(defer_until=100.0)[0]


def _finished() -> Cascade:
    return _sending().handle(Cancelled(), now=1.0)[0]


STATES = {"sending": _sending, "awaiting": _awaiting, "deferred": _deferred}
IGNORED: list[tuple[str, CascadeEvent]] = [
    # receipts for a channel that is not the current step (push is current)
    *(
        (state, event)
        for state in STATES
        for event in (SendSucceeded(EMAIL), SendFailed(SMS, True))
    ),
    *(
        (state, event)
        for state in STATES
        for event in (Delivered(SMS), Read(EMAIL), Clicked(VIBER))
    ),
    ("sending", StepSkipped(EMAIL, "capped")),
    # receipts that do not apply in this status
    ("awaiting", SendSucceeded(PUSH)),
    ("awaiting", StepSkipped(PUSH, "capped")),
    ("awaiting", StepDeferred(until=50.0)),
    ("deferred", SendSucceeded(PUSH)),
    ("deferred", SendFailed(PUSH, False)),
    ("deferred", StepSkipped(PUSH, "capped")),
    ("deferred", StepDeferred(until=50.0)),
    ("deferred", Read(PUSH)),
    ("sending", TimerFired(STEP)),  # a stale timer: a SENDING step holds none
]


class TestCascadeAbsorbs:
    """Late, duplicate and foreign receipts leave the value as it was and command nothing."""

    @pytest.mark.parametrize(("state", "event"), IGNORED, ids=repr)
    def test_ignored(self, state: str, event: CascadeEvent) -> None:
        cascade = STATES[state]()

        assert (cascade, []) == cascade.handle(event, now=2.0)

    @pytest.mark.parametrize(
        "event",
        [
            SendSucceeded(PUSH),
            SendFailed(PUSH, True),
            Delivered(SMS),
            Read(PUSH),
            Clicked(PUSH),
            Converted(),
            Cancelled(),
            ConsentChanged(0),
            TimerFired(STEP),
            TimerFired(EXPIRY),
            Expired(),
            StepDeferred(until=9.0),
            StepSkipped(PUSH, "capped"),
            Dropped("capped"),
            Unsubscribed(),
        ],
        ids=repr,
    )
    def test_finished_absorbs_everything(self, event: CascadeEvent) -> None:
        cascade = _finished()

        actual_value, actual_commands = cascade.handle(event, now=2.0)

        assert (cascade, []) == (actual_value, actual_commands)
        assert actual_value is cascade


class TestCascadeJournal:
    """A cascade is journalled as msgpack and comes back equal, in every status."""

    @pytest.mark.parametrize("make", [_sending, _awaiting, _deferred, _finished])
    def test_msgpack_round_trip(self, make: Callable[[], Cascade]) -> None:
        expected = msgspec.structs.replace(make(), expires_at=123.5)

        actual = msgspec.msgpack.decode(msgspec.msgpack.encode(expected), type=Cascade)

        assert expected == actual
        assert (type(expected.status), type(expected.plan[0])) == (
            type(actual.status),
            type(actual.plan[0]),
        )


# ---------------------------------------------------------------- the state machine
@dataclass
class StepTimer:
    purpose: str  # "unread" (after a successful send) or "defer" (before sending)
    fired: bool = False


masks = st.integers(min_value=0, max_value=ALL)
mostly_all = st.just(ALL) | masks  # without this, half the one-channel plans have no channel
mostly = st.sampled_from([True, True, True, False])
channels = st.sampled_from(ALL_CHANNELS)
delays = st.floats(min_value=0.0, max_value=100_000.0, allow_nan=False)


Plan = tuple[tuple[Channel, ...], tuple[float, ...]]
StartConfig = tuple[Plan, int, float | None, float | None]
"""``(plan, timeouts), allowed, expires_in, defer_by``: what ``Cascade.start`` gets."""


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    size = draw(st.sampled_from([1, 2, 3, 4, 4, 4]))  # long plans have the most to get wrong
    plan = draw(st.permutations(ALL_CHANNELS))[:size]
    timeouts = draw(
        st.lists(
            st.floats(min_value=1.0, max_value=86_400.0), min_size=len(plan), max_size=len(plan)
        )
    )
    return tuple(plan), tuple(timeouts)


stops = st.sampled_from(
    [
        Converted(),
        Cancelled(),
        Expired(),
        TimerFired(EXPIRY),
        Dropped("cap"),
        Unsubscribed(),
        None,  # a withdrawal covering the current step: rare by chance, so named here
    ]
)


def starts() -> st.SearchStrategy[StartConfig]:
    return st.tuples(
        plans(),
        mostly_all,
        st.none() | delays,
        st.none() | st.floats(min_value=-100.0, max_value=100_000.0),
    )


class CascadeMachine(RuleBasedStateMachine):
    """Random events against a model that knows only what the edge would know."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 1_000_000.0
        self.cascade = Cascade((PUSH,), (1.0,), 0, 0, Status.FINISHED)  # replaced by start
        self.reset(0)

    def reset(self, allowed: int) -> None:
        """Forget the previous message: the model of a fresh cascade."""
        self.consent = allowed  # the mask last given (start, then ConsentChanged)
        self.step = 0  # the index of the step the model believes is current
        self.in_flight: Channel | None = None  # a Send with no answer yet
        self.awaiting: Channel | None = None  # the provider took it; waiting for a read
        self.deferred = False
        self.succeeded: set[Channel] = set()  # channels the provider took the message on
        self.step_timer: StepTimer | None = None
        self.expiry_started = False
        self.expiry_timer = False  # started and neither fired nor cancelled
        self.finished = False
        self.finishes = 0

    # ------------------------------------------------------------ helpers
    def next_allowed(self, after: int) -> int | None:
        plan = self.cascade.plan
        return next((i for i in range(after + 1, len(plan)) if self.consent & plan[i].bit), None)

    @property
    def live(self) -> Channel | None:
        """The channel of the step a Send is out for (in flight or awaiting a read)."""
        return self.in_flight if self.in_flight is not None else self.awaiting

    def pick(self, channel: Channel, current: bool) -> Channel:
        """The drawn channel, or (half the time) the current step's, so receipts match."""
        return self.cascade.plan[self.step] if current else channel

    # ------------------------------------------------------------ start
    @initialize(config=starts())
    def start(self, config: StartConfig) -> None:
        self.begin(config)

    @rule(config=starts(), event=stops, allowed=masks, delay=delays)
    def next_message(
        self, config: StartConfig, event: CascadeEvent | None, allowed: int, delay: float
    ) -> None:
        """Most cascades finish within a few events; stop this one and start another."""
        if not self.finished:
            self.stop(event, allowed, delay)
        self.handle(Converted(), delay)  # one more event for the finished value to absorb
        self.begin(config)

    def begin(self, config: StartConfig) -> None:
        (plan, timeouts), allowed, expires_in, defer_by = config
        now = self.now
        expires_at = None if expires_in is None else now + expires_in
        defer_until = None if defer_by is None else now + defer_by
        self.reset(allowed)

        cascade, commands = Cascade.start(
            plan=plan,
            timeouts=timeouts,
            allowed=allowed,
            now=now,
            expires_at=expires_at,
            defer_until=defer_until,
        )
        self.cascade = cascade

        first = self.next_allowed(-1)
        if first is None:
            assert [Finish(Outcome.NO_CHANNEL)] == commands
            assert (Status.FINISHED, Outcome.NO_CHANNEL) == (cascade.status, cascade.outcome)
            self.finished, self.finishes = True, 1
            return
        expected: list[Command] = []
        if expires_at is not None:
            expected.append(StartTimer(EXPIRY, expires_at))
            self.expiry_started = self.expiry_timer = True
        self.step = first
        if defer_until is not None and defer_until > now:
            expected.append(StartTimer(STEP, defer_until))
            self.step_timer, self.deferred = StepTimer("defer"), True
        else:
            expected.append(Send(plan[first], first))
            self.in_flight = plan[first]
        assert expected == commands
        assert first == cascade.step

    # ------------------------------------------------------------ events
    @rule(channel=channels, current=st.booleans(), delay=delays)
    def send_succeeded(self, channel: Channel, current: bool, delay: float) -> None:
        self.handle(SendSucceeded(self.pick(channel, current)), delay)

    @rule(channel=channels, current=st.booleans(), permanent=st.booleans(), delay=delays)
    def send_failed(self, channel: Channel, current: bool, permanent: bool, delay: float) -> None:
        self.handle(SendFailed(self.pick(channel, current), permanent), delay)

    @rule(channel=channels, current=st.booleans(), delay=delays)
    def delivered(self, channel: Channel, current: bool, delay: float) -> None:
        self.handle(Delivered(self.pick(channel, current)), delay)

    @rule(channel=channels, current=st.booleans(), clicked=st.booleans(), delay=delays)
    def read(self, channel: Channel, current: bool, clicked: bool, delay: float) -> None:
        picked = self.pick(channel, current)
        self.handle(Clicked(picked) if clicked else Read(picked), delay)

    @rule(event=stops, allowed=masks, delay=delays)
    def stop(self, event: CascadeEvent | None, allowed: int, delay: float) -> None:
        if event is None:
            event = ConsentChanged(allowed & ~self.cascade.plan[self.step].bit)
        self.handle(event, delay)

    @rule(allowed=masks, keep_current=mostly, delay=delays)
    def consent_changed(self, allowed: int, keep_current: bool, delay: float) -> None:
        if keep_current:  # half the time, a change that leaves the current channel allowed
            allowed |= self.cascade.plan[self.step].bit
        self.handle(ConsentChanged(allowed), delay)

    @rule(delay=delays)
    def step_timer_fired(self, delay: float) -> None:
        self.handle(TimerFired(STEP), delay)

    # The rules above finish most cascades within a few events; these move them along, so
    # that deep plans, AWAITING steps, exhaustion and late receipts are reached often.
    @rule(delay=delays)
    def provider_took_the_current_step(self, delay: float) -> None:
        self.handle(SendSucceeded(self.cascade.plan[self.step]), delay)

    @rule(delay=delays, unread_for=delays)
    def current_step_goes_unread(self, delay: float, unread_for: float) -> None:
        self.handle(SendSucceeded(self.cascade.plan[self.step]), delay)
        self.handle(TimerFired(STEP), unread_for)

    @rule(delay=delays, bounced_after=delays)
    def current_step_bounces(self, delay: float, bounced_after: float) -> None:
        self.handle(SendSucceeded(self.cascade.plan[self.step]), delay)
        self.handle(SendFailed(self.cascade.plan[self.step], permanent=True), bounced_after)

    @rule(
        index=st.integers(min_value=0, max_value=3),
        kind=st.sampled_from([Read, Clicked, Delivered]),
        delay=delays,
    )
    def late_receipt(
        self, index: int, kind: type[Read | Clicked | Delivered], delay: float
    ) -> None:
        """A receipt for a channel the cascade moved on from (moving on first if need be)."""
        if not self.succeeded - {self.live} and not self.finished:
            self.current_step_goes_unread(delay, delay)
        earlier = sorted(self.succeeded - {self.live}) or list(ALL_CHANNELS)
        self.handle(kind(earlier[index % len(earlier)]), delay)

    @rule(until_in=st.floats(min_value=-100.0, max_value=100_000.0), delay=delays)
    def step_deferred(self, until_in: float, delay: float) -> None:
        self.handle(StepDeferred(until=self.now + delay + until_in), delay)

    @rule(channel=channels, current=st.booleans(), delay=delays)
    def step_skipped(self, channel: Channel, current: bool, delay: float) -> None:
        self.handle(StepSkipped(self.pick(channel, current), "capped"), delay)

    # ------------------------------------------------------------ the checks
    def handle(self, event: CascadeEvent, delay: float) -> None:
        self.now += delay
        before = self.cascade
        after, commands = before.handle(event, now=self.now)
        self.cascade = after

        if self.finished:
            assert after is before, f"FINISHED changed on {event!r}"
            assert [] == commands, f"FINISHED commanded on {event!r}"
            return
        assert after.step >= before.step, "step decreased"

        step, live = self.step, self.live
        expected_outcome = self.stop_outcome(event, live)
        timed_out = (
            event == TimerFired(STEP)
            and self.step_timer is not None
            and self.step_timer.purpose == "unread"
        )
        advances = expected_outcome is None and (
            timed_out
            or (isinstance(event, SendFailed) and live is not None and event.channel is live)
            or (isinstance(event, StepSkipped) and event.channel is self.in_flight is not None)
        )
        resumes = (
            expected_outcome is None
            and event == TimerFired(STEP)
            and self.step_timer is not None
            and self.step_timer.purpose == "defer"
        )
        if isinstance(event, ConsentChanged):
            self.consent = event.allowed
        if isinstance(event, TimerFired):
            if event.kind is STEP and self.step_timer is not None:
                self.step_timer.fired = True
            if event.kind is EXPIRY:
                self.expiry_timer = False

        following = self.next_allowed(step) if advances else None
        if advances and following is None:
            expected_outcome = Outcome.EXHAUSTED

        # -- the send in flight is answered (the model learns it from the event alone)
        if isinstance(event, SendSucceeded) and event.channel is self.in_flight:
            self.succeeded.add(event.channel)
            self.in_flight, self.awaiting = None, event.channel
        elif advances:
            self.in_flight = self.awaiting = None
        elif isinstance(event, StepDeferred) and self.in_flight is not None:
            self.in_flight, self.deferred = None, True

        sends = [c for c in commands if isinstance(c, Send)]
        for command in commands:
            self.apply(command, event)

        if expected_outcome is not None:
            assert [] == sends, f"sent after {event!r}"
            assert Finish(expected_outcome) == commands[-1], f"{event!r} gave {commands!r}"
            assert (Status.FINISHED, expected_outcome) == (after.status, after.outcome)
            assert self.step_timer is None, "a STEP timer outlives the cascade"
            assert not self.expiry_timer, "the EXPIRY timer outlives the cascade"
            self.finished = True
        else:
            assert not after.finished, f"{event!r} finished the cascade: {commands!r}"
            if advances:
                assert following is not None
                assert [Send(after.plan[following], following)] == sends
            elif resumes:
                assert [Send(after.plan[step], step)] == sends
            else:
                assert [] == sends, f"unprompted send on {event!r}"
        if sends:
            assert self.step_timer is None or self.step_timer.fired, "moved on, STEP timer set"
        if self.step_timer is not None and self.step_timer.fired:
            self.step_timer = None  # a fired timer is gone
        assert self.step == after.step
        assert self.consent == after.allowed

    def stop_outcome(self, event: CascadeEvent, live: Channel | None) -> Outcome | None:
        """The outcome ``event`` must finish with at once, from the model's facts alone."""
        match event:
            case Converted():
                return Outcome.CONVERTED
            case Cancelled():
                return Outcome.CANCELLED
            case Dropped():
                return Outcome.DROPPED
            case Unsubscribed():
                return Outcome.UNSUBSCRIBED
            case Expired() | TimerFired(kind=TimerKind.EXPIRY):
                return Outcome.EXPIRED
            case Read(channel=channel) if channel is live or channel in self.succeeded:
                return Outcome.READ
            case Clicked(channel=channel) if channel is live or channel in self.succeeded:
                return Outcome.CLICKED
            case Delivered(channel=channel) if channel is SMS and channel is live:
                return Outcome.DELIVERED
            case ConsentChanged(allowed=allowed) if not allowed & self.cascade.plan[self.step].bit:
                return Outcome.UNSUBSCRIBED
            case _:
                return None

    def apply(self, command: Command, event: CascadeEvent) -> None:
        """Run one command against the model, checking it was allowed to be given."""
        match command:
            case Send(channel=channel, step=step):
                assert channel in self.cascade.plan, f"{channel} is not in the plan"
                assert channel is self.cascade.plan[step]
                assert self.consent & channel.bit, f"sent to {channel} without consent"
                assert self.in_flight is None, "a second send while one is in flight"
                assert not self.finished
                self.in_flight, self.awaiting, self.deferred = channel, None, False
                self.step = step
            case StartTimer(kind=TimerKind.STEP, at=at):
                assert self.step_timer is None or self.step_timer.fired, "two STEP timers"
                if isinstance(event, SendSucceeded):
                    assert self.now + self.cascade.timeouts[self.step] == at
                    self.step_timer = StepTimer("unread")
                else:
                    assert isinstance(event, StepDeferred), f"STEP timer on {event!r}"
                    assert event.until == at
                    self.step_timer = StepTimer("defer")
            case StartTimer(kind=TimerKind.EXPIRY):
                raise AssertionError("the EXPIRY timer is started only by start()")
            case CancelTimer(kind=TimerKind.STEP):
                assert self.step_timer is not None, "cancelled a STEP timer never started"
                self.step_timer = None
            case CancelTimer(kind=TimerKind.EXPIRY):
                assert self.expiry_started, "cancelled an EXPIRY timer never started"
                assert self.cascade.finished, "cancelled the EXPIRY timer before the end"
                self.expiry_timer = False
            case Finish(outcome=outcome):
                self.finishes += 1
                assert 1 == self.finishes, "finished twice"
                assert outcome == self.cascade.outcome

    @invariant()
    def status_matches_the_model(self) -> None:
        flags = {
            Status.FINISHED: self.finished,
            Status.SENDING: self.in_flight is not None,
            Status.AWAITING: self.awaiting is not None,
            Status.DEFERRED: self.deferred,
        }
        if self.finished:
            assert Status.FINISHED == self.cascade.status
        else:
            assert [self.cascade.status] == [status for status, on in flags.items() if on]
        held = self.cascade.status in (Status.DEFERRED, Status.AWAITING)
        assert held == (self.step_timer is not None), "DEFERRED/AWAITING hold one STEP timer"

    @invariant()
    def sent_mask_matches_the_model(self) -> None:
        if not self.finished:
            assert channel_mask(tuple(self.succeeded)) == self.cascade.sent
            assert len(self.succeeded) == self.cascade.depth

    @invariant()
    def every_stop_would_finish_at_once(self) -> None:
        """Whatever state a live cascade is in, each stop ends it and commands only clean-up.

        Tried on the current value without keeping the result (it is immutable), so every
        outcome is checked in every state the machine reaches, not only when a rule picks it.
        """
        if self.finished:
            return
        current = self.cascade.plan[self.step]
        stops: list[tuple[CascadeEvent, Outcome]] = [
            (Converted(), Outcome.CONVERTED),
            (Cancelled(), Outcome.CANCELLED),
            (Expired(), Outcome.EXPIRED),
            (TimerFired(EXPIRY), Outcome.EXPIRED),
            (Dropped("cap"), Outcome.DROPPED),
            (Unsubscribed(), Outcome.UNSUBSCRIBED),
            (ConsentChanged(self.consent & ~current.bit), Outcome.UNSUBSCRIBED),
            (ConsentChanged(0), Outcome.UNSUBSCRIBED),
        ]
        receipts = [*self.succeeded, *([self.live] if self.live is not None else [])]
        stops += [(Read(channel), Outcome.READ) for channel in receipts]
        stops += [(Clicked(channel), Outcome.CLICKED) for channel in receipts]
        if self.live is SMS:
            stops.append((Delivered(SMS), Outcome.DELIVERED))
        cleanup: set[Command] = set()
        if self.step_timer is not None:
            cleanup.add(CancelTimer(STEP))
        if self.expiry_timer:
            cleanup.add(CancelTimer(EXPIRY))
        for event, outcome in stops:
            after, commands = self.cascade.handle(event, now=self.now)

            assert (Status.FINISHED, outcome) == (after.status, after.outcome), repr(event)
            assert Finish(outcome) == commands[-1], f"{event!r} gave {commands!r}"
            extra = {CancelTimer(EXPIRY)} if event == TimerFired(EXPIRY) else set()
            assert cleanup - extra <= set(commands[:-1]) <= cleanup | extra, repr(event)

    @invariant()
    def journal_round_trip(self) -> None:
        encoded = msgspec.msgpack.encode(self.cascade)
        assert self.cascade == msgspec.msgpack.decode(encoded, type=Cascade)


CascadeMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestCascadeMachine = CascadeMachine.TestCase
