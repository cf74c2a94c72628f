"""Signed tracking links: click redirects, the email open pixel and one-click unsubscribe.

A token is ``base64url(msgpack payload) + "." + base64url(HMAC-SHA256(secret, payload)[:16])``.
The payload names the message, the channel, when the link was issued and, for clicks, the
destination, so the redirect is not an open redirect and nobody can unsubscribe someone else
by guessing a URL.

An unsubscribe link also names the recipient and the consent topic: the withdrawal it stands
for must work for as long as the link does (a person may unsubscribe from a year-old email),
long after the message itself has left the journal. The payload is signed, not encrypted: it
holds the CRM's ids (message, recipient, topic), never an address.

Links expire (clicks and opens after ``tracking.click_ttl_seconds``, unsubscribes after
``tracking.unsubscribe_ttl_seconds``). Verification accepts every configured secret, so links
signed before a rotation keep working; new links are signed with the first.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import re
from collections.abc import Sequence
from typing import Final
from urllib.parse import quote

import msgspec

from gateway.core.model import Channel

_SIGNATURE_BYTES: Final = 16
_CLOCK_SKEW_SECONDS: Final = 300
"""A link issued this far in the future still verifies (several gateways' clocks differ)."""


class LinkKind(enum.StrEnum):
    CLICK = "c"
    OPEN = "o"
    UNSUBSCRIBE = "u"


class LinkPayload(msgspec.Struct, frozen=True, array_like=True):
    kind: LinkKind
    key: str
    """The message key, ``"{tenant}:{message id}"``."""
    channel: Channel
    issued_at: int
    """POSIX seconds."""
    url: str | None = None
    """Clicks: where to redirect."""
    recipient_id: str | None = None
    """Unsubscribes: whose consent to withdraw."""
    topic: str | None = None
    """Unsubscribes: the consent topic the message was sent under."""

    @property
    def tenant(self) -> str:
        return self.key.partition(":")[0]


class LinkRejection(enum.StrEnum):
    """Why a token was not honoured; also the tracking metric's verdict label."""

    BAD_TOKEN = "bad_token"  # noqa: S105 - a verdict label, not a password
    EXPIRED = "expired"


_encoder: Final = msgspec.msgpack.Encoder()
_decoder: Final = msgspec.msgpack.Decoder(LinkPayload)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


_B64URL: Final = re.compile(r"[A-Za-z0-9_-]*")


def _unb64(text: str) -> bytes:
    """Strict: only the URL-safe alphabet, unpadded, in its one canonical spelling (the lenient
    decoder skips stray characters and ignores spare bits, so many strings would decode to
    the same token).

    Raises:
        ValueError: anything else.
    """
    if _B64URL.fullmatch(text) is None or len(text) % 4 == 1:
        raise ValueError("not unpadded base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64(data) != text:
        raise ValueError("not canonical base64url")
    return data


class LinkSigner:
    """Issues and verifies tracking links.

    Args:
        secrets: the signing secret first, then previous secrets still accepted.
        public_url: where recipients reach the gateway's tracking routes.
        click_ttl_seconds: lifetime of click and open links.
        unsubscribe_ttl_seconds: lifetime of unsubscribe links.
    """

    def __init__(
        self,
        secrets: Sequence[bytes],
        public_url: str,
        *,
        click_ttl_seconds: float = 90 * 86400.0,
        unsubscribe_ttl_seconds: float = 400 * 86400.0,
    ) -> None:
        if not secrets:
            raise ValueError("a link signer needs a secret")
        for secret in secrets:
            if len(secret) < 16:
                raise ValueError("the tracking secret needs at least 16 bytes")
        self._secrets = tuple(secrets)
        self.public_url = public_url.rstrip("/")
        self._ttl_seconds = {
            LinkKind.CLICK: click_ttl_seconds,
            LinkKind.OPEN: click_ttl_seconds,
            LinkKind.UNSUBSCRIBE: unsubscribe_ttl_seconds,
        }

    def token(self, payload: LinkPayload) -> str:
        body = _encoder.encode(payload)
        return f"{_b64(body)}.{_b64(self._sign(self._secrets[0], body))}"

    @staticmethod
    def _sign(secret: bytes, body: bytes) -> bytes:
        return hmac.digest(secret, body, hashlib.sha256)[:_SIGNATURE_BYTES]

    def verify(self, token: str, *, now: float) -> LinkPayload | LinkRejection:
        """The payload of a genuine, unexpired token; a rejection for anything else."""
        body_text, dot, signature_text = token.partition(".")
        if not dot:
            return LinkRejection.BAD_TOKEN
        try:
            body = _unb64(body_text)
            signature = _unb64(signature_text)
        except ValueError:
            return LinkRejection.BAD_TOKEN
        genuine = False
        for secret in self._secrets:  # every secret is checked: no early exit to time
            genuine |= hmac.compare_digest(signature, self._sign(secret, body))
        if not genuine:
            return LinkRejection.BAD_TOKEN
        try:
            payload = _decoder.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return LinkRejection.BAD_TOKEN
        if payload.issued_at > now + _CLOCK_SKEW_SECONDS:
            return LinkRejection.BAD_TOKEN
        if now - payload.issued_at > self._ttl_seconds[payload.kind]:
            return LinkRejection.EXPIRED
        return payload

    def click_url(self, key: str, channel: Channel, destination: str, *, now: float) -> str:
        payload = LinkPayload(LinkKind.CLICK, key, channel, int(now), url=destination)
        return f"{self.public_url}/t/c/{self.token(payload)}"

    def open_pixel_url(self, key: str, channel: Channel, *, now: float) -> str:
        payload = LinkPayload(LinkKind.OPEN, key, channel, int(now))
        return f"{self.public_url}/t/o/{self.token(payload)}.gif"

    def unsubscribe_url(
        self, key: str, channel: Channel, *, recipient_id: str, topic: str, now: float
    ) -> str:
        payload = LinkPayload(
            LinkKind.UNSUBSCRIBE, key, channel, int(now), recipient_id=recipient_id, topic=topic
        )
        return f"{self.public_url}/t/u/{self.token(payload)}"

    def webhook_url(self, provider: str, key: str | None = None) -> str:
        base = f"{self.public_url}/webhooks/{provider}"
        return base if key is None else f"{base}?m={quote(key, safe='')}"
