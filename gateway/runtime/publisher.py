"""Status events on the XPUB socket: topic = tenant, payload = a msgpack array of ``StatusEvent``.

Publishing never blocks the router: events go into a bounded queue owned by the one task that
owns the socket, and a full queue drops (and counts) the event. Every event is also in the
journal, so a subscriber that missed some can ask for the timeline.

Events are sent in batches, one message per tenant per drain of the queue (in order): at
campaign rates one ZeroMQ send per event cost more than the rest of an admission.

Subscriptions are manual (``XPUB_MANUAL``): the task reads each one and decides. With CURVE on,
a subscriber gets only the tenants its key is allowed (``gateway.runtime.curve``); subscribing
to everything ("") means every tenant it may see, and anything else is refused and counted.
Tenant names never prefix one another (the config refuses it), so a topic matches one tenant.
"""

from __future__ import annotations

from collections import deque
from typing import Final

import structlog
import trio
import zmq

from gateway.protocol import StatusEvent, encode
from gateway.runtime import curve, zmqio
from gateway.runtime.curve import Principals
from gateway.runtime.metrics import Metrics

log = structlog.get_logger("gateway.publisher")

_MAX_BATCH: Final = 1000


class Publisher:
    def __init__(
        self,
        sock: zmq.Socket[bytes],
        metrics: Metrics,
        *,
        principals: Principals | None,
        tenants: frozenset[str],
        buffer: int = 100_000,
        count_subscriptions: bool = True,
    ) -> None:
        self.sock = sock
        self.metrics = metrics
        self.principals = principals
        self.tenants = frozenset(name.encode() for name in tenants)
        """The topics a subscriber may ask for besides "" (``curve.subscription``)."""
        self.count_subscriptions = count_subscriptions
        self.subscribed = trio.Event()
        """Set once some subscriber's subscription was applied: behind the ZeroMQ edge, the
        router waits for the edge's before it takes requests, whose events would be lost."""
        """Off behind the ZeroMQ edge: its one subscription is not a client's (the edge
        counts those)."""
        self._queue: deque[StatusEvent] = deque()
        self._buffer = buffer
        self._idle: trio.CancelScope | None = None
        self.published = 0

    def publish(self, event: StatusEvent) -> None:
        if len(self._queue) >= self._buffer:
            self.metrics.status_events_dropped.inc()
            return
        self._queue.append(event)
        if self._idle is not None:
            # once: trio's cancel() formats the current task's repr on every call
            self._idle.cancel()
            self._idle = None

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        sock = self.sock
        task_status.started()
        while True:
            while zmqio.readable(sock):
                self._subscription(sock.recv(zmq.NOBLOCK, copy=False))
            if self._queue:
                self._send_batch()
                await trio.lowlevel.checkpoint()
                continue
            with trio.CancelScope() as idle:
                self._idle = idle
                await zmqio.wait_readable(sock)
            self._idle = None

    def _send_batch(self) -> None:
        queue = self._queue
        by_tenant: dict[str, list[StatusEvent]] = {}
        for _ in range(min(_MAX_BATCH, len(queue))):
            event = queue.popleft()
            by_tenant.setdefault(event.tenant, []).append(event)
        for tenant, events in by_tenant.items():
            # XPUB drops at its high-water mark instead of blocking: subscribers can't stall us
            self.sock.send_multipart([tenant.encode(), encode(events)], zmq.NOBLOCK)
            self.published += len(events)

    def _subscription(self, message: zmq.Frame) -> None:
        """Apply (or refuse) one subscription message from a subscriber."""
        key = curve.user_id(message) if self.principals is not None else None
        change = curve.subscription(message.bytes, key, self.principals, self.tenants)
        if change is None:
            return
        option, topics = change
        if option == zmq.SUBSCRIBE and self.count_subscriptions:
            self.metrics.subscriptions.labels("accepted" if topics else "refused").inc()
            if not topics:
                log.warning("subscription_refused")
        for allowed_topic in topics:
            # XPUB_MANUAL: applies to the subscriber whose message was just read
            self.sock.setsockopt(option, allowed_topic)
        if option == zmq.SUBSCRIBE and topics:
            self.subscribed.set()
