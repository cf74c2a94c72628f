"""The router: the services that own the gateway's state, wired once, by construction.

Where to look:

- ``engine``: applies core events to message records and runs the commands they return;
  the only code that changes a cascade (``gateway.runtime.engine``).
- ``admission``: send, cancel, event, consent and status requests (``.admission``).
- ``receipts``: provider receipts, tracking hits and opt-outs (``.receipts``).
- ``feedback``: the dispatcher's claim before a request and its report after (``.feedback``).
- ``queries``: message states, timelines, duplicate detection (``.queries``).
- recovery at start (``gateway.runtime.recovery``).

Every handler is synchronous up to the point where it stages its writes into the committer's
current batch; nothing it changes is visible to a client or a provider before that batch is
durable (replies, dispatches and status publications are after-commit actions).
"""

from __future__ import annotations

from collections.abc import Callable

from gateway.clock import Clock
from gateway.config import GatewayConfig
from gateway.inbound import Inbound
from gateway.protocol import Frame, Result, StatusEvent
from gateway.runtime import recovery
from gateway.runtime.admission import Admission, Principal
from gateway.runtime.committer import Committer
from gateway.runtime.engine import DispatchPort, Engine
from gateway.runtime.feedback import DispatchFeedback
from gateway.runtime.metrics import Metrics
from gateway.runtime.queries import JournalQuery, Queries
from gateway.runtime.receipts import Receipts
from gateway.runtime.timers import TimerAlarm
from gateway.store.base import Journal
from gateway.store.state import State


class Router:
    def __init__(
        self,
        *,
        config: GatewayConfig,
        state: State,
        journal: Journal,
        committer: Committer,
        metrics: Metrics,
        clock: Clock,
        publish: Callable[[StatusEvent], None],
        dispatch: DispatchPort,
        alarm: TimerAlarm,
    ) -> None:
        self.config = config
        self.state = state
        self.journal = journal
        self.clock = clock
        self.engine = Engine(
            config=config,
            state=state,
            committer=committer,
            metrics=metrics,
            publish=publish,
            dispatch=dispatch,
            alarm=alarm,
        )
        engine = self.engine
        self.queries = Queries(state=state, committer=committer, journal=journal, metrics=metrics)
        self.receipts = Receipts(config=config, state=state, engine=engine, metrics=metrics)
        self.feedback = DispatchFeedback(config=config, state=state, engine=engine, metrics=metrics)
        self.admission = Admission(
            config=config,
            state=state,
            engine=engine,
            committer=committer,
            dispatch=dispatch,
            receipts=self.receipts,
            queries=self.queries,
            metrics=metrics,
        )

    def handle_frame(
        self, frame: Frame, principal: Principal = None
    ) -> list[Result | JournalQuery]:
        """Answer a frame's requests now; see ``Admission.handle_frame``."""
        return self.admission.handle_frame(frame, principal, self.clock.now())

    async def answer(self, queries: list[JournalQuery]) -> list[Result]:
        """Resolve the requests of a frame that need the journal; see ``Queries.answer``."""
        return await self.queries.answer(queries)

    def inbound(self, item: Inbound) -> None:
        """Apply what the HTTP surface verified; see ``Receipts.inbound``."""
        self.receipts.inbound(item, now=self.clock.now())

    async def recover(self, *, now: float) -> int:
        """Rebuild the state from the journal; returns how many steps are sent again."""
        return await recovery.recover(
            self.journal,
            self.state,
            self.engine,
            now=now,
            retention_seconds=self.config.store.idempotency_retention_seconds,
        )
