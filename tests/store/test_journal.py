"""The journal contract (gateway.store.base.Journal): one conformance suite, every implementation.

``TestJournal`` runs each case against ``SqliteJournal`` and ``MemoryJournal`` through a
``Backend``, which knows how to open another journal on the same storage (a restart), how to
make commits fail for a reason that passes, and how to plant an unreadable value. A Redis
journal joins by adding a backend. ``TestSqliteJournal`` holds what only the SQLite file has:
synchronous levels, ``check_journal`` and migrations.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import msgspec
import pytest
import trio

from gateway.client import send_request
from gateway.core.caps import SendEntry
from gateway.core.cascade import Cascade
from gateway.core.consent import ConsentAction, ConsentKind, ConsentRecord
from gateway.core.model import Category, Channel, Envelope, Lane, MessageKey, Outcome, RecipientKey
from gateway.protocol import StatusEvent, StatusKind
from gateway.store.base import (
    Batch,
    Journal,
    JournalCorrupt,
    JournalMissing,
    JournalUnavailable,
    MessageRecord,
    active_pages,
)
from gateway.store.memory import MemoryJournal, MemoryStore
from gateway.store.sqlite import SqliteJournal, check_journal

NOW = 1_795_435_200.0
DAY = 86400.0
FULL = "database or disk is full"
"""What SQLite says when it may not grow the file; the memory backend fails with the same."""

Table = Literal["messages", "consents", "sends"]


# ---------------------------------------------------------------- values
def record(
    key: str,
    *,
    outcome: Outcome | None = None,
    accepted_at: float = NOW,
    tenant: str = "acme",
    campaign: str | None = None,
    variant: str | None = None,
    assigned: bool = False,
) -> MessageRecord:
    """``assigned``: ``variant`` is an experiment arm the gateway gave, not a CRM's label."""
    cascade, _ = Cascade.start(
        plan=(Channel.PUSH, Channel.SMS), timeouts=(300.0, 86400.0), allowed=0b1111, now=accepted_at
    )
    if outcome is not None:
        cascade, _ = cascade._finish(outcome)
    envelope = Envelope(
        tenant,
        f"r-{key}",
        Category.PROMO,
        "promo",
        Lane.NORMAL,
        (Channel.PUSH, Channel.SMS),
        variant=variant if assigned else None,
    )
    return MessageRecord(
        f"{tenant}:{key}",
        envelope,
        "UTC",
        cascade,
        accepted_at,
        campaign=campaign,
        variant=variant,
        step_due=accepted_at + 300,
    )


def request_of(key: str) -> bytes:
    """A real send request (``check_journal`` decodes them), distinct per message."""
    tenant, _, message_id = key.partition(":")
    payload = send_request(
        message_id, tenant, recipient={"id": f"r-{message_id}"}, category="promo", content={}
    )
    return msgspec.msgpack.encode(payload)


def event(
    key: str,
    kind: StatusKind,
    at: float = NOW,
    *,
    tenant: str = "acme",
    channel: Channel | None = None,
    provider: str | None = None,
) -> StatusEvent:
    return StatusEvent(
        tenant, key, kind, datetime.fromtimestamp(at, UTC), channel=channel, provider=provider
    )


def consent(at: float = NOW, action: ConsentAction = ConsentAction.GRANT) -> ConsentRecord:
    return ConsentRecord(ConsentKind.ADVERTISING, action, at, "form", channel=Channel.SMS)


def batch_with(*records: MessageRecord, new: bool = True) -> Batch:
    batch = Batch()
    for item in records:
        if new:
            batch.insert(item, request_of(item.key))
        else:
            batch.write(item)
    return batch


def copied(value: MessageRecord) -> MessageRecord:
    return msgspec.msgpack.decode(msgspec.msgpack.encode(value), type=MessageRecord)


async def active_records(journal: Journal, *, page: int = 1000) -> list[MessageRecord]:
    """Every active message, read the way the router reads them at start: page by page."""
    return [record async for records in active_pages(journal, limit=page) for record in records]


# ---------------------------------------------------------------- backends
class Backend:
    """One journal implementation, as the conformance cases drive it."""

    def journal(self) -> Journal:
        """A new, unopened journal on this backend's storage. Opening one after another has
        committed is a restart (after a crash when the first was never closed)."""
        raise NotImplementedError

    async def opened(self, *, create: bool = True) -> Journal:
        journal = self.journal()
        await journal.open(create=create)
        return journal

    def fail_commits(self) -> None:
        """From now on commits fail with ``JournalUnavailable(FULL)`` (journals open now)."""
        raise NotImplementedError

    def allow_commits(self) -> None:
        raise NotImplementedError

    def plant(self, table: Table, row: str, blob: bytes) -> None:
        """Store ``blob`` as the value ``JournalCorrupt(table, row)`` would name."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Close whatever the cases left open."""


