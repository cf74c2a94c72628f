"""Signed tracking links: click redirects, the email open pixel and one-click unsubscribe.

A token is ``base64url(msgpack payload) + "." + base64url(HMAC-SHA256(secret, payload)[:16])``.
The payload names the message, the channel and, for clicks, the destination, so the redirect is
not an open redirect and nobody can unsubscribe someone else by guessing a URL.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
from typing import Final
from urllib.parse import quote

import msgspec

from gateway.core.model import Channel

_SIGNATURE_BYTES: Final = 16


class LinkKind(enum.StrEnum):
    CLICK = "c"
    OPEN = "o"
    UNSUBSCRIBE = "u"


class LinkPayload(msgspec.Struct, frozen=True, array_like=True):
    kind: LinkKind
    key: str
    channel: Channel
    url: str | None = None


_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(LinkPayload)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class LinkSigner:
    def __init__(self, secret: bytes, public_url: str) -> None:
        if len(secret) < 16:
            raise ValueError("the tracking secret needs at least 16 bytes")
        self._secret = secret
        self.public_url = public_url.rstrip("/")

    def token(self, payload: LinkPayload) -> str:
        body = _encoder.encode(payload)
        signature = hmac.new(self._secret, body, hashlib.sha256).digest()[:_SIGNATURE_BYTES]
        return f"{_b64(body)}.{_b64(signature)}"

    def verify(self, token: str) -> LinkPayload | None:
        """The payload of a genuine token, or None for anything forged, truncated or garbled."""
        body_text, dot, signature_text = token.partition(".")
        if not dot:
            return None
        try:
            body = _unb64(body_text)
            signature = _unb64(signature_text)
            expected = hmac.new(self._secret, body, hashlib.sha256).digest()[:_SIGNATURE_BYTES]
            if not hmac.compare_digest(signature, expected):
                return None
            return _decoder.decode(body)
        except (ValueError, msgspec.DecodeError, msgspec.ValidationError):
            return None

    def click_url(self, key: str, channel: Channel, destination: str) -> str:
        return f"{self.public_url}/t/c/{self.token(LinkPayload(LinkKind.CLICK, key, channel, destination))}"

    def open_pixel_url(self, key: str, channel: Channel) -> str:
        return f"{self.public_url}/t/o/{self.token(LinkPayload(LinkKind.OPEN, key, channel))}.gif"

    def unsubscribe_url(self, key: str, channel: Channel) -> str:
        return (
            f"{self.public_url}/t/u/{self.token(LinkPayload(LinkKind.UNSUBSCRIBE, key, channel))}"
        )

    def webhook_url(self, provider: str, key: str | None = None) -> str:
        base = f"{self.public_url}/webhooks/{provider}"
        return base if key is None else f"{base}?m={quote(key, safe='')}"
