"""Frequency caps: sliding windows over what one recipient was sent.

Rule 1: a history is an immutable, time-ordered sequence of sends; checking is a pure function.
Rule 2: this module knows categories and channels, not consent, quiet hours or cascades.

A rule counts *messages*, not cascade steps: a promo that escalated from push to SMS is one
message against "promo <= 3 per 7 days". A rule narrowed to channels counts only messages that
reached those channels. Service messages are exempt from every rule (docs/domain.md).

An entry is inside a rule's window at ``now`` iff ``entry.at + window_seconds > now``; the
time a deferral waits for is computed from the same expression, so the re-check at that time
passes exactly (no float drift between "when" and "whether").
"""

from __future__ import annotations

import bisect
import enum
import functools
import hashlib
import struct
from collections.abc import Iterable
from typing import Final

import msgspec

from gateway.core.model import Category, Channel


class CapAction(enum.StrEnum):
    REJECT = "reject"
    DEFER = "defer"


class CapRule(msgspec.Struct, frozen=True):
    """At most ``max_count`` messages per ``window_seconds`` per recipient.

    ``categories``/``channels`` narrow the rule; empty means every marketing category / every
    channel.
    """

    name: str
    max_count: int
    window_seconds: float
    categories: frozenset[Category] = frozenset()
    channels: frozenset[Channel] = frozenset()
    action: CapAction = CapAction.REJECT


class SendEntry(msgspec.Struct, frozen=True, gc=False, array_like=True):
    """One cascade step that went out to the recipient (the journal's row for it)."""

    at: float
    message: str
    category: Category
    channel: Channel


