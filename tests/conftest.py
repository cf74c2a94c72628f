from __future__ import annotations

import pytest
import trio.testing


@pytest.fixture
def jumping_clock() -> trio.testing.MockClock:
    """Virtual time that jumps ahead when every task is idle for 10 ms of real time.

    Not 0: with real sockets and SQLite threads in play, a threshold of 0 can jump the clock
    while I/O is still in flight (trio's MockClock docstring; docs/architecture.md).
    """
    return trio.testing.MockClock(autojump_threshold=0.01)
