"""The dispatch queues: one lane queue per provider account, and the request loader.

Made before the engine and the dispatcher, each of which gets them in its constructor: the
engine only submits steps and asks how deep a lane is; the dispatcher drains them.
"""

from __future__ import annotations

import msgspec
import trio

from gateway.config import GatewayConfig
from gateway.core.model import Channel, Lane
from gateway.core.ratelimit import LaneQueue, RateLimiter
from gateway.store.base import Journal


class Job(msgspec.Struct, gc=False):
    """One cascade step waiting for (or on its way to) a provider."""

    key: str
    tenant: str
    channel: Channel
    step: int
    lane: Lane
    enqueued_at: float
    request: bytes | None = None
    """The journalled send request, when at hand (first steps); loaded otherwise."""
    provider_index: int = 0
    attempt: int = 1


class RequestLoader:
    """Loads journalled requests for later cascade steps, many per read.

    Every job that needs its request waits here; one task reads all keys asked for since its
    last read in a single query, so a burst of timed-out steps costs one thread hop, not one
    per message.
    """

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self._waiting: dict[str, list[trio.MemorySendChannel[bytes | None]]] = {}
        self._wake = trio.Event()

    async def get(self, key: str) -> bytes | None:
        send, receive = trio.open_memory_channel[bytes | None](1)
        self._waiting.setdefault(key, []).append(send)
        self._wake.set()
        return await receive.receive()

    async def serve(self) -> None:
        while True:
            if not self._waiting:
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            waiting, self._waiting = self._waiting, {}
            found = await self.journal.requests(list(waiting))
            for key, channels in waiting.items():
                for channel in channels:
                    channel.send_nowait(found.get(key))


class ProviderQueue:
    __slots__ = ("channel", "concurrency", "inflight", "limiter", "name", "price", "queue", "wake")

    def __init__(
        self,
        name: str,
        channel: Channel,
        *,
        rate: float,
        burst: int,
        concurrency: int,
        price: float,
    ) -> None:
        self.name = name
        self.channel = channel
        self.limiter = RateLimiter(rate, burst)
        self.queue: LaneQueue[Job] = LaneQueue()
        self.concurrency = concurrency
        self.inflight = 0
        self.price = price
        self.wake = trio.Event()


class DispatchQueues:
    """The per-provider lane queues: what the engine submits cascade steps to."""

    def __init__(self, config: GatewayConfig) -> None:
        self.by_provider = {
            name: ProviderQueue(
                name,
                provider.channel,
                rate=provider.rate_per_second,
                burst=provider.burst,
                concurrency=provider.concurrency,
                price=provider.price,
            )
            for name, provider in config.providers.items()
        }
        self.providers = {tenant: dict(t.providers) for tenant, t in config.tenants.items()}
        """Provider names per tenant and channel, in failover order."""
        self.retrying: dict[Lane, int] = dict.fromkeys(Lane, 0)
        """Jobs per lane waiting out a retry delay (they count toward the lane's depth)."""

    def submit(self, job: Job) -> None:
        names = self.providers[job.tenant][job.channel]
        queue = self.by_provider[names[job.provider_index]]
        queue.queue.push(job.lane, job)
        queue.wake.set()

    def depth(self, lane: Lane) -> int:
        """Sends waiting in ``lane``: queued at providers or waiting to retry (checked per send)."""
        return sum(q.queue.depth(lane) for q in self.by_provider.values()) + self.retrying[lane]

    def inflight(self) -> int:
        return sum(q.inflight for q in self.by_provider.values())
