"""ZeroMQ ingest: the ROUTER socket CRMs send request frames to, and the acks they get back.

One task owns the socket (``gateway.runtime.zmqio`` rules). It drains up to a budget of frames,
hands each to the router (which stages writes and answers synchronously), queues the replies
behind the group commit that makes them true, and sends every reply whose batch is durable.
Replies leave in arrival order, so a client may pipeline frames on one DEALER and match replies
by position; a client may also put its own correlation frames before the payload and gets them
back unchanged (``[corr-id, payload]`` -> ``[corr-id, reply]``).

When idle it parks on the socket's FD inside a cancel scope that the committer cancels after
each commit: one task, one socket, woken by either new frames or new durability.
"""

from __future__ import annotations

from collections import deque

import structlog
import trio
import zmq

from gateway.config import IngestConfig
from gateway.protocol import decode_frame, encode_reply
from gateway.runtime import zmqio
from gateway.runtime.committer import Committer
from gateway.runtime.metrics import Metrics
from gateway.runtime.router import Router
from gateway.store.base import Batch

log = structlog.get_logger("gateway.ingest")


class Ingest:
    def __init__(
        self,
        sock: zmq.Socket[bytes],
        *,
        router: Router,
        committer: Committer,
        metrics: Metrics,
        config: IngestConfig,
    ) -> None:
        self.sock = sock
        self.router = router
        self.committer = committer
        self.metrics = metrics
        self.config = config
        self._pending: deque[tuple[Batch | None, list[bytes]]] = deque()
        self._idle: trio.CancelScope | None = None
        self.frames = 0
        committer.on_commit(self._wake)

    def _wake(self) -> None:
        if self._idle is not None:
            self._idle.cancel()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        sock = self.sock
        budget = self.config.max_frames_per_wakeup
        task_status.started()
        try:
            while True:
                handled = 0
                while handled < budget and zmqio.readable(sock):
                    parts = sock.recv_multipart(zmq.NOBLOCK)
                    handled += 1
                    await self._handle(parts)
                self._flush()
                if handled >= budget or zmqio.readable(sock):
                    await trio.lowlevel.checkpoint()
                    continue
                with trio.CancelScope() as idle:
                    self._idle = idle
                    await zmqio.wait_readable(sock)
                self._idle = None
        finally:
            self._idle = None

    async def _handle(self, parts: list[bytes]) -> None:
        self.frames += 1
        if len(parts) < 2:
            return  # a ROUTER always prepends the peer identity; nothing to answer
        identity, envelope, payload = parts[0], parts[1:-1], parts[-1]
        frame = decode_frame(
            payload, max_frame_bytes=self.config.max_frame_bytes, max_batch=self.config.max_batch
        )
        results = await self.router.handle_frame(frame)
        reply = encode_reply(frame.batch, results)
        batch = self.committer.peek()
        self._pending.append((batch if batch else None, [identity, *envelope, reply]))

    def _flush(self) -> None:
        pending = self._pending
        sock = self.sock
        while pending:
            batch, message = pending[0]
            if batch is not None and not batch.committed:
                return
            pending.popleft()
            try:
                sock.send_multipart(message, zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                reason = "peer_gone" if exc.errno == zmq.EHOSTUNREACH else "peer_full"
                self.metrics.replies_dropped.labels(reason).inc()
                log.warning("reply_dropped", reason=reason)

    def flush_committed(self) -> None:
        """Send what is ready (used at shutdown, after the final commit)."""
        self._flush()
