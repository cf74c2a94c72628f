"""Dispatch: per-provider lanes, token buckets, concurrency limits, retries and failover.

Each provider account has a ``LaneQueue`` (critical > normal > bulk), a GCRA rate limiter and a
concurrency limit, drained by one task. Right before a request goes out the feedback's ``claim``
re-checks the step (still wanted? consent, quiet hours, caps at the real send time). Transient
errors are retried with backoff and jitter, honouring Retry-After, then failed over to the
channel's next provider (``gateway.core.retry``); only when every provider gave up does the
cascade hear ``SendFailed`` and move on.

The request itself is made by an ``Executor``: in-process adapters by default, or worker
processes over ipc sockets (``gateway.runtime.workers``) with ``--workers N``. The queues,
limits and retries stay here in the router either way, so priority and rate limits are global.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Protocol

import msgspec
import structlog
import trio

from adapters import Adapter, Outgoing, SendReceipt
from gateway.clock import Clock, perf_seconds
from gateway.config import GatewayConfig
from gateway.core.errors import ProviderError, ProviderUnavailable
from gateway.core.model import Channel
from gateway.core.retry import GiveUp, Retry, after_failure
from gateway.core.timers import Deadlines
from gateway.protocol import (
    Content,
    EmailContent,
    PushContent,
    SendRequest,
    SmsContent,
    ViberContent,
)
from gateway.runtime.labels import RetryKind, SendResult
from gateway.runtime.metrics import Metrics
from gateway.runtime.queues import DispatchQueues, Job, ProviderQueue, RequestLoader
from gateway.store.base import Journal, MessageRecord
from gateway.tracking import LinkSigner

log = structlog.get_logger("gateway.dispatch")

_request_decoder = msgspec.msgpack.Decoder(SendRequest)


class Executor(Protocol):
    async def send(self, provider: str, outgoing: Outgoing) -> tuple[SendReceipt, float]:
        """Make the request; returns the receipt and the request's duration in seconds."""
        ...


class InProcessExecutor:
    def __init__(self, adapters: Mapping[str, Adapter]) -> None:
        self.adapters = adapters

    async def send(self, provider: str, outgoing: Outgoing) -> tuple[SendReceipt, float]:
        started = perf_seconds()
        try:
            receipt = await self.adapters[provider].send(outgoing)
        except ProviderError as exc:
            exc.duration_seconds = perf_seconds() - started
            raise
        return receipt, perf_seconds() - started


class DispatchFeedbackPort(Protocol):
    """What the dispatcher tells the cascades (``gateway.runtime.feedback``)."""

    def claim(self, job: Job, now: float) -> MessageRecord | None: ...

    def send_succeeded(
        self,
        job: Job,
        *,
        provider: str,
        price: float,
        now: float,
        provider_message_id: str | None = None,
    ) -> None: ...

    def send_failed(self, job: Job, *, permanent: bool, detail: str, now: float) -> None: ...

    def send_retrying(self, job: Job, *, detail: str, now: float) -> None: ...

    def remember_address(self, record: MessageRecord, channel: Channel, address: str) -> None: ...


