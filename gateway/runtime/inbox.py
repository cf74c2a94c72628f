"""The router's inbox: where verified webhooks, opt-outs and tracking hits come in.

It implements ``gateway.inbound.InboundSink`` for the HTTP surface in this process, and
``serve_events`` answers the same calls from webhook processes over ZeroMQ. Three promises:

1. **Durable before answered.** ``deliver`` returns only once what it handed over is in the
   journal; a page that says "You are unsubscribed." or a 200 to a provider is never ahead of
   the commit, and a crash before the commit loses nothing that was answered.
2. **Once per provider event.** A provider that retries a callback (or anyone who replays one)
   sends the same event id again: it is acknowledged and counted, not applied. Ids are kept in
   the journal (``store.receipt_retention_seconds``); the few staged but not yet committed are
   claimed in memory, so two copies arriving together are caught too.
3. **Opt-outs resolve without the message.** A provider opt-out that names a message which has
   left memory gets its recipient from the journal before it is applied.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterable

import msgspec
import structlog
import trio
import zmq

from adapters import ProviderReceipt, ReceiptKind
from gateway import inbound
from gateway.inbound import Inbound, SinkFull, WebhookReceipts
from gateway.runtime import zmqio
from gateway.runtime.committer import Committer
from gateway.runtime.metrics import Metrics
from gateway.runtime.router import Router
from gateway.store.base import Batch, Journal

log = structlog.get_logger("gateway.inbox")

_OPT_OUTS = frozenset({ReceiptKind.UNSUBSCRIBED, ReceiptKind.SPAM_REPORT})
_ANSWER_OK = msgspec.msgpack.encode("ok")
_ANSWER_BUSY = msgspec.msgpack.encode("busy")


def event_digest(provider: str, event_id: str) -> int:
    """A provider event's identity as a signed 64-bit integer (the journal's key for it)."""
    digest = hashlib.blake2b(f"{provider}\x00{event_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class _Claim:
    """An event id being applied right now; copies of it wait for the outcome."""

    __slots__ = ("applied", "done")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.applied = False


class Inbox:
    def __init__(
        self,
        *,
        router: Router,
        journal: Journal,
        committer: Committer,
        metrics: Metrics,
        durable_wait_seconds: float,
    ) -> None:
        self.router = router
        self.journal = journal
        self.committer = committer
        self.metrics = metrics
        self.durable_wait_seconds = durable_wait_seconds
        self._claims: dict[int, _Claim] = {}

    def notify(self, item: Inbound) -> None:
        self.router.inbound(item)

    async def deliver(self, item: Inbound) -> None:
        if isinstance(item, WebhookReceipts):
            await self._deliver_receipts(item)
            return
        self.router.inbound(item)
        await self._durable(self.committer.current)

    async def durable(self) -> None:
        """Return once everything staged so far is durable (the admin API's consent writes).

        Raises:
            SinkFull: not within the configured wait.
        """
        await self._durable(self.committer.current)

    async def _durable(self, batch: Batch) -> None:
        with trio.move_on_after(self.durable_wait_seconds):
            await self.committer.wait_committed(batch)
            return
        raise SinkFull("not yet durable; retry")

    async def _deliver_receipts(self, item: WebhookReceipts) -> None:
        provider = item.provider
        ours: dict[int, _Claim] = {}
        theirs: list[_Claim] = []
        fresh: list[tuple[ProviderReceipt, int | None]] = []
        duplicates = 0
        for receipt in item.receipts:
            if receipt.event_id is None:
                fresh.append((receipt, None))
                continue
            digest = event_digest(provider, receipt.event_id)
            claim = self._claims.get(digest) or ours.get(digest)
            if claim is not None:  # a copy is being applied right now
                duplicates += 1
                theirs.append(claim)
                continue
            ours[digest] = self._claims[digest] = _Claim()
            fresh.append((receipt, digest))
        try:
            known = await self.journal.known_receipts(list(ours)) if ours else set()
            duplicates += len(known)
            fresh = [(r, d) for r, d in fresh if d is None or d not in known]
            receipts = await self._resolve_opt_outs([r for r, _ in fresh])
        except BaseException:
            self._release(ours.items(), applied=False)
            raise
        for digest in known:  # committed long ago: nothing to wait for
            self._release([(digest, ours.pop(digest))], applied=True)
        if duplicates:
            self.metrics.receipt_duplicates.labels(provider).inc(duplicates)
        try:
            self.router.inbound(msgspec.structs.replace(item, receipts=receipts))
        except Exception:
            # a bug: the provider gets a 500 and retries; the ids must stay retryable
            self._release(ours.items(), applied=False)
            raise
        batch = self.committer.current
        now = self.router.clock.now()
        new = [(digest, now) for digest in ours]
        if new:
            for digest, at in new:
                batch.receipt(digest, at)
            batch.then(lambda: self._release(ours.items(), applied=True))
        await self._durable(batch)
        for claim in theirs:  # a copy in flight: answered once that copy is durable
            with trio.move_on_after(self.durable_wait_seconds):
                await claim.done.wait()
            if not claim.applied:
                raise SinkFull("a copy of this event is still being applied; retry")

    def _release(self, claims: Iterable[tuple[int, _Claim]], *, applied: bool) -> None:
        for digest, claim in list(claims):
            if self._claims.get(digest) is claim:
                del self._claims[digest]
            claim.applied = applied
            claim.done.set()

    async def _resolve_opt_outs(self, receipts: list[ProviderReceipt]) -> list[ProviderReceipt]:
        """Fill in the recipient of opt-outs whose message has left memory (one read)."""
        wanted = [
            r.message_key
            for r in receipts
            if r.kind in _OPT_OUTS
            and r.recipient_id is None
            and r.message_key is not None
            and r.message_key not in self.router.state.records
        ]
        if not wanted:
            return receipts
        stored = await self.journal.messages(wanted)
        resolved: list[ProviderReceipt] = []
        for receipt in receipts:
            found = stored.get(receipt.message_key or "")
            if found is not None and receipt.kind in _OPT_OUTS and receipt.recipient_id is None:
                envelope = found.record.envelope
                receipt = msgspec.structs.replace(receipt, recipient_id=envelope.recipient_id)
            resolved.append(receipt)
        return resolved


async def serve_events(
    sock: zmq.Socket[bytes],
    inbox: Inbox,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer webhook processes on a ROUTER socket: ``[correlation, Inbound]`` is delivered
    and answered ``ok`` once durable (``busy`` if not in time); ``[b"", Inbound]`` is a notify.

    One task owns the socket (``gateway.runtime.zmqio``); each delivery waits in its own task
    and queues its answer, which the owner sends.
    """
    answers: deque[list[bytes]] = deque()
    idle: trio.CancelScope | None = None

    def answer(parts: list[bytes]) -> None:
        nonlocal idle
        answers.append(parts)
        if idle is not None:
            idle.cancel()  # once: trio's cancel() formats the current task's repr each call
            idle = None

    async def handle(identity: bytes, correlation: bytes, item: Inbound) -> None:
        try:
            await inbox.deliver(item)
        except SinkFull:
            answer([identity, correlation, _ANSWER_BUSY])
            return
        answer([identity, correlation, _ANSWER_OK])

    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            while answers:
                try:
                    sock.send_multipart(answers[0], zmq.NOBLOCK)
                except zmq.ZMQError:
                    log.warning("event_answer_dropped")  # the webhook process went away
                answers.popleft()
            while zmqio.readable(sock):
                parts = sock.recv_multipart(zmq.NOBLOCK)
                if len(parts) != 3:
                    continue
                identity, correlation, payload = parts
                try:
                    item = inbound.decoder.decode(payload)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    log.error("inbound_event_undecodable", size=len(payload))
                    continue
                if correlation:
                    nursery.start_soon(handle, identity, correlation, item)
                else:
                    inbox.notify(item)
            if answers:
                continue
            with trio.CancelScope() as scope:
                idle = scope
                await zmqio.wait_readable(sock)
            idle = None
