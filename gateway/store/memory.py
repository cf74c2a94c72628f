"""An in-memory journal for tests: the SQLite journal's observable semantics, without threads.

What it is for: fast, deterministic tests of the router and the services around it.
``SqliteJournal`` runs every call in a worker thread; while a thread runs, every trio task may
look idle, and trio's autojump ``MockClock`` can jump virtual time in the middle of a commit.
``MemoryJournal`` does all of its work on the trio thread, so virtual time only moves when the
code under test waits for it.

What it is not: a production store. Nothing is written anywhere: a ``MemoryStore`` outlives
the journals opened on it (which is how a test simulates a restart: a new ``MemoryJournal`` on
the same store) but not the process, so there is no durability across processes, no fsync, no
crash safety. Only tests import this module; import-linter forbids the runtime, the HTTP layer
and the CLI to import it (pyproject.toml).

Fidelity: values are msgpack-encoded on commit and decoded on every read, as SQLite stores
them, so a test cannot pass because the router mutated an object the journal still holds.
Row ids, orderings, boundary comparisons, the aggregate rows of ``campaign_rows`` and which
reads check the journal is open follow ``gateway.store.sqlite`` line by line;
``tests/store/test_journal.py`` runs the same conformance cases against both: a key asked
for twice gets its timeline once, and an unreadable row is a ``JournalCorrupt`` on every read,
not only at recovery. ``active_page`` refuses a limit below 1.

Test hooks, on the store:
- ``MemoryStore.fail_commits``: a reason; while it is set every commit raises
  ``JournalUnavailable`` with it and writes nothing (the committer's retry path).
- ``MemoryStore.plant``: replace a stored value with raw bytes, to test ``JournalCorrupt``.
"""

from __future__ import annotations

import secrets
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
import trio

from gateway.core.caps import SendEntry
from gateway.core.consent import ConsentRecord
from gateway.core.model import MessageKey, Outcome, RecipientKey
from gateway.protocol import StatusEvent
from gateway.store.base import (
    Batch,
    JournalCorrupt,
    JournalMissing,
    JournalUnavailable,
    MessageRecord,
    Recovered,
    StoredMessage,
)

_encoder = msgspec.msgpack.Encoder()
_record_decoder = msgspec.msgpack.Decoder(MessageRecord)
_event_decoder = msgspec.msgpack.Decoder(StatusEvent)
_events_decoder = msgspec.msgpack.Decoder(list[StatusEvent])
_consent_decoder = msgspec.msgpack.Decoder(ConsentRecord)
_send_decoder = msgspec.msgpack.Decoder(SendEntry)


@dataclass(slots=True)
class _Message:
    """A row of SQLite's ``messages`` table. ``accepted_at``, ``campaign`` and ``variant`` are
    columns set at insert and never updated, as there: prune and reports read these copies."""

    rowid: int
    key: str
    accepted_at: float
    request: bytes
    record: bytes
    outcome: str | None
    campaign: str | None
    variant: str | None
    opening: bytes | None
    experiment: str | None = None
    """The arm the gateway assigned (``Envelope.variant``), never a CRM's label."""


@dataclass(slots=True)
class _Event:
    body: bytes
    kind: str
    channel: str | None
    provider: str | None


@dataclass(slots=True)
class _Consent:
    id: int
    """What ``JournalCorrupt`` names, as SQLite's ``INTEGER PRIMARY KEY``."""
    recipient: str
    body: bytes


@dataclass(slots=True)
class _Send:
    id: int
    recipient: str
    at: float
    body: bytes