class Dispatcher:
    def __init__(
        self,
        *,
        config: GatewayConfig,
        queues: DispatchQueues,
        feedback: DispatchFeedbackPort,
        executor: Executor,
        journal: Journal,
        clock: Clock,
        metrics: Metrics,
        links: LinkSigner,
        seed: int | None = None,
    ) -> None:
        self.config = config
        self.queues = queues
        self.feedback = feedback
        self.executor = executor
        self.journal = journal
        self.clock = clock
        self.metrics = metrics
        self.links = links
        self._random = random.Random(seed)
        self._idle = trio.Event()
        self._retry_due: Deadlines[int] = Deadlines()
        self._retry_jobs: dict[int, Job] = {}
        self._retry_ids = 0
        self._retry_wake = trio.Event()
        self._loader = RequestLoader(journal)
        self.provider_acceptances = 0
        """Requests a provider took (not deliveries: those come later, as receipts)."""

    def inflight(self) -> int:
        return self.queues.inflight()

    async def wait_idle(self) -> None:
        """Return once no provider request is in flight."""
        while self.inflight():
            self._idle = trio.Event()
            await self._idle.wait()

    # ------------------------------------------------------------ serving
    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for queue in self.queues.by_provider.values():
                nursery.start_soon(self._drain, queue, nursery)
            nursery.start_soon(self._serve_retries)
            nursery.start_soon(self._loader.serve)
            task_status.started()

    async def _drain(self, queue: ProviderQueue, nursery: trio.Nursery) -> None:
        clock = self.clock
        while True:
            if not len(queue.queue) or queue.inflight >= queue.concurrency:
                queue.wake = trio.Event()
                await queue.wake.wait()
                continue
            now = clock.now()
            wait = queue.limiter.wait_seconds(now)
            if wait > 0:
                await trio.sleep(wait)
                continue
            popped = queue.queue.pop()
            assert popped is not None
            _, job = popped
            record = self.feedback.claim(job, now)
            if record is None:
                await trio.lowlevel.checkpoint()
                continue
            queue.limiter.try_acquire(now)
            queue.inflight += 1
            nursery.start_soon(self._execute, queue, job, record)
            await trio.lowlevel.checkpoint()

    async def _execute(self, queue: ProviderQueue, job: Job, record: MessageRecord) -> None:
        try:
            await self._attempt(queue, job, record)
        finally:
            queue.inflight -= 1
            queue.wake.set()
            self._idle.set()

    async def _attempt(self, queue: ProviderQueue, job: Job, record: MessageRecord) -> None:
        request = job.request
        if request is None:
            request = await self._loader.get(job.key)
            if request is None:
                log.error("dispatch_request_missing", message=job.key)
                self.feedback.send_failed(
                    job, permanent=True, detail="request_missing", now=self.clock.now()
                )
                return
        outgoing = self.prepare(job, record, request, provider=queue.name, now=self.clock.now())
        # an opt-out that names only the address (SMS STOP, a Viber user leaving) must find
        # the recipient: remember who this address belongs to before it is used
        self.feedback.remember_address(record, outgoing.channel, outgoing.address)
        metrics = self.metrics
        try:
            receipt, duration = await self.executor.send(queue.name, outgoing)
        except ProviderError as exc:
            self._failed(queue, job, request, exc)
            return
        except (
            Exception
        ) as exc:  # an adapter bug must not kill the dispatcher: retry it as transient
            log.exception("provider_adapter_crashed", provider=queue.name)
            self._failed(
                queue,
                job,
                request,
                ProviderUnavailable(f"adapter error: {type(exc).__name__}", provider=queue.name),
            )
            return
        metrics.provider_request(queue.name, queue.channel, duration)
        self.provider_acceptances += 1
        self.feedback.send_succeeded(
            job,
            provider=queue.name,
            price=queue.price,
            now=self.clock.now(),
            provider_message_id=receipt.provider_message_id,
        )

    def _failed(self, queue: ProviderQueue, job: Job, request: bytes, exc: ProviderError) -> None:
        metrics = self.metrics
        now = self.clock.now()
        duration = exc.duration_seconds
        if duration is not None:
            metrics.provider_request(queue.name, queue.channel, duration)
        result = SendResult.PERMANENT_ERROR if exc.permanent else SendResult.TRANSIENT_ERROR
        metrics.sends.labels(queue.channel, queue.name, result).inc()
        metrics.provider_errors.labels(queue.name, exc.kind).inc()
        log.warning(
            "provider_request_failed",
            provider=queue.name,
            channel=queue.channel.value,
            kind=exc.kind,
            status_code=exc.status_code,
            code=exc.code,
            attempt=job.attempt,
            error=str(exc),  # adapters compose these messages and keep personal data out
        )
        names = self.queues.providers[job.tenant][job.channel]
        decision = after_failure(
            self.config.dispatch.retry,
            permanent=exc.permanent,
            attempt=job.attempt,
            provider_index=job.provider_index,
            provider_count=len(names),
            retry_after_seconds=exc.retry_after_seconds,
            random_unit=self._random.random(),
        )
        match decision:
            case Retry(delay_seconds=delay, provider_index=index, attempt=attempt):
                failover = index != job.provider_index
                metrics.retries.labels(
                    job.channel, RetryKind.FAILOVER if failover else RetryKind.RETRY
                ).inc()
                target = names[index]
                self.feedback.send_retrying(
                    job,
                    detail=f"{exc.kind}: {'failover to ' + target if failover else 'retry'} in {delay:.1f}s",
                    now=now,
                )
                retry = msgspec.structs.replace(
                    job, provider_index=index, attempt=attempt, request=request
                )
                if delay <= 0:
                    self.queues.submit(retry)
                else:
                    self._schedule_retry(retry, now + delay)
            case GiveUp(permanent=permanent):
                self.feedback.send_failed(job, permanent=permanent, detail=exc.kind, now=now)

    # ------------------------------------------------------------ retries
    def _schedule_retry(self, job: Job, at: float) -> None:
        self._retry_ids += 1
        self._retry_jobs[self._retry_ids] = job
        self.queues.retrying[job.lane] += 1
        self._retry_due.schedule(self._retry_ids, at)
        self._retry_wake.set()

    async def _serve_retries(self) -> None:
        clock = self.clock
        while True:
            now = clock.now()
            for retry_id, _ in self._retry_due.pop_due(now):
                job = self._retry_jobs.pop(retry_id)
                self.queues.retrying[job.lane] -= 1
                self.queues.submit(job)
            deadline = self._retry_due.next_deadline()
            self._retry_wake = trio.Event()
            with trio.move_on_at(
                clock.trio_deadline(deadline) if deadline is not None else float("inf")
            ):
                await self._retry_wake.wait()

    # ------------------------------------------------------------ building the request
    def prepare(
        self, job: Job, record: MessageRecord, request_bytes: bytes, *, provider: str, now: float
    ) -> Outgoing:
        """Turn the journalled request into one provider request for ``job.channel``."""
        request = _request_decoder.decode(request_bytes)
        tenant = self.config.tenants[job.tenant]
        channel = job.channel
        links = self.links
        key = job.key
        content = request.content
        address = _address(request, channel)
        topic = record.envelope.topic
        link_url = (
            links.click_url(key, channel, content.link_url, now=now)
            if content.link_url is not None
            else None
        )
        unsubscribe_url = (
            links.unsubscribe_url(
                key, channel, recipient_id=request.recipient.id, topic=topic, now=now
            )
            if request.category.is_marketing
            else None
        )
        return Outgoing(
            message_key=key,
            tenant=job.tenant,
            channel=channel,
            category=request.category,
            address=address,
            content=_with_link(content, channel, link_url),
            brand=tenant.brand,
            sender=tenant.sender,
            status_callback_url=links.webhook_url(provider, key),
            link_url=link_url,
            unsubscribe_url=unsubscribe_url,
            open_pixel_url=(
                links.open_pixel_url(key, channel, now=now) if channel is Channel.EMAIL else None
            ),
            campaign=request.campaign,
            recipient_id=request.recipient.id,
            topic=topic,
        )


