"""ZeroMQ ingest: the ROUTER socket CRMs send request frames to, and the acks they get back.

One task owns the socket (``gateway.runtime.zmqio`` rules). It drains up to a budget of frames,
hands each to the router (which stages writes and answers synchronously), queues the replies
behind the group commit that makes them true, and sends every reply whose batch is durable.
Replies leave in each client's arrival order, so a client may pipeline frames on one DEALER and
match replies by position; a client may also put its own correlation frames before the payload and gets them
back unchanged (``[corr-id, payload]`` -> ``[corr-id, reply]``).

When idle it parks on the socket's FD inside a cancel scope that the committer cancels after
each commit: one task, one socket, woken by either new frames or new durability. The loop never
awaits I/O: a ``status`` request, which reads the journal, is answered by a side task, and its
reply waits its turn in that client's order.
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import cast

import structlog
import trio
import zmq

from gateway.config import IngestConfig
from gateway.protocol import Result, ResultStatus, decode_frame, encode_reply, invalid
from gateway.runtime import edge as edge_link
from gateway.runtime import zmqio
from gateway.runtime.committer import Committer
from gateway.runtime.curve import Principals
from gateway.runtime.labels import IngestDrop, ReplyDrop
from gateway.runtime.metrics import Metrics
from gateway.runtime.queries import JournalQuery, StatusQuery
from gateway.runtime.router import Router
from gateway.store.base import Batch

_INGEST_DROPS = frozenset(IngestDrop)
_REPLY_DROPS = frozenset(ReplyDrop)

log = structlog.get_logger("gateway.ingest")


class _Reply:
    """One frame's answer on its way out: sent once computed and its writes are durable."""

    __slots__ = ("batch", "envelope", "payload", "route")

    def __init__(self, route: list[bytes], envelope: list[bytes], batch: Batch | None) -> None:
        self.route = route
        """The identity frames back to the client: its own, or the edge's and its own."""
        self.envelope = envelope
        self.batch = batch
        self.payload: bytes | None = None

    @property
    def client(self) -> bytes:
        """Whose order this reply keeps (identities are unique per ROUTER socket)."""
        return self.route[-1]

    def ready(self) -> bool:
        return self.payload is not None and (self.batch is None or self.batch.committed)


