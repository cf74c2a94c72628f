"""The embedded journal: one SQLite file in WAL mode, written in group commits.

Durability, by ``synchronous`` level (README.md "Durability"):
- ``full``: a commit is on disk before ``commit`` returns; acks survive power loss.
- ``normal``: in WAL mode a commit survives a crash of the process (the WAL is written before
  ``commit`` returns) but the last commits may be lost if the machine loses power.

sqlite3 calls run in worker threads (``trio.to_thread``), which may differ from call to call,
so connections are opened with ``check_same_thread=False`` and each connection is serialised by
its own ``CapacityLimiter(1)``. Tests that drive time with an autojumping ``MockClock`` open it
with ``threads=False``: the calls then run inline, blocking the loop, so virtual time cannot
jump while a commit is half done (trio sees no task waiting on a thread as busy). Writes go through one connection; reads (status timelines,
message content for later cascade steps) through another, which WAL lets run beside the writer.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import trio

from gateway.clock import thread_cpu_seconds
from gateway.core.caps import SendEntry
from gateway.core.consent import ConsentAction, ConsentKind, ConsentRecord
from gateway.core.model import MessageKey, Outcome, RecipientKey
from gateway.protocol import SendRequest, StatusEvent
from gateway.store.base import (
    Batch,
    JournalCorrupt,
    JournalError,
    JournalMissing,
    JournalUnavailable,
    MessageRecord,
    Recovered,
    StoredMessage,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    key TEXT PRIMARY KEY,
    accepted_at REAL NOT NULL,
    request BLOB NOT NULL,
    record BLOB NOT NULL,
    outcome TEXT,
    campaign TEXT,
    variant TEXT,
    opening BLOB,
    experiment TEXT
);
CREATE INDEX IF NOT EXISTS messages_finished ON messages (accepted_at) WHERE outcome IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_campaign ON messages (campaign) WHERE campaign IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_experiment ON messages (experiment)
    WHERE experiment IS NOT NULL;
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL,
    body BLOB NOT NULL,
    kind TEXT,
    channel TEXT,
    provider TEXT
);
CREATE INDEX IF NOT EXISTS events_key ON events (key);
CREATE TABLE IF NOT EXISTS consents (
    id INTEGER PRIMARY KEY,
    recipient TEXT NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS consents_recipient ON consents (recipient);
CREATE TABLE IF NOT EXISTS sends (
    id INTEGER PRIMARY KEY,
    recipient TEXT NOT NULL,
    at REAL NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS sends_at ON sends (at);
CREATE TABLE IF NOT EXISTS address_index (
    ref TEXT NOT NULL,
    recipient TEXT NOT NULL,
    PRIMARY KEY (ref, recipient)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS receipts (
    digest INTEGER PRIMARY KEY,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS receipts_at ON receipts (at);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY,
    source TEXT NOT NULL,
    row TEXT NOT NULL,
    detail TEXT NOT NULL,
    body BLOB
);
"""

_OPENINGS_IN = "SELECT key, opening FROM messages WHERE key IN ({})"
_EVENTS_IN = "SELECT key, body FROM events WHERE key IN ({}) ORDER BY id"
_T = TypeVar("_T")
_Insert = tuple[
    str, float, bytes, bytes, str | None, str | None, str | None, bytes | None, str | None
]
"""A ``messages`` row: key, accepted_at, request, record, outcome, campaign, variant, opening,
experiment."""
_IN_CHUNK = 500  # keys per IN (...) query; well under SQLite's bound-parameter limit
_encoder = msgspec.msgpack.Encoder()
_record_decoder = msgspec.msgpack.Decoder(MessageRecord)
_event_decoder = msgspec.msgpack.Decoder(StatusEvent)
_events_decoder = msgspec.msgpack.Decoder(list[StatusEvent])
_consent_decoder = msgspec.msgpack.Decoder(ConsentRecord)
_send_decoder = msgspec.msgpack.Decoder(SendEntry)