class MemoryStore:
    """What ``MemoryJournal`` keeps; shared by every journal opened on it.

    A store starts as "never created": opening a journal on it without ``create=True`` raises
    ``JournalMissing``, like a journal file that does not exist.
    """

    def __init__(self, name: str = "<memory>") -> None:
        self.name = name
        """Named in error messages where SQLite names the file."""
        self.created = False
        self.fail_commits: str | None = None
        """Test hook: while set, every commit raises ``JournalUnavailable(fail_commits)`` and
        writes nothing; clear it (None) and the same batch commits."""
        self._messages: dict[str, _Message] = {}
        self._order: list[_Message] = []
        """The messages by rowid, for cursor paging (bisect)."""
        self._events: dict[str, list[_Event]] = {}
        """Status events by message key, in commit order (SQLite: ``ORDER BY id``)."""
        self._consents: list[_Consent] = []
        self._sends: list[_Send] = []
        self._addresses: set[tuple[str, str]] = set()
        self._receipts: dict[int, float] = {}
        self.address_key = secrets.token_bytes(32)
        """The journal's secret for keyed address hashes (SQLite keeps it in ``meta``)."""
        self.experiments: dict[str, str] = {}
        """Experiment definition fingerprints (SQLite keeps them in ``meta``)."""

    def plant(self, table: Literal["messages", "consents", "sends"], row: str, blob: bytes) -> None:
        """Test hook: store ``blob`` as the value of one row, as a damaged file would hold it.

        ``table`` and ``row`` are what ``JournalCorrupt`` names: a message key for
        ``messages`` (the record is replaced), a row id for ``consents`` and ``sends``.

        Raises:
            KeyError: there is no such row (a planted nothing would make a test pass vacuously).
        """
        if table == "messages":
            self._messages[row].record = blob
            return
        rows: list[_Consent] | list[_Send] = self._consents if table == "consents" else self._sends
        for stored in rows:
            if str(stored.id) == row:
                stored.body = blob
                return
        raise KeyError(f"{table}[{row}]")

    # ------------------------------------------------------------ the journal's operations
    def _write(
        self,
        inserts: list[_Message],
        updates: list[tuple[str, bytes, str | None]],
        events: list[tuple[str, _Event]],
        consents: list[tuple[str, bytes]],
        sends: list[tuple[str, float, bytes]],
        addresses: list[tuple[str, str]],
        receipts: list[tuple[int, float]],
    ) -> None:
        """Apply one commit, all or nothing: everything that can fail is checked before the
        first change."""
        if self.fail_commits is not None:
            raise JournalUnavailable(self.fail_commits)
        for message in inserts:
            if message.key in self._messages:
                # SQLite raises sqlite3.IntegrityError here (the protocol names no type); a
                # batch that inserts a key twice is a bug, so this is no JournalUnavailable
                # either: retrying cannot help
                raise ValueError(f"UNIQUE constraint failed: messages.key ({message.key})")
        for message in inserts:
            # a rowid is one more than the largest in the table, as in SQLite without
            # AUTOINCREMENT: a pruned last row's rowid is given out again
            message.rowid = self._order[-1].rowid + 1 if self._order else 1
            self._messages[message.key] = message
            self._order.append(message)
        for key, body, outcome in updates:
            stored = self._messages.get(key)
            if stored is not None:  # an UPDATE of a key never inserted changes nothing
                stored.record = body
                stored.outcome = outcome
        for key, event in events:
            self._events.setdefault(key, []).append(event)
        for recipient, body in consents:
            self._consents.append(_Consent(_next_id(self._consents), recipient, body))
        for recipient, at, body in sends:
            self._sends.append(_Send(_next_id(self._sends), recipient, at, body))
        self._addresses.update(addresses)
        for digest, at in receipts:
            self._receipts.setdefault(digest, at)  # INSERT OR IGNORE: the first arrival stays

    def _prune(self, retain_after: float, sends_after: float, receipts_after: float) -> int:
        self._receipts = {d: at for d, at in self._receipts.items() if not at < receipts_after}
        gone = [m for m in self._order if m.outcome is not None and m.accepted_at < retain_after]
        for message in gone:
            self._events.pop(message.key, None)
            del self._messages[message.key]
        if gone:
            self._order = list(self._messages.values())
        self._sends = [row for row in self._sends if not row.at <= sends_after]
        return len(gone)


