"""Group commit: everything staged while one journal transaction runs goes into the next one.

Handlers stage writes into ``current`` synchronously and move on. ``serve`` swaps in a fresh
batch, commits the old one in a thread, then runs its after-commit actions (dispatch the sends,
publish the status events) and tells listeners (the ingest loop, which then sends the acks). So
the journal sees one transaction per burst, however many frames, timers and receipts it holds,
and nothing leaves the process before it is durable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import structlog
import trio

from gateway.protocol import StatusEvent
from gateway.runtime.clock import perf_seconds
from gateway.runtime.metrics import Metrics
from gateway.store.base import Batch, Journal, MessageRecord

log = structlog.get_logger("gateway.committer")


class Committer:
    def __init__(self, journal: Journal, metrics: Metrics) -> None:
        self.journal = journal
        self.metrics = metrics
        self._current = Batch()
        self._committing: Batch | None = None
        self._staged = trio.Event()
        self._listeners: list[Callable[[], None]] = []
        self.commits = 0

    @property
    def current(self) -> Batch:
        """The batch to stage writes into; asking for it wakes ``serve``."""
        self._staged.set()
        return self._current

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

    def on_commit(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            if not self._current:
                self._staged = trio.Event()
                await self._staged.wait()
                continue
            await self.flush()

    async def flush(self) -> None:
        """Commit what is staged now and run its after-commit actions."""
        batch = self._current
        if not batch:
            return
        self._current = Batch()
        self._committing = batch
        started = perf_seconds()
        try:
            if batch.rows:
                await self.journal.commit(batch)
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

    async def drain(self) -> None:
        """Commit everything staged so far (graceful shutdown)."""
        while self._current:
            await self.flush()
