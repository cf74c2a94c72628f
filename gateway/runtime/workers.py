"""Dispatch worker processes: the same adapters, run in N processes fed over ipc sockets.

The router keeps the lanes, rate limits, retries and cascade; a worker only makes provider
requests. ``WorkerPool`` (router side) PUSHes ``WorkerJob`` frames round-robin to the workers and
PULLs ``WorkerResult`` frames back, each with the request's measured duration, so the router's
metrics stay complete without a multiprocess metrics directory. A worker (``cascadegw worker``)
runs jobs concurrently up to ``--concurrency``; the router's per-provider concurrency limits
bound what is in flight in total.

``Supervisor`` keeps child processes running, the workers here, the webhook processes and the
ZeroMQ edge (``gateway.embedded``): one that exits is restarted after a growing delay and counted in
``gateway_process_restarts_total``.

Socket ownership (``gateway.runtime.zmqio``): on each side one task owns the PUSH socket (fed by
a memory channel) and one task owns the PULL socket.
"""

from __future__ import annotations

import enum
import itertools
import os
import sys
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import structlog
import trio
import zmq
from prometheus_client.core import CounterMetricFamily, Metric

from adapters import Adapter, Outgoing, SendReceipt
from gateway.clock import perf_seconds
from gateway.core import errors
from gateway.core.errors import ProviderError
from gateway.core.model import Channel
from gateway.orphans import LIFELINE_FD_ENV, lifeline
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


# ---------------------------------------------------------------- supervision
class ProcessKind(enum.StrEnum):
    """The child processes the router keeps running (the ``process`` label)."""

    DISPATCH_WORKER = "dispatch_worker"
    WEBHOOK = "webhook"
    ZEROMQ_EDGE = "zeromq_edge"
    """The edge process of ``ingest.bind`` (requests)."""
    ZEROMQ_STATUS = "zeromq_status"
    """The edge process of ``ingest.status_bind`` (status events)."""


class ProcessRestarts:
    """``gateway_process_restarts_total{process}``: child processes started again after they
    exited. A collector, because children start before the router's registry exists
    (``register`` it there once it does); every kind's series exists from the start at 0."""

    def __init__(self) -> None:
        self.counts: dict[ProcessKind, int] = dict.fromkeys(ProcessKind, 0)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "gateway_process_restarts",
            "Child processes (dispatch workers, webhook processes, the ZeroMQ edge processes) "
            "restarted after they exited.",
            labels=["process"],
        )
        for kind, count in self.counts.items():
            family.add_metric([kind.value], count)
        yield family


def restart_delay(
    previous: float | None,
    ran_seconds: float,
    *,
    initial: float = 0.5,
    maximum: float = 30.0,
    stable_seconds: float = 10.0,
) -> float:
    """How long to wait before starting a process again: ``initial`` after one that ran for
    ``stable_seconds`` or more, twice the last delay (up to ``maximum``) after one that died
    younger, so a process that dies at once on start does not spin."""
    if previous is None or ran_seconds >= stable_seconds:
        return initial
    return min(previous * 2.0, maximum)


@dataclass(frozen=True)
class ReportPipe:
    """How a supervised child reports in: the environment variable naming its descriptor, and
    the word that starts the line it writes there once it serves (any other line is a
    failure)."""

    env: str
    serving: str


@dataclass
class Child:
    """One supervised slot, as the router sees it."""

    pid: int | None = None
    serving: bool = False
    """Running and, with a report descriptor, reported ``serving``."""
    failure: str | None = None
    """The last other line it reported (e.g. why it could not bind); cleared by ``serving``."""
    announced: str = ""
    """What followed ``serving`` on its last such line (e.g. the addresses it bound)."""
    exits: int = 0


