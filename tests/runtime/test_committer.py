"""The committer's retry path and lingering, on the memory journal under a hand-driven clock.

``MemoryJournal`` has no threads, so ``wait_all_tasks_blocked`` means "the committer is
asleep in its back-off", and time moves only when the test jumps it.
"""

from __future__ import annotations

import trio
import trio.testing
from prometheus_client import CollectorRegistry

from gateway.core.cascade import Cascade
from gateway.core.model import Category, Channel, Envelope, Lane, MessageKey
from gateway.runtime.committer import LINGER_SECONDS, Committer
from gateway.runtime.metrics import Metrics
from gateway.store.base import Batch, MessageRecord
from gateway.store.memory import MemoryJournal, MemoryStore

NOW = 1_795_435_200.0
FULL = "database or disk is full"


def record(key: str) -> MessageRecord:
    cascade, _ = Cascade.start(plan=(Channel.SMS,), timeouts=(300.0,), allowed=0b1111, now=NOW)
    envelope = Envelope("acme", "r1", Category.PROMO, "promo", Lane.NORMAL, (Channel.SMS,))
    return MessageRecord(key, envelope, "UTC", cascade, NOW)


async def test_a_failing_commit_is_retried_with_back_off_until_the_cause_passes(
    mock_clock: trio.testing.MockClock,
) -> None:
    store = MemoryStore()
    journal = MemoryJournal(store)
    await journal.open(create=True)
    registry = CollectorRegistry()
    metrics = Metrics(registry, {})
    committer = Committer(journal, metrics)
    store.fail_commits = FULL
    ran: list[str] = []

    def unavailable() -> str | None:  # read afresh each time: it changes while we await
        return committer.unavailable

    async with trio.open_nursery() as nursery:
        await nursery.start(committer.serve)
        batch = committer.current
        batch.insert(record("acme:m1"), b"request")
        batch.then(lambda: ran.append("dispatched"))
        committer.hurry()  # a client waits for its ack

        await trio.testing.wait_all_tasks_blocked()
        assert FULL == unavailable()  # admission reads this to answer "overloaded"
        assert 1 == committer.pending_rows  # nothing staged is dropped
        assert [] == ran  # nothing leaves the process before it is durable
        mock_clock.jump(0.05)
        await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(0.05)  # the second wait is twice the first: not yet
        await trio.testing.wait_all_tasks_blocked()
        assert 2 == registry.get_sample_value("gateway_journal_commit_failures_total")
        assert await journal.message(MessageKey("acme:m1")) is None

        store.fail_commits = None
        mock_clock.jump(0.05)
        await trio.testing.wait_all_tasks_blocked()
        assert unavailable() is None
        assert ["dispatched"] == ran
        assert 0 == committer.pending_rows
        nursery.cancel_scope.cancel()
    restarted = MemoryJournal(store)  # durable: a restart on the same store finds it
    await restarted.open()
    found = await restarted.message(MessageKey("acme:m1"))
    assert found is not None
    assert b"request" == found.request


async def test_a_flush_while_serve_commits_waits_its_turn_and_loses_nothing(
    mock_clock: trio.testing.MockClock,
) -> None:
    """An admin ``flush`` during ``serve``'s commit: the first release kept one slot for the
    batch being committed, so the other one fell out of ``pending_rows`` (and of status
    reads) until it landed, and the two could interleave."""
    journal = MemoryJournal(MemoryStore())
    await journal.open(create=True)
    committer = Committer(journal, Metrics(CollectorRegistry(), {}))
    order: list[list[str]] = []
    release = trio.Event()
    committing = trio.Event()
    commit = journal.commit

    async def held(batch: Batch) -> None:
        committing.set()
        await release.wait()
        order.append(list(batch.dirty))
        await commit(batch)

    journal.commit = held  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        await nursery.start(committer.serve)
        committer.current.insert(record("acme:a"), b"a")
        committer.hurry()
        await committing.wait()  # serve is committing batch a
        committer.current.insert(record("acme:b"), b"b")
        nursery.start_soon(committer.flush)  # e.g. the admin API making a consent durable
        await trio.testing.wait_all_tasks_blocked()
        assert 2 == committer.pending_rows  # a (committing) and b (waiting): both counted
        assert committer.staged_record("acme:b") is not None  # and b is still readable
        release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert [["acme:a"], ["acme:b"]] == order
        assert 0 == committer.pending_rows
        nursery.cancel_scope.cancel()


async def test_a_batch_nobody_waits_for_lingers_and_a_waiter_ends_the_linger(
    mock_clock: trio.testing.MockClock,
) -> None:
    """Sends reported one by one share a commit; a write somebody waits for (an ack) is
    committed at once, with what lingered before it, and nothing is held longer than
    ``LINGER_SECONDS``."""
    journal = MemoryJournal(MemoryStore())
    await journal.open(create=True)
    committer = Committer(journal, Metrics(CollectorRegistry(), {}))
    committed: list[list[str]] = []
    commit = journal.commit

    async def recorded(batch: Batch) -> None:
        committed.append(list(batch.dirty))
        await commit(batch)

    journal.commit = recorded  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        await nursery.start(committer.serve)
        committer.current.insert(record("acme:sent1"), b"a")
        await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(LINGER_SECONDS * 0.6)
        committer.current.insert(record("acme:sent2"), b"b")
        await trio.testing.wait_all_tasks_blocked()
        assert [] == committed  # still gathering
        mock_clock.jump(LINGER_SECONDS * 0.5)  # the first row's linger is over
        await trio.testing.wait_all_tasks_blocked()
        assert [["acme:sent1", "acme:sent2"]] == committed

        committer.current.insert(record("acme:sent3"), b"c")
        await trio.testing.wait_all_tasks_blocked()
        committer.current.insert(record("acme:acked"), b"d")
        committer.hurry()
        await trio.testing.wait_all_tasks_blocked()  # no clock jump: at once
        assert [["acme:sent3", "acme:acked"]] == committed[1:]

        # a waiter for a batch already committing does not make the next one skip its linger
        # for good: after the hurried commit, lingering resumes
        committer.current.insert(record("acme:sent4"), b"e")
        await trio.testing.wait_all_tasks_blocked()
        assert 2 == len(committed)
        mock_clock.jump(LINGER_SECONDS)
        await trio.testing.wait_all_tasks_blocked()
        assert [["acme:sent4"]] == committed[2:]

        # wait_committed is a waiter too
        batch = committer.current
        batch.insert(record("acme:status"), b"f")
        nursery.start_soon(committer.wait_committed, batch)
        await trio.testing.wait_all_tasks_blocked()  # no clock jump
        assert batch.committed
        nursery.cancel_scope.cancel()