def message_digest(message: str) -> int:
    """The 64-bit digest that stands for a message key in a history.

    A history keeps this instead of the key (a key string costs 60-100 bytes per send, and every
    known recipient has a history). Two keys with equal digests (a chance of 2^-64 per pair of
    messages to one recipient inside one window) would be taken for one message by that
    recipient's caps: the second would pass the rules the first filled, and a step of it on a
    channel the first used would not be counted again. Even a million messages to one
    recipient inside a window would make that a chance below 10^-7 (the birthday bound).
    """
    digest = hashlib.blake2b(message.encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(digest.digest(), "little")


_ENTRY: Final = struct.Struct("<dQB")
"""A packed send: when (float64, exact: windows compare ``at + window > now``), the message's
digest (uint64) and the category and channel as one code byte."""
ENTRY_BYTES: Final = _ENTRY.size
_AT: Final = struct.Struct("<d")
_TIMES: Final = struct.Struct(f"<d{ENTRY_BYTES - _AT.size}x")
"""Reads only the times of packed sends."""
_KINDS: Final = tuple((category, channel) for category in Category for channel in Channel)
_CODES: Final = {kind: code for code, kind in enumerate(_KINDS)}
assert len(_KINDS) <= 256, "a category and channel pair must fit one byte"


class CapHistory(msgspec.Struct, frozen=True, gc=False):
    """A recipient's recent sends in the order recorded (oldest first), packed.

    Each send is ``ENTRY_BYTES`` bytes in one ``bytes`` value instead of a ``SendEntry`` with its
    own key string and float: the live state keeps a history for every known recipient, and
    three sends took ~420 bytes as objects against 51 packed. The message is known by its
    digest (``message_digest``), which is all ``check`` needs: whether two sends are the same
    message.
    """

    packed: bytes = b""

    @classmethod
    def of(cls, entries: Iterable[SendEntry]) -> CapHistory:
        """The history of exactly these sends, in this order."""
        return cls(b"".join(_pack(entry) for entry in entries))

    def sends(self) -> list[tuple[float, int, Category, Channel]]:
        """``(at, message digest, category, channel)`` per send, in order."""
        return [(at, digest, *_KINDS[code]) for at, digest, code in _ENTRY.iter_unpack(self.packed)]

    def counted(self, message: str, channel: Channel) -> bool:
        """Whether a send of ``message`` on ``channel`` is in the history."""
        if not self.packed:
            return False
        digest = message_digest(message)
        return any(
            entry_digest == digest and _KINDS[code][1] is channel
            for _, entry_digest, code in _ENTRY.iter_unpack(self.packed)
        )

    def with_planned(self, planned: Iterable[SendEntry]) -> CapHistory:
        """This history followed by sends that are planned but not made: the recipient's
        deferred messages at the instant each waits for.

        ``check`` then sees them as a cap sees them later, so a burst of deferred messages does
        not all land on the one instant a slot frees up (issue #15). Planned sends go after the
        sends made (time order), so a message counted once and planned again keeps the later
        time; they are never journalled, the router rebuilds them from its waiting messages.
        """
        ordered = sorted(planned, key=_planned_at)
        if not ordered:
            return self
        return CapHistory(self.packed + b"".join(_pack(entry) for entry in ordered))

    def with_entry(self, entry: SendEntry, *, horizon_seconds: float) -> CapHistory:
        """Append ``entry`` and drop what no rule can see any more (older than the horizon)."""
        cutoff = entry.at - horizon_seconds
        packed, added = self.packed, _pack(entry)
        times = [at for (at,) in _TIMES.iter_unpack(packed)]
        if all(at > cutoff for at in times) and (not times or times[-1] <= entry.at):
            return CapHistory(packed + added)  # the usual case: nothing to drop, in order
        kept = [
            packed[index * ENTRY_BYTES : (index + 1) * ENTRY_BYTES]
            for index, at in enumerate(times)
            if at > cutoff
        ]
        late = bool(kept) and _at(kept[-1], 0) > entry.at
        kept.append(added)
        if late:
            # sends are recorded in clock order; keep them sorted if a caller is late
            # (sorted is stable: equal times keep the order they were recorded in)
            kept.sort(key=_entry_at)
        return CapHistory(b"".join(kept))


def _pack(entry: SendEntry) -> bytes:
    return _ENTRY.pack(
        entry.at, message_digest(entry.message), _CODES[entry.category, entry.channel]
    )


def _at(packed: bytes, offset: int) -> float:
    at: float = _AT.unpack_from(packed, offset)[0]
    return at


def _entry_at(entry: bytes) -> float:
    return _at(entry, 0)


def _planned_at(entry: SendEntry) -> float:
    return entry.at


class Capped(msgspec.Struct, frozen=True):
    """The verdict when a rule is full: which rule, and when a slot frees up."""

    rule: CapRule
    until: float

    @property
    def action(self) -> CapAction:
        return self.rule.action


def check(
    history: CapHistory,
    rules: tuple[CapRule, ...],
    *,
    message: str,
    category: Category,
    channel: Channel,
    now: float,
) -> Capped | None:
    """Whether one more send of ``message`` on ``channel`` fits every rule at ``now``, and if
    not, what happens to it (issue #15, "cap semantics").

    A message already counted by a rule inside its window passes that rule: the later steps of
    one cascade are the same message. The history may hold *planned* sends after ``now`` (the
    recipient's deferred messages, ``CapHistory.with_planned``): a send fits a rule when no
    window of the rule that holds it, before or after, would count more than ``max_count``.

    When rules are full, the deferring ones decide *when*: the earliest instant at or after
    ``now`` that every deferring rule allows. The rejecting ones then decide *whether*: a
    rejecting rule still full at that instant refuses the message at once (a message-wide
    rule over one narrowed to channels), instead of deferring it to a time it cannot go.

    Returns:
        ``None`` when the send fits now; a rejecting rule that is full when the send could go;
        else the deferring rule that holds it and the instant every deferring rule allows.
    """
    if category is Category.SERVICE or not rules or not history.packed:
        return None
    entries = list(_ENTRY.iter_unpack(history.packed))
    digest: int | None = None  # the message's digest, computed once a rule is full enough
    full: list[_Full] = []
    for rule in rules:
        categories, channels, window = rule.categories, rule.channels, rule.window_seconds
        if (categories and category not in categories) or (channels and channel not in channels):
            continue
        counted = _counted_codes(categories, channels)
        # the entries this rule counts, spelled out in place: this runs for every admission.
        # Entries are oldest first, so each message keeps its latest time. Every entry a
        # window holding `now` or a later instant can see has `at + window > now`, so a rule
        # with fewer such messages than its count fits now and at any later instant.
        latest = {
            entry_digest: at
            for at, entry_digest, code in entries
            if at + window > now and code in counted
        }
        if len(latest) < rule.max_count:
            continue
        if digest is None:
            digest = message_digest(message)
        own = latest.pop(digest, None)
        if own is not None and len(latest) < rule.max_count:
            continue  # a later step of a counted message, and room even once it leaves
        times = sorted(latest.values())
        full.append(_Full(rule, times, own, [t + window for t in times]))
    if not full:
        return None
    deferring = [entry for entry in full if entry.rule.action is CapAction.DEFER]
    at = _earliest(deferring, now)
    verdict: Capped | None = None
    for entry in full:
        if entry.rule.action is CapAction.REJECT and not _fits(entry, at):
            capped = Capped(entry.rule, _earliest([entry], at))
            if verdict is None or _worse(capped, verdict):
                verdict = capped
    if verdict is not None:
        return verdict
    if at == now:
        return None
    # the deferring rule that frees up last on its own names the deferral (any would do)
    binding = max(deferring, key=lambda entry: _earliest([entry], now)).rule
    return Capped(binding, at)


class _Full(msgspec.Struct, frozen=True):
    """A rule with as many messages in reach as its count: the times of the others, and the
    time the message itself was counted, if it was (a later step passes while that lasts)."""

    rule: CapRule
    times: list[float]
    """Sorted."""
    own: float | None
    ends: list[float]
    """``t + W`` for each of ``times``: sorted too (rounding is monotonic)."""


def _fits(full: _Full, at: float) -> bool:
    """Whether a send at ``at`` keeps every window of the rule that holds it within the count.

    A window ``(x - W, x]`` holds ``at`` for ``x`` in ``[at, at + W)``; its count rises only at
    an entry's time, so ``at`` itself and the entries after it are every ``x`` worth asking.
    Comparisons keep the form ``t + W > x`` of the module docstring, so ``until`` is exact.
    """
    rule, times = full.rule, full.times
    window, limit = rule.window_seconds, rule.max_count
    if full.own is not None and full.own + window > at:
        return True  # the message itself is still counted: this is one of its later steps
    # the count of a window (x - W, x] is #(t <= x) - #(t + W <= x): two binary searches over
    # sorted lists, so a recipient with a thousand planned sends costs milliseconds, not seconds
    # (a scan per instant made each admission quadratic in the recipient's waiting messages)
    ends = full.ends
    first, last = bisect.bisect_right(times, at), bisect.bisect_left(times, at + window)
    for x in (at, *times[first:last]):
        if bisect.bisect_right(times, x) - bisect.bisect_right(ends, x) >= limit:
            return False
    return True


def _earliest(rules: list[_Full], now: float) -> float:
    """The earliest instant ``>= now`` at which a send fits every one of ``rules``.

    A rule stops refusing only when an entry leaves a window, at ``t + W``; after the latest
    such instant no window holds any entry, so the search always ends.
    """
    candidates = sorted(
        {now}
        | {
            t + full.rule.window_seconds
            for full in rules
            for t in full.times
            if t + full.rule.window_seconds > now
        }
    )
    for candidate in candidates[:-1]:
        if all(_fits(full, candidate) for full in rules):
            return candidate
    return candidates[-1]


@functools.lru_cache(maxsize=1024)
def _counted_codes(categories: frozenset[Category], channels: frozenset[Channel]) -> frozenset[int]:
    """The codes of the sends a rule narrowed to these counts: marketing sends of its
    categories on its channels (empty means all). A handful of rules ask, so it is kept."""
    return frozenset(
        code
        for code, (category, channel) in enumerate(_KINDS)
        if category is not Category.SERVICE
        and (not categories or category in categories)
        and (not channels or channel in channels)
    )


def _worse(candidate: Capped, current: Capped) -> bool:
    """Between two full rejecting rules, the one that decides."""
    if bool(candidate.rule.channels) != bool(current.rule.channels):
        # a full message-wide rule refuses the message; a per-channel one only this channel
        return not candidate.rule.channels
    return candidate.until > current.until


def horizon_seconds(rules: tuple[CapRule, ...]) -> float:
    """How far back any rule looks; older entries can be forgotten."""
    return max((rule.window_seconds for rule in rules), default=0.0)
