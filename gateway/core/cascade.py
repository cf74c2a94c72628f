"""The cascade: one message's walk from the cheapest channel to the dearest.

Rule 1: every transition lives in ``Cascade.handle``, one ``match``. Events are facts in the past
tense; the result is the next value and the commands for the edge to run. No I/O, no clock: the
current time comes in as ``now`` (POSIX seconds).
Rule 2: the value is immutable and small (channel sets are bit masks), because a million of them
may wait in memory for their timers, and it is journalled as a msgpack array.

Statuses::

    start ──▶ DEFERRED ──timer──▶ SENDING ──send ok──▶ AWAITING ──read/click──▶ FINISHED
                 ▲                  │  │                  │
                 └──step deferred───┘  └─failed/skipped─┐ └─unread timeout/bounce─┐
                                                        ▼                         ▼
                                           next allowed step (SENDING) or FINISHED(exhausted)

Rules the value enforces, whatever order events arrive in (late and duplicate provider receipts
are normal, so events that do not apply are absorbed, never raised):

* ``Send`` only goes to a channel in the plan (it has an address) and in ``allowed`` (consent
  allows it at that moment); ``ConsentChanged`` keeps ``allowed`` current.
* At most one step is in flight, ``step`` never decreases, and a later channel is tried only
  after the current one failed, was skipped, or stayed unread past its timeout.
* Read, click, conversion, cancellation, expiry, a policy drop, or a withdrawal covering the
  current channel stop the cascade; SMS (no read signal) stops it on delivery. FINISHED absorbs everything.
"""

from __future__ import annotations

import enum
from typing import assert_never

import msgspec

from gateway.core.model import Channel, Outcome, TimerKind


class Status(enum.IntEnum):
    DEFERRED = 1  # waiting for a time (send_at, quiet hours, a cap) before sending the step
    SENDING = 2  # a Send for the step is out; waiting for the provider's answer
    AWAITING = 3  # the provider took it; waiting for read (or delivery for SMS) or the timeout
    FINISHED = 4


# ---------------------------------------------------------------- events (facts)
class SendSucceeded(msgspec.Struct, frozen=True, tag=True):
    channel: Channel


class SendFailed(msgspec.Struct, frozen=True, tag=True):
    """Every provider and retry of the step is used up, or the provider reported a bounce."""

    channel: Channel
    permanent: bool


class Delivered(msgspec.Struct, frozen=True, tag=True):
    channel: Channel


class Read(msgspec.Struct, frozen=True, tag=True):
    channel: Channel


class Clicked(msgspec.Struct, frozen=True, tag=True):
    channel: Channel


class Converted(msgspec.Struct, frozen=True, tag=True):
    pass


class Cancelled(msgspec.Struct, frozen=True, tag=True):
    pass


class ConsentChanged(msgspec.Struct, frozen=True, tag=True):
    """The channels consent allows for this message now (0 after a personal-data withdrawal)."""

    allowed: int


class TimerFired(msgspec.Struct, frozen=True, tag=True):
    kind: TimerKind


class Expired(msgspec.Struct, frozen=True, tag=True):
    pass


class StepDeferred(msgspec.Struct, frozen=True, tag=True):
    """The edge's pre-send check (quiet hours, a deferring cap) said: not before ``until``."""

    until: float


class StepSkipped(msgspec.Struct, frozen=True, tag=True):
    """The edge's pre-send check ruled the step out (e.g. a rejecting per-channel cap)."""

    channel: Channel
    reason: str


class Unsubscribed(msgspec.Struct, frozen=True, tag=True):
    """The recipient opted out through this very message (one-click link, provider opt-out).

    Unlike ``ConsentChanged`` it ends the cascade even when the opt-out names an earlier
    channel: whoever clicked "unsubscribe" in the email has read it and wants no follow-up.
    """


class Dropped(msgspec.Struct, frozen=True, tag=True):
    """The edge's pre-send check ruled the whole message out (a rejecting message-wide cap)."""

    reason: str


CascadeEvent = (
    SendSucceeded
    | SendFailed
    | Delivered
    | Read
    | Clicked
    | Converted
    | Cancelled
    | ConsentChanged
    | TimerFired
    | Expired
    | StepDeferred
    | StepSkipped
    | Dropped
    | Unsubscribed
)


# ---------------------------------------------------------------- commands (imperatives)
class Send(msgspec.Struct, frozen=True):
    channel: Channel
    step: int


class StartTimer(msgspec.Struct, frozen=True):
    kind: TimerKind
    at: float


class CancelTimer(msgspec.Struct, frozen=True):
    kind: TimerKind


class Finish(msgspec.Struct, frozen=True):
    outcome: Outcome


Command = Send | StartTimer | CancelTimer | Finish

_READ_OUTCOMES = {Read: Outcome.READ, Clicked: Outcome.CLICKED}
_TIMED = (Status.DEFERRED, Status.AWAITING)  # statuses that hold a STEP timer


