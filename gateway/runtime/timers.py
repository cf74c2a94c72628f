"""The timer service: fires unread timeouts, deferrals and expiries when they fall due.

The deadlines live in the state's heaps (``gateway.core.timers.Deadlines``); this task sleeps
until the earliest one and is woken early when the router schedules something sooner. Sleeping
goes through trio, so a ``MockClock`` makes an hour-long timeout fire at once in tests.
"""

from __future__ import annotations

import math

import trio

from gateway.runtime.clock import Clock
from gateway.runtime.router import Router
from gateway.store.state import State

_FIRE_BATCH = 2000  # timers fired per pass before yielding to ingest and dispatch


class TimerService:
    def __init__(self, router: Router, state: State, clock: Clock) -> None:
        self.router = router
        self.state = state
        self.clock = clock
        self._sleep: trio.CancelScope | None = None
        self._sleeping_until = math.inf
        self.fired = 0
        router.timers_changed = self.changed

    def changed(self, deadline: float) -> None:
        """A timer was scheduled: wake up if it is earlier than what we sleep towards."""
        if deadline < self._sleeping_until and self._sleep is not None:
            self._sleep.cancel()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        clock = self.clock
        while True:
            now = clock.now()
            due = self.state.pop_due(now, _FIRE_BATCH)
            if due:
                self.fired += len(due)
                self.router.fire_timers(due, now)
                await trio.lowlevel.checkpoint()
                continue
            deadline = self.state.next_deadline()
            self._sleeping_until = math.inf if deadline is None else deadline
            with trio.move_on_at(
                math.inf if deadline is None else clock.trio_deadline(deadline)
            ) as scope:
                self._sleep = scope
                await trio.sleep_forever()
            self._sleep = None
            self._sleeping_until = math.inf
