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

from collections import deque
from typing import Generic, TypeVar

from gateway.core.model import LANES_BY_PRIORITY, Lane

T = TypeVar("T")


class RateLimiter:
    """A token bucket of ``rate_per_second`` with room for ``burst`` back-to-back requests."""

    __slots__ = ("_emission_interval", "_tat", "_tolerance", "burst", "rate_per_second")

    def __init__(self, rate_per_second: float, burst: int = 1) -> None:
        if rate_per_second <= 0:
            raise ValueError("rate_per_second must be positive")
        if burst < 1:
            raise ValueError("burst must be at least 1")
        self.rate_per_second = rate_per_second
        self.burst = burst
        self._emission_interval = 1.0 / rate_per_second
        self._tolerance = (burst - 1) * self._emission_interval
        self._tat = float("-inf")

    def wait_seconds(self, now: float) -> float:
        """Seconds until a request would conform; 0 if one may go at ``now``."""
        tat = max(self._tat, now)
        return max(0.0, tat - now - self._tolerance)

    def try_acquire(self, now: float) -> float:
        """Take a token at ``now`` if one is available.

        Returns:
            0.0 when the token was taken, else the seconds to wait before trying again.
        """
        tat = max(self._tat, now)
        wait = tat - now - self._tolerance
        if wait > 0:
            return wait
        self._tat = tat + self._emission_interval
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

    def push_front(self, lane: Lane, item: T) -> None:
        """Put an item back at the head of its lane (it was popped but could not go)."""
        self._lanes[lane].appendleft(item)

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
