"""Dispatch worker processes: the same adapters, run in N processes fed over ipc sockets.

The router keeps the lanes, rate limits, retries and cascade; a worker only makes provider
requests. ``WorkerPool`` (router side) PUSHes ``WorkerJob`` frames round-robin to the workers and
PULLs ``WorkerResult`` frames back, each with the request's measured duration, so the router's
metrics stay complete without a multiprocess metrics directory. A worker (``cascadegw worker``)
runs jobs concurrently up to ``--concurrency``; the router's per-provider concurrency limits
bound what is in flight in total.

Socket ownership (``gateway.runtime.zmqio``): on each side one task owns the PUSH socket (fed by
a memory channel) and one task owns the PULL socket.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import structlog
import trio
import zmq

from adapters import Adapter, Outgoing, SendReceipt
from gateway.clock import perf_seconds
from gateway.core import errors
from gateway.core.errors import ProviderError
from gateway.core.model import Channel
from gateway.protocol import EmailContent, PushContent, SmsContent, ViberContent
from gateway.runtime import zmqio

log = structlog.get_logger("gateway.workers")


class WorkerJob(msgspec.Struct, array_like=True):
    job_id: int
    provider: str
    outgoing: Outgoing


class WorkerResult(msgspec.Struct, array_like=True):
    job_id: int
    duration_seconds: float
    provider_message_id: str | None = None
    error_kind: str | None = None
    error_message: str = ""
    status_code: int | None = None
    code: str | None = None
    retry_after_seconds: float | None = None


_ERRORS: dict[str, type[ProviderError]] = {
    cls.kind: cls
    for cls in (
        errors.ProviderTimeout,
        errors.ProviderUnavailable,
        errors.RateLimited,
        errors.TransientProviderError,
        errors.InvalidRecipient,
        errors.InvalidRequest,
        errors.AuthRejected,
        errors.PermanentProviderError,
    )
}

_job_encoder = msgspec.msgpack.Encoder()
_result_decoder = msgspec.msgpack.Decoder(WorkerResult)

# ``Outgoing.content`` is a union of untagged Structs, which msgspec cannot decode blind; the
# channel says which one it is, so the wire form carries the content raw and decodes it after.
_WireOutgoing = msgspec.defstruct(
    "_WireOutgoing",
    [
        (field.name, msgspec.Raw if field.name == "content" else field.type)
        if field.required
        else (field.name, field.type, field.default)
        for field in msgspec.structs.fields(Outgoing)
    ],
)
_WireJob = msgspec.defstruct(
    "_WireJob", [("job_id", int), ("provider", str), ("outgoing", _WireOutgoing)], array_like=True
)
_wire_job_decoder = msgspec.msgpack.Decoder(_WireJob)
_CONTENT_TYPES: dict[Channel, type[msgspec.Struct]] = {
    Channel.PUSH: PushContent,
    Channel.EMAIL: EmailContent,
    Channel.VIBER: ViberContent,
    Channel.SMS: SmsContent,
}


def decode_job(frame: bytes) -> WorkerJob:
    wire: Any = _wire_job_decoder.decode(frame)  # a defstruct: mypy cannot see its fields
    fields = msgspec.structs.asdict(wire.outgoing)
    fields["content"] = msgspec.msgpack.decode(
        fields["content"], type=_CONTENT_TYPES[fields["channel"]]
    )
    return WorkerJob(wire.job_id, wire.provider, Outgoing(**fields))


def rebuild_error(result: WorkerResult, provider: str) -> ProviderError:
    """The worker's exception, as the same class on this side of the socket."""
    cls = _ERRORS.get(result.error_kind or "", errors.ProviderUnavailable)
    error = cls(
        result.error_message,
        provider=provider,
        status_code=result.status_code,
        code=result.code,
        retry_after_seconds=result.retry_after_seconds,
    )
    error.duration_seconds = result.duration_seconds
    return error


# ---------------------------------------------------------------- router side
class WorkerPool:
    """An ``Executor`` that sends each request to a worker process."""

    def __init__(self, jobs: zmq.Socket[bytes], results: zmq.Socket[bytes]) -> None:
        self._jobs_sock = jobs
        self._results_sock = results
        self._ids = itertools.count(1)
        self._waiting: dict[int, trio.MemorySendChannel[WorkerResult]] = {}
        self._outbox_send, self._outbox = trio.open_memory_channel[bytes](0)

    async def send(self, provider: str, outgoing: Outgoing) -> tuple[SendReceipt, float]:
        job_id = next(self._ids)
        send, receive = trio.open_memory_channel[WorkerResult](1)
        self._waiting[job_id] = send
        try:
            await self._outbox_send.send(_job_encoder.encode(WorkerJob(job_id, provider, outgoing)))
            result = await receive.receive()
        finally:
            self._waiting.pop(job_id, None)
        if result.error_kind is not None:
            raise rebuild_error(result, provider)
        return SendReceipt(result.provider_message_id), result.duration_seconds

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._push_jobs)
            nursery.start_soon(self._pull_results)
            task_status.started()

    async def _push_jobs(self) -> None:
        async for frame in self._outbox:
            await zmqio.send_multipart(self._jobs_sock, [frame])

    async def _pull_results(self) -> None:
        sock = self._results_sock
        while True:
            while zmqio.readable(sock):
                (frame,) = sock.recv_multipart(zmq.NOBLOCK)
                result = _result_decoder.decode(frame)
                waiter = self._waiting.get(result.job_id)
                if waiter is not None:
                    waiter.send_nowait(result)
            await zmqio.wait_readable(sock)