class MemoryJournal:
    """The ``Journal`` protocol over a ``MemoryStore``, no threads and no files.

    Each call that SQLite runs in a thread starts with a trio checkpoint, as
    ``trio.to_thread.run_sync`` does: a cancelled caller gets ``Cancelled`` before anything is
    read or written, and a loop that awaits only the journal still lets other tasks run. The
    work itself then runs to its end without yielding, so each call is atomic.
    """

    def __init__(self, store: MemoryStore | None = None) -> None:
        self.store = MemoryStore() if store is None else store
        """Build another ``MemoryJournal`` on this store to simulate a restart."""
        self._open = False

    # ------------------------------------------------------------ lifecycle
    async def open(self, *, create: bool = False) -> None:
        await trio.lowlevel.checkpoint()
        store = self.store
        if not store.created:
            if not create:
                raise JournalMissing(
                    f"journal {store.name} does not exist; `cascadegw init` creates a new one "
                    "(or set store.create = true)"
                )
            store.created = True
        self._open = True

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
        self._open = False

    # ------------------------------------------------------------ writes
    async def commit(self, batch: Batch) -> None:
        # encode before the checkpoint, as SQLite encodes before its thread hop: a value that
        # cannot be encoded fails the commit before anything is written
        inserts: list[_Message] = []
        updates: list[tuple[str, bytes, str | None]] = []
        for key, record in batch.dirty.items():
            body = _encoder.encode(record)
            outcome = record.cascade.outcome
            outcome_text = None if outcome is None else outcome.value
            request = batch.inserts.get(key)
            if request is not None:
                opening = batch.opening.get(key)
                inserts.append(
                    _Message(
                        rowid=0,  # given out by the store, inside the commit
                        key=key,
                        accepted_at=record.accepted_at,
                        request=bytes(request),
                        record=body,
                        outcome=outcome_text,
                        campaign=record.campaign,
                        variant=record.variant,
                        opening=None if opening is None else _encoder.encode(opening),
                        experiment=record.envelope.variant,
                    )
                )
            else:
                updates.append((key, body, outcome_text))
        events = [
            (
                f"{e.tenant}:{e.id}",
                _Event(
                    _encoder.encode(e),
                    e.kind.value,
                    None if e.channel is None else e.channel.value,
                    e.provider,
                ),
            )
            for e in batch.events
        ]
        consents = [(str(rkey), _encoder.encode(c)) for rkey, c in batch.consents]
        sends = [(str(rkey), e.at, _encoder.encode(e)) for rkey, e in batch.sends]
        await trio.lowlevel.checkpoint()
        self._store()._write(
            inserts, updates, events, consents, sends, list(batch.addresses), list(batch.receipts)
        )

    # ------------------------------------------------------------ recovery
    async def recover(
        self, *, now: float, retention_seconds: float, horizon_seconds: float
    ) -> Recovered:
        await trio.lowlevel.checkpoint()
        store = self._store()
        retain_after, sends_after = now - retention_seconds, now - horizon_seconds
        done = [m for m in store._order if m.outcome is not None and m.accepted_at >= retain_after]
        # SQLite: ORDER BY accepted_at, read off an index whose ties are in rowid order
        done.sort(key=lambda m: (m.accepted_at, m.rowid))
        finished = {m.key: Outcome(m.outcome) for m in done if m.outcome is not None}
        consents = [
            (RecipientKey(row.recipient), _decoded(_consent_decoder, row.body, "consents", row.id))
            for row in store._consents
        ]
        sends = [
            (RecipientKey(row.recipient), _decoded(_send_decoder, row.body, "sends", row.id))
            for row in store._sends
            if row.at > sends_after
        ]
        # SQLite reads the WITHOUT ROWID table in primary-key order
        addresses = sorted(store._addresses)
        return Recovered(
            finished=finished,
            consents=consents,
            sends=sends,
            addresses=addresses,
            address_key=store.address_key,
        )

    async def active_page(
        self, cursor: int | None, *, limit: int
    ) -> tuple[list[MessageRecord], int | None]:
        if limit < 1:
            # SQLite's LIMIT reads a negative limit as "no limit" and fails on 0 (IndexError);
            # neither is a page, so refuse them plainly
            raise ValueError(f"limit must be at least 1, not {limit}")
        await trio.lowlevel.checkpoint()
        order = self._store()._order
        rows: list[_Message] = []
        for message in order[bisect_right(order, cursor or 0, key=lambda m: m.rowid) :]:
            if message.outcome is None:
                rows.append(message)
                if len(rows) == limit:
                    break
        records = [_decoded(_record_decoder, m.record, "messages", m.key) for m in rows]
        return records, (rows[-1].rowid if len(rows) == limit else None)

    # ------------------------------------------------------------ reads
    async def message(self, key: MessageKey) -> StoredMessage | None:
        return (await self.messages([key])).get(key)

    async def messages(self, keys: list[str]) -> dict[str, StoredMessage]:
        if not keys:
            return {}  # SQLite answers this without a thread hop or an open connection
        await trio.lowlevel.checkpoint()
        found = self._store()._messages
        return {
            key: StoredMessage(
                _decoded(_record_decoder, m.record, "messages", key),
                m.request,
                m.outcome is not None,
            )
            for key in dict.fromkeys(keys)
            if (m := found.get(key)) is not None
        }

    async def requests(self, keys: list[str]) -> dict[str, bytes]:
        if not keys:
            return {}
        await trio.lowlevel.checkpoint()
        found = self._store()._messages
        return {key: m.request for key in keys if (m := found.get(key)) is not None}

    async def timeline(self, key: MessageKey) -> list[StatusEvent]:
        return (await self.timelines([key])).get(key, [])

    async def timelines(self, keys: list[str]) -> dict[str, list[StatusEvent]]:
        if not keys:
            return {}
        await trio.lowlevel.checkpoint()
        store = self._store()
        wanted = list(dict.fromkeys(keys))  # each key's events once, however often it is asked
        found: dict[str, list[StatusEvent]] = {}
        # openings first, then the events table, as SQLite builds the answer
        for key in wanted:
            message = store._messages.get(key)
            if message is not None and message.opening is not None:
                found[key] = _decoded(_events_decoder, message.opening, "messages", key)
        for key in wanted:
            for event in store._events.get(key, ()):
                found.setdefault(key, []).append(
                    _decoded(_event_decoder, event.body, "events", key)
                )
        return found

    async def known_receipts(self, digests: list[int]) -> set[int]:
        if not digests:
            return set()
        await trio.lowlevel.checkpoint()
        receipts = self._store()._receipts
        return {digest for digest in digests if digest in receipts}

    async def pin_experiments(self, fingerprints: dict[str, str]) -> dict[str, str]:
        await trio.lowlevel.checkpoint()
        stored = self._store().experiments
        changed = {
            key: stored[key]
            for key, value in fingerprints.items()
            if key in stored and stored[key] != value
        }
        if not changed:
            for key, value in fingerprints.items():
                stored.setdefault(key, value)
        return changed

    async def experiment_rows(
        self, tenant: str, experiment: str
    ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """The rows of ``SqliteJournal.experiment_rows`` (see ``campaign_rows``)."""
        prefix = f"{experiment}/"
        return await self._rows(
            tenant,
            lambda m: m.experiment is not None and m.experiment.startswith(prefix),
            arm=lambda m: m.experiment,
        )

    async def consent_history(self, recipient: RecipientKey) -> list[ConsentRecord]:
        await trio.lowlevel.checkpoint()
        return [
            _decoded(_consent_decoder, row.body, "consents", row.id)
            for row in self._store()._consents
            if row.recipient == recipient
        ]

    # ------------------------------------------------------------ housekeeping
    async def prune(
        self,
        *,
        now: float,
        retention_seconds: float,
        horizon_seconds: float,
        receipt_retention_seconds: float,
    ) -> int:
        await trio.lowlevel.checkpoint()
        return self._store()._prune(
            now - retention_seconds, now - horizon_seconds, now - receipt_retention_seconds
        )

    # ------------------------------------------------------------ reports
    async def campaign_rows(
        self, tenant: str, campaign: str
    ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """The rows of ``SqliteJournal.campaign_rows``' two GROUP BY queries.

        Returns:
            ``(variant, outcome, messages)`` rows, and ``(variant, held_out, channel, kind,
            provider, events, distinct messages)`` rows; ``held_out`` is 0 or 1 (SQL's
            ``outcome IS 'holdout'``), and only the events table counts, not the openings.
            Rows come in SQLite's GROUP BY order: ascending, NULL first.
        """
        return await self._rows(tenant, lambda m: m.campaign == campaign)

    async def _rows(
        self,
        tenant: str,
        chosen: Callable[[_Message], bool],
        arm: Callable[[_Message], str | None] = lambda m: m.variant,
    ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        await trio.lowlevel.checkpoint()
        store = self._store()
        # the same prefix range as SQLite's: keys are "tenant:id", ';' follows ':'
        low, high = f"{tenant}:", f"{tenant};"
        members = [m for m in store._order if chosen(m) and low <= m.key < high]
        sizes = Counter((arm(m), m.outcome) for m in members)
        counts: Counter[tuple[Any, ...]] = Counter()
        keys: dict[tuple[Any, ...], set[str]] = {}
        for m in members:
            held_out = int(m.outcome == "holdout")
            for event in store._events.get(m.key, ()):
                group = (arm(m), held_out, event.channel, event.kind, event.provider)
                counts[group] += 1
                keys.setdefault(group, set()).add(m.key)
        message_rows = [(*group, n) for group, n in sorted(sizes.items(), key=_group_order)]
        event_rows = [
            (*group, n, len(keys[group])) for group, n in sorted(counts.items(), key=_group_order)
        ]
        return message_rows, event_rows

    def _store(self) -> MemoryStore:
        if not self._open:
            raise RuntimeError("the journal is not open")
        return self.store


def _next_id(rows: list[_Consent] | list[_Send]) -> int:
    # INTEGER PRIMARY KEY: one more than the largest id left (rows are kept in id order)
    return rows[-1].id + 1 if rows else 1


def _group_order(item: tuple[tuple[Any, ...], int]) -> tuple[tuple[bool, Any], ...]:
    """SQLite's GROUP BY order for these columns: ascending, NULL before any value."""
    return tuple((value is not None, value) for value in item[0])


def _decoded(decoder: msgspec.msgpack.Decoder[Any], body: bytes, table: str, row: object) -> Any:
    """Decode a stored value, or name the row that cannot be read (as SQLite's journal does)."""
    try:
        return decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise JournalCorrupt(table, str(row), str(exc).split("\n")[0][:200]) from exc
