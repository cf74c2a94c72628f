"""The store's contract: what the router persists and what it rebuilds from at start.

The router keeps the live state in memory (``gateway.store.state.State``) and writes every
change through a ``Journal`` in group commits: one transaction per batch of frames, timers and
receipts, never one per message. A journal implementation must make a committed ``Batch``
durable as a unit and be able to give back, at start, everything needed to rebuild the state:
active messages with their timers, retained message keys, consents and recent sends.

``SqliteJournal`` is the embedded default. A Redis implementation (coredis, cluster) is the
planned second one; the conformance suite in ``tests/store`` runs against every implementation.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import msgspec

from gateway.core.caps import SendEntry
from gateway.core.cascade import Cascade
from gateway.core.consent import ConsentRecord
from gateway.core.model import Envelope, MessageKey, Outcome, RecipientKey
from gateway.protocol import StatusEvent


class JournalError(Exception):
    """The journal cannot do what was asked; the message is one line for an operator."""


class JournalMissing(JournalError):
    """The journal does not exist and creating one was not asked for."""


class JournalCorrupt(JournalError):
    """A stored row cannot be read; ``table`` and ``row`` name it."""

    def __init__(self, table: str, row: str, detail: str) -> None:
        super().__init__(
            f"journal row {table}[{row}] cannot be read ({detail}); "
            "`cascadegw journal check --quarantine` moves unreadable rows aside"
        )
        self.table = table
        self.row = row


class JournalUnavailable(JournalError):
    """A write failed for a reason that may pass (disk full, I/O error): retry it."""


class MessageRecord(msgspec.Struct, gc=False, array_like=True):
    """One message as the router tracks it. Mutable: the router replaces ``cascade`` in place.

    No content and no addresses live here (they stay in the journalled request), so a million
    waiting cascades fit in memory.
    """

    key: str
    envelope: Envelope
    tz: str
    cascade: Cascade
    accepted_at: float
    campaign: str | None = None
    variant: str | None = None
    step_due: float | None = None
    expiry_due: float | None = None
    step_sent_at: float | None = None
    """When the provider took the current step (for send->read latency)."""
    provider: str | None = None
    """The provider that took the current step."""
    provider_message_id: str | None = None
    """The provider's id for the current step (Viber receipts name only this)."""


class Batch:
    """Writes staged for one group commit, and what to do once they are durable.

    Stage through the methods: they keep ``rows`` right by construction (a row per record,
    event, consent, send, address and provider event; a new message's request and opening
    events ride in its record's row).
    """

    __slots__ = (
        "addresses",
        "after",
        "committed",
        "consents",
        "dirty",
        "events",
        "inserts",
        "opening",
        "receipts",
        "sends",
    )

    def __init__(self) -> None:
        self.inserts: dict[str, bytes] = {}
        """key -> the original request (msgpack), for new messages."""
        self.dirty: dict[str, MessageRecord] = {}
        """Records to write (inserted or updated), latest value wins."""
        self.events: list[StatusEvent] = []
        self.opening: dict[str, list[StatusEvent]] = {}
        """A new message's first status events (accepted, deferred), kept in its own row."""
        self.consents: list[tuple[RecipientKey, ConsentRecord]] = []
        self.sends: list[tuple[RecipientKey, SendEntry]] = []
        self.addresses: list[tuple[str, str]] = []
        """``(address_ref, recipient key)`` pairs to remember."""
        self.receipts: list[tuple[int, float]] = []
        """``(digest of a provider event id, when it arrived)``: applied, never again."""
        self.after: list[Callable[[], None]] = []
        """Run in order after the commit: dispatch sends, publish status events."""
        self.committed = False

    @property
    def rows(self) -> int:
        return (
            len(self.dirty)
            + len(self.events)
            + len(self.consents)
            + len(self.sends)
            + len(self.addresses)
            + len(self.receipts)
        )

    def __bool__(self) -> bool:
        return bool(self.rows or self.after)

    def insert(self, record: MessageRecord, request: bytes) -> None:
        """A new message: its record and the request it came with, in one row."""
        self.inserts[record.key] = request
        self.dirty[record.key] = record

    def write(self, record: MessageRecord) -> None:
        """The record's latest value (written once per batch, however often it changed)."""
        self.dirty[record.key] = record

    def opening_event(self, key: str, event: StatusEvent) -> None:
        """A status event of the admission itself, stored inside the message's own row."""
        self.opening.setdefault(key, []).append(event)

    def event(self, event: StatusEvent) -> None:
        self.events.append(event)

    def consent(self, recipient: RecipientKey, record: ConsentRecord) -> None:
        self.consents.append((recipient, record))

    def send(self, recipient: RecipientKey, entry: SendEntry) -> None:
        self.sends.append((recipient, entry))

    def address(self, address_ref: str, recipient: str) -> None:
        self.addresses.append((address_ref, recipient))

    def receipt(self, digest: int, at: float) -> None:
        self.receipts.append((digest, at))

    def then(self, action: Callable[[], None]) -> None:
        """Run ``action`` once the batch is durable (after the actions staged before it)."""
        self.after.append(action)