class SqliteBackend(Backend):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.journals: list[SqliteJournal] = []

    def journal(self) -> Journal:
        journal = SqliteJournal(self.path)
        self.journals.append(journal)
        return journal

    def fail_commits(self) -> None:
        # a real SQLITE_FULL: the writer may not add a page to the file, so the first statement
        # of a commit that needs one fails, after the statements before it ran
        for writer in self._writers():
            pages = writer.execute("PRAGMA page_count").fetchone()[0]
            writer.execute(f"PRAGMA max_page_count = {pages}")

    def allow_commits(self) -> None:
        for writer in self._writers():
            writer.execute("PRAGMA max_page_count = 4294967294")

    def plant(self, table: Table, row: str, blob: bytes) -> None:
        column, where = ("record", "key") if table == "messages" else ("body", "id")
        db = sqlite3.connect(self.path, isolation_level=None)
        try:
            changed = db.execute(
                f"UPDATE {table} SET {column} = ? WHERE {where} = ?",  # noqa: S608 - names are ours
                (blob, row if table == "messages" else int(row)),
            ).rowcount
        finally:
            db.close()
        if changed != 1:
            raise KeyError(f"{table}[{row}]")

    async def aclose(self) -> None:
        for journal in self.journals:
            await journal.aclose()

    def _writers(self) -> list[sqlite3.Connection]:
        return [j._writer for j in self.journals if j._writer is not None]


class MemoryBackend(Backend):
    def __init__(self) -> None:
        self.store = MemoryStore()

    def journal(self) -> Journal:
        return MemoryJournal(self.store)

    def fail_commits(self) -> None:
        self.store.fail_commits = FULL

    def allow_commits(self) -> None:
        self.store.fail_commits = None

    def plant(self, table: Table, row: str, blob: bytes) -> None:
        self.store.plant(table, row, blob)