class Cascade(msgspec.Struct, frozen=True, gc=False, array_like=True):
    """The state of one message's cascade.

    ``plan`` holds the channels with an address, in cascade order, and ``timeouts`` the unread
    timeout of each (same positions). ``allowed`` and ``sent`` are channel masks.
    """

    plan: tuple[Channel, ...]
    timeouts: tuple[float, ...]
    allowed: int
    step: int
    status: Status
    sent: int = 0
    outcome: Outcome | None = None
    expires_at: float | None = None

    # ------------------------------------------------------------ construction
    @classmethod
    def start(
        cls,
        *,
        plan: tuple[Channel, ...],
        timeouts: tuple[float, ...],
        allowed: int,
        now: float,
        expires_at: float | None = None,
        defer_until: float | None = None,
    ) -> tuple[Cascade, list[Command]]:
        """Begin a cascade: send the first allowed step now, or defer it to ``defer_until``."""
        if len(plan) != len(timeouts):
            raise ValueError("plan and timeouts must have the same length")
        first = _next_allowed(plan, allowed, after=-1)
        if first is None:
            finished = cls(plan, timeouts, allowed, 0, Status.FINISHED, 0, Outcome.NO_CHANNEL)
            return finished, [Finish(Outcome.NO_CHANNEL)]
        commands: list[Command] = []
        if expires_at is not None:
            commands.append(StartTimer(TimerKind.EXPIRY, expires_at))
        if defer_until is not None and defer_until > now:
            commands.append(StartTimer(TimerKind.STEP, defer_until))
            status = Status.DEFERRED
        else:
            commands.append(Send(plan[first], first))
            status = Status.SENDING
        return cls(plan, timeouts, allowed, first, status, 0, None, expires_at), commands

    # ------------------------------------------------------------ queries
    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def channel(self) -> Channel:
        """The channel of the current step."""
        return self.plan[self.step]

    @property
    def depth(self) -> int:
        """How many channels the provider accepted the message on."""
        return self.sent.bit_count()

    # ------------------------------------------------------------ transitions
    def handle(self, event: CascadeEvent, *, now: float) -> tuple[Cascade, list[Command]]:
        """Apply one event; returns the next value and the commands to run, in order."""
        status = self.status
        if status is Status.FINISHED:
            return self, []
        current = self.plan[self.step]
        match event:
            case SendSucceeded(channel=channel):
                if status is Status.SENDING and channel is current:
                    deadline = now + self.timeouts[self.step]
                    return (
                        msgspec.structs.replace(
                            self, status=Status.AWAITING, sent=self.sent | channel.bit
                        ),
                        [StartTimer(TimerKind.STEP, deadline)],
                    )
                return self, []
            case SendFailed(channel=channel):
                if status in (Status.SENDING, Status.AWAITING) and channel is current:
                    return self._advance()
                return self, []
            case StepSkipped(channel=channel):
                if status is Status.SENDING and channel is current:
                    return self._advance()
                return self, []
            case Delivered(channel=channel):
                if (
                    not channel.has_read_signal
                    and channel is current
                    and status in (Status.SENDING, Status.AWAITING)
                ):
                    return self._finish(Outcome.DELIVERED, sent=self.sent | channel.bit)
                return self, []
            case Read(channel=channel) | Clicked(channel=channel):
                in_flight = channel is current and status in (Status.SENDING, Status.AWAITING)
                if in_flight or self.sent & channel.bit:
                    return self._finish(_READ_OUTCOMES[type(event)], sent=self.sent | channel.bit)
                return self, []
            case Converted():
                return self._finish(Outcome.CONVERTED)
            case Cancelled():
                return self._finish(Outcome.CANCELLED)
            case Dropped():
                return self._finish(Outcome.DROPPED)
            case Unsubscribed():
                return self._finish(Outcome.UNSUBSCRIBED)
            case Expired() | TimerFired(kind=TimerKind.EXPIRY):
                return self._finish(Outcome.EXPIRED)
            case ConsentChanged(allowed=allowed):
                if not allowed & current.bit:
                    return self._finish(Outcome.UNSUBSCRIBED, allowed=allowed)
                return msgspec.structs.replace(self, allowed=allowed), []
            case TimerFired():  # STEP: the EXPIRY timer is matched above
                if status is Status.DEFERRED:
                    return (
                        msgspec.structs.replace(self, status=Status.SENDING),
                        [Send(current, self.step)],
                    )
                if status is Status.AWAITING:
                    return self._advance()
                return self, []
            case StepDeferred(until=until):
                if status is Status.SENDING:
                    return (
                        msgspec.structs.replace(self, status=Status.DEFERRED),
                        [StartTimer(TimerKind.STEP, until)],
                    )
                return self, []
            case _:
                assert_never(event)

    def _advance(self) -> tuple[Cascade, list[Command]]:
        """Move to the next allowed step, or finish exhausted when none is left."""
        following = _next_allowed(self.plan, self.allowed, after=self.step)
        if following is None:
            return self._finish(Outcome.EXHAUSTED)
        commands: list[Command] = []
        if self.status in _TIMED:
            commands.append(CancelTimer(TimerKind.STEP))
        commands.append(Send(self.plan[following], following))
        return msgspec.structs.replace(self, step=following, status=Status.SENDING), commands

    def _finish(
        self, outcome: Outcome, *, sent: int | None = None, allowed: int | None = None
    ) -> tuple[Cascade, list[Command]]:
        commands: list[Command] = []
        if self.status in _TIMED:
            commands.append(CancelTimer(TimerKind.STEP))
        if self.expires_at is not None:
            commands.append(CancelTimer(TimerKind.EXPIRY))
        commands.append(Finish(outcome))
        finished = msgspec.structs.replace(
            self,
            status=Status.FINISHED,
            outcome=outcome,
            sent=self.sent if sent is None else sent,
            allowed=self.allowed if allowed is None else allowed,
        )
        return finished, commands


def _next_allowed(plan: tuple[Channel, ...], allowed: int, *, after: int) -> int | None:
    for index in range(after + 1, len(plan)):
        if allowed & plan[index].bit:
            return index
    return None
