"""Experiments: variants of the cascade tried on comparable shares of a tenant's recipients.

Rule 1: assignment is a pure, deterministic function of (salt, experiment, tenant, recipient):
a recipient gets the same variant on every message, every router and every restart (sticky),
with no shared state. The hash material is disjoint from the control group's (it names the
experiment, and the control group's names a period), so the two draws are independent: the
control group is held out first and stays outside every experiment.
Rule 2: this module knows variants and weights, not requests, config files or journals. A
variant may change the channel order, per-step unread timeouts and the send windows; what it
leaves unset the request and the tenant decide.

The definition's ``fingerprint`` changes whenever anything that changes who gets what does
(salt, variant names, weights, channels, timeouts, windows): assignments are comparable only
under one definition, so a changed definition needs a new name (the journal pins them).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import msgspec

from gateway.core.model import Channel
from gateway.core.send_windows import SendWindows

_SPACE = 1 << 64


class Variant(msgspec.Struct, frozen=True):
    """One arm. ``weight`` is relative to the other variants' weights."""

    name: str
    weight: float
    channels: tuple[Channel, ...] | None = None
    """The cascade order (``None``: the request's or the tenant's)."""
    step_timeout_seconds: tuple[tuple[Channel, float], ...] = ()
    """Unread timeouts per channel, replacing the request's and the configured ones."""
    windows: SendWindows | None = None
    """Send windows replacing the category's (``None``: the category's)."""


class Experiment(msgspec.Struct, frozen=True):
    """Variants with weights; ``salt`` keeps one experiment's draw apart from another's."""

    name: str
    variants: tuple[Variant, ...]
    salt: str = ""

    def __post_init__(self) -> None:
        if not self.variants:
            raise ValueError("an experiment needs at least one variant")
        names = [variant.name for variant in self.variants]
        if len(set(names)) != len(names):
            raise ValueError("variant names must be unique")
        for variant in self.variants:
            if not (math.isfinite(variant.weight) and variant.weight > 0):
                raise ValueError(f"variant {variant.name!r}: weight must be positive and finite")

    def key(self, variant: Variant) -> str:
        """``"{experiment}/{variant}"``: what messages, reports and metrics call the arm."""
        return f"{self.name}/{variant.name}"

    def assign(self, tenant: str, recipient_id: str) -> Variant:
        """The recipient's variant: a uniform 64-bit hash cut by the cumulative weights."""
        material = f"experiment\x1f{self.salt}\x1f{self.name}\x1f{tenant}\x1f{recipient_id}"
        digest = hashlib.blake2b(material.encode(), digest_size=8).digest()
        point = int.from_bytes(digest, "big") / _SPACE * self.total_weight
        running = 0.0
        for variant in self.variants[:-1]:
            running += variant.weight
            if point < running:
                return variant
        return self.variants[-1]

    @property
    def total_weight(self) -> float:
        return sum(variant.weight for variant in self.variants)

    def fingerprint(self) -> str:
        """A digest of everything that decides who gets what (the name excluded)."""
        encoded = msgspec.json.encode((self.salt, self.variants))
        return hashlib.sha256(encoded).hexdigest()[:16]


def shares(experiment: Experiment) -> Sequence[float]:
    """Each variant's expected share of the recipients, in order."""
    total = experiment.total_weight
    return [variant.weight / total for variant in experiment.variants]