class Ingest:
    def __init__(
        self,
        sock: zmq.Socket[bytes],
        *,
        router: Router,
        committer: Committer,
        metrics: Metrics,
        config: IngestConfig,
        principals: Principals | None,
        behind_edge: bool = False,
    ) -> None:
        self.sock = sock
        self.router = router
        self.committer = committer
        self.metrics = metrics
        self.config = config
        self.principals = principals
        """Tenants per client key (CURVE on), or None: every client may act for every tenant."""
        self.behind_edge = behind_edge
        """The socket is the edge process's link (``gateway.runtime.edge``), not the clients'."""
        self._pending: deque[_Reply] = deque()
        self._idle: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        committer.on_commit(self._wake)

    def _wake(self) -> None:
        if self._idle is not None:
            # once: trio's cancel() formats the current task's repr on every call
            self._idle.cancel()
            self._idle = None

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        sock = self.sock
        budget = self.config.max_requests_per_wakeup
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                # the budget counts requests, not frames: 64 frames of 500 sends would hold the
                # loop for seconds while timers, receipts and the critical lane's dispatch wait
                handled = 0
                receive = self._receive_from_edge if self.behind_edge else self._receive
                while handled < budget and zmqio.readable(sock):
                    handled += receive(sock)
                self._flush()
                if handled >= budget or zmqio.readable(sock):
                    await trio.lowlevel.checkpoint()
                    continue
                with trio.CancelScope() as idle:
                    self._idle = idle
                    await zmqio.wait_readable(sock)
                self._idle = None

    def _receive(self, sock: zmq.Socket[bytes]) -> int:
        """Take one message off the socket and answer it; returns how many requests it held.

        Parts are received one by one so that a message with more parts than any client
        needs is dropped without copying them (libzmq cannot bound parts per message, only
        bytes per part: ``ingest.max_frame_bytes``).
        """
        principal: frozenset[str] | None = None
        if self.principals is None:
            parts = [sock.recv(zmq.NOBLOCK)]
        else:
            # the ZAP handler put the client's key on every part as its User-Id
            first = sock.recv(zmq.NOBLOCK, copy=False)
            key = first.get("User-Id")
            principal = (
                self.principals.get(key, frozenset()) if isinstance(key, str) else frozenset()
            )
            parts = [first.bytes]
        most = self.config.max_envelope_parts + 2  # identity, envelope, payload
        count = 1
        while sock.getsockopt(zmq.RCVMORE):
            count += 1
            if count > most:
                sock.recv(zmq.NOBLOCK, copy=False)  # released at once, never copied
            else:
                parts.append(sock.recv(zmq.NOBLOCK))
        if count > most:
            self.metrics.ingest_dropped.labels(IngestDrop.TOO_MANY_PARTS).inc()
            log.warning("frame_dropped", reason="too_many_parts", parts=count)
            return 1
        if len(parts) < 2:
            return 1  # a ROUTER always prepends the peer identity; nothing to answer
        return self._handle([parts[0]], parts[1:-1], parts[-1], principal)

    def _receive_from_edge(self, sock: zmq.Socket[bytes]) -> int:
        """Take one message from the edge process: a request, a frame it answered, or a count
        (the edge's note frame says which; ``gateway.runtime.edge``)."""
        received = sock.recv_multipart(zmq.NOBLOCK)
        if len(received) < 2:
            return 1  # not the edge's: only it can reach this socket, and it always notes
        edge, note, *parts = received
        kind, detail = note[:1], note[1:].decode(errors="replace")
        if kind == edge_link.REQUEST and len(parts) >= 2:
            principal: frozenset[str] | None = None
            if self.principals is not None:
                principal = self.principals.get(detail, frozenset())
            return self._handle([edge, parts[0]], parts[1:-1], parts[-1], principal)
        if kind == edge_link.ANSWERED and len(parts) >= 2:
            reply = _Reply([edge, parts[0]], parts[1:-1], None)
            reply.payload = parts[-1]
            self._pending.append(reply)
            return 1
        label, _, number = detail.partition("=")
        count = int(number) if number.isdigit() else 1
        if kind == edge_link.INGEST_DROP and label in _INGEST_DROPS:
            self.metrics.ingest_dropped.labels(IngestDrop(label)).inc(count)
        elif kind == edge_link.REPLY_DROP and label in _REPLY_DROPS:
            self.metrics.replies_dropped.labels(ReplyDrop(label)).inc(count)
        elif kind == edge_link.SUBSCRIPTION and label in ("accepted", "refused"):
            self.metrics.subscriptions.labels(label).inc(count)
        return 1

    def _handle(
        self,
        route: list[bytes],
        envelope: list[bytes],
        payload: bytes,
        principal: frozenset[str] | None,
    ) -> int:
        """Answer one frame (the reply waits for durability); returns how many requests it held."""
        if sum(len(part) for part in envelope) > edge_link.MAX_ENVELOPE_BYTES:
            self.metrics.ingest_dropped.labels(IngestDrop.ENVELOPE_TOO_LARGE).inc()
            log.warning("frame_dropped", reason="envelope_too_large")
            return 1
        frame = decode_frame(
            payload, max_frame_bytes=self.config.max_frame_bytes, max_batch=self.config.max_batch
        )
        batch = self.committer.peek()
        before = (batch.rows, len(batch.after))
        try:
            results = self.router.handle_frame(frame, principal)
        except Exception:
            # a bug must cost this frame, not the gateway: every client shares this loop
            log.exception("frame_failed", requests=len(frame.items))
            failed = invalid("the gateway could not process this request; the error is logged")
            results = [failed] * len(frame.items)
        # the reply waits for the commit that makes it true; a frame that staged nothing and
        # was refused outright promises nothing, so its answer need not wait (while the disk
        # is full, `overloaded` must reach the client, not queue behind the stuck commit)
        promises = (batch.rows, len(batch.after)) != before or not all(
            isinstance(item, StatusQuery)
            or (isinstance(item, Result) and item.status is ResultStatus.REJECTED)
            for item in results
        )
        reply = _Reply(route, envelope, batch if batch and promises else None)
        if reply.batch is not None:
            self.committer.hurry()  # a client waits for this commit
        self._pending.append(reply)
        queries = [item for item in results if not isinstance(item, Result)]
        if not queries:
            reply.payload = encode_reply(frame.batch, cast("list[Result]", results))
            return len(results)
        # these need the journal: answer them beside the loop, never by awaiting in it
        assert self._nursery is not None
        self._nursery.start_soon(self._answer, reply, frame.batch, results, queries)
        return len(results)

    async def _answer(
        self,
        reply: _Reply,
        batch: bool,
        results: list[Result | JournalQuery],
        queries: list[JournalQuery],
    ) -> None:
        answers = iter(await self.router.answer(queries))
        final = [item if isinstance(item, Result) else next(answers) for item in results]
        reply.payload = encode_reply(batch, final)
        self._wake()

    def _flush(self) -> None:
        """Send every ready reply whose client has no earlier reply still waiting.

        Order is kept per client (a client may match replies by position), not globally: one
        client's slow status query must not hold back another client's acks.
        """
        pending = self._pending
        if not pending:
            return
        waiting: set[bytes] = set()
        kept: deque[_Reply] = deque()
        sock = self.sock
        for index, reply in enumerate(pending):
            if reply.client in waiting or not reply.ready():
                waiting.add(reply.client)
                kept.append(reply)
                continue
            assert reply.payload is not None
            try:
                sock.send_multipart([*reply.route, *reply.envelope, reply.payload], zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                if self.behind_edge and exc.errno == zmq.EAGAIN:
                    # the link to the edge is full for a moment (every client's replies share
                    # it), not a client that stopped reading: this reply and all later ones
                    # wait, in order; the edge reading makes room and wakes this loop
                    kept.append(reply)
                    kept.extend(itertools.islice(pending, index + 1, None))
                    break
                reason = (
                    ReplyDrop.PEER_GONE if exc.errno == zmq.EHOSTUNREACH else ReplyDrop.PEER_FULL
                )
                self.metrics.replies_dropped.labels(reason).inc()
                log.warning("reply_dropped", reason=reason)
        self._pending = kept
