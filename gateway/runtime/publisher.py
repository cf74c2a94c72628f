"""Status events on the PUB socket: topic = tenant, payload = a msgpack array of ``StatusEvent``.

Publishing never blocks the router: events go through a bounded memory channel to the task that
owns the socket, and a full channel drops (and counts) the event. Every event is also in the
journal, so a subscriber that missed some can ask for the timeline.

Events are sent in batches, one PUB message per tenant per drain of the channel (in order):
at campaign rates one ZeroMQ send per event cost more than the rest of an admission.
"""

from __future__ import annotations

import trio
import zmq

from gateway.protocol import StatusEvent, encode
from gateway.runtime.metrics import Metrics

_MAX_BATCH = 1000


class Publisher:
    def __init__(self, sock: zmq.Socket[bytes], metrics: Metrics, *, buffer: int = 100_000) -> None:
        self.sock = sock
        self.metrics = metrics
        self._send, self._receive = trio.open_memory_channel[StatusEvent](buffer)
        self.published = 0

    def publish(self, event: StatusEvent) -> None:
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            self.metrics.status_events_dropped.inc()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        sock = self.sock
        receive = self._receive
        task_status.started()
        async for first in receive:
            by_tenant: dict[str, list[StatusEvent]] = {first.tenant: [first]}
            for _ in range(_MAX_BATCH - 1):
                try:
                    event = receive.receive_nowait()
                except trio.WouldBlock:
                    break
                by_tenant.setdefault(event.tenant, []).append(event)
            for tenant, events in by_tenant.items():
                # PUB drops at its high-water mark instead of blocking: subscribers can't stall us
                sock.send_multipart([tenant.encode(), encode(events)], zmq.NOBLOCK)
                self.published += len(events)
