"""Status events on the PUB socket: topic = tenant, payload = msgpack ``StatusEvent``.

Publishing never blocks the router: events go through a bounded memory channel to the task that
owns the socket, and a full channel drops (and counts) the event. Every event is also in the
journal, so a subscriber that missed some can ask for the timeline.
"""

from __future__ import annotations

import trio
import zmq

from gateway.protocol import StatusEvent, encode
from gateway.runtime.metrics import Metrics


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
        task_status.started()
        async for event in self._receive:
            # PUB drops at its high-water mark instead of blocking: subscribers can't stall us
            sock.send_multipart([event.tenant.encode(), encode(event)], zmq.NOBLOCK)
            self.published += 1
