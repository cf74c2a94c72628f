"""The journal contract (gateway.store.base.Journal), run against the SQLite implementation.

Written against the protocol so the planned Redis journal can run the same cases.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.core.caps import SendEntry
from gateway.core.cascade import Cascade
from gateway.core.consent import ConsentAction, ConsentKind, ConsentRecord
from gateway.core.model import Category, Channel, Envelope, Lane, MessageKey, Outcome, RecipientKey
from gateway.protocol import StatusEvent, StatusKind
from gateway.store.base import Batch, MessageRecord, active_pages
from gateway.store.sqlite import SqliteJournal

NOW = 1_795_435_200.0


def record(key: str, *, outcome: Outcome | None = None, accepted_at: float = NOW) -> MessageRecord:
    cascade, _ = Cascade.start(
        plan=(Channel.PUSH, Channel.SMS), timeouts=(300.0, 86400.0), allowed=0b1111, now=accepted_at
    )
    if outcome is not None:
        cascade, _ = cascade._finish(outcome)
    envelope = Envelope(
        "acme", f"r-{key}", Category.PROMO, "promo", Lane.NORMAL, (Channel.PUSH, Channel.SMS)
    )
    return MessageRecord(
        f"acme:{key}", envelope, "UTC", cascade, accepted_at, step_due=accepted_at + 300
    )


def event(key: str, kind: StatusKind, at: float) -> StatusEvent:
    return StatusEvent("acme", key, kind, datetime.fromtimestamp(at, UTC))


def batch_with(*records: MessageRecord, new: bool = True) -> Batch:
    batch = Batch()
    for item in records:
        if new:
            batch.inserts[item.key] = b"\x80request-" + item.key.encode()
        batch.dirty[item.key] = item
        batch.rows += 1
    return batch


async def active_records(journal: SqliteJournal, *, page: int = 1000) -> list[MessageRecord]:
    """Every active message, read the way the router reads them at start: page by page."""
    return [record async for records in active_pages(journal, limit=page) for record in records]


@pytest.fixture
async def open_journal(tmp_path: Path) -> AsyncIterator[Callable[..., SqliteJournal]]:
    opened: list[SqliteJournal] = []

    def factory(synchronous: str = "full") -> SqliteJournal:
        journal = SqliteJournal(tmp_path / "journal.db", synchronous=synchronous)
        opened.append(journal)
        return journal

    yield factory
    for journal in opened:
        await journal.aclose()


class TestJournal:
    """What a journal must do: commit atomically, survive reopening, give everything back."""

    async def test_committed_state_comes_back_after_reopening(
        self, open_journal: Callable[..., SqliteJournal]
    ) -> None:
        journal = open_journal()
        await journal.open(create=True)
        active, done = record("m1"), record("m2", outcome=Outcome.READ)
        batch = batch_with(active, done)
        consent = ConsentRecord(
            ConsentKind.ADVERTISING, ConsentAction.GRANT, NOW, "form", channel=Channel.SMS
        )
        entry = SendEntry(NOW, "acme:m1", Category.PROMO, Channel.PUSH)
        batch.consents.append((RecipientKey("acme:r-m1"), consent))
        batch.sends.append((RecipientKey("acme:r-m1"), entry))
        batch.addresses.append(("ref1", "acme:r-m1"))
        batch.events.extend(
            [event("m1", StatusKind.ACCEPTED, NOW), event("m2", StatusKind.READ, NOW + 1)]
        )
        await journal.commit(batch)
        await journal.aclose()

        again = open_journal()
        await again.open(create=True)
        recovered = await again.recover(
            now=NOW + 10, retention_seconds=86400, horizon_seconds=86400
        )
        assert [active] == await active_records(again)
        assert {"acme:m2": Outcome.READ} == recovered.finished
        assert [(RecipientKey("acme:r-m1"), consent)] == recovered.consents
        assert [(RecipientKey("acme:r-m1"), entry)] == recovered.sends
        assert [("ref1", "acme:r-m1")] == recovered.addresses
        assert [event("m1", StatusKind.ACCEPTED, NOW)] == await again.timeline(
            MessageKey("acme:m1")
        )
        assert {"acme:m1": b"\x80request-acme:m1"} == await again.requests(["acme:m1", "acme:nope"])

    async def test_updates_replace_the_record_and_mark_it_finished(
        self, open_journal: Callable[..., SqliteJournal]
    ) -> None:
        journal = open_journal()
        await journal.open(create=True)
        await journal.commit(batch_with(record("m1")))
        await journal.commit(batch_with(record("m1", outcome=Outcome.CANCELLED), new=False))
        stored = await journal.message(MessageKey("acme:m1"))
        recovered = await journal.recover(now=NOW, retention_seconds=86400, horizon_seconds=0)
        assert stored is not None
        assert stored.finished
        assert Outcome.CANCELLED == stored.record.cascade.outcome
        assert [] == await active_records(journal)
        assert {"acme:m1": Outcome.CANCELLED} == recovered.finished

    async def test_a_failing_batch_leaves_nothing_behind(
        self, open_journal: Callable[..., SqliteJournal]
    ) -> None:
        journal = open_journal()
        await journal.open(create=True)
        await journal.commit(batch_with(record("m1")))
        failing = batch_with(record("m2"), record("m1"))  # m1 again: primary-key violation
        failing.events.append(event("m2", StatusKind.ACCEPTED, NOW))
        with pytest.raises(sqlite3.IntegrityError):
            await journal.commit(failing)
        assert await journal.message(MessageKey("acme:m2")) is None
        assert [] == await journal.timeline(MessageKey("acme:m2"))

    async def test_prune_forgets_what_is_past_retention_and_horizon(
        self, open_journal: Callable[..., SqliteJournal]
    ) -> None:
        journal = open_journal()
        await journal.open(create=True)
        old_done = record("old", outcome=Outcome.READ, accepted_at=NOW - 10 * 86400)
        old_active = record("waiting", accepted_at=NOW - 10 * 86400)
        batch = batch_with(old_done, old_active, record("new", outcome=Outcome.READ))
        batch.events.append(event("old", StatusKind.READ, NOW - 10 * 86400))
        batch.sends.append(
            (
                RecipientKey("acme:r"),
                SendEntry(NOW - 8 * 86400, "acme:old", Category.PROMO, Channel.SMS),
            )
        )
        batch.sends.append(
            (RecipientKey("acme:r"), SendEntry(NOW - 3600, "acme:new", Category.PROMO, Channel.SMS))
        )
        await journal.commit(batch)
        pruned = await journal.prune(
            now=NOW,
            retention_seconds=7 * 86400,
            horizon_seconds=7 * 86400,
            receipt_retention_seconds=7 * 86400,
        )
        recovered = await journal.recover(
            now=NOW, retention_seconds=30 * 86400, horizon_seconds=30 * 86400
        )
        assert 1 == pruned
        assert await journal.message(MessageKey("acme:old")) is None
        assert [] == await journal.timeline(MessageKey("acme:old"))
        assert ["acme:waiting"] == [
            r.key for r in await active_records(journal)
        ]  # active messages are never pruned
        assert ["acme:new"] == [entry.message for _, entry in recovered.sends]

    @pytest.mark.parametrize("page", [1, 2, 3, 7, 100])
    async def test_active_messages_come_back_in_admission_order_page_by_page(
        self, open_journal: Callable[..., SqliteJournal], page: int
    ) -> None:
        journal = open_journal()
        await journal.open(create=True)
        keys = [f"m{index}" for index in (5, 1, 4, 2, 3, 0)]  # admission order, not key order
        await journal.commit(batch_with(*(record(key) for key in keys)))
        await journal.commit(batch_with(record("m4", outcome=Outcome.READ), new=False))
        expected = [f"acme:{key}" for key in keys if key != "m4"]
        assert expected == [r.key for r in await active_records(journal, page=page)]

    @pytest.mark.parametrize(("level", "expected"), [("normal", 1), ("full", 2)])
    async def test_the_synchronous_level_is_applied(
        self, open_journal: Callable[..., SqliteJournal], level: str, expected: int
    ) -> None:
        journal = open_journal(level)
        await journal.open(create=True)
        assert journal._writer is not None
        assert expected == journal._writer.execute("PRAGMA synchronous").fetchone()[0]
        assert "wal" == journal._writer.execute("PRAGMA journal_mode").fetchone()[0]

    async def test_consent_history_keeps_every_record_in_order(
        self, open_journal: Callable[..., SqliteJournal]
    ) -> None:
        journal = open_journal()
        await journal.open(create=True)
        grant = ConsentRecord(ConsentKind.ADVERTISING, ConsentAction.GRANT, NOW, "form")
        withdraw = ConsentRecord(
            ConsentKind.ADVERTISING,
            ConsentAction.WITHDRAW,
            NOW + 5,
            "one_click",
            channel=Channel.EMAIL,
            topic="promo",
        )
        for item in (grant, withdraw):
            batch = Batch()
            batch.consents.append((RecipientKey("acme:r1"), item))
            batch.rows += 1
            await journal.commit(batch)
        assert [grant, withdraw] == await journal.consent_history(RecipientKey("acme:r1"))

    def test_an_unknown_synchronous_level_is_refused(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="synchronous"):
            SqliteJournal(tmp_path / "x.db", synchronous="off")
