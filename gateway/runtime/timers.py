"""The timer service: fires unread timeouts, deferrals and expiries when they fall due.

The deadlines live in the state's heaps (``gateway.core.timers.Deadlines``); this task sleeps
until the earliest one and is woken early through the ``TimerAlarm`` when the router schedules
something sooner. Sleeping goes through trio, so a ``MockClock`` makes an hour-long timeout
fire at once in tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import trio

from gateway.clock import Clock
from gateway.core.model import TimerKind
from gateway.store.state import State

_FIRE_BATCH = 2000  # timers fired per pass before yielding to ingest and dispatch

FireTimers = Callable[[list[tuple[str, TimerKind]], float], None]


class TimerAlarm:
    """How whoever schedules a timer wakes the sleeping timer service.

    Made before both sides (the router schedules, the service sleeps), so each gets it in its
    constructor and neither needs the other.
    """

    __slots__ = ("_scope", "_sleeping_until")

    def __init__(self) -> None:
        self._scope: trio.CancelScope | None = None
        self._sleeping_until = math.inf

    def changed(self, deadline: float) -> None:
        """A timer was scheduled: wake the service if it is earlier than what it sleeps towards."""
        if deadline < self._sleeping_until and self._scope is not None:
            # once: trio's cancel() formats the current task's repr on every call, and a
            # frame of deferred sends schedules a timer per message
            self._scope.cancel()
            self._scope = None

    async def sleep_until(self, clock: Clock, deadline: float | None) -> None:
        """Sleep until wall time ``deadline`` (forever for None) or an earlier ``changed``."""
        self._sleeping_until = math.inf if deadline is None else deadline
        with trio.move_on_at(
            math.inf if deadline is None else clock.trio_deadline(deadline)
        ) as scope:
            self._scope = scope
            await trio.sleep_forever()
        self._scope = None
        self._sleeping_until = math.inf


class TimerService:
    def __init__(self, state: State, clock: Clock, alarm: TimerAlarm, fire: FireTimers) -> None:
        self.state = state
        self.clock = clock
        self.alarm = alarm
        self.fire = fire
        self.fired = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        clock = self.clock
        while True:
            now = clock.now()
            due = self.state.pop_due(now, _FIRE_BATCH)
            if due:
                self.fired += len(due)
                self.fire(due, now)
                await trio.lowlevel.checkpoint()
                continue
            await self.alarm.sleep_until(clock, self.state.next_deadline())
