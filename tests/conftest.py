from __future__ import annotations

import functools
from typing import Any

import pytest
import trio.testing

import gateway.app
from gateway.client import AsyncClient
from gateway.store.sqlite import SqliteJournal

JUMP_AFTER_IDLE_SECONDS = 0.01
"""Real idle time after which the mock clock jumps to the next deadline."""
JUMP_AFTER_IDLE_IN_FLIGHT_SECONDS = 1.0
"""The same while a request to the gateway is in flight: its reply is on its way over a real
socket, and a busy machine can take far longer than 10 ms to carry it."""


@pytest.fixture
def jumping_clock(monkeypatch: pytest.MonkeyPatch) -> trio.testing.MockClock:
    """Virtual time that jumps ahead when every task is idle for 10 ms of real time.

    Trio counts a task waiting on real I/O or on a thread as idle, so under autojump anything
    real that is slow lets virtual time jump past the moment a test meant to check (a step
    timeout firing before the send it times was even acknowledged). Two things keep virtual time
    still while something real is under way:

    - a gateway started under this clock runs its SQLite journal inline, not in worker threads;
    - while a test's ZeroMQ client (``gateway.client.AsyncClient``) waits for a reply, the clock
      jumps only after 1 s of real idleness instead of 10 ms. Not never: a request whose answer
      needs virtual time to pass (a commit retried after a failure) still gets it.

    What remains real and unguarded is local HTTP (the e2e tests' simulators).
    """
    monkeypatch.setattr(
        gateway.app, "SqliteJournal", functools.partial(SqliteJournal, threads=False)
    )
    clock = trio.testing.MockClock(autojump_threshold=JUMP_AFTER_IDLE_SECONDS)
    in_flight = 0
    request_raw = AsyncClient.request_raw

    async def held_request_raw(self: AsyncClient, frame: bytes) -> Any:
        nonlocal in_flight
        in_flight += 1
        clock.autojump_threshold = JUMP_AFTER_IDLE_IN_FLIGHT_SECONDS
        try:
            return await request_raw(self, frame)
        finally:
            in_flight -= 1
            if not in_flight:
                clock.autojump_threshold = JUMP_AFTER_IDLE_SECONDS

    monkeypatch.setattr(AsyncClient, "request_raw", held_request_raw)
    return clock
