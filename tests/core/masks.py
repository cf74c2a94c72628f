"""Channel masks for the core tests: the production code only ever reads them bit by bit."""

from __future__ import annotations

from collections.abc import Iterable

from gateway.core.model import Channel


def channel_mask(channels: Iterable[Channel]) -> int:
    """The mask with each of ``channels``' bits set (see ``Channel.bit``)."""
    mask = 0
    for channel in channels:
        mask |= channel.bit
    return mask