@pytest.fixture(params=["sqlite", "memory"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    made = SqliteBackend(tmp_path / "journal.db") if request.param == "sqlite" else MemoryBackend()
    yield made
    await made.aclose()


# ---------------------------------------------------------------- the contract
class TestJournal:
    """What a journal must do: commit atomically, survive a restart, give everything back."""

    @pytest.mark.parametrize("graceful", [True, False], ids=["closed", "crashed"])
    async def test_committed_state_comes_back_after_a_restart(
        self, backend: Backend, graceful: bool
    ) -> None:
        journal = await backend.opened()
        active, done = record("m1"), record("m2", outcome=Outcome.READ)
        batch = batch_with(active, done)
        batch.opening["acme:m1"] = [event("m1", StatusKind.ACCEPTED)]
        entry = SendEntry(NOW, "acme:m1", Category.PROMO, Channel.PUSH)
        batch.consents.append((RecipientKey("acme:r-m1"), consent()))
        batch.sends.append((RecipientKey("acme:r-m1"), entry))
        batch.addresses.append(("ref1", "acme:r-m1"))
        batch.events.extend(
            [event("m1", StatusKind.SENT, NOW + 1), event("m2", StatusKind.READ, NOW + 2)]
        )
        batch.receipts.append((42, NOW))
        await journal.commit(batch)
        if graceful:
            await journal.aclose()

        again = await backend.opened(create=False)
        recovered = await again.recover(now=NOW + 10, retention_seconds=DAY, horizon_seconds=DAY)
        assert [active] == await active_records(again)
        assert {"acme:m2": Outcome.READ} == recovered.finished
        assert [(RecipientKey("acme:r-m1"), consent())] == recovered.consents
        assert [(RecipientKey("acme:r-m1"), entry)] == recovered.sends
        assert [("ref1", "acme:r-m1")] == recovered.addresses
        assert [
            event("m1", StatusKind.ACCEPTED),
            event("m1", StatusKind.SENT, NOW + 1),
        ] == await again.timeline(MessageKey("acme:m1"))
        assert {"acme:m1": request_of("acme:m1")} == await again.requests(["acme:m1", "acme:no"])
        assert {42} == await again.known_receipts([42, 43])

    async def test_nothing_staged_survives_a_restart(self, backend: Backend) -> None:
        journal = await backend.opened()
        staged = batch_with(record("staged"))
        staged.events.append(event("staged", StatusKind.ACCEPTED))
        staged.consents.append((RecipientKey("acme:r"), consent()))
        await journal.commit(batch_with(record("m1")))

        again = await backend.opened(create=False)  # the first never commits ``staged``
        recovered = await again.recover(now=NOW, retention_seconds=DAY, horizon_seconds=DAY)
        assert ["acme:m1"] == [r.key for r in await active_records(again)]
        assert await again.message(MessageKey("acme:staged")) is None
        assert [] == await again.timeline(MessageKey("acme:staged"))
        assert [] == recovered.consents

    async def test_updates_replace_the_record_and_mark_it_finished(self, backend: Backend) -> None:
        journal = await backend.opened()
        await journal.commit(batch_with(record("m1")))
        await journal.commit(batch_with(record("m1", outcome=Outcome.CANCELLED), new=False))
        stored = await journal.message(MessageKey("acme:m1"))
        recovered = await journal.recover(now=NOW, retention_seconds=DAY, horizon_seconds=0)
        assert stored is not None
        assert stored.finished
        assert Outcome.CANCELLED == stored.record.cascade.outcome
        assert request_of("acme:m1") == stored.request  # an update keeps the request
        assert [] == await active_records(journal)
        assert {"acme:m1": Outcome.CANCELLED} == recovered.finished

    async def test_an_update_of_a_message_never_inserted_writes_nothing(
        self, backend: Backend
    ) -> None:
        journal = await backend.opened()
        await journal.commit(batch_with(record("ghost"), new=False))
        assert await journal.message(MessageKey("acme:ghost")) is None
        assert [] == await active_records(journal)

    async def test_a_batch_inserting_a_journalled_key_fails_and_leaves_nothing(
        self, backend: Backend
    ) -> None:
        journal = await backend.opened()
        await journal.commit(batch_with(record("m1")))
        failing = batch_with(record("m2"), record("m1"))  # m1 again, after m2 went in
        failing.events.append(event("m2", StatusKind.ACCEPTED))
        failing.receipts.append((7, NOW))
        # the protocol names no type for it (SQLite: sqlite3.IntegrityError)
        with pytest.raises(Exception) as failure:
            await journal.commit(failing)
        # a bug in the batch, not a passing cause: the committer must not retry it forever
        assert not isinstance(failure.value, JournalUnavailable)
        assert await journal.message(MessageKey("acme:m2")) is None
        assert [] == await journal.timeline(MessageKey("acme:m2"))
        assert set() == await journal.known_receipts([7])
        assert ["acme:m1"] == [r.key for r in await active_records(journal)]

    async def test_an_unavailable_commit_writes_nothing_until_the_cause_passes(
        self, backend: Backend
    ) -> None:
        journal = await backend.opened()
        await journal.commit(batch_with(record("m1")))
        failing = batch_with(record("m2"))
        failing.write(record("m1", outcome=Outcome.READ))  # an update as well
        failing.opening_event("acme:m2", event("m2", StatusKind.ACCEPTED))
        # enough rows that SQLite needs new pages midway, after the message rows went in
        for n in range(300):
            failing.event(event("m1", StatusKind.DELIVERED, NOW + n))
        failing.consent(RecipientKey("acme:r-m2"), consent())
        failing.send(RecipientKey("acme:r-m2"), SendEntry(NOW, "acme:m2", Category.PROMO, Channel.SMS))  # fmt: skip
        failing.address("ref2", "acme:r-m2")
        failing.receipt(7, NOW)
        assert 306 == failing.rows  # two records, 300 events, a consent, send, address, receipt

        async def nothing_written(journal: Journal) -> None:
            recovered = await journal.recover(now=NOW, retention_seconds=DAY, horizon_seconds=DAY)
            assert ["acme:m1"] == [r.key for r in await active_records(journal)]
            assert await journal.message(MessageKey("acme:m2")) is None
            assert [] == await journal.timeline(MessageKey("acme:m1"))
            assert [] == await journal.timeline(MessageKey("acme:m2"))
            assert (recovered.finished, recovered.consents, recovered.sends) == ({}, [], [])
            assert [] == recovered.addresses
            assert set() == await journal.known_receipts([7])

        backend.fail_commits()
        for _ in range(2):  # it keeps failing, and writing nothing, until the cause passes
            with pytest.raises(JournalUnavailable, match=FULL):
                await journal.commit(failing)
            await nothing_written(journal)
        await nothing_written(await backend.opened(create=False))  # nor after a restart

        backend.allow_commits()
        await journal.commit(failing)  # the same batch, again
        again = await backend.opened(create=False)
        recovered = await again.recover(now=NOW, retention_seconds=DAY, horizon_seconds=DAY)
        assert ["acme:m2"] == [r.key for r in await active_records(again)]
        assert {"acme:m1": Outcome.READ} == recovered.finished
        assert 300 == len(await again.timeline(MessageKey("acme:m1")))
        assert [event("m2", StatusKind.ACCEPTED)] == await again.timeline(MessageKey("acme:m2"))
        assert [("ref2", "acme:r-m2")] == recovered.addresses
        assert {7} == await again.known_receipts([7])

    async def test_a_journal_that_never_was_is_not_created_unasked(self, backend: Backend) -> None:
        # an empty journal would forget every withdrawn consent: never one in place of a lost one
        with pytest.raises(JournalMissing, match="does not exist; `cascadegw init` creates"):
            await backend.opened(create=False)
        journal = await backend.opened(create=True)
        await journal.commit(batch_with(record("m1")))
        again = await backend.opened(create=False)  # created once, it opens without asking
        assert ["acme:m1"] == [r.key for r in await active_records(again)]

    async def test_a_journal_that_is_not_open_refuses_work(self, backend: Backend) -> None:
        calls: list[Callable[[Journal], Awaitable[object]]] = [
            lambda j: j.commit(Batch()),
            lambda j: j.recover(now=NOW, retention_seconds=DAY, horizon_seconds=DAY),
            lambda j: j.active_page(None, limit=10),
            lambda j: j.messages(["acme:m1"]),
            lambda j: j.requests(["acme:m1"]),
            lambda j: j.timelines(["acme:m1"]),
            lambda j: j.known_receipts([1]),
            lambda j: j.consent_history(RecipientKey("acme:r")),
            lambda j: j.campaign_rows("acme", "spring"),
            lambda j: j.prune(
                now=NOW, retention_seconds=DAY, horizon_seconds=DAY, receipt_retention_seconds=DAY
            ),
        ]
        never_opened = backend.journal()
        closed = await backend.opened()
        await closed.aclose()
        for journal in (never_opened, closed):
            for call in calls:
                with pytest.raises(RuntimeError, match="not open"):
                    await call(journal)

    async def test_a_cancelled_commit_writes_nothing(self, backend: Backend) -> None:
        journal = await backend.opened()
        with trio.CancelScope() as scope:
            scope.cancel()
            await journal.commit(batch_with(record("m1")))
        assert scope.cancelled_caught
        assert await journal.message(MessageKey("acme:m1")) is None

    async def test_reads_hand_out_copies_not_what_the_journal_or_the_writer_holds(
        self, backend: Backend
    ) -> None:
        journal = await backend.opened()
        live = record("m1")
        committed = copied(live)
        await journal.commit(batch_with(live))
        # the router replaces a record's cascade in place once it has handed the batch over
        live.cascade, _ = live.cascade._finish(Outcome.CANCELLED)
        live.step_due = None
        assert [committed] == await active_records(journal)
        stored = await journal.message(MessageKey("acme:m1"))
        assert stored is not None
        assert committed == stored.record
        stored.record.provider = "push1"
        (paged,), _ = await journal.active_page(None, limit=10)
        paged.provider = "push2"
        again = await journal.message(MessageKey("acme:m1"))
        assert again is not None
        assert committed == again.record
        assert [committed] == await active_records(journal)

    async def test_messages_and_requests_answer_for_the_keys_they_know(
        self, backend: Backend
    ) -> None:
        journal = await backend.opened()
        active, done = record("m1"), record("m2", outcome=Outcome.DELIVERED)
        await journal.commit(batch_with(active, done))
        found = await journal.messages(["acme:m1", "acme:m2", "acme:nope", "acme:m1"])
        assert {"acme:m1", "acme:m2"} == set(found)
        assert (active, request_of("acme:m1"), False) == (
            found["acme:m1"].record,
            found["acme:m1"].request,
            found["acme:m1"].finished,
        )
        assert found["acme:m2"].finished
        assert done == found["acme:m2"].record
        assert {} == await journal.messages([])
        assert {} == await journal.requests([])
        assert {"acme:m2": request_of("acme:m2")} == await journal.requests(["acme:m2"])
        assert await journal.message(MessageKey("acme:nope")) is None

    async def test_timelines_put_the_opening_before_later_events_in_commit_order(
        self, backend: Backend
    ) -> None:
        journal = await backend.opened()
        batch = batch_with(record("m1"), record("m2"), record("m3"))
        batch.opening["acme:m1"] = [
            event("m1", StatusKind.ACCEPTED),
            event("m1", StatusKind.DEFERRED),
        ]
        await journal.commit(batch)
        later = Batch()
        for staged in (
            event("m2", StatusKind.SENT, NOW + 2, channel=Channel.PUSH, provider="push1"),
            event("m1", StatusKind.SENT, NOW + 3),
            event("m1", StatusKind.READ, NOW + 1),  # commit order, not the time it names
            event("orphan", StatusKind.CONVERTED),  # no message row: still a timeline
        ):
            later.event(staged)
        await journal.commit(later)
        timelines = await journal.timelines(
            ["acme:m1", "acme:m2", "acme:m3", "acme:orphan", "acme:m1"]  # m1 twice: once back
        )
        assert {
            "acme:m1": [
                event("m1", StatusKind.ACCEPTED),
                event("m1", StatusKind.DEFERRED),
                event("m1", StatusKind.SENT, NOW + 3),
                event("m1", StatusKind.READ, NOW + 1),
            ],
            "acme:m2": [
                event("m2", StatusKind.SENT, NOW + 2, channel=Channel.PUSH, provider="push1")
            ],
            "acme:orphan": [event("orphan", StatusKind.CONVERTED)],
        } == timelines  # m3 has no events: absent
        assert {} == await journal.timelines([])
        assert [] == await journal.timeline(MessageKey("acme:m3"))

    async def test_a_key_asked_for_twice_gets_its_timeline_once_however_long_the_list(
        self, backend: Backend
    ) -> None:
        journal = await backend.opened()
        batch = batch_with(record("m1"))
        batch.opening["acme:m1"] = [event("m1", StatusKind.ACCEPTED)]
        batch.events.append(event("m1", StatusKind.SENT, NOW + 1))
        await journal.commit(batch)
        # one burst of status queries may name a message twice, far apart in the list
        keys = ["acme:m1", *(f"acme:other{n}" for n in range(600)), "acme:m1"]
        assert {
            "acme:m1": [event("m1", StatusKind.ACCEPTED), event("m1", StatusKind.SENT, NOW + 1)]
        } == await journal.timelines(keys)

    async def test_consent_history_keeps_every_record_in_order(self, backend: Backend) -> None:
        journal = await backend.opened()
        grant = ConsentRecord(ConsentKind.ADVERTISING, ConsentAction.GRANT, NOW, "form")
        withdraw = ConsentRecord(
            ConsentKind.ADVERTISING,
            ConsentAction.WITHDRAW,
            NOW - 5,  # the order of commits, not of the times they name
            "one_click",
            channel=Channel.EMAIL,
            topic="promo",
        )
        for item in (grant, withdraw):
            batch = Batch()
            batch.consent(RecipientKey("acme:r1"), item)
            batch.consent(RecipientKey("acme:r2"), consent())
            await journal.commit(batch)
        assert [grant, withdraw] == await journal.consent_history(RecipientKey("acme:r1"))
        assert [] == await journal.consent_history(RecipientKey("acme:r3"))

    async def test_an_address_may_belong_to_several_recipients(self, backend: Backend) -> None:
        journal = await backend.opened()
        first = Batch()
        first.addresses = [("ref1", "acme:r1"), ("ref1", "acme:r2"), ("ref1", "acme:r1")]
        await journal.commit(first)
        second = Batch()
        second.addresses = [("ref0", "acme:r3"), ("ref1", "acme:r2")]  # known pairs: once
        await journal.commit(second)
        again = await backend.opened(create=False)
        recovered = await again.recover(now=NOW, retention_seconds=DAY, horizon_seconds=DAY)
        assert [("ref0", "acme:r3"), ("ref1", "acme:r1"), ("ref1", "acme:r2")] == sorted(
            recovered.addresses
        )

    async def test_receipts_are_known_once_committed_until_their_retention_passes(
        self, backend: Backend
    ) -> None:
        journal = await backend.opened()
        low, high = -(2**63), 2**63 - 1  # digests are signed 64-bit integers
        first = Batch()
        first.receipts = [(low, NOW - 10 * DAY), (high, NOW), (5, NOW - 7 * DAY)]
        await journal.commit(first)
        again = Batch()
        again.receipts = [(low, NOW)]  # committed before: its first arrival stays
        await journal.commit(again)
        assert {low, high, 5} == await journal.known_receipts([low, high, 5, 6])
        assert set() == await journal.known_receipts([])

        await journal.prune(
            now=NOW, retention_seconds=DAY, horizon_seconds=DAY, receipt_retention_seconds=7 * DAY
        )
        restarted = await backend.opened(create=False)
        # older than the retention goes; exactly at its edge stays
        assert {high, 5} == await restarted.known_receipts([low, high, 5])

    async def test_prune_forgets_what_is_past_retention_and_horizon(self, backend: Backend) -> None:
        journal = await backend.opened()
        old_done = record("old", outcome=Outcome.READ, accepted_at=NOW - 10 * DAY)
        edge_done = record("edge", outcome=Outcome.READ, accepted_at=NOW - 7 * DAY)
        old_active = record("waiting", accepted_at=NOW - 10 * DAY)
        batch = batch_with(old_done, edge_done, old_active, record("new", outcome=Outcome.READ))
        batch.opening["acme:old"] = [event("old", StatusKind.ACCEPTED, NOW - 10 * DAY)]
        batch.events.append(event("old", StatusKind.READ, NOW - 10 * DAY))
        batch.events.append(event("edge", StatusKind.READ, NOW - 7 * DAY))
        batch.events.append(event("waiting", StatusKind.SENT, NOW - 10 * DAY))
        rkey = RecipientKey("acme:r")
        for at, message in ((NOW - 8 * DAY, "old"), (NOW - 7 * DAY, "edge"), (NOW - 3600, "new")):
            batch.sends.append(
                (rkey, SendEntry(at, f"acme:{message}", Category.PROMO, Channel.SMS))
            )
        await journal.commit(batch)

        pruned = await journal.prune(
            now=NOW,
            retention_seconds=7 * DAY,
            horizon_seconds=7 * DAY,
            receipt_retention_seconds=7 * DAY,
        )
        assert 1 == pruned
        for reader in (journal, await backend.opened(create=False)):
            recovered = await reader.recover(
                now=NOW, retention_seconds=30 * DAY, horizon_seconds=30 * DAY
            )
            assert await reader.message(MessageKey("acme:old")) is None
            assert [] == await reader.timeline(MessageKey("acme:old"))
            assert {"acme:edge": Outcome.READ, "acme:new": Outcome.READ} == recovered.finished
            assert [event("edge", StatusKind.READ, NOW - 7 * DAY)] == await reader.timeline(
                MessageKey("acme:edge")
            )
            # active messages are never pruned, nor their events
            assert ["acme:waiting"] == [r.key for r in await active_records(reader)]
            assert 1 == len(await reader.timeline(MessageKey("acme:waiting")))
            # a send exactly at the horizon's edge is past it
            assert ["acme:new"] == [entry.message for _, entry in recovered.sends]

    async def test_recovery_takes_what_the_windows_hold_at_their_edges(
        self, backend: Backend
    ) -> None:
        journal = await backend.opened()
        older = record("older", outcome=Outcome.READ, accepted_at=NOW - DAY - 1)
        edge = record("edge", outcome=Outcome.EXPIRED, accepted_at=NOW - DAY)
        later = record("later", outcome=Outcome.CANCELLED, accepted_at=NOW - 10)
        first = record("first", outcome=Outcome.READ, accepted_at=NOW - 20)
        batch = batch_with(later, older, edge, first)
        rkey = RecipientKey("acme:r")
        batch.sends.extend(
            (rkey, SendEntry(at, "acme:m", Category.PROMO, Channel.SMS))
            for at in (NOW - 2 * DAY, NOW - 2 * DAY + 1)
        )
        await journal.commit(batch)
        recovered = await journal.recover(now=NOW, retention_seconds=DAY, horizon_seconds=2 * DAY)
        # finished ones in order of admission time, not of commit
        assert ["acme:edge", "acme:first", "acme:later"] == list(recovered.finished)
        assert [NOW - 2 * DAY + 1] == [entry.at for _, entry in recovered.sends]

    @pytest.mark.parametrize("page", [1, 2, 3, 5, 7, 100])
    async def test_active_messages_come_back_in_admission_order_page_by_page(
        self, backend: Backend, page: int
    ) -> None:
        journal = await backend.opened()
        keys = [f"m{index}" for index in (5, 1, 4, 2, 3, 0)]  # admission order, not key order
        await journal.commit(batch_with(*(record(key) for key in keys)))
        await journal.commit(batch_with(record("m4", outcome=Outcome.READ), new=False))
        expected = [f"acme:{key}" for key in keys if key != "m4"]
        assert expected == [r.key for r in await active_records(journal, page=page)]

    async def test_paging_goes_on_after_its_cursor_while_commits_land(
        self, backend: Backend
    ) -> None:
        journal = await backend.opened()
        await journal.commit(batch_with(*(record(f"m{n}") for n in range(6))))
        first, cursor = await journal.active_page(None, limit=2)
        assert cursor is not None
        change = batch_with(record("m6"))
        change.dirty["acme:m2"] = record("m2", outcome=Outcome.READ)
        await journal.commit(change)
        second, cursor = await journal.active_page(cursor, limit=2)
        assert cursor is not None
        third, cursor = await journal.active_page(cursor, limit=3)
        assert cursor is None  # a short page is the last
        assert [["acme:m0", "acme:m1"], ["acme:m3", "acme:m4"], ["acme:m5", "acme:m6"]] == [
            [r.key for r in page] for page in (first, second, third)
        ]

    async def test_campaign_rows_count_per_variant_outcome_and_event_kind(
        self, backend: Backend
    ) -> None:
        journal = await backend.opened()
        spring = "spring"
        batch = batch_with(
            record("c1", campaign=spring, variant="A"),
            record("c2", campaign=spring, variant="A", outcome=Outcome.READ),
            record("c3", campaign=spring, variant="B", outcome=Outcome.HOLDOUT),
            record("c4", campaign=spring, outcome=Outcome.EXHAUSTED),
            record("x1", campaign="autumn", variant="A"),
            record("n1"),
            record("c9", campaign=spring, variant="A", tenant="acme2"),  # another tenant
        )
        batch.opening["acme:c3"] = [event("c3", StatusKind.HOLDOUT)]  # openings do not count
        push, sms = Channel.PUSH, Channel.SMS
        batch.events = [
            event("c1", StatusKind.SENT, channel=push, provider="push1"),
            event("c1", StatusKind.DELIVERED, channel=push, provider="push1"),
            event("c1", StatusKind.READ, channel=push, provider="push1"),
            event("c1", StatusKind.CONVERTED),
            event("c2", StatusKind.SENT, channel=sms, provider="sms1"),
            event("c2", StatusKind.SENT, channel=sms, provider="sms1"),  # a resend
            event("c2", StatusKind.CONVERTED),
            event("c3", StatusKind.CONVERTED),
            event("c4", StatusKind.FAILED, channel=Channel.EMAIL, provider="email1"),
            event("x1", StatusKind.SENT, channel=sms, provider="sms1"),
            event("n1", StatusKind.SENT, channel=sms, provider="sms1"),
            event("c9", StatusKind.SENT, channel=sms, provider="sms1", tenant="acme2"),
            event("ghost", StatusKind.SENT, channel=sms, provider="sms1"),  # no message row
        ]
        await journal.commit(batch)
        # finishing by update moves c1 to its outcome and keeps it in its campaign
        await journal.commit(
            batch_with(record("c1", campaign=spring, variant="A", outcome=Outcome.READ), new=False)
        )
        message_rows, event_rows = await journal.campaign_rows("acme", spring)
        assert [
            (None, "exhausted", 1),
            ("A", "read", 2),
            ("B", "holdout", 1),
        ] == sorted(message_rows, key=_null_first)
        assert [
            (None, 0, "email", "failed", "email1", 1, 1),
            ("A", 0, None, "converted", None, 2, 2),
            ("A", 0, "push", "delivered", "push1", 1, 1),
            ("A", 0, "push", "read", "push1", 1, 1),
            ("A", 0, "push", "sent", "push1", 1, 1),
            ("A", 0, "sms", "sent", "sms1", 2, 1),
            ("B", 1, None, "converted", None, 1, 1),
        ] == sorted(event_rows, key=_null_first)
        assert ([], []) == await journal.campaign_rows("acme", "winter")
        assert ([("A", None, 1)], [("A", 0, "sms", "sent", "sms1", 1, 1)]) == (
            await journal.campaign_rows("acme2", spring)
        )

    async def test_experiment_rows_take_the_experiments_variants_only(
        self, backend: Backend
    ) -> None:
        journal = await backend.opened()
        batch = batch_with(
            record("e1", campaign="spring", variant="cascades/long", assigned=True),
            record(
                "e2",
                campaign="autumn",
                variant="cascades/short",
                outcome=Outcome.READ,
                assigned=True,
            ),
            # another experiment, a longer name
            record("e3", variant="cascades_2/long", assigned=True),
            record("e4", variant="cascades"),  # a CRM's own label
            # a CRM's own label in the experiment's shape (sent before it existed): not an arm
            record("e5", variant="cascades/long"),
            record("e9", variant="cascades/long", tenant="acme2", assigned=True),
        )
        batch.events = [
            event("e2", StatusKind.CONVERTED),
            event("e3", StatusKind.CONVERTED),
            event("e5", StatusKind.CONVERTED),
        ]
        await journal.commit(batch)
        message_rows, event_rows = await journal.experiment_rows("acme", "cascades")
        assert [("cascades/long", None, 1), ("cascades/short", "read", 1)] == sorted(
            message_rows, key=_null_first
        )
        assert [("cascades/short", 0, None, "converted", None, 1, 1)] == event_rows

    async def test_experiment_definitions_are_pinned_at_first_sight(self, backend: Backend) -> None:
        journal = await backend.opened()
        assert {} == await journal.pin_experiments({"experiment:acme/x": "aaaa"})
        # the same again, and a new one beside it: pinned too
        assert {} == await journal.pin_experiments(
            {"experiment:acme/x": "aaaa", "experiment:acme/y": "bbbb"}
        )
        # a changed definition is answered with the one pinned, and nothing is written
        changed = {"experiment:acme/x": "cccc", "experiment:acme/z": "dddd"}
        assert {"experiment:acme/x": "aaaa"} == await journal.pin_experiments(changed)
        assert {} == await journal.pin_experiments({"experiment:acme/z": "eeee"})
        # an experiment left out of the config is no change; it stays pinned
        assert {} == await journal.pin_experiments({})
        assert {"experiment:acme/y": "bbbb"} == await journal.pin_experiments(
            {"experiment:acme/y": "ffff"}
        )

    @pytest.mark.parametrize(
        "blob",
        [b"\xc1", msgspec.msgpack.encode({"not": "a record"})],
        ids=["not-msgpack", "not-a-record"],
    )
    async def test_an_unreadable_record_is_named_at_recovery(
        self, backend: Backend, blob: bytes
    ) -> None:
        journal = await backend.opened()
        await journal.commit(batch_with(record("m1"), record("m2"), record("m3")))
        backend.plant("messages", "acme:m2", blob)
        first, cursor = await journal.active_page(None, limit=1)  # rows before it still read
        assert ["acme:m1"] == [r.key for r in first]
        with pytest.raises(JournalCorrupt) as corrupt:
            await journal.active_page(cursor, limit=1)
        assert ("messages", "acme:m2") == (corrupt.value.table, corrupt.value.row)
        assert "journal row messages[acme:m2] cannot be read" in str(corrupt.value)
        with pytest.raises(JournalCorrupt, match=r"messages\[acme:m2\]"):
            await active_records(await backend.opened(create=False))  # and after a restart

    @pytest.mark.parametrize("table", ["consents", "sends"])
    async def test_an_unreadable_consent_or_send_is_named_at_recovery(
        self, backend: Backend, table: Table
    ) -> None:
        journal = await backend.opened()
        batch = Batch()
        rkey = RecipientKey("acme:r")
        for n in range(3):
            batch.consents.append((rkey, consent(NOW + n)))
            batch.sends.append((rkey, SendEntry(NOW + n, f"acme:m{n}", Category.PROMO, Channel.SMS)))  # fmt: skip
        await journal.commit(batch)
        backend.plant(table, "2", b"\xc1")  # ids count from 1, in commit order
        again = await backend.opened(create=False)
        with pytest.raises(JournalCorrupt) as corrupt:
            await again.recover(now=NOW, retention_seconds=DAY, horizon_seconds=DAY)
        assert (table, "2") == (corrupt.value.table, corrupt.value.row)

    @pytest.mark.parametrize("read", ["message", "consent_history"])
    async def test_an_unreadable_row_is_named_by_the_reads_that_meet_it_too(
        self, backend: Backend, read: str
    ) -> None:
        # a finished message's record is never decoded at start, so a damaged one is first
        # met by a status query or an opt-out's lookup; it should say which row, and what to do
        journal = await backend.opened()
        batch = batch_with(record("m1", outcome=Outcome.READ))
        batch.consents.append((RecipientKey("acme:r1"), consent()))
        await journal.commit(batch)
        if read == "message":
            backend.plant("messages", "acme:m1", b"\xc1")
            with pytest.raises(JournalCorrupt, match=r"messages\[acme:m1\]"):
                await journal.message(MessageKey("acme:m1"))
        else:
            backend.plant("consents", "1", b"\xc1")
            with pytest.raises(JournalCorrupt, match=r"consents\[1\]"):
                await journal.consent_history(RecipientKey("acme:r1"))


def _null_first(row: tuple[Any, ...]) -> tuple[tuple[bool, Any], ...]:
    """Sort key for aggregate rows: SQL names no order for GROUP BY; NULL sorts first."""
    return tuple((value is not None, value) for value in row)


# ---------------------------------------------------------------- SQLite only
@pytest.fixture
async def sqlite_backend(tmp_path: Path) -> AsyncIterator[SqliteBackend]:
    made = SqliteBackend(tmp_path / "journal.db")
    yield made
    await made.aclose()


class TestSqliteJournal:
    """What only the SQLite file has: durability levels, the offline check, migrations."""

    @pytest.mark.parametrize(("level", "expected"), [("normal", 1), ("full", 2)])
    async def test_the_synchronous_level_is_applied(
        self, tmp_path: Path, level: str, expected: int
    ) -> None:
        journal = SqliteJournal(tmp_path / "journal.db", synchronous=level)
        await journal.open(create=True)
        try:
            assert journal._writer is not None
            assert expected == journal._writer.execute("PRAGMA synchronous").fetchone()[0]
            assert "wal" == journal._writer.execute("PRAGMA journal_mode").fetchone()[0]
        finally:
            await journal.aclose()

    def test_an_unknown_synchronous_level_is_refused(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="synchronous"):
            SqliteJournal(tmp_path / "x.db", synchronous="off")

    async def test_check_finds_unreadable_rows_and_quarantine_moves_them_aside(
        self, sqlite_backend: SqliteBackend
    ) -> None:
        journal = await sqlite_backend.opened()
        batch = batch_with(record("m1"), record("m2"))
        batch.events.append(event("m2", StatusKind.SENT))
        batch.consents.append((RecipientKey("acme:r1"), consent()))
        await journal.commit(batch)
        await journal.aclose()
        assert [] == check_journal(sqlite_backend.path, now=NOW)
        sqlite_backend.plant("messages", "acme:m2", b"\xc1")
        sqlite_backend.plant("consents", "1", b"\xc1")

        reported = check_journal(sqlite_backend.path, now=NOW)
        # rows are named as the gateway names them at start: consents by row id
        assert [("messages", "acme:m2"), ("consents", "1")] == [(p.table, p.row) for p in reported]
        assert "(recipient acme:r1)" in reported[1].detail
        # a check alone changes nothing
        assert reported == check_journal(sqlite_backend.path, now=NOW)
        assert reported == check_journal(sqlite_backend.path, now=NOW, quarantine=True)
        assert [] == check_journal(sqlite_backend.path, now=NOW)

        again = await sqlite_backend.opened(create=False)
        recovered = await again.recover(now=NOW, retention_seconds=DAY, horizon_seconds=DAY)
        assert ["acme:m1"] == [r.key for r in await active_records(again)]
        assert [] == await again.timeline(MessageKey("acme:m2"))  # its events went with it
        # the unreadable consent may have been a withdrawal: advertising is withdrawn instead
        ((recipient, withdrawal),) = recovered.consents
        assert "acme:r1" == recipient
        assert (ConsentKind.ADVERTISING, ConsentAction.WITHDRAW, None, None, NOW) == (
            withdrawal.kind,
            withdrawal.action,
            withdrawal.channel,
            withdrawal.topic,
            withdrawal.at,
        )
        db = sqlite3.connect(sqlite_backend.path)
        try:
            kept = db.execute("SELECT source, row, body FROM quarantine ORDER BY id").fetchall()
        finally:
            db.close()
        assert [("messages", "acme:m2", b"\xc1"), ("consents", "1", b"\xc1")] == kept

    def test_check_refuses_a_journal_that_does_not_exist(self, tmp_path: Path) -> None:
        with pytest.raises(JournalMissing, match="does not exist"):
            check_journal(tmp_path / "nothing.db", now=NOW)
        assert not (tmp_path / "nothing.db").exists()

    async def test_a_journal_of_an_earlier_version_is_migrated(
        self, sqlite_backend: SqliteBackend
    ) -> None:
        old = record("m1")
        db = sqlite3.connect(sqlite_backend.path, isolation_level=None)
        try:
            # the schema before campaigns, event columns and several recipients per address
            db.executescript(
                "CREATE TABLE messages (key TEXT PRIMARY KEY, accepted_at REAL NOT NULL,"
                " request BLOB NOT NULL, record BLOB NOT NULL, outcome TEXT);"
                "CREATE TABLE events (id INTEGER PRIMARY KEY, key TEXT NOT NULL, body BLOB NOT NULL);"
                "CREATE TABLE addresses (ref TEXT PRIMARY KEY, recipient TEXT NOT NULL);"
            )
            db.execute(
                "INSERT INTO messages VALUES (?, ?, ?, ?, NULL)",
                (old.key, NOW, request_of(old.key), msgspec.msgpack.encode(old)),
            )
            db.execute(
                "INSERT INTO events (key, body) VALUES (?, ?)",
                (old.key, msgspec.msgpack.encode(event("m1", StatusKind.SENT))),
            )
            db.execute("INSERT INTO addresses VALUES ('ref1', 'acme:r1')")
        finally:
            db.close()

        journal = await sqlite_backend.opened(create=False)
        more = Batch()
        more.addresses.append(("ref1", "acme:r2"))  # a second recipient for the same address
        await journal.commit(more)
        recovered = await journal.recover(now=NOW, retention_seconds=DAY, horizon_seconds=DAY)
        assert [old] == await active_records(journal)
        assert [event("m1", StatusKind.SENT)] == await journal.timeline(MessageKey(old.key))
        assert [("ref1", "acme:r1"), ("ref1", "acme:r2")] == sorted(recovered.addresses)
        db = sqlite3.connect(sqlite_backend.path)
        try:
            tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
        finally:
            db.close()
        assert "addresses" not in tables  # the old table is gone, not left to drift
        # the experiment column came too: a new arm's message is reported, the old row is not
        await journal.commit(batch_with(record("m2", variant="exp/a", assigned=True)))
        messages, _ = await journal.experiment_rows("acme", "exp")
        assert [("exp/a", None, 1)] == messages
