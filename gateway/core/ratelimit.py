"""Provider rate limits (GCRA) and the three priority lanes in front of them.

Rule 1: these are data structures driven by ``now`` passed in; they never sleep or read a
clock. The runtime asks "how long until the next token?" and does the waiting itself.
Rule 2: they are mutable on purpose: one bucket per provider account lives for the process and
is touched once per send; allocating a new value per request would cost more than it proves.
The Redis store runs the same GCRA arithmetic in Lua so several routers share one budget.

GCRA (the generic cell rate algorithm) is a token bucket stored as one number, the theoretical
arrival time (TAT): a request at ``now`` conforms iff ``TAT - now <= burst_tolerance``.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Generic, TypeVar

from gateway.core.model import LANES_BY_PRIORITY, Lane

T = TypeVar("T")

_SLACK_SECONDS = 1e-9
"""How early a request may be and still conform. The caller's clock and this arithmetic round
differently (``start + 3 / 10`` is not ``start + 3 * 0.1``), and without slack a bucket idle
for exactly ``burst / rate`` told its last request to wait 5.5e-17 s (found by Hypothesis)."""


class RateLimiter:
    """A token bucket of ``rate_per_second`` with room for ``burst`` back-to-back requests."""

    __slots__ = ("_base", "_count", "_emission_interval", "burst", "rate_per_second")

    def __init__(self, rate_per_second: float, burst: int = 1) -> None:
        if not math.isfinite(rate_per_second) or rate_per_second <= 0:
            raise ValueError("rate_per_second must be a positive, finite number")
        if burst < 1:
            raise ValueError("burst must be at least 1")
        self.rate_per_second = rate_per_second
        self.burst = burst
        self._emission_interval = 1.0 / rate_per_second
        # TAT = _base + _count * interval: _base is when the current run of conforming requests
        # began, _count how many it has taken. Adding the interval up one request at a time
        # rounds, and then the last request of a burst at one instant was told to wait ~1e-15 s,
        # a wait a float clock at that instant cannot even express; one multiplication keeps
        # "the first `burst` requests conform" exact.
        self._base = float("-inf")
        self._count = 0

    def wait_seconds(self, now: float) -> float:
        """Seconds until a request would conform; 0 if one may go at ``now``.

        A clock that reads ``now + wait_seconds(now)`` is never early: the result is rounded up
        to a float that, added to ``now``, reaches the conforming instant.
        """
        ready = self._base + (self._count - self.burst + 1) * self._emission_interval
        if ready <= now + _SLACK_SECONDS:
            return 0.0
        wait = ready - now
        while now + wait < ready:
            wait = math.nextafter(wait, math.inf)
        return wait

    def try_acquire(self, now: float) -> float:
        """Take a token at ``now`` if one is available.

        Returns:
            0.0 when the token was taken, else the seconds to wait before trying again.
        """
        wait = self.wait_seconds(now)
        if wait > 0:
            return wait
        if self._base + self._count * self._emission_interval <= now + _SLACK_SECONDS:
            # TAT is in the past: the bucket is full again and a new run starts now
            self._base, self._count = now, 0
        self._count += 1
        return 0.0


class LaneQueue(Generic[T]):
    """Three FIFO lanes; ``pop`` always serves the highest non-empty lane first.

    Strict priority is the point: an OTP behind a million bulk promos must go next. Bulk can
    starve only while critical or normal traffic saturates the provider, which is the intent.
    """

    __slots__ = ("_lanes",)

    def __init__(self) -> None:
        self._lanes: dict[Lane, deque[T]] = {lane: deque() for lane in LANES_BY_PRIORITY}

    def push(self, lane: Lane, item: T) -> None:
        self._lanes[lane].append(item)

    def pop(self) -> tuple[Lane, T] | None:
        for lane in LANES_BY_PRIORITY:
            queue = self._lanes[lane]
            if queue:
                return lane, queue.popleft()
        return None

    def depth(self, lane: Lane) -> int:
        return len(self._lanes[lane])

    def __len__(self) -> int:
        return sum(len(queue) for queue in self._lanes.values())