class Recovered(msgspec.Struct):
    """What a journal gives back at start, but the active messages (``Journal.active_page``)."""

    finished: dict[str, Outcome]
    consents: list[tuple[RecipientKey, ConsentRecord]]
    sends: list[tuple[RecipientKey, SendEntry]]
    addresses: list[tuple[str, str]] = []
    """``(address_ref, recipient key)`` pairs; an address may belong to several recipients."""
    address_key: bytes = b""
    """The journal's own secret for ``address_ref`` (made with the journal, kept inside it)."""


class StoredMessage(msgspec.Struct):
    record: MessageRecord
    request: bytes
    finished: bool


class Journal(Protocol):
    """Durable storage of the router's state. All methods may run I/O in threads."""

    async def open(self, *, create: bool = False) -> None:
        """Open the journal.

        Raises:
            JournalMissing: it does not exist and ``create`` is false.
        """
        ...

    async def aclose(self) -> None: ...

    async def recover(
        self, *, now: float, retention_seconds: float, horizon_seconds: float
    ) -> Recovered:
        """Everything needed to rebuild the in-memory state."""
        ...

    async def active_page(
        self, cursor: int | None, *, limit: int
    ) -> tuple[list[MessageRecord], int | None]:
        """Up to ``limit`` active messages in admission order after ``cursor`` (None: from the
        start), and the cursor of the next page (None: no more).

        Paged so that the router shares the values of each page before the next is decoded:
        decoding a million records at once left ~300 MiB of freed copies behind in the heap.
        """
        ...

    async def commit(self, batch: Batch) -> None:
        """Make the batch durable as one unit.

        Raises:
            JournalUnavailable: nothing of the batch was written; the same batch may be
                committed again once the cause passes (disk full, I/O error).
        """
        ...

    async def known_receipts(self, digests: list[int]) -> set[int]:
        """Which of these provider-event digests were committed before (and not pruned)."""
        ...

    async def message(self, key: MessageKey) -> StoredMessage | None: ...

    async def messages(self, keys: list[str]) -> dict[str, StoredMessage]:
        """Several messages in one read (each read is a thread hop; batch them)."""
        ...

    async def requests(self, keys: list[str]) -> dict[str, bytes]:
        """The original send requests (content, addresses) of these messages."""
        ...

    async def timeline(self, key: MessageKey) -> list[StatusEvent]: ...

    async def timelines(self, keys: list[str]) -> dict[str, list[StatusEvent]]:
        """The timelines of several messages in one read; keys without events are absent."""
        ...

    async def consent_history(self, recipient: RecipientKey) -> list[ConsentRecord]: ...

    async def pin_experiments(self, fingerprints: dict[str, str]) -> dict[str, str]:
        """Keep each experiment's definition fingerprint the first time it is seen; answer
        the stored fingerprint of every one whose definition has changed since (none: ``{}``).
        Nothing is written when one has changed."""
        ...

    async def experiment_rows(
        self, tenant: str, experiment: str
    ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """``campaign_rows`` for the messages assigned to one experiment's variants (their
        ``variant`` is ``"{experiment}/{name}"``), whatever their campaign."""
        ...

    async def campaign_rows(
        self, tenant: str, campaign: str
    ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """Aggregates for ``gateway.reports.build``."""
        ...

    async def prune(
        self,
        *,
        now: float,
        retention_seconds: float,
        horizon_seconds: float,
        receipt_retention_seconds: float,
    ) -> int:
        """Forget finished messages past retention, sends past the cap horizon and provider
        event ids past theirs."""
        ...


async def active_pages(journal: Journal, *, limit: int) -> AsyncIterator[list[MessageRecord]]:
    """Every active message, page by page, as ``Journal.active_page`` hands them out."""
    cursor: int | None = None
    while True:
        records, cursor = await journal.active_page(cursor, limit=limit)
        yield records
        if cursor is None:
            return