def _address(request: SendRequest, channel: Channel) -> str:
    recipient = request.recipient
    match channel:
        case Channel.PUSH:
            return recipient.push_tokens[0]
        case Channel.EMAIL:
            assert recipient.email is not None
            return recipient.email
        case Channel.VIBER:
            assert recipient.viber_id is not None
            return recipient.viber_id
        case Channel.SMS:
            assert recipient.phone is not None
            return recipient.phone


ChannelContent = PushContent | EmailContent | ViberContent | SmsContent


def _with_link(content: Content, channel: Channel, link_url: str | None) -> ChannelContent:
    """The channel's content with ``{link}`` replaced by the tracked click URL."""
    item: ChannelContent | None
    match channel:
        case Channel.PUSH:
            item = content.push
        case Channel.EMAIL:
            item = content.email
        case Channel.VIBER:
            item = content.viber
        case Channel.SMS:
            item = content.sms
    assert item is not None, f"no {channel} content"  # plans only hold channels with content
    if link_url is None:
        return item
    changes: dict[str, str] = {}
    for field in item.__struct_fields__:
        value = getattr(item, field)
        if isinstance(value, str) and "{link}" in value:
            changes[field] = value.replace("{link}", link_url)
    return msgspec.structs.replace(item, **changes) if changes else item
