"""The global control group: a stable share of recipients who get no marketing for a period.

Rule 1: membership is a pure, deterministic function of (salt, period, tenant, recipient): the
same recipient stays in (or out of) the group for the whole period on every router, with no
shared state, and the group is redrawn when the period rolls over.
Rule 2: service messages are never held out; the caller asks only for marketing.

Incremental effect is measured by comparing this group with everyone else (docs/domain.md, "The control group"), so the
hash must be uniform: the first 8 bytes of BLAKE2b, read as an integer, are compared with the
configured share of 2**64.
"""

from __future__ import annotations

import hashlib
import math

import msgspec

_SPACE = 1 << 64


class ControlGroup(msgspec.Struct, frozen=True):
    """``percent`` of recipients held out per ``period_seconds`` (periods count from the epoch)."""

    percent: float = 0.0
    period_seconds: float = 90 * 86400.0
    salt: str = "cascadegw"

    def __post_init__(self) -> None:
        if not 0.0 <= self.percent <= 100.0:
            raise ValueError(f"control group percent must be within 0..100, got {self.percent}")
        if not math.isfinite(self.period_seconds) or self.period_seconds <= 0:
            raise ValueError("control group period must be a positive, finite number")

    def period(self, now: float) -> int:
        return int(now // self.period_seconds)

    def holds_out(self, tenant: str, recipient_id: str, *, now: float) -> bool:
        """Whether this recipient is in the control group for the period containing ``now``."""
        if self.percent <= 0.0:
            return False
        if self.percent >= 100.0:
            return True
        material = f"{self.salt}\x1f{self.period(now)}\x1f{tenant}\x1f{recipient_id}"
        digest = hashlib.blake2b(material.encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") < self.percent / 100.0 * _SPACE
