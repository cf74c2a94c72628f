"""Group commit: everything staged while one journal transaction runs goes into the next one.

Handlers stage writes into ``current`` synchronously and move on. ``serve`` swaps in a fresh
batch, commits the old one in a thread, then runs its after-commit actions (dispatch the sends,
publish the status events) and tells listeners (the ingest loop, which then sends the acks). So
the journal sees one transaction per burst, however many frames, timers and receipts it holds,
and nothing leaves the process before it is durable.

Nobody waits for some writes: a provider took a send, a timer fired, a receipt came in a
batch nobody answers. A batch of only those lingers up to ``LINGER_SECONDS`` for more before it
commits: a transaction and its thread hand-off cost about as much as twenty rows, and sends
finish one by one. Anything somebody waits for (a client's ack, a webhook's answer, a status
query) calls ``hurry`` and commits at once, with whatever lingered.

A commit that fails for a reason that may pass (disk full, an I/O error) is retried, the same
batch in the same place, until it lands: nothing staged is dropped and nothing is acknowledged
early. Meanwhile ``unavailable`` says why, so admission answers ``overloaded`` instead of
piling up work, and the process stays up to recover by itself when space returns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Final

import structlog
import trio

from gateway.clock import perf_seconds
from gateway.protocol import StatusEvent
from gateway.runtime.metrics import Metrics
from gateway.store.base import Batch, Journal, JournalUnavailable, MessageRecord

log = structlog.get_logger("gateway.committer")

_RETRY_FIRST_SECONDS: Final = 0.05
_RETRY_MAX_SECONDS: Final = 5.0
LINGER_SECONDS: Final = 0.005
"""How long a batch nobody waits for gathers more rows before it commits (at 1,000 sends/s,
about 5 sends a commit instead of one or two)."""


class Committer:
    def __init__(self, journal: Journal, metrics: Metrics) -> None:
        self.journal = journal
        self.metrics = metrics
        self._current = Batch()
        self._committing: Batch | None = None
        self._staged = trio.Event()
        self._hurry = trio.Event()
        self._lock = trio.Lock()
        """One commit at a time: ``serve`` and a caller of ``flush`` must not interleave, or
        the batch of one would vanish from ``pending_rows`` while the other's commits."""
        self._listeners: list[Callable[[], None]] = []
        self.commits = 0
        self.unavailable: str | None = None
        """Why the last commit failed, while it is being retried; None when healthy."""

    @property
    def current(self) -> Batch:
        """The batch to stage writes into; asking for it wakes ``serve``."""
        self._staged.set()
        return self._current

    def hurry(self) -> None:
        """Somebody waits for the batch being staged: commit it without lingering."""
        self._staged.set()
        self._hurry.set()

    def peek(self) -> Batch:
        """The batch being staged, without waking ``serve``."""
        return self._current

    @property
    def pending_rows(self) -> int:
        committing = self._committing
        return self._current.rows + (committing.rows if committing is not None else 0)

    def staged_events(self) -> Iterator[StatusEvent]:
        """Status events written but not yet durable (a status query shows them too)."""
        for batch in (self._committing, self._current):
            if batch is not None:
                for events in batch.opening.values():
                    yield from events
                yield from batch.events

    def staged_record(self, key: str) -> MessageRecord | None:
        """The newest written-but-not-yet-durable value of a record, if any."""
        record = self._current.dirty.get(key)
        if record is None and self._committing is not None:
            record = self._committing.dirty.get(key)
        return record

    def staged_request(self, key: str) -> bytes | None:
        """The request of a message admitted but not yet durable, if any."""
        request = self._current.inserts.get(key)
        if request is None and self._committing is not None:
            request = self._committing.inserts.get(key)
        return request

    def on_commit(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    async def wait_committed(self, batch: Batch) -> None:
        """Return once ``batch`` (and so everything staged before it) is durable."""
        if batch.committed:
            return
        done = trio.Event()
        batch.after.append(done.set)
        self.hurry()
        await done.wait()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            if not self._current:
                self._staged = trio.Event()
                await self._staged.wait()
                continue
            if not self._hurry.is_set():
                with trio.move_on_after(LINGER_SECONDS):
                    await self._hurry.wait()
            self._hurry = trio.Event()
            await self.flush()

    async def flush(self) -> None:
        """Commit what is staged now and run its after-commit actions."""
        async with self._lock:
            batch = self._current
            if not batch:
                return
            self._current = Batch()
            self._committing = batch
            started = perf_seconds()
            try:
                if batch.rows:
                    await self._commit_until_durable(batch)
            finally:
                self._committing = None
            self.metrics.journal_commit.observe(perf_seconds() - started)
            self.metrics.journal_rows.inc(batch.rows)
            self.commits += 1
            batch.committed = True
            for action in batch.after:
                try:
                    action()
                except Exception:  # one broken action must not strand the rest of the batch
                    log.exception("after_commit_action_failed")
            for listener in self._listeners:
                listener()

    async def _commit_until_durable(self, batch: Batch) -> None:
        delay = _RETRY_FIRST_SECONDS
        while True:
            try:
                await self.journal.commit(batch)
            except JournalUnavailable as exc:
                if self.unavailable is None:
                    log.error("journal_commit_failed", error=str(exc), rows=batch.rows)
                self.unavailable = str(exc)
                self.metrics.journal_commit_failures.inc()
                self.metrics.journal_writable.set(0)
                await trio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_SECONDS)
                continue
            if self.unavailable is not None:
                log.warning("journal_commit_recovered", rows=batch.rows)
                self.unavailable = None
                self.metrics.journal_writable.set(1)
            return

    async def drain(self) -> None:
        """Commit everything staged so far (graceful shutdown)."""
        while self._current:
            await self.flush()
