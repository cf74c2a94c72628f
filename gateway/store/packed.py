"""One ``bytes`` value per known recipient: its consents and recent sends, packed.

The live state keeps every recipient the gateway knows (millions), and as objects one consent
and three recent sends cost ~700 bytes: a ``ConsentState`` holding a tuple holding a
``ConsentRecord`` with its own float and strings, a ``CapHistory`` of ``SendEntry`` structs
each with its message key. Packed they take ~70 bytes of payload in one object. They are
unpacked into the same core values (``ConsentState``, ``CapHistory``) whenever a decision needs
them, so every decision is made by the same code on equal values; only storage changes.

Layout::

    recipient  = varint(number of sends) send* consent*
    send       = CapHistory's packed entry (``caps.ENTRY_BYTES`` bytes)
    consent    = flags:u8 at:float64 text(source) [text(topic)] [text(reason)]
    flags      = kind:1 | action:1 << 1 | has_topic << 2 | has_reason << 3 | channel << 4
                 (channel 0 = every channel, else 1 + its index in ``Channel``)
    text       = varint(length) UTF-8 bytes

Floats are stored as IEEE doubles, so every time comes back bit for bit; text is encoded with
``surrogatepass``, so any ``str`` comes back equal. The journal is untouched: it keeps storing
``ConsentRecord`` and ``SendEntry`` rows, and recovery rebuilds these values from them.
"""

from __future__ import annotations

import struct
from typing import Final

from gateway.core.caps import ENTRY_BYTES, CapHistory
from gateway.core.consent import ConsentAction, ConsentKind, ConsentRecord, ConsentState
from gateway.core.model import Channel

EMPTY_CONSENTS: Final = ConsentState()
EMPTY_HISTORY: Final = CapHistory()

_HEAD: Final = struct.Struct("<Bd")
_KINDS: Final = tuple(ConsentKind)
_ACTIONS: Final = tuple(ConsentAction)
_CHANNELS: Final = (None, *Channel)
_KIND_CODES: Final = {kind: code for code, kind in enumerate(_KINDS)}
_ACTION_CODES: Final = {action: code for code, action in enumerate(_ACTIONS)}
_CHANNEL_CODES: Final = {channel: code for code, channel in enumerate(_CHANNELS)}
_HAS_TOPIC: Final = 1 << 2
_HAS_REASON: Final = 1 << 3
_HEAD_BYTES: Final = _HEAD.size
_SCOPES: Final = tuple(
    (_KINDS[flags & 1], _ACTIONS[flags >> 1 & 1], _CHANNELS[flags >> 4])
    for flags in range(len(_CHANNELS) << 4)
)
"""``(kind, action, channel)`` by flags byte: one look-up per record where decoding happens."""
if len(_KINDS) > 2 or len(_ACTIONS) > 2 or len(_CHANNELS) > 16:  # pragma: no cover
    raise ImportError("a consent's kind, action and channel no longer fit one flags byte")


def pack(consents: ConsentState, history: CapHistory) -> bytes:
    out = bytearray(_varint(len(history.packed) // ENTRY_BYTES))
    out += history.packed
    for record in consents.records:
        _pack_consent(out, record)
    return bytes(out)


def with_history(packed: bytes, history: CapHistory) -> bytes:
    """``packed`` with its sends replaced; the consents are copied as they are."""
    return b"".join(
        (
            _varint(len(history.packed) // ENTRY_BYTES),
            history.packed,
            packed[_consents_at(packed) :],
        )
    )


def history(packed: bytes) -> CapHistory:
    if not packed or packed[0] == 0:
        return EMPTY_HISTORY
    count, start = _read_varint(packed, 0)
    return CapHistory(packed[start : start + count * ENTRY_BYTES])


def consents(packed: bytes) -> ConsentState:
    return _consents_from(packed, _consents_at(packed))


def both(packed: bytes) -> tuple[ConsentState, CapHistory]:
    """``(consents(packed), history(packed))``, reading the count of sends once: every
    admission for a known recipient asks for both."""
    count = packed[0]
    if count >= 0x80:
        count, start = _read_varint(packed, 0)
    else:
        start = 1
    end = start + count * ENTRY_BYTES
    history = CapHistory(packed[start:end]) if count else EMPTY_HISTORY
    return _consents_from(packed, end), history


def _consents_from(packed: bytes, offset: int) -> ConsentState:
    end = len(packed)
    if offset == end:
        return EMPTY_CONSENTS
    records: list[ConsentRecord] = []
    while offset < end:
        flags, at = _HEAD.unpack_from(packed, offset)
        source, offset = _read_text(packed, offset + _HEAD_BYTES)
        topic = reason = None
        if flags & _HAS_TOPIC:
            topic, offset = _read_text(packed, offset)
        if flags & _HAS_REASON:
            reason, offset = _read_text(packed, offset)
        kind, action, channel = _SCOPES[flags]
        records.append(ConsentRecord(kind, action, at, source, channel, topic, reason))
    return ConsentState(tuple(records))


def _pack_consent(out: bytearray, record: ConsentRecord) -> None:
    flags = (
        _KIND_CODES[record.kind]
        | _ACTION_CODES[record.action] << 1
        | (_HAS_TOPIC if record.topic is not None else 0)
        | (_HAS_REASON if record.reason is not None else 0)
        | _CHANNEL_CODES[record.channel] << 4
    )
    out += _HEAD.pack(flags, record.at)
    _pack_text(out, record.source)
    if record.topic is not None:
        _pack_text(out, record.topic)
    if record.reason is not None:
        _pack_text(out, record.reason)


def _consents_at(packed: bytes) -> int:
    """Where the consents begin: after the count of sends and the sends."""
    if not packed:
        return 0
    count, start = _read_varint(packed, 0)
    return start + count * ENTRY_BYTES


def _pack_text(out: bytearray, text: str) -> None:
    encoded = text.encode("utf-8", "surrogatepass")
    out += _varint(len(encoded))
    out += encoded


def _read_text(packed: bytes, offset: int) -> tuple[str, int]:
    length = packed[offset]
    if length < 0x80:  # the usual case, spelled out: this runs for every admission
        start = offset + 1
    else:
        length, start = _read_varint(packed, offset)
    end = start + length
    return packed[start:end].decode("utf-8", "surrogatepass"), end


def _varint(value: int) -> bytes:
    """Unsigned LEB128: one byte below 128, the usual case for counts and lengths here."""
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(packed: bytes, offset: int) -> tuple[int, int]:
    """The value at ``offset`` and the offset after it."""
    byte = packed[offset]
    if byte < 0x80:
        return byte, offset + 1
    value = shift = 0
    while True:
        byte = packed[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, offset
        shift += 7
