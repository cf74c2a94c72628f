"""The router with everything it needs but sockets and threads, for deterministic tests.

A ``MemoryJournal`` (no threads: virtual time moves only when the test moves it), the real
committer, state and timer alarm; cascade steps collect in a list instead of provider queues,
published status events in another. A test drives it h11-style: requests, receipts, opt-outs
and clock jumps in; staged rows, jobs and events out. ``restart`` drops everything in memory
and recovers from what the journal committed, as a process restart would.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry

from gateway.app import policy_horizon
from gateway.clock import Clock
from gateway.config import GatewayConfig
from gateway.core.model import Lane
from gateway.inbound import Inbound
from gateway.protocol import Result, StatusEvent, decode_frame
from gateway.runtime.admission import Principal
from gateway.runtime.committer import Committer
from gateway.runtime.metrics import Metrics
from gateway.runtime.queues import Job
from gateway.runtime.router import Router
from gateway.runtime.timers import TimerAlarm
from gateway.store.base import MessageRecord
from gateway.store.memory import MemoryJournal, MemoryStore
from gateway.store.state import State


class CollectedJobs:
    """Stands in for the dispatch queues: jobs the router submitted, in order."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []

    def submit(self, job: Job) -> None:
        self.jobs.append(job)

    def depth(self, lane: Lane) -> int:
        return sum(1 for job in self.jobs if job.lane is lane)


class Harness:
    def __init__(self, config: GatewayConfig, store: MemoryStore, clock: Clock) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.registry = CollectorRegistry()
        self.metrics = Metrics(
            self.registry, {name: p.channel for name, p in config.providers.items()}
        )
        self.journal = MemoryJournal(store)
        self.state = State(horizon_seconds=policy_horizon(config))
        self.committer = Committer(self.journal, self.metrics)
        self.queues = CollectedJobs()
        self.published: list[StatusEvent] = []
        self.router = Router(
            config=config,
            state=self.state,
            journal=self.journal,
            committer=self.committer,
            metrics=self.metrics,
            clock=clock,
            publish=self.published.append,
            dispatch=self.queues,
            alarm=TimerAlarm(),
        )

    @classmethod
    async def start(cls, config: GatewayConfig, store: MemoryStore, clock: Clock) -> Harness:
        engine = cls(config, store, clock)
        await engine.journal.open(create=True)
        await engine.router.recover(now=clock.now())
        return engine

    async def restart(self) -> Harness:
        """A new process on the same journal: whatever was staged and not committed is gone."""
        return await Harness.start(self.config, self.store, self.clock)

    @property
    def now(self) -> float:
        return self.clock.now()

    def requests(
        self, requests: Sequence[dict[str, Any]], principal: Principal = None
    ) -> list[Result]:
        """Hand a batch frame to the router; returns the (not yet durable) results."""
        frame = decode_frame(msgspec.msgpack.encode(list(requests)))
        results = self.router.handle_frame(frame, principal)
        return [r for r in results if isinstance(r, Result)]

    def inbound(self, item: Inbound) -> None:
        self.router.inbound(item)

    async def commit(self) -> None:
        await self.committer.flush()

    def take_jobs(self) -> list[Job]:
        jobs, self.queues.jobs = self.queues.jobs, []
        return jobs

    def claim(self, job: Job) -> MessageRecord | None:
        """The dispatcher's last check before a provider request; a record means it goes."""
        return self.router.feedback.claim(job, self.now)

    def fire_timers(self) -> int:
        due = self.state.pop_due(self.now, 1_000_000)
        self.router.engine.fire_timers(due, self.now)
        return len(due)

    async def prune(self) -> int:
        store = self.config.store
        now = self.now
        self.state.forget_finished(older_than=now - store.idempotency_retention_seconds)
        return await self.journal.prune(
            now=now,
            retention_seconds=store.idempotency_retention_seconds,
            horizon_seconds=self.state.horizon_seconds,
            receipt_retention_seconds=store.receipt_retention_seconds,
        )