@asynccontextmanager
async def open_worker_pool(
    *,
    workers: int,
    config_path: str,
    environ: Mapping[str, str],
    run_dir: Path,
    concurrency: int = 256,
) -> AsyncIterator[WorkerPool]:
    """Start ``workers`` worker processes and a pool feeding them; stop them on exit."""
    await trio.Path(run_dir).mkdir(parents=True, exist_ok=True)
    jobs_endpoint = f"ipc://{run_dir}/jobs-{os.getpid()}"
    results_endpoint = f"ipc://{run_dir}/results-{os.getpid()}"
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        async with (
            zmqio.open_socket(
                context, zmq.PUSH, bind=jobs_endpoint, options={zmq.SNDHWM: 100_000}
            ) as jobs,
            zmqio.open_socket(context, zmq.PULL, bind=results_endpoint) as results,
        ):
            pool = WorkerPool(jobs, results)
            command = [
                sys.executable,
                "-m",
                "gateway",
                "--config",
                config_path,
                "worker",
                "--jobs",
                jobs_endpoint,
                "--results",
                results_endpoint,
                "--concurrency",
                str(concurrency),
            ]
            async with trio.open_nursery() as nursery:
                for _ in range(workers):
                    nursery.start_soon(_run_worker, command, dict(environ))
                await nursery.start(pool.serve)
                try:
                    yield pool
                finally:
                    nursery.cancel_scope.cancel()
    finally:
        context.term()


async def _run_worker(command: list[str], environ: dict[str, str]) -> None:
    # a worker that dies is restarted: the router's retries cover its in-flight requests
    while True:
        process = await trio.run_process(command, env=environ, check=False)
        log.warning("dispatch_worker_exited", returncode=process.returncode)
        await trio.sleep(1.0)


# ---------------------------------------------------------------- worker side
async def serve_worker(
    *, adapters: Mapping[str, Adapter], jobs_endpoint: str, results_endpoint: str, concurrency: int
) -> None:
    """The worker process's main: pull jobs, run them concurrently, push results."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    limit = trio.CapacityLimiter(concurrency)
    results_send, results_receive = trio.open_memory_channel[bytes](concurrency)
    try:
        async with (
            zmqio.open_socket(
                context, zmq.PULL, connect=jobs_endpoint, options={zmq.RCVHWM: concurrency}
            ) as jobs,
            zmqio.open_socket(context, zmq.PUSH, connect=results_endpoint) as results,
            trio.open_nursery() as nursery,
        ):

            async def push_results() -> None:
                async for frame in results_receive:
                    await zmqio.send_multipart(results, [frame])

            async def run(job: WorkerJob) -> None:
                async with limit:
                    result = await _attempt(adapters, job)
                await results_send.send(_job_encoder.encode(result))

            nursery.start_soon(push_results)
            while True:
                await limit.acquire()  # take a job only when there is room to run it
                limit.release()
                (frame,) = await zmqio.recv_multipart(jobs)
                nursery.start_soon(run, decode_job(frame))
    finally:
        context.term()


async def _attempt(adapters: Mapping[str, Adapter], job: WorkerJob) -> WorkerResult:
    started = perf_seconds()
    try:
        receipt = await adapters[job.provider].send(job.outgoing)
    except ProviderError as exc:
        return WorkerResult(
            job.job_id,
            perf_seconds() - started,
            error_kind=exc.kind,
            error_message=str(exc),
            status_code=exc.status_code,
            code=exc.code,
            retry_after_seconds=exc.retry_after_seconds,
        )
    except Exception as exc:  # an adapter bug: report it as transient, keep the worker alive
        log.exception("provider_adapter_crashed", provider=job.provider)
        return WorkerResult(
            job.job_id,
            perf_seconds() - started,
            error_kind="unavailable",
            error_message=type(exc).__name__,
        )
    return WorkerResult(
        job.job_id, perf_seconds() - started, provider_message_id=receipt.provider_message_id
    )