class Supervisor:
    """Keeps ``count`` copies of ``command`` running: one that exits is logged with its exit
    code, counted in ``restarts`` and started again after ``restart_delay``.

    With ``report``, each child gets a pipe's write end, its descriptor number in
    ``report.env``, and writes lines on it: ``report.serving`` once it serves, anything else
    as a failure (``Child.failure``). Without, a running child counts as serving.
    """

    def __init__(
        self,
        kind: ProcessKind,
        command: Sequence[str],
        environ: Mapping[str, str],
        *,
        count: int,
        restarts: ProcessRestarts,
        report: ReportPipe | None = None,
        max_restart_delay_seconds: float = 30.0,
    ) -> None:
        self.kind = kind
        self.command = list(command)
        self.environ = dict(environ)
        self.children = [Child() for _ in range(count)]
        self.restarts = restarts
        self.report = report
        self.max_restart_delay_seconds = max_restart_delay_seconds
        self._changed = trio.Event()

    def serving(self) -> int:
        return sum(child.serving for child in self.children)

    async def wait_changed(self) -> None:
        """Until a child starts or stops serving, reports a failure or exits."""
        await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Supervise until cancelled (children are terminated then); ``started`` once every
        child has served, reported a failure or exited once."""
        firsts = [trio.Event() for _ in self.children]
        async with trio.open_nursery() as nursery:
            for child, first in zip(self.children, firsts, strict=True):
                nursery.start_soon(self._keep, child, first)
            for first in firsts:
                await first.wait()
            task_status.started()

    async def _keep(self, child: Child, first: trio.Event) -> None:
        delay: float | None = None
        while True:
            started = trio.current_time()
            returncode = await self._attempt(child, first)
            child.exits += 1
            first.set()
            delay = restart_delay(
                delay, trio.current_time() - started, maximum=self.max_restart_delay_seconds
            )
            log.warning(
                "child_process_exited",
                process=self.kind.value,
                pid=child.pid,
                returncode=returncode,
                restart_in_seconds=delay,
            )
            self._notify()
            await trio.sleep(delay)
            self.restarts.counts[self.kind] += 1

    async def _attempt(self, child: Child, first: trio.Event) -> int:
        environ = dict(self.environ)
        # the child exits the moment this process is gone (gateway.orphans)
        life_fd = lifeline()
        environ[LIFELINE_FD_ENV] = str(life_fd)
        read_fd: int | None = None
        write_fd: int | None = None
        if self.report is not None:
            read_fd, write_fd = os.pipe()
            environ[self.report.env] = str(write_fd)
        try:
            async with trio.open_nursery() as nursery:
                process: trio.Process = await nursery.start(
                    partial(
                        trio.run_process,
                        self.command,
                        env=environ,
                        check=False,
                        pass_fds=(life_fd,) if write_fd is None else (life_fd, write_fd),
                    )
                )
                child.pid = process.pid
                if write_fd is None or read_fd is None:
                    child.serving = True
                    first.set()
                    self._notify()
                else:
                    os.close(write_fd)  # the child's copy alone: EOF once it exits
                    write_fd = None
                    stream = trio.lowlevel.FdStream(read_fd)
                    read_fd = None
                    async with stream:
                        await self._read_reports(stream, child, first)
            return process.returncode if process.returncode is not None else -1
        finally:
            child.serving = False  # exited, or cancelled: run_process has ended it
            for fd in (read_fd, write_fd):
                if fd is not None:
                    os.close(fd)

    async def _read_reports(
        self, stream: trio.lowlevel.FdStream, child: Child, first: trio.Event
    ) -> None:
        buffer = b""
        while chunk := await stream.receive_some():
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                text = line.decode(errors="replace").strip()
                word, _, announced = text.partition(" ")
                if self.report is not None and word == self.report.serving:
                    child.serving, child.failure, child.announced = True, None, announced
                else:
                    child.failure = text
                    log.warning("child_process_failed", process=self.kind.value, reason=text)
                first.set()
                self._notify()


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
    restarts: ProcessRestarts | None = None,
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
            # a worker that dies is restarted: the router's retries cover its in-flight requests
            supervisor = Supervisor(
                ProcessKind.DISPATCH_WORKER,
                command,
                environ,
                count=workers,
                restarts=restarts if restarts is not None else ProcessRestarts(),
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(supervisor.run)
                await nursery.start(pool.serve)
                try:
                    yield pool
                finally:
                    nursery.cancel_scope.cancel()
    finally:
        context.term()


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
