"""The configuration types that adapters share with the gateway's configuration.

``gateway.config`` reads provider tables into the settings type of each provider's module
(``adapters/fcm.py``'s ``FcmSettings``, ...): a union tagged by ``kind``. So ``gateway.config``
imports the adapters, and the adapters must not import it back; what both need lives here:
``Secret``, the strict ``Settings`` base, the fields every provider kind has, and the two
sections adapters and simulators are handed (the sender identity, the simulators' behaviour).
This module imports nothing of the gateway's but the core's model.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

import msgspec

from gateway.core.model import Channel

Positive = Annotated[float, msgspec.Meta(gt=0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]


class Secret:
    """A string that never appears in ``repr``, ``str`` or logs."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


class Settings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A config section: frozen, and an unknown key is an error (never silently dropped)."""


class ProviderSettingsBase(Settings, frozen=True, tag_field="kind"):
    """What every provider account has; each provider's module adds its own fields.

    A subclass names its ``kind`` as its msgspec ``tag`` (``class FcmSettings(...,
    tag="fcm")``) and the channel it serves as ``channel``, so a provider table is read into
    the type its ``kind`` names, and a key another provider kind has is an unknown key.
    """

    channel: ClassVar[Channel]
    """The channel this provider kind serves."""

    url: str = ""
    """Base URL of the provider API; empty with ``simulated`` (the simulator's address is used)."""
    simulated: bool = False
    """Run this provider's simulator in-process and point the adapter at it (demo, tests)."""
    price: NonNegative = 0.0
    """Price per message, in ``currency`` units."""
    rate_per_second: Positive = 100.0
    burst: PositiveInt = 10
    concurrency: PositiveInt = 32
    timeout_seconds: Positive = 10.0
    webhook_tolerance_seconds: Positive | None = None
    """Receipts signed longer ago than this are rejected as ``stale``. Unset: the provider's
    documented retry window plus a margin (SendGrid 25 h, Viber 2 h), so a callback the
    provider retries after an outage is still accepted; replays inside the window are
    absorbed by the gateway's idempotent receipt store, not by this check."""

    @property
    def kind(self) -> str:
        """The provider kind (``fcm``, ``sendgrid``, ...): the tag this type is read by."""
        tag = self.__struct_config__.tag
        assert isinstance(tag, str), f"{type(self).__name__} has no kind tag"
        return tag


class SenderConfig(Settings, frozen=True):
    """The brand's identity per channel (docs/domain.md, "Sender identity")."""

    email_from: str = "noreply@example.com"
    email_name: str = ""
    sms_from: str = "CASCADEGW"
    viber_name: str = "cascadegw"


class SimulatorConfig(Settings, frozen=True):
    """Behaviour of the built-in provider simulators (``simulated = true`` providers)."""

    latency_seconds: NonNegative = 0.005
    error_rate: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0
    rate_limit_rate: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0
    deliver_probability: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.95
    read_probability: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.3
    read_probability_by_channel: dict[Channel, Annotated[float, msgspec.Meta(ge=0, le=1)]] = {}
    """``read_probability`` per channel where it differs (people open an email more often
    than a push): cascades with different channels then read, and convert, differently."""
    click_probability: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.1
    bounce_probability: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.01
    unsubscribe_probability: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.005
    receipt_delay_seconds: NonNegative = 0.5
    read_delay_seconds: NonNegative = 2.0
    sendgrid_batch_seconds: NonNegative = 1.0
    """SendGrid posts its Event Webhook in batches: events of many messages in one POST. So
    does its simulator, posting what fell due at most this long after the first event of a
    batch (or at ``sendgrid_batch_max_events``); 0 posts each message's events as they fall due,
    one POST per message."""
    sendgrid_batch_max_events: PositiveInt = 1000
    seed: int | None = None
    """Set: each simulator's draws are reproducible; whether a message is delivered, read,
    clicked is drawn from a generator of its own per (seed, channel, address), so it does not
    depend on the order requests arrive in (experiments' e2e tests compare runs with it)."""