class SqliteJournal:
    def __init__(
        self, path: str | Path, *, synchronous: str = "full", threads: bool = True
    ) -> None:
        self.path = Path(path)
        self._threads = threads
        self.synchronous = synchronous.upper()
        if self.synchronous not in {"NORMAL", "FULL"}:
            raise ValueError(f"synchronous must be normal or full, not {synchronous!r}")
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self.created = False
        """Whether ``open`` made a new journal (the file did not exist)."""
        self._write_cpu = [0.0]
        self._read_cpu = [0.0]
        self._write_lock = trio.CapacityLimiter(1)
        self._read_lock = trio.CapacityLimiter(1)

    async def _call(
        self, function: Callable[..., _T], *args: Any, limiter: trio.CapacityLimiter
    ) -> _T:
        """Run a blocking sqlite3 call in a worker thread, or inline (``threads=False``)."""
        if self._threads:
            spent = self._write_cpu if limiter is self._write_lock else self._read_cpu
            return await trio.to_thread.run_sync(
                self._timed, spent, function, *args, limiter=limiter
            )
        await trio.lowlevel.checkpoint()
        return function(*args)

    @staticmethod
    def _timed(spent: list[float], function: Callable[..., _T], *args: Any) -> _T:
        """``function`` in this worker thread, its CPU time added to ``spent`` (one total per
        limiter: only one thread at a time adds to it)."""
        started = thread_cpu_seconds()
        try:
            return function(*args)
        finally:
            spent[0] += thread_cpu_seconds() - started

    @property
    def thread_cpu_seconds(self) -> float:
        """CPU time spent in worker threads on this journal's calls (``gateway.runtime.cpu``)."""
        return self._write_cpu[0] + self._read_cpu[0]

    # ------------------------------------------------------------ lifecycle
    async def open(self, *, create: bool = False) -> None:
        await self._call(self._open_sync, create, limiter=self._write_lock)

    def _open_sync(self, create: bool) -> None:
        for path in (self.path, self.path.parent):
            if path.exists() and not os.access(path, os.W_OK):
                # SQLite would open it read-only and fail at the first commit, which reads
                # like damage; it is a permission
                raise JournalError(
                    f"journal {self.path}: {path} is not writable for this user; "
                    "fix its owner or mode, or set store.data_dir / store.path"
                )
        try:
            self._open_files(create)
        except sqlite3.OperationalError as exc:
            raise JournalError(
                f"journal {self.path}: cannot open it ({exc}); make its directory writable "
                "for this user, or set store.data_dir / store.path"
            ) from exc
        except sqlite3.DatabaseError as exc:
            raise JournalError(
                f"journal {self.path} is not a readable SQLite database ({exc}); "
                "restore it from a backup"
            ) from exc
        except OSError as exc:
            raise JournalError(
                f"journal {self.path}: cannot open it ({exc.strerror or exc}); make its "
                "directory writable for this user, or set store.data_dir / store.path"
            ) from exc

    def _open_files(self, create: bool) -> None:
        marker = self.path.with_name(self.path.name + ".id")
        if not self.path.exists():
            if marker.exists():
                # the directory had a journal: a lost file is never replaced by an empty one,
                # whatever store.create says (that would forget every withdrawn consent)
                raise JournalMissing(
                    f"journal {self.path} is missing, but {marker.name} beside it says there "
                    f"was one; restore it from a backup, or delete {marker} to start empty"
                )
            if not create:
                raise JournalMissing(
                    f"journal {self.path} does not exist; `cascadegw init` creates a new one "
                    "(or set store.create = true)"
                )
            # the journal holds requests (addresses, texts): for this user's eyes only
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.path.touch(mode=0o600)
            self.created = True
        writer = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        writer.execute("PRAGMA journal_mode=WAL")
        writer.execute(f"PRAGMA synchronous={self.synchronous}")
        writer.execute("PRAGMA temp_store=MEMORY")
        writer.execute("PRAGMA cache_size=-65536")
        writer.execute("PRAGMA journal_size_limit=67108864")
        _migrate(writer)
        writer.executescript(_SCHEMA)
        _check_identity(writer, marker)
        self._writer = writer
        reader = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        reader.execute("PRAGMA query_only=ON")
        self._reader = reader

    async def aclose(self) -> None:
        # take both locks so no thread is inside a connection while it closes
        async with self._write_lock, self._read_lock:
            for connection in (self._writer, self._reader):
                if connection is not None:
                    connection.close()
            self._writer = self._reader = None

    # ------------------------------------------------------------ writes
    async def commit(self, batch: Batch) -> None:
        # encode on the trio thread: msgspec holds the GIL either way, and the thread then
        # spends its time in SQLite, which releases it
        inserts: list[_Insert] = []
        updates: list[tuple[bytes, str | None, str]] = []
        for key, record in batch.dirty.items():
            body = _encoder.encode(record)
            outcome = record.cascade.outcome
            outcome_text = None if outcome is None else outcome.value
            request = batch.inserts.get(key)
            if request is not None:
                inserts.append(
                    (
                        key,
                        record.accepted_at,
                        request,
                        body,
                        outcome_text,
                        record.campaign,
                        record.variant,
                        None
                        if (opening := batch.opening.get(key)) is None
                        else _encoder.encode(opening),
                        # set by the gateway's assignment only, never from a CRM's label
                        record.envelope.variant,
                    )
                )
            else:
                updates.append((body, outcome_text, key))
        events = [
            (
                f"{e.tenant}:{e.id}",
                _encoder.encode(e),
                e.kind.value,
                e.channel and e.channel.value,
                e.provider,
            )
            for e in batch.events
        ]
        consents = [(rkey, _encoder.encode(c)) for rkey, c in batch.consents]
        sends = [(rkey, e.at, _encoder.encode(e)) for rkey, e in batch.sends]
        await self._call(
            self._commit_sync,
            inserts,
            updates,
            events,
            consents,
            sends,
            batch.addresses,
            batch.receipts,
            limiter=self._write_lock,
        )

    def _commit_sync(
        self,
        inserts: list[_Insert],
        updates: list[tuple[bytes, str | None, str]],
        events: list[tuple[str, bytes, str, str | None, str | None]],
        consents: list[tuple[RecipientKey, bytes]],
        sends: list[tuple[RecipientKey, float, bytes]],
        addresses: list[tuple[str, str]],
        receipts: list[tuple[int, float]],
    ) -> None:
        db = self._connection(self._writer)
        try:
            self._write(db, inserts, updates, events, consents, sends, addresses, receipts)
        except sqlite3.OperationalError as exc:
            # disk full, I/O error, locked: the transaction is rolled back and the caller may
            # commit the same batch again once the cause has passed
            raise JournalUnavailable(str(exc)) from exc

    @staticmethod
    def _write(
        db: sqlite3.Connection,
        inserts: list[_Insert],
        updates: list[tuple[bytes, str | None, str]],
        events: list[tuple[str, bytes, str, str | None, str | None]],
        consents: list[tuple[RecipientKey, bytes]],
        sends: list[tuple[RecipientKey, float, bytes]],
        addresses: list[tuple[str, str]],
        receipts: list[tuple[int, float]],
    ) -> None:
        db.execute("BEGIN")
        try:
            if inserts:
                db.executemany(
                    "INSERT INTO messages (key, accepted_at, request, record, outcome, campaign, variant, opening, experiment)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    inserts,
                )
            if updates:
                db.executemany("UPDATE messages SET record = ?, outcome = ? WHERE key = ?", updates)
            if events:
                db.executemany(
                    "INSERT INTO events (key, body, kind, channel, provider) VALUES (?, ?, ?, ?, ?)",
                    events,
                )
            if consents:
                db.executemany("INSERT INTO consents (recipient, body) VALUES (?, ?)", consents)
            if sends:
                db.executemany("INSERT INTO sends (recipient, at, body) VALUES (?, ?, ?)", sends)
            if addresses:
                db.executemany(
                    "INSERT OR IGNORE INTO address_index (ref, recipient) VALUES (?, ?)", addresses
                )
            if receipts:
                db.executemany(
                    "INSERT OR IGNORE INTO receipts (digest, at) VALUES (?, ?)", receipts
                )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # a failed COMMIT may already have rolled back
                db.execute("ROLLBACK")
            raise

    # ------------------------------------------------------------ recovery
    async def recover(
        self, *, now: float, retention_seconds: float, horizon_seconds: float
    ) -> Recovered:
        return await self._call(
            _readable(self.path, self._recover_sync),
            now - retention_seconds,
            now - horizon_seconds,
            limiter=self._write_lock,
        )

    def _recover_sync(self, retain_after: float, sends_after: float) -> Recovered:
        db = self._connection(self._writer)
        finished = {
            key: Outcome(outcome)
            for key, outcome in db.execute(
                "SELECT key, outcome FROM messages WHERE outcome IS NOT NULL AND accepted_at >= ? ORDER BY accepted_at",
                (retain_after,),
            )
        }
        consents = [
            (RecipientKey(recipient), _decoded(_consent_decoder, body, "consents", row_id))
            for row_id, recipient, body in db.execute(
                "SELECT id, recipient, body FROM consents ORDER BY id"
            )
        ]
        sends = [
            (RecipientKey(recipient), _decoded(_send_decoder, body, "sends", row_id))
            for row_id, recipient, body in db.execute(
                "SELECT id, recipient, body FROM sends WHERE at > ? ORDER BY id", (sends_after,)
            )
        ]
        addresses = db.execute("SELECT ref, recipient FROM address_index").fetchall()
        return Recovered(
            finished=finished,
            consents=consents,
            sends=sends,
            addresses=addresses,
            address_key=_address_key(db),
        )

    async def active_page(
        self, cursor: int | None, *, limit: int
    ) -> tuple[list[MessageRecord], int | None]:
        return await self._call(
            _readable(self.path, self._active_page_sync),
            cursor or 0,
            limit,
            limiter=self._write_lock,
        )

    def _active_page_sync(
        self, after_rowid: int, limit: int
    ) -> tuple[list[MessageRecord], int | None]:
        rows = (
            self._connection(self._writer)
            .execute(
                "SELECT rowid, key, record FROM messages WHERE rowid > ? AND outcome IS NULL"
                " ORDER BY rowid LIMIT ?",
                (after_rowid, limit),
            )
            .fetchall()
        )
        records = [_decoded(_record_decoder, body, "messages", key) for _, key, body in rows]
        return records, (rows[-1][0] if len(rows) == limit else None)

    # ------------------------------------------------------------ reads
    async def message(self, key: MessageKey) -> StoredMessage | None:
        return (await self.messages([key])).get(key)

    async def messages(self, keys: list[str]) -> dict[str, StoredMessage]:
        rows = await self._read_in(
            "SELECT key, record, request, outcome FROM messages WHERE key IN ({})", keys
        )
        return {
            key: StoredMessage(
                _decoded(_record_decoder, record, "messages", key), request, outcome is not None
            )
            for key, record, request, outcome in rows
        }

    async def requests(self, keys: list[str]) -> dict[str, bytes]:
        rows = await self._read_in("SELECT key, request FROM messages WHERE key IN ({})", keys)
        return dict(rows)

    async def timeline(self, key: MessageKey) -> list[StatusEvent]:
        return (await self.timelines([key])).get(key, [])

    async def timelines(self, keys: list[str]) -> dict[str, list[StatusEvent]]:
        # a key asked for twice must not come back with its events twice (two status
        # queries for one message may share a read)
        keys = list(dict.fromkeys(keys))
        if not keys:
            return {}

        def run() -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
            # both reads in one thread hop: the admission's events live in the message row
            connection = self._connection(self._reader)
            openings: list[tuple[Any, ...]] = []
            rows: list[tuple[Any, ...]] = []
            for start in range(0, len(keys), _IN_CHUNK):
                chunk = keys[start : start + _IN_CHUNK]
                marks = ",".join("?" * len(chunk))
                openings.extend(connection.execute(_OPENINGS_IN.format(marks), chunk))
                rows.extend(connection.execute(_EVENTS_IN.format(marks), chunk))
            return openings, rows

        openings, rows = await self._call(run, limiter=self._read_lock)
        found: dict[str, list[StatusEvent]] = {}
        for key, opening in openings:
            if opening is not None:
                found[key] = _decoded(_events_decoder, opening, "messages", key)
        for key, body in rows:
            found.setdefault(key, []).append(_decoded(_event_decoder, body, "events", key))
        return found

    async def known_receipts(self, digests: list[int]) -> set[int]:
        rows = await self._read_in("SELECT digest FROM receipts WHERE digest IN ({})", digests)
        return {digest for (digest,) in rows}

    async def pin_experiments(self, fingerprints: dict[str, str]) -> dict[str, str]:
        def run() -> dict[str, str]:
            db = self._connection(self._writer)
            stored = dict(
                db.execute("SELECT key, value FROM meta WHERE key LIKE 'experiment:%'").fetchall()
            )
            changed = {
                key: stored[key]
                for key, value in fingerprints.items()
                if key in stored and stored[key] != value
            }
            if not changed:
                db.executemany(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)",
                    list(fingerprints.items()),
                )
            return changed

        return await self._call(run, limiter=self._write_lock)

    async def experiment_rows(
        self, tenant: str, experiment: str
    ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        # keys are "tenant:id" and arms "experiment/name": '0' follows '/', ';' follows ':'.
        # The experiment column holds only what the gateway assigned: a CRM's own variant label
        # of that shape (sent before the experiment existed, say) is never counted
        low, high = f"{tenant}:", f"{tenant};"
        first, last = f"{experiment}/", f"{experiment}0"
        messages = await self._read(
            "SELECT experiment, outcome, count(*) FROM messages"
            " WHERE experiment >= ? AND experiment < ? AND key >= ? AND key < ?"
            " GROUP BY experiment, outcome",
            (first, last, low, high),
        )
        events = await self._read(
            "SELECT m.experiment, m.outcome IS 'holdout', e.channel, e.kind, e.provider, count(*), count(DISTINCT e.key)"
            " FROM events e JOIN messages m ON m.key = e.key"
            " WHERE m.experiment >= ? AND m.experiment < ? AND m.key >= ? AND m.key < ?"
            " GROUP BY 1, 2, 3, 4, 5",
            (first, last, low, high),
        )
        return messages, events

    async def consent_history(self, recipient: RecipientKey) -> list[ConsentRecord]:
        rows = await self._read(
            "SELECT id, body FROM consents WHERE recipient = ? ORDER BY id", (recipient,)
        )
        return [_decoded(_consent_decoder, body, "consents", row_id) for row_id, body in rows]

    async def _read(self, sql: str, params: Iterable[object]) -> list[tuple[Any, ...]]:
        def run() -> list[tuple[Any, ...]]:
            return self._connection(self._reader).execute(sql, tuple(params)).fetchall()

        return await self._call(run, limiter=self._read_lock)

    async def _read_in(self, sql: str, keys: list[str] | list[int]) -> list[tuple[Any, ...]]:
        """Run ``sql`` (one ``IN ({})`` slot) for many keys in one thread hop, in chunks.

        Each thread hop costs a trip through trio's run queue, which under load is far dearer
        than the query, so reads are batched rather than issued per key.
        """
        if not keys:
            return []

        def run() -> list[tuple[Any, ...]]:
            connection = self._connection(self._reader)
            rows: list[tuple[Any, ...]] = []
            for start in range(0, len(keys), _IN_CHUNK):
                chunk = keys[start : start + _IN_CHUNK]
                rows.extend(connection.execute(sql.format(",".join("?" * len(chunk))), chunk))
            return rows

        return await self._call(run, limiter=self._read_lock)

    # ------------------------------------------------------------ housekeeping
    async def prune(
        self,
        *,
        now: float,
        retention_seconds: float,
        horizon_seconds: float,
        receipt_retention_seconds: float,
    ) -> int:
        return await self._call(
            self._prune_sync,
            now - retention_seconds,
            now - horizon_seconds,
            now - receipt_retention_seconds,
            limiter=self._write_lock,
        )

    def _prune_sync(self, retain_after: float, sends_after: float, receipts_after: float) -> int:
        db = self._connection(self._writer)
        db.execute("BEGIN")
        try:
            db.execute("DELETE FROM receipts WHERE at < ?", (receipts_after,))
            db.execute(
                "DELETE FROM events WHERE key IN (SELECT key FROM messages WHERE outcome IS NOT NULL AND accepted_at < ?)",
                (retain_after,),
            )
            deleted = db.execute(
                "DELETE FROM messages WHERE outcome IS NOT NULL AND accepted_at < ?",
                (retain_after,),
            ).rowcount
            db.execute("DELETE FROM sends WHERE at <= ?", (sends_after,))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return deleted

    # ------------------------------------------------------------ reports
    async def campaign_rows(
        self, tenant: str, campaign: str
    ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """Aggregates for one campaign of one tenant.

        Returns:
            ``(variant, outcome, messages)`` rows, and ``(variant, held_out, channel, kind,
            provider, events, distinct messages)`` rows.
        """
        # keys are "tenant:id"; ';' is the character after ':', so this is a prefix range
        low, high = f"{tenant}:", f"{tenant};"
        messages = await self._read(
            "SELECT variant, outcome, count(*) FROM messages"
            " WHERE campaign = ? AND key >= ? AND key < ? GROUP BY variant, outcome",
            (campaign, low, high),
        )
        events = await self._read(
            "SELECT m.variant, m.outcome IS 'holdout', e.channel, e.kind, e.provider, count(*), count(DISTINCT e.key)"
            " FROM events e JOIN messages m ON m.key = e.key"
            " WHERE m.campaign = ? AND m.key >= ? AND m.key < ?"
            " GROUP BY 1, 2, 3, 4, 5",
            (campaign, low, high),
        )
        return messages, events

    @staticmethod
    def _connection(connection: sqlite3.Connection | None) -> sqlite3.Connection:
        if connection is None:
            raise RuntimeError("the journal is not open")
        return connection


def _decoded(decoder: msgspec.msgpack.Decoder[Any], body: bytes, table: str, row: object) -> Any:
    """Decode a stored value, or name the row that cannot be read."""
    try:
        return decoder.decode(body)
    except _UNREADABLE as exc:
        raise JournalCorrupt(table, str(row), str(exc).split("\n")[0][:200]) from exc


def _readable(path: Path, read: Callable[..., _T]) -> Callable[..., _T]:
    """``read``, with a damaged file (not a database, a malformed page) named in one line."""

    def guarded(*args: Any) -> _T:
        try:
            return read(*args)
        except sqlite3.DatabaseError as exc:
            if "readonly" in str(exc):
                raise JournalError(
                    f"journal {path} is read-only ({exc}); fix its owner or mode"
                ) from exc
            raise JournalError(
                f"journal {path} cannot be read ({exc}); `cascadegw journal check` says where, "
                "or restore it from a backup"
            ) from exc

    return guarded


class Problem(msgspec.Struct, frozen=True):
    """One unreadable part of a journal, as ``cascadegw journal check`` reports it."""

    table: str
    row: str
    detail: str


_CHECKS: tuple[tuple[str, str, msgspec.msgpack.Decoder[Any]], ...] = (
    # (table, SELECT row id, name shown, body) - names as JournalCorrupt gives them at start
    ("messages", "SELECT key, key, record FROM messages", _record_decoder),
    ("messages", "SELECT key, key, request FROM messages", msgspec.msgpack.Decoder(SendRequest)),
    (
        "messages",
        "SELECT key, key, opening FROM messages WHERE opening IS NOT NULL",
        _events_decoder,
    ),
    ("events", "SELECT id, id, body FROM events", _event_decoder),
    ("consents", "SELECT id, id, body FROM consents", _consent_decoder),
    ("sends", "SELECT id, id, body FROM sends", _send_decoder),
)
_UNREADABLE = (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, TypeError)
"""What decoding a damaged value raises (TypeError: a TEXT where a BLOB belongs)."""


def check_journal(path: str | Path, *, now: float, quarantine: bool = False) -> list[Problem]:
    """Every unreadable row of the journal at ``path`` (and SQLite's own page check).

    With ``quarantine``, each unreadable row is moved into the ``quarantine`` table (kept for
    inspection) so the gateway can start without it. An unreadable consent row may have been a
    withdrawal: in its place the recipient's advertising consent is withdrawn on every channel
    and topic (at ``now``), the safe side of the law until the CRM grants again; the problem
    names the recipient.

    Runs without trio: it is for the command line, with the gateway stopped.

    Raises:
        JournalMissing: there is no journal at ``path``.
        JournalError: the file is not a readable SQLite database at all.
    """
    if not Path(path).exists():
        raise JournalMissing(f"journal {path} does not exist")
    try:
        return _check(path, now=now, quarantine=quarantine)
    except sqlite3.DatabaseError as exc:
        raise JournalError(
            f"journal {path} is not a readable SQLite database ({exc}); restore it from a backup"
        ) from exc


def _check(path: str | Path, *, now: float, quarantine: bool) -> list[Problem]:
    db = sqlite3.connect(path, isolation_level=None)
    try:
        problems = [
            Problem("sqlite", "-", line)
            for (line,) in db.execute("PRAGMA quick_check")
            if line != "ok"
        ]
        bad: list[tuple[str, object, str, bytes]] = []
        for table, sql, decoder in _CHECKS:
            for row_id, name, body in db.execute(sql):
                try:
                    decoder.decode(body)
                except _UNREADABLE as exc:
                    detail = str(exc).split("\n")[0][:200]
                    if table == "consents":
                        (recipient,) = db.execute(
                            "SELECT recipient FROM consents WHERE id = ?", (row_id,)
                        ).fetchone()
                        detail += f" (recipient {recipient})"
                    bad.append((table, row_id, detail, body))
                    problems.append(Problem(table, str(name), detail))
        if quarantine and bad:
            _quarantine(db, bad, now=now)
        return problems
    finally:
        db.close()


def _quarantine(
    db: sqlite3.Connection, bad: list[tuple[str, object, str, bytes]], *, now: float
) -> None:
    db.execute("BEGIN")
    for table, row_id, detail, body in bad:
        db.execute(
            "INSERT INTO quarantine (source, row, detail, body) VALUES (?, ?, ?, ?)",
            (table, str(row_id), detail, body),
        )
        if table == "messages":
            db.execute("DELETE FROM events WHERE key = ?", (row_id,))
            db.execute("DELETE FROM messages WHERE key = ?", (row_id,))
            continue
        if table == "consents":
            (recipient,) = db.execute(
                "SELECT recipient FROM consents WHERE id = ?", (row_id,)
            ).fetchone()
            withdrawal = ConsentRecord(
                kind=ConsentKind.ADVERTISING,
                action=ConsentAction.WITHDRAW,
                at=now,
                source="quarantine",
                reason="a consent record could not be read",
            )
            db.execute(
                "INSERT INTO consents (recipient, body) VALUES (?, ?)",
                (recipient, _encoder.encode(withdrawal)),
            )
        db.execute(f"DELETE FROM {table} WHERE id = ?", (row_id,))  # noqa: S608
    db.execute("COMMIT")


def _address_key(db: sqlite3.Connection) -> bytes:
    """The journal's secret for keyed address hashes, made the first time it is asked for."""
    db.execute(
        "INSERT OR IGNORE INTO meta (key, value) VALUES ('address_key', ?)",
        (secrets.token_hex(32),),
    )
    (value,) = db.execute("SELECT value FROM meta WHERE key = 'address_key'").fetchone()
    return bytes.fromhex(value)


def _check_identity(db: sqlite3.Connection, marker: Path) -> None:
    """Give the journal an id, kept inside it and in a marker file beside it, so that a
    missing journal, or another one put in its place, is noticed at start."""
    row = db.execute("SELECT value FROM meta WHERE key = 'journal_id'").fetchone()
    if row is None:
        db.execute("INSERT INTO meta (key, value) VALUES ('journal_id', ?)", (uuid.uuid4().hex,))
        row = db.execute("SELECT value FROM meta WHERE key = 'journal_id'").fetchone()
    journal_id: str = row[0]
    if marker.exists():
        expected = marker.read_text().strip()
        if expected != journal_id:
            raise JournalError(
                f"journal {marker.with_suffix('')} is not the one this directory had "
                f"({marker.name} names {expected}, the file is {journal_id}); put the right one "
                f"back, or delete {marker} to accept this one"
            )
        return
    with marker.open("w") as file:
        file.write(journal_id + "\n")
        file.flush()
        os.fsync(file.fileno())


def _migrate(db: sqlite3.Connection) -> None:
    """Bring a journal written by an earlier version up to the current columns."""
    wanted = {
        "messages": ("campaign TEXT", "variant TEXT", "opening BLOB", "experiment TEXT"),
        "events": ("kind TEXT", "channel TEXT", "provider TEXT"),
    }
    for table, columns in wanted.items():
        present = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        if not present:
            continue  # a new file: the schema creates everything
        for column in columns:
            if column.split()[0] not in present:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
    # recovery scans for active rows once at start; an index on them cost every insert
    db.execute("DROP INDEX IF EXISTS messages_active")
    # the experiment report reads the experiment column; an index on every CRM label cost inserts
    db.execute("DROP INDEX IF EXISTS messages_variant")
    # the address index was one recipient per address; an address (a family phone, a Viber
    # user of two brands) may belong to several, and an opt-out must reach every one of them
    if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'addresses'").fetchone():
        db.executescript(
            "CREATE TABLE IF NOT EXISTS address_index (ref TEXT NOT NULL, recipient TEXT NOT NULL,"
            " PRIMARY KEY (ref, recipient)) WITHOUT ROWID;"
            "INSERT OR IGNORE INTO address_index SELECT ref, recipient FROM addresses;"
            "DROP TABLE addresses;"
        )
