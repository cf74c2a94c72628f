"""The security tests run the real gateway (SQLite in worker threads, real sockets) on virtual
time; here the virtual clock waits for the threads."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing


@pytest.fixture
def jumping_clock(monkeypatch: pytest.MonkeyPatch) -> trio.testing.MockClock:
    """tests/conftest.py's clock (autojump after 10 ms idle), except that it does not jump
    while a ``trio.to_thread`` call is running.

    MockClock jumps to the next deadline once every task has waited ``autojump_threshold`` of
    real time, and a task waiting for a SQLite commit in a worker thread is waiting. On a busy
    machine a commit outlasted the 10 ms, and virtual time jumped in the middle of it: past
    httpx's 5 s timeout on a one-click unsubscribe (ReadTimeout), past the ZeroMQ client's
    1e6 s (``no reply within 1000000.0 s``); about one run in three of test_opt_outs.py with
    test_replays.py failed on a loaded 2-core machine. Loopback sockets and libzmq's own I/O
    threads are still invisible here; they take microseconds where a commit can take a second.
    """
    clock = trio.testing.MockClock(autojump_threshold=0.01)
    running = 0
    run_sync = trio.to_thread.run_sync
    autojump = clock._autojump

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal running
        running += 1
        try:
            return await run_sync(*args, **kwargs)
        finally:
            running -= 1

    def unless_a_thread_runs() -> None:
        # trio's run loop calls clock._autojump() after every task idled for the threshold
        # (trio/_core/_run.py, pinned in constraints.txt; MockClock allows no subclass); not
        # jumping now, it asks again after the next idle threshold
        if running == 0:
            autojump()

    # the journal calls trio.to_thread.run_sync through the module, so it gets this one
    monkeypatch.setattr(trio.to_thread, "run_sync", counted)
    monkeypatch.setattr(clock, "_autojump", unless_a_thread_runs)
    return clock
