"""The one place that reads real clocks (used by the runtime, the HTTP surface and adapters).

The core takes ``now`` as POSIX seconds. The runtime derives it from ``trio.current_time()``
plus an offset fixed at start, so a trio ``MockClock`` drives wall time too: "fall back to email
after 300 s" runs in milliseconds under ``autojump_clock`` and still produces real timestamps.
"""

from __future__ import annotations

import time

import trio


class Clock:
    """Wall time (POSIX seconds) tied to trio's clock.

    Args:
        wall_at_start: the wall time to pretend it is now; defaults to the real one. Tests use
            it to stand at 23:30 in Moscow without touching the system clock.
    """

    __slots__ = ("_offset",)

    def __init__(self, wall_at_start: float | None = None) -> None:
        wall = time.time() if wall_at_start is None else wall_at_start
        self._offset = wall - trio.current_time()

    def now(self) -> float:
        return self._offset + trio.current_time()

    @property
    def offset(self) -> float:
        """Wall time minus ``trio.current_time()``; simulators in the process share it."""
        return self._offset

    def trio_deadline(self, wall: float) -> float:
        """The ``trio.current_time()`` value at which wall time reaches ``wall``."""
        return wall - self._offset


def wall_time() -> float:
    """Real wall time, for code outside trio (CLI, workers' timing, benchmarks)."""
    return time.time()


def perf_seconds() -> float:
    """A monotonic high-resolution reading, for measuring durations only."""
    return time.perf_counter()


def thread_cpu_seconds() -> float:
    """CPU time of the calling thread, for attributing it (``gateway.runtime.cpu``)."""
    return time.thread_time()


def process_cpu_seconds() -> float:
    """CPU time of the whole process, every thread."""
    return time.process_time()
