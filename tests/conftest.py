from __future__ import annotations

import functools

import pytest
import trio.testing

import gateway.app
from gateway.store.sqlite import SqliteJournal


@pytest.fixture
def jumping_clock(monkeypatch: pytest.MonkeyPatch) -> trio.testing.MockClock:
    """Virtual time that jumps ahead when every task is idle for 10 ms of real time.

    A gateway started under it runs its SQLite journal inline, not in worker threads: trio
    counts a task waiting on a thread as idle, so with threads a slow commit let virtual time
    jump past the moment the test meant to check. What remains real I/O is ZeroMQ and local
    HTTP, which the 10 ms threshold covers (trio's MockClock docstring; docs/architecture.md).
    """
    monkeypatch.setattr(
        gateway.app, "SqliteJournal", functools.partial(SqliteJournal, threads=False)
    )
    return trio.testing.MockClock(autojump_threshold=0.01)
