"""The router's live state: active messages, retained keys, consents, send history, timers.

Plain data structures with no I/O; the journal makes them durable and rebuilds them at start.
Everything here is touched only from the router's trio thread, so no locking.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Hashable
from typing import TypeVar

import msgspec

from gateway.core.caps import CapHistory, SendEntry
from gateway.core.cascade import Cascade, Status
from gateway.core.consent import ConsentRecord, ConsentState
from gateway.core.model import Channel, Lane, Outcome, RecipientKey, TimerKind, recipient_key
from gateway.core.policy import RecipientState
from gateway.core.timers import Deadlines
from gateway.store import packed
from gateway.store.base import MessageRecord

ADDRESS_INDEXED = frozenset({Channel.VIBER, Channel.SMS})
"""Channels whose provider opt-outs name only the address (a Viber user id, a phone): the
recipients sent to each address are remembered, keyed, so such an opt-out finds them."""


def address_ref(channel: Channel, address: str, key: bytes) -> str:
    """A keyed hash standing for a provider-side address. Keyed with the journal's own secret,
    so the index of phones and Viber ids cannot be reversed by hashing candidate numbers."""
    digest = hashlib.blake2b(
        f"{channel.value}\x00{address}".encode(), digest_size=12, person=b"cgw-address", key=key
    )
    return digest.hexdigest()


def legacy_address_ref(channel: Channel, address: str) -> str:
    """How journals before the keyed index named an address (keyed with the channel's name);
    still looked up, so their entries keep resolving opt-outs."""
    digest = hashlib.blake2b(
        address.encode(), digest_size=12, person=b"cgw-address", key=channel.value.encode()
    )
    return digest.hexdigest()


_SHARED_LIMIT = 10_000
"""Distinct values kept for sharing: tenants, topics, zones, plans and timeouts repeat, but a
CRM may send arbitrary topics or per-message timeouts, and the table must not grow with them."""

_Value = TypeVar("_Value", bound=Hashable)
_NOBODY = RecipientState()
_REF_HEX_DIGITS = 24


def _address_key(ref: str) -> int | str:
    """The index key for an ``address_ref``: its 12-byte digest as an int (40 bytes, where the
    24-character hex string takes 73). Anything that is not exactly such a hex string (no ref
    the gateway makes; a damaged journal row could hold one) stays a string, so two refs share
    a key only if they are equal."""
    try:
        key = int(ref, 16)
    except ValueError:
        return ref
    return key if len(ref) == _REF_HEX_DIGITS and f"{key:024x}" == ref else ref


class State:
    def __init__(self, *, horizon_seconds: float) -> None:
        self.records: dict[str, MessageRecord] = {}
        """Active messages (cascade not finished)."""
        self.finished: dict[str, Outcome] = {}
        """Finished messages within the idempotency retention, with their outcome."""
        self._finished_order: deque[tuple[float, str]] = deque()
        self._recipients: dict[str, bytes] = {}
        """Recipient key -> its consents and recent sends in one packed value
        (``gateway/store/packed.py``): every known recipient is here, so each byte counts."""
        self.by_recipient: dict[str, list[str]] = {}
        """Active message keys per recipient: a consent change reaches them at once."""
        self._by_address: dict[int | str, str | tuple[str, ...]] = {}
        """``address_ref(channel, address)`` -> recipient key(s), for the channels whose
        opt-outs name only the address (a Viber user leaving the bot, an SMS STOP). Keyed by
        the digest as an int (see ``_address_key``); one recipient is stored as its key string
        (the very object keying it in ``_recipients``, not a copy), several as a tuple."""
        self.by_provider_id: dict[str, str] = {}
        """``"{provider}:{provider message id}"`` -> key, for providers whose receipts carry
        only their own id (Viber). Active messages only."""
        self.timers: dict[TimerKind, Deadlines[str]] = {kind: Deadlines() for kind in TimerKind}
        self.horizon_seconds = horizon_seconds
        self.address_key = b""
        """The journal's secret for ``address_ref``; set when the journal is recovered."""
        self._deferred: dict[Lane, int] = dict.fromkeys(Lane, 0)
        self._shared: dict[object, object] = {}

    def share(self, value: _Value) -> _Value:
        """One object for every equal value: a million waiting cascades name a handful of
        tenants, topics, zones, plans and timeout tuples, and each copy costs 60-100 bytes."""
        shared = self._shared.get(value)
        if shared is not None:
            return shared  # type: ignore[return-value]
        if len(self._shared) < _SHARED_LIMIT:
            self._shared[value] = value
        return value

    # ------------------------------------------------------------ messages
    def known(self, key: str) -> bool:
        return key in self.records or key in self.finished

    def add(self, record: MessageRecord) -> None:
        """Track a message admitted now; admission builds it from shared values."""
        self.records[record.key] = record
        rkey = recipient_key(record.envelope.tenant, record.envelope.recipient_id)
        self.by_recipient.setdefault(rkey, []).append(record.key)
        if record.provider is not None and record.provider_message_id is not None:
            self.by_provider_id[f"{record.provider}:{record.provider_message_id}"] = record.key
        if record.cascade.status is Status.DEFERRED:
            self._deferred[record.envelope.lane] += 1

    def update(self, record: MessageRecord, cascade: Cascade) -> None:
        """Give a tracked record its next cascade value (the one place a cascade changes)."""
        was = record.cascade.status is Status.DEFERRED
        now = cascade.status is Status.DEFERRED
        if was != now:
            self._deferred[record.envelope.lane] += 1 if now else -1
        record.cascade = cascade

    def deferred(self, lane: Lane | None = None) -> int:
        """Active messages waiting for a send time (in ``lane``, or in all lanes)."""
        return self._deferred[lane] if lane is not None else sum(self._deferred.values())

    def restore(self, record: MessageRecord) -> None:
        """Track a message decoded from the journal at restart. The decoded record carries its
        own copy of every string and tuple (about 480 bytes of a 1.3 KB record): share them."""
        share = self.share
        envelope, cascade = record.envelope, record.cascade
        record.envelope = msgspec.structs.replace(
            envelope,
            tenant=share(envelope.tenant),
            topic=share(envelope.topic),
            channels=share(envelope.channels),
        )
        record.cascade = msgspec.structs.replace(
            cascade, plan=share(cascade.plan), timeouts=share(cascade.timeouts)
        )
        record.tz = share(record.tz)
        self.add(record)

    def remember_provider_id(
        self, record: MessageRecord, provider: str, provider_message_id: str | None
    ) -> None:
        if record.provider is not None and record.provider_message_id is not None:
            self.by_provider_id.pop(f"{record.provider}:{record.provider_message_id}", None)
        record.provider = provider
        record.provider_message_id = provider_message_id
        if provider_message_id is not None:
            self.by_provider_id[f"{provider}:{provider_message_id}"] = record.key

    def finish(self, record: MessageRecord, outcome: Outcome, *, now: float) -> None:
        key = record.key
        if self.records.pop(key, None) is not None and record.cascade.status is Status.DEFERRED:
            self._deferred[record.envelope.lane] -= 1
        self.finished[key] = outcome
        self.remember_finished(key, now)
        rkey = recipient_key(record.envelope.tenant, record.envelope.recipient_id)
        keys = self.by_recipient.get(rkey)
        if keys is not None:
            keys.remove(key)
            if not keys:
                del self.by_recipient[rkey]
        for kind in TimerKind:
            self.timers[kind].cancel(key)
        if record.provider is not None and record.provider_message_id is not None:
            self.by_provider_id.pop(f"{record.provider}:{record.provider_message_id}", None)

    def remember_finished(self, key: str, now: float) -> None:
        """Keep ``key`` as an idempotency key until the retention passes."""
        self._finished_order.append((now, key))

    def forget_finished(self, *, older_than: float) -> int:
        """Drop finished keys past the idempotency retention; returns how many."""
        dropped = 0
        order = self._finished_order
        while order and order[0][0] < older_than:
            _, key = order.popleft()
            if self.finished.pop(key, None) is not None:
                dropped += 1
        return dropped

    def oldest_finished(self) -> float | None:
        """When the oldest retained finished message finished."""
        return self._finished_order[0][0] if self._finished_order else None

    def active_for(self, rkey: RecipientKey) -> list[MessageRecord]:
        return [self.records[key] for key in self.by_recipient.get(rkey, ())]

    # ------------------------------------------------------------ recipients
    def recipient(self, rkey: str) -> RecipientState:
        """The recipient's consents and sends, with the sends their deferred messages plan:
        caps count those too (``CapHistory.with_planned``), so a burst of deferrals spreads
        over the slots that free up instead of landing on one instant."""
        value = self._recipients.get(rkey)
        waiting = self.by_recipient.get(rkey)
        if waiting:
            consents, history = (
                packed.both(value) if value else (packed.EMPTY_CONSENTS, packed.EMPTY_HISTORY)
            )
            planned = self._planned(waiting)
            if planned:
                return RecipientState(consents, history.with_planned(planned))
            return RecipientState(consents, history)
        if not value:
            return _NOBODY
        return RecipientState(*packed.both(value))

    def _planned(self, keys: list[str]) -> list[SendEntry]:
        """The step each deferred marketing message will send, at the instant it waits for."""
        planned: list[SendEntry] = []
        for key in keys:
            record = self.records[key]
            cascade = record.cascade
            due = record.step_due
            if (
                cascade.status is Status.DEFERRED
                and due is not None
                and record.envelope.category.is_marketing
            ):
                planned.append(SendEntry(due, key, record.envelope.category, cascade.channel))
        return planned

    def consents_of(self, rkey: str) -> ConsentState | None:
        """The recipient's effective consent records; ``None`` if none was ever applied."""
        value = self._recipients.get(rkey)
        consents = packed.consents(value) if value else packed.EMPTY_CONSENTS
        return consents if consents.records else None

    def history(self, rkey: str) -> CapHistory:
        """The recipient's recent sends (empty if none)."""
        value = self._recipients.get(rkey)
        return packed.history(value) if value else packed.EMPTY_HISTORY

    def apply_consent(self, rkey: str, record: ConsentRecord) -> ConsentState:
        value = self._recipients.get(rkey, b"")
        before = packed.consents(value)
        state = before.with_record(record)
        if state is not before:  # the same object when the record changes nothing
            self._recipients[rkey] = packed.pack(state, packed.history(value))
        return state

    def address_refs(self, channel: Channel, address: str) -> tuple[str, str]:
        """The index entries that may stand for ``address``: keyed, then legacy."""
        return address_ref(channel, address, self.address_key), legacy_address_ref(channel, address)

    def recipients_of(self, channel: Channel, address: str) -> tuple[str, ...]:
        keyed, legacy = self.address_refs(channel, address)
        found = self._indexed(keyed)
        old = self._indexed(legacy)
        return found + tuple(r for r in old if r not in found)

    def remember_address(self, ref: str, rkey: str) -> bool:
        """Map an address to a recipient; returns whether the pair is new."""
        key = _address_key(ref)
        known = self._by_address.get(key)
        if known is not None and (rkey == known if isinstance(known, str) else rkey in known):
            return False
        # the index names the recipient by the very key object of ``_recipients`` (a key
        # string costs ~65 bytes): re-inserted under this ``rkey``, the table keeps this object
        recipients = self._recipients
        recipients[rkey] = recipients.pop(rkey, b"")
        if known is None:
            self._by_address[key] = rkey
        elif isinstance(known, str):
            self._by_address[key] = (known, rkey)
        else:
            self._by_address[key] = (*known, rkey)
        return True

    def record_send(self, rkey: str, entry: SendEntry) -> None:
        value = self._recipients.get(rkey, b"")
        history = packed.history(value).with_entry(entry, horizon_seconds=self.horizon_seconds)
        self._recipients[rkey] = packed.with_history(value, history)

    def _indexed(self, ref: str) -> tuple[str, ...]:
        known = self._by_address.get(_address_key(ref), ())
        return (known,) if isinstance(known, str) else known

    # ------------------------------------------------------------ timers
    def schedule(self, key: str, kind: TimerKind, at: float) -> None:
        self.timers[kind].schedule(key, at)

    def cancel(self, key: str, kind: TimerKind) -> None:
        self.timers[kind].cancel(key)

    def next_deadline(self) -> float | None:
        deadlines = [d for d in (t.next_deadline() for t in self.timers.values()) if d is not None]
        return min(deadlines, default=None)

    def pending_timers(self) -> int:
        return sum(len(t) for t in self.timers.values())

    def pop_due(self, now: float, limit: int) -> list[tuple[str, TimerKind]]:
        due: list[tuple[str, TimerKind]] = []
        for kind, deadlines in self.timers.items():
            due.extend((key, kind) for key, _ in deadlines.pop_due(now, limit - len(due)))
        return due
